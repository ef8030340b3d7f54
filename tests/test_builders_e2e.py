"""Every real dataset builder, end to end through the CLIs with no ``--set``: a tiny fixture in
the dataset's native on-disk format (tests/real_fixtures.py writers) in a fresh manual_dir,
``train.py --method e2e_tiny --preset smoke --dataset D --manual-dir X --steps 2`` (in-process,
``jaxspec.cli.main``; ``e2e_tiny`` is a two-layer network registered here, so one compile per
builder stays cheap: the builders, loader, loop and CLIs are the real ones) into a fresh data dir, then ``python -m jaxspec.evaluate`` and
``python -m jaxspec.predict`` on the workdir. Checked per builder: the run trains and
evaluates (no validation split: the ``test`` split, said in the log), every metric in
``eval.json`` and the evaluate output is finite although the data hold exact zeros (CAVE,
Chikusei, HySpecNet fixtures), the band count follows the dataset (31 / 128 / 202) in
``bands.json``, the checkpointed model and the predicted cube, and ``input.json`` records the
builder's RGB encoding, which predict applies to a photo."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_fixtures as F  # noqa: E402

from jaxspec import cli, data, registry  # noqa: E402
from jaxspec.configs.base import Config  # noqa: E402
from jaxspec import evaluate as evaluate_cli  # noqa: E402
from jaxspec import predict as predict_cli  # noqa: E402

W31 = np.arange(400.0, 701.0, 10.0)
W31_420 = np.arange(420.0, 721.0, 10.0)
S = 24   # fixture image side (multiple of MST++'s stride 8; >= the smoke crop 16)


class TinyNet(nn.Module):
    out: int

    @nn.compact
    def __call__(self, rgb, train=False):
        x = nn.gelu(nn.Conv(8, (3, 3))(rgb))
        x = nn.Conv(8, (2, 2), strides=2)(x)                        # stride-2 model
        return jax.nn.softplus(nn.ConvTranspose(self.out, (2, 2), strides=(2, 2))(x))


def _make_tiny(model):
    return TinyNet(out=int(model["out_channels"]))


_make_tiny.allowed_keys = ("out_channels",)   # filled from the dataset's band count


def _smoke():
    # MST++'s smoke settings (jaxspec.configs.base.SMOKE with rgb_norm="minmax"), tiny model
    return Config(method="e2e_tiny", preset="smoke", crop=16, batch_size=2, steps=2, lr=2e-4,
                  loss="mrae", rgb_norm="minmax", log_every=1, eval_every=2, ckpt_every=2,
                  max_eval_images=2)


@pytest.fixture(autouse=True)
def e2e_tiny():
    registry.register(registry.Method(name="e2e_tiny", make_model=_make_tiny,
                                      presets={"smoke": _smoke}, stride=2))
    yield "e2e_tiny"
    registry.unregister("e2e_tiny")


def _json_out(text: str) -> dict:
    """The JSON document a CLI prints last (TFDS prints its own lines before it)."""
    return json.loads(text[text.index("\n{") + 1:] if not text.startswith("{") else text)


def _rgb8(rng, h=S, w=S):
    return (rng.random((h, w, 3)) * 200 + 20).astype(np.uint8)


# ------------------------------------------------------------------ native-format fixtures
def _arad1k(m, rng):
    # 272 x 272: the NTIRE crop border of 128 (EVAL_CROP_BORDER, no --set) leaves 16 x 16
    for i in (1, 2, 901):
        split = ("Train", "Valid")[i > 900]
        cube = F.smooth_cube(rng, 272, 272, 31).astype(np.float32)
        F.write_mat_v73(m / f"{split}_Spec" / f"ARAD_1K_{i:04d}.mat",
                        {"cube": cube, "bands": W31, "norm_factor": np.array([[3.5]])})
        F.write_rgb(m / f"{split}_RGB" / f"ARAD_1K_{i:04d}.jpg", _rgb8(rng, 272, 272),
                    quality=90)


def _ntire2020(m, rng):
    for split, ids in (("Train", (1, 2)), ("Validation", (451,))):
        for i in ids:
            F.write_mat_v5(m / f"NTIRE2020_{split}_Spectral" / f"ARAD_HS_{i:04d}.mat",
                           {"cube": F.smooth_cube(rng, S, S, 31).astype(np.float32),
                            "bands": W31})
            F.write_rgb(m / f"NTIRE2020_{split}_Clean" / f"ARAD_HS_{i:04d}_clean.png", _rgb8(rng))


def _cave(m, rng):
    for s in ("balloons", "beads", "cd"):          # 2 train, 1 test (round(3 * 20 / 32) = 2)
        folder = m / "complete_ms_data" / f"{s}_ms" / f"{s}_ms"
        cube = (F.smooth_cube(rng, S, S, 31) * 65535).astype(np.uint16)
        cube[::5, ::5, :] = 0                       # CAVE's exact-zero voxels: in
        #                                             every crop, loss and metric
        for k in range(31):
            F.write_png16_grey(folder / f"{s}_ms_{k + 1:02d}.png", cube[..., k])
        F.write_rgb(folder / f"{s}_RGB.bmp", _rgb8(rng))


def _icvl(m, rng):
    for n in ("BGU_0522-1203", "park_0001", "lab_0002"):     # BGU_0522-1203 is a test image
        F.write_mat_v73(m / f"{n}.mat", {"rad": F.smooth_cube(rng, S, S, 31) * 4095,
                                         "bands": W31})


def _harvard(m, rng):
    for k in range(5):                                         # every 5th -> test
        lbl = np.ones((S, S), np.uint8)
        lbl[:2, :2] = 0
        F.write_mat_v5(m / "CZ_hsdb" / f"img{k}.mat",
                       {"ref": F.smooth_cube(rng, S, S, 31) * 0.03, "lbl": lbl})


def _kaist(m, rng):
    for k in (1, 2, 3):                                        # round(3 * 10 / 30) = 1 test
        F.write_exr(m / f"scene{k:02d}_reflectance.exr",
                    F.smooth_cube(rng, S, S, 31).astype(np.float32), W31_420)


def _chikusei(m, rng):
    img = (F.smooth_cube(rng, 52, 52, 128) * 5000).astype(np.uint16)
    img[::5, ::5, :] = 0                                       # dark pixels: exact zeros
    F.write_mat_v73(m / "Hyperspec_Chikusei_MATLAB" / "Chikusei_MATLAB"
                    / "HyperspecVNIR_Chikusei_20140729.mat", {"chikusei": img})


def _hyspecnet11k(m, rng):
    base = m / "hyspecnet-11k"
    tile = "ENMAP01-____L2A-DT0000004950_20221103T162438Z_001_V010110_20221118T145147Z"
    rels = []
    for k in range(3):
        patch = f"{tile}-Y0146027{k}_X05670694"
        raw = (rng.random((S, S, 224)) * 12000 - 1000).astype(np.int16)   # < 0 -> clipped to 0
        raw[0, 0, 3] = -32768                                             # nodata
        F.write_geotiff_int16(base / "patches" / tile / patch / f"{patch}-SPECTRAL_IMAGE.TIF",
                              raw)
        rels.append(f"{tile}/{patch}/{patch}-DATA.npy")
    for diff in ("easy", "hard"):
        (base / "splits" / diff).mkdir(parents=True)
        for csv, row in zip(("train.csv", "val.csv", "test.csv"), rels):
            (base / "splits" / diff / csv).write_text(row + "\n")


# name: (fixture writer, bands, split evaluated, RGB encoding + native scale in input.json)
BUILDERS = {
    "arad1k": (_arad1k, 31, "validation", ("linear", 255.0)),
    "ntire2020": (_ntire2020, 31, "validation", ("linear", 255.0)),
    "cave": (_cave, 31, "test", ("linear", 1.0)),
    "icvl": (_icvl, 31, "test", ("linear", 1.0)),
    "harvard": (_harvard, 31, "test", ("linear", 1.0)),
    "kaist": (_kaist, 31, "test", ("linear", 1.0)),
    "chikusei": (_chikusei, 128, "test", ("linear", 1.0)),
    "hyspecnet11k": (_hyspecnet11k, 202, "validation", ("linear", 1.0)),
}
# the HSI-only / remote-sensing ones (rendered RGB, 128 / 202 bands) run in CI only
SLOW = {"icvl", "harvard", "kaist", "chikusei", "hyspecnet11k"}


def _finite_metrics(mean: dict) -> None:
    assert mean and all(np.isfinite(v) for v in mean.values()), mean


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in BUILDERS])
def test_builder_trains_evaluates_predicts(name, tmp_path, monkeypatch, caplog, capsys):
    write, n_bands, split, (encoding, scale) = BUILDERS[name]
    rng = np.random.default_rng(0)
    manual, data_dir, w = tmp_path / "manual", tmp_path / "tfds", tmp_path / "run"
    write(manual, rng)
    monkeypatch.setenv("JAXSPEC_DATA_DIR", str(data_dir))
    if name == "chikusei":
        # the real protocol needs the full 2517 x 2335 scene; the same builder code runs on a
        # 52 x 52 fixture with the geometry shrunk: centre crop 48 x 48, 2 test images 24 x 24
        # from the top rows, the 24 rows below cut into 2 training tiles 24 x 24
        cfg = data.load_builder_module("chikusei").Builder.BUILDER_CONFIGS[0]
        monkeypatch.setattr(cfg, "crop", (2, 50, 2, 50))
        monkeypatch.setattr(cfg, "test_size", S)
        monkeypatch.setattr(cfg, "patch_size", S)
    caplog.set_level(logging.INFO, logger="jaxspec")

    # train.py: the builder prepares from manual_dir, 2 steps, final evaluation
    assert cli.main(["--method", "e2e_tiny", "--preset", "smoke", "--dataset", name,
                     "--manual-dir", str(manual), "--data-dir", str(data_dir),
                     "--workdir", str(w), "--steps", "2", "--no-progress"]) == 0, \
        capsys.readouterr().err
    summary = _json_out(capsys.readouterr().out)
    assert summary["step"] == 2
    assert f"evaluating on split '{split}' of dataset {name}" in caplog.text
    if split == "test":
        assert f"dataset {name}/default has no 'validation' split" in caplog.text
    cfg = json.loads((w / "config.json").read_text())
    assert cfg["eval_split"] == split and cfg["bands"] == n_bands
    assert cfg["model"]["out_channels"] == n_bands          # the model follows the data
    assert len(json.loads((w / "bands.json").read_text())) == n_bands
    rec = json.loads((w / "input.json").read_text())
    assert {k: rec[k] for k in ("encoding", "native_scale", "rgb_norm")} == {
        "encoding": encoding, "native_scale": scale, "rgb_norm": "minmax"}
    assert rec["rgb_p99"] > 0
    # rendered datasets (rgb = hsi @ srf) record the SRF predict converts photos to
    assert ("srf" in rec) == bool(data.load_builder_module(name).Builder.RENDERED), rec.keys()
    if "srf" in rec:
        assert np.asarray(rec["srf"]).shape == (n_bands, 3)
    ev = json.loads((w / "eval.json").read_text())
    assert ev["split"] == split and ev["num_images"] >= 1
    _finite_metrics(ev["mean"])
    losses = [json.loads(x)["loss"] for x in (w / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses and np.all(np.isfinite(losses))

    # python -m jaxspec.evaluate --workdir W: the run's (resolved) split, all images
    caplog.clear()
    assert evaluate_cli.main(["--workdir", str(w), "--figures", "0"]) == 0
    out = _json_out(capsys.readouterr().out)
    assert out["split"] == split and out["dataset"] == name
    _finite_metrics(out["mean"])
    assert f"evaluating on split '{split}' of dataset {name}" in caplog.text
    assert Path(out["path"]).name == f"eval_{name}_{split}.json"

    # python -m jaxspec.predict --workdir W photo.png: C bands, the recorded encoding applied
    photo = F.write_rgb(tmp_path / "photo.png", _rgb8(rng))
    assert predict_cli.main(["--workdir", str(w), "--out", str(tmp_path / "pred"),
                             str(photo)]) == 0
    cube = np.load(tmp_path / "pred" / "photo.npy")
    assert cube.shape == (S, S, n_bands) and np.all(np.isfinite(cube))
    side = json.loads((tmp_path / "pred" / "photo.json").read_text())
    assert side["input"]["model_expects"] == encoding
    assert side["input"]["native_scale"] == scale


def test_arad1k_photo_is_converted_to_the_recorded_encoding(tmp_path, monkeypatch, capsys):
    """A run trained on the ARAD-1K fixture records ``linear`` RGB at scale 255 (the builder's
    ``RGB_ENCODING`` / ``RGB_SCALE``) in ``input.json``; predict linearises an 8-bit sRGB photo
    with the IEC 61966-2-1 curve and multiplies by 255, exactly (per-channel input means)."""
    rng = np.random.default_rng(1)
    mod = data.load_builder_module("arad1k")
    assert (mod.Builder.RGB_ENCODING, mod.Builder.RGB_SCALE) == ("linear", 255.0)
    manual, data_dir, w = tmp_path / "manual", tmp_path / "tfds", tmp_path / "run"
    _arad1k(manual, rng)
    monkeypatch.setenv("JAXSPEC_DATA_DIR", str(data_dir))
    b = data.builder("arad1k", data_dir=data_dir, manual_dir=manual)
    assert b.info.metadata["rgb_encoding"] == "linear" and b.info.metadata["rgb_scale"] == 255.0
    assert cli.main(["--method", "e2e_tiny", "--preset", "smoke", "--dataset", "arad1k",
                     "--manual-dir", str(manual), "--data-dir", str(data_dir), "--workdir",
                     str(w), "--steps", "1", "--set", "eval_every=1", "--set", "ckpt_every=1",
                     "--set", "log_every=1", "--no-progress"]) == 0
    capsys.readouterr()
    assert json.loads((w / "input.json").read_text())["encoding"] == "linear"
    img = np.zeros((S, S, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 128, 10
    photo = F.write_rgb(tmp_path / "p.png", img)
    assert predict_cli.main(["--workdir", str(w), "--out", str(tmp_path / "o"), str(photo)]) == 0
    rec = json.loads((tmp_path / "o" / "p.json").read_text())["input"]
    assert rec["input_encoding"] == "srgb" and rec["model_expects"] == "linear"

    def lin(c):
        c = c / 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    np.testing.assert_allclose(rec["model_input_mean"], [255 * lin(v) for v in (255, 128, 10)],
                               rtol=1e-5)
    # the same photo declared linear is passed through at the native scale
    assert predict_cli.main(["--workdir", str(w), "--out", str(tmp_path / "o2"),
                             "--input-encoding", "linear", str(photo)]) == 0
    rec = json.loads((tmp_path / "o2" / "p.json").read_text())["input"]
    np.testing.assert_allclose(rec["model_input_mean"], [255.0, 128.0, 10.0], rtol=1e-5)


def test_mrae_loss_and_metric_with_zeros_exact_where_positive():
    """Zero handling (docs/datasets.md, "Zeros"): on gt > 0 everywhere the MRAE loss and the
    task's ``mrae`` are the reference values bit for bit; with exact zeros in gt they are the
    mean over the elements with gt > 0 (finite, finite gradient) instead of inf/nan."""
    import jax.numpy as jnp

    from jaxspec import metrics, tasks
    from jaxspec.train import losses

    rng = np.random.default_rng(3)
    gt = jnp.asarray(rng.uniform(0.05, 1.0, (2, 12, 12, 5)), jnp.float32)
    pred = gt + jnp.asarray(rng.normal(0, 0.05, gt.shape), jnp.float32)
    assert float(losses.mrae_loss(pred, gt)) == float(jnp.mean(jnp.abs(pred - gt) / gt))
    task = tasks.get("rgb2hsi")
    m = task.metrics(pred, gt)
    np.testing.assert_array_equal(m["mrae"], np.asarray(metrics.mrae(pred, gt)))
    gz = gt.at[0, :2].set(0.0)                                   # zeros in image 0 only
    pos = np.asarray(gz) > 0
    rel = np.abs(np.asarray(pred) - np.asarray(gz))[pos] / np.asarray(gz)[pos]
    np.testing.assert_allclose(float(losses.mrae_loss(pred, gz)), rel.mean(), rtol=1e-6)
    g = jax.grad(lambda p: losses.mrae_loss(p, gz))(pred)
    assert np.all(np.isfinite(np.asarray(g)))
    assert not np.isfinite(float(metrics.mrae(pred, gz)[0]))      # the reference value: inf
    m = task.metrics(pred, gz)
    assert np.all(np.isfinite(m["mrae"]))
    np.testing.assert_allclose(m["mrae"][0], m["mrae_pos"][0], rtol=0)
    np.testing.assert_array_equal(m["mrae"][1], np.asarray(metrics.mrae(pred, gt))[1])


def test_losses_trace_on_a_pod_sized_global_batch():
    """A global batch on a pod slice holds more than 2^31 elements (e.g. 256 chips x 32 x
    128 x 128 x 31 = 4.2e9): the losses must trace there (the MRAE count once compared an
    int32 with the Python size and could not; found by ``jaxspec.scale``)."""
    import jax.numpy as jnp

    from jaxspec.models import ussr
    from jaxspec.train import losses

    big = jax.ShapeDtypeStruct((256 * 32, 128, 128, 31), jnp.float32)
    for fn in (losses.mrae_loss, losses.l1_loss, losses.mrae_eps_loss):
        assert jax.eval_shape(fn, big, big).shape == ()
    logits = jax.ShapeDtypeStruct((2**16, 256, 256, 4), jnp.float32)    # 2^32 labels
    labels = jax.ShapeDtypeStruct((2**16, 256, 256), jnp.int32)
    assert jax.eval_shape(ussr.semantic_cross_entropy, logits, labels).shape == ()
