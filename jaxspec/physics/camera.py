"""Camera simulation pipelines (JAX, keyed by a PRNG key) of the NTIRE spectral-recovery challenges.

Building blocks: :func:`shot_noise`, :func:`dark_noise`, :func:`expose_to_mean`,
:func:`quantize`, :func:`bayer_mosaic`, :func:`demosaic`, and :func:`jaxspec.physics.jpeg`.
Pipelines: :func:`ntire2022_camera` (ARAD-1K), :func:`ntire2020_realworld_camera`,
:func:`ntire2020_clean_camera`.

Images are ``(H, W, C)`` or ``(B, H, W, C)``; per-image statistics (means) are taken over the
last three axes. Pipelines return float32 RGB holding 8-bit code values in [0, 255] (the
project's schema for 8-bit sources). With ``noise="gaussian"`` and ``jpeg_backend="jax"`` the
pipelines are differentiable w.r.t. ``hsi`` and ``srf`` (roundings use straight-through
gradients); ``noise="poisson"`` is exact but its samples carry no gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.physics.degrade import filter2d
from jaxspec.physics.jpeg import jpeg, jpeg_pil, jpeg_quant_tables
from jaxspec.physics.render import check_finite, is_concrete, project

__all__ = ["shot_noise", "dark_noise", "expose_to_mean", "quantize", "bayer_mosaic", "demosaic",
           "ntire2022_camera", "ntire2020_realworld_camera", "ntire2020_clean_camera",
           "apply_jpeg"]

_NOISE = ("poisson", "gaussian")


def _as_f32(x):
    return jnp.asarray(x, jnp.float32)


def _check_image(x, fn: str, name: str = "image"):
    x = _as_f32(x)
    if x.ndim not in (3, 4):
        raise ValueError(f"{fn}: {name} must have shape (H, W, C) or (B, H, W, C), got {x.shape}")
    check_finite(x, name, fn)
    return x


def _positive(v, name: str, fn: str):
    """Validate a positive scalar parameter; returns a float32 scalar (traced values pass)."""
    if is_concrete(v):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: {name} must be a positive number, got {v!r}") from None
        if not (np.isfinite(f) and f > 0):
            raise ValueError(f"{fn}: {name} must be finite and > 0, got {v!r}")
    v = jnp.asarray(v, jnp.float32)
    if v.ndim != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {v.shape}")
    return v


# ----------------------------------------------------------------------------- noise
def shot_noise(key, signal, npe: float, method: str = "poisson") -> jax.Array:
    """Photon shot noise at ``npe`` photo-electrons per unit signal (NTIRE ``addNoise``)::

        e = max(signal, 0) * npe,   y = Poisson(e) / npe                  (method="poisson")
        y = s + sqrt(s / npe) * n,  s = max(signal, 0), n ~ N(0, 1)        (method="gaussian")

    The Gaussian form is the moment-matched approximation (mean s, variance s / npe), written
    reparameterised so ``d y / d signal`` exists. Deterministic given ``key``.
    """
    if method not in _NOISE:
        raise ValueError(f"shot_noise: method must be one of {_NOISE}, got {method!r}")
    npe = _positive(npe, "npe", "shot_noise")
    x = _as_f32(signal)
    check_finite(x, "signal", "shot_noise")
    return _shot_noise(key, x, npe, method)


@functools.partial(jax.jit, static_argnames=("method",))
def _shot_noise(key, x, npe, method):
    s = jnp.maximum(x, 0.0)
    if method == "poisson":
        e = jax.random.poisson(key, s * npe, shape=s.shape)
        return e.astype(jnp.float32) / npe
    n = jax.random.normal(key, s.shape, jnp.float32)
    var = s / npe
    safe = jnp.where(var > 0, var, 1.0)
    return s + jnp.where(var > 0, jnp.sqrt(safe), 0.0) * n


def dark_noise(key, electrons, std: float) -> jax.Array:
    """Additive Gaussian read/dark noise ``y = e + std * n``, ``n ~ N(0, 1)`` (electrons)."""
    if is_concrete(std) and not (np.isfinite(float(std)) and float(std) >= 0):
        raise ValueError(f"dark_noise: std must be finite and >= 0 electrons, got {std}")
    std = jnp.asarray(std, jnp.float32)
    e = _as_f32(electrons)
    return e + std * jax.random.normal(key, e.shape, jnp.float32)


# ----------------------------------------------------------------------------- tone / A2D
def expose_to_mean(x, target: float = 0.18) -> jax.Array:
    """Exposure scaling per image: ``y = x * target / mean(x)`` (mean over H, W, C), so
    ``mean(y) = target`` (NTIRE 2022: ``TYPICAL_SCENE_REFLECTIVITY = 0.18``)."""
    target = _positive(target, "target", "expose_to_mean")
    x = _check_image(x, "expose_to_mean", "x")
    m = jnp.mean(x, axis=(-3, -2, -1), keepdims=True)
    if is_concrete(m) and not np.all(np.asarray(m) > 0):
        raise ValueError("expose_to_mean: image mean must be > 0 (all-zero or negative image)")
    return x * (target / m)


def quantize(x, levels: int = 255, mode: str = "floor") -> jax.Array:
    """A2D: code values ``q = floor(clip(x, 0, levels))`` (``mode="floor"``, numpy ``astype``
    truncation as in the NTIRE code) or ``round(...)`` (``"round"``); straight-through gradient
    ``q = x_c + stop_gradient(q - x_c)`` with ``x_c`` the clipped input. Returns float32 codes."""
    if mode not in ("floor", "round"):
        raise ValueError(f"quantize: mode must be 'floor' or 'round', got {mode!r}")
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"quantize: levels must be a positive integer, got {levels!r}")
    xc = jnp.clip(_as_f32(x), 0.0, float(levels))
    q = jnp.floor(xc) if mode == "floor" else jnp.round(xc)
    return xc + jax.lax.stop_gradient(q - xc)


# ----------------------------------------------------------------------------- CFA
def bayer_mosaic(rgb) -> jax.Array:
    """RGGB Bayer mosaic ``(..., H, W, 3) -> (..., H, W)`` (NTIRE 2020 ``projectToRGBMosaic``)::

        m[0::2, 0::2] = R,  m[0::2, 1::2] = G,  m[1::2, 0::2] = G,  m[1::2, 1::2] = B
    """
    x = _as_f32(rgb)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"bayer_mosaic: rgb must have shape (..., H, W, 3), got {x.shape}")
    masks = _rggb_masks(x.shape[-3], x.shape[-2])
    return jnp.sum(x * masks, axis=-1)


def _rggb_masks(h: int, w: int) -> jax.Array:
    yy, xx = np.meshgrid(np.arange(h) % 2, np.arange(w) % 2, indexing="ij")
    r = (yy == 0) & (xx == 0)
    b = (yy == 1) & (xx == 1)
    g = ~(r | b)
    return jnp.asarray(np.stack([r, g, b], -1).astype(np.float32))


# Malvar, He, Cutler (ICASSP 2004) 5x5 gradient-corrected bilinear kernels (x 1/8).
_K_G_AT_RB = np.array([[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1],
                       [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]], np.float32) / 8
_K_ROWNBR = np.array([[0, 0, .5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1],
                      [0, -1, 0, -1, 0], [0, 0, .5, 0, 0]], np.float32) / 8  # colour in same row
_K_COLNBR = _K_ROWNBR.T.copy()                                          # colour in same column
_K_DIAG = np.array([[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5],
                    [0, 2, 0, 2, 0], [0, 0, -1.5, 0, 0]], np.float32) / 8


def demosaic(mosaic, method: str = "malvar") -> jax.Array:
    """Demosaic an RGGB mosaic ``(..., H, W) -> (..., H, W, 3)`` (H, W even), linear in the input.

    ``"malvar"``: Malvar-He-Cutler (2004) gradient-corrected bilinear interpolation: at each site
    the missing colours are 5x5 linear filters of the mosaic (kernels in the source);
    ``"bilinear"``: classic bilinear, ``G = [[0,1,0],[1,4,1],[0,1,0]]/4 * G_sparse``,
    ``R, B = [[1,2,1],[2,4,2],[1,2,1]]/4 * R/B_sparse``. Borders use 'reflect' padding, which keeps
    the CFA phase. Replaces OpenCV's edge-aware ``BayerBG2BGR_EA`` used by NTIRE 2020 (documented
    deviation).
    """
    if method not in ("malvar", "bilinear"):
        raise ValueError(f"demosaic: method must be 'malvar' or 'bilinear', got {method!r}")
    m = _as_f32(mosaic)
    if m.ndim < 2:
        raise ValueError(f"demosaic: mosaic must have shape (..., H, W), got {m.shape}")
    h, w = m.shape[-2], m.shape[-1]
    if h % 2 or w % 2 or h < 4 or w < 4:
        raise ValueError(f"demosaic: H, W must be even and >= 4, got ({h}, {w})")
    check_finite(m, "mosaic", "demosaic")
    return _demosaic_core(m, method)


@functools.partial(jax.jit, static_argnames=("method",))
def _demosaic_core(m, method):
    h, w = m.shape[-2], m.shape[-1]
    masks = _rggb_masks(h, w)  # (H, W, 3)
    x = m[..., None]  # (..., H, W, 1)
    if method == "bilinear":
        kg = jnp.asarray(np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], np.float32) / 4)
        krb = jnp.asarray(np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 4)
        sparse = x * masks
        k = jnp.stack([krb, kg, krb], axis=-1)
        return filter2d(sparse, k, "reflect")
    f = filter2d(jnp.concatenate([x, x, x, x], axis=-1),
                 jnp.asarray(np.stack([_K_G_AT_RB, _K_ROWNBR, _K_COLNBR, _K_DIAG], -1)), "reflect")
    g_rb, rownbr, colnbr, diag = f[..., 0], f[..., 1], f[..., 2], f[..., 3]
    yy, xx = np.meshgrid(np.arange(h) % 2, np.arange(w) % 2, indexing="ij")
    at_r = jnp.asarray((yy == 0) & (xx == 0))
    at_b = jnp.asarray((yy == 1) & (xx == 1))
    at_g_rrow = jnp.asarray((yy == 0) & (xx == 1))  # G in a red row: R left/right, B up/down
    at_g_brow = jnp.asarray((yy == 1) & (xx == 0))  # G in a blue row: B left/right, R up/down
    r = jnp.where(at_r, m, jnp.where(at_b, diag, jnp.where(at_g_rrow, rownbr, colnbr)))
    b = jnp.where(at_b, m, jnp.where(at_r, diag, jnp.where(at_g_brow, rownbr, colnbr)))
    g = jnp.where(at_r | at_b, g_rb, m)
    return jnp.stack([r, g, b], axis=-1)


# ----------------------------------------------------------------------------- JPEG dispatch
def apply_jpeg(codes, quality: int, backend: str = "jax") -> jax.Array:
    """JPEG round trip of 8-bit codes (..., H, W, 3): ``"jax"`` (differentiable simulation,
    :func:`jaxspec.physics.jpeg`) or ``"pil"`` (exact libjpeg via Pillow; concrete inputs only)."""
    if backend == "jax":
        return jpeg(codes, quality)
    if backend != "pil":
        raise ValueError(f"jpeg_backend must be 'jax' or 'pil', got {backend!r}")
    if not is_concrete(codes):
        raise ValueError("jpeg_backend='pil' cannot run under jit/grad; use jpeg_backend='jax'")
    a = np.asarray(codes)
    u8 = np.clip(np.round(a), 0, 255).astype(np.uint8)
    flat = u8.reshape((-1,) + u8.shape[-3:])
    out = np.stack([jpeg_pil(im, quality) for im in flat]).reshape(u8.shape)
    return jnp.asarray(out, jnp.float32)


# ----------------------------------------------------------------------------- pipelines
def _check_srf_for(x, srf, fn: str):
    s = _as_f32(srf)
    if s.ndim != 2 or s.shape[0] != x.shape[-1]:
        raise ValueError(f"{fn}: band mismatch, hsi has shape {x.shape} but srf has shape {s.shape} "
                         f"(expected ({x.shape[-1]}, K))")
    check_finite(s, "srf", fn)
    return s


def _check_exposure(mean, fn: str) -> None:
    if is_concrete(mean) and not np.all(np.asarray(mean) > 0):
        raise ValueError(f"{fn}: the projected image has mean <= 0 (black image); cannot expose")


@functools.partial(jax.jit, static_argnames=("noise", "quantization", "jpeg_quality"))
def _ntire2022_core(key, x, srf, npe, target_mean, noise, quantization, jpeg_quality):
    rgb = jnp.maximum(project(x, srf), 0.0)
    noisy = _shot_noise(key, rgb, npe, noise)
    m = jnp.mean(noisy, axis=(-3, -2, -1), keepdims=True)
    codes = quantize(255.0 * noisy * (target_mean / m), 255, quantization)
    if jpeg_quality is not None:
        codes = jpeg(codes, jpeg_quality)
    return codes, m


def ntire2022_camera(key, hsi, srf, npe=750.0, jpeg_quality: int | None = 65,
                     target_mean=0.18, noise: str = "poisson",
                     jpeg_backend: str = "jax", quantization: str = "floor") -> jax.Array:
    """NTIRE 2022 (ARAD-1K) RGB simulation (``createNoisyRGB`` + ``save_jpg``)::

        rgb   = max(hsi @ srf, 0)                         (projectCube, clipNegative=True)
        noisy = Poisson(rgb * npe) / npe                  (shot noise, npe photo-electrons / unit)
        codes = floor(clip(255 * noisy * 0.18 / mean(noisy), 0, 255))   (exposure, 8-bit)
        out   = JPEG_q(codes)                             (q = 65; None skips JPEG)

    ``hsi`` (H, W, C) or (B, H, W, C) numpy/JAX; ``srf`` (C, 3). ``npe`` and ``target_mean`` may
    be traced (no recompilation per value); ``noise`` ("poisson" exact, "gaussian"
    differentiable), ``jpeg_quality``, ``jpeg_backend`` ("jax" simulation, "pil" exact
    libjpeg, not traceable) and ``quantization`` ("floor" as the challenge's ``astype(uint8)``,
    or "round") are static. The challenge used the raw gained QE
    (``load_ntire2022_rgb_qe(..., normalize=None)``, G sums to 8.57 on 400-700/10) on cubes in
    [0, 1], so its npe refers to that scale; with a ``"sum_g"`` SRF the same npe means fewer
    electrons per pixel (noisier). Returns float32 8-bit codes in [0, 255].
    """
    fn = "ntire2022_camera"
    x = _check_image(hsi, fn, "hsi")
    s = _check_srf_for(x, srf, fn)
    npe = _positive(npe, "npe", fn)
    target_mean = _positive(target_mean, "target_mean", fn)
    if noise not in _NOISE:
        raise ValueError(f"{fn}: noise must be one of {_NOISE}, got {noise!r}")
    if quantization not in ("floor", "round"):
        raise ValueError(f"{fn}: quantization must be 'floor' or 'round', got {quantization!r}")
    if jpeg_backend not in ("jax", "pil"):
        raise ValueError(f"{fn}: jpeg_backend must be 'jax' or 'pil', got {jpeg_backend!r}")
    if jpeg_quality is not None:
        jpeg_quant_tables(jpeg_quality)  # validates the quality
    inner_q = jpeg_quality if jpeg_backend == "jax" else None
    codes, m = _ntire2022_core(key, x, s, npe, target_mean, noise, quantization, inner_q)
    _check_exposure(m, fn)
    if jpeg_quality is not None and jpeg_backend == "pil":
        codes = apply_jpeg(codes, jpeg_quality, "pil")
    return codes


@functools.partial(jax.jit, static_argnames=("noise", "bit_depth", "demosaic_method",
                                             "jpeg_quality"))
def _ntire2020_rw_core(key, x, srf, target_npe, dark_noise_std, noise, bit_depth,
                       demosaic_method, jpeg_quality):
    k_shot, k_dark = jax.random.split(key)
    m = bayer_mosaic(jnp.maximum(project(x, srf), 0.0))
    gmask = _rggb_masks(m.shape[-2], m.shape[-1])[..., 1]
    mean_g = jnp.sum(m * gmask, axis=(-2, -1), keepdims=True) / jnp.sum(gmask)
    k = target_npe / mean_g
    e = _shot_noise(k_shot, m * k, jnp.float32(1.0), noise)
    e = e + dark_noise_std * jax.random.normal(k_dark, e.shape, jnp.float32)
    levels = 2 ** int(bit_depth) - 1
    raw = quantize(jnp.clip(e / k, 0.0, 1.0) * levels, levels, "round") / levels
    rgb = _demosaic_core(raw, demosaic_method)
    codes = quantize(255.0 * jnp.clip(rgb, 0.0, 1.0), 255, "floor")
    if jpeg_quality is not None:
        codes = jpeg(codes, jpeg_quality)
    return codes, mean_g


def ntire2020_realworld_camera(key, hsi, srf, target_npe=5000.0, dark_noise_std=10.0,
                               jpeg_quality: int | None = 80, bit_depth: int = 16,
                               demosaic_method: str = "malvar", noise: str = "poisson",
                               jpeg_backend: str = "jax") -> jax.Array:
    """NTIRE 2020 "RealWorld" track simulation (``SpectralUtils`` of the challenge)::

        m     = RGGB(max(hsi @ srf, 0))                                   (Bayer mosaic)
        k     = target_npe / mean(green sites of m)                       (e- per unit signal)
        e     = Poisson(k m) + N(0, dark_noise_std^2)                     (electrons)
        raw   = round(clip(e / k, 0, 1) * (2^bits - 1)) / (2^bits - 1)    (A2D, full scale 1)
        rgb   = demosaic(raw)                                             (Malvar-He-Cutler)
        out   = JPEG_80(floor(255 clip(rgb, 0, 1)))

    The signal is taken as relative to the sensor's full scale 1.0 (the reference digitises the
    mosaic's own DN scale). The reference code draws dark noise with ``np.random.normal(0,
    darkNoise**2)``, i.e. std 100 e-; we use the documented std (10 e-) — pass
    ``dark_noise_std=100`` to reproduce the code. OpenCV's ``BayerBG2BGR_EA`` is replaced by
    :func:`demosaic`. H, W must be even. ``target_npe``, ``dark_noise_std`` may be traced; the
    rest is static. Returns float32 8-bit codes in [0, 255].
    """
    fn = "ntire2020_realworld_camera"
    x = _check_image(hsi, fn, "hsi")
    s = _check_srf_for(x, srf, fn)
    target_npe = _positive(target_npe, "target_npe", fn)
    if is_concrete(dark_noise_std) and not (np.isfinite(float(dark_noise_std)) and float(dark_noise_std) >= 0):
        raise ValueError(f"{fn}: dark_noise_std must be finite and >= 0, got {dark_noise_std!r}")
    dark_noise_std = jnp.asarray(dark_noise_std, jnp.float32)
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, (int, np.integer)) or not 1 <= bit_depth <= 24:
        raise ValueError(f"{fn}: bit_depth must be an int in [1, 24], got {bit_depth!r}")
    if x.shape[-3] % 2 or x.shape[-2] % 2 or x.shape[-3] < 4 or x.shape[-2] < 4:
        raise ValueError(f"{fn}: H, W must be even and >= 4 for the RGGB mosaic, got {x.shape}")
    if noise not in _NOISE:
        raise ValueError(f"{fn}: noise must be one of {_NOISE}, got {noise!r}")
    if demosaic_method not in ("malvar", "bilinear"):
        raise ValueError(f"{fn}: demosaic_method must be 'malvar' or 'bilinear', got {demosaic_method!r}")
    if jpeg_backend not in ("jax", "pil"):
        raise ValueError(f"{fn}: jpeg_backend must be 'jax' or 'pil', got {jpeg_backend!r}")
    if jpeg_quality is not None:
        jpeg_quant_tables(jpeg_quality)
    inner_q = jpeg_quality if jpeg_backend == "jax" else None
    codes, mean_g = _ntire2020_rw_core(key, x, s, target_npe, dark_noise_std, noise, int(bit_depth),
                                       demosaic_method, inner_q)
    _check_exposure(mean_g, fn)
    if jpeg_quality is not None and jpeg_backend == "pil":
        codes = apply_jpeg(codes, jpeg_quality, "pil")
    return codes


def ntire2020_clean_camera(hsi, srf) -> jax.Array:
    """NTIRE 2020 "Clean" track: ``floor(255 clip(hsi @ srf, 0, 1))`` (lossless 8-bit PNG).
    The challenge used ``cie_1964_w_gain.npz``; use ``get_srf("cie1964")`` (see docs)."""
    x = _check_image(hsi, "ntire2020_clean_camera", "hsi")
    return quantize(255.0 * jnp.clip(project(x, srf), 0.0, 1.0), 255, "floor")
