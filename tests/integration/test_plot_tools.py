"""tools/plot_reconstruction.py and tools/plot_forecast.py end to end on TP=2 checkpoints.

Each tool rebuilds the model at TP = PP = 1 from the checkpoint's ``config.yaml`` (channel groups
pinned to the saved G; here G is left to default to the training TP size, so a wrong rebuild would
not load) and writes one PNG; bad input gives one ``error:`` line, a non-zero exit and no PNG.
"""

import math
import re

import pytest
from PIL import Image

from tests.integration.conftest import TINY_MAE, run_script
from tests.integration.test_pretrain_era5 import SMALL, era5_data  # noqa: F401  (era5_data: a fixture)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
G_FROM_TP = "model.channel_groups=null"  # G = the training TP size (2); the TP=1 rebuild must keep G=2


def _train(script, args, save):
    res = run_script(script, [*args, "--train-iters", "2", "--eval-iters", "1", "--save", str(save)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    return save


@pytest.fixture(scope="module")
def mae_checkpoint(hyperspectral_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("plot_mae") / "run"
    return _train("pretrain_hyperspectral.py", [*TINY_MAE, "--data-path", hyperspectral_data["data"],
                                                f"data.stats_file={hyperspectral_data['stats']}", G_FROM_TP], save)


@pytest.fixture(scope="module")
def forecast_checkpoint(era5_data, tmp_path_factory):  # noqa: F811
    save = tmp_path_factory.mktemp("plot_forecast") / "run"
    return _train("pretrain_era5.py", ["--config", "configs/era5/tiny.yaml", "--data-path", era5_data["data"],
                                       f"data.stats_file={era5_data['stats']}", *SMALL, G_FROM_TP,
                                       "--micro-batch-size", "2", "--log-interval", "1", "--eval-interval", "0"], save)


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 100, img.size
    assert not path.with_name(path.name + ".tmp.png").exists()  # the temporary file was renamed


def _assert_one_error_line(res, out, *fragments):
    assert res.returncode != 0, res.stdout[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".tmp.png").exists()


def test_plot_reconstruction_of_a_tp2_checkpoint(mae_checkpoint, tmp_path):
    out = tmp_path / "new_dir" / "reconstruction.png"  # the directory is created
    res = run_script("tools/plot_reconstruction.py", ["--load", str(mae_checkpoint), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    match = re.search(r"wrote (\S+) \(masked-patch MSE (\S+), per-channel-mean baseline (\S+)\)", res.stdout)
    assert match and match.group(1) == str(out), res.stdout[-2000:]
    assert all(math.isfinite(float(match.group(i))) for i in (2, 3))
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["reconstruction.png"]


def test_plot_forecast_of_a_tp2_checkpoint(forecast_checkpoint, tmp_path):
    out = tmp_path / "new_dir" / "forecast.png"
    res = run_script("tools/plot_forecast.py", ["--load", str(forecast_checkpoint), "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"wrote {out}" in res.stdout, res.stdout[-2000:]
    # One line per (variable, lead): forecast.metric_variables x forecast.eval_lead_hours of the saved config.
    rows = re.findall(r"^  (\w+) \+(\d+)h: RMSE (\S+) \(persistence (\S+)\)$", res.stdout, re.M)
    assert [(v, int(h)) for v, h, _, _ in rows] == [(v, h) for h in (6, 24) for v in ("z_500", "t_850", "t2m")]
    assert all(math.isfinite(float(r)) and math.isfinite(float(p)) for _, _, r, p in rows)
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["forecast.png"]


def test_plot_reconstruction_without_config_gives_one_error_line(tmp_path):
    ckpt = tmp_path / "not_ours"  # looks like a dist_checkpointing directory but has no config.yaml
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    out = tmp_path / "reconstruction.png"
    res = run_script("tools/plot_reconstruction.py", ["--load", str(ckpt), "--out", str(out)])
    _assert_one_error_line(res, out, str(ckpt), "has no config.yaml")


def test_plot_forecast_unknown_variable_gives_one_error_line(forecast_checkpoint, tmp_path):
    out = tmp_path / "forecast.png"
    res = run_script("tools/plot_forecast.py", ["--load", str(forecast_checkpoint), "--out", str(out),
                                                "--variables", "z_300"])
    _assert_one_error_line(res, out, "['z_300']", "not outputs of this model")



@pytest.mark.parametrize("tool", ["plot_reconstruction", "plot_forecast"])
def test_missing_checkpoint_gives_one_error_line(tool, tmp_path):
    out = tmp_path / "plot.png"
    res = run_script(f"tools/{tool}.py", ["--load", str(tmp_path / "missing"), "--out", str(out)])
    assert res.returncode == 2
    _assert_one_error_line(res, out, str(tmp_path / "missing"), "does not exist")
