"""jaxspec.baselines: closed-form linear and root-polynomial RGB -> spectrum regression."""
import jax
import numpy as np
import pytest

from jaxspec import baselines as bl

C = 7


@pytest.fixture(scope="module")
def linear_world():
    """hsi = A @ basis (3-dim spectra), rgb = hsi @ srf: hsi = rgb @ (basis srf)^-1 basis."""
    rng = np.random.default_rng(1)
    wl = np.linspace(0, 1, C)
    basis = np.stack([np.ones(C), wl, np.cos(3 * wl)])                    # (3, C)
    srf = np.stack([np.exp(-((wl - m) / 0.25) ** 2) for m in (0.8, 0.5, 0.2)], 1)  # (C, 3)
    a = rng.uniform(0.2, 1.0, (500, 3))
    hsi = a @ basis
    rgb = hsi @ srf
    w_true = np.linalg.solve(basis @ srf, basis)                         # (3, C)
    return rgb, hsi, w_true


def test_root_polynomial_terms():
    counts = [len(bl.root_polynomial_exponents(d)) for d in (1, 2, 3, 4)]
    assert counts == [3, 6, 13, 22]                       # Finlayson et al. 2015, Table 1
    rgb = np.array([[4.0, 9.0, 16.0]])
    f2 = bl.root_polynomial_features(rgb, 2)[0]
    np.testing.assert_allclose(sorted(f2), sorted([4, 9, 16, 6, 12, 8]))   # r,g,b,√rg,√gb,√rb
    f3 = bl.root_polynomial_features(rgb, 3)[0]
    r, g, b = rgb[0]
    cube = [np.cbrt(x) for x in (r * g * g, r * r * g, g * b * b, g * g * b, r * b * b,
                                 r * r * b, r * g * b)]
    np.testing.assert_allclose(sorted(f3[6:]), sorted(cube), rtol=1e-12)
    np.testing.assert_allclose(f3[:6], f2)
    assert isinstance(f3, np.ndarray) and f3.dtype == np.float64
    # jnp path agrees, and negative inputs do not produce NaN in the root terms
    fj = bl.root_polynomial_features(jax.numpy.asarray(rgb - 5.0, jax.numpy.float32), 3)
    np.testing.assert_allclose(fj, bl.root_polynomial_features(rgb - 5.0, 3), rtol=1e-5)
    assert np.all(np.isfinite(fj))
    with pytest.raises(ValueError, match="degree"):
        bl.root_polynomial_exponents(0)


def test_linear_recovers_exact_map(linear_world):
    rgb, hsi, w_true = linear_world
    m = bl.fit_linear(rgb, hsi)
    np.testing.assert_allclose(m.coef, w_true, rtol=1e-4, atol=1e-5)
    pred = bl.predict(m, rgb.reshape(5, 10, 10, 3))
    np.testing.assert_allclose(pred, hsi.reshape(5, 10, 10, C), rtol=1e-4, atol=1e-5)
    # with an offset in the target the bias row recovers it
    offset = np.linspace(0.1, 0.3, C)
    mb = bl.fit_linear(rgb, hsi + offset, bias=True)
    np.testing.assert_allclose(mb.coef[:3], w_true, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mb.coef[3], offset, atol=1e-4)


@pytest.mark.parametrize("degree", [2, 3])
def test_root_polynomial_on_linear_world(linear_world, degree):
    """Data that is exactly linear: the root terms get zero weight, the linear part is exact."""
    rgb, hsi, w_true = linear_world
    m = bl.fit_root_polynomial(rgb, hsi, degree=degree)
    assert m.coef.shape == (6 if degree == 2 else 13, C)
    np.testing.assert_allclose(m.coef[:3], w_true, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(m.coef[3:], 0, atol=1e-3)
    np.testing.assert_allclose(bl.predict(m, rgb[None, None]), hsi[None, None], atol=1e-4)


def test_root_polynomial_recovers_root_polynomial_map():
    rng = np.random.default_rng(2)
    rgb = rng.uniform(0.05, 1.0, (400, 3))
    w = rng.normal(size=(6, C))
    hsi = bl.root_polynomial_features(rgb, 2) @ w
    m = bl.fit_root_polynomial(rgb, hsi, degree=2)
    np.testing.assert_allclose(m.coef, w, rtol=1e-4, atol=1e-4)
    lin = bl.fit_linear(rgb, hsi)                           # not identifiable by a linear map
    resid = bl.predict(lin, rgb[None, None]) - hsi[None, None]
    assert float(np.sqrt(np.mean(np.square(resid)))) > 1e-2


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_exposure_invariance(degree):
    rng = np.random.default_rng(3)
    rgb = rng.uniform(0.0, 1.0, (300, 3))
    hsi = np.abs(rng.normal(size=(300, C)))
    m = (bl.fit_linear(rgb, hsi) if degree == 1
         else bl.fit_root_polynomial(rgb, hsi, degree=degree, ridge=1e-3))
    img = rng.uniform(0.0, 1.0, (2, 4, 5, 3)).astype(np.float32)
    for k in (0.25, 3.0):
        np.testing.assert_allclose(bl.predict(m, k * img), k * bl.predict(m, img),
                                   rtol=1e-4, atol=1e-5)


def test_ridge_matches_augmented_lstsq():
    rng = np.random.default_rng(4)
    rgb = rng.uniform(0, 1, (200, 3))
    hsi = rng.uniform(0, 1, (200, C))
    lam = 0.05
    for bias in (False, True):
        m = bl.fit_root_polynomial(rgb, hsi, degree=3, ridge=lam, bias=bias)
        x = bl.root_polynomial_features(rgb, 3)
        if bias:
            x = np.concatenate([x, np.ones((200, 1))], 1)
        reg = np.sqrt(200 * lam) * np.eye(x.shape[1])
        if bias:
            reg = reg[:-1]                                     # bias row unpenalised
        w = np.linalg.lstsq(np.concatenate([x, reg]),
                            np.concatenate([hsi, np.zeros((len(reg), C))]), rcond=None)[0]
        np.testing.assert_allclose(m.coef, w, rtol=1e-5, atol=1e-6)
    # more ridge -> smaller coefficients
    small = bl.fit_root_polynomial(rgb, hsi, degree=3, ridge=1e-4)
    big = bl.fit_root_polynomial(rgb, hsi, degree=3, ridge=1.0)
    assert np.linalg.norm(big.coef) < np.linalg.norm(small.coef)


def test_save_load_roundtrip(tmp_path, linear_world):
    rgb, hsi, _ = linear_world
    m = bl.fit_root_polynomial(rgb, hsi, degree=3, ridge=1e-3, bias=True)
    path = m.save(tmp_path / "sub" / "rp3")
    assert path.suffix == ".npz"
    m2 = bl.load(path)
    assert (m2.kind, m2.degree, m2.bias, m2.ridge, m2.normalization) == \
        ("root_polynomial", 3, True, 1e-3, "none")
    np.testing.assert_array_equal(m2.coef, m.coef)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        bl.load(tmp_path / "nope.npz")


def test_sample_pixels_and_jit(linear_world):
    rgb, hsi, w_true = linear_world
    imgs = [(rgb[i * 100:(i + 1) * 100].reshape(10, 10, 3),
             hsi[i * 100:(i + 1) * 100].reshape(10, 10, C)) for i in range(5)]
    r, h = bl.sample_pixels(imgs, 120, seed=0)
    assert r.shape == (120, 3) and h.shape == (120, C)
    r2, _ = bl.sample_pixels([{"rgb": a, "hsi": b} for a, b in imgs], 120, seed=0)
    np.testing.assert_array_equal(r, r2)
    # sampled pixels are real (rgb, hsi) pairs: the exact linear map holds on them
    np.testing.assert_allclose(r @ w_true, h, rtol=1e-4, atol=1e-5)
    m = bl.fit_linear(r, h)
    f = jax.jit(lambda x: bl.predict(m, x))
    np.testing.assert_allclose(f(imgs[0][0][None]), imgs[0][1][None], rtol=1e-3, atol=1e-4)


def test_minmax_normalisation_is_applied_consistently():
    data = pytest.importorskip("jaxspec.data")
    if not hasattr(data, "normalize_rgb"):
        pytest.skip("jaxspec.data.normalize_rgb not available")
    rng = np.random.default_rng(5)
    rgb = rng.uniform(0.1, 0.9, (3, 6, 6, 3)).astype(np.float32)
    hsi = rng.uniform(0.1, 0.9, (3, 6, 6, C)).astype(np.float32)
    r, h = bl.sample_pixels(zip(rgb, hsi), 108, normalization="minmax")
    m = bl.fit_root_polynomial(r, h, degree=2, normalization="minmax")
    norm = np.asarray(data.normalize_rgb(rgb, "minmax"))
    for i in range(3):   # per image: one min and one max over all channels
        np.testing.assert_allclose(norm[i].min(), 0, atol=1e-6)
        np.testing.assert_allclose(norm[i].max(), 1, atol=1e-6)
    manual = bl.root_polynomial_features(norm, 2) @ m.coef
    np.testing.assert_allclose(bl.predict(m, rgb), manual, rtol=1e-4, atol=1e-5)
    # exposure is normalised away: scaled input, same prediction
    np.testing.assert_allclose(bl.predict(m, 2 * rgb), bl.predict(m, rgb), rtol=1e-4, atol=1e-5)


def test_errors():
    rgb = np.ones((10, 3))
    with pytest.raises(ValueError, match=r"`rgb` must be pixels of shape \(N, 3\)"):
        bl.fit_linear(np.ones((10, 4)), np.ones((10, C)))
    with pytest.raises(ValueError, match="different pixel counts"):
        bl.fit_linear(rgb, np.ones((9, C)))
    bad = np.ones((10, C))
    bad[2, 2] = np.nan
    with pytest.raises(ValueError, match="`hsi`.*NaN"):
        bl.fit_linear(rgb, bad)
    with pytest.raises(ValueError, match="at least as many pixels as features"):
        bl.fit_root_polynomial(rgb[:5], np.ones((5, C)), degree=3)
    with pytest.raises(ValueError, match="ridge"):
        bl.fit_linear(rgb, np.ones((10, C)), ridge=-1)
    m = bl.fit_linear(np.random.default_rng(0).uniform(size=(10, 3)), np.ones((10, C)))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        bl.predict(m, np.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="coef must have shape"):
        bl.RegressionBaseline("linear", 1, np.ones((4, C)))
