"""Spatial degradation for HSI super-resolution: PSFs, per-band blur, decimation, SR pairs (JAX).

Observation model (e.g. Wei et al. 2015, HySure, the CAVE/Chikusei fusion protocols)::

    Y_h = D_s (B * X) + N_h        (low-resolution HSI: blur then s-fold decimation)
    Y_m = X R + N_m                (high-resolution MSI/RGB: spectral projection by the SRF R)

Arrays are ``(..., H, W, C)``; PSFs are ``(kh, kw)`` (one for all bands) or ``(kh, kw, C)``
(one per band), odd sizes, non-negative, normalised to sum 1 (per band). Everything is
differentiable w.r.t. the image, the PSF (so w.r.t. ``sigma`` of :func:`gaussian_psf`) and the
SRF, and jit-able with static sizes / scale.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.physics.render import check_finite, check_nonnegative, is_concrete, project

__all__ = ["gaussian_psf", "anisotropic_gaussian_psf", "normalize_psf", "blur", "decimate",
           "spatial_degrade", "add_noise_snr", "make_sr_pair", "filter2d", "BOUNDARIES",
           "DAEM_PSF_PARAMS", "daem_psf", "daem_degrade", "SR_PAIR_MODES"]

BOUNDARIES = {"reflect": "reflect", "symmetric": "symmetric", "wrap": "wrap", "edge": "edge"}
_HI = jax.lax.Precision.HIGHEST


def _check_size(size, fn: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"{fn}: size must be a positive odd integer, got {size!r}")
    return int(size)


def _check_positive_scalar(v, name: str, fn: str):
    v = jnp.asarray(v, jnp.float32)
    if v.ndim != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {v.shape}")
    if is_concrete(v):
        f = float(v)
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"{fn}: {name} must be finite and > 0, got {f}")
    return v


def _grid(size: int) -> tuple[jax.Array, jax.Array]:
    r = (size - 1) / 2.0
    c = jnp.arange(size, dtype=jnp.float32) - r
    yy, xx = jnp.meshgrid(c, c, indexing="ij")  # rows = y (H axis), cols = x (W axis)
    return yy, xx


def _rotated_gaussian(yy, xx, var_u, var_v, theta) -> jax.Array:
    """``exp(-u^2 / 2 var_u - v^2 / 2 var_v)`` normalised to sum 1, ``u = x cos + y sin``,
    ``v = -x sin + y cos`` on the offsets ``(yy, xx)`` from the centre."""
    u = xx * jnp.cos(theta) + yy * jnp.sin(theta)
    v = -xx * jnp.sin(theta) + yy * jnp.cos(theta)
    logits = -(u ** 2 / (2.0 * var_u) + v ** 2 / (2.0 * var_v))
    h = jnp.exp(logits - jnp.max(logits))
    return h / jnp.sum(h)


def gaussian_psf(size: int, sigma) -> jax.Array:
    """Isotropic Gaussian PSF ``h[y, x] = exp(-(x^2 + y^2) / (2 sigma^2)) / Z`` on a
    ``size x size`` grid centred at ``(size - 1) / 2``, ``Z`` so that ``sum h = 1``.
    Differentiable in ``sigma`` (pixels). ``size`` odd (static)."""
    size = _check_size(size, "gaussian_psf")
    sigma = _check_positive_scalar(sigma, "sigma", "gaussian_psf")
    yy, xx = _grid(size)
    logits = -(xx ** 2 + yy ** 2) / (2.0 * sigma ** 2)
    h = jnp.exp(logits - jnp.max(logits))
    return h / jnp.sum(h)


def anisotropic_gaussian_psf(size: int, sigma_x, sigma_y, theta=0.0) -> jax.Array:
    """Rotated anisotropic Gaussian PSF::

        u =  x cos(theta) + y sin(theta),   v = -x sin(theta) + y cos(theta)
        h[y, x] = exp(-(u^2 / (2 sigma_x^2) + v^2 / (2 sigma_y^2))) / Z,   sum h = 1

    ``x`` runs along W (columns), ``y`` along H (rows), ``theta`` in radians (counter-clockwise
    from the x axis toward y). Differentiable in ``sigma_x``, ``sigma_y``, ``theta``."""
    size = _check_size(size, "anisotropic_gaussian_psf")
    sx = _check_positive_scalar(sigma_x, "sigma_x", "anisotropic_gaussian_psf")
    sy = _check_positive_scalar(sigma_y, "sigma_y", "anisotropic_gaussian_psf")
    th = jnp.asarray(theta, jnp.float32)
    if th.ndim != 0:
        raise ValueError(f"anisotropic_gaussian_psf: theta must be a scalar, got shape {th.shape}")
    check_finite(th, "theta", "anisotropic_gaussian_psf")
    yy, xx = _grid(size)
    return _rotated_gaussian(yy, xx, sx ** 2, sy ** 2, th)


#: DAEM's six ground-truth PSFs (Guo et al. CVPR 2023, ``Degradation_params/blur_kernel/{i}.mat``
#: key ``param``): ``[lambda_1, lambda_2, theta]``, covariance eigenvalues in px^2 and the angle
#: (rad) of the first eigenvector from the x (W) axis toward y (H).
DAEM_PSF_PARAMS = np.array([
    [2.34006046, 7.48942466, 1.91102791],
    [2.36392688, 12.33899734, 0.22843255],
    [6.30596511, 3.34026654, 3.08234704],
    [7.95151026, 2.72944377, 2.23683665],
    [11.16799763, 10.42737062, 2.46939577],
    [28.0, 1.0, 3.52069801],
], dtype=np.float64)
DAEM_PSF_PARAMS.setflags(write=False)


@functools.partial(jax.jit, static_argnames=("size",))
def _daem_clean_psf(index, size: int) -> jax.Array:
    lam1, lam2, theta = jnp.asarray(DAEM_PSF_PARAMS, jnp.float32)[index]
    c = jnp.arange(size, dtype=jnp.float32) - size // 2
    yy, xx = jnp.meshgrid(c, c, indexing="ij")
    return _rotated_gaussian(yy, xx, lam1, lam2, theta)


def daem_psf(index, size: int = 32, rng=None, noise: float = 0.2) -> jax.Array:
    """PSF ``index`` (0-5) of the DAEM protocol: an anisotropic Gaussian on a ``size x size``
    grid centred at pixel ``(size // 2, size // 2)`` (not at ``(size - 1) / 2``)::

        d = (x - size//2, y - size//2),   Sigma = R(theta) diag(lambda_1, lambda_2) R(theta)^T
        h[y, x] = exp(-d^T Sigma^-1 d / 2) * (1 + n[y, x]) / Z,   sum h = 1

    with ``[lambda_1, lambda_2, theta] = DAEM_PSF_PARAMS[index]``. Without ``rng``, ``n = 0``
    (the clean kernel). With ``rng`` (a ``jax.random`` key, or a ``numpy.random.Generator``),
    ``n ~ U(-noise, noise)`` i.i.d. per kernel pixel: the KAIR/USRNet ``gen_kernel`` style
    that DAEM's stored kernels show (their ratio to the clean kernel spans [0.8, 1.2] times
    a constant, std 0.115, uncorrelated between neighbours; tests/test_physics_protocols.py).
    ``size`` is static (DAEM uses the scale factor, 32 for CAVE); ``index`` may be traced
    (one PSF per image inside ``jit``: ``vmap(daem_psf)(indices)``). float32 ``(size, size)``.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"daem_psf: size must be a positive integer, got {size!r}")
    if not 0.0 <= float(noise) < 1.0:
        raise ValueError(f"daem_psf: noise must be in [0, 1), got {noise!r}")
    if is_concrete(index):
        i = np.asarray(index)
        if i.ndim != 0 or i.dtype.kind not in "iu" or not 0 <= int(i) < len(DAEM_PSF_PARAMS):
            raise ValueError(f"daem_psf: index must be an integer in [0, {len(DAEM_PSF_PARAMS)}), "
                             f"got {index!r}")
    h = _daem_clean_psf(jnp.asarray(index, jnp.int32), size)
    if rng is None or noise == 0:
        return h
    if isinstance(rng, np.random.Generator):
        n = jnp.asarray(rng.uniform(-noise, noise, (size, size)), jnp.float32)
    else:
        n = jax.random.uniform(rng, (size, size), jnp.float32, -noise, noise)
    h = h * (1.0 + n)
    return h / jnp.sum(h)


def normalize_psf(psf, n_bands: int | None = None) -> jax.Array:
    """Validate and normalise a user PSF: ``(kh, kw)`` or ``(kh, kw, C)``, odd ``kh``, ``kw``,
    finite, non-negative, positive sum; returns ``psf / sum_{y,x} psf`` (per band) as float32.
    ``n_bands``: if given, a 3-D PSF must have that many bands."""
    p = jnp.asarray(psf, jnp.float32)
    if p.ndim not in (2, 3):
        raise ValueError(f"psf must have shape (kh, kw) or (kh, kw, C), got {p.shape}")
    kh, kw = p.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"psf spatial size must be odd (centred kernel), got {p.shape[:2]}")
    if p.ndim == 3 and n_bands is not None and p.shape[2] != n_bands:
        raise ValueError(f"psf has {p.shape[2]} bands (shape {p.shape}) but the image has {n_bands}")
    check_finite(p, "psf", "normalize_psf")
    check_nonnegative(p, "psf", "normalize_psf")
    s = jnp.sum(p, axis=(0, 1), keepdims=True)
    if is_concrete(s) and not np.all(np.asarray(s) > 0):
        raise ValueError("psf must have a positive sum (per band)")
    return p / s


def _pad_hw(x: jax.Array, ph: int, pw: int, boundary: str) -> jax.Array:
    """Pad axes -3, -2 (H, W) of (..., H, W, C) by (ph, pw) on both sides."""
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {sorted(BOUNDARIES)}, got {boundary!r}")
    h, w = x.shape[-3], x.shape[-2]
    if boundary == "reflect" and (ph >= h or pw >= w):
        raise ValueError(
            f"'reflect' boundary needs the image ({h}x{w}) larger than the kernel radius ({ph}, {pw})")
    pad = [(0, 0)] * (x.ndim - 3) + [(ph, ph), (pw, pw), (0, 0)]
    return jnp.pad(x, pad, mode=BOUNDARIES[boundary])


@functools.partial(jax.jit, static_argnames=("boundary",))
def filter2d(x: jax.Array, kernel: jax.Array, boundary: str = "reflect") -> jax.Array:
    """2-D *convolution* per channel, same size: ``y[i, j, c] = sum_{a, b} k[a, b, c]
    x[i + r_h - a, j + r_w - b, c]`` with ``r = (k - 1) / 2`` and padded borders.

    ``x``: (..., H, W, C); ``kernel``: (kh, kw) or (kh, kw, C), odd sizes. Implemented as
    ``kh * kw`` shifted multiply-adds on the padded array (~20x faster than a depthwise
    ``lax.conv`` on XLA:CPU; see docs/architecture.md) for kernels up to 15x15, else as a grouped
    ``lax.conv_general_dilated``."""
    kh, kw = kernel.shape[:2]
    rh, rw = (kh - 1) // 2, (kw - 1) // 2
    k = kernel if kernel.ndim == 3 else kernel[:, :, None]
    k = k[::-1, ::-1].astype(x.dtype)  # convolution = correlation with the flipped kernel
    xp = _pad_hw(x, rh, rw, boundary)
    h, w = x.shape[-3], x.shape[-2]
    if kh * kw <= 225:
        out = jnp.zeros(x.shape, x.dtype)
        for a in range(kh):
            for b in range(kw):
                out = out + k[a, b] * xp[..., a:a + h, b:b + w, :]
        return out
    c = x.shape[-1]
    lead = x.shape[:-3]
    xb = xp.reshape((-1,) + xp.shape[-3:])
    kk = jnp.broadcast_to(k, (kh, kw, c))[:, :, None, :]  # HWIO with I = 1 (depthwise)
    y = jax.lax.conv_general_dilated(xb, kk, (1, 1), "VALID", feature_group_count=c,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HI)
    return y.reshape(lead + (h, w, c))


def blur(x, psf, boundary: str = "reflect") -> jax.Array:
    """Blur every band of ``x`` (..., H, W, C) with ``psf`` (normalised by :func:`normalize_psf`):
    ``(B * X)[i, j, c] = sum_{a,b} h_c[a, b] X[i + r - a, j + r - b, c]``.

    ``boundary``: ``"reflect"`` (mirror without repeating the edge, ``d c b | a b c d``),
    ``"symmetric"`` (MATLAB ``imfilter(...,'symmetric')``), ``"wrap"`` (periodic, the FFT
    convention of many fusion papers) or ``"edge"``."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"blur: x must have shape (..., H, W, C), got {x.shape}")
    check_finite(x, "x", "blur")
    p = normalize_psf(psf, n_bands=x.shape[-1])
    return filter2d(x, p, boundary)


def decimate(x, s: int, offset: int = 0) -> jax.Array:
    """s-fold decimation ``Y[k, l] = X[offset + s k, offset + s l]`` of (..., H, W, C).

    Phase: ``offset = 0`` keeps the top-left pixel of every s x s cell (MATLAB
    ``X(1:s:end, 1:s:end)``, the most common choice in HSI-SR code); ``offset = s // 2`` takes the
    cell centre. H and W must be multiples of ``s`` (crop first) so LR pixel k covers HR cell k."""
    x = jnp.asarray(x, jnp.float32)
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
        raise ValueError(f"decimate: s must be a positive integer, got {s!r}")
    if not isinstance(offset, (int, np.integer)) or not 0 <= offset < s:
        raise ValueError(f"decimate: offset must be an integer in [0, {s}), got {offset!r}")
    if x.ndim < 3:
        raise ValueError(f"decimate: x must have shape (..., H, W, C), got {x.shape}")
    h, w = x.shape[-3], x.shape[-2]
    if h % s or w % s:
        raise ValueError(f"decimate: H, W = ({h}, {w}) must be multiples of s = {s}; crop first")
    return x[..., offset::s, offset::s, :]


def spatial_degrade(x, psf, s: int, boundary: str = "reflect", offset: int = 0) -> jax.Array:
    """``D_s(B * X)``: :func:`blur` then :func:`decimate`; (..., H, W, C) -> (..., H/s, W/s, C)."""
    return decimate(blur(x, psf, boundary), s, offset)


def _check_kernel_any(psf, fn: str) -> jax.Array:
    """A (k, k) or (N, k, k) kernel of any size: finite, non-negative, normalised to sum 1."""
    p = jnp.asarray(psf, jnp.float32)
    if p.ndim not in (2, 3) or p.shape[-1] != p.shape[-2]:
        raise ValueError(f"{fn}: psf must be square, shape (k, k) or (N, k, k), got {p.shape}")
    check_finite(p, "psf", fn)
    check_nonnegative(p, "psf", fn)
    s = jnp.sum(p, axis=(-2, -1), keepdims=True)
    if is_concrete(s) and not np.all(np.asarray(s) > 0):
        raise ValueError(f"{fn}: psf must have a positive sum")
    return p / s


def daem_degrade(x, psf, scale: int) -> jax.Array:
    """The DAEM synthesis of the LR-HSI (``DatasetSyn/DegradationProcess.py``): zero-pad by
    ``p = (k - s) // 2`` on the top/left, then a *valid correlation* (kernel not flipped) with
    stride ``s``::

        LR[i, j, c] = sum_{u, v < k} h[u, v] X[s i + u - p, s j + v - p, c]    (X = 0 outside)

    For ``k = s`` (DAEM on CAVE: k = s = 32) this is the h-weighted sum over each
    non-overlapping s x s cell. Unlike :func:`spatial_degrade` (same-size convolution with a
    reflected boundary, odd kernels, then decimation at a phase), any ``k >= s`` works, even
    ``k`` included, and the border is zero. ``x``: (..., H, W, C) with H, W multiples of ``s``;
    ``psf``: (k, k), or (N, k, k) with one kernel per image of ``x`` (N, H, W, C) (the
    image-wise protocol). Normalised to sum 1. Differentiable w.r.t. ``x`` and ``psf``."""
    x = jnp.asarray(x, jnp.float32)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"daem_degrade: scale must be a positive integer, got {scale!r}")
    if x.ndim < 3:
        raise ValueError(f"daem_degrade: x must have shape (..., H, W, C), got {x.shape}")
    h, w = x.shape[-3], x.shape[-2]
    if h % scale or w % scale:
        raise ValueError(f"daem_degrade: H, W = ({h}, {w}) must be multiples of scale = {scale}; "
                         "crop first")
    check_finite(x, "x", "daem_degrade")
    p = _check_kernel_any(psf, "daem_degrade")
    k = p.shape[-1]
    if k < scale:
        raise ValueError(f"daem_degrade: kernel size {k} must be >= scale {scale}")
    if p.ndim == 3:
        if x.ndim != 4 or p.shape[0] != x.shape[0]:
            raise ValueError(f"daem_degrade: {p.shape[0]} kernels (psf {p.shape}) need x of shape "
                             f"(N, H, W, C) with N = {p.shape[0]}, got {x.shape}")
        return jax.vmap(lambda xi, pi: _daem_degrade(xi, pi, scale))(x, p)
    return _daem_degrade(x, p, scale)


def _daem_degrade(x, p, s: int):
    k = p.shape[-1]
    h, w, c = x.shape[-3:]
    if k == s:
        xb = x.reshape(x.shape[:-3] + (h // s, s, w // s, s, c))
        return jnp.einsum("...iujvc,uv->...ijc", xb, p, precision=_HI)
    lead = x.shape[:-3]
    xb = jnp.moveaxis(x.reshape((-1, h, w, c)), -1, 1).reshape((-1, h, w, 1))  # (N*C, H, W, 1)
    pad = (k - s) // 2
    y = jax.lax.conv_general_dilated(
        xb, p[:, :, None, None], (s, s), ((pad, k - s - pad), (pad, k - s - pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HI)
    y = y.reshape((-1, c, h // s, w // s))
    return jnp.moveaxis(y, 1, -1).reshape(lead + (h // s, w // s, c))


def add_noise_snr(key, x, snr_db) -> jax.Array:
    """Add white Gaussian noise at a per-band SNR (dB), per image::

        sigma_{b,c} = sqrt(mean_{i,j} x[b, i, j, c]^2 / 10^(snr_db / 10)),   y = x + sigma n

    ``x``: (..., H, W, C). Reparameterised, so differentiable w.r.t. ``x``. Deterministic in ``key``."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"add_noise_snr: x must have shape (..., H, W, C), got {x.shape}")
    snr = jnp.asarray(snr_db, jnp.float32)
    check_finite(snr, "snr_db", "add_noise_snr")
    power = jnp.mean(x ** 2, axis=(-3, -2), keepdims=True)
    sigma = jnp.sqrt(power / (10.0 ** (snr / 10.0)))
    return x + sigma * jax.random.normal(key, x.shape, jnp.float32)


#: Spatial degradations of :func:`make_sr_pair`.
SR_PAIR_MODES = ("same", "daem")


def make_sr_pair(hsi, psf, scale: int, srf, *, key=None, snr_db_hsi=None, snr_db_msi=None,
                 boundary: str = "reflect", offset: int = 0,
                 mode: str = "same") -> tuple[jax.Array, jax.Array]:
    """Simulate an HSI super-resolution (fusion) pair from a high-resolution cube ``hsi``
    (..., H, W, C)::

        lr_hsi = D_s(B * X) [+ N(0, sigma_h^2)]     (..., H/s, W/s, C)
        hr_msi = X R        [+ N(0, sigma_m^2)]     (..., H, W, K)

    ``psf``: (kh, kw) or (kh, kw, C) (e.g. ``gaussian_psf(2 * scale + 1, scale / 2)``), ``srf``
    R: (C, K). Optional noise at ``snr_db_hsi`` / ``snr_db_msi`` (per band, see
    :func:`add_noise_snr`) needs ``key`` (split into two). Differentiable w.r.t. ``hsi``,
    ``psf`` (hence ``sigma``) and ``srf``.

    ``mode="same"``: ``D_s`` = :func:`spatial_degrade` (odd PSF, same-size convolution with
    ``boundary``, decimation at ``offset``). ``mode="daem"``: :func:`daem_degrade` (the DAEM
    code's zero-padded valid correlation with stride ``scale``; any ``k >= scale``, e.g.
    :func:`daem_psf` with ``size = scale``; ``boundary``/``offset`` must stay default)."""
    x = jnp.asarray(hsi, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"make_sr_pair: hsi must have shape (..., H, W, C), got {x.shape}")
    if mode == "same":
        lr = spatial_degrade(x, psf, scale, boundary=boundary, offset=offset)
    elif mode == "daem":
        if boundary != "reflect" or offset != 0:
            raise ValueError("make_sr_pair: boundary/offset apply to mode='same' only; "
                             "mode='daem' pads with zeros and has no decimation phase")
        lr = daem_degrade(x, psf, scale)
    else:
        raise ValueError(f"make_sr_pair: mode must be one of {SR_PAIR_MODES}, got {mode!r}")
    hr = project(x, srf)
    if snr_db_hsi is not None or snr_db_msi is not None:
        if key is None:
            raise ValueError("make_sr_pair: a PRNG key is required when snr_db_hsi/snr_db_msi is set")
        k1, k2 = jax.random.split(key)
        if snr_db_hsi is not None:
            lr = add_noise_snr(k1, lr, snr_db_hsi)
        if snr_db_msi is not None:
            hr = add_noise_snr(k2, hr, snr_db_msi)
    return lr, hr
