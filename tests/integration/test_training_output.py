"""What a user sees while training: the Megatron-LM style log line and its metrics.jsonl keys, W&B
logging through a fake ``wandb`` module, and the notices on resume and when nothing is written."""

import json
import os
import re
import textwrap

import pytest

from megatron_dchag.training.metrics_logger import TRAIN_RECORD_KEYS
from tests.integration.conftest import read_metrics, run_script

FAKE_WANDB = textwrap.dedent('''
    """A stand-in for the wandb package: every call is appended to $FAKE_WANDB_LOG as JSON."""
    import json
    import os


    def _write(**record):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as fh:
            fh.write(json.dumps(record) + "\\n")


    class _Run:
        def log(self, data, step=None):
            _write(call="log", data=data, step=step)

        def finish(self):
            _write(call="finish")


    def init(project=None, name=None, dir=None, config=None, **kwargs):
        _write(call="init", project=project, name=name, dir=dir, sections=sorted(config or {}))
        return _Run()
''')

LINE = re.compile(
    r"^ iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| elapsed time per iteration \(ms\): [\d.]+ \| "
    r"learning rate: ([\d.E+-]+) \| loss: [\d.E+-]+ \| grad norm: [\d.]+ \| samples/s: [\d.]+ \| "
    r"TFLOP/s per GPU: [\d.e+-]+ \| MFU: [\d.]+% of 0\.001 TFLOP/s \| peak memory \(MiB\): \d+ \| ETA \d\d:\d\d:\d\d$",
    re.M,
)


def _tree_digest(root):
    """Every file under ``root`` with its size and modification time."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_log_line_metrics_and_wandb_on_resume(reference_checkpoint, tmp_path):
    fake = tmp_path / "fake_site" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_WANDB)
    calls, log_dir = tmp_path / "wandb_calls.jsonl", tmp_path / "resumed"
    ref = reference_checkpoint
    res = run_script("pretrain_hyperspectral.py", [
        *ref["args"], "--train-iters", "4", "--load", str(ref["run"]), "--log-dir", str(log_dir),
        "--peak-tflops", "0.001", "--wandb-project", "dchag-test", "--wandb-exp-name", "resume-4",
    ], env_extra={"PYTHONPATH": str(fake.parent), "FAKE_WANDB_LOG": str(calls)})
    assert res.returncode == 0, res.stderr[-3000:]
    # The saved schedule (2 steps) wins and the run says so: lr is min_lr past the saved decay.
    assert "note: the learning-rate schedule differs from checkpoint" in res.stdout
    assert "train_iters 2 -> 4" in res.stdout and "the checkpoint's schedule is kept" in res.stdout
    assert "MFU against 0.001 TFLOP/s per device (training.peak_tflops)" in res.stdout
    lines = LINE.findall(res.stdout)
    assert [(int(i), int(n), int(c)) for i, n, c, _ in lines] == [(3, 4, 6), (4, 4, 8)], res.stdout[-3000:]
    assert float(lines[0][3]) == pytest.approx(1e-4)
    assert "\r" not in res.stdout  # no progress bar when stdout is not a terminal

    train = [r for r in read_metrics(log_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 4]
    for rec in train:
        assert set(TRAIN_RECORD_KEYS) <= set(rec), set(TRAIN_RECORD_KEYS) - set(rec)
        assert rec["consumed_samples"] == rec["step"] * 2 and rec["train_iters"] == 4
        assert rec["mfu"] == pytest.approx(rec["tflops"] / 0.001) and rec["peak_tflops"] == 0.001
        assert rec["samples_per_s"] == pytest.approx(2000 / rec["iteration_time_ms"])
        assert rec["eta_s"] == pytest.approx((4 - rec["step"]) * rec["iteration_time_ms"] / 1000)

    records = [json.loads(line) for line in calls.read_text().splitlines()]
    init = records[0]
    assert (init["call"], init["project"], init["name"], init["dir"]) == (
        "init", "dchag-test", "resume-4", str(log_dir / "wandb"))
    assert {"model", "parallel", "data", "training", "mae"} <= set(init["sections"])  # the run's config
    logged = {r["step"]: r["data"] for r in records if r["call"] == "log"}
    assert sorted(logged) == [3, 4] and logged[4]["train/loss"] == pytest.approx(train[-1]["loss"])
    assert records[-1] == {"call": "finish"}


def test_override_schedule_and_nothing_written_notice(reference_checkpoint, tmp_path):
    ref = reference_checkpoint
    before = _tree_digest(ref["run"].parent)
    res = run_script("pretrain_hyperspectral.py", [
        *ref["args"], "--train-iters", "4", "--load", str(ref["run"]), "--override-opt-param-scheduler",
    ])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "note: no --save and no --log-dir: nothing will be written" in res.stdout
    assert "using the command line's (--override-opt-param-scheduler)" in res.stdout
    assert "MFU not reported: no peak TFLOP/s known for this device" in res.stdout
    # The command line's 4-step cosine decay: halfway between lr=1e-3 and min_lr=1e-4 at step 3.
    rates = re.findall(r"^ iteration +3/ +4 .*\| learning rate: ([\d.E+-]+) \|", res.stdout, re.M)
    assert rates and float(rates[0]) == pytest.approx(5.5e-4), res.stdout[-3000:]
    assert _tree_digest(ref["run"].parent) == before
