"""Full-image inference: stride padding, overlapping tiles, x8 self-ensemble, per-image test-time
adaptation, dataset evaluation -- for every task (:mod:`jaxspec.tasks`).

The functions take either a ``predict_fn(x) -> y`` on one (B, H, W, C) float32 array (rgb2hsi,
hsi2hsi; e.g. from :func:`make_predict_fn`) or, with a *dict* of inputs, a
``predict_fn(inputs: dict) -> y`` (fusion: ``{"lr_hsi", "hr_msi", "srf", ...}``, see
:func:`make_task_predict_fn`), and work on host numpy arrays, so arbitrarily large images are
processed tile by tile within a device-memory bound.

Geometry of several inputs: each spatial input has an integer resolution ``factor`` over a base
grid (fusion: ``lr_hsi`` 1, ``hr_msi`` s; the output s); ``None`` marks a non-spatial side input
(``srf``, ``psf``), passed unchanged to every tile. Padding and tiling are done on the base grid
(stride in base pixels) and cut every input at its own factor, so LR and HR tiles stay aligned;
``tile`` and ``overlap`` are given in output pixels and must be multiples of the output factor.

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
* Streaming and memory: tiles are visited one row of tiles at a time and only that band of
  output rows is accumulated; :func:`predict_rows` yields finished rows top to bottom (the
  ``predict`` CLI appends them to its ``.npy`` output), and :func:`tile_for_memory` picks the
  largest tile within a resident-memory bound from the compiled program's memory statistics.
* Self-ensemble (MST++ ``test_challenge_code``): the mean over the 8 transforms
  g in {identity, flip H, flip W, transpose and their compositions} of g^{-1}(f(g(x))).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.errors import UsageError

PredictFn = Callable[[Any], Any]


def make_predict_fn(apply_fn: Callable, variables: Mapping[str, Any], *, jit: bool = True
                    ) -> PredictFn:
    """``x -> apply_fn(variables, x, train=False)`` as float32 (jitted per input shape); an
    ``(output, aux)`` model result keeps ``output``."""
    from jaxspec.tasks import split_output

    def fn(variables, x):
        return split_output(apply_fn(variables, x, train=False))[0].astype(jnp.float32)

    fn = jax.jit(fn) if jit else fn
    compiled: dict[tuple, Any] = {}     # ahead-of-time programs by input shape (``compile``)

    def predict(x):
        x = jnp.asarray(x, jnp.float32)
        exe = compiled.get(tuple(x.shape))
        return exe(variables, x) if exe is not None else fn(variables, x)

    # memory planning (:func:`tile_for_memory`): the compiled program of one input shape, the
    # output shape, and the bytes the variables occupy (passed as arguments on every call).
    # ``compile(shape)`` keeps the program, so a shape planned for is not compiled again when
    # it is then predicted.
    jitted = fn if jit else jax.jit(fn)
    predict.lower = lambda shape: jitted.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32))

    def compile_shape(shape):
        shape = tuple(int(v) for v in shape)
        if shape not in compiled:
            compiled[shape] = predict.lower(shape).compile()
        return compiled[shape]

    predict.compile = compile_shape
    predict.out_shape = lambda shape: jax.eval_shape(
        fn, variables, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
    predict.param_bytes = int(sum(getattr(v, "nbytes", None) or np.asarray(v).nbytes
                                  for v in jax.tree.leaves(variables)))
    return predict


def make_task_predict_fn(task, apply_fn: Callable, variables: Mapping[str, Any], *,
                         side_inputs=(), jit: bool = True) -> PredictFn:
    """``inputs dict -> output`` through ``task`` (positional ``task.input_keys`` + keyword
    ``side_inputs``), float32, jitted per input shapes; ``variables`` may also be passed per
    call as ``fn(inputs, variables)`` (test-time adaptation)."""
    from jaxspec.tasks import split_output
    side = tuple(side_inputs)

    def fn(variables, inputs):
        return split_output(task.apply(apply_fn, variables, inputs, side_inputs=side,
                                       train=False))[0].astype(jnp.float32)

    fn = jax.jit(fn) if jit else fn
    keys = tuple(task.input_keys) + side

    def predict(inputs, v=None):
        return fn(variables if v is None else v,
                  {k: jnp.asarray(inputs[k], jnp.float32) for k in keys})
    return predict


def _check_array(x, name: str = "rgb", channels: int | None = 3) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or (channels is not None and x.shape[-1] != channels):
        c = "3" if channels == 3 else ("C" if channels is None else str(channels))
        raise ValueError(f"{name} must be (H, W, {c}) or (B, H, W, {c}), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_rgb(rgb) -> np.ndarray:
    return _check_array(rgb, "rgb", 3)


def pad_to_stride(x: np.ndarray, stride: int) -> np.ndarray:
    """Reflect-pad bottom/right of (B, H, W, C) to multiples of ``stride`` (symmetric padding
    is used instead when the image is too small to reflect)."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    h, w = x.shape[1:3]
    return _pad(x, (-h) % stride, (-w) % stride)


def _pad(x: np.ndarray, ph: int, pw: int) -> np.ndarray:
    if ph == 0 and pw == 0:
        return x
    h, w = x.shape[1:3]
    mode = "reflect" if ph < h and pw < w else "symmetric"
    return np.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


class _Inputs:
    """Named model inputs with resolution factors over a base grid (see module docstring)."""

    def __init__(self, arrays: Mapping[str, Any], factors: Mapping[str, int | None] | None,
                 out_factor: int = 1, channels: int | None = None):
        if not isinstance(arrays, Mapping):       # one array: the single-input API
            self.single = True
            arrays = {"x": _check_array(arrays, "rgb" if channels == 3 else "input", channels)}
            factors = {"x": 1}
        else:
            self.single = False
            factors = dict(factors or {k: 1 for k in arrays})
            arrays = {k: (_check_array(v, k, None) if factors.get(k) is not None
                          else np.asarray(v, np.float32)) for k, v in arrays.items()}
        self.arrays, self.factors, self.out_factor = dict(arrays), factors, int(out_factor)
        spatial = [k for k in self.arrays if self.factors.get(k) is not None]
        if not spatial:
            raise ValueError("no spatial input")
        k0 = spatial[0]
        f0 = self.factors[k0]
        h, w = self.arrays[k0].shape[1:3]
        if h % f0 or w % f0:
            raise ValueError(f"{k0} size {h}x{w} is not a multiple of its factor {f0}")
        self.base = (h // f0, w // f0)
        for k in spatial:
            f = self.factors[k]
            if self.arrays[k].shape[1:3] != (self.base[0] * f, self.base[1] * f):
                raise ValueError(f"{k} has spatial size {self.arrays[k].shape[1:3]}, expected "
                                 f"{(self.base[0] * f, self.base[1] * f)} (factor {f} over the "
                                 f"base grid {self.base})")

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.base[0] * self.out_factor, self.base[1] * self.out_factor

    def replace(self, arrays):
        new = object.__new__(_Inputs)
        new.__dict__.update(self.__dict__)
        new.arrays = dict(arrays)
        hs = [(v.shape[1] // self.factors[k], v.shape[2] // self.factors[k])
              for k, v in arrays.items() if self.factors.get(k) is not None]
        new.base = hs[0]
        return new

    def map_spatial(self, fn):
        """New inputs with ``fn(array, factor)`` applied to every spatial array."""
        return self.replace({k: (fn(v, self.factors[k]) if self.factors.get(k) is not None
                                 else v) for k, v in self.arrays.items()})

    def pad(self, stride: int) -> "_Inputs":
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        ph, pw = (-self.base[0]) % stride, (-self.base[1]) % stride
        return self.map_spatial(lambda a, f: _pad(a, ph * f, pw * f))

    def window(self, y0: int, x0: int, th: int, tw: int) -> "_Inputs":
        return self.map_spatial(lambda a, f: a[:, y0 * f:(y0 + th) * f, x0 * f:(x0 + tw) * f])

    def call(self, fn):
        return np.asarray(fn(self.arrays["x"] if self.single else self.arrays))


def _predict_padded(fn, inp: _Inputs, stride: int) -> np.ndarray:
    oh, ow = inp.out_hw
    return inp.pad(stride).call(fn)[:, :oh, :ow]


def predict_padded(predict_fn: PredictFn, rgb, stride: int = 1, *, factors=None,
                   out_factor: int = 1) -> np.ndarray:
    """f(pad(x)) cropped back to x's H x W (``rgb`` an array, or a dict of inputs with
    ``factors``)."""
    return _predict_padded(predict_fn, _Inputs(rgb, factors, out_factor, 3), stride)


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


def _progress_bar(total: int, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="tiles", unit="tile", disable=not progress, leave=False,
                dynamic_ncols=True, file=__import__("sys").stderr)


def _tiled_rows(fn, inp: _Inputs, tile: int, overlap: int, stride: int, progress: bool = False):
    """Overlapping-tile prediction yielding finished output rows top to bottom:
    ``(row0, rows)`` with ``rows`` (B, n, W_out, C) final (blended) values of output rows
    ``row0 .. row0 + n - 1``. Tiles are visited row of tiles by row of tiles; only one band of
    ``tile`` output rows (+ its weights) is held, so memory does not grow with the image
    height. Same arithmetic (and order of accumulation) as a full-size accumulator."""
    of = inp.out_factor
    unit = stride * of
    if tile % unit:
        what = "the model stride" if of == 1 else f"scale x stride = {of} x {stride}"
        raise UsageError(f"--tile {tile} must be a multiple of {what} ({unit})")
    if not 0 <= overlap < tile:
        raise UsageError(f"--overlap must be in [0, tile={tile}), got {overlap}")
    if overlap % of:
        raise ValueError(f"overlap={overlap} must be a multiple of the scale {of}")
    tb, ob = tile // of, overlap // of                       # in base pixels
    step = max(stride, (tb - ob) // stride * stride)
    oh, ow = inp.out_hw
    x = inp.pad(stride)
    hp, wp = x.base
    if hp <= tb and wp <= tb:
        with _progress_bar(1, progress) as bar:
            rows = _predict_padded(fn, inp, stride)
            bar.update(1)
        yield 0, rows
        return
    th, tw = min(tb, hp), min(tb, wp)
    ys, xs = _tile_starts(hp, th, step), _tile_starts(wp, tw, step)
    big_h, big_w = th * of, wp * of          # band: one row of tiles over the padded width
    rx = {x0: _ramp(tw * of, x0 * of, big_w, overlap) for x0 in xs}
    band = wband = None
    top = 0                                  # output row of band[:, 0]

    def finished(n):
        m = min(n, oh - top)
        if m > 0:
            yield top, band[:, :m, :ow] / wband[None, :m, :ow, None]

    with _progress_bar(len(ys) * len(xs), progress) as bar:
        for y0 in ys:
            if band is not None and y0 * of > top:
                n = y0 * of - top
                yield from finished(n)
                keep = big_h - n
                band[:, :keep] = band[:, n:].copy()
                band[:, keep:] = 0
                wband[:keep] = wband[n:].copy()
                wband[keep:] = 0
                top = y0 * of
            ry = _ramp(big_h, y0 * of, hp * of, overlap)
            for x0 in xs:
                pred = x.window(y0, x0, th, tw).call(fn)
                if band is None:
                    band = np.zeros((pred.shape[0], big_h, big_w, pred.shape[-1]), np.float32)
                    wband = np.zeros((big_h, big_w), np.float32)
                wgt = (ry[:, None] * rx[x0][None, :])[None, :, :, None]
                xsl = slice(x0 * of, (x0 + tw) * of)
                band[:, :, xsl] += wgt * pred
                wband[:, xsl] += wgt[0, :, :, 0]
                bar.update(1)
        yield from finished(big_h)


def _predict_tiled(fn, inp: _Inputs, tile: int, overlap: int, stride: int) -> np.ndarray:
    parts = [rows for _, rows in _tiled_rows(fn, inp, tile, overlap, stride)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(text) -> int:
    """``"4GiB"`` / ``"512MiB"`` / ``"2G"`` / ``"1.5e9"`` -> bytes (K/M/G/T are powers of 1000,
    KiB/MiB/GiB/TiB of 1024); ``ValueError`` naming the text otherwise."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"bad memory size {text!r}: use e.g. 4GiB, 512MiB, 2G or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``; elsewhere the
    peak so far, ``ru_maxrss``)."""
    import os
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def tile_for_memory(predict_fn, shape, *, max_bytes: int, stride: int = 1, overlap: int = 32,
                    ensemble: bool = False, reserved: int = 0, probe: int = 128,
                    whole_probe_pixels: int = 1 << 20) -> int | None:
    """The largest square tile (a multiple of ``stride``) whose tiled prediction of a
    ``shape`` = (B, H, W, C) input keeps the process within ``max_bytes``; ``None`` when the
    whole (padded) image fits as one tile.

    ``predict_fn`` comes from :func:`make_predict_fn` (it exposes ``lower``, ``out_shape`` and
    ``param_bytes``). The model's memory per tile pixel is measured, not guessed: the program
    for one ``probe`` x ``probe`` tile is compiled and its
    ``compiled.memory_analysis()`` (temporaries + input + output, without the variables) is
    divided by the probe's pixels, assuming activations scale with the pixel count (true of
    convolutional and spectral-attention networks), plus 25% headroom. An image of at most
    ``whole_probe_pixels`` (padded) pixels is its own probe: when it fits as one tile, the
    program compiled for the plan is the one that predicts it (``predict_fn.compile`` keeps it),
    so it is compiled once. Host memory per tile
    pixel (input window, prediction, blend temporaries; x8 with ``ensemble``) and the blending
    band (``tile`` output rows over the padded width, and its division when emitted) are
    added. The budget is
    ``max_bytes - reserved`` (``reserved``: the process's resident memory now plus anything else
    the caller will hold, e.g. the full output when it is not streamed to disk). A
    :class:`~jaxspec.errors.UsageError` says when no tile larger than ``overlap`` fits.
    """
    b, h, w, cin = (int(v) for v in shape)
    if not hasattr(predict_fn, "lower"):
        raise ValueError("tile_for_memory needs a predict_fn from make_predict_fn")
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    if hp * wp <= whole_probe_pixels:
        p_h, p_w = hp, wp
    else:
        p_h = min(hp, max(stride, -(-probe // stride) * stride))
        p_w = min(wp, max(stride, -(-probe // stride) * stride))
    pshape = (b, p_h, p_w, cin)
    compiled = (predict_fn.compile(pshape) if hasattr(predict_fn, "compile")
                else predict_fn.lower(pshape).compile())
    cout = int(predict_fn.out_shape((b, p_h, p_w, cin))[-1])
    ma = compiled.memory_analysis()
    if ma is not None:
        dev = (ma.temp_size_in_bytes + ma.output_size_in_bytes + ma.argument_size_in_bytes
               - predict_fn.param_bytes)
        dev_bpp = max(dev, 0) / (b * p_h * p_w)
    else:  # a backend without memory statistics: a conservative 64 floats per channel
        dev_bpp = 4.0 * 64 * (cin + cout)
    host_bpp = 4.0 * (2 * cin + 3 * cout) + (4.0 * (8 * cout + 2 * cin) if ensemble else 0.0)
    a = 1.25 * b * (dev_bpp + host_bpp)                   # bytes per tile pixel (+25%)
    lin = 4.0 * wp * (2 * b * cout + 1)                   # bytes per band row
    avail = float(max_bytes) - float(reserved)
    if ma is not None:
        avail -= ma.generated_code_size_in_bytes
    if avail <= 0:
        raise UsageError(f"--max-memory {max_bytes / 2**30:.2f} GiB leaves nothing for the "
                         f"tiles: {reserved / 2**30:.2f} GiB are needed before tiling")
    t = (-lin + math.sqrt(lin * lin + 4 * a * avail)) / (2 * a)
    if t >= max(hp, wp):
        return None
    t = int(t) // stride * stride
    if t <= overlap or t < stride:
        raise UsageError(
            f"--max-memory {max_bytes / 2**30:.2f} GiB is too small for this model: the largest "
            f"tile that fits ({t} px) is not larger than --overlap {overlap}")
    return t


def predict_rows(predict_fn: PredictFn, x, *, stride: int = 1, tile: int | None = None,
                 overlap: int = 32, ensemble: bool = False, progress: bool = False,
                 channels: int | None = None):
    """Tiled prediction of (B, H, W, C) ``x`` yielding finished output rows top to bottom,
    ``(row0, rows)`` with ``rows`` (B, n, W, C_out), so a caller can write a large output
    incrementally instead of holding it (``tile=None``: one pass over the padded image).
    ``ensemble`` applies the x8 self-ensemble to every tile (equal to the ensemble of the whole
    image up to the tiles' seams). ``progress``: a tqdm bar over tiles on stderr."""
    inp = _Inputs(x, None, 1, channels)
    fn = predict_fn
    if ensemble:
        def fn(a):
            return _ensemble(lambda i: i.call(predict_fn), _Inputs(a, None, 1, None))
    if tile is None:
        with _progress_bar(1, progress) as bar:
            rows = _predict_padded(fn, inp, stride)
            bar.update(1)
        yield 0, rows
        return
    yield from _tiled_rows(fn, inp, int(tile), int(overlap), int(stride), progress)


def predict_tiled(predict_fn: PredictFn, rgb, tile: int, overlap: int = 32, stride: int = 1, *,
                  factors=None, out_factor: int = 1) -> np.ndarray:
    """Overlapping-tile inference with linear blending (see module docstring); ``tile`` and
    ``overlap`` in output pixels."""
    return _predict_tiled(predict_fn, _Inputs(rgb, factors, out_factor, 3), tile, overlap,
                          stride)


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


def _ensemble(fn, inp: _Inputs, mode: str = "mean") -> np.ndarray:
    outs = [_inverse(fn(inp.map_spatial(lambda a, f, k=k: _forward(a, k))), k) for k in range(8)]
    if mode == "mean":
        return np.mean(outs, axis=0, dtype=np.float32)
    if mode == "median":
        return np.median(np.stack(outs), axis=0).astype(np.float32)
    raise ValueError(f"ensemble mode must be 'mean' or 'median', got {mode!r}")


def self_ensemble(fn: Callable[[np.ndarray], np.ndarray], rgb, mode: str = "mean") -> np.ndarray:
    """x8 flip/transpose self-ensemble: mean (or median) of g^{-1}(fn(g(rgb)))."""
    return _ensemble(lambda i: i.call(fn), _Inputs(rgb, None, 1, 3), mode)


def predict_image(predict_fn: PredictFn, rgb, *, stride: int = 1, tile: int | None = None,
                  overlap: int = 32, ensemble: bool = False, max_pixels: int | None = None,
                  factors: Mapping[str, int | None] | None = None, out_factor: int = 1,
                  channels: int | None = 3) -> np.ndarray:
    """Full-image prediction of (H, W, C) / (B, H, W, C) normalised input (``channels`` checks
    C; None = any), or of a dict of inputs with ``factors`` / ``out_factor``.

    ``tile=None`` runs the whole (padded) image at once unless its output exceeds
    ``max_pixels``, in which case tiles of side ``floor(sqrt(max_pixels))`` rounded down to
    ``stride * out_factor`` are used.
    """
    inp = _Inputs(rgb, factors, out_factor, channels)
    unit = stride * inp.out_factor
    oh, ow = inp.out_hw
    if tile is None and max_pixels is not None and oh * ow > max_pixels:
        tile = max(unit, int(math.isqrt(max_pixels)) // unit * unit)
        overlap = min(overlap, tile // 2 // unit * unit)

    def once(i: _Inputs):
        if tile is None:
            return _predict_padded(predict_fn, i, stride)
        return _predict_tiled(predict_fn, i, tile, overlap, stride)

    return _ensemble(once, inp) if ensemble else once(inp)


def make_adapter(task, apply_fn: Callable, loss_fn: Callable, *, steps: int, lr: float,
                 optimizer: str = "adam", params: tuple[str, ...] = (), side_inputs=(),
                 lr_milestones: tuple[int, ...] = (), lr_gamma: float = 0.5):
    """Per-image test-time optimisation: ``adapt(variables, inputs) -> variables``.

    Starting from the trained ``variables`` (every call resets to them), ``steps`` optimiser
    steps (Adam or SGD at ``lr``) on ``loss_fn(apply_fn, variables, inputs) -> scalar`` (a
    self-supervised loss of the method: ``Method.adapt_loss``) update the parameters whose
    '/'-joined path matches one of the regexes ``params`` (``()`` = all; the rest get exactly
    zero updates via ``optax.multi_transform`` / ``set_to_zero``). ``lr_milestones``: step
    counts after which the lr is multiplied by ``lr_gamma`` (MultiStepLR on the adaptation
    steps; ``()`` = constant). The k steps run in one
    ``lax.fori_loop`` inside one ``jax.jit`` (compiled once per input shape); model-state
    collections are left as trained. ``inputs`` is the task's dict of one image (positional
    input keys + side inputs), as given to the model."""
    import optax

    from jaxspec.train.optim import label_params
    from jaxspec.train.state import split_variables, variables_of
    if steps < 1:
        raise ValueError(f"adapt: steps must be >= 1, got {steps}")
    if loss_fn is None:
        raise ValueError("adapt: the method defines no adapt_loss (Method.adapt_loss)")
    rate = (optax.piecewise_constant_schedule(lr, {int(m): float(lr_gamma)
                                                   for m in lr_milestones})
            if lr_milestones else lr)
    if optimizer == "adam":
        base = optax.adam(rate)
    elif optimizer == "sgd":
        base = optax.sgd(rate)
    else:
        raise ValueError(f"adapt_optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    keys = tuple(task.input_keys) + tuple(side_inputs)

    def adapt(variables, inputs):
        p0, state = split_variables(variables)
        rules = [(r, "adapt") for r in params] if params else [("", "adapt")]
        labels = label_params(p0, rules, default="fixed")
        if "adapt" not in jax.tree.leaves(labels):
            raise ValueError(f"adapt: no parameter matches adapt_params={list(params)}")
        tx = optax.multi_transform({"adapt": base, "fixed": optax.set_to_zero()}, labels)
        inputs = {k: inputs[k] for k in keys}

        def body(_, carry):
            p, opt = carry
            g = jax.grad(lambda q: loss_fn(apply_fn, variables_of(q, state), inputs))(p)
            upd, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, upd), opt

        p, _ = jax.lax.fori_loop(0, steps, body, (p0, tx.init(p0)))
        return variables_of(p, state)

    jitted = jax.jit(adapt)
    return lambda variables, inputs: jitted(
        variables, {k: jnp.asarray(inputs[k], jnp.float32) for k in keys})


def task_geometry(task, scale: int = 1, side_inputs=()) -> tuple[dict, int]:
    """(factors, out_factor) of a task's inputs (side inputs non-spatial)."""
    if task.name == "fusion":
        f = {"lr_hsi": 1, "hr_msi": int(scale)}
        out = int(scale)
    else:
        f = {k: 1 for k in task.input_keys}
        out = 1
    f.update({k: None for k in side_inputs})
    return f, out


def evaluate_dataset(predict_fn: PredictFn, batches: Iterable[Mapping[str, Any]], *,
                     crop_border: int = 0, stride: int = 1, tile: int | None = None,
                     overlap: int = 32, ensemble: bool = False, max_images: int | None = None,
                     keep: int = 0, task=None, scale: int = 1, side_inputs=(),
                     adapt: Callable | None = None) -> dict:
    """Evaluate on full images; per-image metrics and their mean over images.

    Without ``task`` (the original API): ``predict_fn(rgb)``, batches with normalised ``rgb``
    (B, H, W, 3) and ``hsi``, every metric of ``jaxspec.metrics.evaluate_all``. With ``task``
    (:mod:`jaxspec.tasks`): ``predict_fn(inputs_dict[, variables])`` (e.g.
    :func:`make_task_predict_fn`), the task's inputs / target / metrics, fusion factor
    ``scale``; ``adapt(inputs) -> variables`` (:func:`make_adapter` bound to the trained
    variables) runs once per batch (one image: eval batches have batch size 1) on the padded
    full image before the tiles / ensemble members are predicted with the adapted variables.
    Returns ``{"per_image": {name: {metric: value}}, "mean": {metric: value}, "num_images": n,
    "crop_border": ..., "ensemble": ..., "tile": ..., "examples": [first `keep` (name,
    display_input, target, pred)]}``. The mean is over images (NTIRE 2022: per-image metrics
    averaged over the validation set).
    """
    from jaxspec import metrics as metrics_lib

    if task is not None:
        factors, out_factor = task_geometry(task, scale, side_inputs)
    if ensemble and task is not None and not task.ensemble:
        raise ValueError(f"the x8 self-ensemble is not defined for the {task.name!r} task")
    per_image: dict[str, dict[str, float]] = {}
    examples = []
    n = 0
    for batch in batches:
        names = batch.get("name")
        if task is None:
            inputs = np.asarray(batch["rgb"], np.float32)
            gt = np.asarray(batch["hsi"], np.float32)
            pred = predict_image(predict_fn, inputs, stride=stride, tile=tile, overlap=overlap,
                                 ensemble=ensemble)
            vals = {k: np.asarray(v) for k, v in
                    metrics_lib.evaluate_all(pred, gt, crop_border=crop_border).items()}
            shown = inputs
        else:
            inputs = {k: np.asarray(batch[k], np.float32) for k in factors}
            gt = np.asarray(batch[task.target_key], np.float32)
            fn = predict_fn
            if adapt is not None:
                padded = _Inputs(inputs, factors, out_factor).pad(stride).arrays
                v = adapt(padded)
                fn = lambda d, v=v: predict_fn(d, v)  # noqa: E731
            pred = predict_image(fn, inputs, stride=stride, tile=tile, overlap=overlap,
                                 ensemble=ensemble, factors=factors, out_factor=out_factor)
            vals = task.metrics(pred, gt, crop_border=crop_border, scale=scale)
            shown = task.display_input(inputs)
        b = gt.shape[0]
        for i in range(b):
            name = names[i] if names is not None else f"image_{n:05d}"
            name = name.decode() if isinstance(name, bytes) else str(name)
            per_image[name] = {k: float(v[i]) for k, v in vals.items()}
            if len(examples) < keep:
                examples.append((name, shown[i], gt[i], pred[i]))
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
