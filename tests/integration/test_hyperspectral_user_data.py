"""pretrain_hyperspectral.py on cubes as users have them: NaN in the cubes, statistics that saw the
validation data, a split without validation cubes, inputs that overflow.

- Cubes with NaN train under ``data.nodata=mask`` and ``fill`` with finite losses and no skipped
  step; under the default (``error``) the run stops before anything is written, with one
  ``error:`` line naming the file and the channel (counted by dchag-compute-stats).
- Statistics over all cubes, validation included, give one ``warning:`` line.
- ``data.val_fraction=0`` gives one ``error:`` line naming the options; ``--eval-iters 0`` trains.
- A non-finite step names the cubes and the channel its micro-batches held, in the skip record
  and in the stop message.
"""

import math
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.integration.conftest import REPO, TINY_MAE, read_metrics, run_script

CUBES = ["--num-cubes", "6", "--channels", "16", "--height", "32", "--width", "32", "--feature-size", "8"]


@pytest.fixture(scope="module")
def nan_data(tmp_path_factory):
    """6 float32 cubes of 16 channels with NaN at 2 % of their pixels, and their statistics
    (dchag-compute-stats' default: the training split of val_fraction 0.2, as tiny.yaml)."""
    root = tmp_path_factory.mktemp("hs_nan")
    cubes, stats, everything = root / "cubes", root / "stats.json", root / "all.json"
    subprocess.run([sys.executable, "tools/make_synthetic_hyperspectral.py", "--out", str(cubes), *CUBES,
                    "--dtype", "float32", "--nodata-fraction", "0.02"], cwd=REPO, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "tools/compute_stats.py", "--data-path", str(cubes), "--out", str(stats),
                          "--quiet"], cwd=REPO, check=True, capture_output=True, text=True)
    assert "missing values (left out of the statistics): 1600 NaN/inf" in res.stderr, res.stderr
    subprocess.run([sys.executable, "tools/compute_stats.py", "--data-path", str(cubes), "--out", str(everything),
                    "--split", "all", "--quiet"], cwd=REPO, check=True, capture_output=True)
    return dict(data=str(cubes), stats=str(stats), all_stats=str(everything), root=root)


def _args(data, stats, *extra):
    return [*TINY_MAE, "--tensor-model-parallel-size", "1", "--data-path", data, f"data.stats_file={stats}",
            "--train-iters", "3", *extra]


def _one_error_line(res):
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def test_missing_values_stop_the_default_run_before_anything_is_written(nan_data, tmp_path):
    out = tmp_path / "out"
    res = run_script("pretrain_hyperspectral.py", _args(nan_data["data"], nan_data["stats"], "--save", str(out)))
    line = _one_error_line(res)
    assert line.startswith(f"error: {nan_data['data']}/cube_0000") and ".h5: channel 0 has 20 missing values" in line
    assert "data.nodata=fill" in line and "data.nodata=mask" in line
    assert not out.exists()


@pytest.mark.parametrize("policy", ["mask", "fill"])
def test_cubes_with_nan_train_under_mask_and_fill(nan_data, tmp_path, policy):
    log_dir = tmp_path / policy
    stats = nan_data["stats"] if policy == "mask" else nan_data["all_stats"]
    res = run_script("pretrain_hyperspectral.py", _args(nan_data["data"], stats, f"data.nodata={policy}",
                                                        "--log-dir", str(log_dir)))
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(log_dir)
    assert not [r for r in records if r["kind"] == "skip"]
    losses = [r["loss"] for r in records if r["kind"] in ("train", "eval")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), records
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    if policy == "mask":  # statistics of the training split: no warning
        assert not warnings, warnings
    else:  # statistics of all cubes, the validation cube included: one line
        assert len(warnings) == 1 and "1 of the run's 1 validation cubes" in warnings[0], warnings


def test_empty_validation_split_names_the_options(nan_data, tmp_path):
    out = tmp_path / "out"
    res = run_script("pretrain_hyperspectral.py", _args(nan_data["data"], nan_data["stats"], "data.nodata=fill",
                                                        "data.val_fraction=0", "--save", str(out)))
    line = _one_error_line(res)
    assert line.startswith("error: the validation split is empty: data.val_fraction=0 holds out no cube")
    assert "data.val_files" in line and line.endswith("or train without evaluation with --eval-iters 0")
    assert not out.exists()


def test_nonfinite_step_names_the_cubes_and_channel(tmp_path):
    """Statistics of clean cubes, then channel 5 of every cube overwritten with 3e38 (an undeclared
    fill value): finite in the file, infinite once normalized. Without validation cubes
    (``data.val_fraction=0 --eval-iters 0``), so the workaround for an empty split is exercised too."""
    import h5py

    cubes, stats = tmp_path / "cubes", tmp_path / "stats.json"
    subprocess.run([sys.executable, "tools/make_synthetic_hyperspectral.py", "--out", str(cubes), *CUBES,
                    "--dtype", "float32"], cwd=REPO, check=True, capture_output=True)
    subprocess.run([sys.executable, "tools/compute_stats.py", "--data-path", str(cubes), "--out", str(stats),
                    "--split", "all", "--quiet"], cwd=REPO, check=True, capture_output=True)
    for path in cubes.glob("*.h5"):
        with h5py.File(path, "r+") as f:
            f["cube"][5] = np.full((32, 32), 3e38, dtype=np.float32)
    log_dir = tmp_path / "run"
    res = run_script("pretrain_hyperspectral.py", _args(str(cubes), str(stats), "data.val_fraction=0", "--eval-iters",
                                                        "0", "training.max_consecutive_nonfinite=2", "--log-dir",
                                                        str(log_dir)))
    line = _one_error_line(res)
    held = re.fullmatch(r"error: 2 consecutive non-finite steps \(limit training.max_consecutive_nonfinite=2\); "
                        r"the last one's micro-batches held (.*)", line)
    assert held, line
    skips = [r for r in read_metrics(log_dir) if r["kind"] == "skip"]
    assert [r["step"] for r in skips] == [1, 2]
    assert held.group(1) == ", ".join(skips[-1]["inputs"])
    for record in skips:  # a micro-batch of 2 crops: two cubes, each named with channel 5 and its huge value
        assert len(record["inputs"]) == 2
        for text in record["inputs"]:
            named = re.fullmatch(rf"{cubes}/cube_0000\d\.h5 channel 5 \(largest \|input\| (\S+)\)", text)
            assert named and float(named.group(1)) > 1e38, text
