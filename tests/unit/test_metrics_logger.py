"""The rank-0 logger: the train line, the device peak table behind MFU, the progress bar on a
terminal (no stale characters, rate and ETA) and W&B asked for without the package."""

import io
import json
import sys

import pytest

from megatron_dchag.training.metrics_logger import (
    MetricsLogger,
    device_peak_tflops,
    format_duration,
    format_train_line,
    resolve_peak_tflops,
)


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


def _screen_line(text: str) -> str:
    """What a terminal shows on the last line after ``text``: ``\\r`` returns to column 0 and
    overwrites, ``ESC[K`` erases to the end of the line."""
    line, col, i = [], 0, 0
    while i < len(text):
        if text.startswith("\033[K", i):
            del line[col:]
            i += 3
            continue
        ch = text[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
        i += 1
    return "".join(line)


def test_progress_bar_leaves_nothing_behind_and_shows_rate_and_eta(monkeypatch):
    term = _Terminal()
    clock = iter([100.0, 101.0, 102.0, 103.0])
    monkeypatch.setattr("megatron_dchag.training.metrics_logger.time.time", lambda: next(clock))
    logger = MetricsLogger(None, enabled=True, total_steps=10, stream=term)
    logger.progress(1, 12345.678)
    long_line = _screen_line(term.getvalue())
    logger.progress(2, 1.17)
    shown = _screen_line(term.getvalue())
    assert len(shown) < len(long_line)
    assert shown == "[######                        ] 2/10 | loss 1.17 | 1.00 it/s | elapsed 00:00:02 | ETA 00:00:08"
    logger.info("a line")  # clears the bar first: the line stands alone
    assert term.getvalue().endswith("\r\033[Ka line\n")


def test_no_progress_bar_off_a_terminal():
    stream = io.StringIO()
    logger = MetricsLogger(None, enabled=True, total_steps=10, stream=stream)
    logger.progress(1, 1.0)
    logger.close()
    assert stream.getvalue() == ""


def test_train_line_has_megatron_fields_and_leaves_out_unknown_values():
    rec = dict(kind="train", step=40, train_iters=1000, consumed_samples=320, iteration_time_ms=812.34, lr=3e-4,
               loss=0.5, grad_norm=0.25, samples_per_s=9.85, tflops=123.4, mfu=0.1248, peak_tflops=989.0,
               peak_mem_bytes=3 * 2**30, eta_s=3900.0)
    assert format_train_line(rec) == (
        " iteration     40/  1000 | consumed samples:        320 | elapsed time per iteration (ms): 812.3 | "
        "learning rate: 3.000000E-04 | loss: 5.000000E-01 | grad norm: 0.250 | samples/s: 9.85 | "
        "TFLOP/s per GPU: 123.4 | MFU: 12.48% of 989 TFLOP/s | peak memory (MiB): 3072 | ETA 01:05:00")
    rec.update(mfu=None, peak_tflops=None, tflops=None)
    line = format_train_line(rec)
    assert "MFU" not in line and "TFLOP/s" not in line and "ETA 01:05:00" in line


@pytest.mark.parametrize("name, bf16, expected", [
    ("NVIDIA H100 80GB HBM3", True, 989.0),
    ("NVIDIA H200", True, 989.0),
    ("NVIDIA A100-SXM4-80GB", True, 312.0),
    ("NVIDIA A100-SXM4-40GB", False, 19.5),
    ("AMD Instinct MI250X", True, 191.5),
    ("AMD Instinct MI250X/MI250", False, 47.9),
    ("NVIDIA GeForce RTX 3090", True, None),
    (None, True, None),
])
def test_device_peak_table(name, bf16, expected):
    peak = device_peak_tflops(name, bf16)
    assert (peak.tflops if peak else None) == expected
    if peak:
        assert ("bf16" if bf16 else "fp32") in peak.source


def test_configured_peak_wins():
    peak = resolve_peak_tflops(500.0, "NVIDIA H100 80GB HBM3", True)
    assert (peak.tflops, peak.source) == (500.0, "training.peak_tflops")
    assert resolve_peak_tflops(None, None, False) is None


def test_format_duration():
    assert format_duration(0) == "00:00:00" and format_duration(90061) == "25:01:01"
    assert format_duration(None) == format_duration(float("nan")) == "--:--:--"


def test_wandb_asked_for_but_not_installed_is_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    logger = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False, wandb_project="proj", stream=io.StringIO())
    logger.record("train", 1, loss=1.0)
    logger.record("train", 2, loss=0.5)
    logger.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: training.wandb_project='proj' is set but the wandb "
                                               "package is not installed"), err
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
