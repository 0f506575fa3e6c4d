"""Per-rank memory estimate of D-CHAG training (the model is :mod:`megatron_dchag.memory_model`).

Modes:

* one configuration (default): prints the breakdown (parameters, gradients, optimizer state,
  inputs, activations by part) and whether it fits the device (default 64 GiB, one MI250X GCD)::

      python tools/estimate_memory.py --model 26B --channels 512 --strategy dchag
      python tools/estimate_memory.py --hidden-size 4096 --num-layers 32 --num-heads 32 \\
          --image-size 192 384 --patch-size 6 --channels 512 --strategy tp_baseline --tp 16 --bf16 \\
          --framework megatron --dp 8 --distributed-optimizer --recompute full

* ``--paper-table``: 7B/15B/26B x 256/512/1024 channels, pure TP vs D-CHAG, and the paper's two
  statements about 26B checked, plus a sweep of the assumptions under which they hold;
* ``--check-against bench.json``: model vs the MemTracker peaks measured by ``tools/benchmark.py``;
* ``--fsdp-table``: model sharding (torch FSDP2) under TP: the paper's hyperspectral 7B layouts
  (TP8 + FSDP2 baseline vs TP2 + FSDP4 D-CHAG-L, 500 channels) under a sweep of assumptions, and
  the largest model that fits one device with D-CHAG + FSDP vs TP + FSDP at 256/512/1024 channels.

Installed as the console script ``dchag-estimate-memory`` with the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from megatron_dchag.memory_model import (
    GB,
    GIB,
    PAPER_MODELS,
    MemoryConfig,
    estimate_memory,
    paper_config,
)


def parse_tree(text: str) -> List[int]:
    t = text.strip().strip("[]()").replace("x", ",").replace(" ", "")
    return [int(v) for v in t.split(",") if v] if t else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PAPER_MODELS), default=None,
                   help="paper-scale preset (its assumptions: see megatron_dchag.memory_model.paper_config); "
                        "flags given explicitly override it")
    g = p.add_argument_group("model")
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--num-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"))
    g.add_argument("--patch-size", type=int)
    g.add_argument("--channels", type=int)
    g.add_argument("--strategy", choices=["dchag", "tp_baseline", "dist_tokenize", "hierarchical"])
    g.add_argument("--layer", choices=["linear", "cross_attention"])
    g.add_argument("--tree", type=parse_tree)
    g.add_argument("--channel-groups", type=int)
    g.add_argument("--with-head", action="store_true", default=None)
    g.add_argument("--mask-ratio", type=float, default=None, help="MAE: fraction of patches not tokenized")
    g.add_argument("--final-aggregation", choices=["folded", "textbook"])
    g = p.add_argument_group("parallelism and training")
    g.add_argument("--tp", type=int)
    g.add_argument("--dp", type=int)
    g.add_argument("--distributed-optimizer", action="store_true", default=None)
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="shard parameters, gradients and optimizer state over the --dp ranks with torch FSDP2 "
                        "(parallel.use_torch_fsdp2; framework megatron, no distributed optimizer)")
    g.add_argument("--no-reshard-after-forward", action="store_true", default=None,
                   help="with --fsdp: keep every unit gathered from its forward to its backward")
    g.add_argument("--bf16", action="store_true", default=None)
    g.add_argument("--fp32", action="store_true", default=None)
    g.add_argument("--framework", choices=["torch", "megatron"])
    g.add_argument("--recompute", choices=["none", "selective", "full"])
    g.add_argument("--recompute-channel-stage", action="store_true", default=None)
    g.add_argument("--micro-batch-size", type=int)
    g = p.add_argument_group("output")
    g.add_argument("--device-memory-gib", type=float, default=64.0, help="device memory (default 64 GiB, MI250X GCD)")
    g.add_argument("--json", dest="json_path", default=None)
    g.add_argument("--paper-table", action="store_true")
    g.add_argument("--fsdp-table", action="store_true", help="FSDP: the paper's 7B layouts and the largest model")
    g.add_argument("--markdown", default=None, help="with --paper-table / --check-against: write the tables here")
    g.add_argument("--check-against", default=None, metavar="BENCH_JSON")
    g.add_argument("--tolerance", type=float, default=0.15)
    return p


def config_from_args(args) -> MemoryConfig:
    if args.model:
        cfg = paper_config(args.model, args.channels or 512, args.strategy or "dchag")
    else:
        cfg = MemoryConfig()
    mapping = dict(hidden_size="hidden_size", num_layers="num_layers", num_heads="num_attention_heads",
                   ffn_hidden_size="ffn_hidden_size", patch_size="patch_size", channels="num_channels",
                   strategy="strategy", layer="aggregation_layer", tree="aggregation_tree",
                   channel_groups="channel_groups", with_head="with_head", final_aggregation="final_aggregation",
                   tp="tensor_model_parallel_size", dp="data_parallel_size",
                   distributed_optimizer="distributed_optimizer", fsdp="fsdp", framework="framework",
                   recompute_channel_stage="recompute_channel_stage", micro_batch_size="micro_batch_size")
    updates = {}
    for arg, fieldname in mapping.items():
        v = getattr(args, arg)
        if v is not None:
            updates[fieldname] = v
    if args.image_size:
        updates["image_size"] = tuple(args.image_size)
    if args.bf16:
        updates["precision"] = "bf16"
    if args.fp32:
        updates["precision"] = "fp32"
    if args.recompute:
        updates["recompute"] = None if args.recompute == "none" else args.recompute
    if args.no_reshard_after_forward:
        updates["fsdp_reshard_after_forward"] = False
    if args.fsdp:  # FSDP takes the optimizer sharding over from the distributed optimizer
        updates.setdefault("distributed_optimizer", False)
        if args.distributed_optimizer:
            raise ValueError("--fsdp and --distributed-optimizer exclude each other (FSDP shards the optimizer state)")
    cfg = dataclasses.replace(cfg, **updates)
    if args.mask_ratio:
        cfg.visible_patches = max(1, round(cfg.num_patches * (1 - args.mask_ratio)))
    return cfg


def gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def describe(cfg: MemoryConfig) -> str:
    return (f"{cfg.strategy}"
            + (f" ({cfg.aggregation_layer}, tree {cfg.aggregation_tree})" if cfg.strategy in ("dchag", "hierarchical") else "")
            + f", D={cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_attention_heads} heads, image "
            f"{cfg.image_size[0]}x{cfg.image_size[1]}, patch {cfg.patch_size} ({cfg.seq} tokenized patches), "
            f"C={cfg.num_channels}, G={cfg.groups}, TP={cfg.tp}, DP={cfg.data_parallel_size}"
            f"{' (distributed optimizer)' if cfg.distributed_optimizer else ''}"
            f"{(' (FSDP' + ('' if cfg.fsdp_reshard_after_forward else ', no reshard after forward') + ')') if cfg.fsdp else ''}"
            f", {cfg.precision}, {cfg.framework}, "
            f"recompute={cfg.recompute or 'none'}{' + channel stage' if cfg.recompute_channel_stage else ''}, "
            f"micro-batch {cfg.micro_batch_size}")


def print_estimate(cfg: MemoryConfig, device_gib: float) -> Dict[str, object]:
    est = estimate_memory(cfg)
    dev = device_gib * GIB
    print(describe(cfg))
    print(f"  parameters per rank: {est.params['total'] / 1e9:.3f} B "
          + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in est.params.items() if k != "total"))
    print(f"  parameters      {gib(est.parameters):>10} GiB")
    print(f"  gradients       {gib(est.gradients):>10} GiB   (held at the peak)")
    print(f"  optimizer state {gib(est.optimizer):>10} GiB")
    print(f"  inputs          {gib(est.inputs):>10} GiB")
    print(f"  activations     {gib(est.activations):>10} GiB   (at the peak, incl. temporaries)")
    for k, v in est.activation_parts.items():
        print(f"      {k:<26} {gib(v):>10} GiB")
    print(f"  peak total      {gib(est.total):>10} GiB   at {est.peak_phase} "
          f"({', '.join(f'{k} {gib(v)}' for k, v in est.phases.items())})")
    verdict = "fits" if est.fits(dev) else "does NOT fit"
    print(f"  device {device_gib:g} GiB: {verdict} ({est.total / dev:.0%} of memory)")
    return dict(est.as_dict(), fraction_of_device=est.total / dev, fits=est.fits(dev))


# ------------------------------------------------------------------------------------------------
# Paper table
# ------------------------------------------------------------------------------------------------


# Paper anchors: (model, channels, TP, pure TP GB, D-CHAG GB), the GB as printed in the paper.
PAPER_ANCHORS = [("7B", 512, 16, 61, 18), ("1.7B", 1024, 8, 62, 14)]


def paper_table(device_gib: float, markdown: Optional[str]) -> int:
    dev = device_gib * GIB
    lines = []
    base = paper_config("26B", 256, "tp_baseline")
    lines.append("Headline assumptions: " + describe(base).split(", ", 1)[1].replace("D=8192, 32 layers, 64 heads, ", "")
                 .replace("C=256, ", "") + f"; device {device_gib:g} GiB.")
    lines.append("")
    lines.append("| model | channels | pure TP GiB | pure TP, textbook agg. GiB | D-CHAG-L GiB | D-CHAG-C GiB | "
                 "pure TP fits | D-CHAG-L < 80% | D-CHAG-L / pure TP |")
    lines.append("|---|---:|---:|---:|---:|---:|---|---|---:|")
    for model in ("7B", "15B", "26B"):
        for c in (256, 512, 1024):
            tp = estimate_memory(paper_config(model, c, "tp_baseline")).total
            tpt = estimate_memory(paper_config(model, c, "tp_baseline", final_aggregation="textbook")).total
            dl = estimate_memory(paper_config(model, c, "dchag")).total
            dc = estimate_memory(paper_config(model, c, "dchag", aggregation_layer="cross_attention")).total
            lines.append(f"| {model} | {c} | {gib(tp)} | {gib(tpt)} | {gib(dl)} | {gib(dc)} | "
                         f"{'yes' if tp <= dev else 'no'} | {'yes' if dl < 0.8 * dev else 'no'} | {dl / tp:.0%} |")
    tp26 = estimate_memory(paper_config("26B", 256, "tp_baseline")).total
    dc26 = estimate_memory(paper_config("26B", 512, "dchag")).total
    s1, s2 = tp26 > dev, dc26 < 0.8 * dev
    lines += ["", f"Statement 1 (pure TP cannot hold 26B with 256 channels on {device_gib:g} GiB): "
              f"{gib(tp26)} GiB = {tp26 / dev:.0%} -> {'HOLDS' if s1 else 'does not hold'}",
              f"Statement 2 (D-CHAG holds 26B with 512 channels under 80%): {gib(dc26)} GiB = "
              f"{dc26 / dev:.0%} -> {'HOLDS' if s2 else 'does not hold'}", ""]
    lines.append("Paper anchors (pure TP, no optimizer sharding, no recompute, micro-batch 4; other assumptions as "
                 "above):")
    lines.append("")
    lines.append("| case | pure TP model GiB | D-CHAG-L model GiB | ratio | paper (GB) | paper ratio |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for model, c, t, p_tp, p_d in PAPER_ANCHORS:
        over = dict(tensor_model_parallel_size=t, data_parallel_size=1, distributed_optimizer=False, recompute=None)
        a = estimate_memory(paper_config(model, c, "tp_baseline", **over)).total
        b = estimate_memory(paper_config(model, c, "dchag", **over)).total
        lines.append(f"| {model}, {c} channels, TP {t} | {gib(a)} | {gib(b)} | {b / a:.0%} | {p_tp} vs {p_d} | "
                     f"{p_d / p_tp:.0%} |")
    lines += ["", "Sensitivity (26B; pure TP with 256 channels vs D-CHAG-L with 512 channels; 'both' = both "
              "statements hold):", ""]
    lines.append("| TP | DP (dist. opt.) | micro-batch | recompute | pure TP 256 GiB | D-CHAG-L 512 GiB | both |")
    lines.append("|---:|---:|---:|---|---:|---:|---|")
    for tp, dp, mb, rc in itertools.product((8, 16, 32), (1, 16), (1, 2, 4), (None, "full")):
        over = dict(tensor_model_parallel_size=tp, data_parallel_size=dp, distributed_optimizer=dp > 1,
                    micro_batch_size=mb, recompute=rc)
        a = estimate_memory(paper_config("26B", 256, "tp_baseline", **over)).total
        b = estimate_memory(paper_config("26B", 512, "dchag", **over)).total
        both = a > dev and b < 0.8 * dev
        lines.append(f"| {tp} | {dp} | {mb} | {rc or 'none'} | {gib(a)} | {gib(b)} | {'yes' if both else 'no'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        _atomic_write(markdown, text)
    return 0 if (s1 and s2) else 1


# ------------------------------------------------------------------------------------------------
# Model sharding (FSDP) at paper scale
# ------------------------------------------------------------------------------------------------

# The paper's hyperspectral 7B runs with FSDP (500 channels, 192x384, patch 6), per 64 GB GCD:
# (strategy, TP, FSDP, paper GB).
PAPER_FSDP_LAYOUTS = [("tp_baseline", 8, 2, 62.7), ("dchag", 2, 4, 48.2)]
# Largest-model search: 32 layers, 128-wide heads, hidden sizes in steps of 1024, TP within one
# node (<= 8) and FSDP over the rest of FSDP_WORLD GCDs.
FSDP_WORLD = 64
FSDP_HIDDEN_SIZES = range(2048, 32769, 1024)


def _fsdp_paper_config(strategy: str, channels: int, tp: int, fsdp: int, **overrides) -> MemoryConfig:
    return paper_config("7B", channels, strategy, **dict(dict(
        tensor_model_parallel_size=tp, data_parallel_size=fsdp, distributed_optimizer=False, fsdp=True), **overrides))


def _billions(cfg: MemoryConfig) -> float:
    """Parameters of the whole model (TP 1), in billions."""
    from megatron_dchag.memory_model import param_counts

    return param_counts(dataclasses.replace(cfg, tensor_model_parallel_size=1, channel_groups=cfg.groups))["total"] / 1e9


def largest_fitting_model(strategy: str, channels: int, device_bytes: float, fsdp_sharding: bool = True):
    """``(billions, config)`` of the largest model of the search that fits ``device_bytes`` at its
    best layout, or ``(0, None)``."""
    best = (0.0, None)
    for d in FSDP_HIDDEN_SIZES:
        fitted = None
        for tp in (1, 2, 4, 8):
            fsdp = FSDP_WORLD // tp
            cfg = paper_config("7B", channels, strategy, hidden_size=d, num_layers=32, num_attention_heads=d // 128,
                               tensor_model_parallel_size=tp, data_parallel_size=fsdp,
                               distributed_optimizer=not fsdp_sharding, fsdp=fsdp_sharding, channel_groups=8)
            try:
                est = estimate_memory(cfg)
            except ValueError:
                continue
            if est.total <= device_bytes and (fitted is None or est.total < fitted[1].total):
                fitted = (cfg, est)
        if fitted is not None:
            best = (_billions(fitted[0]), fitted)
    return best


def fsdp_table(device_gib: float, markdown: Optional[str]) -> int:
    dev = device_gib * GIB
    lines = ["The paper's hyperspectral 7B layouts with FSDP (500 channels, 192x384 crops, patch 6, bf16 with fp32 "
             "master weights and fp32 main gradients on the optimizer side, G = 8 for D-CHAG-L; Tree0): per-rank "
             "peak in GB (10^9 bytes, as the paper reports) under each set of assumptions.", "",
             "| micro-batch | recompute | reshard after forward | channel stage | TP8 + FSDP2 baseline GB | "
             "TP2 + FSDP4 D-CHAG-L GB | ratio |", "|---:|---|---|---|---:|---:|---:|"]
    (s_base, t_base, f_base, p_base), (s_d, t_d, f_d, p_d) = PAPER_FSDP_LAYOUTS
    for mb, rc, reshard, impl in itertools.product((2, 3, 4), (None, "full"), (True, False), ("fused", "reference")):
        over = dict(micro_batch_size=mb, recompute=rc, fsdp_reshard_after_forward=reshard, channel_groups=8)
        a = estimate_memory(_fsdp_paper_config(s_base, 500, t_base, f_base, **over)).total
        b = estimate_memory(_fsdp_paper_config(s_d, 500, t_d, f_d, channel_stage_impl=impl, **over)).total
        lines.append(f"| {mb} | {rc or 'none'} | {'yes' if reshard else 'no'} | {impl} | {a / GB:.1f} | {b / GB:.1f} | "
                     f"{b / a:.0%} |")
    lines += ["", f"Paper: {p_base} GB vs {p_d} GB ({p_d / p_base:.0%}).", "",
              f"Largest model that fits one {device_gib:g} GiB device: {FSDP_WORLD} GCDs, TP <= 8 (one node) and "
              f"FSDP = {FSDP_WORLD}/TP, the best TP per model; 32 layers, heads of 128, hidden sizes in steps of "
              "1024; micro-batch 4, full recompute, bf16, reshard after forward, G = 8, D-CHAG-L Tree0 with "
              "this code's fused channel stage. Columns: billions of parameters (hidden size, TP).", "",
              "| channels | TP + FSDP | D-CHAG + FSDP | TP + distributed optimizer (no FSDP) | "
              "D-CHAG + distributed optimizer (no FSDP) |", "|---:|---|---|---|---|"]
    best_dchag = {}
    for c in (256, 512, 1024):
        cells = []
        for strategy, sharded in (("tp_baseline", True), ("dchag", True), ("tp_baseline", False), ("dchag", False)):
            size, fitted = largest_fitting_model(strategy, c, dev, fsdp_sharding=sharded)
            if strategy == "dchag" and sharded:
                best_dchag[c] = size
            cells.append("none" if fitted is None else
                         f"{size:.1f}B (D={fitted[0].hidden_size}, TP{fitted[0].tp}, {fitted[1].total / GIB:.1f} GiB)")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    ok = best_dchag.get(512, 0.0) > 26.0
    lines += ["", f"D-CHAG + FSDP at 512 channels: {best_dchag.get(512, 0.0):.1f}B "
              f"({'larger than' if ok else 'not larger than'} the paper's 26B).", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if markdown:
        _atomic_write(markdown, text)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# Check against the benchmark
# ------------------------------------------------------------------------------------------------


def config_from_record(doc_cfg: Dict[str, object], rec: Dict[str, object]) -> MemoryConfig:
    """The configuration of one benchmark record. Records without ``framework`` (schema 1) were
    measured with torch's AdamW, and without ``channel_stage_impl`` on the reference channel stage."""
    return MemoryConfig(
        hidden_size=doc_cfg["hidden_size"], num_layers=doc_cfg["num_layers"], num_attention_heads=doc_cfg["num_heads"],
        ffn_hidden_size=doc_cfg.get("ffn_hidden_size"), image_size=tuple(doc_cfg["image_size"]),
        patch_size=doc_cfg["patch_size"], num_channels=rec["channels"], strategy=rec["strategy"],
        aggregation_layer=rec.get("layer") or "linear", aggregation_tree=list(rec.get("tree") or []),
        channel_groups=rec.get("channel_groups"), with_head=bool(rec.get("with_head")),
        final_aggregation=rec.get("final_aggregation") or "folded", tensor_model_parallel_size=rec["tp"],
        micro_batch_size=rec["micro_batch_size"], precision="bf16" if rec.get("bf16") else "fp32",
        framework=rec.get("framework") or "torch", adam_impl=rec.get("adam_impl") or "fused",
        channel_stage_impl=rec.get("channel_stage_impl") or "reference",
        recompute_channel_stage=bool(rec.get("recompute_channel_stage")),
        data_parallel_size=rec.get("fsdp") or 1, fsdp=(rec.get("fsdp") or 1) > 1)


def check_against(paths: Sequence[str], tolerance: float) -> List[Dict[str, object]]:
    rows = []
    for path in paths:
        with open(path) as fh:
            doc = json.load(fh)
        for rec in doc.get("records", []):
            if rec.get("status") != "ok" or not rec.get("peak_mem_bytes"):
                continue
            est = estimate_memory(config_from_record(doc["config"], rec))
            measured = rec["peak_mem_bytes"]
            rows.append(dict(file=os.path.basename(path), label=rec["label"], tp=rec["tp"], fsdp=rec.get("fsdp") or 1,
                             channels=rec["channels"],
                             bf16=rec.get("bf16"), recompute=rec.get("recompute_channel_stage"),
                             with_head=rec.get("with_head"), final=rec.get("final_aggregation"),
                             measured=measured, model=est.total, error=(est.total - measured) / measured,
                             phase=est.peak_phase))
    return rows


def check_table(rows: List[Dict[str, object]], tolerance: float) -> str:
    lines = ["| file | case | TP | C | options | measured MiB | model MiB | error |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        opts = ",".join(o for o, on in (("bf16", r["bf16"]), ("recompute", r["recompute"]), ("head", r["with_head"]),
                                         ("textbook", r["final"] == "textbook")) if on) or "-"
        layout = f"{r['tp']} x FSDP{r['fsdp']}" if r.get("fsdp", 1) > 1 else str(r["tp"])
        lines.append(f"| {r['file']} | {r['label']} | {layout} | {r['channels']} | {opts} | {r['measured'] / 2**20:,.1f} | "
                     f"{r['model'] / 2**20:,.1f} | {r['error']:+.1%} |")
    within = sum(1 for r in rows if abs(r["error"]) <= tolerance)
    lines += ["", f"{within} of {len(rows)} cases within {tolerance:.0%}; largest |error| "
              f"{max((abs(r['error']) for r in rows), default=0):.1%}."]
    return "\n".join(lines) + "\n"


def _atomic_write(path: str, text: str) -> None:
    import tempfile

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_against:
        rows = check_against(args.check_against.split(","), args.tolerance)
        text = check_table(rows, args.tolerance)
        print(text)
        if args.markdown:
            _atomic_write(args.markdown, text)
        if args.json_path:
            _atomic_write(args.json_path, json.dumps(rows, indent=1) + "\n")
        return 0 if sum(1 for r in rows if abs(r["error"]) <= args.tolerance) >= min(5, len(rows)) else 1
    if args.paper_table:
        return paper_table(args.device_memory_gib, args.markdown)
    if args.fsdp_table:
        return fsdp_table(args.device_memory_gib, args.markdown)
    try:
        cfg = config_from_args(args)
        out = print_estimate(cfg, args.device_memory_gib)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json_path:
        _atomic_write(args.json_path, json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
