"""End-to-end MAE pretraining through pretrain_hyperspectral.py (torchrun, 2 gloo ranks, TP=2)."""

import math

import pytest

from tests.integration.conftest import TINY_MAE, read_metrics, run_script, train_losses


def _args(data, *extra):
    return [*TINY_MAE, "--data-path", data["data"], f"data.stats_file={data['stats']}", *extra]


def test_resume_is_exact(hyperspectral_data, tmp_path):
    """20 steps straight == 10 steps, save, kill -9, resume 10 steps (every step's loss)."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "20",
                                                        "--save", str(straight)), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    first = run_script(
        "pretrain_hyperspectral.py",
        _args(hyperspectral_data, "--train-iters", "20", "--save", str(interrupted), "--save-interval", "10"),
        nproc=2, env_extra={"MEGATRON_DCHAG_FAULT": "exit_after_iteration:10"},
    )
    assert first.returncode != 0 and "fault injection" in first.stderr
    assert (interrupted / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    second = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "20", "--save",
                                                           str(interrupted), "--load", str(interrupted)), nproc=2)
    assert second.returncode == 0, second.stderr[-3000:]
    expected, got = train_losses(straight), train_losses(interrupted)
    assert sorted(expected) == list(range(1, 21)) and sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == expected[step], f"step {step}: resumed {got[step]} vs straight {expected[step]}"


def test_trained_at_tp2_evaluates_identically_at_tp1(hyperspectral_data, tmp_path):
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval_tp1"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "10", "--save",
                                                        str(run_dir)), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    tp2_eval = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--skip-train", "--load", str(run_dir),
                                                        "--tensor-model-parallel-size", "1", "--log-dir",
                                                        str(eval_dir)), nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    tp1_eval = [r for r in read_metrics(eval_dir) if r["kind"] == "eval"][-1]
    assert tp1_eval["step"] == 0 or tp1_eval["step"] == tp2_eval["step"]
    assert math.isclose(tp1_eval["loss"], tp2_eval["loss"], rel_tol=1e-5), (tp1_eval, tp2_eval)
    assert (eval_dir / "config.yaml").exists()


def test_outputs_follow_the_contract(hyperspectral_data, tmp_path):
    log_dir = tmp_path / "run"
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "4", "--log-dir",
                                                        str(log_dir), "--eval-interval", "2",
                                                        "--tensor-model-parallel-size", "1"), nproc=1)
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_metrics(log_dir)
    train = [r for r in records if r["kind"] == "train"]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "tflops", "peak_mem_bytes"):
        assert key in train[-1], key
    assert train[-1]["tflops"] > 0 and train[-1]["samples_per_s"] > 0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    assert (log_dir / "config.yaml").exists()
    assert " iteration      4/     4 | consumed samples:" in res.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.num_channels=20", "--tensor-model-parallel-size", "1"], "has 16 channels"),
        ([], "world size 1 is not divisible by tensor_model_parallel_size=2"),
        (["model.channel_groups=3"], "model.channel_groups=3 is not divisible by parallel.tensor_model_parallel_size=2"),
        (["model.hidden_sise=3"], "did you mean 'hidden_size'"),
    ],
)
def test_bad_input_gives_one_clear_line(hyperspectral_data, tmp_path, extra, message):
    res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "2", "--log-dir",
                                                        str(tmp_path / "x"), *extra), nproc=1)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert lines and message in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_recompute_and_bf16_options(hyperspectral_data, tmp_path):
    """Activation recompute (full, channel stage) gives the same losses; bf16 trains with fp32 master weights."""
    losses = {}
    for name, extra in (("plain", []), ("full", ["--recompute-granularity", "full"]),
                        ("channel_stage", ["--recompute-granularity", "channel_stage"]), ("bf16", ["--bf16"])):
        res = run_script("pretrain_hyperspectral.py", _args(hyperspectral_data, "--train-iters", "3", "--log-dir",
                                                            str(tmp_path / name), "--tensor-model-parallel-size",
                                                            "1", *extra), nproc=1)
        assert res.returncode == 0, res.stderr[-3000:]
        losses[name] = train_losses(tmp_path / name)
    for name in ("full", "channel_stage"):
        for step, value in losses["plain"].items():
            assert math.isclose(losses[name][step], value, rel_tol=1e-5), (name, step)  # recomputed kernels round differently
    for step, value in losses["plain"].items():
        assert math.isfinite(losses["bf16"][step]) and abs(losses["bf16"][step] - value) < 0.05 * value
