"""Tasks end to end: fusion (learned, with per-image test-time adaptation, and parameter-free
``step_kind="none"``), hsi2hsi autoencoding with an auxiliary loss, data-derived band counts,
fusion pair synthesis and tiling geometry, and the review fixes (selection on the final image set
and metric, builder crop border, lazy registry, augment)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import inference, registry, tasks
from jaxspec.configs.base import Config
from jaxspec.data import fusion as fusion_data
from jaxspec.train import train_and_evaluate

REPO = Path(__file__).resolve().parents[1]
BANDS = np.linspace(420.0, 680.0, 8).astype(np.float32)
FUSION = {"scale": 4, "psf": "gaussian", "sigma": 1.0, "psf_size": 5, "srf": "nikon_d5100"}


def _hsi_source(n, seed, size=16, c=8, zeros=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.random((size // 4, size // 4, c))
        hsi = np.kron(base, np.ones((4, 4, 1))) * 0.6 + rng.random((size, size, c)) * 0.2 + 0.1
        if zeros:
            hsi[:2, :2] = 0.0
        out.append({"hsi": hsi.astype(np.float32), "bands": BANDS, "name": f"s{seed}_{i}",
                    "rgb": (hsi @ np.full((c, 3), 1.0 / c)).astype(np.float32)})
    return out


class TinyFusion(nn.Module):
    """Upsampled LR-HSI + a conv on [upsampled LR, HR-MSI]; reads the filled-in ``scale``."""
    scale: int = 1

    @nn.compact
    def __call__(self, lr_hsi, hr_msi, train=False, srf=None, psf=None):
        b, h, w, c = lr_hsi.shape
        assert hr_msi.shape[1:3] == (h * self.scale, w * self.scale), (lr_hsi.shape, hr_msi.shape)
        up = jnp.repeat(jnp.repeat(lr_hsi, self.scale, 1), self.scale, 2)
        x = jnp.concatenate([up, hr_msi], -1)
        return up + nn.Conv(c, (3, 3), name="mix")(x)


class Nearest(nn.Module):
    """Parameter-free fusion baseline: nearest-neighbour upsampling of the LR-HSI."""
    scale: int = 1

    @nn.compact
    def __call__(self, lr_hsi, hr_msi, train=False):
        return jnp.repeat(jnp.repeat(lr_hsi, self.scale, 1), self.scale, 2)


class TinyAE(nn.Module):
    """HSI autoencoder returning an auxiliary 'commit' loss (VQ-like)."""
    out_channels: int = 31
    in_channels: int = 31

    @nn.compact
    def __call__(self, hsi, train=False):
        z = nn.Conv(4, (1, 1), name="enc")(hsi)
        out = nn.Conv(self.out_channels, (1, 1), name="dec")(z)
        return out, {"commit": jnp.mean(jnp.square(z - jnp.round(z)))}


def _config(method, **kw):
    base = dict(method=method, preset="smoke", crop=8, batch_size=2, steps=2, lr=1e-2,
                log_every=1, eval_every=0, ckpt_every=2, rgb_norm="none", loss="l1")
    base.update(kw)
    return Config(**base)


@pytest.fixture
def fusion_methods():
    make = registry.module_factory(TinyFusion, "tiny fusion")
    registry.register(registry.Method(
        name="t_fusion", task="fusion", make_model=make, presets={"smoke": lambda: None},
        side_inputs=("srf", "psf"), adapt_loss=tasks.fusion_reprojection_loss(4)))
    registry.register(registry.Method(
        name="t_nearest", task="fusion", step_kind="none", presets={"smoke": lambda: None},
        make_model=registry.module_factory(Nearest, "nearest")))
    yield
    registry.unregister("t_fusion")
    registry.unregister("t_nearest")


def test_learned_fusion_with_adapt_end_to_end(fusion_methods, tmp_path, monkeypatch):
    """train_and_evaluate -> eval.json with the fusion metrics and the adapt settings; the
    evaluate and predict CLIs with --adapt; jaxspec.fuse; scale filled into config.model."""
    import jaxspec
    from jaxspec import evaluate, predict
    wd = tmp_path / "fusion"
    cfg = _config("t_fusion", fusion=FUSION, adapt_steps=3, adapt_lr=1e-2,
                  adapt_params=("mix/bias",))
    summary = train_and_evaluate(cfg, wd, train_source=_hsi_source(3, 0),
                                 eval_source=_hsi_source(2, 1), progress=False, figures=1)
    assert summary["step"] == 2
    ev = json.loads((wd / "eval.json").read_text())
    assert ev["task"] == "fusion" and ev["select_metric"] == "psnr"
    assert set(ev["mean"]) == {"psnr", "sam", "ergas", "uiqi", "ssim", "rmse", "mrae_pos"}
    assert ev["adapt"] == {"steps": 3, "lr": 1e-2, "optimizer": "adam", "params": ["mix/bias"]}
    saved = json.loads((wd / "config.json").read_text())
    assert saved["model"]["scale"] == 4 and saved["bands"] == 8
    assert (wd / "figures").is_dir()

    # API: load + fuse, with and without adaptation; adaptation lowers the reprojection loss
    model, variables = jaxspec.load(wd)
    src = fusion_data.FusionSource(_hsi_source(1, 5), fusion_data.degradation_from_config(
        model.config), seed=0)[0]
    side = {"srf": src["srf"], "psf": src["psf"]}
    plain = jaxspec.fuse(model, variables, src["lr_hsi"], src["hr_msi"], **side)
    adapted = jaxspec.fuse(model, variables, src["lr_hsi"], src["hr_msi"], adapt=True, **side)
    assert plain.shape == adapted.shape == (16, 16, 8)
    loss = tasks.fusion_reprojection_loss(4)
    inp = {k: jnp.asarray(v)[None] for k, v in src.items() if k in
           ("lr_hsi", "hr_msi", "srf", "psf")}
    adapter = inference.make_adapter(model.task, model.module.apply, loss, steps=3, lr=1e-2,
                                     params=("mix/bias",), side_inputs=("srf", "psf"))
    v2 = adapter(variables, inp)
    assert float(loss(model.module.apply, v2, inp)) < float(loss(model.module.apply, variables,
                                                                 inp))
    # masked: only mix/bias moved; the trained variables are untouched (reset per image)
    np.testing.assert_array_equal(v2["params"]["mix"]["kernel"], variables["params"]["mix"]["kernel"])
    assert not np.array_equal(v2["params"]["mix"]["bias"], variables["params"]["mix"]["bias"])
    with pytest.raises(ValueError, match="needs srf"):
        jaxspec.fuse(model, variables, src["lr_hsi"], src["hr_msi"])

    # CLIs
    monkeypatch.setattr("jaxspec.train.loop.load_sources",
                        lambda config, splits, dataset=None: {s: _hsi_source(2, 1) for s in splits})
    assert evaluate.main(["--workdir", str(wd), "--adapt", "--figures", "0"]) == 0
    ev2 = json.loads((wd / "eval_spectral_scenes_validation_adapt.json").read_text())
    assert ev2["adapt"]["steps"] == 3 and ev2["num_images"] == 2
    np.save(tmp_path / "lr.npy", src["lr_hsi"])
    np.save(tmp_path / "hr.npy", src["hr_msi"])
    out = tmp_path / "pred"
    assert predict.main(["--workdir", str(wd), str(tmp_path / "lr.npy"), str(tmp_path / "hr.npy"),
                         "--out", str(out), "--adapt"]) == 0
    assert np.load(out / "lr.npy").shape == (16, 16, 8)


def test_parameter_free_fusion_method(fusion_methods, tmp_path, monkeypatch):
    """step_kind='none': no training, no checkpoint; eval.json, load, fuse and evaluate work."""
    import jaxspec
    from jaxspec import evaluate
    wd = tmp_path / "nearest"
    cfg = _config("t_nearest", fusion=FUSION)
    summary = train_and_evaluate(cfg, wd, eval_source=_hsi_source(2, 1), progress=False,
                                 figures=0)
    assert summary["params"] == 0 and summary["step"] == 0
    assert not (wd / "checkpoints").exists()
    ev = json.loads((wd / "eval.json").read_text())
    assert ev["checkpoint"] == "none" and ev["num_images"] == 2
    # nearest upsampling of a blurred LR: finite, worse than perfect
    assert 5 < ev["mean"]["psnr"] < 60
    model, variables = jaxspec.load(wd)
    src = fusion_data.FusionSource(_hsi_source(1, 1), fusion_data.degradation_from_config(
        model.config))[0]
    out = jaxspec.fuse(model, variables, src["lr_hsi"], src["hr_msi"])
    np.testing.assert_array_equal(out, np.repeat(np.repeat(src["lr_hsi"], 4, 0), 4, 1))
    # tiled in HR coordinates (LR tile aligned) == untiled for a pointwise-in-LR model
    tiled = jaxspec.fuse(model, variables, src["lr_hsi"], src["hr_msi"], tile=8, overlap=4)
    np.testing.assert_allclose(tiled, out, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of scale x stride"):
        jaxspec.fuse(model, variables, src["lr_hsi"], src["hr_msi"], tile=6, overlap=4)
    monkeypatch.setattr("jaxspec.train.loop.load_sources",
                        lambda config, splits, dataset=None: {s: _hsi_source(2, 1) for s in splits})
    assert evaluate.main(["--workdir", str(wd), "--figures", "0"]) == 0


def test_hsi2hsi_autoencoder_aux_loss_and_bands_from_data(tmp_path):
    """hsi2hsi: in/out channels filled from the data (8 bands, no preset edit); the model's
    aux loss is weighted by config.aux_loss_weights and logged; a stated band count that
    disagrees with the data stops the run at start-up."""
    registry.register(registry.Method(
        name="t_ae", task="hsi2hsi", presets={"smoke": lambda: None},
        make_model=registry.module_factory(TinyAE, "tiny ae")))
    try:
        wd = tmp_path / "ae"
        cfg = _config("t_ae", aux_loss_weights={"commit": 0.5})
        train_and_evaluate(cfg, wd, train_source=_hsi_source(3, 0), eval_source=_hsi_source(2, 1),
                           progress=False, figures=0)
        saved = json.loads((wd / "config.json").read_text())
        assert saved["model"] == {"in_channels": 8, "out_channels": 8}
        lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
        assert "aux/commit" in lines[0]
        ev = json.loads((wd / "eval.json").read_text())
        assert ev["task"] == "hsi2hsi" and "mrae" in ev["mean"]
        with pytest.raises(ValueError, match="model.out_channels=31 but"):
            train_and_evaluate(cfg.replace(model={"out_channels": 31}), tmp_path / "bad",
                               train_source=_hsi_source(3, 0), eval_source=_hsi_source(2, 1),
                               progress=False)
        with pytest.raises(ValueError, match="config.bands=31"):
            train_and_evaluate(cfg.replace(bands=31), tmp_path / "bad2",
                               train_source=_hsi_source(3, 0), eval_source=_hsi_source(2, 1),
                               progress=False)
        with pytest.raises(ValueError, match="aux_loss_weights names"):
            train_and_evaluate(cfg.replace(aux_loss_weights={"nope": 1.0}), tmp_path / "bad3",
                               train_source=_hsi_source(3, 0), eval_source=_hsi_source(2, 1),
                               progress=False)
    finally:
        registry.unregister("t_ae")


# ----------------------------------------------------------------------------- units
def test_fusion_train_crops_equal_crops_of_the_full_pair():
    """Joint crops: HR window on the scale grid, LR aligned; synthesised with a margin, so a
    training pair is exactly the same crop of the full-image pair; imagewise PSFs depend on
    (seed, index) only."""
    src = _hsi_source(2, 3, size=24)
    deg = fusion_data.Degradation(scale=4, psf="anisotropic", protocol="imagewise",
                                  sigma_range=(0.8, 1.6))
    full = fusion_data.FusionSource(src, deg, seed=3)[1]
    ex = {**src[1], "_index": 1}
    pair = fusion_data.train_pair(ex, deg, np.random.default_rng(5), crop=8, seed=3,
                                  augment="none")
    r = np.random.default_rng(5)
    y0, x0 = int(r.integers(0, 5)) * 4, int(r.integers(0, 5)) * 4
    np.testing.assert_allclose(pair["hr_msi"], full["hr_msi"][y0:y0 + 8, x0:x0 + 8], atol=1e-6)
    np.testing.assert_allclose(pair["lr_hsi"], full["lr_hsi"][y0 // 4:y0 // 4 + 2,
                                                               x0 // 4:x0 // 4 + 2], atol=1e-6)
    np.testing.assert_array_equal(pair["psf"], full["psf"])
    assert not np.array_equal(deg.psf_for(0, 3), deg.psf_for(1, 3))          # per image
    np.testing.assert_array_equal(deg.psf_for(1, 3), deg.psf_for(1, 3))       # deterministic
    consistent = fusion_data.Degradation(scale=4)
    np.testing.assert_array_equal(consistent.psf_for(0), consistent.psf_for(7))
    with pytest.raises(ValueError, match="multiple of the scale"):
        fusion_data.train_pair(ex, deg, np.random.default_rng(0), crop=6, seed=0)
    with pytest.raises(ValueError, match="unknown config.fusion keys"):
        fusion_data.degradation_from_config(Config(method="m", preset="p", fusion={"scal": 2}))


def test_daem_protocol_pairs():
    """psf='daem': physics.daem_psf kernels (k = s) and the DAEM operator (zero-padded valid
    correlation); imagewise kernels per image; training crops still equal full-pair crops."""
    deg = fusion_data.Degradation(scale=4, psf="daem", protocol="imagewise")
    assert deg.mode == "daem" and deg.margin() == 0
    p0, p1 = deg.psf_for(0, 3), deg.psf_for(1, 3)
    assert p0.shape == (4, 4) and abs(float(p0.sum()) - 1) < 1e-5
    assert not np.array_equal(p0, p1)
    src = _hsi_source(2, 3, size=24)
    full = fusion_data.FusionSource(src, deg, seed=3)[1]
    pair = fusion_data.train_pair({**src[1], "_index": 1}, deg, np.random.default_rng(5),
                                  crop=8, seed=3, augment="none")
    r = np.random.default_rng(5)
    y0, x0 = int(r.integers(0, 5)) * 4, int(r.integers(0, 5)) * 4
    np.testing.assert_allclose(pair["lr_hsi"], full["lr_hsi"][y0 // 4:y0 // 4 + 2,
                                                               x0 // 4:x0 // 4 + 2], atol=1e-6)
    big = fusion_data.Degradation(scale=4, psf="daem", psf_size=8, daem_noise=0.0)
    assert big.margin() == 4
    full = fusion_data.FusionSource(src, big, seed=3)[1]
    pair = fusion_data.train_pair({**src[1], "_index": 1}, big, np.random.default_rng(5),
                                  crop=8, seed=3, augment="none")
    np.testing.assert_allclose(pair["lr_hsi"], full["lr_hsi"][y0 // 4:y0 // 4 + 2,
                                                               x0 // 4:x0 // 4 + 2], atol=1e-6)


def test_mrae_pos_finite_with_zeros_and_metric_modes():
    gt = np.full((1, 12, 12, 2), 0.5, np.float32)
    gt[0, 0, 0] = 0.0
    pred = gt + 0.05
    from jaxspec import metrics
    assert not np.isfinite(float(metrics.mrae(pred, gt)[0]))
    np.testing.assert_allclose(float(tasks.mrae_pos(pred, gt)[0]), 0.1, rtol=1e-5)
    assert tasks.metric_mode("psnr") == "max" and tasks.metric_mode("mrae_pos") == "min"
    with pytest.raises(ValueError, match="unknown selection metric"):
        tasks.metric_mode("f1")


def test_best_checkpoint_on_final_image_set_and_select_metric(tmp_path):
    """Periodic validation and the final evaluation use the same images (max_eval_images for
    both) and the same metric; before, training selected on max_eval_images and eval.json
    scored every image. select_metric='psnr' keeps the max."""
    from jaxspec.train.checkpointing import Checkpointer

    class Net(nn.Module):
        @nn.compact
        def __call__(self, rgb, train=False):
            return jax.nn.softplus(nn.Conv(8, (3, 3))(rgb)) + 0.01

    registry.register(registry.Method(name="t_sel", presets={"smoke": lambda: None},
                                      make_model=lambda m: Net()))
    try:
        wd = tmp_path / "sel"
        cfg = _config("t_sel", steps=4, eval_every=2, max_eval_images=2, select_metric="psnr")
        train_and_evaluate(cfg, wd, train_source=_hsi_source(3, 0),
                           eval_source=_hsi_source(4, 1), progress=False, figures=0)
        ev = json.loads((wd / "eval.json").read_text())
        assert ev["num_images"] == 2 and ev["select_metric"] == "psnr"
        with Checkpointer(wd / "checkpoints", read_only=True, select_metric="psnr",
                          select_mode="max") as ck:
            meta = ck.read_meta("best")
        np.testing.assert_allclose(meta["metrics"]["psnr"], ev["mean"]["psnr"], rtol=1e-6)
        lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
        vals = [l["val/psnr"] for l in lines if "val/psnr" in l] + [ev["mean"]["psnr"]]
        assert ev["mean"]["psnr"] == pytest.approx(max(vals))
    finally:
        registry.unregister("t_sel")
    ck = Checkpointer(tmp_path / "c", select_metric="psnr", select_mode="max")
    for s, v in ((1, 20.0), (2, float("nan")), (3, 25.0), (4, 22.0)):
        ck.save_best(s, {"params": {"w": jnp.full(2, float(s))}}, {"psnr": v}, {"step": s})
    ck.wait()
    assert ck.best_step() == 3
    with pytest.raises(ValueError, match="selection metric"):
        ck.save_best(5, {"params": {}}, {"mrae": 0.1}, {})
    ck.close()


def test_crop_border_from_builder_unless_overridden():
    """The ARAD-1K border of the paper presets no longer leaks into other datasets."""
    from jaxspec.train.loop import protocol_crop_border
    cfg = registry.get("acc").config("paper")
    assert cfg.eval_crop_border is None
    assert protocol_crop_border(cfg) == 128                      # arad1k builder
    assert protocol_crop_border(cfg.replace(dataset="cave")) == 0
    assert protocol_crop_border(cfg.replace(dataset="cave", eval_crop_border=16)) == 16
    assert protocol_crop_border(cfg.replace(eval_crop_border=0)) == 0


def test_registry_imports_only_the_requested_module(tmp_path):
    """get('mstpp') does not import acc; a broken model module only breaks its own name."""
    code = ("import sys; from jaxspec import registry; registry.get('mstpp'); "
            "print('jaxspec.models.acc' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
    (tmp_path / "broken_model_mod.py").write_text("raise RuntimeError('boom in model file')\n")
    sys.path.insert(0, str(tmp_path))
    registry.METHOD_MODULES["t_broken"] = "broken_model_mod"
    try:
        with pytest.raises(ValueError, match="boom in model file"):
            registry.get("t_broken")
        assert registry.get("mstpp").name == "mstpp"
    finally:
        registry.METHOD_MODULES.pop("t_broken")
        sys.path.remove(str(tmp_path))


def test_augment_field_and_legacy_config():
    from jaxspec.data import pipeline
    assert registry.get("acc").config("paper").augment == "flips"
    assert registry.get("mstpp").config("paper").augment == "dihedral"
    a = np.arange(4 * 4 * 1, dtype=np.float32).reshape(4, 4, 1)
    flips = {a.tobytes(), a[::-1].tobytes(), a[:, ::-1].tobytes(), a[::-1, ::-1].tobytes()}
    rng = np.random.default_rng(0)
    outs = {pipeline.dihedral(a, rng, "flips").tobytes() for _ in range(40)}
    assert outs == flips                                    # flips only, all four
    assert pipeline.dihedral(a, rng, "none").tobytes() == a.tobytes()
    with pytest.raises(ValueError, match="augment"):
        Config(method="m", preset="p", augment="rot")
    old = Config(method="m", preset="p").to_dict()
    old["extra"] = {}
    assert Config.from_dict(old) == Config(method="m", preset="p")
    assert not hasattr(Config(method="m", preset="p"), "extra")
