"""Crash-safe saves, clean stops, non-finite steps, warm starts and bad input (pretrain_hyperspectral.py)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.limits import RUN_TIMEOUT_S

from tests.integration.conftest import (REPO, TINY_MAE, read_metrics, run_script, train_losses,
                                        wait_for_step)


def _args(data, *extra):
    return [*TINY_MAE, "--data-path", data["data"], f"data.stats_file={data['stats']}", *extra]


def test_kill_during_save_keeps_previous_checkpoint_and_resumes_exactly(hyperspectral_data, tmp_path):
    common = ["--train-iters", "12", "--save-interval", "4"]
    straight = tmp_path / "straight"
    assert run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--log-dir", str(straight)),
                      nproc=2).returncode == 0
    run = tmp_path / "run"
    crashed = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--save", str(run)), nproc=2,
                         env_extra={"MEGATRON_DCHAG_FAULT": "kill_in_save:8:after_write",
                                    "MEGATRON_DCHAG_FAULT_RANK": "1"})
    assert crashed.returncode != 0 and "kill_in_save:8" in crashed.stderr
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (run / "iter_0000008").exists()  # the interrupted save never became visible
    resumed = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--save", str(run),
                                                            "--load", str(run)), nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = train_losses(straight), train_losses(run)
    for step in range(1, 13):
        assert got[step] == expected[step], step
    assert not [p for p in os.listdir(run) if ".partial-" in p]  # leftovers of the crash were cleaned


def test_sigterm_saves_and_exits_zero_then_resumes_exactly(hyperspectral_data, tmp_path):
    """What SLURM does before the walltime: SIGTERM to every task."""
    common = ["--train-iters", "500", "--tensor-model-parallel-size", "1"]
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "pretrain_hyperspectral.py",
                             *_args(hyperspectral_data, *common, "--save", str(run))],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(run, 3, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    stopped_at = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert stopped_at >= 3
    assert any(r.get("event") == "exit" for r in read_metrics(run))
    stop_after = stopped_at + 3
    fault = {"MEGATRON_DCHAG_FAULT": f"exit_after_iteration:{stop_after}"}
    straight = tmp_path / "straight"
    run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--log-dir", str(straight)),
               env_extra=fault)
    run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *common, "--load", str(run), "--log-dir",
                                                  str(run)), env_extra=fault)
    expected, got = train_losses(straight), train_losses(run)
    for step in range(1, stop_after + 1):
        assert got[step] == expected[step], step


def test_nonfinite_steps_are_skipped_then_stop_the_run(hyperspectral_data, tmp_path):
    one = ["--tensor-model-parallel-size", "1", "--train-iters", "6"]
    skipped = tmp_path / "skipped"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--log-dir", str(skipped)),
                     env_extra={"MEGATRON_DCHAG_FAULT": "nonfinite_at:3:2"})
    assert res.returncode == 0, res.stderr[-2000:]
    records = read_metrics(skipped)
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3, 4]
    assert all(isinstance(r["loss"], float) for r in records if r["kind"] == "train")
    assert records[-1]["kind"] == "eval" and isinstance(records[-1]["loss"], float)

    stopped = tmp_path / "stopped"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--save", str(stopped),
                                                        "training.max_consecutive_nonfinite=3"),
                     env_extra={"MEGATRON_DCHAG_FAULT": "nonfinite_at:3:10"})
    assert res.returncode == 2
    assert "error: 3 consecutive non-finite steps" in res.stderr and "Traceback" not in res.stderr
    assert (stopped / "latest_checkpointed_iteration.txt").exists()  # the last good weights were saved


def test_finetune_and_architecture_checks(hyperspectral_data, tmp_path):
    one = ["--tensor-model-parallel-size", "1"]
    base = tmp_path / "base"
    assert run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "3", "--save",
                                                         str(base))).returncode == 0
    # --finetune: weights only, fresh optimizer and step 0, at another image size (position
    # embedding interpolated from the 4x4 to the 6x6 patch grid)
    ft = tmp_path / "ft"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "2", "--load",
                                                        str(base), "--finetune", "model.image_size=[24,24]",
                                                        "--save", str(ft)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(train_losses(ft)) == [1, 2]
    # plain --load at another image size is refused with the reason
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "5", "--load",
                                                        str(base), "model.image_size=[24,24]", "--log-dir",
                                                        str(tmp_path / "no")))
    assert res.returncode == 2 and "pos_embedding" in res.stderr and "--finetune" in res.stderr
    # another architecture: every difference listed
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, *one, "--train-iters", "5", "--load",
                                                        str(base), "model.hidden_size=64", "model.num_layers=3",
                                                        "--log-dir", str(tmp_path / "no")))
    assert res.returncode == 2
    assert "model.hidden_size: checkpoint 32 vs config 64" in res.stderr
    assert "model.num_layers: checkpoint 2 vs config 3" in res.stderr
    assert not (tmp_path / "no").exists()


def _truncated_copy(data, root):
    bad = root / "bad_cubes"
    shutil.copytree(data["data"], bad)
    victim = sorted(bad.glob("*.h5"))[3]
    victim.write_bytes(victim.read_bytes()[:700])
    return bad, victim.name


@pytest.mark.parametrize("case", ["missing_config", "bad_yaml", "unknown_field", "truncated_hdf5", "channel_count",
                                  "missing_checkpoint", "world_size", "batch_size"])
def test_bad_input_is_one_line_and_writes_nothing(hyperspectral_data, tmp_path, case):
    out = tmp_path / "out"
    one = ["--tensor-model-parallel-size", "1", "--train-iters", "2", "--save", str(out)]
    args, expect = _args(hyperspectral_data, *one), None
    if case == "missing_config":
        args, expect = ["--config", str(tmp_path / "nope.yaml"), "--save", str(out)], "nope.yaml' does not exist"
    elif case == "bad_yaml":
        (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
        args, expect = ["--config", str(tmp_path / "bad.yaml"), "--save", str(out)], "is not valid YAML"
    elif case == "unknown_field":
        args, expect = args + ["training.lrr=1"], "unknown config field 'training.lrr' (did you mean 'lr'?)"
    elif case == "truncated_hdf5":
        bad, name = _truncated_copy(hyperspectral_data, tmp_path)
        args, expect = _args(dict(hyperspectral_data, data=str(bad)), *one), name
    elif case == "channel_count":
        args, expect = args + ["model.num_channels=12"], "has 16 channels"
    elif case == "missing_checkpoint":
        args, expect = args + ["--load", str(tmp_path / "no_ckpt")], "no_ckpt' does not exist"
    elif case == "world_size":
        args, expect = args + ["--pipeline-model-parallel-size", "2"], "world size 1 is not divisible"
    elif case == "batch_size":
        args, expect = args + ["--global-batch-size", "3"], "global_batch_size=3 is not divisible"
    res = run_script("pretrain_hyperspectral.py", args)
    assert res.returncode == 2, (case, res.stderr[-2000:])
    errors = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], (case, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert not out.exists(), f"{case}: output written for bad input"
    if case == "unknown_field":
        debug = run_script("pretrain_hyperspectral.py", args + ["--debug"])
        assert debug.returncode != 0 and "Traceback" in debug.stderr
