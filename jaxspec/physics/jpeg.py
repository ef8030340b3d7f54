"""JPEG: a differentiable JAX simulation of baseline JFIF and an exact Pillow round trip.

The simulation follows the IJG/libjpeg baseline encoder + libjpeg-turbo default decoder:

1. RGB -> YCbCr (JFIF / ITU-R BT.601 full range)::

       Y  =  0.299 R + 0.587 G + 0.114 B
       Cb = -0.168736 R - 0.331264 G + 0.5 B + 128
       Cr =  0.5 R - 0.418688 G - 0.081312 B + 128

2. Chroma 4:2:0: 2x2 box average of Cb, Cr (libjpeg ``h2v2_downsample``); 4:4:4 optional.
   Planes are padded to a multiple of the MCU (16 px for 4:2:0, 8 for 4:4:4) by edge replication
   (libjpeg replicates the last column/row).
3. Level shift -128, orthonormal 8x8 DCT-II per block: ``F = D (f - 128) D^T`` with
   ``D[u, x] = c(u) cos((2x + 1) u pi / 16)``, ``c(0) = sqrt(1/8)``, ``c(u>0) = sqrt(2/8)``.
4. Quantisation ``Fq = round(F / Q)`` with the IJG tables (ITU T.81 Annex K) scaled by the
   quality ``q``: ``s = 5000 / q`` if ``q < 50`` else ``200 - 2 q``;
   ``Q = clip(floor((T s + 50) / 100), 1, 255)``. ``round`` uses a straight-through gradient:
   ``round_ste(x) = x + stop_gradient(round(x) - x)`` (forward exact, backward identity).
5. Decoder: ``F' = Fq Q``, inverse DCT, +128, chroma upsampling with libjpeg's "fancy"
   triangular filter (weights 3/4, 1/4 in each direction), YCbCr -> RGB, rounding to integers
   (straight-through) and clipping to [0, 255].

Differences from libjpeg(-turbo) that remain: float DCT instead of the integer ISLOW DCT, no
entropy coding (lossless anyway) and no intermediate integer rounding of YCbCr planes before
the DCT other than the explicit ones above. ``tests/test_physics_camera.py`` measures the PSNR
between this simulation and :func:`jpeg_pil`.
"""
from __future__ import annotations

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.physics.render import check_finite

__all__ = ["jpeg", "jpeg_pil", "jpeg_quant_tables", "rgb_to_ycbcr", "ycbcr_to_rgb", "round_ste",
           "dct_matrix_8"]

# ITU-T T.81 Annex K.1 / K.2 tables (natural, row-major order).
_LUMA_Q = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64).reshape(8, 8)
_CHROMA_Q = np.array([
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99], dtype=np.float64).reshape(8, 8)


def _check_quality(quality) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)):
        raise ValueError(f"JPEG quality must be an integer in [1, 100], got {quality!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    return int(quality)


def jpeg_quant_tables(quality: int) -> tuple[np.ndarray, np.ndarray]:
    """IJG quality-scaled (luma, chroma) 8x8 quantisation tables (``jpeg_set_quality``, baseline)."""
    q = _check_quality(quality)
    s = 5000.0 / q if q < 50 else 200.0 - 2.0 * q
    tabs = [np.clip(np.floor((t * s + 50.0) / 100.0), 1, 255) for t in (_LUMA_Q, _CHROMA_Q)]
    return tabs[0].astype(np.float32), tabs[1].astype(np.float32)


def dct_matrix_8() -> np.ndarray:
    """Orthonormal DCT-II matrix ``D`` (8x8): ``F = D f D^T``, ``f = D^T F D``."""
    u = np.arange(8)[:, None]
    x = np.arange(8)[None, :]
    d = np.cos((2 * x + 1) * u * np.pi / 16.0) * np.sqrt(2.0 / 8.0)
    d[0] = np.sqrt(1.0 / 8.0)
    return d.astype(np.float32)


_D = dct_matrix_8()
_RGB2YCC = np.array([[0.299, 0.587, 0.114],
                     [-0.168735892, -0.331264108, 0.5],
                     [0.5, -0.418687589, -0.081312411]], np.float32)
_YCC2RGB = np.array([[1.0, 0.0, 1.402],
                     [1.0, -0.344136286, -0.714136286],
                     [1.0, 1.772, 0.0]], np.float32)
_HI = jax.lax.Precision.HIGHEST


def round_ste(x: jax.Array) -> jax.Array:
    """``round(x)`` forward, identity backward: ``x + stop_gradient(round(x) - x)``."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def rgb_to_ycbcr(rgb: jax.Array) -> jax.Array:
    """JFIF full-range RGB [0, 255] -> YCbCr (Cb, Cr offset by 128). ``(..., 3)``."""
    ycc = jnp.einsum("...c,kc->...k", rgb, _RGB2YCC, precision=_HI)
    return ycc + jnp.array([0.0, 128.0, 128.0], rgb.dtype)


def ycbcr_to_rgb(ycc: jax.Array) -> jax.Array:
    """Inverse of :func:`rgb_to_ycbcr`: ``R = Y + 1.402 Cr'``, ``G = Y - 0.344136 Cb' -
    0.714136 Cr'``, ``B = Y + 1.772 Cb'`` with ``Cb' = Cb - 128``, ``Cr' = Cr - 128``."""
    ycc = ycc - jnp.array([0.0, 128.0, 128.0], ycc.dtype)
    return jnp.einsum("...c,kc->...k", ycc, _YCC2RGB, precision=_HI)


def _blocks(x: jax.Array) -> jax.Array:
    """(..., H, W) -> (..., H/8, W/8, 8, 8)."""
    *lead, h, w = x.shape
    x = x.reshape(*lead, h // 8, 8, w // 8, 8)
    return jnp.swapaxes(x, -3, -2)


def _unblocks(b: jax.Array) -> jax.Array:
    *lead, nh, nw, _, _ = b.shape
    return jnp.swapaxes(b, -3, -2).reshape(*lead, nh * 8, nw * 8)


def _dct_quant_roundtrip(plane: jax.Array, qtab: np.ndarray) -> jax.Array:
    """Level-shifted 8x8 DCT, quantise (STE round), dequantise, inverse DCT; (..., H, W)."""
    d = jnp.asarray(_D)
    b = _blocks(plane - 128.0)
    coef = jnp.einsum("ux,...xy,vy->...uv", d, b, d, precision=_HI)
    q = jnp.asarray(qtab)
    coef = round_ste(coef / q) * q
    rec = jnp.einsum("ux,...uv,vy->...xy", d, coef, d, precision=_HI)
    # libjpeg's IDCT output is rounded and range-limited to 8-bit samples.
    return jnp.clip(round_ste(_unblocks(rec) + 128.0), 0.0, 255.0)


def _pad_edge(x: jax.Array, ph: int, pw: int) -> jax.Array:
    """Edge-replicate the last two axes to (H + ph, W + pw)."""
    pad = [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]
    return jnp.pad(x, pad, mode="edge")


def _fancy_upsample_1d(x: jax.Array, axis: int) -> jax.Array:
    """libjpeg h2 "fancy" upsampling along ``axis``: out[2i] = (3 x[i] + x[i-1]) / 4,
    out[2i+1] = (3 x[i] + x[i+1]) / 4, edges replicated."""
    n = x.shape[axis]
    prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis=axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis),
                           jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    even = 0.75 * x + 0.25 * prev
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1 if axis >= 0 else axis)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)


def jpeg(rgb, quality: int = 75, subsampling: str = "4:2:0") -> jax.Array:
    """Differentiable JPEG compress-decompress of 8-bit-range RGB ``(..., H, W, 3)`` in [0, 255].

    Returns float32 ``(..., H, W, 3)`` holding integers in [0, 255] (the decoded image). Any
    H, W (padded internally to the MCU size and cropped back). Gradients pass through the
    roundings by the straight-through estimator. See the module docstring for every step.
    ``quality`` and ``subsampling`` are static (Python values).
    """
    q = _check_quality(quality)
    if subsampling not in ("4:2:0", "4:4:4"):
        raise ValueError(f"jpeg: subsampling must be '4:2:0' or '4:4:4', got {subsampling!r}")
    x = jnp.asarray(rgb, jnp.float32)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"jpeg: rgb must have shape (..., H, W, 3), got {x.shape}")
    check_finite(x, "rgb", "jpeg")
    return _jpeg_core(x, q, subsampling)


@functools.partial(jax.jit, static_argnames=("quality", "subsampling"))
def _jpeg_core(x, quality, subsampling):
    qy, qc = jpeg_quant_tables(quality)
    h, w = x.shape[-3], x.shape[-2]
    mcu = 16 if subsampling == "4:2:0" else 8
    ph, pw = (-h) % mcu, (-w) % mcu
    # libjpeg converts 8-bit RGB to integer YCbCr samples.
    ycc = round_ste(rgb_to_ycbcr(jnp.clip(x, 0.0, 255.0)))
    ycc = jnp.moveaxis(ycc, -1, -3)  # (..., 3, H, W)
    ycc = _pad_edge(ycc, ph, pw)
    y = _dct_quant_roundtrip(ycc[..., 0, :, :], qy)
    cb, cr = ycc[..., 1, :, :], ycc[..., 2, :, :]
    if subsampling == "4:2:0":
        def down(c):
            *lead, hh, ww = c.shape
            return round_ste(c.reshape(*lead, hh // 2, 2, ww // 2, 2).mean(axis=(-3, -1)))

        def up(c):
            return round_ste(_fancy_upsample_1d(_fancy_upsample_1d(c, c.ndim - 2), c.ndim - 1))

        cb = up(_dct_quant_roundtrip(down(cb), qc))
        cr = up(_dct_quant_roundtrip(down(cr), qc))
    else:
        cb = _dct_quant_roundtrip(cb, qc)
        cr = _dct_quant_roundtrip(cr, qc)
    ycc = jnp.stack([y, cb, cr], axis=-1)[..., :h, :w, :]
    out = ycbcr_to_rgb(ycc)
    return jnp.clip(round_ste(out), 0.0, 255.0)


def jpeg_pil(rgb_uint8, quality: int = 75, subsampling: str = "4:2:0") -> np.ndarray:
    """Exact JPEG encode + decode through Pillow (libjpeg-turbo); numpy uint8 ``(H, W, 3)`` in/out.

    ``subsampling`` "4:2:0" (libjpeg default, as written by OpenCV and the NTIRE code) or
    "4:4:4". Not differentiable; use it to build datasets and as the reference for :func:`jpeg`.
    """
    from PIL import Image

    q = _check_quality(quality)
    a = np.asarray(rgb_uint8)
    if a.dtype != np.uint8:
        raise ValueError(f"jpeg_pil: rgb_uint8 must have dtype uint8, got {a.dtype}")
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"jpeg_pil: rgb_uint8 must have shape (H, W, 3), got {a.shape}")
    ss = {"4:2:0": 2, "4:4:4": 0}.get(subsampling)
    if ss is None:
        raise ValueError(f"jpeg_pil: subsampling must be '4:2:0' or '4:4:4', got {subsampling!r}")
    buf = io.BytesIO()
    Image.fromarray(a, mode="RGB").save(buf, format="JPEG", quality=q, subsampling=ss)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
