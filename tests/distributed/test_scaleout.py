"""Scale-out: pipeline, data parallel, distributed optimizer, sequence parallel (gloo ranks, CPU).

Every layout trains the tiny MAE with the real :class:`~megatron_dchag.training.trainer.Trainer`
(data, megatron-core schedules, DDP, optimizer, checkpoints) for three optimizer steps of the same
global batch, starting from the same initial checkpoint (weights written once at TP1·PP1 and
loaded with ``finetune``: initial weights drawn under another layout would differ, megatron draws
its TP layers' weights in creation order). Losses must agree with TP1·PP1·DP1 to 1e-5 relative.
The learning rate is constant, so a run's schedule does not depend on ``train_iters``: a
checkpoint written after step 3 under one layout resumes under another for step 4, whose loss
must equal step 4 of the uninterrupted one-process run. The forecaster is checked under TP2·PP2
with sequence parallelism.

(Checkpoint saves dominate the cost here: megatron's writer starts a helper process on a
process's first save, so only the layouts that other layouts resume from save.)
"""

import json
import math
import os
from pathlib import Path

import pytest

from tests.dist_utils import DistributedTestError, run_distributed

REPO = Path(__file__).resolve().parents[2]
STEPS = 3

MAE = [
    "model.num_channels=16", "model.image_size=[16,16]", "model.patch_size=4", "model.hidden_size=32",
    "model.num_attention_heads=4", "model.channel_groups=4", "model.num_layers=4", "model.channel_embedding=index",
    "mae.decoder_hidden_size=32", "mae.decoder_num_attention_heads=4", "mae.decoder_num_layers=1",
    "training.micro_batch_size=2", "training.global_batch_size=4", "training.log_interval=1",
    "training.eval_iters=0", "training.eval_interval=0", "training.lr=1e-3", "training.lr_warmup_iters=0",
    "training.lr_decay_style=constant",
]

# Layouts whose final (step-3) checkpoint other layouts resume from; only these save.
SOURCES = {"tp2_pp2", "tp2_dp2_sp_distopt"}

# name: (world size, TP, PP, extra overrides)
LAYOUTS = {
    "tp1_pp1_dp1": (1, 1, 1, []),
    "tp2_pp2": (4, 2, 2, []),
    "pp4_uneven": (4, 1, 4, ["parallel.pipeline_layer_split=[0,1,2,1]"]),  # first stage: channel stage only
    # 2 micro-batches of 1 per DP rank (gradient accumulation), overlapped gradient reduce-scatter
    "pp2_dp2_distopt": (4, 1, 2, ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                                  "training.micro_batch_size=1"]),
    "tp2_dp2_sp_distopt": (4, 2, 1, ["parallel.sequence_parallel=true", "parallel.use_distributed_optimizer=true",
                                     "parallel.overlap_grad_reduce=true"]),
    "pp2_interleaved": (2, 1, 2, ["parallel.virtual_pipeline_model_parallel_size=2", "training.micro_batch_size=1"]),
}


def _train(task_name, base, overrides, probe=False):
    """One run on this rank; rank 0 returns the logged train losses (and probe information)."""
    import torch.distributed as dist

    from megatron_dchag.config import load_config
    from megatron_dchag.distributed import initialize_distributed
    from megatron_dchag.training.builder import build_training_components, unwrap_model
    from megatron_dchag.training.trainer import Trainer

    if task_name == "mae":
        from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask as TaskCls

        config, sections = "configs/hyperspectral/tiny.yaml", ["mae"]
    else:
        from megatron_dchag.tasks.forecasting import ERA5ForecastTask as TaskCls

        config, sections = "configs/era5/tiny.yaml", ["forecast"]
    cfg = load_config(str(REPO / config), base + overrides, world_size=dist.get_world_size(),
                      workload_sections=sections)
    par = cfg.parallel
    if par.virtual_pipeline_model_parallel_size:
        # run_distributed set up TP x PP; the interleaved schedule needs its virtual stages too.
        initialize_distributed(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                               seed=cfg.training.seed,
                               virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size)
    info = {}
    task = TaskCls(cfg)
    task.prepare()
    trainer = Trainer(cfg, task, build_training_components(cfg, task))
    if probe:
        block = unwrap_model(trainer.models[0]).encoder.decoder
        info["block_output_shapes"] = shapes = []
        block.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
        norm = block.layers[0].input_layernorm.weight if len(block.layers) else None
        info["norm_sequence_parallel"] = getattr(norm, "sequence_parallel", None)
        info["channel_layout"] = trainer.channel_layout()
    trainer.run()
    if dist.get_rank() != 0 or not cfg.training.log_dir:
        return None
    records = [json.loads(line) for line in open(os.path.join(cfg.training.log_dir, "metrics.jsonl"))]
    info["losses"] = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    info["eval"] = [r for r in records if r["kind"] == "eval"]
    return info


def _run(task_name, base, world, tp, pp, overrides, probe=False):
    overrides = overrides + [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"]
    return run_distributed(_train, world, task_name, base, overrides, probe,
                           tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)[0]


def _close(a, b, rel=1e-5):
    """Losses of another parallel layout: partial sums in another order, FLOAT32_REL of the loss."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    """Data, the shared initial checkpoint, and a cache of runs by layout name."""
    root = tmp_path_factory.mktemp("scaleout")
    cubes, stats = root / "cubes", root / "stats.json"
    from megatron_dchag.cli import compute_stats, make_synthetic_hyperspectral

    assert make_synthetic_hyperspectral.main([
        "--out", str(cubes), "--num-cubes", "12", "--channels", "16", "--height", "32", "--width", "32",
        "--feature-size", "8"]) == 0
    assert compute_stats.main(["--data-path", str(cubes), "--out", str(stats), "--quiet"]) == 0
    base = MAE + [f"data.data_path={cubes}", f"data.stats_file={stats}"]
    init = root / "init"
    _run("mae", base, 1, 1, 1, ["training.train_iters=0", f"training.save={init}"])
    runs = {}

    def get(name, save=None, steps=STEPS):
        save = name in SOURCES if save is None else save
        if (name, save, steps) not in runs:
            world, tp, pp, extra = LAYOUTS[name]
            out = root / f"{name}_{'save' if save else 'nosave'}_{steps}"
            runs[name, save, steps] = _run("mae", base, world, tp, pp, extra + [
                f"training.train_iters={steps}", f"training.load={init}", "training.finetune=true",
                f"training.log_dir={out}", *([f"training.save={out}"] if save else []),
            ], probe=True)
            runs[name, save, steps]["checkpoint"] = out
        return runs[name, save, steps]

    return dict(root=root, base=base, get=get)


def _reference(mae):
    """The uninterrupted one-process run, one step longer (the resumed runs' next step)."""
    return mae["get"]("tp1_pp1_dp1", save=False, steps=STEPS + 1)["losses"]


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1_pp1_dp1"])
def test_layout_trains_like_one_process(mae, layout):
    ref = _reference(mae)
    got = mae["get"](layout)["losses"]
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(ref) == list(range(1, STEPS + 2))
    for step in got:
        assert _close(got[step], ref[step]), f"{layout} step {step}: {got[step]!r} vs TP1·PP1·DP1 {ref[step]!r}"


def test_sequence_parallel_splits_the_backbone_sequence(mae):
    run = mae["get"]("tp2_dp2_sp_distopt")
    # 16 patches, 75% masked: 4 visible tokens; the backbone sees 2 per TP rank (micro-batch 2, hidden 32).
    assert set(run["block_output_shapes"]) == {(2, 2, 32)}
    assert run["norm_sequence_parallel"] is True
    assert mae["get"]("tp2_pp2")["norm_sequence_parallel"] is False


def test_channel_layout_lists_each_tp_ranks_channels(mae):
    text = mae["get"]("tp2_pp2")["channel_layout"]
    assert "16 channels in G=4 groups (sizes 4 x4), strategy dchag, TP 2" in text
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [row[:3] for row in rows] == [["0", "0-1", "0-7"], ["1", "2-3", "8-15"]]


def _resume(mae, checkpoint, target, steps):
    world, tp, pp, extra = LAYOUTS[target]
    log_dir = mae["root"] / f"resume_{checkpoint.name}_as_{target}"
    return _run("mae", mae["base"], world, tp, pp, extra + [
        f"training.train_iters={steps}", f"training.load={checkpoint}", f"training.log_dir={log_dir}"])["losses"]


@pytest.mark.parametrize("source, target", [
    ("tp2_pp2", "tp1_pp1_dp1"),  # PP 2 -> 1, TP 2 -> 1
    # PP 1 -> 2, TP 2 -> 1, sequence parallel -> not; the distributed optimizer's state resharded
    ("tp2_dp2_sp_distopt", "pp2_dp2_distopt"),
])
def test_checkpoint_resumes_under_another_layout(mae, source, target):
    checkpoint = mae["get"](source)["checkpoint"]
    got, ref = _resume(mae, checkpoint, target, STEPS + 1), _reference(mae)
    assert list(got) == [STEPS + 1]
    assert _close(got[STEPS + 1], ref[STEPS + 1]), (got[STEPS + 1], ref[STEPS + 1])


def test_interleaved_checkpoint_resumes_without_interleaving(mae):
    checkpoint = mae["get"]("pp2_interleaved", save=True, steps=1)["checkpoint"]
    got, ref = _resume(mae, checkpoint, "tp1_pp1_dp1", 2), _reference(mae)
    assert list(got) == [2] and _close(got[2], ref[2]), (got, ref)


def test_switching_the_distributed_optimizer_on_resume_is_refused_clearly(mae):
    checkpoint = mae["get"]("tp2_pp2")["checkpoint"]  # saved without the distributed optimizer
    with pytest.raises(DistributedTestError, match=r"CheckpointError: checkpoint .* was saved with "
                       r"parallel.use_distributed_optimizer=false; resume with the same setting"):
        _run("mae", mae["base"], 1, 1, 1, ["parallel.use_distributed_optimizer=true",
                                           f"training.train_iters={STEPS + 1}", f"training.load={checkpoint}"])


# ---------------------------------------------------------------------------------------------
# Forecasting: the same pipeline/sequence-parallel machinery
# ---------------------------------------------------------------------------------------------

ERA5_CHANNELS = "[z_500,z_850,t_500,t_850,u_500,u_850,v_500,v_850,q_500,q_850,t2m,u10,v10,lsm,orography]"
FORECAST = [
    f"data.channels={ERA5_CHANNELS}", "model.num_channels=15", "model.image_size=[16,32]", "model.patch_size=4",
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.channel_groups=4",
    "forecast.max_lead_hours=24", "forecast.eval_lead_hours=[24]", "forecast.metric_variables=[z_500,t2m]",
    "training.micro_batch_size=2", "training.global_batch_size=4", "training.log_interval=1",
    "training.eval_interval=0", "training.eval_iters=1", "training.lr_warmup_iters=0",
    "training.lr_decay_style=constant",
]


def test_forecaster_under_pipeline_and_sequence_parallel(tmp_path):
    from megatron_dchag.cli import compute_era5_stats as stats_tool
    from megatron_dchag.cli import make_synthetic_era5 as synth

    data, stats = tmp_path / "synth.zarr", tmp_path / "stats.npz"
    synth.write_era5(synth.generate_synthetic_era5(days=20, resolution=11.25, levels=[500, 850]), data)
    stats_tool.save_era5_stats(stats, stats_tool.compute_era5_stats(str(data), log=lambda *a: None))
    base = FORECAST + [f"data.data_path={data}", f"data.stats_file={stats}"]
    init = tmp_path / "init"
    _run("forecast", base, 1, 1, 1, ["training.train_iters=0", "training.eval_iters=0", f"training.save={init}"])
    common = [f"training.train_iters={STEPS}", f"training.load={init}", "training.finetune=true"]
    ref = _run("forecast", base, 1, 1, 1, common + [f"training.log_dir={tmp_path / 'ref'}"])
    got = _run("forecast", base, 4, 2, 2, common + ["parallel.sequence_parallel=true",
                                                    f"training.log_dir={tmp_path / 'tp2_pp2_sp'}"])
    for step in range(1, STEPS + 1):
        assert _close(got["losses"][step], ref["losses"][step]), (step, got["losses"][step], ref["losses"][step])
    ref_eval, got_eval = ref["eval"][-1], got["eval"][-1]
    keys = [k for k in ref_eval if k.startswith(("rmse/", "acc/"))]
    assert keys and all(_close(got_eval[k], ref_eval[k]) for k in keys), (ref_eval, got_eval)
