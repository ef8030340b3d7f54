"""Full-image inference: stride padding, overlapping tiles, x8 self-ensemble, dataset evaluation.

All functions take a ``predict_fn(rgb) -> hsi`` on (B, H, W, 3) float32 batches (e.g. from
:func:`make_predict_fn`) and work on host numpy arrays, so arbitrarily large images are
processed tile by tile within a device-memory bound.

* Padding: H and W are reflect-padded at the bottom/right to a multiple of the model's
  ``stride`` (the down-sampling factor of a U-Net) and the output is cropped back.
* Tiling (``tile=T, overlap=O``): tiles of T x T (T a multiple of the stride) start at multiples
  of ``T - O`` (multiples of the stride, so a strided network sees every tile in the same phase),
  the last tile is aligned to the image edge. Outputs are blended with weights
  w(y, x) = r(y) r(x): along an *inner* tile edge r is 0 on the first m = floor(O/4) pixels,
  then ramps linearly ((i + 0.5) / (O - m)) to 1 over the remaining O - m pixels of the
  overlap; r = 1 elsewhere (image edges are not down-weighted):
  out = sum_t w_t * f(tile_t) / sum_t w_t. Every pixel keeps a positive total weight because
  neighbouring tiles overlap by >= O > 2m. For a network whose receptive-field radius is
  <= m, tiled and untiled outputs are equal (to float rounding); for larger receptive fields
  (U-Nets) the blend hides the seams and the difference shrinks with the overlap.
* Self-ensemble (MST++ ``test_challenge_code``): the mean over the 8 transforms
  g in {identity, flip H, flip W, transpose and their compositions} of g^{-1}(f(g(x))).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

PredictFn = Callable[[Any], Any]


def make_predict_fn(apply_fn: Callable, variables: Mapping[str, Any], *, jit: bool = True
                    ) -> PredictFn:
    """``rgb -> apply_fn(variables, rgb, train=False)`` as float32 (jitted per input shape)."""
    def fn(variables, rgb):
        return apply_fn(variables, rgb, train=False).astype(jnp.float32)

    fn = jax.jit(fn) if jit else fn
    return lambda rgb: fn(variables, jnp.asarray(rgb, jnp.float32))


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, np.float32)
    if rgb.ndim == 3:
        rgb = rgb[None]
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be (H, W, 3) or (B, H, W, 3), got shape {rgb.shape}")
    if not np.all(np.isfinite(rgb)):
        raise ValueError("rgb contains NaN or inf")
    return rgb


def pad_to_stride(x: np.ndarray, stride: int) -> np.ndarray:
    """Reflect-pad bottom/right of (B, H, W, C) to multiples of ``stride`` (symmetric padding
    is used instead when the image is too small to reflect)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    h, w = x.shape[1:3]
    ph, pw = (-h) % stride, (-w) % stride
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "symmetric"
    return np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


def predict_padded(predict_fn: PredictFn, rgb, stride: int = 1) -> np.ndarray:
    """f(pad(x)) cropped back to x's H x W."""
    rgb = _check_rgb(rgb)
    h, w = rgb.shape[1:3]
    out = np.asarray(predict_fn(pad_to_stride(rgb, stride)))
    return out[:, :h, :w]


def _tile_starts(size: int, tile: int, step: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return sorted(set(starts))


def _ramp(length: int, start: int, size: int, overlap: int) -> np.ndarray:
    """1-D blending weights of one tile (see module docstring): 0 on the ``overlap // 4``
    pixels next to an inner edge, then a linear ramp to 1 over the rest of the overlap."""
    r = np.ones(length, np.float32)
    if overlap <= 0:
        return r
    margin = overlap // 4
    n_ramp = overlap - margin
    prof = np.concatenate([np.zeros(margin, np.float32),
                           (np.arange(n_ramp, dtype=np.float32) + 0.5) / n_ramp])
    n = min(overlap, length)
    if start > 0:                      # inner edge at the top/left
        r[:n] = np.minimum(r[:n], prof[:n])
    if start + length < size:          # inner edge at the bottom/right
        r[-n:] = np.minimum(r[-n:], prof[:n][::-1])
    return r


def predict_tiled(predict_fn: PredictFn, rgb, tile: int, overlap: int = 32, stride: int = 1
                  ) -> np.ndarray:
    """Overlapping-tile inference with linear blending (see module docstring)."""
    rgb = _check_rgb(rgb)
    if tile % stride:
        raise ValueError(f"tile={tile} must be a multiple of the model stride {stride}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    step = max(stride, (tile - overlap) // stride * stride)
    h, w = rgb.shape[1:3]
    x = pad_to_stride(rgb, stride)
    hp, wp = x.shape[1:3]
    if hp <= tile and wp <= tile:
        return predict_padded(predict_fn, rgb, stride)
    th, tw = min(tile, hp), min(tile, wp)
    out = None
    weight = np.zeros((1, hp, wp, 1), np.float32)
    for y0 in _tile_starts(hp, th, step):
        ry = _ramp(th, y0, hp, overlap)
        for x0 in _tile_starts(wp, tw, step):
            rx = _ramp(tw, x0, wp, overlap)
            pred = np.asarray(predict_fn(x[:, y0:y0 + th, x0:x0 + tw]))
            if out is None:
                out = np.zeros((x.shape[0], hp, wp, pred.shape[-1]), np.float32)
            wgt = (ry[:, None] * rx[None, :])[None, :, :, None]
            out[:, y0:y0 + th, x0:x0 + tw] += wgt * pred
            weight[:, y0:y0 + th, x0:x0 + tw] += wgt
    return (out / weight)[:, :h, :w]


# x8 geometric transforms: bit 0 flips H, bit 1 flips W, bit 2 transposes H and W.
def _forward(x: np.ndarray, k: int) -> np.ndarray:
    if k & 1:
        x = x[:, ::-1]
    if k & 2:
        x = x[:, :, ::-1]
    if k & 4:
        x = np.swapaxes(x, 1, 2)
    return np.ascontiguousarray(x)


def _inverse(y: np.ndarray, k: int) -> np.ndarray:
    if k & 4:
        y = np.swapaxes(y, 1, 2)
    if k & 2:
        y = y[:, :, ::-1]
    if k & 1:
        y = y[:, ::-1]
    return np.ascontiguousarray(y)


def self_ensemble(fn: Callable[[np.ndarray], np.ndarray], rgb, mode: str = "mean") -> np.ndarray:
    """x8 flip/transpose self-ensemble: mean (or median) of g^{-1}(fn(g(rgb)))."""
    rgb = _check_rgb(rgb)
    outs = [_inverse(np.asarray(fn(_forward(rgb, k))), k) for k in range(8)]
    if mode == "mean":
        return np.mean(outs, axis=0, dtype=np.float32)
    if mode == "median":
        return np.median(np.stack(outs), axis=0).astype(np.float32)
    raise ValueError(f"ensemble mode must be 'mean' or 'median', got {mode!r}")


def predict_image(predict_fn: PredictFn, rgb, *, stride: int = 1, tile: int | None = None,
                  overlap: int = 32, ensemble: bool = False, max_pixels: int | None = None
                  ) -> np.ndarray:
    """Full-image reconstruction of (H, W, 3) or (B, H, W, 3) normalised RGB.

    ``tile=None`` runs the whole (padded) image at once unless it exceeds ``max_pixels``, in
    which case tiles of side ``floor(sqrt(max_pixels))`` rounded down to the stride are used.
    """
    rgb = _check_rgb(rgb)
    if tile is None and max_pixels is not None and rgb.shape[1] * rgb.shape[2] > max_pixels:
        tile = max(stride, int(math.isqrt(max_pixels)) // stride * stride)
        overlap = min(overlap, tile // 2 // stride * stride)

    def once(x):
        if tile is None:
            return predict_padded(predict_fn, x, stride)
        return predict_tiled(predict_fn, x, tile, overlap, stride)

    return self_ensemble(once, rgb) if ensemble else once(rgb)


def evaluate_dataset(predict_fn: PredictFn, batches: Iterable[Mapping[str, Any]], *,
                     crop_border: int = 0, stride: int = 1, tile: int | None = None,
                     overlap: int = 32, ensemble: bool = False, max_images: int | None = None,
                     keep: int = 0) -> dict:
    """Evaluate on full images with every metric of ``jaxspec.metrics.evaluate_all``.

    ``batches`` yields dicts with normalised ``rgb`` (B, H, W, 3), ``hsi`` (B, H, W, C) and
    optionally ``name`` (e.g. ``jaxspec.data.make_loader(..., train=False)``). Returns
    ``{"per_image": {name: {metric: value}}, "mean": {metric: value}, "num_images": n,
    "crop_border": ..., "ensemble": ..., "examples": [first `keep` (name, rgb, hsi, pred)]}``.
    The mean is over images (NTIRE 2022: per-image metrics averaged over the validation set).
    """
    from jaxspec import metrics as metrics_lib

    per_image: dict[str, dict[str, float]] = {}
    examples = []
    n = 0
    for batch in batches:
        rgb, gt = np.asarray(batch["rgb"], np.float32), np.asarray(batch["hsi"], np.float32)
        names = batch.get("name")
        pred = predict_image(predict_fn, rgb, stride=stride, tile=tile, overlap=overlap,
                             ensemble=ensemble)
        vals = {k: np.asarray(v) for k, v in
                metrics_lib.evaluate_all(pred, gt, crop_border=crop_border).items()}
        for i in range(rgb.shape[0]):
            name = names[i] if names is not None else f"image_{n:05d}"
            name = name.decode() if isinstance(name, bytes) else str(name)
            per_image[name] = {k: float(v[i]) for k, v in vals.items()}
            if len(examples) < keep:
                examples.append((name, rgb[i], gt[i], pred[i]))
            n += 1
            if max_images is not None and n >= max_images:
                break
        if max_images is not None and n >= max_images:
            break
    if n == 0:
        raise ValueError("evaluate_dataset: the evaluation data yielded no images")
    keys = next(iter(per_image.values())).keys()
    mean = {k: float(np.mean([m[k] for m in per_image.values()])) for k in keys}
    return {"per_image": per_image, "mean": mean, "num_images": n, "crop_border": crop_border,
            "ensemble": ensemble, "tile": tile, "examples": examples}
