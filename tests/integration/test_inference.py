"""A pretrained model in use: statistics travel with the weights, and every way of loading it
(checkpoint or export, TP=1 or TP=2, the API or tools/extract_features.py) gives the same features.

One tiny MAE is trained at TP=2 for two steps (``pretrain_hyperspectral.py``, so the statistics
are stored by the trainer's own save) and exported; the tests share it.
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from safetensors import safe_open

from tests.dist_utils import run_distributed, run_single
from tests.integration.conftest import TINY_MAE, run_script
from tests.tolerances import assert_close_scaled


@pytest.fixture(scope="module")
def pretrained(hyperspectral_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    run = root / "run"
    res = run_script("pretrain_hyperspectral.py", [*TINY_MAE, "--data-path", hyperspectral_data["data"],
                                                   f"data.stats_file={hyperspectral_data['stats']}",
                                                   "--train-iters", "2", "--eval-iters", "0", "--save", str(run)],
                     nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    export = root / "model.safetensors"
    res = run_script("tools/convert_checkpoint.py", ["--load", str(run), "--export", str(export)])
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(root=root, run=run, ckpt=run / "iter_0000002", export=export, data=hyperspectral_data["data"],
                stats=hyperspectral_data["stats"])


def _expected_record(stats_file):
    from megatron_dchag.data.normalization import normalization_from_stats_file

    return normalization_from_stats_file(stats_file).to_dict()


def test_statistics_round_trip_through_save_export_and_import(pretrained):
    expected = _expected_record(pretrained["stats"])
    assert expected["kind"] == "hyperspectral" and len(expected["mean"]) == 16
    saved = json.loads((pretrained["ckpt"] / "normalization.json").read_text())
    assert saved == expected  # floats through JSON: bit for bit
    with safe_open(str(pretrained["export"]), framework="pt") as fh:
        assert json.loads(fh.metadata()["normalization"]) == expected
    imported = pretrained["root"] / "imported"
    res = run_script("tools/convert_checkpoint.py", ["--import", str(pretrained["export"]), "--save", str(imported)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((imported / "iter_0000002" / "normalization.json").read_text()) == expected


def _cubes(data_dir, n=3):
    from megatron_dchag.data.hyperspectral.discovery import list_cube_files

    return [str(p) for p in list_cube_files(data_dir)[:n]]


def _embeddings(sources, cubes, stats_file=None):
    """For each source: pooled and per-patch embeddings of ``cubes`` (read by the model: this rank's
    channels) and their reconstruction; all loaded in one process, at its TP size."""
    from megatron_dchag.inference import load_pretrained

    found = []
    for source in sources:
        model = load_pretrained(source, stats_file=stats_file)
        batch = np.stack([model.read_cube(c) for c in cubes])
        found.append(dict(embed=model.embed(batch), tokens=model.tokens(batch[0]),
                          recon=model.reconstruct(batch).images, channels=model.input_channel_range))
    return found


def _old_checkpoint(old, new, cubes, stats_file):
    """Loading ``old`` (no stored statistics): the error without a stats file, then the embeddings
    with it, and those of ``new`` (stored statistics)."""
    from megatron_dchag.inference import load_pretrained
    from megatron_dchag.training.checkpointing import CheckpointError

    try:
        load_pretrained(old)
        message = None
    except CheckpointError as exc:
        message = str(exc)
    given, stored = _embeddings([old], cubes, stats_file)[0], _embeddings([new], cubes)[0]
    return message, given["embed"], stored["embed"]


def test_checkpoint_and_export_give_the_same_embeddings_at_tp1_and_tp2(pretrained):
    cubes = _cubes(pretrained["data"])
    sources = [str(pretrained["run"]), str(pretrained["export"])]
    from_ckpt, from_export = run_single(_embeddings, sources, cubes)
    assert tuple(from_ckpt["embed"].shape) == (3, 32) and tuple(from_ckpt["tokens"].shape) == (16, 32)
    assert from_ckpt["embed"].equal(from_export["embed"])  # the same weights, the same code
    assert tuple(from_ckpt["recon"].shape) == (3, 16, 16, 16)
    # TP=2 from the checkpoint and from the export (cut into shards): each rank reads 8 channels.
    for rank in run_distributed(_embeddings, 2, sources, cubes, tensor_model_parallel_size=2):
        for source, found in zip(sources, rank):
            assert found["channels"] in ((0, 8), (8, 16))
            assert_close_scaled(found["embed"], from_ckpt["embed"], what=f"TP=2 embeddings from {source}")
            assert_close_scaled(found["recon"], from_ckpt["recon"], what=f"TP=2 reconstruction from {source}")


def test_checkpoint_without_statistics_needs_the_stats_file(pretrained):
    old = pretrained["root"] / "old_run"
    shutil.copytree(pretrained["ckpt"], old)
    (old / "normalization.json").unlink()
    message, given, stored = run_single(_old_checkpoint, str(old), str(pretrained["ckpt"]), _cubes(pretrained["data"]),
                                        pretrained["stats"])
    assert message is not None and "holds no normalization statistics" in message and "stats_file" in message
    assert "\n" not in message
    assert given.equal(stored)


def _extract(pretrained, out, nproc, *extra):
    return run_script("tools/extract_features.py", ["--load", str(pretrained["run"]), "--data-path", pretrained["data"],
                                                    "--out", str(out), "--batch-size", "5", *extra], nproc=nproc)


def test_extract_features_is_the_same_at_tp1_and_tp2_and_never_overwrites(pretrained):
    root = pretrained["root"]
    first = root / "features_tp1.h5"
    first.write_bytes(b"keep me")
    res = _extract(pretrained, first, 1, "--per-patch")
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: --out '{first}' exists; give --overwrite to replace it"], res.stderr
    assert first.read_bytes() == b"keep me"
    outs = {}
    for tp, extra in ((1, ["--overwrite"]), (2, [])):
        out = root / f"features_tp{tp}.h5"
        res = _extract(pretrained, out, tp, "--per-patch", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        assert not [p for p in root.iterdir() if p.name.startswith(f".{out.name}")], "temporary file left behind"
        with h5py.File(out, "r") as fh:
            outs[tp] = dict(emb=fh["embeddings"][()], names=[n.decode() for n in fh["names"][()]],
                            attrs=dict(fh.attrs))
    assert outs[1]["emb"].shape == (12, 16, 32)
    assert outs[1]["names"] == outs[2]["names"] == sorted(outs[1]["names"]) and len(outs[1]["names"]) == 12
    assert_close_scaled(outs[2]["emb"], outs[1]["emb"], what="features at TP=2 vs TP=1")
    attrs = outs[1]["attrs"]
    assert attrs["task"] == "hyperspectral_mae" and attrs["pooling"] == "none"
    assert "num_channels: 16" in attrs["config"] and json.loads(attrs["normalization"])["kind"] == "hyperspectral"
    # The API's pooled embeddings are the mean of these per-patch ones.
    api = run_single(_embeddings, [str(pretrained["run"])], _cubes(pretrained["data"]))[0]
    assert_close_scaled(outs[1]["emb"][:3].mean(1), api["embed"].numpy(), what="extract_features vs the API")


def test_extract_features_leaves_nothing_on_failure(pretrained):
    root = pretrained["root"]
    broken = root / "broken_cubes"
    shutil.copytree(pretrained["data"], broken)
    with h5py.File(sorted(broken.glob("*.h5"))[-1], "r+") as fh:  # the last batch holds a missing value
        fh["cube"].attrs["_FillValue"] = fh["cube"][0, 16, 16]  # (no-data in the crop): data.nodata=error
    failed = root / "failed.h5"
    res = run_script("tools/extract_features.py", ["--load", str(pretrained["run"]), "--data-path", str(broken),
                                                   "--out", str(failed), "--batch-size", "5"])
    assert res.returncode == 2 and res.stderr.strip().startswith("error: "), res.stderr[-2000:]
    assert "missing values" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert not failed.exists() and not [p for p in root.iterdir() if p.name.startswith(".failed.h5")]
