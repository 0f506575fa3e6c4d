"""The GPU check kit: refuses cleanly without a GPU, and its checks run end to end (CPU self-test).

A real GPU run writes docs/gpu.md; here, on a CPU, ``--allow-cpu`` exercises every check's plumbing
(model comparison, bf16 runs of both entry points with their metrics, the multi-rank comparison on
2 gloo ranks, the benchmarks) on small sizes, so the kit cannot rot between GPU runs.
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.integration.conftest import REPO
from tests.limits import RUN_TIMEOUT_S


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_without_a_gpu_in_one_line(tmp_path):
    report = tmp_path / "gpu.md"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--report", str(report), "--json-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no GPU"), res.stderr
    assert not report.exists() and list(tmp_path.iterdir()) == []


def test_cpu_self_test_runs_every_check(tmp_path):
    report, json_dir = tmp_path / "gpu.md", tmp_path / "bench"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--allow-cpu", "--quick", "--steps", "60",
                          "--report", str(report), "--json-dir", str(json_dir)],
                         cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    raw = json.loads((json_dir / "gpu_check.json").read_text())
    status = {c["name"]: c["status"] for c in raw["checks"]}
    assert raw["on_gpu"] is False
    for name in ("channel stage: GPU = CPU", "encoder: GPU = CPU", "bf16 training, hyperspectral MAE",
                 "bf16 training, ERA5 forecasting", "multi-rank TP on nccl", "benchmarks"):
        assert status[name] == "pass", (name, status)
    assert status["Transformer Engine layer spec"] in ("pass", "skip")
    text = report.read_text()
    assert "CPU self-test of the kit" in text and "| bf16 training, hyperspectral MAE | pass |" in text
    for name in ("gpu_bench_tokenizer.json", "gpu_bench_channel_stage.json"):
        assert json.loads((json_dir / name).read_text())
