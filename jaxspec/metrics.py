"""Image-quality metrics for spectral reconstruction and HSI super-resolution.

Every metric takes a prediction and a reference (ground truth) of shape (B, H, W, C) (NHWC,
bands last) and returns one value per image, shape (B,). Average over the batch / dataset
yourself: the NTIRE 2022 / MST++ protocol reports the mean of per-image values.

Protocol conventions (MST++ ``train_code/utils.py`` and NTIRE 2022 scoring):

* MRAE and RMSE use the *unclamped* prediction; MRAE has *no* epsilon (gt == 0 gives inf).
* PSNR clamps both inputs to [0, data_range] (peak = data_range = 1 by default).
* Scores are computed on the centre crop ``[128:-128, 128:-128]``: see :func:`center_crop` and
  ``evaluate_all(..., crop_border=128)``.

All metrics are ``jax.numpy`` functions and may be used under ``jax.jit`` / ``jax.vmap``.
Input validation (rank, matching shapes, floating dtype, NaN, negative gt for MRAE) runs
on concrete arrays; on tracers (inside ``jit``) only the static checks (rank, shape, dtype)
run and the value checks are skipped. Invalid input raises ``ValueError`` naming the argument
and its shape.

See ``docs/metrics.md`` for the formulas and their relation to the reference code.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "mrae", "rmse", "psnr", "psnr_bands", "sam", "ssim", "ergas", "uiqi",
    "center_crop", "evaluate_all", "METRIC_NAMES",
]

METRIC_NAMES = ("mrae", "rmse", "psnr", "sam", "ssim", "ergas", "uiqi")

# Variance sums below this fraction of (mu_x^2 + mu_y^2) are float32 rounding noise and are
# treated as exactly zero by UIQI's special cases (see `uiqi`).
_UIQI_FLAT_RTOL = 1e-6


# --------------------------------------------------------------------------- validation
def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_array(x: Any, arg: str, fn: str):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        try:
            x = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise ValueError(f"{fn}: `{arg}` is not array-like ({type(x).__name__})") from e
    if x.ndim != 4:
        raise ValueError(
            f"{fn}: `{arg}` must have rank 4 (B, H, W, C), got rank {x.ndim} with shape "
            f"{tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{fn}: `{arg}` must have a floating dtype, got {x.dtype} (shape {tuple(x.shape)}); "
            "convert integer images to float first (e.g. x / 255)")
    return x


def _has_nan(x) -> bool:
    if isinstance(x, np.ndarray):
        return bool(np.isnan(x).any())
    return bool(jnp.isnan(x).any())


def _validate(pred, gt, fn: str, *, nonneg_gt: bool = False, min_hw: int = 1):
    """Check the (pred, gt) pair; return them as float arrays (float32 at least)."""
    pred = _as_array(pred, "pred", fn)
    gt = _as_array(gt, "gt", fn)
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(
            f"{fn}: shape mismatch between `pred` {tuple(pred.shape)} and `gt` "
            f"{tuple(gt.shape)}; both must be (B, H, W, C)")
    h, w = pred.shape[1], pred.shape[2]
    if h < min_hw or w < min_hw:
        raise ValueError(
            f"{fn}: images of shape {tuple(pred.shape)} are too small: H and W must be "
            f">= {min_hw} for this metric's window")
    for arg, x in (("pred", pred), ("gt", gt)):
        if not _is_tracer(x) and _has_nan(x):
            raise ValueError(f"{fn}: `{arg}` (shape {tuple(x.shape)}) contains NaN values")
    if nonneg_gt and not _is_tracer(gt):
        gmin = float(np.min(gt)) if isinstance(gt, np.ndarray) else float(jnp.min(gt))
        if gmin < 0:
            raise ValueError(
                f"{fn}: `gt` (shape {tuple(gt.shape)}) has negative values (min {gmin:g}); "
                "MRAE divides by gt and needs gt >= 0")
    return _float(pred), _float(gt)


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------- helpers
def _gaussian_taps(sigma: float, truncate: float = 3.5) -> np.ndarray:
    """1-D Gaussian as scipy.ndimage: radius int(truncate*sigma + 0.5), sum-normalised."""
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x, taps_h: np.ndarray, taps_w: np.ndarray):
    """Separable 'valid' correlation over axes -3 (H) and -2 (W) by shift-add.

    (..., H, W, C) -> (..., H - kh + 1, W - kw + 1, C). Shift-add is much faster than a
    depthwise ``lax.conv`` on XLA:CPU and exact in the same floating precision.
    """
    kh, kw = len(taps_h), len(taps_w)
    ho, wo = x.shape[-3] - kh + 1, x.shape[-2] - kw + 1
    y = sum(float(t) * x[..., i:i + ho, :, :] for i, t in enumerate(taps_h))
    return sum(float(t) * y[..., :, j:j + wo, :] for j, t in enumerate(taps_w))


def _local_stats(x, y, taps_h, taps_w):
    """Windowed means, variances and covariance (population, i.e. weights sum to 1).

    The second moments are computed on per-image, per-band centred data (x - mean(x)),
    which leaves (co)variances unchanged and avoids float32 cancellation.
    """
    cx = jnp.mean(x, axis=(1, 2), keepdims=True)
    cy = jnp.mean(y, axis=(1, 2), keepdims=True)
    xc, yc = x - cx, y - cy
    f = _filter_valid(jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc]), taps_h, taps_w)
    mxc, myc, exx, eyy, exy = f[0], f[1], f[2], f[3], f[4]
    vx = exx - mxc * mxc
    vy = eyy - myc * myc
    vxy = exy - mxc * myc
    return mxc + cx, myc + cy, vx, vy, vxy


def _safe_div(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# --------------------------------------------------------------------------- cores (jit)
@jax.jit
def _mrae(pred, gt):
    return jnp.mean(jnp.abs(pred - gt) / gt, axis=(1, 2, 3))


@jax.jit
def _rmse(pred, gt):
    return jnp.sqrt(jnp.mean(jnp.square(pred - gt), axis=(1, 2, 3)))


@functools.partial(jax.jit, static_argnames=("data_range",))
def _psnr(pred, gt, data_range=1.0):
    p = jnp.clip(pred, 0.0, data_range)
    g = jnp.clip(gt, 0.0, data_range)
    mse = jnp.mean(jnp.square(p - g), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range ** 2 / mse)


@jax.jit
def _psnr_bands(pred, gt):
    mse = jnp.mean(jnp.square(pred - gt), axis=(1, 2))                  # (B, C)
    peak = jnp.max(gt, axis=(1, 2))                                     # (B, C)
    return jnp.mean(10.0 * jnp.log10(jnp.square(peak) / mse), axis=-1)


@jax.jit
def _sam(pred, gt):
    npn = jnp.linalg.norm(pred, axis=-1, keepdims=True)
    ngn = jnp.linalg.norm(gt, axis=-1, keepdims=True)
    pz, gz = npn[..., 0] == 0, ngn[..., 0] == 0
    u = pred / jnp.where(npn == 0, 1.0, npn)
    v = gt / jnp.where(ngn == 0, 1.0, ngn)
    # Kahan's formula: accurate for nearly parallel and nearly opposite spectra alike.
    ang = 2.0 * jnp.arctan2(jnp.linalg.norm(u - v, axis=-1), jnp.linalg.norm(u + v, axis=-1))
    ang = jnp.where(pz | gz, jnp.where(pz & gz, 0.0, jnp.pi / 2), ang)
    return jnp.mean(jnp.degrees(ang), axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "k1", "k2"))
def _ssim(pred, gt, data_range=1.0, sigma=1.5, k1=0.01, k2=0.03):
    taps = _gaussian_taps(sigma)
    mx, my, vx, vy, vxy = _local_stats(pred, gt, taps, taps)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(1, 2, 3))


@functools.partial(jax.jit, static_argnames=("scale",))
def _ergas(pred, gt, scale=1.0):
    rmse_b = jnp.sqrt(jnp.mean(jnp.square(pred - gt), axis=(1, 2)))   # (B, C)
    mean_b = jnp.mean(gt, axis=(1, 2))                                  # (B, C)
    return 100.0 / scale * jnp.sqrt(jnp.mean(jnp.square(rmse_b / mean_b), axis=-1))


@functools.partial(jax.jit, static_argnames=("window",))
def _uiqi(pred, gt, window=8):
    if window is None:
        mx = jnp.mean(pred, axis=(1, 2), keepdims=True)
        my = jnp.mean(gt, axis=(1, 2), keepdims=True)
        xc, yc = pred - mx, gt - my
        vx = jnp.mean(xc * xc, axis=(1, 2), keepdims=True)
        vy = jnp.mean(yc * yc, axis=(1, 2), keepdims=True)
        vxy = jnp.mean(xc * yc, axis=(1, 2), keepdims=True)
    else:
        box = np.full(window, 1.0 / window)
        mx, my, vx, vy, vxy = _local_stats(pred, gt, box, box)
    msum = mx * mx + my * my
    vsum = vx + vy
    flat = vsum <= _UIQI_FLAT_RTOL * msum           # float32-rounding-level variance == 0
    vsum = jnp.where(flat, 0.0, vsum)
    vxy = jnp.where(flat, 0.0, vxy)
    den = vsum * msum
    q = jnp.ones_like(den)                                      # both zero -> 1
    q = jnp.where((vsum == 0) & (msum != 0), _safe_div(2 * mx * my, msum), q)
    q = jnp.where(den != 0, _safe_div(4 * vxy * mx * my, den), q)
    return jnp.mean(q, axis=(1, 2, 3))


# --------------------------------------------------------------------------- public API
def mrae(pred, gt):
    r"""Mean relative absolute error per image (NTIRE 2020/2022, MST++ ``Loss_MRAE``).

    .. math:: \mathrm{MRAE}_b = \frac{1}{HWC}\sum_{h,w,c}
              \frac{|\hat y_{bhwc} - y_{bhwc}|}{y_{bhwc}}

    No epsilon, exactly as the reference code: any ``gt == 0`` element makes the image's
    MRAE ``inf`` (or ``nan`` where ``pred`` is also 0). Negative ``gt`` raises ``ValueError``.
    ``pred`` is not clamped. Returns shape (B,).
    """
    pred, gt = _validate(pred, gt, "mrae", nonneg_gt=True)
    return _mrae(pred, gt)


def rmse(pred, gt):
    r"""Root mean squared error per image (MST++ ``Loss_RMSE`` with batch 1).

    .. math:: \mathrm{RMSE}_b = \sqrt{\frac{1}{HWC}\sum_{h,w,c}(\hat y_{bhwc} - y_{bhwc})^2}

    Unclamped. The MST++ protocol averages these per-image values (a mean of RMSEs, not a
    global RMSE). Returns shape (B,).
    """
    pred, gt = _validate(pred, gt, "rmse")
    return _rmse(pred, gt)


def psnr(pred, gt, data_range: float = 1.0):
    r"""Peak signal-to-noise ratio per image in dB (MST++ ``Loss_PSNR``).

    Both inputs are clamped to ``[0, data_range]`` first; the peak is ``data_range``:

    .. math:: \mathrm{PSNR}_b = 10\log_{10}\frac{R^2}{\frac{1}{HWC}\sum_{h,w,c}
              (\mathrm{clip}(\hat y_{bhwc}) - \mathrm{clip}(y_{bhwc}))^2}

    MST++ clamps to [0, 1], multiplies by 255 and uses peak 255: identical to R = 1 here.
    Identical (clamped) images have MSE 0 and give ``+inf`` (no cap). Returns shape (B,).
    """
    if not data_range > 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    pred, gt = _validate(pred, gt, "psnr")
    return _psnr(pred, gt, data_range=float(data_range))


def psnr_bands(pred, gt):
    r"""Band-wise PSNR of the HSI-fusion papers (DAEM ``Utils/utils_image.py::compute_psnr``),
    per image in dB: each band's peak is that band's ground-truth maximum, the prediction is
    *not* clamped, and the per-band values are averaged:

    .. math:: \mathrm{PSNR}_b = \frac{1}{C}\sum_c 10\log_{10}
              \frac{\max_{h,w} y_{bhwc}^2}{\frac{1}{HW}\sum_{h,w}(\hat y_{bhwc} - y_{bhwc})^2}

    Scale-invariant (the authors' x255 does not change it). Differs from :func:`psnr` (one MSE
    over all bands, peak ``data_range``, both clamped): a mean of per-band logs rewards bands
    with small errors, and a band peak below 1 lowers it. A band predicted exactly gives
    ``+inf``. Returns shape (B,)."""
    pred, gt = _validate(pred, gt, "psnr_bands")
    return _psnr_bands(pred, gt)


def sam(pred, gt):
    r"""Spectral angle mapper per image, in degrees.

    .. math:: \mathrm{SAM}_b = \frac{1}{HW}\sum_{h,w} \frac{180}{\pi}
              \arccos\frac{\langle \hat y_{bhw}, y_{bhw}\rangle}{\|\hat y_{bhw}\|\,\|y_{bhw}\|}

    evaluated with Kahan's equivalent, well-conditioned form
    :math:`2\,\mathrm{atan2}(\|u - v\|, \|u + v\|)` on the unit spectra u, v (the plain
    arccos loses ~0.02 degrees to float32 rounding for identical spectra).
    Zero-vector convention: if both spectra at a pixel are all-zero the angle is 0; if exactly
    one is zero the angle is 90 degrees (a zero spectrum is treated as orthogonal to any
    non-zero one). Returns shape (B,).
    """
    pred, gt = _validate(pred, gt, "sam")
    return _sam(pred, gt)


def ssim(pred, gt, data_range: float = 1.0, *, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03):
    r"""Structural similarity (Wang et al. 2004), computed per band and averaged.

    Local statistics use a Gaussian window (sigma 1.5, truncated at 3.5 sigma: 11x11 taps),
    population (co)variances, :math:`C_1 = (K_1 R)^2`, :math:`C_2 = (K_2 R)^2`, R = data_range:

    .. math:: \mathrm{SSIM}(x,y) = \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
              {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)}

    The SSIM map is evaluated only where the window fits inside the image (a border of
    5 pixels is dropped, as scikit-image does) and averaged over pixels and bands. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=R, channel_axis=-1)`` per image. Inputs are not
    clamped. Needs H, W >= 11. Returns shape (B,).
    """
    if not data_range > 0:
        raise ValueError(f"ssim: data_range must be > 0, got {data_range}")
    r = int(3.5 * sigma + 0.5)
    pred, gt = _validate(pred, gt, "ssim", min_hw=2 * r + 1)
    return _ssim(pred, gt, data_range=float(data_range), sigma=float(sigma),
                 k1=float(k1), k2=float(k2))


def ergas(pred, gt, scale: float = 1.0):
    r"""ERGAS (Wald 2000), relative dimensionless global error, per image.

    .. math:: \mathrm{ERGAS}_b = \frac{100}{s}\sqrt{\frac{1}{C}\sum_c
              \left(\frac{\mathrm{RMSE}_{bc}}{\mu_{bc}}\right)^2}

    with :math:`\mathrm{RMSE}_{bc}` the RMSE of band c over the H x W pixels and
    :math:`\mu_{bc}` the mean of the *reference* band. Convention: ``scale`` = s is the
    resolution ratio low/high (l/h, >= 1; e.g. 4 for x4 super-resolution), so the
    factor is Wald's 100·h/l = 100/s. Use s = 1 for spectral reconstruction (same spatial
    grid). A reference band with mean 0 gives ``inf``. Returns shape (B,).
    """
    if not scale > 0:
        raise ValueError(f"ergas: scale must be > 0, got {scale}")
    pred, gt = _validate(pred, gt, "ergas")
    return _ergas(pred, gt, scale=float(scale))


def uiqi(pred, gt, window: int | None = 8):
    r"""Universal image quality index (Wang & Bovik 2002), per band, averaged.

    .. math:: Q = \frac{4\,\sigma_{xy}\,\mu_x\mu_y}{(\sigma_x^2 + \sigma_y^2)(\mu_x^2 + \mu_y^2)}

    computed in a sliding ``window`` x ``window`` box (default 8, step 1, positions where the
    window fits inside the image), averaged over window positions and bands. ``window=None``
    computes one global Q per band. Degenerate windows follow the authors' ``img_qi.m``:
    if :math:`\sigma_x^2 + \sigma_y^2 = 0` and :math:`\mu_x^2 + \mu_y^2 \ne 0`,
    :math:`Q = 2\mu_x\mu_y / (\mu_x^2 + \mu_y^2)`; if the denominator is 0 otherwise, Q = 1.
    A variance sum below 1e-6·(mu_x^2 + mu_y^2) (float32 rounding level) counts as 0.
    Needs H, W >= window. Returns shape (B,).
    """
    if window is not None and (int(window) != window or window < 2):
        raise ValueError(f"uiqi: window must be an integer >= 2 or None, got {window!r}")
    pred, gt = _validate(pred, gt, "uiqi", min_hw=1 if window is None else int(window))
    return _uiqi(pred, gt, window=None if window is None else int(window))


def center_crop(x, border: int):
    """Drop ``border`` pixels on each side of the spatial axes (-3, -2) of ``x``.

    ``center_crop(x, 128)`` is the NTIRE 2022 / MST++ scoring crop ``x[..., 128:-128,
    128:-128, :]`` (482x512 -> 226x256). ``border=0`` returns ``x`` unchanged.
    """
    if int(border) != border or border < 0:
        raise ValueError(f"center_crop: border must be a non-negative integer, got {border!r}")
    border = int(border)
    if np.ndim(x) < 3:
        raise ValueError(f"center_crop: `x` needs rank >= 3 (..., H, W, C), got shape "
                         f"{np.shape(x)}")
    if border == 0:
        return x
    h, w = x.shape[-3], x.shape[-2]
    if 2 * border >= h or 2 * border >= w:
        raise ValueError(f"center_crop: border {border} leaves nothing of `x` with spatial size "
                         f"{h}x{w} (shape {tuple(x.shape)})")
    return x[..., border:h - border, border:w - border, :]


@functools.partial(jax.jit, static_argnames=("scale", "data_range", "uiqi_window"))
def _evaluate_all(pred, gt, scale, data_range, uiqi_window):
    return {
        "mrae": _mrae(pred, gt),
        "rmse": _rmse(pred, gt),
        "psnr": _psnr(pred, gt, data_range=data_range),
        "sam": _sam(pred, gt),
        "ssim": _ssim(pred, gt, data_range=data_range),
        "ergas": _ergas(pred, gt, scale=scale),
        "uiqi": _uiqi(pred, gt, window=uiqi_window),
    }


def evaluate_all(pred, gt, crop_border: int = 0, scale: float | None = None, *,
                 data_range: float = 1.0, uiqi_window: int | None = 8) -> dict[str, jax.Array]:
    """All metrics of :data:`METRIC_NAMES` on a (B, H, W, C) batch, each of shape (B,).

    ``crop_border`` pixels are dropped on each side first (128 = NTIRE 2022 protocol).
    ``scale`` is ERGAS's resolution ratio (None -> 1, spectral reconstruction).
    ``data_range`` is the PSNR peak / clamp range and the SSIM dynamic range.
    """
    pred = _as_array(pred, "pred", "evaluate_all")
    gt = _as_array(gt, "gt", "evaluate_all")
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"evaluate_all: shape mismatch between `pred` {tuple(pred.shape)} and "
                         f"`gt` {tuple(gt.shape)}; both must be (B, H, W, C)")
    pred, gt = center_crop(pred, crop_border), center_crop(gt, crop_border)
    scale = 1.0 if scale is None else float(scale)
    if not scale > 0 or not data_range > 0:
        raise ValueError(f"evaluate_all: scale and data_range must be > 0, got {scale}, "
                         f"{data_range}")
    need = max(11, uiqi_window or 1)
    pred, gt = _validate(pred, gt, "evaluate_all", nonneg_gt=True, min_hw=need)
    return _evaluate_all(pred, gt, scale=scale, data_range=float(data_range),
                         uiqi_window=None if uiqi_window is None else int(uiqi_window))
