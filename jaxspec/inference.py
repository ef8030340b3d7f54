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
    """``x -> apply_fn(variables, x, train=False)`` as float32 (jitted per input shape); an
    ``(output, aux)`` model result keeps ``output``."""
    from jaxspec.tasks import split_output

    def fn(variables, x):
        return split_output(apply_fn(variables, x, train=False))[0].astype(jnp.float32)

    fn = jax.jit(fn) if jit else fn
    return lambda x: fn(variables, jnp.asarray(x, jnp.float32))


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


def _predict_tiled(fn, inp: _Inputs, tile: int, overlap: int, stride: int) -> np.ndarray:
    of = inp.out_factor
    unit = stride * of
    if tile % unit:
        what = "the model stride" if of == 1 else f"scale x stride = {of} x {stride}"
        raise ValueError(f"tile={tile} must be a multiple of {what} ({unit})")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    if overlap % of:
        raise ValueError(f"overlap={overlap} must be a multiple of the scale {of}")
    tb, ob = tile // of, overlap // of                       # in base pixels
    step = max(stride, (tb - ob) // stride * stride)
    oh, ow = inp.out_hw
    x = inp.pad(stride)
    hp, wp = x.base
    if hp <= tb and wp <= tb:
        return _predict_padded(fn, inp, stride)
    th, tw = min(tb, hp), min(tb, wp)
    out = None
    weight = np.zeros((1, hp * of, wp * of, 1), np.float32)
    for y0 in _tile_starts(hp, th, step):
        ry = _ramp(th * of, y0 * of, hp * of, overlap)
        for x0 in _tile_starts(wp, tw, step):
            rx = _ramp(tw * of, x0 * of, wp * of, overlap)
            pred = x.window(y0, x0, th, tw).call(fn)
            if out is None:
                out = np.zeros((pred.shape[0], hp * of, wp * of, pred.shape[-1]), np.float32)
            wgt = (ry[:, None] * rx[None, :])[None, :, :, None]
            ys, xs = slice(y0 * of, (y0 + th) * of), slice(x0 * of, (x0 + tw) * of)
            out[:, ys, xs] += wgt * pred
            weight[:, ys, xs] += wgt
    return (out / weight)[:, :oh, :ow]


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
                 optimizer: str = "adam", params: tuple[str, ...] = (), side_inputs=()):
    """Per-image test-time optimisation: ``adapt(variables, inputs) -> variables``.

    Starting from the trained ``variables`` (every call resets to them), ``steps`` optimiser
    steps (Adam or SGD at ``lr``) on ``loss_fn(apply_fn, variables, inputs) -> scalar`` (a
    self-supervised loss of the method: ``Method.adapt_loss``) update the parameters whose
    '/'-joined path matches one of the regexes ``params`` (``()`` = all; the rest get exactly
    zero updates via ``optax.multi_transform`` / ``set_to_zero``). The k steps run in one
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
    if optimizer == "adam":
        base = optax.adam(lr)
    elif optimizer == "sgd":
        base = optax.sgd(lr)
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
