"""Method registry: ``--method NAME`` -> model factory, presets, task, train-step kind.

Each ``jaxspec/models/<module>.py`` calls :func:`register` at import time. ``get(name)``
imports only the module of ``name`` (:data:`METHOD_MODULES`, else ``jaxspec.models.<name>``,
else -- for modules that register several methods -- every model module, each on its own), so a
broken model file breaks only its own methods and there is no import cycle through a package
``__init__``.

Model contract per task (see :mod:`jaxspec.tasks`): ``rgb2hsi`` ``model.apply(v, rgb, train=)``
(B, H, W, 3) -> (B, H, W, C); ``hsi2hsi`` ``model.apply(v, hsi, train=)``; ``fusion``
``model.apply(v, lr_hsi, hr_msi, train=)`` ((B, H/s, W/s, C), (B, H, W, M)) -> (B, H, W, C),
plus the keyword side inputs named in ``side_inputs``. A model may return ``(output,
aux_losses)``. Every mutable collection (``batch_stats``, codebook EMA, ...) is model state,
trained, checkpointed and restored with the parameters; models that need randomness at train
time declare the PRNG stream names in ``rng_streams``. ``step_kind="none"`` hosts parameter-free
methods (no training: evaluate / predict only).
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
    step_kind: str = "supervised"                          # engine step family ("none": no
                                                           # training, parameter-free methods)
    task: str = "rgb2hsi"                                  # jaxspec.tasks: rgb2hsi|hsi2hsi|fusion
    side_inputs: tuple[str, ...] = ()                      # batch keys passed as keyword args
    data_fields: Mapping[str, str] | None = None           # model option -> data quantity
                                                           # (None: the task's default)
    # Self-supervised loss for test-time adaptation: fn(apply_fn, variables, inputs) -> scalar,
    # ``inputs`` the task's batch dict of one image (see jaxspec.inference.make_adapter).
    adapt_loss: Callable[..., Any] | None = None
    rng_streams: tuple[str, ...] = ()                      # extra PRNG streams for train
    description: str = ""
    reference: str = ""                                     # citation of the paper
    paper_params_m: float | None = None                     # params the paper reports (M)
    paper_gflops: float | None = None                       # FLOPs the paper reports (G)
    paper_gflops_input: tuple[int, int] | None = None       # input size of that FLOP figure
    stride: int = 1                                         # inputs are padded to a multiple
    # Options read by the step builder of ``step_kind`` (see ``jaxspec.train.steps``), e.g. for
    # kind "phases": ``{"phases": [steps.Phase(...), ...]}``; for kind "groups":
    # ``{"param_labels": fn(params) -> label tree, "losses": {label: loss_fn},
    # "groups": {label: {"lr": ...} | None}}`` (None = frozen group).
    step_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # What has to run before this method trains: fn(config, workdir, **train_kwargs) -> the
    # config to train (e.g. MCGA stage 2 trains its stage 1 first when no ``init_from`` names
    # one), or the summary dict of its own run when that was interrupted (returned as is).
    # Called by ``train_and_evaluate`` when it reads the config's own dataset.
    before_training: Callable[..., Config] | None = None
    # What ``python -m jaxspec.predict`` reports about each input besides the prediction:
    # fn(module, variables, x) -> JSON-able dict (x: the model input of one image, (H, W, C)),
    # written into the output's sidecar under "estimate"; its "summary" string (if any)
    # is printed on the console
    # (e.g. USSR: which camera of its SRF dictionary it thinks took the photo).
    photo_info: Callable[..., Mapping[str, Any]] | None = None

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

# Method name -> module that registers it (others: ``jaxspec.models.<name>``, then a scan).
METHOD_MODULES: dict[str, str] = {
    "mstpp": "jaxspec.models.mstpp",
    "acc": "jaxspec.models.acc",
    "ccnet": "jaxspec.models.ccnet",
    "mcga": "jaxspec.models.mcga", "mcga_vq": "jaxspec.models.mcga",
}
_IMPORT_ERRORS: dict[str, str] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (re-registering a name replaces it, so reloads work)."""
    if not isinstance(method, Method):
        raise ValueError(f"register() expects a jaxspec.registry.Method, got {type(method).__name__}")
    if method.stride < 1:
        raise ValueError(f"method {method.name!r}: stride must be >= 1, got {method.stride}")
    from jaxspec import tasks
    tasks.get(method.task)  # unknown task names fail at registration
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove ``name`` (used by tests that register throw-away methods)."""
    _REGISTRY.pop(name, None)


def _import(module: str) -> bool:
    """Import ``module``; record (not raise) its error so other methods keep working."""
    try:
        importlib.import_module(module)
        return True
    except ModuleNotFoundError as e:
        if e.name != module:
            _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
        return False
    except Exception as e:  # a broken model file must not break the other methods
        _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
        return False


def model_modules() -> list[str]:
    """Every ``jaxspec.models.<name>`` module file."""
    from pathlib import Path
    d = Path(__file__).resolve().parent / "models"
    return sorted(f"jaxspec.models.{p.stem}" for p in d.glob("*.py") if p.stem != "__init__")


def _load_all() -> None:
    for module in model_modules():
        _import(module)


def names() -> list[str]:
    """Every registered method (imports each model module on its own)."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    """The method ``name``, importing only its module when it is known."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    module = METHOD_MODULES.get(name, f"jaxspec.models.{name}")
    _IMPORT_ERRORS.pop(module, None)
    _import(module)
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        broken = "".join(f"\n  {m}: {err}" for m, err in sorted(_IMPORT_ERRORS.items()))
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}"
                         + (f"; model modules that failed to import:{broken}" if broken else ""))
    return _REGISTRY[name]
