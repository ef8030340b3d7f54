"""Tests for USSR (jaxspec.models.ussr): parameter counts and names against the authors' code
(shared/specs/methods.md §4), L1 gradient clipping, SRF estimation, generator structure,
losses and unpaired baselines against numpy, weight mapping against PyTorch (when installed).

Parameters are filled from numpy (``random_variables``) instead of ``Module.init``: the shapes
come from ``jax.eval_shape`` so no init graph is compiled, which keeps the file fast.
"""
import json
import math
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import physics, registry
from jaxspec.flops import count_params
from jaxspec.models import ussr as U

CAMSPEC = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "camera_ssf"
           / "jiang2013_camspec" / "camspec_database.txt")
if not CAMSPEC.is_file():
    CAMSPEC = Path("/work/shared/data/camera_ssf/jiang2013_camspec/camspec_database.txt")


def random_variables(module, *args, seed=0, method=None, scale=0.2):
    """Variables of ``module`` with shapes from ``eval_shape(init)`` and numpy N(0, scale^2)
    values (BatchNorm variances in [0.5, 1.5])."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "'var'" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
        if "'scale'" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
        return jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def smooth_rgb(b=2, h=16, w=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(0.3 * xx + 0.2 * yy), np.cos(0.25 * yy), (xx * yy) / (h * w)], -1)
    x = (base - base.min()) / (base.max() - base.min())
    return jnp.asarray(0.8 * x[None] + 0.2 * rng.random((b, h, w, 3)), jnp.float32)


# ----------------------------------------------------------------------------------------------
# parameter counts / names vs. the authors' code (methods.md §4: G 171 k, M ~131 k, D ~0.63 M,
# E2 + SE ~0.22 M)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_shapes():
    """Variable shapes of the whole model (5 built-in SRFs, 59 classes as PASCAL-Context)."""
    rgb, hsi = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 31))
    model = U.USSR(srf_dictionary="builtin", n_classes=59)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), rgb, hsi,
                                                    method=U.USSR.init_all))


def test_param_counts_match_authors(full_shapes):
    rgb, hsi = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 31))
    p = full_shapes[1]["params"]
    g = {"params": p["hsiG"]}
    assert count_params(g) == 170_996 == 4 * 42_749
    assert sorted(g["params"]) == [f"stages_{t}" for t in range(4)]
    m = jax.eval_shape(U.SRFEstimator(28).init, jax.random.PRNGKey(0), rgb)
    assert count_params(m) == 130_620
    assert count_params(p["dishsi"]) == 630_531
    assert count_params(full_shapes[1]["batch_stats"]["dishsi"]) == 2 * 9 * 2 * (64 + 128)
    assert count_params(p["extractor"]) == 220_196
    # G + M = 0.30 M (the paper's 0.58 M is not reproduced by the released code, §4 (e) 3)
    assert count_params(g) + count_params(m) == 301_616


def test_authors_names_and_shapes(full_shapes):
    shapes = full_shapes[1]
    rows = {r["authors"]: r for r in U.param_table(shapes) if r["authors"]}
    expect = {
        "hsiG.stages.0.Upconv.conv.weight": (31, 3, 3, 3),
        "hsiG.stages.3.denselayers.0.compressLayer.conv.weight": (62, 31, 1, 1),
        "hsiG.stages.3.denselayers.3.actlayer.conv.weight": (62, 1, 3, 3),
        "hsiG.stages.1.denselayers.4.compressLayer.conv.weight": (31, 279, 1, 1),
        "respG.stages.0.conv.0.actlayer.conv.weight": (16, 1, 5, 5),
        "respG.stages.0.conv.1.compressLayer.conv.weight": (32, 19, 1, 1),
        "respG.fstage.conv.2.compressLayer.conv.weight": (128, 320, 1, 1),
        # 3 x (number of built-in SRFs)
        "respG.fstage.final_conv.compressLayer.conv.weight": (
            3 * U.load_srf_dictionary("builtin").n_cameras, 128, 1, 1),
        "dishsi.stage1.downsample.0.compressLayer.conv.weight": (64, 31, 1, 1),
        "dishsi.stage2.denseconv.6.actlayer.Bn.running_var": (128,),
        "dishsi.classifier.2.compressLayer.conv.weight": (1, 512, 1, 1),
        "dishsi.classifier.2.actlayer.conv.weight": (1, 1, 1, 1),
        "extractor.edenseconv.3.compressLayer.conv.weight": (64, 223, 1, 1),
        "extractor.fianl_denseconv.3.compressLayer.conv.weight": (118, 477, 1, 1),
        "extractor.fianl_denseconv.4.compressLayer.conv.weight": (59, 595, 1, 1),
        "extractor.fianl_denseconv.4.compressLayer.conv.bias": (59,),
    }
    for k, s in expect.items():
        assert rows[k]["authors_shape"] == s, k
    # the generator is bias-free, everything else has biases
    assert not any(k.startswith("hsiG") and k.endswith(".bias") for k in rows)
    assert "extractor.fianl_denseconv.4.actlayer.conv.weight" not in rows  # unused in the code
    assert all(r["authors"] is None for r in U.param_table(shapes) if r["path"].startswith("E1"))


def fill_random(shapes, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes)


def test_torch_state_dict_round_trip(full_shapes):
    v = fill_random(full_shapes[1])
    sd = U.to_torch_state_dict(v)
    sd = {"module." + k: x for k, x in sd.items()}
    sd["module.HRNet.conv1.weight"] = np.zeros((64, 3, 3, 3))
    back, unused = U.from_torch_state_dict(sd, v)
    assert unused == ["HRNet.conv1.weight"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, v)
    bad = dict(sd)
    del bad["module.hsiG.stages.2.Upconv.conv.weight"]
    with pytest.raises(ValueError, match="hsiG.stages.2.Upconv.conv.weight"):
        U.from_torch_state_dict(bad, v)


# ----------------------------------------------------------------------------------------------
# L1 gradient clipping
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_l1_gradient_clip_backward_vs_numpy_and_fd(scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5, 2))
    # per-sample loss weights: sample 0 gets a tiny gradient (not clipped), 1 and 2 large ones
    a = np.array([1e-4, 1.0, 30.0])[:, None, None, None] * rng.standard_normal(x.shape)

    def f(z):
        return jnp.sum(a * jnp.sin(z) + 0.1 * a * z ** 2)

    xj = jnp.asarray(x, jnp.float32)
    assert np.array_equal(np.asarray(U.l1_gradient_clip(xj, scale)), x.astype(np.float32))
    got = np.asarray(jax.grad(lambda z: f(U.l1_gradient_clip(z, scale)))(xj), np.float64)
    # finite differences of f (float64 numpy), then the numpy statement of the backward rule
    eps = 1e-5
    fd = np.zeros_like(x)
    fn = lambda z: float(np.sum(a * np.sin(z) + 0.1 * a * z ** 2))
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        fd[i] = (fn(x + e) - fn(x - e)) / (2 * eps)
    want = U.l1_gradient_clip_reference(fd, scale)
    for b in range(3):   # float32 forward: tolerance relative to each sample's gradient scale
        np.testing.assert_allclose(got[b], want[b], rtol=1e-4, atol=1e-5 * np.abs(want[b]).max())
    tau = 1 / math.sqrt(4 * 5 * 2)
    norms = np.sqrt((got ** 2).sum(axis=(1, 2, 3)))
    assert norms[0] < scale * tau * 0.1                    # small gradient passes unchanged
    np.testing.assert_allclose(norms[1:], scale * tau, rtol=1e-5)   # large ones clipped
    np.testing.assert_allclose(got[0], scale * fd[0], rtol=1e-4, atol=1e-5 * np.abs(fd[0]).max())


def test_l1_gradient_clip_zero_gradient_and_jit():
    x = jnp.ones((2, 3, 3, 4))
    g = jax.jit(jax.grad(lambda z: jnp.sum(U.l1_gradient_clip(z) * 0.0)))(x)
    assert np.all(np.asarray(g) == 0) and np.all(np.isfinite(np.asarray(g)))


# ----------------------------------------------------------------------------------------------
# SRF dictionary and estimator
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CAMSPEC.is_file(), reason="shared camspec database absent")
def test_camspec_dictionary():
    d = U.load_srf_dictionary(str(CAMSPEC))
    assert d.n_cameras == 28 and d.curves.shape == (28, 31, 3)
    np.testing.assert_allclose(d.curves.sum(axis=1), 1.0, rtol=1e-5)
    assert "Nikon D700" in d.names and d.source == str(CAMSPEC)


def test_dictionary_fallback_and_errors(monkeypatch):
    monkeypatch.delenv(U.CAMSPEC_ENV, raising=False)
    U.load_srf_dictionary.cache_clear()
    with pytest.warns(UserWarning, match="falling back"):
        d = U.load_srf_dictionary("auto")
    assert set(d.names) <= set(physics.list_srfs()) and d.source == "builtin"
    assert {"cie1964", "nikon_d5100", "canon_5d_mk2"} <= set(d.names)
    assert d.curves.shape == (d.n_cameras, 31, 3)
    np.testing.assert_allclose(d.curves.sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no_such_db.txt"):
        U.load_srf_dictionary("/nonexistent/no_such_db.txt")
    U.load_srf_dictionary.cache_clear()


def test_estimated_srf_is_convex_combination_times_grayworld_amplitude():
    d = U.load_srf_dictionary("builtin")
    rgb = smooth_rgb(b=3)
    est = U.SRFEstimator(d.n_cameras)
    v = random_variables(est, rgb)
    w = jax.jit(est.apply)(v, rgb)
    assert w.shape == (3, d.n_cameras, 3)
    srf = np.asarray(U.combine_srf(w, jnp.asarray(d.curves)), np.float64)
    w = np.asarray(w, np.float64)
    sig = 1 / (1 + np.exp(-w))
    amp = sig.mean(axis=1) / sig.mean(axis=(1, 2))[:, None]
    np.testing.assert_allclose(srf.sum(axis=1), amp, rtol=1e-5)   # columns of D sum to 1
    np.testing.assert_allclose(amp.mean(axis=1), 1.0, rtol=1e-6)
    # recover the mixing weights by least squares: they are the softmax, non-negative, sum 1
    for b in range(3):
        for i in range(3):
            atoms = d.curves[:, :, i].T.astype(np.float64)         # (C, N)
            coef = np.linalg.lstsq(atoms, srf[b, :, i] / amp[b, i], rcond=None)[0]
            soft = np.exp(w[b, :, i]) / np.exp(w[b, :, i]).sum()
            np.testing.assert_allclose(coef, soft, atol=2e-4)
            assert coef.min() > -1e-4 and abs(coef.sum() - 1) < 1e-4


def test_srf_estimator_rejects_small_images():
    with pytest.raises(ValueError, match="H, W >= 16"):
        jax.eval_shape(U.SRFEstimator(5).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------------------------
# Generator structure
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def generator():
    g = U.Generator()
    rgb = smooth_rgb()
    srf = jnp.asarray(np.stack([physics.get_srf("nikon_d5100"),
                                physics.get_srf("canon_5d_mk2")]))       # per image (B, C, 3)
    v = random_variables(g, rgb, srf, scale=0.15)
    return g, v, rgb, srf, jax.jit(g.apply)


def test_generator_back_projection_refinement(generator):
    """Stage 0 sees X, stage t the error X - C_o Y^(t); running sum; LeakyReLU(0.001) output;
    residual = X - C_o Y^(T) before the LeakyReLU."""
    g, v, rgb, srf, apply = generator
    hsi, res = apply(v, rgb, srf)
    stage = U.GeneratorStage()
    stage_ms = U.GeneratorStage(mean_sub=True)
    acc, inp = 0.0, rgb
    for t in range(4):
        mod = stage if t == 0 else stage_ms
        acc = acc + mod.apply({"params": v["params"][f"stages_{t}"]}, inp)
        inp = rgb - jnp.einsum("bhwc,bck->bhwk", acc, srf)
    np.testing.assert_allclose(np.asarray(hsi), np.asarray(jnp.where(acc >= 0, acc, 1e-3 * acc)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res), np.asarray(inp), rtol=1e-5, atol=1e-6)
    assert np.asarray(acc).min() < 0 < np.asarray(acc).max()     # the LeakyReLU is exercised


def test_generator_prior_starts_at_the_smooth_inverse(generator):
    """prior_lambda > 0 (ours): Y^(0) = smooth_inverse(X, C_o, lambda), stage outputs scaled by
    gates; the gates initialised at 0 give exactly the smooth inverse, non-zero gates add the
    authors' stages (checked against the running sum by hand); no gradient reaches C_o through
    Y^(0), and the stages' parameters get gradients once a gate is non-zero."""
    _, v, rgb, srf, _ = generator
    lam = 1e-3
    g = U.Generator(prior_lambda=lam)
    init = g.init(jax.random.PRNGKey(0), rgb, srf)["params"]
    assert {k: float(init[k]) for k in init if k.startswith("gate")} == {
        f"gate_{t}": 0.0 for t in range(4)}
    base = U.smooth_inverse(rgb, srf, lam)
    params = {**v["params"], **{f"gate_{t}": jnp.float32(0.0) for t in range(4)}}
    hsi, res = g.apply({"params": params}, rgb, srf)
    np.testing.assert_allclose(np.asarray(hsi), np.asarray(jax.nn.leaky_relu(base, 1e-3)),
                               rtol=1e-5, atol=1e-6)
    gates = (0.5, -0.25, 1.0, 2.0)
    params = {**v["params"], **{f"gate_{t}": jnp.float32(a) for t, a in enumerate(gates)}}
    hsi, res = g.apply({"params": params}, rgb, srf)
    acc, inp = base, rgb
    for t, a in enumerate(gates):
        mod = U.GeneratorStage(mean_sub=t > 0)
        acc = acc + a * mod.apply({"params": v["params"][f"stages_{t}"]}, inp)
        inp = rgb - jnp.einsum("bhwc,bck->bhwk", acc, srf)
    np.testing.assert_allclose(np.asarray(hsi), np.asarray(jax.nn.leaky_relu(acc, 1e-3)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res), np.asarray(inp), rtol=1e-4, atol=1e-5)
    zero = {**v["params"], **{f"gate_{t}": jnp.float32(0.0) for t in range(4)}}
    d_srf = jax.grad(lambda s: jnp.sum(g.apply({"params": zero}, rgb, s)[0]))(srf)
    assert float(jnp.max(jnp.abs(d_srf))) == 0.0
    d_par = jax.grad(lambda p: jnp.sum(g.apply({"params": p}, rgb, srf)[0] ** 2))(params)
    assert float(jnp.max(jnp.abs(d_par["stages_0"]["Upconv"]["conv"]["kernel"]))) > 0
    with pytest.raises(ValueError, match="prior_lambda"):
        U.Generator(prior_lambda=-1.0).init(jax.random.PRNGKey(0), rgb, srf)
    # the gates have no counterpart in the authors' code: not exported, kept when loading
    assert U.authors_name(("hsiG", "gate_0")) is None
    assert U.authors_name(("hsiG", "stages_0", "Upconv", "conv", "kernel")) == \
        "hsiG.stages.0.Upconv.conv.weight"


def test_generator_is_bias_free_and_positively_homogeneous(generator):
    g, v, rgb, srf, apply = generator
    hsi, res = apply(v, rgb, srf)
    hsi3, res3 = apply(v, 3.0 * rgb, srf)
    np.testing.assert_allclose(np.asarray(hsi3), 3.0 * np.asarray(hsi), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res3), 3.0 * np.asarray(res), rtol=1e-4, atol=1e-5)
    z, rz = apply(v, jnp.zeros_like(rgb), srf)
    assert not np.any(np.asarray(z)) and not np.any(np.asarray(rz))


def test_generator_golden(generator):
    # First run of this code (jax 0.10.2, flax 0.12, XLA:CPU): pins the layer order and wiring.
    g, v, rgb, srf, apply = generator
    hsi, res = apply(v, rgb, srf)
    y = np.asarray(hsi, np.float64)
    assert y.shape == (2, 16, 16, 31)
    np.testing.assert_allclose([y.sum(), np.abs(y).sum(), float(np.square(res).sum())],
                               GOLDEN_G, rtol=1e-4)


GOLDEN_G = [1237.1938034146237, 1240.6650921282621, 503.9252624511719]


# ----------------------------------------------------------------------------------------------
# Losses vs numpy
# ----------------------------------------------------------------------------------------------
def test_losses_vs_numpy():
    rng = np.random.default_rng(3)
    y = rng.standard_normal((2, 4, 5, 31)).astype(np.float32)
    r = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    yj, rj = jnp.asarray(y), jnp.asarray(r)
    np.testing.assert_allclose(U.back_projection_loss(rj), (r.astype(np.float64) ** 2).mean(),
                               rtol=1e-5)
    dif = np.diff(y.astype(np.float64), axis=-1)
    np.testing.assert_allclose(U.smoothness_loss(yj), (dif ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(U.smoothness_loss(yj, "l1"), np.abs(dif).mean(), rtol=1e-5)
    neg = np.minimum(y, 0).astype(np.float64)
    np.testing.assert_allclose(U.positivity_loss(yj), (-2 * neg).sum(axis=(1, 2, 3)).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(U.positivity_loss(yj, "paper"),
                               (4 * neg ** 2).sum(axis=(1, 2, 3)).mean(), rtol=1e-5)
    z = np.array([-3.0, 0.2, 5.0])
    p = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(U.bce_with_logits(jnp.asarray(z), 1.0), -np.log(p).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(U.bce_with_logits(jnp.asarray(z), 0.0), -np.log(1 - p).mean(),
                               rtol=1e-5)
    dn = np.asarray(U.discriminator_input(yj), np.float64)
    np.testing.assert_allclose(dn, y / (np.abs(y).mean(axis=(1, 2, 3), keepdims=True) + 1e-6),
                               rtol=1e-5)


def test_semantic_cross_entropy_ignore_index_vs_numpy():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(-1, 5, (2, 3, 4)).astype(np.int32)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels >= 0
    want = -np.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)[..., 0][valid].mean()
    np.testing.assert_allclose(U.semantic_cross_entropy(jnp.asarray(logits),
                                                        jnp.asarray(labels)), want, rtol=1e-5)
    assert float(U.semantic_cross_entropy(jnp.asarray(logits), -jnp.ones((2, 3, 4), int))) == 0
    # logits at 1/4 resolution are bilinearly up-sampled to the labels
    up = U.semantic_cross_entropy(jnp.asarray(logits), jnp.zeros((2, 12, 16), jnp.int32))
    assert np.isfinite(float(up))


def test_generator_loss_weights_code_vs_paper():
    rng = np.random.default_rng(5)
    y = jnp.asarray(rng.standard_normal((2, 4, 4, 31)), jnp.float32)
    r = jnp.asarray(rng.standard_normal((2, 4, 4, 3)), jnp.float32)
    d = jnp.asarray([0.3, -0.2])
    code, t = U.generator_loss(d, r, y, U.LossWeights())
    np.testing.assert_allclose(code, t["adv"] + 100 * t["bp"] + 10 * t["smooth"], rtol=1e-6)
    paper, tp = U.generator_loss(d, r, y, U.LossWeights.paper())
    np.testing.assert_allclose(paper, tp["adv"] + 100 * tp["bp"] + 10 * U.smoothness_loss(y, "l1")
                               + 1e-2 * U.positivity_loss(y, "paper"), rtol=1e-6)
    with pytest.raises(ValueError, match="gp"):
        U.LossWeights(gp="two")


def test_gradient_penalty_linear_discriminator():
    """For D(x) = <a, x> the input gradient is a everywhere: GP = (||a|| - center)^2."""
    a = jnp.asarray(np.random.default_rng(6).standard_normal((1, 3, 3, 2)), jnp.float32)
    d = lambda x: jnp.sum(a * x, axis=(1, 2, 3))
    real, fake = jnp.ones((4, 3, 3, 2)), jnp.zeros((4, 3, 3, 2))
    n = float(jnp.linalg.norm(a))
    for c in (0.0, 1.0):
        gp = U.gradient_penalty(d, real, fake, jax.random.PRNGKey(0), c)
        np.testing.assert_allclose(gp, (n - c) ** 2, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Unpaired baselines
# ----------------------------------------------------------------------------------------------
def test_min_norm_inverse_back_projects_exactly():
    srf = physics.get_srf("nikon_d5100")
    rgb = smooth_rgb(b=1, h=4, w=4)
    y = U.min_norm_inverse(rgb, srf)
    np.testing.assert_allclose(np.asarray(physics.project(y, srf)), np.asarray(rgb), atol=1e-5)
    # minimum norm: y lies in the column space of S
    coef = np.linalg.lstsq(srf, np.asarray(y).reshape(-1, 31).T, rcond=None)
    np.testing.assert_allclose(srf @ coef[0], np.asarray(y).reshape(-1, 31).T, atol=1e-5)


def test_smooth_inverse_normal_equations_and_constant_spectra():
    srf = physics.get_srf("canon_5d_mk2").astype(np.float64)
    rgb = np.asarray(smooth_rgb(b=1, h=3, w=3), np.float64)
    lam = 0.05
    y = np.asarray(U.smooth_inverse(jnp.asarray(rgb, jnp.float32), srf, lam), np.float64)
    dmat = np.diff(np.eye(31), axis=0)
    lam_eff = lam * np.trace(srf @ srf.T) / 31
    resid = (y @ srf - rgb) @ srf.T + lam_eff * y @ dmat.T @ dmat     # gradient of the objective
    assert np.abs(resid).max() < 1e-4 * np.abs(y).max()
    flat = np.full((1, 2, 2, 31), 0.37)
    rec = U.smooth_inverse(jnp.asarray(flat @ srf, jnp.float32), srf, lam)
    np.testing.assert_allclose(np.asarray(rec), flat, rtol=1e-4)


def test_select_smooth_lambda_does_not_oversmooth_smooth_spectra():
    """Smooth (80 nm Gaussian) spectra: the smoothest exact fit (small lambda) is as good as any
    and heavy smoothing loses, so the selection stays below the grid's top; it is the grid's
    RMSE minimiser (float64 solve: no float32 error penalising small lambda any more)."""
    srf = physics.get_srf("cie1964")
    wl = physics.WAVELENGTHS_31
    spectra = np.stack([np.exp(-((wl - c) / 80.0) ** 2) for c in np.linspace(380, 720, 40)])
    lam = U.select_smooth_lambda(spectra, srf)
    assert lam <= 1e-2
    y = spectra.reshape(1, 1, -1, 31).astype(np.float32)
    x = np.asarray(physics.project(y, srf))
    rmse = lambda v: float(np.sqrt(np.mean((np.asarray(U.smooth_inverse(x, srf, v)) - y) ** 2)))  # noqa: E731
    assert rmse(lam) <= min(rmse(v) for v in (1e-5, 1e-3, 1e-1, 1.0, 10.0)) + 1e-6
    assert rmse(10.0) > rmse(lam) * 1.05


# ----------------------------------------------------------------------------------------------
# Helpers with PyTorch semantics; weight mapping against PyTorch functional forwards
# ----------------------------------------------------------------------------------------------
def test_adaptive_pool_and_nearest_resize_vs_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.default_rng(7).standard_normal((2, 7, 9, 3)).astype(np.float32)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    for size in ((3, 4), (2, 2), (7, 3)):
        got = np.asarray(U.adaptive_pool(jnp.asarray(x), size, "max"))
        want = F.adaptive_max_pool2d(xt, size).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        got = np.asarray(U.adaptive_pool(jnp.asarray(x), size, "avg"))
        want = F.adaptive_avg_pool2d(xt, size).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for size in ((3, 4), (14, 5)):
        got = np.asarray(U.resize_nearest(jnp.asarray(x), size))
        want = F.interpolate(xt, size=size, mode="nearest").numpy().transpose(0, 2, 3, 1)
        np.testing.assert_array_equal(got, want)
    got = np.asarray(U.resize_bilinear(jnp.asarray(x), (14, 18)))
    want = F.interpolate(xt, size=(14, 18), mode="bilinear",
                         align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _torch_dense(torch, sd, pre, x, *, relu, mean_sub=False, groups_k=3):
    """The authors' denselayer (generator / SPFNet flavour) as PyTorch functional ops."""
    F = torch.nn.functional
    for part in ("compressLayer", "actlayer"):
        w = torch.from_numpy(sd[f"{pre}.{part}.conv.weight"])
        b = sd.get(f"{pre}.{part}.conv.bias")
        b = None if b is None else torch.from_numpy(np.array(b))
        if mean_sub:
            x = x - x.mean(dim=1, keepdim=True)
        g = 1 if part == "compressLayer" else w.shape[0]
        x = F.conv2d(x, w, b, padding=(w.shape[-1] - 1) // 2, groups=g)
        if relu:
            x = F.relu(x)
    return x


def test_generator_and_spfnet_weights_load_into_torch_layout():
    """Our weights, exported with to_torch_state_dict, drive a PyTorch functional forward of the
    authors' reconnet / SPFNet (NCHW, their parameter names) to the same output."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    d = U.load_srf_dictionary("builtin")
    model = U.USSR(srf_dictionary="builtin", n_classes=0)
    rgb = smooth_rgb(b=2, h=16, w=16)
    v = random_variables(model, rgb, method=U.USSR.reconstruct, scale=0.15)
    out = jax.jit(lambda v, x: model.apply(v, x, method=U.USSR.reconstruct))(v, rgb)
    sd = {k: np.ascontiguousarray(x) for k, x in U.to_torch_state_dict(v).items()}
    x = torch.from_numpy(np.asarray(rgb).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        f = x
        for s, (widths, k) in enumerate(((((16, 32)), 5), ((64, 64), 5), ((64, 64), 3),
                                         ((64, 64), 3))):
            feats = [f]
            for i in range(2):
                feats.append(_torch_dense(torch, sd, f"respG.stages.{s}.conv.{i}",
                                          torch.cat(feats, 1), relu=True))
            f = F.adaptive_max_pool2d(feats[-1], f.shape[2] // 2)
        feats = [f]
        for i in range(3):
            feats.append(_torch_dense(torch, sd, f"respG.fstage.conv.{i}", torch.cat(feats, 1),
                                      relu=True))
        w = _torch_dense(torch, sd, "respG.fstage.final_conv", feats[-1], relu=False)
        w = w.mean(dim=(2, 3)).reshape(2, d.n_cameras, 3)
        np.testing.assert_allclose(w.numpy(), np.asarray(out["weights"]), rtol=1e-4, atol=1e-5)
        resp = torch.from_numpy(np.asarray(out["srf"]).transpose(0, 2, 1).copy())   # (B, 3, C)
        msi, acc = [x], None
        for t in range(4):
            h = F.conv2d(msi[-1], torch.from_numpy(sd[f"hsiG.stages.{t}.Upconv.conv.weight"]),
                         padding=1)
            feats = [h]
            for i in range(5):
                feats.append(_torch_dense(torch, sd, f"hsiG.stages.{t}.denselayers.{i}",
                                          torch.cat(feats, 1), relu=i < 4,
                                          mean_sub=(t > 0 and i < 4)))
            acc = feats[-1] if acc is None else acc + feats[-1]
            msi.append(msi[0] - torch.einsum("bji,bikm->bjkm", resp, acc))
        hsi = F.leaky_relu(acc, 0.001)
    np.testing.assert_allclose(hsi.numpy().transpose(0, 2, 3, 1), np.asarray(out["hsi"]),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(msi[-1].numpy().transpose(0, 2, 3, 1), np.asarray(out["residual"]),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Discriminator / semantic branch / whole model
# ----------------------------------------------------------------------------------------------
def test_discriminator_flatten_order_and_batchnorm_modes():
    rng = np.random.default_rng(8)
    hsi = jnp.asarray(rng.random((2, 16, 16, 31)), jnp.float32)
    dis = U.Discriminator()
    v = random_variables(dis, hsi, scale=0.1)
    logits = jax.jit(lambda v, x: dis.apply(v, x))(v, hsi)
    assert logits.shape == (2,)
    out, upd = jax.jit(lambda v, x: dis.apply(v, x, True, mutable=["batch_stats"]))(v, hsi)
    assert out.shape == (2,)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     upd["batch_stats"], v["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))          # every BN layer updates its stats


def test_semantic_branch_shapes_dropout_and_clipped_gradient():
    model = U.USSR(srf_dictionary="builtin", n_classes=4)
    rgb = smooth_rgb(b=2, h=16, w=16)
    hsi = jnp.asarray(np.random.default_rng(9).random((2, 16, 16, 31)), jnp.float32)
    v = random_variables(model, rgb, hsi, method=U.USSR.init_all, scale=0.1)

    def sem(h, train):
        out = model.apply(v, rgb, h, train, method=U.USSR.semantic,
                          rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
        return out[0]

    labels = jnp.asarray(np.random.default_rng(10).integers(0, 4, (2, 16, 16)), jnp.int32)

    @jax.jit
    def run(h):
        loss = lambda z: 1e3 * U.semantic_cross_entropy(sem(z, False), labels)
        return sem(h, False), sem(h, True), jax.grad(loss)(h)

    logits, logits_train, g = run(hsi)
    assert logits.shape == (2, 4, 4, 4)                      # E1 resolution: 1/4
    assert not np.allclose(np.asarray(logits_train), np.asarray(logits))   # dropout + BN
    norms = np.sqrt(np.square(np.asarray(g)).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(norms, 2.0 / math.sqrt(16 * 16 * 31), rtol=1e-4)  # scale 2


def test_param_tree_save_load(tmp_path):
    seg = U.RGBSegmenter(3, width=8, blocks=1)
    v = random_variables(seg, jnp.zeros((1, 16, 16, 3)))
    p = U.save_param_tree(tmp_path / "e1.npz", v)
    back = U.load_param_tree(p, template=v)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, v)
    other = random_variables(U.RGBSegmenter(3, width=4, blocks=1), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="shape"):
        U.load_param_tree(p, template=other)
    with pytest.raises(FileNotFoundError):
        U.load_param_tree(tmp_path / "missing.npz")


def test_paper_metrics_and_srf_accuracy():
    rng = np.random.default_rng(11)
    gt = rng.uniform(0.1, 0.9, (1, 12, 12, 31)).astype(np.float32)
    pred = np.clip(gt + 0.01 * rng.standard_normal(gt.shape), 0, 1).astype(np.float32)
    mse = ((pred.astype(np.float64) - gt) ** 2).mean(axis=(1, 2))
    want = (10 * np.log10(1 / mse)).mean(axis=-1)
    np.testing.assert_allclose(U.psnr_per_band(jnp.asarray(pred), jnp.asarray(gt)), want,
                               rtol=1e-5)
    m = U.paper_metrics(jnp.asarray(pred), jnp.asarray(gt))
    assert set(m) == {"psnr", "ssim", "sam", "mrae"}
    srf = physics.get_srf("nikon_d5100")
    same = U.srf_accuracy(srf, srf)
    np.testing.assert_allclose(same["auc"], 1.0, rtol=1e-3)
    assert same["angle"][0] < 1e-3
    other = U.srf_accuracy(physics.get_srf("cie1964"), srf)
    assert other["auc"][0] < same["auc"][0] and other["angle"][0] > 1.0


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------
def test_presets_and_ablation_rows():
    from jaxspec.configs import ussr as C
    for preset in (C.paper, C.cpu, C.smoke):
        cfg = preset()
        assert cfg.method == "ussr" and {**cfg.model, "dw_impl": "auto"} == {**C.MODEL, "dw_impl": "auto"}
        assert C.loss_weights(cfg) == U.LossWeights()              # code weights by default
        assert cfg.streams["rgb"]["split"] != cfg.streams["hsi"]["split"]   # disjoint scenes
    assert C.paper().batch_size == 24 and C.paper().steps == 50 * 208
    cfg = C.cpu()
    first = C.loss_weights(C.ablation(cfg, "adversarial"))
    assert (first.bp, first.smooth, first.pos, first.sem, first.l1gc) == (0, 0, 0, 0, False)
    full = C.loss_weights(C.ablation(cfg, "+S_sem"))
    assert full == U.LossWeights.paper()
    assert C.loss_weights(C.ablation(cfg, "0-GP")).gp == "zero"
    assert [r[0] for r in C.ABLATION_LADDER][-1] == "+S_sem"
    with pytest.raises(ValueError, match="ablation row"):
        C.ablation(cfg, "+S_everything")
    with pytest.raises(ValueError, match="model.loss"):
        C.loss_weights(cfg.replace(model={**cfg.model, "loss": "mse"}))
    from jaxspec import registry
    method = registry.get("ussr")
    assert method.step_kind == "phases"
    assert [p.name for p in method.step_options["phases"]] == ["dis", "gen", "sem"]
    model = method.model(C.ablation(cfg, "+S_bp").replace(
        model={**C.ablation(cfg, "+S_bp").model, "srf_dictionary": "builtin"}))
    assert model.apply({}, method=U.USSR.loss_weights) == C.loss_weights(C.ablation(cfg, "+S_bp"))


# ----------------------------------------------------------------------------------------------
# optimiser groups and the train step
# ----------------------------------------------------------------------------------------------
def test_optimizer_groups_update_only_their_phase():
    params = {"hsiG": {"w": jnp.ones(3)}, "respG": {"w": jnp.ones(2)},
              "dishsi": {"w": jnp.ones(4)}, "extractor": {"w": jnp.ones(5)},
              "E1": {"w": jnp.ones(6)}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    opts = U.make_optimizers(100)
    moved = {}
    for phase, tx in opts.items():
        upd, _ = tx.update(grads, tx.init(params), params)
        moved[phase] = sorted(k for k, v in upd.items() if np.any(np.asarray(v["w"]) != 0))
    assert moved == {"dis": ["dishsi"], "gen": ["extractor", "hsiG", "respG"]}
    # Adam's first step is -lr * sign(g); SGD with weight decay: -lr * (g + wd * w)
    upd, _ = opts["gen"].update(grads, opts["gen"].init(params), params)
    np.testing.assert_allclose(upd["hsiG"]["w"], -1e-4, rtol=1e-3)
    np.testing.assert_allclose(upd["extractor"]["w"], -1e-3 * (1 + 1e-4), rtol=1e-5)
    upd, _ = opts["dis"].update(grads, opts["dis"].init(params), params)
    np.testing.assert_allclose(upd["dishsi"]["w"], -5e-4, rtol=1e-3)
    upd, _ = U.make_optimizers(100, train_e1=True)["gen"].update(
        grads, U.make_optimizers(100, train_e1=True)["gen"].init(params), params)
    assert np.all(np.asarray(upd["E1"]["w"]) != 0)


def test_shuffle_pixels_and_d_pixels_wiring():
    """``shuffle_pixels`` permutes the B*H*W spectra (the same set; key-determined order), and
    ``LossWeights(d_pixels=True)`` feeds every D input of both phases through it, after the
    per-image mean normalisation; ``d_pixels=False`` (the authors') feeds D unshuffled."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 4, 4, 31)), jnp.float32)
    key = jax.random.PRNGKey(3)
    y = U.shuffle_pixels(x, key)
    rows = lambda a: np.sort(np.asarray(a).reshape(-1, 31), axis=0)   # noqa: E731
    np.testing.assert_array_equal(rows(y), rows(x))
    assert not np.array_equal(np.asarray(y), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(U.shuffle_pixels(x, key)), np.asarray(y))
    fake = jnp.asarray(rng.random((2, 4, 4, 31)), jnp.float32)
    seen = []

    def apply_fn(variables, *args, method=None, mutable=None, **kw):
        if method is U.USSR.reconstruct:
            return {"hsi": fake, "residual": jnp.zeros((2, 4, 4, 3))}
        if method is U.USSR.discriminate:
            seen.append(args[0])
            return jnp.sum(args[0] * jnp.arange(16.0).reshape(1, 4, 4, 1), (1, 2, 3)), \
                {"batch_stats": {}}
        if method is U.USSR.loss_weights:
            return None
        raise AssertionError(method)

    batch = {"rgb": jnp.zeros((2, 4, 4, 3)), "hsi_real": x, "label": None}
    rngs = {"gp": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
    for d_pixels in (False, True):
        losses = U.make_phase_losses(U.LossWeights(d_pixels=d_pixels, sem=0.0), semantic=False)
        seen.clear()
        losses["dis"](apply_fn, {"params": {}}, batch, rngs)
        losses["gen"](apply_fn, {"params": {}}, batch, rngs)
        want = [U.discriminator_input(fake), U.discriminator_input(x),
                U.discriminator_input(fake)]
        assert len(seen) == 3
        for got, w in zip(seen, want):
            np.testing.assert_allclose(rows(got), rows(w), rtol=1e-6)
            assert np.allclose(np.asarray(got), np.asarray(w)) != d_pixels


@pytest.mark.slow
def test_unpaired_train_step_runs_and_respects_groups():
    """Two jitted USSR iterations on random unpaired data (minutes of XLA:CPU compile)."""
    model = U.USSR(srf_dictionary="builtin", n_classes=3, segmenter_width=4, segmenter_blocks=1,
                   dw_impl="lax")
    rng = np.random.default_rng(0)
    batch = {"rgb": jnp.asarray(rng.random((2, 16, 16, 3)), jnp.float32),
             "hsi_real": jnp.asarray(rng.random((2, 16, 16, 31)), jnp.float32),
             "label": jnp.asarray(rng.integers(-1, 3, (2, 16, 16)), jnp.int32)}
    opts = U.make_optimizers(10)
    state = jax.jit(lambda k: U.init_train_state(model, opts, k, batch["rgb"],
                                                 batch["hsi_real"]))(jax.random.PRNGKey(0))
    before = jax.tree_util.tree_map(np.asarray, {"p": state["params"], "s": state["batch_stats"]})
    step = jax.jit(U.make_train_step(model, opts, U.make_phase_losses()))
    for _ in range(2):
        state, met = step(state, batch)
    met = {k: float(v) for k, v in met.items()}
    assert all(np.isfinite(list(met.values()))), met
    assert {"loss/dis", "loss/gen", "gen/adv", "gen/bp", "gen/smooth", "gen/sem"} <= set(met)
    changed = lambda a, b: bool(np.any(np.asarray(a) != b))
    for top in ("hsiG", "respG", "dishsi", "extractor"):
        assert any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            changed, state["params"][top], before["p"][top]))), top
    assert not any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        changed, state["params"]["E1"], before["p"]["E1"])))           # E1 frozen
    assert any(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        changed, state["batch_stats"]["dishsi"], before["s"]["dishsi"])))


@pytest.mark.slow
def test_cli_engine_two_iterations_on_unpaired_streams(tmp_path):
    """``--method ussr`` through the engine: the smoke preset on tiny unpaired streams (RGB +
    material labels / disjoint cubes), two iterations of the dis/gen/sem phases, evaluation."""
    from jaxspec.configs import ussr as C
    from jaxspec.train.loop import train_and_evaluate

    rng = np.random.default_rng(0)

    def example(i, with_label):
        hsi = rng.uniform(0.05, 0.9, (20, 20, 31)).astype(np.float32)
        ex = {"hsi": hsi, "rgb": hsi @ physics.get_srf("nikon_d5100"),
              "bands": physics.WAVELENGTHS_31, "name": f"s{i}"}
        if with_label:
            ex["label"] = rng.integers(0, 13, (20, 20)).astype(np.int32)
        return ex

    cfg = C.smoke().replace(model={**C.smoke().model, "srf_dictionary": "builtin"},
                            eval_every=0, ckpt_every=2)
    train = {"rgb": [example(i, True) for i in range(3)],
             "hsi": [example(10 + i, False) for i in range(3)]}
    s = train_and_evaluate(cfg, tmp_path / "ussr", train_source=train,
                           eval_source=[example(20, False)], progress=False, figures=0)
    assert s["step"] == 2 and np.isfinite(s["final_loss"])
    assert np.isfinite(s["eval"]["psnr"])


@pytest.mark.slow
def test_predict_reports_the_estimated_camera(tmp_path, capsys):
    """``python -m jaxspec.predict`` on a USSR run prints which dictionary camera SPFNet
    thinks took the photo and writes the whole estimate (weights, per-channel argmax, SRF) into
    the sidecar; the numbers are SPFNet's softmax on the (area-averaged) photo."""
    from PIL import Image

    from jaxspec import api, convert, predict
    from jaxspec.configs import ussr as C
    cfg = C.smoke().replace(model={**C.smoke().model, "srf_dictionary": "builtin",
                                   "n_classes": 0})
    model = api.Model(method=registry.get("ussr"), config=cfg,
                      module=registry.get("ussr").model(cfg))
    variables = model.init(seed=3, image_size=32)
    wd = convert.write_workdir(tmp_path / "run", cfg, variables)
    rng = np.random.default_rng(0)
    img = (rng.uniform(0, 1, (96, 1100, 3)) ** 0.5 * 255).astype(np.uint8)   # long side > 512
    Image.fromarray(img).save(tmp_path / "photo.png")
    assert predict.main(["--workdir", str(wd), "--out", str(tmp_path / "out"), "--no-progress",
                         str(tmp_path / "photo.png")]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "estimated camera" in ln]
    est = json.loads((tmp_path / "out" / "photo.json").read_text())["estimate"]
    names = U.load_srf_dictionary("builtin").names
    assert len(line) == 1 and est["camera"] in line[0] and est["camera"] in names
    assert est["estimated_on"] == [32, 366]        # factor 3: 1100 / 3 <= 512 and est["dictionary_size"] == len(names)
    # the same numbers straight from the module, on the photo as the model sees it
    spec = predict.model_input_spec(wd)
    x, _ = predict.read_model_rgb(str(tmp_path / "photo.png"), spec, workdir=wd)
    small = x[:96, :1098].reshape(32, 3, 366, 3, 3).mean(axis=(1, 3))
    w = np.asarray(model.module.apply(variables, jnp.asarray(small)[None],
                                      method=U.USSR.estimate_srf_weights))[0]
    p = np.exp(w - w.max(0)) / np.exp(w - w.max(0)).sum(0)
    assert est["camera"] == names[int(np.argmax(p.mean(1)))]
    np.testing.assert_allclose(est["weight"], p.mean(1).max(), atol=1e-4)
    assert est["per_channel"] == {c: names[int(np.argmax(p[:, k]))] for k, c in enumerate("RGB")}
    assert np.asarray(est["srf"]).shape == (31, 3)
    np.testing.assert_allclose(np.asarray(est["srf"]).sum(0), est["amplitude"], atol=1e-4)


def test_random_dictionary_srf_mixes_two_cameras():
    curves = np.asarray(U.load_srf_dictionary("builtin").curves)
    srf = np.asarray(U.random_dictionary_srf(jax.random.PRNGKey(0), curves, 64))
    assert srf.shape == (64,) + curves.shape[1:]
    np.testing.assert_allclose(srf.sum(axis=1), 1.0, rtol=1e-5)          # columns still sum to 1
    # each is t C_j + (1 - t) C_k for some pair: the residual of the best pair fit is ~0
    for s in srf[:8]:
        best = min(np.abs(s - (t * curves[j] + (1 - t) * curves[k])).max()
                   for j in range(len(curves)) for k in range(len(curves))
                   for t in [float(np.clip(np.sum((s - curves[k]) * (curves[j] - curves[k]))
                                           / max(np.sum((curves[j] - curves[k]) ** 2), 1e-12),
                                           0, 1))])
        assert best < 1e-6
    again = np.asarray(U.random_dictionary_srf(jax.random.PRNGKey(0), curves, 64))
    np.testing.assert_array_equal(again, srf)


def test_synthetic_pair_terms_train_the_generator_and_the_srf_estimator():
    """``LossWeights(syn, syn_srf)``: the HSI-stream cubes rendered through random dictionary
    cameras; ``syn`` = mean |G(X_s) - Y_r|, ``syn_srf`` = relative squared error of M's SRF.
    ``syn`` reaches G (and M through G's back-projection), ``syn_srf`` only M; 0 = absent."""
    import optax
    model = U.USSR(srf_dictionary="builtin", n_classes=0, dw_impl="lax")
    rng = np.random.default_rng(0)
    batch = {"rgb": smooth_rgb(2, 16, 16),
             "hsi_real": jnp.asarray(rng.random((2, 16, 16, 31)), jnp.float32)}
    variables = random_variables(model, batch["rgb"], batch["hsi_real"],
                                 method=U.USSR.init_all, scale=0.05)
    rngs = {"gp": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}
    only = dict(adv=0.0, bp=0.0, smooth=0.0, sem=0.0)

    def grads(**w):
        loss = U.make_phase_losses(U.LossWeights(**{**only, **w}), semantic=False)["gen"]
        f = lambda p: loss(model.apply, {**variables, "params": p}, batch, rngs)  # noqa: E731
        (val, aux), g = jax.value_and_grad(f, has_aux=True)(variables["params"])
        norm = {k: float(optax.global_norm(g[k])) for k in ("hsiG", "respG", "dishsi")}
        return float(val), aux, norm

    val, aux, g = grads(syn=1.0)
    x_s, srf_s = model.apply(variables, batch["hsi_real"], jax.random.fold_in(rngs["gp"], 4),
                             method=U.USSR.render_random_cameras)
    np.testing.assert_allclose(np.asarray(x_s), np.einsum("bhwc,bck->bhwk", batch["hsi_real"],
                                                          srf_s), rtol=1e-5)
    out = model.apply(variables, x_s, True, method=U.USSR.reconstruct)
    np.testing.assert_allclose(float(aux["syn"]), float(jnp.mean(jnp.abs(
        out["hsi"] - batch["hsi_real"]))), rtol=1e-5)
    np.testing.assert_allclose(float(aux["syn_srf"]), float(
        jnp.sum((out["srf"] - srf_s) ** 2) / jnp.sum(srf_s ** 2)), rtol=1e-5)
    np.testing.assert_allclose(val, float(aux["syn"]), rtol=1e-6)
    assert g["hsiG"] > 0 and g["respG"] > 0 and g["dishsi"] == 0
    val, aux, g = grads(syn_srf=1.0)
    np.testing.assert_allclose(val, float(aux["syn_srf"]), rtol=1e-6)
    assert g["hsiG"] == 0 and g["respG"] > 0
    loss = U.make_phase_losses(U.LossWeights(**only, syn=2.0, syn_kind="squared"),
                               semantic=False)["gen"]
    val, aux = loss(model.apply, variables, batch, rngs)
    want = float(jnp.mean((out["hsi"] - batch["hsi_real"]) ** 2))
    np.testing.assert_allclose([float(aux["syn"]), float(val)], [want, 2 * want], rtol=1e-5)
    loss = U.make_phase_losses(U.LossWeights(**only), semantic=False)["gen"]
    _, aux = loss(model.apply, variables, batch, rngs)
    assert "syn" not in aux and "syn_srf" not in aux
    with pytest.raises(ValueError, match="syn_kind"):
        U.LossWeights(syn_kind="l2")
