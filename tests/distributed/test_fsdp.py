"""Model sharding with torch FSDP2 (megatron-core's ``TorchFullyShardedDataParallel``) under D-CHAG TP.

The tiny ``dchag`` MAE trains with the real :class:`~megatron_dchag.training.trainer.Trainer` for
five steps from one initial checkpoint (written at TP1 and loaded with ``finetune``: initial
weights drawn under another layout would differ) under TP2 x FSDP2 (4 ranks) and TP1 x FSDP2 with
two micro-batches per rank (gradient accumulation; 2 ranks); losses, gradient norms and the final
parameters (exported by the conversion tool's code) must equal one process to 1e-5 relative.
Checkpoints cross between FSDP and no FSDP: the FSDP run's step-5 checkpoint resumes at TP1
without FSDP and at its own layout, and the one-process run's at TP2 x FSDP2, each giving the
one-process step-6 loss. The forecaster trains under TP2 x FSDP2 with sequence parallelism, full
recompute and bf16 like DDP at that layout. Per-rank parameter + gradient + optimizer bytes at
FSDP2 are compared with DP2 at the same TP, in fp32 and bf16. The memory model's FSDP terms are
checked against the benchmark's measured peaks in docs/bench/fsdp_*.json, and its paper-scale
FSDP table and the benchmark's FSDP layouts without compute.
"""

import json
import math
import os
from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[2]
STEPS = 5

MAE = [
    "model.num_channels=16", "model.image_size=[16,16]", "model.patch_size=4", "model.hidden_size=32",
    "model.num_attention_heads=4", "model.channel_groups=4", "model.num_layers=2", "model.channel_embedding=index",
    "mae.decoder_hidden_size=32", "mae.decoder_num_attention_heads=4", "mae.decoder_num_layers=1",
    "training.micro_batch_size=2", "training.global_batch_size=4", "training.log_interval=1",
    "training.eval_iters=0", "training.eval_interval=0", "training.lr=1e-3", "training.lr_warmup_iters=0",
    "training.lr_decay_style=constant",
]
FSDP = ["parallel.use_torch_fsdp2=true"]


def _train(task_name, base, overrides):
    """One run on this rank; rank 0 returns its train losses by step and how the model was wrapped."""
    import torch.distributed as dist

    from megatron_dchag.config import load_config
    from megatron_dchag.training.builder import build_training_components
    from megatron_dchag.training.trainer import Trainer

    if task_name == "mae":
        from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask as TaskCls

        config, sections = "configs/hyperspectral/tiny.yaml", ["mae"]
    else:
        from megatron_dchag.tasks.forecasting import ERA5ForecastTask as TaskCls

        config, sections = "configs/era5/tiny.yaml", ["forecast"]
    cfg = load_config(str(REPO / config), base + overrides, world_size=dist.get_world_size(),
                      workload_sections=sections)
    task = TaskCls(cfg)
    task.prepare()
    trainer = Trainer(cfg, task, build_training_components(cfg, task))
    wrapper = type(trainer.models[0]).__name__
    trainer.run()
    log_dir = cfg.training.log_dir or cfg.training.save
    if dist.get_rank() != 0 or not log_dir:
        return None
    records = [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train"]
    return dict(wrapper=wrapper, losses={r["step"]: r["loss"] for r in train},
                grad_norms={r["step"]: r["grad_norm"] for r in train}, eval=[r for r in records if r["kind"] == "eval"])


def _run(task_name, base, world, tp, overrides):
    return run_distributed(_train, world, task_name, base, overrides + [f"parallel.tensor_model_parallel_size={tp}"],
                           tensor_model_parallel_size=tp)[0]


def _close(a, b, rel=1e-5):
    """Another parallel layout sums in another order: FLOAT32_REL of the loss."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


@pytest.fixture(scope="module")
def mae(tmp_path_factory):
    """Data, the initial checkpoint, the one-process reference (6 steps, checkpoint after step 5)
    and the two FSDP runs (5 steps, checkpoint at the end)."""
    root = tmp_path_factory.mktemp("fsdp")
    cubes, stats = root / "cubes", root / "stats.json"
    from megatron_dchag.cli import compute_stats, make_synthetic_hyperspectral

    assert make_synthetic_hyperspectral.main([
        "--out", str(cubes), "--num-cubes", "12", "--channels", "16", "--height", "32", "--width", "32",
        "--feature-size", "8"]) == 0
    assert compute_stats.main(["--data-path", str(cubes), "--out", str(stats), "--quiet"]) == 0
    base = MAE + [f"data.data_path={cubes}", f"data.stats_file={stats}"]
    init = root / "init"
    _run("mae", base, 1, 1, ["training.train_iters=0", f"training.save={init}"])
    start = [f"training.load={init}", "training.finetune=true"]
    runs = {
        "ref": _run("mae", base, 1, 1, start + [f"training.train_iters={STEPS + 1}", f"training.save={root / 'ref'}",
                                                f"training.save_interval={STEPS}", f"training.log_dir={root / 'ref'}"]),
        "tp2_fsdp2": _run("mae", base, 4, 2, FSDP + start + [
            f"training.train_iters={STEPS}", f"training.save={root / 'tp2_fsdp2'}"]),
        # 2 micro-batches of 1 per rank: FSDP reduce-scatters after each and the shards accumulate;
        # the units stay gathered from forward to backward (tp2_fsdp2: resharded, the default)
        "tp1_fsdp2_accum": _run("mae", base, 2, 1, FSDP + start + [
            "training.micro_batch_size=1", "parallel.fsdp_reshard_after_forward=false", f"training.train_iters={STEPS}", f"training.save={root / 'tp1_fsdp2_accum'}"]),
    }
    return dict(root=root, base=base, runs=runs)


@pytest.mark.parametrize("layout", ["tp2_fsdp2", "tp1_fsdp2_accum"])
def test_fsdp_layout_trains_like_one_process(mae, layout):
    ref, got = mae["runs"]["ref"], mae["runs"][layout]
    assert got["wrapper"] == "TorchFullyShardedDataParallel" and ref["wrapper"] == "DistributedDataParallel"
    assert sorted(got["losses"]) == list(range(1, STEPS + 1))
    for step in got["losses"]:
        assert _close(got["losses"][step], ref["losses"][step]), (layout, step, got["losses"][step], ref["losses"][step])
        # the norm of the whole gradient (megatron sums the squares of the DP shards): clipping sees it
        assert _close(got["grad_norms"][step], ref["grad_norms"][step]), (layout, step, got["grad_norms"], ref["grad_norms"])


def _without_key_bias(name, tensor, heads=4):
    """The attention key bias gets no gradient in exact arithmetic (softmax is invariant to a shift
    of every key by the same vector), so Adam turns its rounding noise, which differs between any two
    layouts (DDP at TP2 x DP2 as much as FSDP), into updates of its own: it is left out of the
    comparison. megatron's fused QKV bias holds [q, k, v] per head."""
    if name.endswith("linear_qkv.bias"):
        return tensor.reshape(heads, 3, -1)[:, [0, 2]]
    return tensor


def _export(checkpoints, out_dir):
    """tools/convert_checkpoint.py --export of each checkpoint (its logic, on this one process):
    every model tensor, at TP1."""
    from safetensors.torch import load_file

    from megatron_dchag.training.checkpoint_conversion import export_rank

    out = []
    for i, ckpt in enumerate(checkpoints):
        path = os.path.join(out_dir, f"{i}.safetensors")
        export_rank(ckpt, path)
        out.append(load_file(path))
    return out


def test_fsdp_parameters_after_training_equal_one_process(mae):
    """The FSDP runs' checkpoints, exported to one portable file by the conversion tool's code."""
    from tests.tolerances import FLOAT32_REL, max_relative_error

    root = mae["root"]
    ref, tp2, accum = run_distributed(_export, 1, [
        str(root / "ref" / f"iter_{STEPS:07d}"), str(root / "tp2_fsdp2"), str(root / "tp1_fsdp2_accum")], str(root))[0]
    assert set(tp2) == set(ref) == set(accum) and len(ref) > 10
    for name, got in (("tp2_fsdp2", tp2), ("tp1_fsdp2_accum", accum)):
        worst = max((max_relative_error(_without_key_bias(k, got[k]), _without_key_bias(k, ref[k])), k) for k in ref)
        assert worst[0] <= FLOAT32_REL, f"{name}: {worst[1]} differs by {worst[0]:.2e} of its largest value"


@pytest.mark.parametrize("source, target", [
    ("tp2_fsdp2", (1, 1, [])),          # FSDP + TP2 -> one process without FSDP
    ("ref", (4, 2, FSDP)),              # one process without FSDP -> FSDP + TP2
    ("tp2_fsdp2", (4, 2, FSDP)),        # the same layout: sharded optimizer state back into DTensors
])
def test_checkpoint_resumes_across_fsdp(mae, source, target):
    root, (world, tp, extra) = mae["root"], target
    checkpoint = root / source / (f"iter_{STEPS:07d}" if source == "ref" else "")
    got = _run("mae", mae["base"], world, tp, extra + [
        f"training.train_iters={STEPS + 1}", f"training.load={checkpoint}",
        f"training.log_dir={root / f'resume_{source}_tp{tp}'}"])["losses"]
    ref = mae["runs"]["ref"]["losses"]
    assert list(got) == [STEPS + 1] and _close(got[STEPS + 1], ref[STEPS + 1]), (got, ref[STEPS + 1])


# ---------------------------------------------------------------------------------------------
# Forecasting: FSDP with sequence parallelism, full recompute and bf16
# ---------------------------------------------------------------------------------------------

ERA5_CHANNELS = "[z_500,z_850,t_500,t_850,u_500,u_850,v_500,v_850,q_500,q_850,t2m,u10,v10,lsm,orography]"
FORECAST = [
    f"data.channels={ERA5_CHANNELS}", "model.num_channels=15", "model.image_size=[16,32]", "model.patch_size=4",
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.channel_groups=4",
    "forecast.max_lead_hours=24", "forecast.eval_lead_hours=[24]", "forecast.metric_variables=[z_500,t2m]",
    "training.micro_batch_size=2", "training.global_batch_size=4", "training.log_interval=1",
    "training.eval_interval=0", "training.eval_iters=1", "training.lr_warmup_iters=0",
    "training.lr_decay_style=constant", "training.recompute_granularity=full", "training.bf16=true",
]


def test_forecaster_trains_under_fsdp_with_sequence_parallel_recompute_and_bf16(tmp_path):
    """Compared with DDP at the same layout (TP2 x DP2, sequence parallel, full recompute, bf16):
    the forecaster draws each sample's lead time per DP rank, so one process sees other samples.
    bf16 FSDP reduce-scatters bf16 gradients where DDP reduces fp32 main gradients: BFLOAT16_REL."""
    from megatron_dchag.cli import compute_era5_stats as stats_tool
    from megatron_dchag.cli import make_synthetic_era5 as synth
    from tests.tolerances import BFLOAT16_REL

    data, stats = tmp_path / "synth.zarr", tmp_path / "stats.npz"
    synth.write_era5(synth.generate_synthetic_era5(days=20, resolution=11.25, levels=[500, 850]), data)
    stats_tool.save_era5_stats(stats, stats_tool.compute_era5_stats(str(data), log=lambda *a: None))
    base = FORECAST + [f"data.data_path={data}", f"data.stats_file={stats}"]
    init = tmp_path / "init"
    _run("forecast", base, 1, 1, ["training.train_iters=0", "training.eval_iters=0", "training.bf16=false",
                                  f"training.save={init}"])
    common = ["training.train_iters=3", f"training.load={init}", "training.finetune=true",
              "parallel.sequence_parallel=true"]
    ref = _run("forecast", base, 4, 2, common + [f"training.log_dir={tmp_path / 'ddp'}"])
    got = _run("forecast", base, 4, 2, FSDP + common + [f"training.log_dir={tmp_path / 'fsdp'}"])
    assert got["wrapper"] == "TorchFullyShardedDataParallel" and ref["wrapper"] == "DistributedDataParallel"
    for step in range(1, 4):
        assert _close(got["losses"][step], ref["losses"][step], rel=BFLOAT16_REL), (step, got["losses"], ref["losses"])
        assert _close(got["grad_norms"][step], ref["grad_norms"][step], rel=BFLOAT16_REL), (step, got, ref)
    keys = [k for k in ref["eval"][-1] if k.startswith(("rmse/", "acc/"))]
    assert keys and all(_close(got["eval"][-1][k], ref["eval"][-1][k], rel=BFLOAT16_REL) for k in keys), (
        ref["eval"][-1], got["eval"][-1])


# ---------------------------------------------------------------------------------------------
# Memory: what FSDP shards
# ---------------------------------------------------------------------------------------------


def _state_bytes(bf16):
    """Per-rank bytes of parameters, gradients and optimizer state after one training step of the
    benchmark encoder (TP1, DP2), under DDP and under FSDP2; and the FSDP step's loss vs DDP's."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from megatron_dchag.config import load_config, resolve_config
    from megatron_dchag.tasks.benchmark import SyntheticEncoderTask
    from megatron_dchag.training.builder import build_training_components, unwrap_model

    def local(t):
        return t._local_tensor if isinstance(t, DTensor) else t

    out = {}
    for fsdp in (False, True):
        cfg = resolve_config(load_config(None, [
            "model.num_channels=64", "model.image_size=[32,32]", "model.patch_size=4", "model.hidden_size=64",
            "model.num_attention_heads=4", "model.channel_groups=2", "model.num_layers=2",
            "model.channel_embedding=index", "training.micro_batch_size=2", "training.lr=1e-3",
            f"training.bf16={str(bf16).lower()}", f"parallel.use_torch_fsdp2={str(fsdp).lower()}",
        ], world_size=dist.get_world_size(), workload_sections=()))
        task = SyntheticEncoderTask(cfg)
        built = build_training_components(cfg, task)
        model = built.models[0]
        lo, hi = unwrap_model(model).input_channel_range
        gen = torch.Generator().manual_seed(7 + dist.get_rank())
        images = torch.randn(2, 64, 32, 32, generator=gen)[:, lo:hi]
        images = images.bfloat16() if bf16 else images
        model.zero_grad_buffer()
        built.optimizer.zero_grad()
        records = built.forward_backward(forward_step_func=task.forward_step, data_iterator=iter([images]),
                                         model=model, num_microbatches=1, seq_length=1, micro_batch_size=2,
                                         forward_only=False)
        built.optimizer.step()
        storages = {}  # by storage: DDP's gradient buffer and views of it count once

        def count(t):
            if t is not None and isinstance(t, torch.Tensor):
                t = local(t)
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        params = [p for p in model.parameters()]
        for p in params:
            count(p)
        param_bytes = sum(storages.values())
        for p in params:
            count(getattr(p, "main_grad", None))
            count(p.grad)
        for opt in getattr(built.optimizer, "chained_optimizers", [built.optimizer]):
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    count(p)  # fp32 main parameters under bf16
            for state in opt.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        count(v)
        loss = torch.tensor([float(records[0]["loss"])])
        dist.all_reduce(loss)
        out["fsdp" if fsdp else "ddp"] = dict(total=sum(storages.values()), params=param_bytes,
                                              loss=loss.item() / dist.get_world_size())
    return out


@pytest.mark.parametrize("bf16", [False, True])
def test_fsdp2_holds_at_most_55_percent_of_dp2_state(bf16):
    """Parameters, gradients and Adam state are split in two except the few vectors of the root
    unit; measured on both ranks (the larger counts), from the tensors' storages."""
    results = run_distributed(_state_bytes, 2, bf16)
    ratio = max(r["fsdp"]["total"] / r["ddp"]["total"] for r in results)
    assert ratio <= 0.55, (ratio, results)
    assert all(r["fsdp"]["params"] < r["ddp"]["params"] for r in results)
    # the same first step: fp32 to FLOAT32_REL; bf16 FSDP reduces gradients in bf16, but the first
    # loss comes before any update
    assert _close(results[0]["fsdp"]["loss"], results[0]["ddp"]["loss"]), results[0]


# ---------------------------------------------------------------------------------------------
# Memory model: the FSDP terms against MemTracker peaks
# ---------------------------------------------------------------------------------------------

REPO_BENCH = REPO / "docs" / "bench"


def test_memory_model_matches_measured_fsdp_peaks_within_15_percent():
    """The per-rank peaks ``tools/benchmark.py`` measured (MemTracker, byte-exact) at the FSDP
    layouts of docs/bench/fsdp_*.json against the memory model's FSDP terms: at least 6 layouts
    (TP x FSDP x strategy x precision), every one within 15%."""
    from megatron_dchag.cli.estimate_memory import check_against

    files = sorted(str(p) for p in REPO_BENCH.glob("fsdp_*.json"))
    rows = [r for r in check_against(files, 0.15) if r["fsdp"] > 1]
    assert len(rows) >= 6, rows
    errors = {f"{r['file']}: {r['label']} TP{r['tp']}": r["error"] for r in rows}
    assert all(abs(e) <= 0.15 for e in errors.values()), {k: f"{e:+.1%}" for k, e in errors.items()}


def test_fsdp_table_names_a_larger_model_than_the_papers_26b_at_512_channels(tmp_path):
    """``tools/estimate_memory.py --fsdp-table`` (paper-scale assumptions): D-CHAG + FSDP fits a
    model above 26B at 512 channels on one 64 GiB GCD, and more than TP + FSDP at every channel count."""
    from megatron_dchag.cli.estimate_memory import GIB, fsdp_table, largest_fitting_model

    assert fsdp_table(64.0, str(tmp_path / "table.md")) == 0
    for channels in (256, 512, 1024):
        dchag, _ = largest_fitting_model("dchag", channels, 64 * GIB)
        baseline, _ = largest_fitting_model("tp_baseline", channels, 64 * GIB)
        assert dchag > max(baseline, 26.0 if channels == 512 else 0.0), (channels, dchag, baseline)


def test_benchmark_layouts_run_tp_times_fsdp_ranks_with_fsdp_configs():
    """``tools/benchmark.py --layouts 4x1 2x2 1x4``: one case per layout and strategy, each on
    TP x FSDP ranks, FSDP in the run's config exactly where the degree is above 1."""
    from megatron_dchag.cli import benchmark

    args = benchmark.build_parser().parse_args(
        ["--layouts", "4x1", "2x2", "1x4", "--channels", "64", "--strategies", "tp_baseline", "dchag"])
    cases = benchmark.enumerate_cases(args)
    assert [(c.tp, c.fsdp, c.strategy) for c in cases] == [
        (tp, f, s) for tp, f in ((4, 1), (2, 2), (1, 4)) for s in ("tp_baseline", "dchag")]
    assert {c.world_size for c in cases} == {4}
    for c in cases:
        cfg = benchmark.experiment_config_for(args, c)
        assert cfg.parallel.use_torch_fsdp2 == (c.fsdp > 1) and c.label.endswith("-fsdp4") == (c.fsdp == 4)
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args(["--layouts", "2by2"])
