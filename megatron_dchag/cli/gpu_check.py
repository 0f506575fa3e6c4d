"""`make gpu-check`: prove the GPU path on a machine with GPUs and write a report.

Run on a node with one or more CUDA or ROCm GPUs (``make gpu-check``, ``python tools/gpu_check.py`` or
``dchag-gpu-check``). Without a GPU it stops at once with one ``error:`` line (exit status 2). Checks:

1. **environment**: torch / CUDA or HIP / megatron-core / Transformer Engine / apex versions, devices.
2. **channel stage on the GPU = CPU** for every strategy and both aggregation layers (the fused and
   reference paths of linear trees where they exist): the same weights and inputs, forward and every
   parameter's gradient within float32 tolerance (TF32 off), relative to the largest magnitude.
3. **encoder on the GPU = CPU** (channel stage, position embedding, transformer block), the same way.
4. **bf16 training of both workloads** (``pretrain_hyperspectral.py``, ``pretrain_era5.py`` on small
   synthetic data, one GPU): the loss falls over the run, and ``peak_mem_bytes`` in ``metrics.jsonl`` is
   the allocator's figure (positive, below the device memory).
5. **Transformer Engine layer spec** (``model.transformer_impl=transformer_engine``), when TE imports:
   a short training run whose loss falls.
6. **multi-rank on nccl/RCCL** for as many GPUs as there are (2 or more): the same run at TP=1 and at
   TP=N gives the same losses.
7. **benchmarks**: the tokenizer bench and the channel-stage benchmark on the GPU (JSON).

It writes ``<out>/gpu.md`` (the report) and ``<json-dir>/gpu_check.json`` plus the benchmarks' raw JSON,
and exits 0 when no check failed (skipped checks say why). ``--allow-cpu`` runs the same checks on the
CPU with small sizes: it tests the kit itself and is what the test suite runs; its report is not a GPU
report and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from megatron_dchag.cli.checkout import CHECKOUT_ROOT, require_checkout, script_environment
from megatron_dchag.launch_env import find_free_port

# GPU and CPU kernels (cuBLAS/rocBLAS vs MKL/oneDNN, atomics in backward reductions) round differently;
# 1e-4 of the largest magnitude is ~840 float32 eps: far below any real defect (a wrong channel, shard or
# weight layout changes the result by a large fraction of it).
GPU_VS_CPU_REL = 1e-4
# Losses of one run at TP=1 and TP=N on GPUs: partial sums in another order over a few steps.
TP_LOSS_REL = 1e-3

STRATEGY_CASES = [
    dict(strategy="dchag", aggregation_layer="linear", aggregation_tree=[]),
    dict(strategy="dchag", aggregation_layer="linear", aggregation_tree=[4]),
    dict(strategy="dchag", aggregation_layer="cross_attention", aggregation_tree=[4]),
    dict(strategy="hierarchical", aggregation_layer="linear", aggregation_tree=[4]),
    dict(strategy="dist_tokenize"),
    dict(strategy="tp_baseline"),
]


# What a launcher sets; the kit's own runs start with none of it (each run is its own job).
_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


class CheckResult(dict):
    """One check: ``name``, ``status`` (pass | fail | skip), ``detail`` (a line), ``seconds``, data."""


def _run_check(name: str, fn: Callable[[], Dict[str, Any]]) -> CheckResult:
    start = time.time()
    try:
        out = fn() or {}
        status = out.pop("status", "pass")
        detail = out.pop("detail", "")
        result = CheckResult(name=name, status=status, detail=detail, data=out)
    except Exception as exc:  # a failing check is reported, the others still run
        result = CheckResult(name=name, status="fail", detail=f"{type(exc).__name__}: {exc}",
                             data={"traceback": traceback.format_exc()})
    result["seconds"] = round(time.time() - start, 1)
    mark = {"pass": "ok  ", "fail": "FAIL", "skip": "skip"}[result["status"]]
    print(f"[{mark}] {name}: {result['detail']} ({result['seconds']} s)", flush=True)
    return result


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def environment(device) -> Dict[str, Any]:
    import torch

    info: Dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "device": str(device),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 0,
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["device_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    try:
        from megatron.core import package_info

        info["megatron_core"] = package_info.__version__
    except ImportError:
        info["megatron_core"] = None
    for module in ("transformer_engine", "apex"):
        try:
            mod = __import__(module)
            info[module] = getattr(mod, "__version__", "present")
        except Exception:  # not installed, or fails to import on this machine
            info[module] = None
    return info


# ------------------------------------------------------------------------------------------------
# Single-process numerical checks (one rank, TP=1)
# ------------------------------------------------------------------------------------------------


def _max_rel_error(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale else diff


def _channel_stage_impls() -> List[Optional[str]]:
    """The channel-stage implementations this version offers (``model.channel_stage_impl``), if any."""
    import dataclasses

    from megatron_dchag.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ["fused", "reference"] if "channel_stage_impl" in names else [None]


def _model_cases(num_layers: int) -> List[Dict[str, Any]]:
    cases = []
    for base in STRATEGY_CASES:
        impls = _channel_stage_impls() if base.get("aggregation_layer") == "linear" else [None]
        for impl in impls:
            kw = dict(num_channels=24, image_size=(16, 16), patch_size=4, hidden_size=32, num_layers=num_layers,
                      num_attention_heads=4, channel_groups=2, **base)
            if impl is not None:
                kw["channel_stage_impl"] = impl
            cases.append(kw)
    return cases


def _case_label(kw: Dict[str, Any]) -> str:
    label = kw["strategy"]
    if "aggregation_layer" in kw:
        label += f"-{'L' if kw['aggregation_layer'] == 'linear' else 'C'}{kw['aggregation_tree']}"
    if kw.get("channel_stage_impl"):
        label += f"-{kw['channel_stage_impl']}"
    return label


def compare_with_cpu(device, whole_encoder: bool) -> Dict[str, Any]:
    """Build each case on the CPU, copy it to ``device``, run forward + backward on both, compare."""
    import torch

    from megatron_dchag.config import ModelConfig
    from megatron_dchag.models.encoder import build_encoder

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    worst: Dict[str, float] = {}
    for kw in _model_cases(num_layers=2 if whole_encoder else 1):
        torch.manual_seed(0)
        model = build_encoder(ModelConfig(**kw), seed=3)
        with torch.no_grad():  # non-trivial biases and embeddings, so every term is tested
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        other = build_encoder(ModelConfig(**kw), seed=3).to(device)
        other.load_state_dict(model.state_dict())
        images = torch.randn(2, kw["num_channels"], *kw["image_size"])
        runs = []
        for net, x in ((model, images), (other, images.to(device))):
            net.train()
            net.zero_grad(set_to_none=True)
            if whole_encoder:
                out = net(x)
            else:
                out = net.channel_stage(x)
            weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
            (out * weights).sum().backward()
            grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
            runs.append((out, grads))
        (out_cpu, g_cpu), (out_dev, g_dev) = runs
        errors = {"output": _max_rel_error(out_dev, out_cpu)}
        missing = sorted(set(g_cpu) ^ set(g_dev))
        if missing:
            raise AssertionError(f"{_case_label(kw)}: gradients present on one device only: {missing[:4]}")
        for name, g in g_cpu.items():
            errors[name] = _max_rel_error(g_dev[name], g)
        name, err = max(errors.items(), key=lambda kv: kv[1])
        worst[_case_label(kw)] = err
        if err > GPU_VS_CPU_REL:
            raise AssertionError(f"{_case_label(kw)}: {name} differs by {err:.2e} of its largest magnitude "
                                 f"(> {GPU_VS_CPU_REL:g})")
    largest = max(worst.values())
    return {"detail": f"{len(worst)} cases, largest relative error {largest:.1e} (limit {GPU_VS_CPU_REL:g})",
            "max_relative_error": worst}


def _in_process_group(fn: Callable[[], Dict[str, Any]], device) -> Callable[[], Dict[str, Any]]:
    """Run ``fn`` as the single rank of a TP=1 megatron process group (nccl on GPUs, gloo on CPU)."""

    def wrapped() -> Dict[str, Any]:
        from megatron_dchag.distributed import destroy_distributed, initialize_distributed

        saved = dict(os.environ)
        for var in _LAUNCH_VARIABLES:
            os.environ.pop(var, None)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()))
        initialize_distributed(1, 1, seed=1234)
        try:
            return fn()
        finally:
            destroy_distributed()
            os.environ.clear()
            os.environ.update(saved)

    return wrapped


# ------------------------------------------------------------------------------------------------
# Training runs (subprocesses of the entry points)
# ------------------------------------------------------------------------------------------------


class Workspace:
    """Small synthetic data sets, made once per kit run."""

    def __init__(self, root: Path, quick: bool):
        self.root, self.quick = root, quick
        self._cubes: Optional[Dict[str, str]] = None
        self._era5: Optional[Dict[str, str]] = None

    def _tool(self, *args) -> None:
        subprocess.run([sys.executable, *[str(a) for a in args]], cwd=CHECKOUT_ROOT, check=True,
                       env=script_environment(), capture_output=True, text=True)

    def cubes(self) -> Dict[str, str]:
        if self._cubes is None:
            cubes, stats = self.root / "cubes", self.root / "cube_stats.json"
            self._tool("tools/make_synthetic_hyperspectral.py", "--out", cubes, "--num-cubes", 12, "--channels", 64,
                       "--height", 32, "--width", 32, "--feature-size", 8)
            self._tool("tools/compute_stats.py", "--data-path", cubes, "--out", stats, "--quiet")
            self._cubes = dict(data=str(cubes), stats=str(stats))
        return self._cubes

    def era5(self) -> Dict[str, str]:
        if self._era5 is None:
            store, stats = self.root / "era5.zarr", self.root / "era5_stats.npz"
            self._tool("tools/make_synthetic_era5.py", "--out", store, "--days", 20 if self.quick else 60)
            self._tool("tools/compute_era5_stats.py", "--data-path", store, "--out", stats)
            self._era5 = dict(data=str(store), stats=str(stats))
        return self._era5


def _train(script: str, args: Sequence[str], log_dir: Path, nproc: int = 1, timeout: int = 3600) -> List[Dict[str, Any]]:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={find_free_port()}", script]
    else:
        cmd = [sys.executable, script]
    cmd += [str(a) for a in args] + ["--log-dir", str(log_dir)]
    env = script_environment()
    for var in _LAUNCH_VARIABLES:
        env.pop(var, None)
    res = subprocess.run(cmd, cwd=CHECKOUT_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{script} exited {res.returncode}: {' | '.join(tail)}")
    path = log_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _falling(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    train = [r for r in records if r["kind"] == "train"]
    if len(train) < 2:
        raise AssertionError(f"only {len(train)} train records logged")
    # Mean of the first and last thirds of the logged windows: single windows are noisy.
    third = max(1, len(train) // 3)
    first = sum(r["loss"] for r in train[:third]) / third
    last = sum(r["loss"] for r in train[-third:]) / third
    if not last < first:
        raise AssertionError(f"loss did not fall: {first:.4f} (first {third} windows, from step {train[0]['step']}) -> "
                             f"{last:.4f} (last {third}, to step {train[-1]['step']})")
    peaks = [r.get("peak_mem_bytes") for r in train if r.get("peak_mem_bytes")]
    return dict(first_loss=first, last_loss=last, first_step=train[0]["step"], last_step=train[-1]["step"],
                peak_mem_bytes=max(peaks) if peaks else None)


def _check_peak(result: Dict[str, Any], device) -> None:
    import torch

    peak = result.get("peak_mem_bytes")
    if not peak or peak <= 0:
        raise AssertionError("metrics.jsonl has no positive peak_mem_bytes")
    if device.type == "cuda" and peak >= torch.cuda.get_device_properties(0).total_memory:
        raise AssertionError(f"peak_mem_bytes={peak} is not an allocator figure (>= device memory)")


def bf16_training(workload: str, ws: Workspace, steps: int, device, extra: Sequence[str] = ()) -> Dict[str, Any]:
    log_dir = ws.root / f"run_{workload}_{'_'.join(extra) or 'local'}".replace("=", "-").replace(".", "-")
    # Warm-up over the first tenth of the run (the tiny configs' 20 steps would be most of a
    # 30-step self-test, leaving the loss no room to fall).
    common = ["--tensor-model-parallel-size", 1, "--train-iters", steps, "--log-interval", max(1, steps // 10),
              "--eval-iters", 0, "--bf16", f"training.lr_warmup_iters={max(1, steps // 10)}", *extra]
    if workload == "hyperspectral":
        d = ws.cubes()
        records = _train("pretrain_hyperspectral.py", ["--config", "configs/hyperspectral/tiny.yaml", "--data-path",
                                                        d["data"], f"data.stats_file={d['stats']}", *common], log_dir)
    else:
        d = ws.era5()
        records = _train("pretrain_era5.py", ["--config", "configs/era5/tiny.yaml", "--data-path", d["data"],
                                              f"data.stats_file={d['stats']}", "model.num_layers=2",
                                              # one lead: its loss falls steadily (mixed leads are noisier)
                                              "forecast.max_lead_hours=6", "forecast.eval_lead_hours=[6]",
                                              *common], log_dir)
    result = _falling(records)
    _check_peak(result, device)
    result["detail"] = (f"loss {result['first_loss']:.4f} (step {result['first_step']}) -> {result['last_loss']:.4f} "
                        f"(step {result['last_step']}), peak {result['peak_mem_bytes'] / 2**20:.0f} MiB")
    return result


def transformer_engine_training(ws: Workspace, steps: int, device) -> Dict[str, Any]:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:
        return {"status": "skip", "detail": f"transformer_engine does not import ({type(exc).__name__})"}
    return bf16_training("hyperspectral", ws, steps, device, extra=["model.transformer_impl=transformer_engine"])


def multi_rank(ws: Workspace, steps: int, device) -> Dict[str, Any]:
    import torch

    # The CPU self-test runs the same comparison on 2 gloo ranks.
    count = torch.cuda.device_count() if device.type == "cuda" else 2
    if count < 2:
        return {"status": "skip", "detail": f"needs 2 or more GPUs, found {count}"}
    tp = 1
    while tp * 2 <= min(count, 4):  # the tiny config has 4 channel groups and 4 heads
        tp *= 2
    d = ws.cubes()
    args = ["--config", "configs/hyperspectral/tiny.yaml", "--data-path", d["data"], f"data.stats_file={d['stats']}",
            "--train-iters", steps, "--log-interval", 1, "--eval-iters", 0]
    one = _train("pretrain_hyperspectral.py", [*args, "--tensor-model-parallel-size", 1], ws.root / "tp1")
    many = _train("pretrain_hyperspectral.py", [*args, "--tensor-model-parallel-size", tp], ws.root / f"tp{tp}", nproc=tp)
    a = {r["step"]: r["loss"] for r in one if r["kind"] == "train"}
    b = {r["step"]: r["loss"] for r in many if r["kind"] == "train"}
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in a)
    if worst > TP_LOSS_REL:
        raise AssertionError(f"TP={tp} losses differ from TP=1 by {worst:.2e} relative (> {TP_LOSS_REL:g})")
    where = f"{tp} GPUs" if device.type == "cuda" else f"{tp} CPU ranks"
    return {"detail": f"TP=1 vs TP={tp} on {where}: {len(a)} steps, largest relative loss difference {worst:.1e}",
            "tp": tp, "max_relative_difference": worst}


def benchmarks(ws: Workspace, json_dir: Path, quick: bool) -> Dict[str, Any]:
    outputs = {}
    runs = {
        "tokenizer": ["--tokenizer-bench", "--channels", "100" if quick else "500", "--tokenizer-repeats", 3 if quick else 7],
        "channel_stage": ["--tp", 1, "--channels", *(["32"] if quick else ["256", "512", "1024"]),
                          "--strategies", "tp_baseline", "dchag", "--layers", "linear",
                          "--steps", 2 if quick else 10],
    }
    for name, args in runs.items():
        path = json_dir / f"gpu_bench_{name}.json"
        res = subprocess.run([sys.executable, "tools/benchmark.py", *[str(a) for a in args], "--json", str(path)],
                             cwd=CHECKOUT_ROOT, env=script_environment(), capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"benchmark {name} exited {res.returncode}: {' | '.join(tail)}")
        outputs[name] = str(path)
    return {"detail": ", ".join(f"{k}: {Path(v).name}" for k, v in outputs.items()), "files": outputs}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def write_report(path: Path, env: Dict[str, Any], results: List[CheckResult], on_gpu: bool, command: str) -> None:
    lines = ["# GPU check", ""]
    if not on_gpu:
        lines += ["**This is a CPU self-test of the kit (`--allow-cpu`), not a GPU report.**", ""]
    lines += [f"Produced by `{command}` on {env.get('host')} at {env.get('date')}.", "",
              "| | |", "|---|---|"]
    for key in ("devices", "device_count", "torch", "cuda", "hip", "megatron_core", "transformer_engine", "apex",
                "python"):
        lines.append(f"| {key} | {env.get(key)} |")
    lines += ["", "| check | result | detail | seconds |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r['detail'].replace('|', '/')} | {r['seconds']} |")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Without a GPU the kit refuses with one line (exit 2) unless --allow-cpu.")
    p.add_argument("--report", default="docs/gpu.md", help="markdown report (default docs/gpu.md)")
    p.add_argument("--json-dir", default="docs/bench", help="raw JSON outputs (default docs/bench)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each bf16 run (default 300)")
    p.add_argument("--quick", action="store_true", help="smaller data, fewer steps and benchmark cases")
    p.add_argument("--skip", nargs="*", default=[], metavar="CHECK",
                   help="checks to leave out: layers encoder bf16 te multi_rank benchmarks")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run on the CPU when no GPU is present (tests the kit; the report says so)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.allow_cpu:
        print("error: no GPU: torch.cuda.is_available() is False; run the GPU check on a node with CUDA or ROCm "
              "GPUs (--allow-cpu tests the kit itself on a CPU)", file=sys.stderr)
        return 2
    if not require_checkout("gpu_check"):
        return 2
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    report = Path(args.report) if os.path.isabs(args.report) else CHECKOUT_ROOT / args.report
    json_dir = Path(args.json_dir) if os.path.isabs(args.json_dir) else CHECKOUT_ROOT / args.json_dir
    json_dir.mkdir(parents=True, exist_ok=True)
    command = "python tools/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(device)
    print(f"GPU check on {env.get('devices') or 'the CPU (self-test)'}", flush=True)
    results: List[CheckResult] = [CheckResult(name="environment", status="pass", detail=str(env.get("device")),
                                              seconds=0.0, data=env)]
    with tempfile.TemporaryDirectory(prefix="dchag_gpu_check_") as tmp:
        ws = Workspace(Path(tmp), quick=args.quick)
        steps = args.steps
        checks = [
            ("layers", "channel stage: GPU = CPU", _in_process_group(lambda: compare_with_cpu(device, False), device)),
            ("encoder", "encoder: GPU = CPU", _in_process_group(lambda: compare_with_cpu(device, True), device)),
            ("bf16", "bf16 training, hyperspectral MAE", lambda: bf16_training("hyperspectral", ws, steps, device)),
            ("bf16", "bf16 training, ERA5 forecasting", lambda: bf16_training("era5", ws, steps, device)),
            ("te", "Transformer Engine layer spec", lambda: transformer_engine_training(ws, max(50, steps // 3), device)),
            ("multi_rank", "multi-rank TP on nccl", lambda: multi_rank(ws, 20, device)),
            ("benchmarks", "benchmarks", lambda: benchmarks(ws, json_dir, args.quick)),
        ]
        for key, name, fn in checks:
            if key in args.skip:
                results.append(CheckResult(name=name, status="skip", detail="--skip", seconds=0.0, data={}))
                continue
            results.append(_run_check(name, fn))
    raw = json_dir / "gpu_check.json"
    tmp_raw = raw.with_name(f".{raw.name}.tmp-{os.getpid()}")
    tmp_raw.write_text(json.dumps({"on_gpu": on_gpu, "command": command, "environment": env, "checks": results},
                                  indent=1, default=str))
    os.replace(tmp_raw, raw)
    write_report(report, env, results, on_gpu, command)
    failed = [r["name"] for r in results if r["status"] == "fail"]
    print(f"report: {report}; raw: {raw}" + (f"; FAILED: {', '.join(failed)}" if failed else "; no check failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
