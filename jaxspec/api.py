"""Notebook API: ``create_model``, ``load``, ``reconstruct``, ``fuse``, ``adapt``.

    >>> import jaxspec
    >>> model = jaxspec.create_model("mstpp", preset="cpu")          # Model bundle
    >>> variables = model.init(seed=0)
    >>> cube = jaxspec.reconstruct(model, variables, rgb_uint8)     # (H, W, 31) float32
    >>> model, variables = jaxspec.load("runs/mstpp")               # best checkpoint of a run
    >>> hr = jaxspec.fuse(model, variables, lr_hsi, hr_msi, srf=srf)  # fusion task

Everything goes through the method's task (:mod:`jaxspec.tasks`): ``reconstruct`` serves the
same-grid tasks (rgb2hsi: RGB in, normalised by the config's ``rgb_norm``; hsi2hsi: an HSI in),
``fuse`` the fusion task.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import registry
from jaxspec.configs.base import Config


@dataclasses.dataclass(frozen=True)
class Model:
    """A registered method with its config and Flax module (``module.apply`` is pure)."""
    method: registry.Method
    config: Config
    module: Any

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def stride(self) -> int:
        return self.method.stride

    @property
    def task(self):
        from jaxspec import tasks
        return tasks.of(self.method)

    def init(self, seed: int = 0, image_size: int | None = None) -> dict:
        """Fresh variables (``{"params": ..., collection: ...}``) from the task's example
        inputs of side ``image_size`` (default: the config's crop), rounded up to the stride
        (times the scale for fusion)."""
        from jaxspec import tasks
        from jaxspec.train.state import init_variables
        unit = self.task.unit(self.config, self.stride)
        s = image_size or self.config.crop
        s = -(-s // unit) * unit
        info = tasks.info_from_config(self.config, self.method)
        args, kwargs = self.task.example_inputs(info, s, self.method.side_inputs)
        return jax.jit(lambda k: init_variables(self.module, k, inputs=args, kwargs=kwargs))(
            jax.random.PRNGKey(seed))

    def apply(self, variables, *inputs, train: bool = False, **kw):
        return self.module.apply(variables, *inputs, train=train, **kw)


def create_model(method: str, preset: str = "cpu", **overrides) -> Model:
    """Model bundle for ``method``/``preset``; ``overrides`` that name Config fields change the
    config (``steps=...``), any others are architecture kwargs (``n_feat=16``)."""
    m = registry.get(method)
    cfg = m.config(preset)
    fields = {f.name for f in dataclasses.fields(Config)}
    cfg_kw = {k: v for k, v in overrides.items() if k in fields}
    model_kw = {k: v for k, v in overrides.items() if k not in fields}
    if cfg_kw:
        cfg = cfg.replace(**cfg_kw)
    if model_kw:
        cfg = cfg.replace(model={**dict(cfg.model), **model_kw})
    return Model(method=m, config=cfg, module=m.model(cfg))


def load_config(workdir: str | os.PathLike) -> Config:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {workdir} (not a jaxspec training workdir?)")
    return Config.from_dict(json.loads(path.read_text()))


def load(workdir: str | os.PathLike, which: str = "best", step: int | None = None
         ) -> tuple[Model, dict]:
    """(Model, variables) from a training workdir: the best-validation checkpoint by default,
    ``which="latest"`` for the most recent one (falls back to latest if no best exists).
    Parameter-free methods (``step_kind="none"``) have no checkpoint: their (empty) variables
    come from ``init``."""
    from jaxspec.train import checkpointing
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    cfg = load_config(workdir)
    m = registry.get(cfg.method)
    model = Model(method=m, config=cfg, module=m.model(cfg))
    if m.step_kind == "none":
        return model, model.init()
    shapes = jax.eval_shape(model.init)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          dict(shapes))
    with checkpointing.Checkpointer(Path(workdir) / "checkpoints", read_only=True) as ck:
        variables, _ = ck.restore_variables(target, which=which, step=step)
    return model, {k: v for k, v in variables.items() if k == "params" or v}


def bands_of(model: Model | None, n_bands: int, workdir: str | os.PathLike | None = None
             ) -> np.ndarray:
    """Band centres (nm) for a model's output: ``<workdir>/bands.json`` when the training data
    recorded them, else 400..700 nm at 10 nm for 31 bands, else band indices."""
    if workdir is not None and (Path(workdir) / "bands.json").is_file():
        bands = np.asarray(json.loads((Path(workdir) / "bands.json").read_text()), np.float32)
        if len(bands) == n_bands:
            return bands
    if n_bands == 31:
        from jaxspec.physics import WAVELENGTHS_31
        return np.asarray(WAVELENGTHS_31, np.float32)
    return np.arange(n_bands, dtype=np.float32)


def _bundle(model, normalization, stride):
    """(module, normalization, stride, task) of a Model or a bare rgb2hsi Flax module."""
    if isinstance(model, Model):
        return (model.module, normalization or model.config.rgb_norm, stride or model.stride,
                model.task)
    if normalization is None:
        raise ValueError("reconstruct: give normalization= when model is a bare Flax module")
    from jaxspec import tasks
    return model, normalization, stride or 1, tasks.get("rgb2hsi")


def _adapter(model, variables, adapt):
    """``inputs -> variables`` for ``adapt=True`` (the config's adapt settings) or a dict of
    overrides (``{"steps": 10, "lr": 1e-3}``), else None."""
    if not adapt:
        return None
    if not isinstance(model, Model):
        raise ValueError("adapt needs a jaxspec Model (its method's adapt_loss and config)")
    from jaxspec import inference
    cfg = model.config
    over = dict(adapt) if isinstance(adapt, Mapping) else {}
    steps = int(over.get("steps", cfg.adapt_steps))
    if steps < 1:
        raise ValueError("adapt: set steps (config.adapt_steps or adapt={'steps': k})")
    fn = inference.make_adapter(model.task, model.module.apply, model.method.adapt_loss,
                                steps=steps, lr=float(over.get("lr", cfg.adapt_lr)),
                                optimizer=over.get("optimizer", cfg.adapt_optimizer),
                                params=tuple(over.get("params", cfg.adapt_params)),
                                side_inputs=model.method.side_inputs)
    return lambda inputs: fn(variables, inputs)


def reconstruct(model: Model | Any, variables: Mapping[str, Any], rgb, *,
                normalization: str | None = None, stride: int | None = None,
                ensemble: bool = False, tile: int | None = None, overlap: int = 32,
                max_pixels: int | None = 1024 * 1024, adapt=False) -> np.ndarray:
    """Spectral cube(s) from RGB image(s) of any size (rgb2hsi), or from an HSI (hsi2hsi).

    ``rgb``: (H, W, 3) or (B, H, W, 3) in the source's native scale (uint8 code values, ...);
    it is normalised per image with ``normalization`` (default: the model config's
    ``rgb_norm``, e.g. MST++'s min-max). ``model`` is a :class:`Model` or a bare Flax module
    (then give ``normalization`` and ``stride``). Images above ``max_pixels`` are tiled.
    ``adapt=True`` (or a dict of overrides) runs the method's test-time adaptation once per
    image before predicting (:func:`jaxspec.inference.make_adapter`).
    """
    from jaxspec import inference
    from jaxspec.data import normalize_rgb
    module, normalization, stride, task = _bundle(model, normalization, stride)
    if task.name == "fusion":
        raise ValueError("reconstruct: this is a fusion method; use jaxspec.fuse(model, "
                         "variables, lr_hsi, hr_msi, ...)")
    key = task.input_keys[0]
    x = np.asarray(rgb)
    single = x.ndim == 3
    if single:
        x = x[None]
    if key == "rgb" and (x.ndim != 4 or x.shape[-1] != 3):
        raise ValueError(f"reconstruct: rgb must be (H, W, 3) or (B, H, W, 3), got {np.shape(rgb)}")
    if key == "hsi" and x.ndim != 4:
        raise ValueError(f"reconstruct: hsi must be (H, W, C) or (B, H, W, C), got {np.shape(rgb)}")
    if key == "rgb":
        x = np.stack([normalize_rgb(xi.astype(np.float32), normalization) for xi in x])
    x = x.astype(np.float32)
    adapter = _adapter(model, variables, adapt)
    if adapter is None:
        predict = inference.make_predict_fn(module.apply, variables)
        out = inference.predict_image(predict, x, stride=stride, tile=tile, overlap=overlap,
                                      ensemble=ensemble, max_pixels=max_pixels,
                                      channels=3 if key == "rgb" else None)
    else:
        predict = inference.make_task_predict_fn(task, module.apply, variables)
        outs = []
        for xi in x:   # adapt once per image
            inp = {key: xi[None]}
            v = adapter({key: inference.pad_to_stride(xi[None], stride)})
            outs.append(inference.predict_image(lambda d, v=v: predict(d, v), inp,
                                                stride=stride, tile=tile, overlap=overlap,
                                                ensemble=ensemble, max_pixels=max_pixels))
        out = np.concatenate(outs)
    return out[0] if single else out


def fuse(model: Model, variables: Mapping[str, Any], lr_hsi, hr_msi, *, srf=None, psf=None,
         tile: int | None = None, overlap: int | None = None,
         max_pixels: int | None = 1024 * 1024, adapt=False) -> np.ndarray:
    """HR-HSI (H, W, C) (or (B, H, W, C)) from an LR-HSI (H/s, W/s, C) and an HR-MSI (H, W, M)
    with a fusion method (``task="fusion"``), at the scale s of its config.

    ``srf`` (C, M) / ``psf`` (k, k): the known degradation, required when the method lists them
    in ``Method.side_inputs``. Inputs are used as given (the fusion task's data is in [0, 1]).
    Large images are tiled in HR coordinates with aligned LR tiles (``tile``, ``overlap``
    multiples of s x stride; ``overlap`` default 4s); ``adapt`` as in :func:`reconstruct`.
    """
    from jaxspec import inference
    if not isinstance(model, Model) or model.task.name != "fusion":
        raise ValueError("fuse: needs a jaxspec Model of a fusion method (task='fusion')")
    s = model.task.scale(model.config)
    lr, hr = np.asarray(lr_hsi, np.float32), np.asarray(hr_msi, np.float32)
    single = lr.ndim == 3
    if single:
        lr, hr = lr[None], hr[None]
    if lr.ndim != 4 or hr.ndim != 4:
        raise ValueError(f"fuse: lr_hsi and hr_msi must be (H, W, C) or (B, H, W, C), got "
                         f"{np.shape(lr_hsi)} and {np.shape(hr_msi)}")
    if hr.shape[1:3] != (lr.shape[1] * s, lr.shape[2] * s) or hr.shape[0] != lr.shape[0]:
        raise ValueError(f"fuse: hr_msi {hr.shape[1:3]} must be scale {s} x lr_hsi "
                         f"{lr.shape[1:3]}")
    b = lr.shape[0]
    side = {}
    for name, value, shape in (("srf", srf, 2), ("psf", psf, 2)):
        if name in model.method.side_inputs:
            if value is None:
                raise ValueError(f"fuse: method {model.name!r} needs {name}= (its side inputs "
                                 f"are {list(model.method.side_inputs)})")
            v = np.asarray(value, np.float32)
            side[name] = np.broadcast_to(v, (b,) + v.shape[-shape:]).copy()
    if "srf" in side and side["srf"].shape[1:] != (lr.shape[-1], hr.shape[-1]):
        raise ValueError(f"fuse: srf must be (C, M) = {(lr.shape[-1], hr.shape[-1])}, got "
                         f"{side['srf'].shape[1:]}")
    factors, out_factor = inference.task_geometry(model.task, s, tuple(side))
    predict = inference.make_task_predict_fn(model.task, model.module.apply, variables,
                                             side_inputs=tuple(side))
    adapter = _adapter(model, variables, adapt)
    overlap = 4 * s if overlap is None else overlap
    outs = []
    for i in range(b):
        inp = {"lr_hsi": lr[i:i + 1], "hr_msi": hr[i:i + 1], **{k: v[i:i + 1]
                                                                for k, v in side.items()}}
        fn = predict
        if adapter is not None:
            padded = inference._Inputs(inp, factors, out_factor).pad(model.stride).arrays
            v = adapter(padded)
            fn = lambda d, v=v: predict(d, v)  # noqa: E731
        outs.append(inference.predict_image(fn, inp, stride=model.stride, tile=tile,
                                            overlap=overlap, max_pixels=max_pixels,
                                            factors=factors, out_factor=out_factor))
    out = np.concatenate(outs)
    return out[0] if single else out
