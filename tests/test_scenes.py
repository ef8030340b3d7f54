"""spectral_scenes: measured pools, the scene generator and the TFDS builder (tiny config)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jaxspec.data import scenes, spectra

TINY = scenes.SceneConfig(height=32, width=32)


@pytest.fixture(scope="module")
def pool():
    return spectra.reflectance_pool()


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
    import jaxspec.data as D
    return D.builder("spectral_scenes/tiny", data_dir=tmp_path_factory.mktemp("tfds"))


# ----------------------------------------------------------------------------- pools

def test_reflectance_pool_contents(pool):
    assert pool.spectra.shape == (len(pool), 31) and pool.spectra.dtype == np.float32
    assert pool.spectra.min() >= 0.0 and pool.spectra.max() <= 1.5
    counts = np.bincount(pool.classes, minlength=len(spectra.MATERIAL_CLASSES))
    # measured only by default: no PROSAIL
    assert counts[spectra.CLASS_ID["vegetation_modelled"]] == 0
    assert not any("prosail" in s for s in pool.sources)
    for c in ("colour_chart", "memory_colour", "object_patch", "soil", "roofing", "npv"):
        assert counts[spectra.CLASS_ID[c]] > 10, c
    assert 3000 < len(pool) < 5700
    # ISO 17321-1 is the Ohta data: never included; no near-duplicates survive
    assert not any("ISO" in s for s in pool.sources)
    ohta = [i for i, s in enumerate(pool.sources) if s.startswith("colour:Ohta:")]
    assert len(ohta) == 24
    sub = pool.spectra[:200].astype(np.float64)
    d = np.max(np.abs(sub[:, None] - sub[None]), axis=-1) + np.eye(len(sub))
    assert d.min() >= 0.004


def test_reflectance_values_match_colour(pool):
    import colour
    i = pool.sources.index("colour:Ohta:dark skin")
    sd = colour.SDS_COLOURCHECKERS["ColorChecker N Ohta"]["dark skin"]
    ref = sd.copy().align(colour.SpectralShape(400, 700, 10)).values
    np.testing.assert_allclose(pool.spectra[i], ref, rtol=1e-5)


def test_split_pool_disjoint_and_stratified(pool):
    sp = spectra.split_pool(pool)
    tr, va, te = (set(sp[k].tolist()) for k in ("train", "validation", "test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert len(tr | va | te) == len(pool)
    for c in np.unique(pool.classes):
        n = int(np.sum(pool.classes == c))
        if n >= 10:
            n_te = int(np.sum(pool.classes[sp["test"]] == c))
            assert 0.08 < n_te / n < 0.22
    with pytest.raises(ValueError, match="fractions"):
        spectra.split_pool(pool, fractions=(0.5, 0.5, 0.5))


def test_illuminants_unit_luminance_and_reference():
    import colour
    ybar = spectra._ybar()
    pool = spectra.illuminant_pool()
    assert len(pool) > 80 and "lamp:LPS" not in pool.names
    y = pool.spectra.astype(np.float64) @ ybar / ybar.sum()
    np.testing.assert_allclose(y, 1.0, rtol=1e-5)
    assert np.all(pool.spectra > 0)
    # D-series formula against colour-science at D65 (CCT 6504 K)
    d65 = spectra.normalize_illuminant(spectra._sd_values(colour.SDS_ILLUMINANTS["D65"]))
    np.testing.assert_allclose(spectra.daylight(6504.0), d65, rtol=2e-3)
    bb = colour.sd_blackbody(3000, colour.SpectralShape(400, 700, 10)).values
    np.testing.assert_allclose(spectra.blackbody(3000.0), spectra.normalize_illuminant(bb), rtol=1e-4)
    with pytest.raises(ValueError, match="CCT"):
        spectra.daylight(2000.0)
    with pytest.raises(ValueError, match="unknown illuminant"):
        spectra.illuminant_from_id("cie:NOPE")


# ----------------------------------------------------------------------------- generator

def test_scene_deterministic_and_valid():
    a = scenes.generate_scene(7, "train", 3, config=TINY)
    b = scenes.generate_scene(7, "train", 3, config=TINY)
    c = scenes.generate_scene(7, "train", 4, config=TINY)
    assert a.hsi.tobytes() == b.hsi.tobytes()
    assert a.reflectance.tobytes() == b.reflectance.tobytes()
    assert a.label.tobytes() == b.label.tobytes() and a.params_json() == b.params_json()
    assert a.hsi.tobytes() != c.hsi.tobytes()
    assert a.hsi.shape == (32, 32, 31) and a.hsi.dtype == np.float32
    assert a.label.dtype == np.int32
    assert a.hsi.min() > 0 and a.reflectance.min() >= scenes.REFLECTANCE_FLOOR - 1e-9
    assert np.percentile(a.hsi, 99.9) == pytest.approx(0.9, rel=1e-3)
    assert 0 <= a.label.min() and a.label.max() < len(spectra.MATERIAL_CLASSES)
    json.loads(a.params_json())
    r = scenes.regenerate(a.params_json())
    assert r.hsi.tobytes() == a.hsi.tobytes()


def test_scene_uses_only_split_materials(pool):
    sp = spectra.split_pool(pool)
    for split in ("train", "test"):
        sc = scenes.generate_scene(0, split, 1, config=TINY)
        assert set(sc.params["materials"]) <= set(sp[split].tolist())
        assert set(np.unique(sc.label).tolist()) <= {int(pool.classes[i]) for i in sc.params["materials"]}


def test_scene_is_image_like_not_noise():
    """Natural-image statistics: neighbouring pixels are strongly correlated."""
    sc = scenes.generate_scene(0, "train", 0, config=scenes.SceneConfig(height=64, width=64))
    y = sc.hsi.mean(-1)
    corr = np.corrcoef(y[:, :-1].ravel(), y[:, 1:].ravel())[0, 1]
    assert corr > 0.8
    assert len(np.unique(sc.label)) >= 2


def test_scene_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        scenes.generate_scene(0, "dev", 0, config=TINY)
    with pytest.raises(ValueError, match="size"):
        scenes.SceneConfig(height=4, width=4)


# ----------------------------------------------------------------------------- builder

def test_builder_schema_and_dtypes(tiny_builder):
    import jaxspec.data as D
    assert tiny_builder.name == "spectral_scenes"
    assert {s: tiny_builder.info.splits[s].num_examples for s in ("train", "validation", "test")} \
        == {"train": 8, "validation": 4, "test": 4}
    files = [p.name for p in tiny_builder.data_path.iterdir()]
    assert any(".array_record" in f for f in files) and not any("tfrecord" in f for f in files)
    src = D.data_source(tiny_builder, "train")
    ex = src[0]
    assert ex["hsi"].shape == (32, 32, 31) and ex["hsi"].dtype == np.float32
    assert ex["rgb"].shape == (32, 32, 3) and ex["rgb"].dtype == np.float32
    assert ex["reflectance"].shape == (32, 32, 31) and ex["reflectance"].dtype == np.float32
    assert ex["label"].shape == (32, 32) and ex["label"].dtype == np.int32
    assert 0 <= ex["label"].min() and ex["label"].max() < len(spectra.MATERIAL_CLASSES)
    np.testing.assert_array_equal(ex["bands"], np.arange(400, 701, 10, dtype=np.float32))
    assert ex["srf"].shape == (31, 3)
    assert ex["name"].decode() == "tiny/train/00000"
    assert ex["camera"].decode() == "cie1964"
    assert ex["illuminant"].decode().split("+")[0].split(":")[0] in ("daylight", "blackbody", "cie", "lamp")
    p = json.loads(ex["params"])
    assert p["split"] == "train" and p["index"] == 0
    assert "tensorflow" not in __import__("sys").modules


def test_clean_rgb_is_projection(tiny_builder):
    import jaxspec.data as D
    from jaxspec import physics
    src = D.data_source(tiny_builder, "validation")
    srf = physics.get_srf("cie1964")
    for i in range(len(src)):
        ex = src[i]
        np.testing.assert_allclose(ex["srf"], srf, rtol=0, atol=0)
        ref = ex["hsi"].astype(np.float64) @ srf.astype(np.float64)
        np.testing.assert_allclose(ex["rgb"], ref, rtol=1e-6, atol=1e-7)


def test_builder_examples_match_generator_and_splits_disjoint(tiny_builder, pool):
    import jaxspec.data as D
    mod = D.load_builder_module("spectral_scenes")
    cfg = tiny_builder.builder_config
    src = D.data_source(tiny_builder, "test")
    ex = mod.make_example(cfg, "test", 2)
    stored = src[2]
    assert stored["hsi"].tobytes() == ex["hsi"].tobytes()
    assert stored["reflectance"].tobytes() == ex["reflectance"].tobytes()
    mats = {}
    for split in ("train", "validation", "test"):
        s = D.data_source(tiny_builder, split)
        mats[split] = set()
        for i in range(len(s)):
            mats[split] |= set(json.loads(s[i]["params"])["materials"])
    assert not (mats["train"] & mats["test"]) and not (mats["train"] & mats["validation"])
    assert not (mats["validation"] & mats["test"])


def test_real_camera_example():
    """`real` rendering: 0..255 codes through a recorded camera; same key -> same bytes."""
    import dataclasses
    import jaxspec.data as D
    mod = D.load_builder_module("spectral_scenes")
    cfg = dataclasses.replace(next(c for c in mod.Builder.BUILDER_CONFIGS if c.name == "real"),
                              height=32, width=32)
    a = mod.make_example(cfg, "train", 0)
    b = mod.make_example(cfg, "train", 0)
    assert a["rgb"].tobytes() == b["rgb"].tobytes()
    assert a["camera"] in ("nikon_d5100", "canon_5d_mk2", "sigma_sd_merrill")
    assert a["rgb"].min() >= 0 and a["rgb"].max() <= 255
    assert np.all(a["rgb"] == np.round(a["rgb"]))
    p = json.loads(a["params"])
    assert p["camera"] == a["camera"] and 60 <= p["camera_pipeline"]["jpeg_quality"] <= 90
    # exposure to mean 0.18 before JPEG: mean code ~ 0.18 * 255
    assert abs(a["rgb"].mean() - 0.18 * 255) < 8
