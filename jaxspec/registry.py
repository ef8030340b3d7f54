"""Method registry: ``--method NAME`` -> model factory, presets, train-step kind.

Each ``jaxspec/models/<name>.py`` calls :func:`register` at import time; ``jaxspec.models``
imports every method module, so ``get(name)`` sees them all.

Model contract (supervised spectral reconstruction): ``model.apply(variables, rgb, train=...)``
maps a (B, H, W, 3) float32 RGB batch to a (B, H, W, C) float32 spectral cube. Models that
keep BatchNorm statistics put them in the ``batch_stats`` collection; models that need
randomness at train time declare the PRNG stream names in ``rng_streams``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Sequence

from jaxspec.configs.base import Config


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    make_model: Callable[[Mapping[str, Any]], Any]       # config.model -> flax.linen.Module
    presets: Mapping[str, Callable[[], Config]]            # "paper", "cpu", "smoke", ...
    step_kind: str = "supervised"                          # engine step family
    rng_streams: tuple[str, ...] = ()                      # extra PRNG streams for train
    description: str = ""
    reference: str = ""                                     # citation of the paper
    paper_params_m: float | None = None                     # params the paper reports (M)
    paper_gflops: float | None = None                       # FLOPs the paper reports (G)
    paper_gflops_input: tuple[int, int] | None = None       # input size of that FLOP figure
    stride: int = 1                                         # inputs are padded to a multiple
    # Options read by the step builder of ``step_kind`` (see ``jaxspec.train.steps``), e.g. for
    # kind "groups": ``{"param_labels": fn(params) -> label tree, "losses": {label: loss_fn},
    # "groups": {label: {"lr": ...} | None}}`` (None = frozen group).
    step_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def config(self, preset: str = "cpu", **overrides) -> Config:
        if preset not in self.presets:
            raise ValueError(
                f"method {self.name!r} has no preset {preset!r}; available: {sorted(self.presets)}")
        cfg = self.presets[preset]()
        return cfg.replace(**overrides) if overrides else cfg

    def model(self, config: Config | None = None):
        cfg = config if config is not None else self.config("cpu")
        return self.make_model(dict(cfg.model))


STANDARD_PRESETS = ("paper", "cpu", "smoke")


def module_factory(module_cls: type, label: str, allowed: Sequence[str] | None = None,
                   tuple_keys: Sequence[str] = ()) -> Callable[[Mapping[str, Any]], Any]:
    """A ``make_model`` for :class:`Method`: ``config.model -> module_cls(**config.model)``.

    ``allowed`` (default: every dataclass field of ``module_cls`` but ``parent``/``name``) are
    the architecture options a config may set; any other key raises ``ValueError`` naming
    ``label``.  ``tuple_keys`` are converted to tuples (JSON round trips turn them into lists,
    and Flax module fields must be hashable).
    """
    keys = tuple(allowed) if allowed is not None else tuple(
        f.name for f in dataclasses.fields(module_cls) if f.name not in ("parent", "name"))

    def make_model(model_cfg: Mapping[str, Any]):
        unknown = set(model_cfg) - set(keys)
        if unknown:
            raise ValueError(f"unknown {label} model options {sorted(unknown)}; allowed: "
                             f"{list(keys)}")
        cfg = dict(model_cfg)
        for k in tuple_keys:
            if k in cfg:
                cfg[k] = tuple(cfg[k])
        return module_cls(**cfg)

    make_model.allowed_keys = keys
    return make_model


def standard_presets(config_module: str) -> dict[str, Callable[[], Config]]:
    """``{"paper": f, "cpu": f, "smoke": f}`` from the preset functions of ``config_module``
    (e.g. ``"jaxspec.configs.acc"``); ``paper`` and ``cpu`` are required."""
    mod = importlib.import_module(config_module)
    found = {p: getattr(mod, p) for p in STANDARD_PRESETS if callable(getattr(mod, p, None))}
    missing = {"paper", "cpu"} - set(found)
    if missing:
        raise ValueError(f"{config_module} lacks the required preset(s) {sorted(missing)}")
    return found


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (re-registering a name replaces it, so reloads work)."""
    if not isinstance(method, Method):
        raise ValueError(f"register() expects a jaxspec.registry.Method, got {type(method).__name__}")
    if method.stride < 1:
        raise ValueError(f"method {method.name!r}: stride must be >= 1, got {method.stride}")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove ``name`` (used by tests that register throw-away methods)."""
    _REGISTRY.pop(name, None)


def _load_all() -> None:
    importlib.import_module("jaxspec.models")


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]
