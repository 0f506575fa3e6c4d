"""Segmentation fine-tuning through finetune_hyperspectral.py from the tiny pretrained MAE (gloo, CPU).

The pretrained run is the shared ``reference_checkpoint`` (a 2-step tiny MAE at TP=1); its cubes
(``hyperspectral_data``) carry the per-pixel labels that tools/make_synthetic_hyperspectral.py writes.
"""

import math

import pytest
import torch

from tests.integration.conftest import TINY_MAE, read_metrics, run_script, train_losses
from tests.tolerances import FLOAT32_REL

SCORES = ("overall_accuracy", "mean_class_accuracy", "kappa", "mean_iou")


def _args(data, *extra):
    return [*TINY_MAE, "--data-path", data["data"], f"data.stats_file={data['stats']}", "--train-iters", "3",
            "--eval-iters", "1", "--tensor-model-parallel-size", "1", *extra]


def _global_tensors(checkpoint_dir, tmp_path, name):
    """Every tensor of a dist_checkpointing checkpoint, whole (read without any process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{name}.pt"
    dcp_to_torch_save(str(checkpoint_dir), str(out))
    return torch.load(out, weights_only=False)


def _last_eval(log_dir):
    return [r for r in read_metrics(log_dir) if r["kind"] == "eval"][-1]


def test_finetune_from_pretrained_tp2_matches_tp1_and_resumes_exactly(hyperspectral_data, reference_checkpoint,
                                                                      tmp_path):
    pretrained = ["--pretrained", str(reference_checkpoint["run"]), "segmentation.encoder_lr_multiplier=0.5",
                  "--train-iters", "4"]
    tp1, tp2 = tmp_path / "tp1", tmp_path / "tp2"
    res = run_script("finetune_hyperspectral.py", _args(hyperspectral_data, *pretrained, "--save", str(tp1)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded the pretrained encoder of" in res.stdout
    res = run_script("finetune_hyperspectral.py", _args(hyperspectral_data, *pretrained, "--save", str(tp2),
                                                        "--tensor-model-parallel-size", "2"), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    expected, got = train_losses(tp1), train_losses(tp2)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=FLOAT32_REL), (step, got[step], expected[step])
    # resume: a run killed after step 2 and resumed (no --pretrained read) repeats TP=1's steps 3 and 4
    resumed = tmp_path / "resumed"
    res = run_script("finetune_hyperspectral.py", _args(hyperspectral_data, *pretrained, "--save", str(resumed),
                                                        "--save-interval", "2"),
                     env_extra={"MEGATRON_DCHAG_FAULT": "exit_after_iteration:2"})
    assert res.returncode != 0 and "fault injection" in res.stderr
    res = run_script("finetune_hyperspectral.py", _args(hyperspectral_data, *pretrained, "--save", str(resumed),
                                                        "--load", str(resumed)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded the pretrained encoder" not in res.stdout
    got = train_losses(resumed)
    assert [got[step] for step in (3, 4)] == [expected[step] for step in (3, 4)], (got, expected)
    ev1, ev2 = _last_eval(tp1), _last_eval(tp2)
    assert math.isclose(ev1["loss"], ev2["loss"], rel_tol=FLOAT32_REL), (ev1, ev2)
    for key in SCORES:
        assert 0.0 <= ev1[key] <= 1.0 or key == "kappa", (key, ev1[key])
    assert ev1["labelled_pixels"] == ev2["labelled_pixels"] > 0
    table = (tp1 / "segmentation_metrics.md").read_text()
    assert "| vegetation |" in table and "mean IoU" in table


def test_linear_probe_on_two_data_parallel_ranks_leaves_the_encoder_unchanged(hyperspectral_data, reference_checkpoint,
                                                                             tmp_path):
    run = tmp_path / "probe"
    res = run_script("finetune_hyperspectral.py", _args(hyperspectral_data, "--pretrained", str(reference_checkpoint["run"]),
                                                        "segmentation.mode=linear_probe", "--save", str(run)), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    before = _global_tensors(next(reference_checkpoint["run"].glob("iter_*")), tmp_path, "pretrained")
    after = _global_tensors(run / "iter_0000003", tmp_path, "probe")
    encoder = sorted(k for k in before if k.startswith("encoder.") and isinstance(before[k], torch.Tensor))
    assert encoder and all(k in after for k in encoder)
    for key in encoder:
        assert torch.equal(before[key], after[key]), key
    head = [k for k in after if k.startswith("head.")]
    assert head, sorted(after)[:5]
    # the two DP ranks' confusion matrices are summed: every validation crop's 16 x 16 pixels, once
    ev = _last_eval(run)
    assert ev["labelled_pixels"] == 2 * 2 * 16 * 16  # eval_iters 1 x micro-batch 2 x DP 2 crops


@pytest.mark.parametrize("extra, message", [
    (["segmentation.label_dataset=classes"], "no label dataset 'classes'"),
    (["model.hidden_size=64"], "holds another encoder: model.hidden_size: checkpoint 32 vs config 64"),
])
def test_bad_input_is_one_line_before_any_compute(hyperspectral_data, reference_checkpoint, tmp_path, extra, message):
    res = run_script("finetune_hyperspectral.py", _args(hyperspectral_data, "--pretrained",
                                                        str(reference_checkpoint["run"]), "--save",
                                                        str(tmp_path / "run"), *extra))
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "run").exists()
