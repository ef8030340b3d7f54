"""Classical HSI-MSI fusion baselines (jaxspec.fusion_baselines): exact cases, gains over
bicubic on exactly low-rank scenes, alignment, shapes and input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxspec import fusion_baselines as F
from jaxspec import metrics as M
from jaxspec import physics as P

S = 4
H = 32
C = 31


def _psnr(a, b):
    return np.asarray(M.psnr(a, b))


@pytest.fixture(scope="module")
def scene():
    """Three linearly mixed endmembers peaked in B, G, R (well-conditioned SRF projections),
    abundances summing to one with pure 8x8 blocks plus smooth mixing; Nikon SRF, DAEM PSF 4."""
    rng = np.random.default_rng(0)
    wl = np.arange(C)
    e = np.stack([np.exp(-0.5 * ((wl - c) / 3.0) ** 2) + 0.05 for c in (5, 14, 24)])
    lab = rng.integers(0, 3, (2, H // 8, H // 8)).repeat(8, 1).repeat(8, 2)
    smooth = np.asarray(jax.image.resize(rng.random((2, H // 4, H // 4, 3)), (2, H, H, 3), "cubic"))
    a = 0.7 * np.eye(3)[lab] + 0.3 * np.clip(smooth, 0, None)
    a /= a.sum(-1, keepdims=True)
    z = (0.5 * a @ e).astype(np.float32)                       # (2, H, H, C)
    srf = P.get_srf("daem_nikon")
    psf = np.asarray(P.daem_psf(4, S))
    lr, msi = P.make_sr_pair(z, psf, S, srf, mode="daem")
    up = F.bicubic(lr, S, lr_center=F.psf_lr_center(psf, S))
    return dict(z=z, e=e, a=a, srf=srf, psf=psf, lr=lr, msi=msi, bicubic=_psnr(up, z))


def test_bicubic_shapes_and_alignment():
    """Cubic interpolation reproduces a linear ramp exactly (away from the border) when LR
    pixel i sits at HR c + s i, for the default cell centre and any other ``lr_center``."""
    yy, xx = np.mgrid[:H, :H].astype(np.float32)
    for c in ((S - 1) / 2, S / 2):
        ramp = (0.1 + 0.01 * yy + 0.02 * xx)[None, :, :, None].repeat(2, -1)
        lr = (0.1 + 0.01 * (c + S * np.arange(H // S))[:, None]
              + 0.02 * (c + S * np.arange(H // S))[None, :])[None, :, :, None].repeat(2, -1)
        up = F.bicubic(lr.astype(np.float32), S, lr_center=c if c != (S - 1) / 2 else None)
        assert up.shape == (1, H, H, 2) and up.dtype == jnp.float32
        inner = slice(2 * S, H - 2 * S)
        np.testing.assert_allclose(up[0, inner, inner], ramp[0, inner, inner], atol=1e-5)
    # the default is jax.image.resize
    lr = np.random.default_rng(0).random((2, 5, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(F.bicubic(lr, 3), jax.image.resize(lr, (2, 15, 18, 3), "cubic"),
                               atol=1e-6)


def test_psf_lr_center():
    assert F.psf_lr_center(None, 8) == (3.5, 3.5)
    c = F.psf_lr_center(np.asarray(P.daem_psf(4, 32)), 32)
    np.testing.assert_allclose(c, (16, 16), atol=0.05)       # DAEM: centre k//2, no padding
    c = F.psf_lr_center(np.asarray(P.daem_psf(4, 32)), 8)
    np.testing.assert_allclose(c, (4, 4), atol=0.05)         # k = 32, s = 8: pad 12


def test_gsa_joint_exact_for_k_endmembers(scene):
    """<= K mixed endmembers, true PSF: the intensity regression finds the SRF and the
    multivariate gains are the exact linear map MSI -> HSI, so GSA(joint) recovers Z."""
    out = F.gsa(scene["lr"], scene["msi"], S, scene["psf"], mode="joint")
    assert out.shape == scene["z"].shape and out.dtype == jnp.float32
    assert _psnr(out, scene["z"]).min() > 60


def test_lstsq_is_accurate_on_an_ill_conditioned_design():
    """GSA's regression design (31 correlated bands + the constant) has a condition number of
    ~1e4: float32 normal equations square it past float32's precision (here off by ~0.85 in the
    coefficients); the QR solve matches the float64 ridge solution."""
    rng = np.random.default_rng(0)
    n = 2000
    a = rng.random((n, 4)) @ rng.random((4, C)) + 1e-3 * rng.standard_normal((n, C))
    a = np.concatenate([a, np.ones((n, 1))], 1)
    b = a @ rng.standard_normal((C + 1, 3)) + 1e-3 * rng.standard_normal((n, 3))
    assert np.linalg.cond(a) > 3e3
    lam = 1e-6 * np.sum(a * a) / a.shape[1] + 1e-12
    want = np.linalg.solve(a.T @ a + lam * np.eye(C + 1), a.T @ b)
    got = np.asarray(F._lstsq(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
    np.testing.assert_allclose(got, want, atol=5e-4 * np.abs(want).max())
    # rank-deficient (a repeated column): the near-minimum-norm solution, finite
    a2 = np.concatenate([a, a[:, :1]], 1).astype(np.float32)
    got2 = np.asarray(F._lstsq(jnp.asarray(a2), jnp.asarray(b, jnp.float32)))
    assert np.isfinite(got2).all()
    np.testing.assert_allclose(got2[0], got2[-1], atol=1e-3 * np.abs(want).max())
    np.testing.assert_allclose(a2 @ got2, a @ want, atol=1e-3)


def test_lr_regression_exact_for_linear_spectra_and_uses_the_psf(scene):
    """Spectra linear in the MSI values (3 endmembers, invertible SRF projection): the affine
    map fitted on (S(Y), X) is exact at HR (any PSF: both maps are linear and commute)."""
    out = F.lr_regression(scene["lr"], scene["msi"], S, scene["psf"])
    assert out.shape == scene["z"].shape and out.dtype == jnp.float32
    assert _psnr(out, scene["z"]).min() > 60
    # a random (non-linear) scene: the map depends on the PSF; equal to a numpy fit on S(Y)
    z2 = np.random.default_rng(1).random((2, H, H, C)).astype(np.float32)
    lr2, msi2 = P.make_sr_pair(z2, scene["psf"], S, scene["srf"], mode="daem")
    for psf in (scene["psf"], None):
        got = np.asarray(F.lr_regression(lr2, msi2, S, psf))
        k = np.full((S, S), 1.0 / S ** 2, np.float32) if psf is None else psf
        y_lr = np.asarray(P.daem_degrade(msi2, k, S), np.float64)
        for i in range(z2.shape[0]):
            d = np.concatenate([y_lr[i].reshape(-1, 3), np.ones((y_lr[i].size // 3, 1))], 1)
            w = np.linalg.lstsq(d, np.asarray(lr2[i], np.float64).reshape(-1, C), rcond=None)[0]
            want = np.asarray(msi2[i], np.float64) @ w[:3] + w[3]
            np.testing.assert_allclose(got[i], want, atol=3e-3)   # the tiny ridge
    diff = np.abs(np.asarray(F.lr_regression(lr2, msi2, S, scene["psf"]))
                  - np.asarray(F.lr_regression(lr2, msi2, S)))
    assert diff.max() > 0.02     # several times the fit tolerance
    with pytest.raises(ValueError, match="batch"):
        F.lr_regression(scene["lr"][:1], scene["msi"], S)


def test_back_project_makes_any_estimate_agree_with_the_lr_hsi(scene):
    """Iterative back-projection: the LR residual of the estimate shrinks geometrically to 0
    (the cubic upsampler is a near-inverse of S on the residual), the estimate gets closer to
    the truth where the per-pixel map was wrong, iters=0 is the identity, a traced PSF works
    under jit, and shapes / iteration counts are checked."""
    z, psf = scene["z"], scene["psf"]
    rng = np.random.default_rng(2)
    # a smooth spatial-spectral modulation the MSI cannot see (metamers): a low-pass error
    field = np.asarray(jax.image.resize(rng.random((2, 4, 4, C)), z.shape, "cubic"))
    z2 = (z * (0.7 + 0.6 * field)).astype(np.float32)
    lr2, msi2 = P.make_sr_pair(z2, psf, S, scene["srf"], mode="daem")
    start = F.lr_regression(lr2, msi2, S, psf)                 # a per-pixel map: not exact here
    res = [float(jnp.abs(P.daem_degrade(F.back_project(start, lr2, S, psf, iters=n), psf, S)
                         - lr2).mean()) for n in (0, 1, 3, 10)]
    assert res[0] > 1e-3 and res[1] < 0.5 * res[0] and res[2] < 0.1 * res[0], res
    assert res[3] < 1e-3 * res[0], res
    out = F.back_project(start, lr2, S, psf, iters=10)
    assert _psnr(out, z2).mean() > _psnr(start, z2).mean() + 1.0
    np.testing.assert_array_equal(np.asarray(F.back_project(start, lr2, S, psf, iters=0)),
                                  np.asarray(start))
    traced = jax.jit(lambda k: F.back_project(start, lr2, S, k, iters=3))(jnp.asarray(psf))
    np.testing.assert_allclose(np.asarray(traced),
                               np.asarray(F.back_project(start, lr2, S, psf, iters=3)), atol=1e-6)
    with pytest.raises(ValueError, match="hr must have shape"):
        F.back_project(start[:, :-S], lr2, S, psf)
    with pytest.raises(ValueError, match="iters"):
        F.back_project(start, lr2, S, psf, iters=-1)
    with pytest.raises(ValueError, match="psf size"):
        F.back_project(start, lr2, S, np.ones((2, 2)))


def test_same_degradation_of_make_sr_pair(scene):
    """The default make_sr_pair operator (odd PSF, reflect 'same' blur, phase-0 decimation) with
    a traced per-image PSF under jit: centre 0 from the kernel. GSA keeps the band means of the
    upsampled LR-HSI, which phase-0 decimation biases, so GSA(joint) is exact up to the band
    means here. The scene is shaded (abundances no longer sum to one) so that its centred
    spectra span all three endmembers: cubic upsampling with the 'same' centre is not affine at
    the borders, and a sum-to-one scene's upsampled cube would leave the centred LR span, where
    the intensity weights are not determined by the data."""
    psf = np.asarray(P.gaussian_psf(2 * S + 1, S / 2))
    assert F.psf_lr_center(psf, S, "same") == pytest.approx((0.0, 0.0), abs=1e-5)
    shade = np.asarray(jax.image.resize(np.random.default_rng(3).random((2, 4, 4, 1)),
                                        (2, H, H, 1), "cubic"))
    z = (scene["z"] * (0.6 + 0.8 * np.clip(shade, 0, 1))).astype(np.float32)
    lr, msi = P.make_sr_pair(z, psf, S, scene["srf"])
    bicubic = _psnr(F.bicubic(lr, S, lr_center=0.0), z)
    out = np.asarray(F.gsa(lr, msi, S, np.stack([psf, psf]), mode="joint", degradation="same"))
    assert (_psnr(out, z) > bicubic + 10).all()
    fixed = out - out.mean((1, 2), keepdims=True) + z.mean((1, 2), keepdims=True)
    assert _psnr(fixed, z).min() > 60
    # the same under an outer jit (PSF traced): the regression is solved by QR, so the result
    # does not depend on how XLA compiles the surrounding program
    f = jax.jit(lambda a, b, p: F.gsa(a, b, S, p, mode="joint", degradation="same"))
    got = np.asarray(f(lr, msi, np.stack([psf, psf])))
    fixed = got - got.mean((1, 2), keepdims=True) + z.mean((1, 2), keepdims=True)
    assert _psnr(fixed, z).min() > 60
    with pytest.raises(ValueError, match="odd"):
        F.gsa(lr, msi, S, degradation="same")


def test_gsa_finite_on_a_3x3_lr_image():
    """x32 under the 'same' operator on a 96 x 96 image leaves 9 LR pixels for 32 unknowns per
    regression (once NaN with the float32 normal equations): the ridge-augmented QR solve is
    full rank, so GSA stays finite."""
    z = np.random.default_rng(0).random((2, 96, 96, C)).astype(np.float32)
    psf = np.asarray(P.gaussian_psf(65, 16.0))
    lr, msi = P.make_sr_pair(z, psf, 32, P.get_srf("daem_nikon"))
    assert lr.shape == (2, 3, 3, C)
    for mode in ("grouped", "joint"):
        out = np.asarray(F.gsa(lr, msi, 32, np.stack([psf, psf]), mode=mode, degradation="same"))
        assert np.isfinite(out).all(), mode


def test_gsa_grouped_exact_for_rank_one_and_better_than_bicubic(scene):
    z = scene["z"]
    out = F.gsa(scene["lr"], scene["msi"], S, scene["psf"])
    assert (_psnr(out, z) > scene["bicubic"] + 10).all()
    # rank one: Z = a(x) e -> the detail of every group is exact
    z1 = (scene["a"][..., :1] * 0.3 * (scene["e"][1] + scene["e"][2])).astype(np.float32)
    lr1, msi1 = P.make_sr_pair(z1, scene["psf"], S, scene["srf"], mode="daem")
    assert _psnr(F.gsa(lr1, msi1, S, scene["psf"]), z1).min() > 60
    # a box PSF assumption (psf=None) still beats bicubic by a wide margin
    assert (_psnr(F.gsa(scene["lr"], scene["msi"], S), z) > scene["bicubic"] + 5).all()


def test_cnmf_recovers_low_rank_scene(scene):
    z = scene["z"]
    out = F.cnmf(scene["lr"], scene["msi"], S, scene["srf"], scene["psf"], n_endmembers=3,
                 iters=100)
    assert out.shape == z.shape and out.dtype == jnp.float32
    got = _psnr(out, z)
    assert (got > 40).all() and (got > scene["bicubic"] + 10).all(), (got, scene["bicubic"])
    # one SRF per image (B, C, K) and per-image PSFs give the same answer
    out2 = F.cnmf(scene["lr"], scene["msi"], S, np.stack([scene["srf"]] * 2),
                  np.stack([scene["psf"]] * 2), n_endmembers=3, iters=100)
    np.testing.assert_allclose(out2, out, atol=1e-5)


def test_jit_and_errors(scene):
    lr, msi, srf = scene["lr"], scene["msi"], scene["srf"]
    f = jax.jit(lambda a: F.bicubic(a, S, lr_center=S / 2))
    assert f(lr).shape == scene["z"].shape
    with pytest.raises(ValueError, match="divisible"):
        F.gsa(lr, msi[:, :-1], S)
    with pytest.raises(ValueError, match="lr_hsi"):
        F.gsa(lr, msi, S * 2)
    with pytest.raises(ValueError, match="batch"):
        F.gsa(lr[:1], msi, S)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        F.bicubic(lr[0], S)
    with pytest.raises(ValueError, match="scale"):
        F.bicubic(lr, 0)
    with pytest.raises(ValueError, match="floating"):
        F.bicubic(np.ones((1, 2, 2, 3), np.int32), 2)
    with pytest.raises(ValueError, match="NaN"):
        F.bicubic(np.full((1, 2, 2, 3), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="srf"):
        F.cnmf(lr, msi, S, srf[:30])
    with pytest.raises(ValueError, match="psf size"):
        F.cnmf(lr, msi, S, srf, np.ones((2, 2)))
    with pytest.raises(ValueError, match="mode"):
        F.gsa(lr, msi, S, mode="pca")
    with pytest.raises(ValueError, match="degradation"):
        F.gsa(lr, msi, S, degradation="valid")
    with pytest.raises(ValueError, match="iters"):
        F.cnmf(lr, msi, S, srf, iters=0)


def test_registered_methods_end_to_end(tmp_path):
    """bicubic and cnmf (smoke presets) through the engine: no training, eval.json written from
    pairs the fusion task synthesises; CNMF beats bicubic."""
    import json

    from jaxspec import registry
    from jaxspec.train import train_and_evaluate

    psnr = {}
    for name in ("bicubic", "cnmf"):
        m = registry.get(name)
        assert m.task == "fusion" and m.step_kind == "none"
        train_and_evaluate(m.config("smoke", max_eval_images=1), str(tmp_path / name))
        ev = json.loads((tmp_path / name / "eval.json").read_text())
        assert not (tmp_path / name / "checkpoints").exists()
        psnr[name] = ev["mean"]["psnr"]
    assert psnr["cnmf"] > psnr["bicubic"] + 5, psnr


def test_registered_baselines_on_the_daem_protocol(tmp_path):
    """The cpu/paper presets synthesise pairs with the DAEM operator (psf="daem": valid
    correlation with stride s, an s x s kernel); the baselines' ``degradation`` option is
    filled from the fusion config (it was left at "same", so ``train.py --method bicubic``
    stopped with "needs an odd psf size"). A conflicting explicit value is an error."""
    import json

    import pytest

    from jaxspec import registry, tasks
    from jaxspec.train import train_and_evaluate

    for name in ("bicubic", "gsa"):
        m = registry.get(name)
        cfg = m.config("cpu", max_eval_images=1)
        assert tasks.info_from_config(cfg, m).degradation == "daem"
        assert tasks.resolve_config(cfg, m, 31).model["degradation"] == "daem"
        train_and_evaluate(cfg, str(tmp_path / name))
        ev = json.loads((tmp_path / name / "eval.json").read_text())
        assert ev["num_images"] == 1 and 15 < ev["mean"]["psnr"] < 80, ev["mean"]
    cfg = registry.get("gsa").config("cpu", model={"mode": "grouped", "degradation": "same"})
    with pytest.raises(ValueError, match="model.degradation"):
        tasks.resolve_config(cfg, registry.get("gsa"), 31)


def _smooth_scene(rng, size, batch=2):
    """A smooth random scene (every band independent): the LR-HSI spans all its bands."""
    z = jax.image.resize(rng.random((batch, size // 4, size // 4, C)), (batch, size, size, C),
                         "cubic")
    return np.asarray(z).clip(0, None).astype(np.float32)


def test_estimate_psf_recovers_the_kernel_blind():
    """From the observed pair alone: a kernel of the Gaussian family and a DAEM protocol kernel
    (one per image) under the DAEM operator, and an odd Gaussian under 'same'; the same under
    jit; the SRF estimated with it is the Nikon SRF."""
    rng = np.random.default_rng(0)
    z = _smooth_scene(rng, H)
    srf = P.get_srf("daem_nikon")
    k_true = np.stack([np.asarray(F.gaussian_kernel(jnp.array([0.2, 0.5, -0.3]), S)),
                       np.asarray(P.daem_psf(2, S))])
    lr, msi = P.make_sr_pair(z, k_true, S, srf, mode="daem")
    k = np.asarray(F.estimate_psf(lr, msi, S))
    assert k.shape == (2, S, S)
    np.testing.assert_allclose(k.sum((1, 2)), 1.0, atol=1e-5)
    assert np.abs(k - k_true).sum((1, 2)).max() < 0.01          # L1 (2 = disjoint kernels)
    # the box assumption is far off: the estimate is not the start
    box = np.full((S, S), 1.0 / S ** 2)
    assert np.abs(box - k_true).sum((1, 2)).min() > 0.15
    k_jit = jax.jit(lambda a, b: F.estimate_psf(a, b, S))(lr, msi)
    np.testing.assert_allclose(np.asarray(k_jit), k, atol=1e-4)
    r = np.asarray(F.estimate_srf(lr, msi, S, k))
    assert r.shape == (2, C, 3) and (r >= 0).all()
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(r, np.broadcast_to(np.asarray(srf), r.shape), atol=0.01)
    # 'same' operator, odd kernel (default size 2 s + 1)
    z2 = _smooth_scene(rng, 2 * H)
    g = np.asarray(P.gaussian_psf(2 * S + 1, 2.0))
    lr2, msi2 = P.make_sr_pair(z2, g, S, srf)
    k2 = np.asarray(F.estimate_psf(lr2, msi2, S, degradation="same"))
    assert k2.shape == (2, 2 * S + 1, 2 * S + 1)
    assert np.abs(k2 - g).sum((1, 2)).max() < 0.01


def test_estimate_psf_errors(scene):
    lr, msi = scene["lr"], scene["msi"]
    with pytest.raises(ValueError, match="LR pixels"):
        F.estimate_psf(lr[:, :4, :4], msi[:, :4 * S, :4 * S], S)    # 16 pixels, 31 bands
    with pytest.raises(ValueError, match="odd size"):
        F.estimate_psf(lr, msi, S, size=8, degradation="same")
    with pytest.raises(ValueError, match="size 2 must be >= scale"):
        F.estimate_psf(lr, msi, S, size=2)
    with pytest.raises(ValueError, match="degradation"):
        F.estimate_psf(lr, msi, S, degradation="valid")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            F.estimate_psf(lr, msi, S, steps=bad)
    with pytest.raises(ValueError, match="step_size"):
        F.estimate_psf(lr, msi, S, step_size=0.0)
    with pytest.raises(ValueError, match="init_sigma"):
        F.estimate_psf(lr, msi, S, init_sigma=-1.0)
    with pytest.raises(ValueError, match="batch"):
        F.estimate_srf(lr[:1], msi, S)
