"""Notebook API: ``create_model``, ``load``, ``reconstruct``.

    >>> import jaxspec
    >>> model = jaxspec.create_model("mstpp", preset="cpu")          # Model bundle
    >>> variables = model.init(seed=0)
    >>> cube = jaxspec.reconstruct(model, variables, rgb_uint8)     # (H, W, 31) float32
    >>> model, variables = jaxspec.load("runs/mstpp")               # best checkpoint of a run
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

    def init(self, seed: int = 0, image_size: int | None = None) -> dict:
        """Fresh variables (``{"params": ..., ["batch_stats": ...]}``)."""
        from jaxspec.train.state import init_variables
        s = image_size or self.config.crop
        s = -(-s // self.stride) * self.stride
        return jax.jit(lambda k: init_variables(self.module, k, (1, s, s, 3)))(
            jax.random.PRNGKey(seed))

    def apply(self, variables, rgb, train: bool = False, **kw):
        return self.module.apply(variables, rgb, train=train, **kw)


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
    ``which="latest"`` for the most recent one (falls back to latest if no best exists)."""
    from jaxspec.train import checkpointing
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    cfg = load_config(workdir)
    m = registry.get(cfg.method)
    model = Model(method=m, config=cfg, module=m.model(cfg))
    shapes = jax.eval_shape(model.init)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), target)
    with checkpointing.Checkpointer(Path(workdir) / "checkpoints", read_only=True) as ck:
        variables, _ = ck.restore_variables(target, which=which, step=step)
    out = {"params": variables["params"]}
    if variables.get("batch_stats"):
        out["batch_stats"] = variables["batch_stats"]
    return model, out


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


def reconstruct(model: Model | Any, variables: Mapping[str, Any], rgb, *,
                normalization: str | None = None, stride: int | None = None,
                ensemble: bool = False, tile: int | None = None, overlap: int = 32,
                max_pixels: int | None = 1024 * 1024) -> np.ndarray:
    """Spectral cube(s) from RGB image(s) of any size.

    ``rgb``: (H, W, 3) or (B, H, W, 3) in the source's native scale (uint8 code values, ...);
    it is normalised per image with ``normalization`` (default: the model config's
    ``rgb_norm``, e.g. MST++'s min-max). ``model`` is a :class:`Model` or a bare Flax module
    (then give ``normalization`` and ``stride``). Images above ``max_pixels`` are tiled.
    """
    from jaxspec import inference
    from jaxspec.data import normalize_rgb
    if isinstance(model, Model):
        module = model.module
        normalization = normalization or model.config.rgb_norm
        stride = stride or model.stride
    else:
        module = model
        if normalization is None:
            raise ValueError("reconstruct: give normalization= when model is a bare Flax module")
        stride = stride or 1
    x = np.asarray(rgb)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"reconstruct: rgb must be (H, W, 3) or (B, H, W, 3), got {np.shape(rgb)}")
    x = np.stack([normalize_rgb(xi.astype(np.float32), normalization) for xi in x])
    predict = inference.make_predict_fn(module.apply, variables)
    out = inference.predict_image(predict, x, stride=stride, tile=tile, overlap=overlap,
                                  ensemble=ensemble, max_pixels=max_pixels)
    return out[0] if single else out
