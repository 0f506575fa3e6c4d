"""Hyperspectral cubes as users have them: no-data values, scale factors, explicit splits.

The fixtures are written here in the shapes real files have: HDF5 cubes with NaN or with a
fill-value attribute (``_FillValue``, ``fill_value``, ``nodata``, ``no_data_value``, on the dataset
or the file), ENVI cubes in integer storage (uint16 / int16) with ``data ignore value`` and
``reflectance scale factor = 10000``. Each section names the defect it guards against.
All data are tiny; the file runs in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from megatron_dchag.cli import compute_stats as stats_tool
from megatron_dchag.cli import make_synthetic_hyperspectral as synth
from megatron_dchag.data.hyperspectral.dataset import HyperspectralDataset
from megatron_dchag.data.hyperspectral.formats import (
    CubeFormatError,
    ENVICubeReader,
    HDF5CubeReader,
    write_envi_cube,
    write_hdf5_cube,
)
from megatron_dchag.data.hyperspectral.nodata import NoDataError
from megatron_dchag.data.hyperspectral.splits import SplitError, SplitOptions, split_collection, split_key
from megatron_dchag.data.hyperspectral.statistics import (
    ChannelStats,
    ConstantChannelError,
    coverage_warning,
    load_channel_stats,
    save_channel_stats,
)

REPO = Path(__file__).resolve().parents[2]
SCALE = 10000.0
NODATA = -9999


def _reflectance(c=6, h=8, w=10, seed=0) -> np.ndarray:
    """Reflectance-like values 0.05..0.6, channel k offset by 0.05 k (float64)."""
    rng = np.random.default_rng(seed)
    return 0.05 + 0.05 * np.arange(c)[:, None, None] + rng.uniform(0, 0.3, size=(c, h, w))


def _int_cube(dtype="int16", seed=0, holes=((0, 0), (3, 4))) -> np.ndarray:
    """Reflectance x 10000 as integers, ``NODATA`` (or 0 for uint16) at whole pixels ``holes``."""
    cube = np.rint(_reflectance(seed=seed) * SCALE).astype(dtype)
    for y, x in holes:
        cube[:, y, x] = NODATA if dtype == "int16" else 0
    return cube


# ------------------------------------------------------------------------------------------------
# Readers: ENVI's reflectance scale factor was ignored; no-data values were not recognized.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, nodata", [("int16", NODATA), ("uint16", 0)])
@pytest.mark.parametrize("interleave", ["bsq", "bip"])
def test_envi_scale_factor_and_ignore_value_and_hdf5_read_bit_identically(tmp_path, dtype, nodata, interleave):
    stored = _int_cube(dtype)
    header, _ = write_envi_cube(tmp_path / "a.hdr", stored, interleave=interleave, data_ignore_value=nodata,
                                reflectance_scale_factor=SCALE)
    envi = ENVICubeReader(header)
    assert (envi.nodata_value, envi.scale_factor) == (nodata, SCALE)
    expected = stored.astype(np.float32) / np.float32(SCALE)  # ENVI: divide by the factor
    expected[stored == nodata] = np.nan
    values, mask = envi.read_with_nodata(0, 6, 0, 8, 0, 10)
    np.testing.assert_array_equal(values, expected)  # NaN at the same places, bit-identical elsewhere
    np.testing.assert_array_equal(mask, stored == nodata)
    assert np.isnan(values).sum() == 2 * 6
    h5 = HDF5CubeReader(write_hdf5_cube(tmp_path / "a.h5", stored, nodata_value=nodata, scale_factor=SCALE))
    np.testing.assert_array_equal(h5.read(1, 5, 2, 7, 0, 10), envi.read(1, 5, 2, 7, 0, 10))
    # without the metadata both read the stored integers, as before
    plain = HDF5CubeReader(write_hdf5_cube(tmp_path / "p.h5", stored))
    np.testing.assert_array_equal(plain.read_channels(0, 6), stored.astype(np.float32))


@pytest.mark.parametrize("attribute", ["_FillValue", "fill_value", "nodata", "no_data_value"])
@pytest.mark.parametrize("on", ["dataset", "file"])
def test_hdf5_fill_value_attributes_read_as_nan(tmp_path, attribute, on):
    cube = (_reflectance() * 100).astype(np.float32)
    cube[2, 1:3, 4] = -9999.0
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("cube", data=cube)
        (ds if on == "dataset" else f).attrs[attribute] = np.float64(-9999.0)
    values = HDF5CubeReader(path).read_channels(0, 6)
    assert np.isnan(values).sum() == 2 and np.isnan(values[2, 1:3, 4]).all()
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(values[finite], cube[finite])


def test_metadata_that_is_not_a_number_names_the_file_and_field(tmp_path):
    header, _ = write_envi_cube(tmp_path / "a.hdr", _int_cube())
    header.write_text(header.read_text() + "reflectance scale factor = -1\n")
    with pytest.raises(CubeFormatError, match=r"a\.hdr: ENVI 'reflectance scale factor' = -1.0 must be a finite"):
        ENVICubeReader(header)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("cube", data=np.zeros((2, 3, 3), np.float32)).attrs["_FillValue"] = "none"
    with pytest.raises(CubeFormatError, match=r"c\.h5: attribute '_FillValue' of dataset 'cube' = 'none' is not a num"):
        HDF5CubeReader(path)


# ------------------------------------------------------------------------------------------------
# The dataset did not check: NaN went into the model. Now error / fill / mask.
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def nan_cubes(tmp_path):
    """3 float32 cubes (6 x 8 x 10); cube 1 has NaN at 3 pixels of channel 4 and one +inf in channel 2."""
    root = tmp_path / "nan"
    cubes = [_reflectance(seed=s).astype(np.float32) for s in range(3)]
    cubes[1][4, 2, 1:4] = np.nan
    cubes[1][2, 5, 5] = np.inf
    for i, cube in enumerate(cubes):
        write_hdf5_cube(root / f"tile_{i}.h5", cube)
    return root, cubes


def test_missing_values_stop_the_default_policy_naming_file_channel_and_count(nan_cubes):
    root, _ = nan_cubes
    ds = HyperspectralDataset(root, crop_size=(8, 10), split="all")
    ds[0]
    with pytest.raises(NoDataError) as info:
        ds[1]
    message = str(info.value)
    assert message.startswith(f"{root / 'tile_1.h5'}: channel 2 has 1 missing values of 80 (NaN/inf)")
    assert "data.nodata=fill" in message and "data.nodata=mask" in message and "\n" not in message


def test_fill_and_mask_replace_missing_values_by_the_channel_mean(nan_cubes, tmp_path):
    root, cubes = nan_cubes
    mean, std = np.full(6, 0.3), np.full(6, 0.1)
    stats = save_channel_stats(ChannelStats(mean, std, np.full(6, 80)), tmp_path / "s.json")
    common = dict(crop_size=(8, 10), split="all", stats_file=stats, channel_range=(1, 6))
    filled = HyperspectralDataset(root, nodata="fill", **common)[1]
    masked = HyperspectralDataset(root, nodata="mask", **common)[1]
    bad = ~np.isfinite(cubes[1][1:6])
    assert "valid" not in filled and bad.sum() == 4
    image = filled["image"].numpy()
    assert np.isfinite(image).all() and (image[bad] == 0).all()  # 0 = the channel mean after normalization
    expected = (cubes[1][1:6] - np.float32(0.3)) * np.float32(1 / 0.1)
    np.testing.assert_array_equal(image[~bad], expected[~bad])  # the other values untouched
    torch.testing.assert_close(masked["image"], filled["image"], rtol=0, atol=0)
    np.testing.assert_array_equal(masked["valid"].numpy(), ~bad)
    clean = HyperspectralDataset(root, nodata="mask", **common)[0]
    assert clean["valid"].all()


# ------------------------------------------------------------------------------------------------
# compute_stats dropped NaN without a word; a constant channel gave std = 0.
# ------------------------------------------------------------------------------------------------


def test_compute_stats_counts_reports_and_records_missing_values(tmp_path, capsys):
    root = tmp_path / "envi"
    cubes = [_int_cube(seed=s, holes=((0, 0), (3, 4)) if s == 1 else ()) for s in range(3)]
    cubes[2][5, 7, 9] = NODATA  # one no-data value in one channel of a third cube
    for i, cube in enumerate(cubes):
        write_envi_cube(root / f"t{i}.hdr", cube, data_ignore_value=NODATA, reflectance_scale_factor=SCALE)
    out = tmp_path / "stats.json"
    assert stats_tool.main(["--data-path", str(root), "--out", str(out), "--split", "all", "--quiet"]) == 0
    report = capsys.readouterr().err
    assert "missing values (left out of the statistics): 0 NaN/inf and 13 equal to the files' no-data value" in report
    assert f"{root / 't1.hdr'}: 0 NaN/inf, 12 no-data; first in channel 0 (2 values)" in report
    stats = load_channel_stats(out)
    assert stats.nodata_count.tolist() == [2, 2, 2, 2, 2, 3] and stats.nonfinite_count.tolist() == [0] * 6
    assert stats.count.tolist() == [238, 238, 238, 238, 238, 237]
    # the moments are those of the valid values, in reflectance (divided by the scale factor)
    values = np.stack([c.astype(np.float32) / np.float32(SCALE) for c in cubes], axis=1).reshape(6, -1).astype(float)
    values[np.stack(cubes, axis=1).reshape(6, -1) == NODATA] = np.nan
    # float64 streaming moments vs numpy's two-pass result over the same float32 values
    np.testing.assert_allclose(stats.mean, np.nanmean(values, axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, np.nanstd(values, axis=1), rtol=1e-9)
    raw = json.loads(out.read_text())
    assert [m["stem"] for m in raw["coverage"]["missing"]] == ["t1", "t2"]
    assert raw["coverage"]["missing"][1] == {"stem": "t2", "path": str(root / "t2.hdr"), "nonfinite": 0, "nodata": 1,
                                             "first_channel": 5, "first_channel_count": 1}


def test_constant_channel_is_refused_unless_allowed_and_refused_when_loaded(tmp_path, capsys):
    root = tmp_path / "d"
    for i in range(2):
        cube = _reflectance(seed=i).astype(np.float32)
        cube[3] = 0.25  # a dead band
        write_hdf5_cube(root / f"c{i}.h5", cube)
    out = tmp_path / "stats.npz"
    assert stats_tool.main(["--data-path", str(root), "--out", str(out), "--split", "all", "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: channel 3 is constant (std = 0 over 160 values, all 0.25)")
    assert "--allow-constant-channels" in lines[0] and not out.exists()
    assert stats_tool.main(["--data-path", str(root), "--out", str(out), "--split", "all", "--quiet",
                            "--allow-constant-channels"]) == 0
    stats = load_channel_stats(out)
    assert stats.std[3] == 1.0 and stats.constant_channels == (3,) and (stats.std[[0, 1, 2, 4, 5]] != 1.0).all()
    bad = save_channel_stats(ChannelStats(np.ones(6), np.array([1, 1, 0, 1, 1, 1.0]), np.full(6, 5)), tmp_path / "b.json")
    with pytest.raises(ConstantChannelError, match=r"b\.json: channel 2 has std = 0 \(a constant band\)"):
        load_channel_stats(bad)
    with pytest.raises(ConstantChannelError, match=r"b\.json: channel 2"):
        HyperspectralDataset(root, crop_size=(4, 4), split="all", stats_file=bad)


# ------------------------------------------------------------------------------------------------
# Splits: the hash covered the extension; nothing could name validation files.
# ------------------------------------------------------------------------------------------------


def _split_by_file_name(names, val_fraction):
    """The validation set as it was chosen before: sha1 of the whole file name."""
    n = len(names)
    n_val = min(max(int(round(n * val_fraction)), 1), n - 1)
    return sorted(sorted(names, key=lambda name: hashlib.sha1(f"0:{name}".encode()).hexdigest())[:n_val])


def test_hash_split_is_the_same_in_every_format_and_unchanged_for_h5(tmp_path):
    cube = _int_cube("uint16", holes=())
    names = [f"cube_{i:05d}" for i in range(24)]
    for ext in (".h5", ".hdf5"):
        for name in names:
            write_hdf5_cube(tmp_path / ext[1:] / (name + ext), cube)
    for name in names:
        write_envi_cube(tmp_path / "envi" / f"{name}.hdr", cube)
    val = {fmt: sorted(p.stem for p in split_collection(tmp_path / fmt, options=SplitOptions(0.2)).val)
           for fmt in ("h5", "hdf5", "envi")}
    assert val["h5"] == val["hdf5"] == val["envi"]
    # the .h5 split of make demo's 24 cubes, as it was: the demo's validation set is unchanged
    assert val["h5"] == ["cube_00004", "cube_00014", "cube_00015", "cube_00016", "cube_00019"]
    for n, fraction in ((12, 0.2), (24, 0.1), (7, 0.5)):
        files = [f"tile_{i}.h5" for i in range(n)]
        got = split_collection([Path(f) for f in files], options=SplitOptions(fraction)).val
        assert sorted(p.name for p in got) == _split_by_file_name(files, fraction)
    assert split_key("a/x.img.hdr") == split_key("x.hdf5") == split_key("x.H5") == "x.h5"


def test_validation_and_test_files_by_list_glob_and_folder(tmp_path):
    root, other = tmp_path / "cubes", tmp_path / "held_out"
    cube = _int_cube("uint16", holes=())
    for i in range(8):
        write_envi_cube(root / f"tile_{i}.hdr", cube)
    write_envi_cube(other / "tile_9.hdr", cube)
    stems = lambda paths: [p.stem for p in paths]  # noqa: E731

    by_glob = split_collection(root, options=SplitOptions(val_files=["tile_[01]", "tile_2.img"], test_files=["tile_7*"]))
    assert stems(by_glob.val) == ["tile_0", "tile_1", "tile_2"] and stems(by_glob.test) == ["tile_7"]
    assert stems(by_glob.train) == ["tile_3", "tile_4", "tile_5", "tile_6"]
    by_folder = split_collection(root, options=SplitOptions(val_files=[str(other)], test_files=["tile_0.hdr"]))
    assert stems(by_folder.val) == ["tile_9"] and stems(by_folder.test) == ["tile_0"]
    assert stems(by_folder.train) == [f"tile_{i}" for i in range(1, 8)]
    hashed = split_collection(root, options=SplitOptions(0.25, test_files=["tile_3"]))
    assert len(hashed.val) == 2 and "tile_3" not in stems(hashed.val + hashed.train)
    ds = HyperspectralDataset(root, crop_size=(4, 4), split="val", val_files=[str(other)])
    assert stems(ds.files) == ["tile_9"] and ds.crop_mode == "fixed"
    with pytest.raises(SplitError, match=r"data.val_files entry 'tile_x\*' matches no cube"):
        split_collection(root, options=SplitOptions(val_files=["tile_x*"]))
    with pytest.raises(SplitError, match="tile_1.hdr is named by both data.val_files and data.test_files"):
        split_collection(root, options=SplitOptions(val_files=["tile_1"], test_files=["tile_*1"]))


def test_a_split_that_leaves_evaluation_empty_names_the_options(tmp_path):
    write_hdf5_cube(tmp_path / "one" / "only.h5", _int_cube("uint16", holes=()))
    for root, options, why in ((tmp_path / "one", SplitOptions(0.2), "there is 1 cube, which training needs"),
                               (tmp_path / "one", SplitOptions(0.0), "data.val_fraction=0 holds out no cube")):
        with pytest.raises(SplitError) as info:
            split_collection(root, options=options).require("val", fix="or train without evaluation with --eval-iters 0")
        message = str(info.value)
        assert message.startswith(f"the validation split is empty: {why}; set data.val_fraction > 0")
        assert "data.val_files" in message and message.endswith("--eval-iters 0")
    with pytest.raises(SplitError, match="the validation split is empty"):
        HyperspectralDataset(tmp_path / "one", crop_size=(4, 4), split="val")


# ------------------------------------------------------------------------------------------------
# compute_stats used all files and val_fraction 0.1; nothing checked it against the run's split.
# ------------------------------------------------------------------------------------------------


def test_compute_stats_covers_the_runs_training_split_and_records_it(tmp_path):
    root = tmp_path / "cubes"
    for i in range(10):
        write_hdf5_cube(root / f"cube_{i:05d}.h5", _int_cube("uint16", seed=i, holes=()))
    train = HyperspectralDataset(root, crop_size=(4, 4), split="train", val_fraction=0.2).files
    default = tmp_path / "default.json"
    assert stats_tool.main(["--data-path", str(root), "--out", str(default), "--quiet"]) == 0
    coverage = load_channel_stats(default).coverage
    assert coverage.split == "train" and sorted(coverage.files) == sorted(p.stem for p in train)
    assert coverage.split_options["val_fraction"] == 0.2  # configs/hyperspectral/tiny.yaml's value
    # --config: the run's own options, overrides included; --out defaults to data.stats_file
    out = tmp_path / "from_config.npz"
    assert stats_tool.main(["--config", str(REPO / "configs/hyperspectral/tiny.yaml"), f"data.data_path={root}",
                            f"data.stats_file={out}", "data.val_files=['cube_0000[12]']", "--quiet"]) == 0
    coverage = load_channel_stats(out).coverage
    assert len(coverage.files) == 8 and not {"cube_00001", "cube_00002"} & set(coverage.files)
    split = split_collection(root, options=SplitOptions(val_files=["cube_0000[12]"]))
    assert coverage_warning(load_channel_stats(out), split, out, "fix") is None
    everything = tmp_path / "all.json"
    assert stats_tool.main(["--data-path", str(root), "--out", str(everything), "--split", "all", "--quiet"]) == 0
    warning = coverage_warning(load_channel_stats(everything), split, everything, "recompute it")
    assert warning == (f"data.stats_file '{everything}' covers 10 cubes including 2 of the run's 2 validation cubes "
                       "(e.g. cube_00001): the normalization has seen held-out data; recompute it")


def test_compute_stats_bad_options_give_one_error_line(tmp_path, capsys):
    write_hdf5_cube(tmp_path / "d" / "a.h5", _int_cube("uint16", holes=()))
    out = str(tmp_path / "s.json")
    for argv, expect in ((["--data-path", str(tmp_path / "d")], "--out is not given"),
                         (["--data-path", str(tmp_path / "nope"), "--out", out], "data path does not exist"),
                         (["--data-path", str(tmp_path / "d"), "--out", out, "--val-files", "b*"],
                          "data.val_files entry 'b*' matches no cube"),
                         (["--config", str(REPO / "configs/hyperspectral/tiny.yaml"), "data.nodata=skip", "--out", out],
                          "data.nodata='skip' is not one of error, fill, mask")):
        assert stats_tool.main([*argv, "--quiet"]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert not Path(out).exists()


# ------------------------------------------------------------------------------------------------
# The synthetic generator writes such cubes.
# ------------------------------------------------------------------------------------------------


def test_synthetic_cubes_with_nodata_and_scale_factor(tmp_path):
    out = tmp_path / "s"
    assert synth.main(["--out", str(out), "--num-cubes", "2", "--channels", "5", "--height", "10", "--width", "10",
                       "--dtype", "int16", "--scale-factor", "10000", "--nodata-fraction", "0.1",
                       "--nodata-value", "-9999", "--nodata-attribute", "nodata", "--envi"]) == 0
    h5 = HDF5CubeReader(out / "cube_00001.h5")
    envi = ENVICubeReader(out / "envi" / "cube_00001.hdr")
    assert (h5.nodata_value, h5.scale_factor, envi.nodata_value, envi.scale_factor) == (-9999, 1e4, -9999, 1e4)
    a, b = h5.read_channels(0, 5), envi.read_channels(0, 5)
    np.testing.assert_array_equal(a, b)
    assert np.isnan(a).all(axis=0).sum() == 10 and np.isnan(a).sum() == 50  # 10 whole pixels
    assert 0.0 <= np.nanmin(a) and np.nanmax(a) < 1.0  # reflectance
    clean = synth.make_cube(5, 10, 10, seed=int(np.random.SeedSequence([0, 1]).generate_state(1)[0]), dtype="int16")
    finite = ~np.isnan(a)
    np.testing.assert_array_equal(a[finite], clean.cube.astype(np.float32)[finite] / np.float32(1e4))
    with pytest.raises(SystemExit):
        synth.parse_args(["--out", str(out), "--nodata-fraction", "0.1"])  # uint16 holes need a value
