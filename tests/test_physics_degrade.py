"""Spatial degradation: PSFs, blur, decimation, SR pairs, gradients to sigma and the SRF."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import convolve

from jaxspec import physics as P


def _cube(h=16, w=16, c=31, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (h, w, c)).astype(np.float32)


def test_gaussian_psf_sum_shape_symmetry():
    h = P.gaussian_psf(7, 1.3)
    assert h.shape == (7, 7)
    assert float(h.sum()) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h).T, atol=1e-7)
    assert int(jnp.argmax(h)) == 3 * 7 + 3
    # matches the analytic Gaussian
    y, x = np.mgrid[-3:4, -3:4]
    ref = np.exp(-(x ** 2 + y ** 2) / (2 * 1.3 ** 2))
    np.testing.assert_allclose(np.asarray(h), ref / ref.sum(), rtol=1e-5)


def test_anisotropic_psf_orientation():
    h = np.asarray(P.anisotropic_gaussian_psf(9, 3.0, 0.8, 0.0))
    assert h.sum() == pytest.approx(1.0, abs=1e-6)
    assert h[4, 8] > h[8, 4]  # wide along x (W axis)
    h90 = np.asarray(P.anisotropic_gaussian_psf(9, 3.0, 0.8, np.pi / 2))
    np.testing.assert_allclose(h90, h.T, atol=1e-6)
    iso = P.anisotropic_gaussian_psf(9, 1.5, 1.5, 0.7)
    np.testing.assert_allclose(np.asarray(iso), np.asarray(P.gaussian_psf(9, 1.5)), atol=1e-6)


def test_psf_validation():
    with pytest.raises(ValueError, match="odd"):
        P.gaussian_psf(4, 1.0)
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        P.gaussian_psf(5, 0.0)
    with pytest.raises(ValueError, match="non-negative"):
        P.normalize_psf(np.array([[0, -1, 0], [1, 4, 1], [0, 1, 0]], np.float32))
    with pytest.raises(ValueError, match="odd"):
        P.normalize_psf(np.ones((4, 4)))
    with pytest.raises(ValueError, match="positive sum"):
        P.normalize_psf(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        P.normalize_psf(np.full((3, 3), np.nan))
    user = P.normalize_psf(np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]))
    assert float(user.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("boundary,mode", [("reflect", "mirror"), ("symmetric", "reflect"),
                                           ("wrap", "wrap")])
def test_blur_matches_scipy_convolution(boundary, mode):
    x = _cube(12, 10, 3)
    psf = np.random.default_rng(1).uniform(size=(5, 3))  # asymmetric: checks the kernel flip
    out = np.asarray(P.blur(x, psf, boundary))
    p = psf / psf.sum()
    ref = np.stack([convolve(x[..., c], p, mode=mode) for c in range(3)], -1)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_blur_per_band_psf_and_batch():
    x = _cube(8, 8, 3)
    psfs = np.stack([np.asarray(P.gaussian_psf(5, s)) for s in (0.5, 1.0, 2.0)], -1)
    out = P.blur(np.stack([x, x]), psfs)
    assert out.shape == (2, 8, 8, 3)
    for c, s in enumerate((0.5, 1.0, 2.0)):
        single = P.blur(x[..., c:c + 1], P.gaussian_psf(5, s))
        np.testing.assert_allclose(np.asarray(out[1, ..., c]), np.asarray(single[..., 0]), atol=1e-6)
    # blur preserves the mean with 'wrap' (PSF sums to 1)
    assert float(P.blur(x, P.gaussian_psf(5, 1.0), "wrap").mean()) == pytest.approx(float(x.mean()), rel=1e-5)
    with pytest.raises(ValueError, match="psf has 4 bands"):
        P.blur(x, np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match="boundary"):
        P.blur(x, np.ones((3, 3)), "zero")


def test_large_psf_conv_path_agrees_with_shift_add():
    x = jnp.asarray(_cube(20, 20, 2))
    psf = P.gaussian_psf(17, 3.0)  # 289 taps -> lax.conv path
    big = P.blur(x, psf, "wrap")
    ref = np.stack([convolve(np.asarray(x[..., c]), np.asarray(psf), mode="wrap") for c in range(2)], -1)
    np.testing.assert_allclose(np.asarray(big), ref, rtol=1e-4, atol=1e-5)


def test_decimate_shape_phase_and_errors():
    x = jnp.arange(8 * 8 * 2, dtype=jnp.float32).reshape(8, 8, 2)
    d = P.decimate(x, 4)
    assert d.shape == (2, 2, 2)
    np.testing.assert_array_equal(np.asarray(d[1, 1]), np.asarray(x[4, 4]))
    np.testing.assert_array_equal(np.asarray(P.decimate(x, 4, offset=2)[0, 0]), np.asarray(x[2, 2]))
    assert P.spatial_degrade(jnp.zeros((3, 16, 16, 5)), P.gaussian_psf(5, 1.0), 8).shape == (3, 2, 2, 5)
    with pytest.raises(ValueError, match="multiples of s = 3"):
        P.decimate(x, 3)
    with pytest.raises(ValueError, match="offset"):
        P.decimate(x, 4, offset=4)


def test_make_sr_pair_and_noise():
    hsi = _cube(16, 16)
    srf = P.get_srf("nikon_d5100")
    psf = P.gaussian_psf(9, 2.0)
    lr, hr = P.make_sr_pair(hsi, psf, 4, srf)
    assert lr.shape == (4, 4, 31) and hr.shape == (16, 16, 3)
    np.testing.assert_allclose(np.asarray(hr), hsi @ srf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lr), np.asarray(P.decimate(P.blur(hsi, psf), 4)), atol=1e-6)
    k = jax.random.key(0)
    lr_n, hr_n = P.make_sr_pair(hsi, psf, 4, srf, key=k, snr_db_hsi=30.0, snr_db_msi=40.0)
    lr_n2, _ = P.make_sr_pair(hsi, psf, 4, srf, key=k, snr_db_hsi=30.0, snr_db_msi=40.0)
    np.testing.assert_array_equal(np.asarray(lr_n), np.asarray(lr_n2))
    big = jnp.asarray(_cube(64, 64, 3))
    noisy = P.add_noise_snr(k, big, 20.0)
    snr = 10 * np.log10(float(jnp.mean(big ** 2)) / float(jnp.mean((noisy - big) ** 2)))
    assert snr == pytest.approx(20.0, abs=0.3)
    with pytest.raises(ValueError, match="PRNG key"):
        P.make_sr_pair(hsi, psf, 4, srf, snr_db_hsi=30.0)
    with pytest.raises(ValueError, match="band mismatch"):
        P.make_sr_pair(hsi[..., :30], psf, 4, srf)


def test_gradients_flow_to_sigma_and_srf():
    """Fit the PSF width and SRF scale of an SR pair by gradient: d/dsigma and d/dSRF exist."""
    hsi = jnp.asarray(_cube(16, 16, 8, seed=3))
    srf0 = jnp.asarray(np.random.default_rng(2).uniform(size=(8, 3)), jnp.float32)
    lr_t, hr_t = P.make_sr_pair(hsi, P.gaussian_psf(9, 1.5), 4, srf0)

    @jax.jit
    def loss(sigma, srf):
        lr, hr = P.make_sr_pair(hsi, P.gaussian_psf(9, sigma), 4, srf)
        return jnp.mean((lr - lr_t) ** 2) + jnp.mean((hr - hr_t) ** 2)

    g_sig, g_srf = jax.grad(loss, argnums=(0, 1))(2.5, srf0 * 1.2)
    assert np.isfinite(float(g_sig)) and float(g_sig) != 0.0
    assert np.all(np.isfinite(np.asarray(g_srf))) and float(jnp.abs(g_srf).max()) > 0
    assert float(loss(1.5, srf0)) == pytest.approx(0.0, abs=1e-10)
    # finite differences agree with the analytic d/dsigma
    eps = 1e-2
    fd = (float(loss(2.5 + eps, srf0 * 1.2)) - float(loss(2.5 - eps, srf0 * 1.2))) / (2 * eps)
    assert float(g_sig) == pytest.approx(fd, rel=2e-2)
    # sign-gradient descent on sigma recovers the true value 1.5
    grad_sigma = jax.jit(jax.grad(loss))
    s = 2.5
    for _ in range(25):
        s -= 0.05 * float(np.sign(grad_sigma(s, srf0)))
    assert abs(s - 1.5) < 0.06
