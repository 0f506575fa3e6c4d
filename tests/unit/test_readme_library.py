"""The README's library section runs as written.

Its Python blocks are taken from README.md as they stand and each is run in a fresh interpreter,
as a user would paste it. The first one (a pretrained model on a raw cube) gets ``run_dir`` and
``cube_file`` defined before it: a tiny MAE checkpoint saved with its normalization statistics,
and one synthetic cube. The test then checks what the snippet computed: the shapes, and that its
embedding is the encoder's output on the cube normalized with the statistics file by hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.dist_utils import run_single
from tests.limits import RUN_TIMEOUT_S
from tests.tolerances import assert_close_scaled

REPO = Path(__file__).resolve().parents[2]
SECTION = "## The model, as a library"
TINY_MODEL = dict(num_channels=8, channel_groups=2, image_size=[8, 8], patch_size=4, hidden_size=16,
                  num_layers=1, num_attention_heads=2)


def library_blocks() -> list:
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def _save_tiny_checkpoint(root: str) -> dict:
    """A tiny MAE at TP=1, saved as training saves it; a 12x10 cube (larger than the 8x8 crop)."""
    from megatron_dchag.config import ExperimentConfig, build_dataclass, config_to_dict, resolve_config
    from megatron_dchag.data.hyperspectral.formats import write_hdf5_cube
    from megatron_dchag.data.hyperspectral.statistics import RunningChannelMoments, save_channel_stats
    from megatron_dchag.data.normalization import normalization_from_stats_file
    from megatron_dchag.tasks.mae_pretraining import HyperspectralMAETask
    from megatron_dchag.training.checkpointing import TrainingState, save_checkpoint

    rng = np.random.default_rng(0)
    cube = (rng.random((8, 12, 10)) * 900 + 100).astype(np.float32) * np.arange(1, 9, dtype=np.float32)[:, None, None]
    cube_file = os.path.join(root, "cube_0.h5")
    write_hdf5_cube(cube_file, cube)
    moments = RunningChannelMoments(8)
    moments.update(cube)
    stats_file = os.path.join(root, "stats.json")
    save_channel_stats(moments.finalize(), stats_file)
    cfg = resolve_config(build_dataclass(ExperimentConfig, {
        "model": TINY_MODEL, "mae": dict(decoder_hidden_size=16, decoder_num_layers=1, decoder_num_attention_heads=2),
        "parallel": dict(tensor_model_parallel_size=1), "data": dict(stats_file=stats_file)}))
    model = HyperspectralMAETask(cfg).build_model()
    run_dir = os.path.join(root, "run")
    state = TrainingState(iteration=3, layout=dict(tp=1, pp=1, dp=1), task=HyperspectralMAETask.name, has_optimizer=False)
    save_checkpoint(run_dir, 3, [model], state=state, config_dict=config_to_dict(cfg),
                    normalization=normalization_from_stats_file(stats_file).to_json())
    # What the snippet should compute: the encoder on the centre crop, normalized by hand.
    from megatron_dchag.data.hyperspectral.statistics import load_channel_stats

    stats = load_channel_stats(stats_file)
    crop = cube[:, 2:10, 1:9]
    normalized = (crop - stats.mean[:, None, None].astype(np.float32)) * (1.0 / stats.std).astype(np.float32)[:, None, None]
    import torch

    with torch.no_grad():
        expected = model.encoder(torch.from_numpy(normalized[None]))[:, 0].mean(0)
    return dict(run_dir=run_dir, cube_file=cube_file, expected=expected.numpy().tolist())


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def test_readme_has_both_library_blocks():
    blocks = library_blocks()
    assert len(blocks) == 2, blocks
    assert "load_pretrained(run_dir)" in blocks[0] and "read_cube(cube_file)" in blocks[0]


def test_pretrained_model_block_runs_as_written(tmp_path):
    made = run_single(_save_tiny_checkpoint, str(tmp_path))
    report = tmp_path / "report.json"
    code = (f"run_dir, cube_file = {made['run_dir']!r}, {made['cube_file']!r}\n" + library_blocks()[0]
            + "import json\n"
            + f"json.dump(dict(tokens=list(tokens.shape), embedding=embedding.tolist(), recon=list(recon.images.shape),"
              f" masked=int(recon.masked.sum())), open({str(report)!r}, 'w'))\n")
    res = _run_python(code)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(report.read_text())
    assert out["tokens"] == [4, 16] and out["recon"] == [8, 8, 8]
    assert out["masked"] == 3  # the default mae.mask_ratio, 0.75 of the 4 patches
    assert_close_scaled(np.array(out["embedding"]), np.array(made["expected"]), what="README embedding")


def test_encoder_block_runs_as_written():
    res = _run_python(library_blocks()[1] + "assert tuple(tokens.shape) == (64, 2, 64), tokens.shape\n")
    assert res.returncode == 0, res.stderr[-3000:]
