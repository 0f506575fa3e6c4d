"""Hyperspectral data layer: readers, channel slicing per TP rank, bytes read, ENVI, stats, the
dataset with sampler-driven DataLoader workers (the sampler itself: ``test_sampler.py``).

All data are tiny synthetic cubes written to ``tmp_path``; the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from megatron_dchag.cli import compute_stats as stats_tool
from megatron_dchag.cli import make_synthetic_hyperspectral as synth
from megatron_dchag.data.hyperspectral.dataset import HyperspectralDataset, crop_origin
from megatron_dchag.data.hyperspectral.discovery import list_cube_files
from megatron_dchag.data.hyperspectral.formats import (
    CubeFormatError,
    CubeReadError,
    ENVICubeReader,
    HDF5CubeReader,
    open_cube,
    write_envi_cube,
    write_hdf5_cube,
)
from megatron_dchag.data.hyperspectral.statistics import (
    ChannelStats,
    RunningChannelMoments,
    load_channel_stats,
    save_channel_stats,
)
from megatron_dchag.data.hyperspectral.splits import split_files
from megatron_dchag.data.sampler import DistributedResumableSampler

def _cube(c: int, h: int, w: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """A cube whose channels are easy to tell apart: channel k is centered on 100 * (k + 1)."""
    rng = np.random.default_rng(seed)
    base = 100.0 * (np.arange(c, dtype=np.float64) + 1)[:, None, None]
    values = base + rng.uniform(-40, 40, size=(c, h, w))
    return values.astype(np.uint16) if dtype == "uint16" else values.astype(np.float32)


def _write_dir(root: Path, cubes, wavelengths=None, **kwargs) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, cube in enumerate(cubes):
        write_hdf5_cube(root / f"cube_{i:03d}.h5", cube, wavelengths=wavelengths, **kwargs)
    return root


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("dtype", ["uint16", "float32"])
@pytest.mark.parametrize("chunks", ["channel", "contiguous"])
def test_hdf5_reader_returns_exactly_the_requested_slice(tmp_path, layout, dtype, chunks):
    full = _cube(10, 12, 14, dtype)
    wl = np.linspace(400, 900, 10)
    path = write_hdf5_cube(tmp_path / "c.h5", full, wavelengths=wl, layout=layout, chunks=chunks)
    with HDF5CubeReader(path, layout=layout) as reader:
        assert reader.shape == (10, 12, 14)
        np.testing.assert_allclose(reader.wavelengths, wl)
        block = reader.read(3, 7, 2, 9, 1, 12)
        assert block.dtype == np.float32 and block.flags.c_contiguous
        np.testing.assert_array_equal(block, full[3:7, 2:9, 1:12].astype(np.float32))
        np.testing.assert_array_equal(reader.read_channels(9, 10), full[9:10].astype(np.float32))
        with pytest.raises(ValueError, match="channel range"):
            reader.read(8, 11, 0, 1, 0, 1)


def test_hdf5_reader_wavelengths_on_file_in_micrometers_and_hwc(tmp_path):
    full = _cube(6, 5, 7)
    path = tmp_path / "hwc.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/reflectance", data=full.transpose(1, 2, 0))
        f.attrs["wavelengths"] = np.linspace(0.4, 0.9, 6)
        f.attrs["wavelength_units"] = "micrometers"
    reader = HDF5CubeReader(path, dataset_name="data/reflectance", layout="HWC")
    assert reader.shape == (6, 5, 7)
    np.testing.assert_allclose(reader.wavelengths, np.linspace(400, 900, 6))
    np.testing.assert_array_equal(reader.read(1, 4, 0, 5, 2, 6), full[1:4, :, 2:6])
    with pytest.raises(CubeFormatError, match=r"hwc\.h5.*no dataset named 'cube'"):
        HDF5CubeReader(path)


@pytest.mark.parametrize("tp_size", [2, 3, 4])
def test_dataset_channel_range_is_the_ranks_slice_not_the_first_channels(tmp_path, tp_size):
    c = 12
    cubes = [_cube(c, 20, 24, seed=s) for s in range(3)]
    root = _write_dir(tmp_path / "d", cubes, wavelengths=np.linspace(400, 900, c))
    common = dict(crop_size=(8, 10), split="all", seed=7)
    full = HyperspectralDataset(root, **common)
    for index in range(len(full)):
        y0, y1, x0, x1 = full.crop_window(index)
        pieces = []
        for rank in range(tp_size):
            start, stop = rank * c // tp_size, (rank + 1) * c // tp_size
            ds = HyperspectralDataset(root, channel_range=(start, stop), **common)
            item = ds[index]
            image = item["image"].numpy()
            np.testing.assert_array_equal(image, cubes[index][start:stop, y0:y1, x0:x1])
            # wavelengths travel as float32 (8 eps of ~900 nm)
            np.testing.assert_allclose(item["wavelengths"].numpy(), np.linspace(400, 900, c)[start:stop], rtol=1e-6)
            if rank > 0:  # the known defect: every rank reading the first C/T channels
                assert not np.array_equal(image, cubes[index][: stop - start, y0:y1, x0:x1])
            pieces.append(item["image"])
        torch.testing.assert_close(torch.cat(pieces), full[index]["image"], rtol=0, atol=0)


@pytest.mark.parametrize("chunks", ["channel", "contiguous"])
def test_hdf5_bytes_read_scale_as_one_over_tp(tmp_path, chunks):
    c, h, w = 16, 32, 40
    root = _write_dir(tmp_path / "d", [_cube(c, h, w, "uint16", seed=s) for s in range(2)], chunks=chunks)
    crop = (16, 24)
    bytes_per_tp = {}
    for tp in (1, 2, 4):
        for rank in range(tp):
            ds = HyperspectralDataset(root, crop_size=crop, channel_range=(rank * c // tp, (rank + 1) * c // tp), split="all")
            for index in range(len(ds)):
                ds[index]
            bytes_per_tp.setdefault(tp, set()).add(ds.bytes_read)
    assert all(len(v) == 1 for v in bytes_per_tp.values())  # every rank reads the same amount
    b1, b2, b4 = (bytes_per_tp[t].pop() for t in (1, 2, 4))
    assert b2 * 2 == b1 and b4 * 4 == b1
    # What is touched: whole channel planes when chunked per channel, only the crop when contiguous.
    per_channel = h * w * 2 if chunks == "channel" else crop[0] * crop[1] * 2
    assert b1 == 2 * c * per_channel


def test_hdf5_reader_never_reads_the_whole_file(tmp_path):
    """Bytes the HDF5 library really pulls from the file (counted below h5py) for a rank's slice."""
    c, h, w = 16, 64, 64
    path = write_hdf5_cube(tmp_path / "c.h5", _cube(c, h, w), chunks="contiguous")
    data_bytes = c * h * w * 4
    for tp in (1, 2, 4):
        reader = HDF5CubeReader(path, count_file_io=True)
        metadata = reader.file_bytes_read
        reader.file_bytes_read = 0
        block = reader.read_channels(c - c // tp, c)  # the last rank's channels
        assert block.shape == (c // tp, h, w)
        assert data_bytes // tp <= reader.file_bytes_read <= data_bytes // tp + 2 * metadata + 4096
        reader.close()


def test_reader_pickles_without_its_handle(tmp_path):
    import pickle

    path = write_hdf5_cube(tmp_path / "c.h5", _cube(4, 6, 6))
    reader = HDF5CubeReader(path)
    reader.read_channels(0, 2)
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read_channels(1, 3), reader.read_channels(1, 3))


# ------------------------------------------------------------------------------------------------
# ENVI
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
def test_envi_and_hdf5_give_the_same_tensor(tmp_path, interleave):
    cube = synth.make_cube(24, 20, 28, seed=3, dtype="uint16")
    write_hdf5_cube(tmp_path / "h5" / "a.h5", cube.cube, wavelengths=cube.wavelengths)
    write_envi_cube(tmp_path / "envi" / "a.hdr", cube.cube, cube.wavelengths, interleave=interleave)
    common = dict(crop_size=(12, 16), channel_range=(6, 18), split="all", seed=5)
    from_h5 = HyperspectralDataset(tmp_path / "h5", **common)
    from_envi = HyperspectralDataset(tmp_path / "envi", **common)
    for epoch in (0, 1):
        a, b = from_h5[(epoch, 0)], from_envi[(epoch, 0)]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        torch.testing.assert_close(a["wavelengths"], b["wavelengths"])
    reader = ENVICubeReader(tmp_path / "envi" / "a.img")  # the data file finds its header too
    np.testing.assert_array_equal(reader.read(2, 9, 3, 17, 0, 28), cube.cube[2:9, 3:17].astype(np.float32))
    assert reader.bytes_read == 7 * 14 * 28 * 2


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "float64", "uint16"])
@pytest.mark.parametrize("byte_order", [0, 1])
def test_envi_data_types_byte_order_and_header_offset(tmp_path, dtype, byte_order):
    full = (_cube(5, 6, 7) / 10).astype(dtype)
    header, data = write_envi_cube(
        tmp_path / "x.hdr", full, np.linspace(0.4, 0.9, 5) * 1000, interleave="bil",
        byte_order=byte_order, header_offset=64, wavelength_units="Micrometers",
    )
    assert data.stat().st_size == 64 + full.nbytes
    reader = open_cube(header)
    assert reader.shape == (5, 6, 7) and reader.dtype.byteorder in ("=", "|", "<" if byte_order == 0 else ">")
    np.testing.assert_allclose(reader.wavelengths, np.linspace(400, 900, 5))
    np.testing.assert_array_equal(reader.read(1, 4, 2, 6, 0, 7), full[1:4, 2:6].astype(np.float32))


def test_envi_header_written_by_hand(tmp_path):
    """A header in another tool's style: capitalised keys, multi-line braces, no units, big endian."""
    full = _cube(3, 4, 5).astype(">i2")
    (tmp_path / "scene.raw").write_bytes(b"\x00" * 10 + np.ascontiguousarray(full.transpose(1, 2, 0)).tobytes())
    (tmp_path / "scene.hdr").write_text(
        "ENVI\ndescription = {\n  hand written}\nSamples = 5\nlines   = 4\nbands= 3\n"
        "header offset = 10\nData Type = 2\ninterleave = BIP\nbyte order = 1\n"
        "wavelength = {\n 0.45,\n 0.55,\n 0.65 }\n"
    )
    reader = ENVICubeReader(tmp_path / "scene.hdr")
    np.testing.assert_allclose(reader.wavelengths, [450, 550, 650])  # units guessed from the values
    np.testing.assert_array_equal(reader.read(0, 3, 0, 4, 0, 5), full.astype(np.float32))


def test_envi_truncated_file_names_the_file(tmp_path):
    header, data = write_envi_cube(tmp_path / "t.hdr", _cube(4, 5, 6, "uint16"))
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(CubeReadError, match=r"t\.img.*truncated"):
        ENVICubeReader(header)


# ------------------------------------------------------------------------------------------------
# Validation and errors
# ------------------------------------------------------------------------------------------------


def test_channel_count_mismatch_names_the_file_and_both_counts(tmp_path):
    root = tmp_path / "d"
    write_hdf5_cube(root / "a.h5", _cube(8, 10, 10))
    write_hdf5_cube(root / "b.h5", _cube(9, 10, 10))
    with pytest.raises(CubeFormatError, match=r"b\.h5: cube has 9 channels but .*a\.h5 has 8 channels"):
        HyperspectralDataset(root, crop_size=(4, 4), split="all")
    with pytest.raises(CubeFormatError, match=r"a\.h5: cube has 8 channels but 10 channels are expected"):
        HyperspectralDataset(root, crop_size=(4, 4), split="all", num_channels_expected=10)


def test_truncated_hdf5_names_the_file(tmp_path):
    root = tmp_path / "d"
    write_hdf5_cube(root / "good.h5", _cube(4, 8, 8))
    path = write_hdf5_cube(root / "broken.h5", _cube(4, 8, 8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CubeReadError, match=r"broken\.h5"):
        HyperspectralDataset(root, crop_size=(4, 4), split="all")


def test_crop_that_does_not_fit_and_bad_channel_range(tmp_path):
    root = _write_dir(tmp_path / "d", [_cube(4, 8, 12)])
    with pytest.raises(CubeFormatError, match=r"cube_000\.h5: cube is 8 x 12 .* crop is 10 x 10"):
        HyperspectralDataset(root, crop_size=(10, 10), split="all")
    with pytest.raises(ValueError, match=r"channel_range=\(2, 5\)"):
        HyperspectralDataset(root, crop_size=(4, 4), channel_range=(2, 5), split="all")


def test_mixed_formats_in_one_directory_are_ambiguous(tmp_path):
    write_hdf5_cube(tmp_path / "a.h5", _cube(4, 8, 8))
    write_envi_cube(tmp_path / "b.hdr", _cube(4, 8, 8))
    with pytest.raises(CubeFormatError, match="both HDF5"):
        list_cube_files(tmp_path)
    assert [p.name for p in list_cube_files(tmp_path, "envi")] == ["b.hdr"]


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_compute_stats_matches_numpy(tmp_path, dtype):
    rng = np.random.default_rng(0)
    cubes = [(5000 + rng.normal(0, 3, size=(7, 9 + i, 11)) * np.arange(1, 8)[:, None, None]).astype(dtype) for i in range(3)]
    root = _write_dir(tmp_path / "d", cubes, wavelengths=np.linspace(400, 900, 7))
    all_values = np.concatenate([c.reshape(7, -1).astype(np.float64) for c in cubes], axis=1)
    # float64 streaming moments vs numpy's two-pass float64 result: 1e-6 relative is generous
    # (the values carry an offset of 5,000 and the check is of numerical stability, not ulps).
    for block in (1, 3, None):
        stats = stats_tool.compute_channel_stats(list_cube_files(root), channel_block=block)
        np.testing.assert_allclose(stats.mean, all_values.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(stats.std, all_values.std(axis=1), rtol=1e-6)
        assert stats.count.tolist() == [all_values.shape[1]] * 7
        np.testing.assert_allclose(stats.wavelengths, np.linspace(400, 900, 7))

    for name in ("stats.json", "stats.npz"):
        out = tmp_path / "out" / name
        assert stats_tool.main(["--data-path", str(root), "--out", str(out), "--split", "all", "--quiet"]) == 0
        loaded = load_channel_stats(out, num_channels_expected=7)
        np.testing.assert_allclose(loaded.mean, all_values.mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(loaded.std, all_values.std(axis=1), rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stats.json", "stats.npz"]  # no temp files
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["num_channels"] == 7


def test_running_moments_are_stable_with_a_large_offset():
    rng = np.random.default_rng(1)
    x = 1e8 + rng.normal(0, 1, size=(2, 10000))
    moments = RunningChannelMoments(2)
    for part in np.array_split(x, 7, axis=1):
        moments.update(part)
    stats = moments.finalize()
    np.testing.assert_allclose(stats.std, x.std(axis=1), rtol=1e-6)


def test_stats_file_channel_count_is_validated(tmp_path):
    stats = ChannelStats(np.zeros(8), np.ones(8), np.full(8, 10))
    path = save_channel_stats(stats, tmp_path / "s.npz")
    with pytest.raises(CubeFormatError, match=r"s\.npz: statistics are for 8 channels but the data has 9"):
        load_channel_stats(path, num_channels_expected=9)
    root = _write_dir(tmp_path / "d", [_cube(9, 8, 8)])
    with pytest.raises(CubeFormatError, match=r"s\.npz.*8 channels.*9 channels"):
        HyperspectralDataset(root, crop_size=(4, 4), split="all", stats_file=path)


def test_dataset_normalizes_the_ranks_channels_with_the_stats(tmp_path):
    c = 8
    cubes = [_cube(c, 10, 10, seed=s) for s in range(2)]
    root = _write_dir(tmp_path / "d", cubes)
    mean, std = np.arange(c) * 100.0 + 50, np.arange(1, c + 1) * 2.0
    path = save_channel_stats(ChannelStats(mean, std, np.full(c, 200)), tmp_path / "s.json")
    ds = HyperspectralDataset(root, crop_size=(6, 6), channel_range=(4, 8), split="all", stats_file=path)
    y0, y1, x0, x1 = ds.crop_window(1)
    expected = (cubes[1][4:8, y0:y1, x0:x1] - mean[4:8, None, None]) / std[4:8, None, None]
    # float32 normalization in the dataset vs float64 numpy on values of O(10): ~84 eps relative.
    np.testing.assert_allclose(ds[1]["image"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert ds[1]["wavelengths"].numel() == 0  # no wavelengths anywhere: an empty tensor


# ------------------------------------------------------------------------------------------------
# Crops, split, sampler
# ------------------------------------------------------------------------------------------------


def test_crops_are_a_pure_function_of_seed_epoch_index(tmp_path):
    root = _write_dir(tmp_path / "d", [_cube(4, 40, 50, seed=s) for s in range(4)])
    a = HyperspectralDataset(root, crop_size=(8, 8), split="all", seed=3, samples_per_file=2)
    b = HyperspectralDataset(root, crop_size=(8, 8), split="all", seed=3, samples_per_file=2)
    assert len(a) == 8
    windows = {e: [a.crop_window(i, e) for i in range(len(a))] for e in (0, 1)}
    assert windows[0] != windows[1]
    b.set_epoch(1)
    for i in range(len(a)):
        assert b.crop_window(i) == windows[1][i]
        torch.testing.assert_close(b[i]["image"], a[(1, i)]["image"], rtol=0, atol=0)
    assert crop_origin(3, 1, 5, (40, 50), (8, 8)) == windows[1][5][::2]
    other_seed = HyperspectralDataset(root, crop_size=(8, 8), split="all", seed=4, samples_per_file=2)
    assert [other_seed.crop_window(i, 0) for i in range(8)] != windows[0]
    val = HyperspectralDataset(root, crop_size=(8, 8), split="all", seed=3, crop="fixed")
    assert val.crop_window(2, 0) == val.crop_window(2, 5)


def test_train_val_split_is_by_file_and_deterministic(tmp_path):
    files = [tmp_path / f"cube_{i:03d}.h5" for i in range(20)]
    train = split_files(files, "train", 0.2)
    val = split_files(files, "val", 0.2)
    assert len(val) == 4 and set(train).isdisjoint(val) and set(train) | set(val) == set(files)
    assert set(split_files(files[::-1], "val", 0.2)) == set(val)  # listing order does not matter
    assert set(split_files(files, "val", 0.2, split_seed=1)) != set(val)
    root = _write_dir(tmp_path / "d", [_cube(3, 6, 6, seed=s) for s in range(5)])
    tr = HyperspectralDataset(root, crop_size=(4, 4), split="train", val_fraction=0.2)
    va = HyperspectralDataset(root, crop_size=(4, 4), split="val", val_fraction=0.2)
    assert len(tr) == 4 and len(va) == 1 and set(tr.files).isdisjoint(va.files)


def test_sampler_with_dataloader_workers_and_epoch_tagged_indices(tmp_path):
    root = _write_dir(tmp_path / "d", [_cube(4, 20, 20, seed=s) for s in range(4)])
    ds = HyperspectralDataset(root, crop_size=(8, 8), channel_range=(2, 4), split="all", seed=9)
    sampler = DistributedResumableSampler(len(ds), 1, 0, seed=2, yield_epoch=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=1)
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == 3:  # 6 samples: crosses into epoch 1
            break
    assert batches[2]["epoch"].tolist() == [1, 1]
    for batch in batches:
        for k in range(2):
            epoch, index = int(batch["epoch"][k]), int(batch["index"][k])
            torch.testing.assert_close(batch["image"][k], ds[(epoch, index)]["image"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Synthetic generator
# ------------------------------------------------------------------------------------------------


def test_synthetic_vegetation_has_a_red_edge_and_the_cli_writes_the_contract(tmp_path):
    start = time.perf_counter()
    cube = synth.make_cube(64, 64, 64, seed=0, dtype="float32")
    assert time.perf_counter() - start < 1.0
    wl = cube.wavelengths
    band = lambda nm: int(np.argmin(np.abs(wl - nm)))  # noqa: E731
    y, x = np.unravel_index(np.argmax(cube.abundances[0]), cube.abundances.shape[1:])
    assert cube.abundances[0, y, x] > 0.9
    spectrum = cube.cube[:, y, x]
    assert spectrum[band(750)] > 4 * spectrum[band(670)]  # red edge
    assert spectrum[band(550)] > spectrum[band(670)]  # green bump
    spectra = synth.endmember_spectra(wl)
    assert np.all(np.diff(spectra["soil"]) > 0) and np.all(np.diff(spectra["water"]) < 0)

    assert synth.main(["--out", str(tmp_path / "s"), "--num-cubes", "2", "--channels", "10", "--height", "16",
                       "--width", "12", "--seed", "1", "--layout", "HWC", "--envi", "--interleave", "bip"]) == 0
    h5 = HDF5CubeReader(tmp_path / "s" / "cube_00001.h5", layout="HWC")
    envi = ENVICubeReader(tmp_path / "s" / "envi" / "cube_00001.hdr")
    assert h5.shape == envi.shape == (10, 16, 12) and h5.dtype == np.uint16
    np.testing.assert_allclose(h5.wavelengths, np.linspace(400, 900, 10))
    np.testing.assert_array_equal(h5.read_channels(0, 10), envi.read_channels(0, 10))
    assert not any(p.name.startswith(".") for p in (tmp_path / "s").iterdir())
