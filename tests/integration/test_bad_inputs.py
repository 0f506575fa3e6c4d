"""Bad inputs over the command line, the config, the data, the statistics, checkpoints and the
conversion tool: each ends with exit status 2, exactly one ``error: ...`` line on stderr, and leaves
every file as it was (the reference checkpoint, the data, the case's own directory).

Each case is one process that fails fast, before any model is built where the input allows it
(a checkpoint is only read after the model it must fit is built); two run at a time. The cases
share the session's synthetic cubes and one reference checkpoint (``tests/integration/conftest.py``).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import pytest

from tests.integration.conftest import run_script
from tests.limits import RUN_TIMEOUT_S

TRAIN = "pretrain_hyperspectral.py"
CONVERT = "tools/convert_checkpoint.py"


@dataclass
class Inputs:
    """What a case can point at: the shared data and checkpoint, and its own scratch directory."""

    data: str
    stats: str
    ref: Path  # the reference run's --save directory
    ref_args: List[str]  # the arguments that trained it (tiny MAE at TP=1, without --save)
    work: Path


@dataclass
class Case:
    """One bad input: the script, its arguments, what to prepare first, a word the line must hold."""

    name: str
    script: str
    args: Callable[[Inputs], List[str]]
    expect: str
    setup: Optional[Callable[[Inputs], None]] = None
    env: dict = field(default_factory=dict)


def _train(*extra):
    """The reference run's arguments plus ``extra``, logging into the case's directory."""
    return lambda i: [*i.ref_args, "--train-iters", "1", "--log-dir", str(i.work / "out"), *[
        e(i) if callable(e) else e for e in extra]]


def _write(name, text):
    def setup(i: Inputs):
        (i.work / name).write_text(text)
    return setup


def _copy_data_then(change):
    def setup(i: Inputs):
        shutil.copytree(i.data, i.work / "cubes")
        change(i.work / "cubes")
    return setup


def _truncate_first_cube(cubes: Path):
    first = sorted(cubes.glob("*.h5"))[0]
    first.write_bytes(first.read_bytes()[:2048])


def _stats_with(change):
    def setup(i: Inputs):
        stats = json.loads(Path(i.stats).read_text())
        change(stats)
        (i.work / "stats.json").write_text(json.dumps(stats))
    return setup


def _fewer_channels(stats):
    for key in ("mean", "std", "count", "wavelengths", "nonfinite_count", "nodata_count"):
        stats[key] = stats[key][:8]
    stats["num_channels"] = 8


def _zero_std(stats):
    stats["std"][3] = 0.0


def _copy_checkpoint_then(change):
    def setup(i: Inputs):
        shutil.copytree(i.ref, i.work / "ckpt")
        change(i.work / "ckpt")
    return setup


def _truncate_a_shard(ckpt: Path):
    shard = sorted(ckpt.glob("iter_*/*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])


def _mkdir(name, with_file=None):
    def setup(i: Inputs):
        (i.work / name).mkdir()
        if with_file:
            (i.work / name / with_file).write_text("not a checkpoint\n")
    return setup


def _export_first(i: Inputs):
    (i.work / "model.safetensors").write_bytes(b"an older export\n")


W = lambda rel: (lambda i: str(i.work / rel))  # noqa: E731  a path in the case's directory
DATA = lambda i: i.data  # noqa: E731
STATS = lambda i: f"data.stats_file={i.stats}"  # noqa: E731
REF = lambda i: str(i.ref)  # noqa: E731

CASES = [
    # command line
    Case("unknown flag", TRAIN, _train("--no-such-flag"), "unrecognized arguments: --no-such-flag"),
    Case("flag of the wrong type", TRAIN, _train("--micro-batch-size", "two"), "--micro-batch-size"),
    Case("log interval 0", TRAIN, _train("--log-interval", "0"), "training.log_interval=0 must be a positive integer"),
    # config
    Case("unknown field", TRAIN, _train("model.hidden_sise=32"), "did you mean 'hidden_size'"),
    Case("value of the wrong type", TRAIN, _train("training.adam_beta1=high"), "training.adam_beta1"),
    Case("val fraction 1.5", TRAIN, _train("data.val_fraction=1.5"), "data.val_fraction=1.5 must be in [0, 1)"),
    Case("unknown decay style", TRAIN, _train("training.lr_decay_style=bogus"), "training.lr_decay_style='bogus'"),
    Case("global batch not a multiple", TRAIN, _train("--global-batch-size", "3"), "training.global_batch_size=3"),
    Case("bad YAML", TRAIN, lambda i: ["--config", str(i.work / "bad.yaml"), "--data-path", i.data],
         "bad.yaml", setup=_write("bad.yaml", "model: [hidden_size: 32\n")),
    Case("missing config file", TRAIN, lambda i: ["--config", str(i.work / "nowhere.yaml")], "nowhere.yaml"),
    Case("TP does not divide G", TRAIN, _train("--tensor-model-parallel-size", "2", "model.channel_groups=3"),
         "model.channel_groups=3 is not divisible by parallel.tensor_model_parallel_size=2"),
    Case("world size not divisible by TP x PP", TRAIN, _train("--tensor-model-parallel-size", "2"),
         "world size 1 is not divisible by tensor_model_parallel_size=2"),
    # data
    Case("no data path", TRAIN, lambda i: [a for a in i.ref_args if a != i.data and a != "--data-path"]
         + ["data.data_path=null", "--log-dir", str(i.work / "out")], "data.data_path"),
    Case("data path that does not exist", TRAIN, _train("--data-path", W("no_cubes")), "no_cubes"),
    Case("cube with another channel count", TRAIN, _train("model.num_channels=20"), "has 16 channels"),
    Case("truncated HDF5 cube", TRAIN, _train("--data-path", W("cubes")), "cube_00000",
         setup=_copy_data_then(_truncate_first_cube)),
    # statistics
    Case("stats of another channel count", TRAIN, _train(lambda i: f"data.stats_file={i.work / 'stats.json'}"),
         "stats.json", setup=_stats_with(_fewer_channels)),
    Case("stats with std 0", TRAIN, _train(lambda i: f"data.stats_file={i.work / 'stats.json'}"), "std",
         setup=_stats_with(_zero_std)),
    # checkpoints
    Case("--save naming a file", TRAIN, _train("--save", W("a_file")), "a_file", setup=_write("a_file", "x\n")),
    Case("--save under /proc", TRAIN, _train("--save", "/proc/dchag_bad_input"), "/proc/dchag_bad_input"),
    Case("--load of a directory that is not a checkpoint", TRAIN, _train("--load", W("not_ckpt")), "not_ckpt",
         setup=_mkdir("not_ckpt", with_file="notes.txt")),
    Case("checkpoint of another architecture", TRAIN, _train("--load", REF, "model.hidden_size=64"),
         "model.hidden_size: checkpoint 32 vs config 64"),
    Case("truncated .distcp shard", TRAIN, _train("--load", W("ckpt")), "ckpt",
         setup=_copy_checkpoint_then(_truncate_a_shard)),
    # the conversion tool
    Case("convert --save naming a file", CONVERT, lambda i: ["--load", str(i.ref), "--save", str(i.work / "a_file"),
                                                           "--target-tensor-model-parallel-size", "1"],
         "a_file", setup=_write("a_file", "x\n")),
    Case("--export over an existing file", CONVERT, lambda i: ["--load", str(i.ref), "--export",
                                                             str(i.work / "model.safetensors")],
         "model.safetensors", setup=_export_first),
    Case("--export naming a directory", CONVERT, lambda i: ["--load", str(i.ref), "--export", str(i.work / "adir")],
         "adir", setup=_mkdir("adir")),
    Case("--import of a non-safetensors file", CONVERT, lambda i: ["--import", str(i.work / "w.safetensors"),
                                                                 "--save", str(i.work / "imported")],
         "w.safetensors", setup=_write("w.safetensors", "these are not weights\n")),
]


def _digest(root: Path) -> dict:
    """Every file and directory under ``root`` with a checksum of its contents."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = None
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def shared_inputs(hyperspectral_data, reference_checkpoint):
    return dict(data=hyperspectral_data["data"], stats=hyperspectral_data["stats"], ref=reference_checkpoint["run"],
                ref_args=reference_checkpoint["args"])


@pytest.fixture(scope="module")
def shared_digest(shared_inputs):
    """Checksums of the data, the statistics and the reference checkpoint before any case ran."""
    return {k: _digest(Path(shared_inputs[k]).parent) for k in ("data", "ref")}


@dataclass
class Outcome:
    """One case's process and its directory before and after."""

    result: subprocess.CompletedProcess
    before: dict
    after: dict


def _run_case(case: Case, shared: dict, root: Path) -> Outcome:
    work = root / re.sub(r"\W+", "_", case.name)
    work.mkdir()
    inputs = Inputs(work=work, **shared)
    if case.setup:
        case.setup(inputs)
    before = _digest(work)
    result = run_script(case.script, case.args(inputs), env_extra=case.env, timeout=RUN_TIMEOUT_S)
    return Outcome(result, before, _digest(work))


@pytest.fixture(scope="module")
def outcomes(shared_inputs, shared_digest, tmp_path_factory):
    """Every case, two processes at a time (each is one single-threaded process)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {case.name: pool.submit(_run_case, case, shared_inputs, root) for case in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "_") for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, outcomes, shared_inputs, shared_digest):
    outcome = outcomes[case.name]
    res = outcome.result
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, f"exit {res.returncode}; stderr: {res.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert case.expect in lines[0], lines[0]
    assert outcome.after == outcome.before, "the case's directory changed"
    assert {k: _digest(Path(shared_inputs[k]).parent) for k in ("data", "ref")} == shared_digest
    assert not Path("/proc/dchag_bad_input").exists()
