"""Readers and TFDS builders of the real datasets, on tiny fixtures written in each dataset's
native format (tests/real_fixtures.py), plus the real CAVE scenes in shared/data when present."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_fixtures as F  # noqa: E402

from jaxspec import data  # noqa: E402
from jaxspec.data import readers as R  # noqa: E402
from jaxspec.physics import get_srf  # noqa: E402

SHARED_DATA = Path(os.environ.get("JAXSPEC_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
W31 = np.arange(400.0, 701.0, 10.0)
W31_420 = np.arange(420.0, 721.0, 10.0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _build(name, tmp_path, manual, config=None):
    return data.builder(name, data_dir=tmp_path / "tfds", manual_dir=manual, config=config)


def _all(b, split):
    src = b.as_data_source(split=split)
    return [src[i] for i in range(len(src))]


def _names(examples):
    return [e["name"].decode() if isinstance(e["name"], bytes) else e["name"] for e in examples]


# =============================================================================== readers
def test_read_mat_v73_orientation_and_v5(tmp_path, rng):
    cube = rng.random((5, 7, 3)).astype(np.float32)
    p = F.write_mat_v73(tmp_path / "a.mat", {"cube": cube, "bands": np.arange(3.0)})
    import h5py
    assert h5py.is_hdf5(p) and R.is_mat_v73(p)
    with h5py.File(p) as f:
        assert f["cube"].shape == (3, 7, 5)  # MATLAB column-major on disk
    out = R.read_mat(p, "cube", optional=["bands", "absent"])
    assert set(out) == {"cube", "bands"}
    np.testing.assert_array_equal(out["cube"], cube)
    with R.open_mat_array(p, "cube") as m:
        assert m.shape == (5, 7, 3)
        np.testing.assert_array_equal(m[1:4, 2:6, :], cube[1:4, 2:6])
    q = F.write_mat_v5(tmp_path / "b.mat", {"ref": cube})
    assert not R.is_mat_v73(q)
    np.testing.assert_array_equal(R.read_mat(q, ["ref"])["ref"], cube)
    with pytest.raises(ValueError, match=r"'nope'.*present: \['bands', 'cube'\]"):
        R.read_mat(p, "nope")
    with pytest.raises(ValueError, match="b.mat.*not found"):
        R.read_mat(q, "nope")


def test_png16_grey_multichannel_and_collapse(tmp_path, rng):
    g = (rng.random((9, 11)) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(R.read_png16(F.write_png16_grey(tmp_path / "g.png", g)), g)
    for c in (2, 3, 4):  # every PNG row filter is used by the writer
        img = (rng.random((11, 13, c)) * 65535).astype(np.uint16)
        got = R.read_png16(F.write_png16_multichannel(tmp_path / f"m{c}.png", img))
        np.testing.assert_array_equal(got, img)  # all 16 bits (Pillow would keep only 8)
    grey3 = np.repeat(g[..., None], 3, axis=-1)
    np.testing.assert_allclose(R.collapse_channels(grey3), g, rtol=1e-12)
    np.testing.assert_array_equal(R.collapse_channels(np.dstack([g, g * 0])), g)


def test_rgb_image_channel_order(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[..., 0] = 250  # pure red
    img[..., 2] = 10
    for ext in ("jpg", "png", "bmp"):
        got = R.read_rgb_image(F.write_rgb(tmp_path / f"r.{ext}", img))
        assert got.shape == (16, 16, 3) and got.dtype == np.uint8
        assert got[..., 0].mean() > 240 and got[..., 2].mean() < 20, ext


def test_exr_wavelengths_and_display_window(tmp_path, rng):
    cube = rng.random((6, 8, 31)).astype(np.float32)
    p = F.write_exr(tmp_path / "k.exr", cube[..., ::-1], W31_420[::-1],
                    extra={"R": cube[..., 0], "G": cube[..., 1], "B": cube[..., 2]})
    got, wl, others = R.read_exr(p)
    np.testing.assert_array_equal(wl, W31_420)  # sorted by wavelength
    np.testing.assert_array_equal(got, cube)
    assert sorted(others) == ["B", "G", "R"]
    assert R.parse_wavelength_nm("S0.420,50nm") == 420.5
    assert R.parse_wavelength_nm("400-410nm") == 405.0
    assert R.parse_wavelength_nm("R") is None


def test_geotiff_and_envi(tmp_path, rng):
    t = (rng.random((8, 8, 224)) * 20000 - 5000).astype(np.int16)
    arr, nodata = R.read_geotiff_int16(F.write_geotiff_int16(tmp_path / "t.tif", t))
    np.testing.assert_array_equal(arr, t)
    assert nodata == -32768
    e = (rng.random((6, 5, 4)) * 1000).astype(np.uint16)
    for il, bo in (("bsq", 0), ("bil", 1), ("bip", 0)):
        hdr = F.write_envi(tmp_path / f"e{il}.hdr", e, [0.4, 0.5, 0.6, 0.7], interleave=il,
                           byte_order=bo, units="Micrometers")
        im = R.read_envi(hdr)
        np.testing.assert_array_equal(np.asarray(im.data), e)
        np.testing.assert_allclose(im.wavelengths, [400, 500, 600, 700])


def test_readers_missing_and_corrupt_files(tmp_path, rng):
    missing = tmp_path / "absent.bin"
    for fn in (lambda p: R.read_mat(p, "x"), R.read_png16, R.read_rgb_image, R.read_exr,
               R.read_geotiff_int16, R.read_envi):
        with pytest.raises(FileNotFoundError, match="absent.bin"):
            fn(missing)
    cube = rng.random((8, 8, 31)).astype(np.float32)
    bad = {
        "v73.mat": lambda p: R.read_mat(F.truncate(F.write_mat_v73(p, {"cube": cube})), "cube"),
        "v5.mat": lambda p: R.read_mat(F.truncate(F.write_mat_v5(p, {"cube": cube})), "cube"),
        "g.png": lambda p: R.read_png16(F.truncate(F.write_png16_grey(
            p, (rng.random((64, 64)) * 6e4).astype(np.uint16)))),
        "m.png": lambda p: R.read_png16(F.truncate(F.write_png16_multichannel(
            p, (rng.random((32, 32, 3)) * 6e4).astype(np.uint16)))),
        "x.jpg": lambda p: R.read_rgb_image(F.truncate(F.write_rgb(
            p, (rng.random((64, 64, 3)) * 255).astype(np.uint8)))),
        "k.exr": lambda p: R.read_exr(F.truncate(F.write_exr(p, cube, W31_420))),
        "t.tif": lambda p: R.read_geotiff_int16(F.truncate(F.write_geotiff_int16(
            p, (cube * 1e4).astype(np.int16)))),
        "e.dat": lambda p: R.read_envi(F.truncate(F.write_envi(
            p.with_suffix(".hdr"), (cube * 1e4).astype(np.uint16)).with_suffix(".dat"))
            .with_suffix(".hdr")),
        "junk.mat": lambda p: (p.write_bytes(b"not a mat file at all" * 10), R.read_mat(p, "x")),
    }
    for fname, make in bad.items():
        with pytest.raises(ValueError, match=fname.replace(".", r"\.")):
            make(tmp_path / fname)


# =============================================================================== builders
def _arad_fixture(root, rng, ids=(1, 2, 314, 901, 902), spec=("Train_spectral", "Valid_spectral")):
    cubes = {}
    for i in ids:
        sub = 0 if i <= 900 else 1
        cube = F.smooth_cube(rng, 12, 16, 31).astype(np.float32)
        cubes[i] = cube
        F.write_mat_v73(root / spec[sub] / f"ARAD_1K_{i:04d}.mat",
                        {"cube": cube, "bands": W31, "norm_factor": np.array([[3.5]])})
        rgb = np.zeros((12, 16, 3), np.uint8)
        rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 20
        F.write_rgb(root / ("Train_RGB", "Valid_RGB")[sub] / f"ARAD_1K_{i:04d}.jpg", rgb, quality=95)
    return cubes


def test_arad1k_builder(tmp_path, rng):
    cubes = _arad_fixture(tmp_path / "m", rng)
    b = _build("arad1k", tmp_path, tmp_path / "m")
    mod = data.load_builder_module("arad1k")
    assert mod.EVAL_CROP_BORDER == mod.Builder.EVAL_CROP_BORDER == 128
    assert b.info.metadata["eval_crop_border"] == 128
    assert len(mod.TRAIN_IDS) == 897 and len(mod.VALID_IDS) == 50
    train, val = _all(b, "train"), _all(b, "validation")
    assert _names(train) == ["ARAD_1K_0001", "ARAD_1K_0002"]  # 0314 excluded (MST++ list)
    assert _names(val) == ["ARAD_1K_0901", "ARAD_1K_0902"]
    ex = train[0]
    assert ex["hsi"].shape == (12, 16, 31) and ex["hsi"].dtype == np.float32
    np.testing.assert_array_equal(ex["hsi"], cubes[1])  # v7.3 .T orientation
    np.testing.assert_array_equal(ex["bands"], W31.astype(np.float32))
    assert ex["rgb"].shape == (12, 16, 3) and ex["rgb"].dtype == np.float32
    assert abs(ex["rgb"][..., 0].mean() - 200) < 4 and abs(ex["rgb"][..., 2].mean() - 20) < 4
    # the common schema feeds the grain pipeline unchanged
    batch = next(data.make_loader(b.as_data_source(split="train"), batch_size=2, crop=8, seed=0))
    assert batch["rgb"].shape == (2, 8, 8, 3) and batch["hsi"].shape == (2, 8, 8, 31)
    assert "tensorflow" not in sys.modules


def test_arad1k_mstpp_merged_layout(tmp_path, rng):
    _arad_fixture(tmp_path / "m" / "ARAD_1K", rng, ids=(3, 950),
                  spec=("Train_Spec", "Train_Spec"))
    for p in (tmp_path / "m" / "ARAD_1K" / "Valid_RGB").glob("*.jpg"):
        p.rename(tmp_path / "m" / "ARAD_1K" / "Train_RGB" / p.name)
    b = _build("arad1k", tmp_path, tmp_path / "m")
    assert _names(_all(b, "train")) == ["ARAD_1K_0003"]
    assert _names(_all(b, "validation")) == ["ARAD_1K_0950"]


def test_arad1k_errors(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="manual_dir does not exist"):
        _build("arad1k", tmp_path, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)arad1k.*empty.*Train_Spec"):
        _build("arad1k", tmp_path, tmp_path / "empty")
    m = tmp_path / "m"
    F.write_mat_v73(m / "Train_Spec" / "ARAD_1K_0001.mat", {"cube": np.ones((4, 4, 31))})
    with pytest.raises(FileNotFoundError, match=r"(?s)an RGB folder.*Train_RGB"):
        _build("arad1k", tmp_path / "a", m)
    F.write_rgb(m / "Train_RGB" / "ARAD_1K_0001.jpg", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="validation scene"):
        _build("arad1k", tmp_path / "b", m)
    _arad_fixture(m, rng, ids=(901,), spec=("Train_Spec", "Valid_Spec"))
    F.truncate(m / "Valid_Spec" / "ARAD_1K_0901.mat")
    with pytest.raises(ValueError, match="ARAD_1K_0901.mat"):
        _build("arad1k", tmp_path / "c", m)


def test_ntire2020_builder_both_tracks(tmp_path, rng):
    m = tmp_path / "m" / "NTIRE2020"
    cubes = {}
    for split, ids in (("Train", (1, 2)), ("Validation", (451,))):
        for i in ids:
            cube = F.smooth_cube(rng, 10, 14, 31).astype(np.float32)
            cubes[i] = cube
            writer = F.write_mat_v5 if i != 2 else F.write_mat_v73  # both kinds occur
            writer(m / f"NTIRE2020_{split}_Spectral" / f"ARAD_HS_{i:04d}.mat",
                   {"cube": cube, "bands": W31, "norm_factor": np.array([[1.0]])})
            rgb = (rng.random((10, 14, 3)) * 255).astype(np.uint8)
            F.write_rgb(m / f"NTIRE2020_{split}_Clean" / f"ARAD_HS_{i:04d}_clean.png", rgb)
            F.write_rgb(m / f"NTIRE2020_{split}_RealWorld" / f"ARAD_HS_{i:04d}_RealWorld.jpg", rgb)
            cubes[f"rgb{i}"] = rgb
    b = _build("ntire2020", tmp_path, tmp_path / "m")
    train = _all(b, "train")
    assert _names(train) == ["ARAD_HS_0001", "ARAD_HS_0002"]
    np.testing.assert_array_equal(train[1]["hsi"], cubes[2])
    np.testing.assert_array_equal(train[0]["rgb"], cubes["rgb1"].astype(np.float32))  # lossless
    assert _names(_all(b, "validation")) == ["ARAD_HS_0451"]
    b2 = _build("ntire2020", tmp_path, tmp_path / "m", config="real_world")
    rw = _all(b2, "train")[0]["rgb"]
    assert rw.shape == (10, 14, 3) and 0 <= rw.min() and rw.max() <= 255
    for p in (m / "NTIRE2020_Validation_RealWorld").iterdir():
        p.unlink()
    (m / "NTIRE2020_Validation_RealWorld").rmdir()
    with pytest.raises(FileNotFoundError, match="NTIRE2020_Validation_RealWorld/"):
        _build("ntire2020", tmp_path / "x", tmp_path / "m", config="real_world")


def _cave_fixture(root, rng, scenes, nested=True, size=8):
    cubes = {}
    for s in scenes:
        folder = root / f"{s}_ms" / f"{s}_ms" if nested else root / f"{s}_ms"
        cube = (F.smooth_cube(rng, size, size, 31) * 65535).astype(np.uint16)
        cubes[s] = cube
        for k in range(31):
            band = cube[..., k]
            if s == "watercolors":  # the multi-channel quirk: grey replicated in RGB + alpha
                F.write_png16_multichannel(folder / f"{s}_ms_{k + 1:02d}.png",
                                           np.dstack([band, band, band, np.full_like(band, 65535)]))
            else:
                F.write_png16_grey(folder / f"{s}_ms_{k + 1:02d}.png", band)
        (folder / "Thumbs.db").write_bytes(b"\x00junk")
        F.write_rgb(folder / f"{s}_RGB.bmp", np.zeros((size, size, 3), np.uint8))
    return cubes


def test_cave_builder_layouts_split_and_quirks(tmp_path, rng):
    m = tmp_path / "m" / "complete_ms_data"
    scenes = ["watercolors", "balloons", "cd", "beads", "face", "clay", "cloth", "feathers"]
    cubes = _cave_fixture(m, rng, scenes[:5], nested=True)
    cubes.update(_cave_fixture(m, rng, scenes[5:], nested=False))
    mod = data.load_builder_module("cave")
    assert len(mod.SCENES) == 32 and list(mod.SCENES) == sorted(mod.SCENES)
    b = _build("cave", tmp_path, tmp_path / "m")
    train, test = _all(b, "train"), _all(b, "test")
    alpha = sorted(scenes)
    assert _names(train) == alpha[:5] and _names(test) == alpha[5:]  # round(8 * 20 / 32) = 5
    for ex in train + test:
        name = _names([ex])[0]
        np.testing.assert_allclose(ex["hsi"], cubes[name] / 65535.0, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(ex["bands"], W31.astype(np.float32))
        srf = get_srf("cie1964", W31)
        np.testing.assert_allclose(ex["srf"], srf, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ex["rgb"], ex["hsi"] @ srf, rtol=1e-4, atol=1e-6)
    bf = _build("cave", tmp_path, tmp_path / "m", config="fusion")
    assert _names(_all(bf, "train")) == alpha[:4] and _names(_all(bf, "test")) == alpha[4:]
    # a missing band names the file; a corrupt band names the file
    (m / "clay_ms" / "clay_ms_17.png").unlink()
    with pytest.raises(FileNotFoundError, match="clay_ms_17.png"):
        _build("cave", tmp_path / "x", tmp_path / "m")
    F.truncate(m / "cloth_ms" / "cloth_ms_03.png", keep=60)
    (m / "clay_ms").rename(tmp_path / "clay_moved")
    with pytest.raises(ValueError, match="cloth_ms_03.png"):
        _build("cave", tmp_path / "y", tmp_path / "m")


def test_icvl_builder(tmp_path, rng):
    m = tmp_path / "m"
    rads = {}
    for n in ("BGU_0522-1203", "eve_0331-1551", "park_0001", "lab_0002"):
        rad = (F.smooth_cube(rng, 10, 9, 31) * 4095).astype(np.float64)
        rads[n] = rad
        F.write_mat_v73(m / "sub" / f"{n}.mat", {"rad": rad, "bands": W31,
                                                "rgb": np.zeros((10, 9, 3))})
    b = _build("icvl", tmp_path, m)
    test, train = _all(b, "test"), _all(b, "train")
    assert _names(test) == ["BGU_0522-1203", "eve_0331-1551"]
    assert _names(train) == ["lab_0002", "park_0001"]
    ex = test[0]
    assert ex["hsi"].shape == (10, 9, 31)
    np.testing.assert_allclose(ex["hsi"], rads["BGU_0522-1203"] / 4095.0, rtol=1e-6)
    assert 0 < ex["hsi"].max() <= 1.0
    np.testing.assert_allclose(ex["rgb"], ex["hsi"] @ ex["srf"], rtol=1e-4, atol=1e-6)


def test_harvard_builder_mask_norm_calib(tmp_path, rng):
    m = tmp_path / "m"
    refs = {}
    for k in range(5):
        ref = F.smooth_cube(rng, 8, 10, 31) * 0.03
        lbl = np.ones((8, 10), np.uint8)
        lbl[:2, :3] = 0
        ref[0, 0, 5] = 0.5  # a hot pixel inside the invalid region must not set the scale
        refs[f"img{k}"] = (ref, lbl)
        F.write_mat_v5(m / "CZ_hsdb" / f"img{k}.mat", {"ref": ref, "lbl": lbl})
    calib = np.linspace(0.5, 1.5, 31)
    (m / "CZ_hsdb" / "calib.txt").write_text("\n".join(f"{v:.6f}" for v in calib))
    b = _build("harvard", tmp_path, m)
    test, train = _all(b, "test"), _all(b, "train")
    assert _names(test) == ["CZ_hsdb/img4"] and len(train) == 4
    ex = test[0]
    ref, lbl = refs["img4"]
    x = ref * np.round(calib, 6)
    np.testing.assert_allclose(ex["hsi"], x / x[lbl.astype(bool)].max(), rtol=1e-5)
    np.testing.assert_array_equal(ex["label"], lbl.astype(np.int32))
    np.testing.assert_array_equal(ex["bands"], W31_420.astype(np.float32))
    assert ex["label"].dtype == np.int32 and ex["srf"].shape == (31, 3)


def test_kaist_builder(tmp_path, rng):
    m = tmp_path / "m"
    cubes = {}
    for k in (1, 2, 3, 4):
        cube = F.smooth_cube(rng, 6, 7, 31).astype(np.float32)
        cubes[f"scene{k:02d}"] = cube
        F.write_exr(m / f"scene{k:02d}_reflectance.exr", cube, W31_420,
                    extra={"R": cube[..., 20], "G": cube[..., 12], "B": cube[..., 4]})
    b = _build("kaist", tmp_path, m)
    test, train = _all(b, "test"), _all(b, "train")
    assert _names(test) == ["scene01"] and _names(train) == ["scene02", "scene03", "scene04"]
    np.testing.assert_array_equal(test[0]["hsi"], cubes["scene01"])
    np.testing.assert_array_equal(test[0]["bands"], W31_420.astype(np.float32))
    np.testing.assert_allclose(test[0]["srf"], get_srf("cie1964", W31_420), rtol=1e-5, atol=1e-7)


def _chikusei_module_and_config(**kw):
    mod = data.load_builder_module("chikusei")
    return mod, mod.ChikuseiConfig(name="mini", crop=(3, 3 + 8 + 8, 2, 2 + 16), test_size=4,
                                   patch_size=8, **kw)


def _prepare_direct(mod, cfg, tmp_path, manual):
    import tensorflow_datasets as tfds
    b = mod.Builder(data_dir=str(tmp_path / "tfds"), config=cfg, file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
                           file_format="array_record")
    return b


@pytest.mark.parametrize("fmt", ["mat", "envi"])
def test_chikusei_sr_protocol(tmp_path, rng, fmt):
    mod, cfg = _chikusei_module_and_config()
    std = mod.Builder.BUILDER_CONFIGS[0]
    assert std.crop == (106, 2410, 143, 2191)  # MATLAB img(107:2410, 144:2191, :)
    assert len(mod.tiles(std, "test")) == 4 and len(mod.tiles(std, "train")) == 56
    img = (F.smooth_cube(rng, 22, 20, 128) * 5000).astype(np.uint16)
    img[0, 0, 0] = 60000  # outside the crop: must not set the scale
    m = tmp_path / "m"
    if fmt == "mat":
        F.write_mat_v73(m / "Hyperspec_Chikusei_MATLAB" / "Chikusei_MATLAB" / mod.MAT_NAME,
                        {"chikusei": img})
        bands = mod.DEFAULT_BANDS
    else:
        bands = np.linspace(363, 1018, 128)
        F.write_envi(m / "Chikusei_ENVI" / mod.HDR_NAME, img, bands, interleave="bsq")
    b = _prepare_direct(mod, cfg, tmp_path, m)
    crop = img[3:19, 2:18].astype(np.float64)
    crop /= crop.max()
    test, train = _all(b, "test"), _all(b, "train")
    assert _names(test) == ["test_0", "test_1", "test_2", "test_3"]
    np.testing.assert_allclose(test[2]["hsi"], crop[0:4, 8:12], rtol=1e-6)
    assert _names(train) == ["train_r0004_c0000", "train_r0004_c0008"]
    np.testing.assert_allclose(train[1]["hsi"], crop[4:12, 8:16], rtol=1e-6)
    np.testing.assert_allclose(train[0]["bands"], bands, atol=1e-3)  # header has 3 decimals
    assert train[0]["hsi"].shape == (8, 8, 128)
    assert np.isclose(max(e["hsi"].max() for e in test + train), 1.0)  # crop max -> 1
    srf = train[0]["srf"]
    assert np.all(srf[np.asarray(bands) > 830] == 0) and np.isclose(srf[:, 1].sum(), 1.0)


def test_chikusei_errors(tmp_path, rng):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"(?s)chikusei.*HyperspecVNIR_Chikusei_20140729"):
        _build("chikusei", tmp_path, tmp_path / "empty")
    mod, cfg = _chikusei_module_and_config()
    m = tmp_path / "m"
    F.write_mat_v73(m / mod.MAT_NAME, {"chikusei": np.ones((10, 10, 128), np.float32)})
    with pytest.raises(ValueError, match="cannot hold the crop"):
        _prepare_direct(mod, cfg, tmp_path, m)


def test_hyspecnet11k_builder(tmp_path, rng):
    mod = data.load_builder_module("hyspecnet11k")
    assert mod.N_BANDS == 202 and len(mod.BANDS) == 202
    assert 126 not in mod.VALID_BANDS and 166 not in mod.VALID_BANDS and 167 in mod.VALID_BANDS
    base = tmp_path / "m" / "hyspecnet-11k"
    tile = "ENMAP01-____L2A-DT0000004950_20221103T162438Z_001_V010110_20221118T145147Z"
    raws, rels = {}, []
    for k in range(4):
        patch = f"Y0146027{k}_X05670694"
        raw = (rng.random((6, 6, 224)) * 12000 - 1000).astype(np.int16)
        raw[0, 0, 3] = -32768
        d = base / "patches" / tile / f"{tile}-{patch}"
        F.write_geotiff_int16(d / f"{tile}-{patch}-SPECTRAL_IMAGE.TIF", raw)
        raws[f"{tile}-{patch}"] = raw
        rels.append(f"{tile}/{tile}-{patch}/{tile}-{patch}-DATA.npy")
    for diff, parts in (("easy", (rels[:2], rels[2:3], rels[3:])),
                        ("hard", (rels[1:3], rels[3:], rels[:1]))):
        for csv, rows in zip(("train.csv", "val.csv", "test.csv"), parts):
            (base / "splits" / diff).mkdir(parents=True, exist_ok=True)
            (base / "splits" / diff / csv).write_text("\n".join(rows) + "\n")
    b = _build("hyspecnet11k", tmp_path, tmp_path / "m")
    train, val = _all(b, "train"), _all(b, "validation")
    assert len(train) == 2 and len(val) == 1 and len(_all(b, "test")) == 1
    ex = train[0]
    raw = raws[_names([ex])[0]]
    expect = np.clip(raw[..., list(mod.VALID_BANDS)].astype(np.float32), 0, 10000) / 10000
    np.testing.assert_allclose(ex["hsi"], expect, rtol=1e-6)
    assert ex["hsi"].shape == (6, 6, 202) and 0 <= ex["hsi"].min() and ex["hsi"].max() <= 1
    assert ex["label"][0, 0] == 0 and ex["label"].sum() == 35
    assert 418 < ex["bands"][0] < 419 and ex["bands"].max() > 2440
    bh = _build("hyspecnet11k", tmp_path, tmp_path / "m", config="hard")
    assert _names(_all(bh, "test")) == [rels[0].split("/")[1]]
    (base / "splits" / "hard" / "val.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"splits/hard/val\.csv"):
        _build("hyspecnet11k", tmp_path / "x", tmp_path / "m", config="hard")


ALL_REAL = {"arad1k": "Train_Spec", "ntire2020": "NTIRE2020_Train_Spectral",
            "cave": "_ms_01.png", "icvl": ".mat", "harvard": "CZ_hsdb",
            "kaist": "scene01_reflectance.exr", "chikusei": "HyperspecVNIR_Chikusei",
            "hyspecnet11k": "SPECTRAL_IMAGE.TIF"}


@pytest.mark.parametrize("name", sorted(ALL_REAL))
def test_empty_manual_dir_names_expected_layout(tmp_path, name):
    mod = data.load_builder_module(name)
    assert ALL_REAL[name] in mod.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"(?s){name}: manual_dir .*empty.*Expected layout"
                                                rf".*{ALL_REAL[name]}"):
        _build(name, tmp_path, tmp_path / "empty")
    (tmp_path / "wrong" / "unrelated").mkdir(parents=True)
    (tmp_path / "wrong" / "unrelated" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"(?s){name}: .* not found under manual_dir"):
        _build(name, tmp_path / "w", tmp_path / "wrong")


def test_corrupt_files_are_named(tmp_path, rng):
    cube = F.smooth_cube(rng, 6, 6, 31)
    m = tmp_path / "icvl"
    F.write_mat_v73(m / "BGU_0522-1203.mat", {"rad": cube * 4095})
    F.truncate(F.write_mat_v73(m / "park_0001.mat", {"rad": cube * 4095}))
    with pytest.raises(ValueError, match="park_0001.mat"):
        _build("icvl", tmp_path / "a", m)
    m = tmp_path / "harvard"
    F.write_mat_v5(m / "CZ_hsdb" / "imga1.mat", {"ref": cube, "lbl": np.ones((6, 6))})
    F.write_mat_v5(m / "CZ_hsdb" / "imgb2.mat", {"ref": cube[..., :30], "lbl": np.ones((6, 6))})
    with pytest.raises(ValueError, match=r"imgb2.mat: 'ref' has shape \(6, 6, 30\)"):
        _build("harvard", tmp_path / "b", m)
    m = tmp_path / "kaist"
    F.write_exr(m / "scene01_reflectance.exr", cube, W31_420)
    F.write_exr(m / "scene02_reflectance.exr", cube[..., :28], W31_420[:28])
    with pytest.raises(ValueError, match="scene02_reflectance.exr: 28 spectral channels"):
        _build("kaist", tmp_path / "c", m)


# =============================================================================== real data
CAVE_REAL = SHARED_DATA / "cave" / "complete_ms_data"


@pytest.mark.skipif(not CAVE_REAL.is_dir(), reason=f"real CAVE scenes not found at {CAVE_REAL}")
def test_cave_real_scenes_match_shipped_srgb(tmp_path):
    """Builds ``cave`` from the six real scenes and checks each reflectance cube, rendered
    through CIE 1931 2-degree CMFs under D65 to sRGB (colour-science), against CAVE's own
    ``*_RGB.bmp``: Pearson correlation > 0.98 over all pixels and channels."""
    import colour
    from PIL import Image

    b = _build("cave", tmp_path, CAVE_REAL)
    examples = _all(b, "train") + _all(b, "test")
    assert len(examples) == 6 and len(_all(b, "train")) == 4  # round(6 * 20 / 32) = 4
    shape = colour.SpectralShape(400, 700, 10)
    cmfs = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"].copy().align(shape).values
    d65 = colour.SDS_ILLUMINANTS["D65"].copy().align(shape).values
    for ex in examples:
        name = _names([ex])[0]
        hsi = ex["hsi"].astype(np.float64)
        assert hsi.shape == (512, 512, 31) and 0 <= hsi.min() and hsi.max() <= 1
        xyz = (hsi * d65) @ cmfs / (d65 @ cmfs[:, 1])
        srgb = np.clip(colour.XYZ_to_sRGB(xyz), 0, 1)
        bmp = next(CAVE_REAL.rglob(f"{name}_RGB.bmp"))
        ref = np.asarray(Image.open(bmp).convert("RGB"), np.float64) / 255.0
        corr = np.corrcoef(srgb.ravel(), ref.ravel())[0, 1]
        assert corr > 0.98, (name, corr)
