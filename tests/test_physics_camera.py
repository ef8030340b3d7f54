"""Camera pipelines: noise, exposure, A2D, Bayer/demosaic, JPEG (JAX simulation vs Pillow)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from jaxspec import physics as P


def _smooth_hsi(h=16, w=16, c=31, seed=0, sigma=3.0):
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.uniform(0.05, 1.0, (h, w, c)), (sigma, sigma, 2), mode="wrap")
    return x.astype(np.float32)


def _natural_rgb(h, w, seed=0):
    """Smooth image plus texture noise, 8-bit (JPEG-relevant content at all frequencies)."""
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (3, 3, 0))
    x = (x - x.min()) / (x.max() - x.min()) * 235 + 10 + rng.normal(0, 6, (h, w, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _psnr(a, b, peak=255.0):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return np.inf if mse == 0 else 10 * np.log10(peak ** 2 / mse)


# ----------------------------------------------------------------------------- noise
def test_shot_noise_statistics_and_determinism():
    sig = jnp.full((64, 64), 0.5)
    k = jax.random.key(3)
    for method in ("poisson", "gaussian"):
        a = P.shot_noise(k, sig, npe=200.0, method=method)
        b = P.shot_noise(k, sig, npe=200.0, method=method)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # keyed -> deterministic
        c = P.shot_noise(jax.random.key(4), sig, npe=200.0, method=method)
        assert not np.array_equal(np.asarray(a), np.asarray(c))
        # mean s, variance s / npe = 0.0025
        assert float(a.mean()) == pytest.approx(0.5, abs=0.005)
        assert float(a.var()) == pytest.approx(0.5 / 200.0, rel=0.1)
    pois = np.asarray(P.shot_noise(k, sig, npe=200.0)) * 200.0
    np.testing.assert_allclose(pois, np.round(pois), atol=1e-3)  # integer electron counts
    # negative signal is clipped (as NTIRE's addPoissonAndDarkNoise), zero stays zero
    assert float(jnp.abs(P.shot_noise(k, -jnp.ones(5), 100.0, "gaussian")).max()) == 0.0


def test_noise_errors():
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="npe"):
        P.shot_noise(k, jnp.ones(3), npe=0)
    with pytest.raises(ValueError, match="method"):
        P.shot_noise(k, jnp.ones(3), npe=10, method="laplace")
    with pytest.raises(ValueError, match="std"):
        P.dark_noise(k, jnp.ones(3), -1.0)
    with pytest.raises(ValueError, match="signal contains NaN"):
        P.shot_noise(k, jnp.array([1.0, jnp.nan]), npe=10)


def test_gaussian_shot_noise_is_differentiable():
    g = jax.grad(lambda s: P.shot_noise(jax.random.key(0), s, 50.0, "gaussian").sum())(
        jnp.linspace(0.0, 1.0, 8))
    assert np.all(np.isfinite(np.asarray(g))) and float(g[1:].mean()) == pytest.approx(1.0, abs=0.5)


# ----------------------------------------------------------------------------- exposure / A2D
def test_expose_to_mean_per_image():
    x = jnp.stack([jnp.full((4, 4, 3), 2.0), jnp.linspace(0.1, 5, 48).reshape(4, 4, 3)])
    y = P.expose_to_mean(x)
    np.testing.assert_allclose(np.asarray(y.mean(axis=(1, 2, 3))), [0.18, 0.18], rtol=1e-5)
    with pytest.raises(ValueError, match="mean must be > 0"):
        P.expose_to_mean(jnp.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        P.expose_to_mean(jnp.ones((2, 3)))


def test_quantize_floor_round_and_ste():
    x = jnp.array([-3.0, 0.4, 0.6, 254.7, 300.0])
    np.testing.assert_array_equal(np.asarray(P.quantize(x)), [0, 0, 0, 254, 255])
    np.testing.assert_array_equal(np.asarray(P.quantize(x, mode="round")), [0, 0, 1, 255, 255])
    g = jax.grad(lambda v: P.quantize(v).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), [0, 1, 1, 1, 0])  # STE inside, clip outside


# ----------------------------------------------------------------------------- CFA
def test_bayer_mosaic_layout():
    rgb = jnp.stack([jnp.full((4, 4), 1.0), jnp.full((4, 4), 2.0), jnp.full((4, 4), 3.0)], -1)
    m = np.asarray(P.bayer_mosaic(rgb))
    np.testing.assert_array_equal(m[:2, :2], [[1, 2], [2, 3]])  # R G / G B
    assert P.bayer_mosaic(jnp.zeros((2, 6, 8, 3))).shape == (2, 6, 8)


@pytest.mark.parametrize("method,tol", [("malvar", 2e-3), ("bilinear", 3e-3)])
def test_demosaic_round_trip_smooth(method, tol):
    rgb = P.project(_smooth_hsi(24, 24), P.get_srf("nikon_d5100"))
    out = P.demosaic(P.bayer_mosaic(rgb), method)
    assert out.shape == rgb.shape
    err = np.abs(np.asarray(out - rgb))
    assert err.max() < tol * 10 and err.mean() < tol, (err.max(), err.mean())
    # a constant image is reproduced exactly (kernels sum to 1 per colour)
    const = jnp.ones((8, 8, 3)) * jnp.array([0.2, 0.5, 0.7])
    np.testing.assert_allclose(np.asarray(P.demosaic(P.bayer_mosaic(const), method)),
                               np.asarray(const), atol=1e-6)


def test_demosaic_malvar_beats_bilinear_on_edges():
    """Malvar's gradient correction halves the error of bilinear on a sharp, coloured texture."""
    rng = np.random.default_rng(0)
    rgb = gaussian_filter(rng.uniform(0, 1, (32, 32, 3)), (1.0, 1.0, 0))
    rgb = jnp.asarray(rgb * 0.3 + rgb.mean(-1, keepdims=True) * 0.7, jnp.float32)
    m = P.bayer_mosaic(rgb)
    e = {k: float(jnp.mean((P.demosaic(m, k) - rgb)[4:-4, 4:-4] ** 2)) for k in ("malvar", "bilinear")}
    assert e["malvar"] < 0.7 * e["bilinear"], e


def test_demosaic_errors():
    with pytest.raises(ValueError, match="even"):
        P.demosaic(jnp.ones((5, 6)))
    with pytest.raises(ValueError, match="method"):
        P.demosaic(jnp.ones((4, 4)), "ahd")


# ----------------------------------------------------------------------------- JPEG
def test_quant_tables_ijg():
    qy, qc = P.jpeg_quant_tables(50)
    assert qy[0, 0] == 16 and qc[0, 0] == 17  # quality 50 = the Annex K tables
    qy, _ = P.jpeg_quant_tables(100)
    assert np.all(qy == 1)
    qy, _ = P.jpeg_quant_tables(65)
    assert qy[0, 0] == np.floor((16 * 70 + 50) / 100)  # s = 200 - 2q = 70
    with pytest.raises(ValueError, match="quality"):
        P.jpeg_quant_tables(0)


def test_jpeg_sim_matches_pillow_and_reports_psnr(capsys):
    """The JAX simulation vs Pillow/libjpeg: PSNR between them >> PSNR of JPEG vs the original."""
    img = _natural_rgb(40, 56)
    for q, ss in ((65, "4:2:0"), (80, "4:2:0"), (80, "4:4:4")):
        pil = P.jpeg_pil(img, q, ss)
        sim = np.asarray(P.jpeg(img, q, ss))
        assert sim.shape == img.shape
        np.testing.assert_array_equal(sim, np.round(sim))
        p_sim, p_jpeg = _psnr(sim, pil), _psnr(pil, img)
        with capsys.disabled():
            print(f"\n[jpeg q={q} {ss}] PSNR(sim, Pillow) = {p_sim:.2f} dB; "
                  f"PSNR(Pillow, original) = {p_jpeg:.2f} dB")
        assert p_sim > 38.0 and p_sim > p_jpeg + 8.0


def test_jpeg_batch_jit_and_gradient():
    img = jnp.asarray(np.stack([_natural_rgb(16, 16, s) for s in (1, 2)]), jnp.float32)
    out = jax.jit(P.jpeg, static_argnums=(1, 2))(img, 65, "4:2:0")
    assert out.shape == img.shape
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(P.jpeg(img[1], 65)))
    g = jax.grad(lambda x: jnp.sum(P.jpeg(x, 65) * jnp.linspace(0, 1, 3)))(img[0])
    assert g.shape == img[0].shape and np.all(np.isfinite(np.asarray(g)))
    assert float(jnp.abs(g).mean()) > 0.1  # straight-through: gradient ~ the colour weights


def test_jpeg_errors():
    with pytest.raises(ValueError, match="uint8"):
        P.jpeg_pil(np.zeros((8, 8, 3), np.float32), 80)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        P.jpeg_pil(np.zeros((8, 8), np.uint8), 80)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\)"):
        P.jpeg(jnp.zeros((8, 8, 4)), 80)
    with pytest.raises(ValueError, match="quality"):
        P.jpeg(jnp.zeros((8, 8, 3)), 101)


# ----------------------------------------------------------------------------- pipelines
def test_ntire2022_camera_exposure_determinism_and_numpy_inputs():
    hsi = _smooth_hsi(16, 16)
    srf = P.get_srf("cie1964")
    k = jax.random.key(0)
    raw = P.ntire2022_camera(k, hsi, srf, jpeg_quality=None)
    assert raw.shape == (16, 16, 3) and raw.dtype == jnp.float32
    # mean 0.18 * 255 before truncation; floor loses ~0.5 code on average
    assert float(raw.mean()) == pytest.approx(0.18 * 255 - 0.5, abs=0.6)
    a = P.ntire2022_camera(k, hsi, srf)
    b = P.ntire2022_camera(k, hsi, srf)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = P.ntire2022_camera(jax.random.key(1), hsi, srf)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    exact = P.ntire2022_camera(k, hsi, srf, jpeg_backend="pil")
    assert _psnr(exact, a) > 38.0
    batch = P.ntire2022_camera(k, np.stack([hsi, 2 * hsi]), srf, jpeg_quality=None)
    np.testing.assert_allclose(np.asarray(batch.mean(axis=(1, 2, 3))), 0.18 * 255 - 0.5, atol=0.6)


def test_ntire2022_camera_gradient_wrt_hsi_and_srf():
    hsi = jnp.asarray(_smooth_hsi(16, 16))
    srf = jnp.asarray(P.get_srf("nikon_d5100"))
    w = jnp.linspace(0.0, 1.0, 16 * 16 * 3).reshape(16, 16, 3)

    def f(h, s):
        return jnp.sum(w * P.ntire2022_camera(jax.random.key(0), h, s, noise="gaussian"))

    gh, gs = jax.jit(jax.grad(f, argnums=(0, 1)))(hsi, srf)
    assert np.all(np.isfinite(np.asarray(gh))) and float(jnp.abs(gh).max()) > 0
    assert np.all(np.isfinite(np.asarray(gs))) and float(jnp.abs(gs).max()) > 0
    with pytest.raises(ValueError, match="cannot run under jit"):
        jax.grad(lambda h: P.ntire2022_camera(jax.random.key(0), h, srf, noise="gaussian",
                                              jpeg_backend="pil").sum())(hsi)


def test_ntire2020_realworld_camera():
    hsi = _smooth_hsi(16, 16) * 0.8
    srf = P.get_srf("cie1964")
    k = jax.random.key(0)
    clean = P.ntire2020_clean_camera(hsi, srf)
    a = P.ntire2020_realworld_camera(k, hsi, srf)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(P.ntire2020_realworld_camera(k, hsi, srf)))
    assert a.shape == (16, 16, 3) and float(a.min()) >= 0 and float(a.max()) <= 255
    # noise at 5000 e- (~1.4 %), demosaic and JPEG 80 keep the image close to the clean render
    assert _psnr(a, clean) > 25.0
    noisy = P.ntire2020_realworld_camera(k, hsi, srf, target_npe=20.0)  # npe traced: no recompile
    assert _psnr(noisy, clean) < _psnr(a, clean)
    with pytest.raises(ValueError, match="even"):
        P.ntire2020_realworld_camera(k, hsi[:15], srf)
    g = jax.grad(lambda h: P.ntire2020_realworld_camera(k, h, srf, noise="gaussian").mean())(
        jnp.asarray(hsi))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0


def test_pipeline_input_errors():
    srf = P.get_srf("cie1964")
    k = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\(H, W, C\) or \(B, H, W, C\)"):
        P.ntire2022_camera(k, np.ones((4, 31)), srf)
    with pytest.raises(ValueError, match="band mismatch"):
        P.ntire2022_camera(k, np.ones((4, 4, 30)), srf)
    bad = np.ones((4, 4, 31), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        P.ntire2020_realworld_camera(k, bad, srf)
