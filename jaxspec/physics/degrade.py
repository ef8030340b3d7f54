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
           "spatial_degrade", "add_noise_snr", "make_sr_pair", "filter2d", "BOUNDARIES"]

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
    u = xx * jnp.cos(th) + yy * jnp.sin(th)
    v = -xx * jnp.sin(th) + yy * jnp.cos(th)
    logits = -(u ** 2 / (2.0 * sx ** 2) + v ** 2 / (2.0 * sy ** 2))
    h = jnp.exp(logits - jnp.max(logits))
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


def make_sr_pair(hsi, psf, scale: int, srf, *, key=None, snr_db_hsi=None, snr_db_msi=None,
                 boundary: str = "reflect", offset: int = 0) -> tuple[jax.Array, jax.Array]:
    """Simulate an HSI super-resolution (fusion) pair from a high-resolution cube ``hsi``
    (..., H, W, C)::

        lr_hsi = D_s(B * X) [+ N(0, sigma_h^2)]     (..., H/s, W/s, C)
        hr_msi = X R        [+ N(0, sigma_m^2)]     (..., H, W, K)

    ``psf``: (kh, kw) or (kh, kw, C) (e.g. ``gaussian_psf(2 * scale + 1, scale / 2)``), ``srf``
    R: (C, K). Optional noise at ``snr_db_hsi`` / ``snr_db_msi`` (per band, see
    :func:`add_noise_snr`) needs ``key`` (split into two). Differentiable w.r.t. ``hsi``,
    ``psf`` (hence ``sigma``) and ``srf``."""
    x = jnp.asarray(hsi, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"make_sr_pair: hsi must have shape (..., H, W, C), got {x.shape}")
    lr = spatial_degrade(x, psf, scale, boundary=boundary, offset=offset)
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
