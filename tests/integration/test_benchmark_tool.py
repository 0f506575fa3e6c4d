"""tools/benchmark.py and tools/estimate_memory.py end to end on a tiny case (2 gloo processes).

The benchmark trains through the shared builder (megatron DDP, megatron optimizer); the tests check
its JSON schema, that the memory split names DDP's gradient buffer, the markdown, the PNG, the
channel-stage implementations of a linear tree, and the memory model's check against its output.
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_dchag.cli.benchmark import SCHEMA_VERSION
from tests.limits import RUN_TIMEOUT_S, SHORT_TIMEOUT_S

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD_KEYS = {"strategy", "layer", "tree", "tp", "channels", "peak_mem_bytes", "step_time_s", "samples_per_s",
               "tflops", "mem_breakdown", "status", "reason", "label", "channel_groups", "step_times_s",
               "peak_mem_bytes_per_rank", "flops_per_step", "channel_stage_impl", "channel_stage", "framework"}
BREAKDOWN_KEYS = {"parameters", "gradients", "optimizer", "activations", "temp", "inputs"}
LABELS = ["tp_baseline", "dchag-L-tree[]-auto", "dchag-L-tree[]-reference", "dchag-L-tree[8]-auto",
          "dchag-L-tree[8]-reference", "dchag-C-tree[]", "dchag-C-tree[8]"]


def _run(args, timeout=RUN_TIMEOUT_S):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = {k: str(out / f"bench.{k}") for k in ("json", "md", "png")}
    res = _run(["tools/benchmark.py", "--tp", "2", "--channels", "16", "--image-size", "16", "32", "--patch-size", "4",
                "--hidden-size", "32", "--num-heads", "2", "--num-layers", "1", "--micro-batch-size", "2",
                "--strategies", "tp_baseline", "dchag", "--layers", "linear", "cross_attention",
                "--trees", "[]", "[8]", "--channel-stage-impl", "auto", "reference", "--steps", "2", "--warmup", "0",
                "--threads", "1", "--json", paths["json"], "--markdown", paths["md"], "--plot", paths["png"]])
    assert res.returncode == 0, res.stderr[-3000:]
    with open(paths["json"]) as fh:
        return json.load(fh), paths, res.stdout


def test_json_schema(bench):
    doc, _, _ = bench
    assert doc["kind"] == "benchmark" and doc["schema_version"] == SCHEMA_VERSION == 2
    assert doc["config"]["image_size"] == [16, 32] and doc["machine"]["backend"] in ("gloo", "nccl")
    assert doc["config"]["framework"] == "megatron" and doc["config"]["channel_stage_impls"] == ["auto", "reference"]
    assert doc["command"].startswith("python tools/benchmark.py --tp 2")
    records = doc["records"]
    assert [r["label"] for r in records] == LABELS
    for r in records:
        assert RECORD_KEYS <= set(r), set(RECORD_KEYS) - set(r)
        assert r["tp"] == 2 and r["channels"] == 16 and r["channel_groups"] == 2 and r["framework"] == "megatron"
        if "[8]" in r["label"]:
            # groups of 8 channels cannot be cut into chunks of 8: reported, not run
            assert r["status"] == "skipped" and "aggregation_tree" in r["reason"]
            assert r["peak_mem_bytes"] is None
            continue
        assert r["status"] == "ok", r.get("reason")
        assert set(r["mem_breakdown"]) == BREAKDOWN_KEYS
        assert len(r["peak_mem_bytes_per_rank"]) == 2 and r["peak_mem_bytes"] == max(r["peak_mem_bytes_per_rank"])
        assert sum(r["mem_breakdown"].values()) == r["peak_mem_bytes"]
        assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0
        assert r["samples_per_s"] == pytest.approx(2 / r["step_time_s"])
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / 2 / 1e12)
    by = {r["label"]: r for r in records}
    # each rank holds only its 8 channels in dchag, all 16 in tp_baseline
    assert by["dchag-C-tree[]"]["input_channels_per_rank"] == [[0, 8], [8, 16]]
    assert by["tp_baseline"]["input_channels_per_rank"] == [[0, 16], [0, 16]]
    assert by["dchag-C-tree[]"]["mem_breakdown"]["inputs"] * 2 == by["tp_baseline"]["mem_breakdown"]["inputs"]
    # the channel-stage implementation is set per case: auto fuses a linear tree, reference does not
    assert by["dchag-L-tree[]-auto"]["channel_stage"] == "fused"
    assert by["dchag-L-tree[]-reference"]["channel_stage"] == "reference"
    assert by["dchag-C-tree[]"]["channel_stage"] == "reference" and by["tp_baseline"]["channel_stage_impl"] == "auto"


def test_trains_with_the_megatron_optimizer_and_ddp_buffers(bench):
    doc, _, _ = bench
    for r in (r for r in doc["records"] if r["status"] == "ok"):
        assert r["optimizer_class"] == "torch.optim.adamw.AdamW" and r["adam_impl"] == "torch"  # megatron's CPU fallback
        bd = r["mem_breakdown"]
        # fp32: DDP's fp32 main_grad buffer holds a gradient of every parameter all step long; no main copies
        assert r["grad_buffer_bytes"] > 0 and bd["gradients"] >= r["grad_buffer_bytes"]
        assert r["main_param_bytes"] == 0
        # Adam's two moments of every parameter (the step counters are a few bytes)
        assert bd["optimizer"] >= 2 * r["grad_buffer_bytes"]


def test_markdown_and_plot(bench):
    _, paths, stdout = bench
    with open(paths["md"]) as fh:
        md = fh.read()
    assert "| TP | C | strategy | layer | tree | channel stage |" in md and "mem vs TP" in md
    rows = [line for line in md.splitlines() if line.startswith("| 2 | 16 |")]
    assert len(rows) == 4
    cells = [[c.strip() for c in row.split("|")] for row in rows]
    assert cells[0][3] == "tp_baseline" and cells[0][8] == "100.0%"  # tp_baseline against itself
    assert [c[6] for c in cells] == ["reference", "fused (auto)", "reference", "reference"]
    assert "Cases not run:" in md and "skipped" in md
    assert md.strip() in stdout or "| TP | C | strategy |" in stdout
    with open(paths["png"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(os.path.dirname(paths["md"])) if f.startswith(".tmp-")]  # atomic writes


def test_renders_from_json(bench, tmp_path):
    _, paths, _ = bench
    md = tmp_path / "again.md"
    res = _run(["tools/benchmark.py", "--from-json", paths["json"], "--markdown", str(md)], timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(paths["md"]) as fh:
        assert md.read_text() == fh.read()


def test_memory_model_checks_against_the_benchmark(bench):
    _, paths, _ = bench
    res = _run(["tools/estimate_memory.py", "--check-against", paths["json"]], timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 of 4 cases within 15%" in res.stdout, res.stdout


def test_tokenizer_bench_schema(tmp_path):
    out = tmp_path / "tok.json"
    res = _run(["tools/benchmark.py", "--tokenizer-bench", "--channels", "6", "--image-size", "16", "16",
                "--patch-size", "4", "--hidden-size", "16", "--tokenizer-repeats", "2", "--tokenizer-mask-ratio", "0.5",
                "--threads", "1", "--json", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["kind"] == "tokenizer_bench"
    (rec,) = doc["records"]
    assert rec["channels"] == 6 and rec["outputs_match"] is True and rec["visible_patches"] == 8
    for mode in ("forward", "forward_backward", "masked_forward_backward"):
        assert rec[mode]["grouped_s"] > 0 and rec[mode]["loop_s"] > 0
        assert len(rec[mode]["grouped_times_s"]) == 2
    bound = rec["matmul_bound"]
    assert bound["gflops"] > 0 and bound["max_speedup_forward_backward"] > 0


def test_channel_stage_bench(tmp_path):
    """--channel-stage-bench on a tiny stage: both paths measured, outputs agree, fused peak below
    the reference's with all patches; the markdown renders again from the JSON."""
    paths = {k: tmp_path / f"stage.{k}" for k in ("json", "md")}
    res = _run(["tools/benchmark.py", "--channel-stage-bench", "--channels", "16", "--trees", "[]", "[4]",
                "--visible-fractions", "1.0", "0.5", "--image-size", "16", "16", "--patch-size", "4",
                "--hidden-size", "32", "--num-heads", "2", "--steps", "1", "--warmup", "0", "--threads", "1",
                "--json", str(paths["json"]), "--markdown", str(paths["md"])], timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(paths["json"].read_text())
    assert doc["kind"] == "channel_stage_bench" and doc["schema_version"] == SCHEMA_VERSION
    assert doc["command"].startswith("python tools/benchmark.py --channel-stage-bench")
    assert doc["machine"]["load_average_start"] and doc["machine"]["load_average_end"]
    assert doc["config"]["tp"] == 1 and doc["config"]["channel_groups"] == 1 and doc["config"]["threads"] == 1
    records = doc["records"]
    assert [(r["tree"], r["visible_fraction"]) for r in records] == [([], 1.0), ([], 0.5), ([4], 1.0), ([4], 0.5)]
    for r in records:
        assert r["status"] == "ok" and r["outputs_match"] is True, r
        assert r["output_max_rel_diff"] < 1e-4 and r["grad_max_rel_diff"] < 1e-4
        assert r["output_shape"] == [r["visible_patches"], 2, 32]
        assert r["visible_patches"] == (16 if r["visible_fraction"] == 1.0 else 8)
        for path in ("fused", "reference"):
            assert r[path]["peak_mem_bytes"] > 0 and len(r[path]["step_times_s"]) == 1 and r[path]["step_time_s"] > 0
        assert r["peak_ratio"] == pytest.approx(r["fused"]["peak_mem_bytes"] / r["reference"]["peak_mem_bytes"])
        assert r["speedup"] == pytest.approx(r["reference"]["step_time_s"] / r["fused"]["step_time_s"])
        if r["visible_fraction"] == 1.0:
            # no [C, L, B, D] tokens nor their gradient on the fused path
            assert r["fused"]["peak_mem_bytes"] < r["reference"]["peak_mem_bytes"], r
    md = paths["md"].read_text()
    assert "| C | tree | input | fused peak MiB | reference peak MiB | fused / ref |" in md
    assert len([line for line in md.splitlines() if line.startswith("| 16 |")]) == 4
    again = tmp_path / "again.md"
    res = _run(["tools/benchmark.py", "--from-json", str(paths["json"]), "--markdown", str(again)],
               timeout=SHORT_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert again.read_text() == md


def test_channel_stage_bench_tp2(tmp_path):
    """--channel-stage-bench --tp 2: two gloo ranks, each with its share of the stage (its channels
    and group, the all-gather, its shard of the final cross-attention); G defaults to the TP size,
    peaks are per rank (max over ranks), step times the slowest rank's, fused = reference."""
    paths = {k: tmp_path / f"stage_tp2.{k}" for k in ("json", "md")}
    res = _run(["tools/benchmark.py", "--channel-stage-bench", "--tp", "2", "--channels", "16", "--trees", "[]",
                "--visible-fractions", "1.0", "0.5", "--image-size", "16", "16", "--patch-size", "4",
                "--hidden-size", "32", "--num-heads", "2", "--steps", "2", "--warmup", "0", "--threads", "1",
                "--json", str(paths["json"]), "--markdown", str(paths["md"])], timeout=RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(paths["json"].read_text())
    assert doc["kind"] == "channel_stage_bench" and doc["config"]["tp"] == 2
    assert doc["config"]["channel_groups"] == 2 and doc["config"]["threads"] == 1
    assert doc["command"].startswith("python tools/benchmark.py --channel-stage-bench --tp 2")
    records = doc["records"]
    assert [(r["tree"], r["visible_fraction"]) for r in records] == [([], 1.0), ([], 0.5)]
    for r in records:
        assert r["status"] == "ok" and r["outputs_match"] is True, r
        assert r["tp"] == 2 and r["input_channels_per_rank"] == [[0, 8], [8, 16]]
        assert r["output_max_rel_diff"] < 1e-4 and r["grad_max_rel_diff"] < 1e-4
        assert r["output_shape"] == [r["visible_patches"], 2, 32]
        for path in ("fused", "reference"):
            p = r[path]
            assert len(p["peak_mem_bytes_per_rank"]) == 2 and p["peak_mem_bytes"] == max(p["peak_mem_bytes_per_rank"])
            assert len(p["step_times_s"]) == 2 and p["step_time_s"] == pytest.approx(sum(p["step_times_s"]) / 2)
        assert r["peak_ratio"] == pytest.approx(r["fused"]["peak_mem_bytes"] / r["reference"]["peak_mem_bytes"])
        assert r["speedup"] == pytest.approx(r["reference"]["step_time_s"] / r["fused"]["step_time_s"])
    # no [C/T, L, B, D] tokens nor their gradient on a rank's fused path
    assert records[0]["fused"]["peak_mem_bytes"] < records[0]["reference"]["peak_mem_bytes"]
    md = paths["md"].read_text()
    assert "TP=2" in md and "max over the TP ranks" in md
    assert len([line for line in md.splitlines() if line.startswith("| 16 |")]) == 2
