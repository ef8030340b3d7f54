"""jaxspec.metrics against independent float64 numpy references (SSIM against scikit-image)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy.ndimage import gaussian_filter

from jaxspec import metrics as M


# ----------------------------------------------------------------------------- references
def ref_mrae(p, g):
    return np.mean(np.abs(p - g) / g)


def ref_rmse(p, g):
    return np.sqrt(np.mean((p - g) ** 2))


def ref_psnr(p, g):
    p, g = np.clip(p, 0, 1) * 255, np.clip(g, 0, 1) * 255   # MST++: x255, data_range 255
    return 10 * np.log10(255.0 ** 2 / np.mean((p - g) ** 2))


def ref_sam(p, g):
    cos = np.sum(p * g, -1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(g, axis=-1))
    return np.mean(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def ref_ergas(p, g, s):
    rmse_b = np.sqrt(np.mean((p - g) ** 2, axis=(0, 1)))
    return 100.0 / s * np.sqrt(np.mean((rmse_b / g.mean(axis=(0, 1))) ** 2))


def ref_qi_band(x, y, block=8):
    """Wang & Bovik's img_qi.m, transcribed (sums over block x block 'valid' windows)."""
    n = block * block
    win = lambda a: sliding_window_view(a, (block, block)).sum(axis=(-1, -2))
    sx, sy = win(x), win(y)
    sxx, syy, sxy = win(x * x), win(y * y), win(x * y)
    s12_mul = sx * sy
    s12_sq_mul = sx * sx + sy * sy
    numerator = 4 * (n * sxy - s12_mul) * s12_mul
    den1 = n * (sxx + syy) - s12_sq_mul
    den = den1 * s12_sq_mul
    q = np.ones_like(den)
    idx = (den1 == 0) & (s12_sq_mul != 0)
    q[idx] = 2 * s12_mul[idx] / s12_sq_mul[idx]
    idx = den != 0
    q[idx] = numerator[idx] / den[idx]
    return q.mean()


def ref_uiqi(p, g, block=8):
    return np.mean([ref_qi_band(p[..., c], g[..., c], block) for c in range(p.shape[-1])])


def ref_uiqi_global(p, g):
    out = []
    for c in range(p.shape[-1]):
        x, y = p[..., c].ravel(), g[..., c].ravel()
        mx, my = x.mean(), y.mean()
        vx, vy = x.var(), y.var()
        vxy = np.mean((x - mx) * (y - my))
        out.append(4 * vxy * mx * my / ((vx + vy) * (mx ** 2 + my ** 2)))
    return np.mean(out)


def per_image(fn, p, g, *args):
    return np.array([fn(p[i].astype(np.float64), g[i].astype(np.float64), *args)
                     for i in range(p.shape[0])])


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    g = gaussian_filter(rng.uniform(0.05, 1.0, (3, 24, 21, 5)), (0, 1.5, 1.5, 0))
    g = (g + 0.02).astype(np.float32)
    p = (g * (1 + 0.1 * rng.normal(size=g.shape)) + 0.02 * rng.normal(size=g.shape))
    p[0, :3, :3] = 1.3                      # some out-of-range values (PSNR clamps them)
    return p.astype(np.float32), g


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("name,ref,tol", [
    ("mrae", ref_mrae, 1e-5), ("rmse", ref_rmse, 1e-5), ("psnr", ref_psnr, 1e-4),
    ("sam", ref_sam, 2e-4), ("uiqi", ref_uiqi, 1e-4), ("ergas", None, 1e-5)])
def test_against_numpy_reference(pair, name, ref, tol):
    p, g = pair
    got = np.asarray(getattr(M, name)(p, g))
    want = per_image(ref or (lambda a, b: ref_ergas(a, b, 1.0)), p, g)
    assert got.shape == (p.shape[0],) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_ssim_matches_skimage(pair):
    structural_similarity = pytest.importorskip("skimage.metrics").structural_similarity
    p, g = pair
    for dr in (1.0, 2.0):
        want = [structural_similarity(p[i].astype(np.float64), g[i].astype(np.float64),
                                      gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=dr,
                                      channel_axis=-1) for i in range(p.shape[0])]
        np.testing.assert_allclose(M.ssim(p, g, data_range=dr), want, atol=1e-4)


def test_ergas_scale_and_uiqi_global(pair):
    p, g = pair
    np.testing.assert_allclose(M.ergas(p, g, scale=4), per_image(ref_ergas, p, g, 4.0),
                               rtol=1e-5)
    np.testing.assert_allclose(M.uiqi(p, g, window=None), per_image(ref_uiqi_global, p, g),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(M.uiqi(p, g, window=5), per_image(ref_uiqi, p, g, 5),
                               rtol=1e-4, atol=1e-5)


def test_uiqi_flat_windows_follow_img_qi():
    """Exactly flat windows: img_qi.m's special cases (1 and 2 mu_x mu_y / (mu_x^2+mu_y^2))."""
    g = np.full((1, 12, 12, 2), 0.5, np.float32)
    p = g.copy()
    p[..., 1] = 0.25                       # flat but different mean -> 2*0.5*0.25/(0.25+0.0625)
    p[0, 6:, :, 0] += np.linspace(0, 0.3, 12, dtype=np.float32)  # textured part of band 0
    want = ref_uiqi(p[0].astype(np.float64), g[0].astype(np.float64))
    np.testing.assert_allclose(M.uiqi(p, g), [want], rtol=1e-5)
    assert abs(ref_qi_band(p[0, ..., 1].astype(np.float64), g[0, ..., 1].astype(np.float64))
               - 0.8) < 1e-12


def test_batched_equals_per_image(pair):
    p, g = pair
    batched = M.evaluate_all(p, g)
    for i in range(p.shape[0]):
        single = M.evaluate_all(p[i:i + 1], g[i:i + 1])
        for k in M.METRIC_NAMES:
            np.testing.assert_allclose(batched[k][i], single[k][0], rtol=1e-5, err_msg=k)


def test_evaluate_all_matches_individual_metrics_and_crop(pair):
    p, g = pair
    out = M.evaluate_all(p, g, crop_border=2, scale=2.0)
    assert set(out) == set(M.METRIC_NAMES)
    pc, gc = p[:, 2:-2, 2:-2], g[:, 2:-2, 2:-2]
    for k in M.METRIC_NAMES:
        kw = {"scale": 2.0} if k == "ergas" else {}
        np.testing.assert_allclose(out[k], getattr(M, k)(pc, gc, **kw), rtol=1e-6, err_msg=k)


def test_jit_and_tracers(pair):
    p, g = pair
    for k in M.METRIC_NAMES:
        f = getattr(M, k)
        np.testing.assert_allclose(jax.jit(f)(p, g), f(p, g), rtol=1e-5, err_msg=k)
    # NaN check is skipped under jit (no concretisation error); static checks still run.
    out = jax.jit(lambda a, b: M.evaluate_all(a, b, crop_border=1))(p, g)
    np.testing.assert_allclose(out["mrae"], M.mrae(p[:, 1:-1, 1:-1], g[:, 1:-1, 1:-1]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="rank 4"):
        jax.jit(M.rmse)(p[0], g[0])
    # differentiable (MRAE is the training loss)
    grad = jax.grad(lambda a: M.mrae(a, g).sum())(jnp.asarray(p))
    np.testing.assert_allclose(grad, np.sign(p - g) / g / np.prod(g.shape[1:]), rtol=1e-5)


# ----------------------------------------------------------------------------- known values
def test_identical_inputs(pair):
    _, g = pair
    out = M.evaluate_all(g, g)
    np.testing.assert_array_equal(out["mrae"], 0)
    np.testing.assert_array_equal(out["rmse"], 0)
    np.testing.assert_array_equal(out["ergas"], 0)
    np.testing.assert_array_equal(out["sam"], 0)
    assert np.all(np.isposinf(out["psnr"]))                  # documented: no cap
    np.testing.assert_allclose(out["ssim"], 1, atol=1e-6)
    np.testing.assert_allclose(out["uiqi"], 1, atol=1e-5)


def test_known_values():
    g = np.full((1, 16, 16, 4), 0.5, np.float32)
    np.testing.assert_allclose(M.mrae(g * 1.1, g), [0.1], rtol=1e-6)
    np.testing.assert_allclose(M.rmse(g + 0.1, g), [0.1], rtol=1e-6)
    np.testing.assert_allclose(M.psnr(g + 0.1, g), [20.0], rtol=1e-5)
    np.testing.assert_allclose(M.ergas(g + 0.1, g), [20.0], rtol=1e-5)     # 100 * 0.1/0.5
    np.testing.assert_allclose(M.ergas(g + 0.1, g, scale=4), [5.0], rtol=1e-5)
    # PSNR clamps to [0, 1] (values above 1 in both -> identical after clamping)
    assert np.isposinf(M.psnr(g + 1.0, g * 3)[0])
    # SAM: scaling a spectrum does not change its angle; orthogonal spectra are 90 degrees
    np.testing.assert_array_equal(M.sam(g * 3, g), [0.0])
    a = np.zeros((1, 1, 2, 4), np.float32)
    b = np.zeros((1, 1, 2, 4), np.float32)
    a[0, 0, :, 0] = 1
    b[0, 0, :, 1] = 2
    np.testing.assert_allclose(M.sam(a, b), [90.0], rtol=1e-6)
    b[0, 0, 1] = -a[0, 0, 1]
    np.testing.assert_allclose(M.sam(a, b), [135.0], rtol=1e-6)


def test_zero_conventions():
    g = np.full((1, 2, 2, 3), 0.5, np.float32)
    p = g.copy()
    p[0, 0, 0] = 0                            # one zero spectrum -> 90 deg at that pixel
    np.testing.assert_allclose(M.sam(p, g), [22.5], rtol=1e-6)
    g2 = g.copy()
    g2[0, 0, 0] = 0                           # both zero -> 0 deg
    np.testing.assert_allclose(M.sam(p, g2), [0.0], atol=1e-6)
    # MRAE: no epsilon -> gt == 0 gives inf (documented protocol behaviour)
    p2 = g2 + 0.1
    assert np.isposinf(M.mrae(p2, g2)[0])
    assert np.isposinf(M.ergas(p2, np.zeros_like(g2))[0])


# ----------------------------------------------------------------------------- validation
def test_center_crop():
    x = np.zeros((2, 482, 512, 3), np.float32)
    assert M.center_crop(x, 128).shape == (2, 226, 256, 3)
    assert M.center_crop(x, 0) is x
    assert M.center_crop(x[0], 10).shape == (462, 492, 3)
    with pytest.raises(ValueError, match="border 241"):
        M.center_crop(x, 241)
    with pytest.raises(ValueError, match="non-negative"):
        M.center_crop(x, -1)


@pytest.mark.parametrize("name", M.METRIC_NAMES)
def test_errors(name):
    f = getattr(M, name)
    g = np.full((2, 16, 16, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"`pred`.*rank 4.*\(16, 16, 3\)"):
        f(g[0], g)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 16, 16, 3\).*\(2, 16, 16, 4\)"):
        f(g, np.full((2, 16, 16, 4), 0.5, np.float32))
    bad = g.copy()
    bad[1, 3, 3, 0] = np.nan
    with pytest.raises(ValueError, match=r"`gt`.*contains NaN"):
        f(g, bad)
    with pytest.raises(ValueError, match=r"`pred`.*contains NaN"):
        f(jnp.asarray(bad), g)
    with pytest.raises(ValueError, match=r"`pred` must have a floating dtype, got int32"):
        f(g.astype(np.int32), g)


def test_specific_errors():
    g = np.full((1, 16, 16, 3), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"`gt`.*negative"):
        M.mrae(g, -g)
    with pytest.raises(ValueError, match=r"`gt`.*negative"):
        M.evaluate_all(g, -g)
    with pytest.raises(ValueError, match="too small"):
        M.ssim(g[:, :10], g[:, :10])
    with pytest.raises(ValueError, match="too small"):
        M.uiqi(g[:, :7], g[:, :7])
    with pytest.raises(ValueError, match="too small"):
        M.evaluate_all(g, g, crop_border=3)
    with pytest.raises(ValueError, match="scale"):
        M.ergas(g, g, scale=0)


def test_psnr_bands_is_the_fusion_papers_bandwise_psnr(pair):
    """Per band peak = the band's gt maximum, no clamp, mean of the per-band dB values."""
    p, g = pair

    def ref(a, b):
        mse = ((a - b) ** 2).mean(axis=(0, 1))
        return np.mean(10 * np.log10(b.max(axis=(0, 1)) ** 2 / mse))

    got = np.asarray(M.psnr_bands(p, g))
    np.testing.assert_allclose(got, per_image(ref, p, g), rtol=1e-5)
    assert not np.allclose(got, np.asarray(M.psnr(p, g)), atol=0.05)   # not the global PSNR
    np.testing.assert_allclose(M.psnr_bands(255 * p, 255 * g), got, rtol=1e-5)   # x255
