"""Typed, frozen training configuration shared by every method.

A method's presets (``paper``, ``cpu``, ``smoke``) differ only in schedule and data shapes
(steps, crop, batch, learning rate, evaluation cadence); the architecture lives in
``model`` and is identical across presets, so a method has a single parameter count.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from typing import Any, Mapping

AUGMENTS = ("dihedral", "flips", "none")


@dataclasses.dataclass(frozen=True)
class Config:
    # --- what to train -----------------------------------------------------------------
    method: str
    preset: str
    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # architecture kwargs
    # --- data ----------------------------------------------------------------------------
    dataset: str = "spectral_scenes"
    dataset_config: str | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    crop: int = 64
    batch_size: int = 8
    rgb_norm: str = "minmax"          # "minmax" (MST++), "none", "div255"
    augment: str = "dihedral"         # train crops: "dihedral" (rot90 + flips), "flips", "none"
    bands: int | None = None          # HSI band count; None = from the dataset (filled at start)
    # Fusion pairs synthesised from the HSI (jaxspec.data.fusion.Degradation fields: scale, psf,
    # psf_size, sigma, srf, snr_hsi, snr_msi, protocol, ...); read by the "fusion" task only.
    fusion: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Extra independent training streams {name: {"split": ..., "keys": [...], "seed": ...,
    # "dataset": ..., "batch_size": ...}}: the batch becomes {name: batch_of_stream} (USSR's
    # unpaired RGB / HSI); empty = one stream of the task's keys.
    streams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_crop_border: int | None = None  # None = the dataset builder's EVAL_CROP_BORDER (or 0)
    max_eval_images: int | None = None  # validation (periodic and final) uses at most this many
    eval_tile: int | None = None      # tile size for full-image inference (None = whole image)
    eval_tile_overlap: int = 32       # overlap between tiles (pixels)
    eval_ensemble: bool = False       # x8 flip/transpose self-ensemble at evaluation
    # --- optimisation --------------------------------------------------------------------
    steps: int = 1000
    optimizer: str = "adam"           # "adam" | "adamw"
    lr: float = 4e-4
    lr_min: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "cosine"          # "cosine" | "constant"
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float | None = None
    # Gradient accumulation inside one step ("supervised" step kind): the batch is split into
    # this many equal micro-batches, run one after the other in a lax.scan, and their mean
    # gradient makes one update -- the same update as the whole batch for models without
    # batch-coupled state (an error with BatchNorm statistics); activation memory / microbatches
    microbatches: int = 1
    loss: str = "mrae"
    aux_loss_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # model aux
    select_metric: str | None = None  # best-checkpoint metric; None = the task's (mrae / psnr)
    # --- staged training, freezing, test-time adaptation ------------------------------------
    # [{"workdir": ..., "subtree": "encoder", "target": "encoder", "which": "best"}]: params
    # (and model state) subtrees initialised from other runs' checkpoints before step 0.
    init_from: tuple[Mapping[str, Any], ...] = ()
    frozen: tuple[str, ...] = ()      # regexes on '/'-joined param paths: zero updates
    adapt_steps: int = 0              # per-image test-time optimisation steps (0 = off)
    adapt_lr: float = 1e-4
    adapt_optimizer: str = "adam"     # "adam" | "sgd"
    adapt_params: tuple[str, ...] = ()  # regexes of the adapted params; () = all
    adapt_lr_milestones: tuple[int, ...] = ()  # adapt steps after which the lr is x gamma
    adapt_lr_gamma: float = 0.5
    # --- bookkeeping ---------------------------------------------------------------------
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 250
    keep_last: int = 3
    compute_dtype: str = "float32"    # "bfloat16" optional on accelerators
    mesh_space: int = 1               # devices splitting H: a ('data', 'space') mesh if > 1

    def __post_init__(self):
        # JSON round trips turn tuples into lists: keep the sequence fields tuples (hashable)
        for f in ("init_from", "frozen", "adapt_params", "adapt_lr_milestones"):
            v = getattr(self, f)
            if isinstance(v, (str, int)):
                v = (v,)
            if not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v))
        m = self.adapt_lr_milestones
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in m) or \
                list(m) != sorted(set(m)):
            raise ValueError(f"config.adapt_lr_milestones must be increasing positive step "
                             f"counts, got {list(m)}")
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or \
                self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"config.microbatches must be a positive integer dividing "
                             f"batch_size={self.batch_size}, got {self.microbatches!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"config.augment must be one of {AUGMENTS}, got {self.augment!r}")

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d)
        d.pop("extra", None)   # configs written before `extra` (read by nothing) was removed
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**dict(d))


def _parse_literal(text: str) -> Any:
    """Python/JSON literal if it parses (``3``, ``1e-4``, ``[1, 2]``, ``None``), else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (already literal-parsed) to the field type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError:
                pass
        raise ValueError(f"--set {key}: cannot interpret {value!r} as {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"--set {key}: expected a bool (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"--set {key}: expected an int, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--set {key}: expected a float, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    if origin is tuple:
        if isinstance(value, (str, Mapping)):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"--set {key}: expected a list, got {value!r}")
        return tuple(value)
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ValueError(f"--set {key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


MAPPING_FIELDS = ("model", "fusion", "streams", "aux_loss_weights")


def apply_overrides(config: Config, overrides: "list[str] | Mapping[str, Any]") -> Config:
    """Apply ``key=value`` strings (the CLI's ``--set``) or a mapping to ``config``.

    Values are typed by the :class:`Config` field annotation (``steps=100`` -> int,
    ``grad_clip=none`` -> None, ``lr=1e-4`` -> float). Dotted keys reach into the mapping fields:
    ``model.n_feat=16`` or ``fusion.scale=4`` (values there are parsed as Python literals).
    Unknown keys raise ``ValueError`` naming the key and the valid ones.
    """
    hints = typing.get_type_hints(Config)
    if isinstance(overrides, Mapping):
        items = [(str(k), v, False) for k, v in overrides.items()]
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            k = k.strip()
            # a plain-str field takes the text as written ("rgb_norm=none" is "none", not None)
            items.append((k, v.strip() if hints.get(k) is str else _parse_literal(v), True))
    updates: dict[str, Any] = {}
    for key, value, _ in items:
        head, _, rest = key.partition(".")
        if head not in hints:
            raise ValueError(f"unknown config key {head!r}; valid keys: {sorted(hints)}")
        if rest:
            if head not in MAPPING_FIELDS:
                raise ValueError(f"config key {head!r} is not a mapping; cannot set {key!r}")
            base = dict(updates.get(head, getattr(config, head)))
            base[rest] = value
            updates[head] = base
        else:
            updates[head] = _coerce(value, hints[head], key)
    return config.replace(**updates) if updates else config


# ----------------------------------------------------------------------------- preset scaffolding
# Settings shared by every method's presets; a method's preset states only what is its own.
PAPER_ARAD1K = dict(  # the NTIRE 2022 / ARAD-1K protocol the RGB->HSI papers train and test on
    dataset="arad1k", optimizer="adam", lr_min=1e-6, warmup_steps=0,
    schedule="cosine", b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=None, loss="mrae",
    log_every=100, eval_every=1000, ckpt_every=1000)
CPU_BUILTIN = dict(  # a few minutes on 2 CPU cores on the built-in data (linear RGB in [0, 1])
    dataset="spectral_scenes", rgb_norm="none",  # all 50 validation images select and score
    optimizer="adam", lr_min=1e-6, schedule="cosine", b1=0.9, b2=0.999, log_every=25)
SMOKE = dict(  # two steps, for tests
    dataset="spectral_scenes", crop=16, batch_size=2, max_eval_images=2,
    steps=2, optimizer="adam", lr=2e-4, lr_min=1e-6, warmup_steps=0, schedule="cosine",
    loss="mrae", log_every=1, eval_every=2, ckpt_every=2)


def make_preset(method: str, preset: str, model: Mapping[str, Any], base: Mapping[str, Any],
                **own: Any) -> Config:
    """``Config(method, preset, model, **base, **own)``: ``own`` overrides ``base`` (a copy of the
    ``model`` mapping is taken so presets never share it)."""
    return Config(method=method, preset=preset, model=dict(model), **{**dict(base), **own})


def ablation_of(base: Config, ablations: Mapping[str, Mapping[str, Any]], name: str,
                what: str, **model_overrides: Any) -> Config:
    """``base`` with its ``model`` options updated by ``ablations[name]`` and then
    ``model_overrides`` (the ablation tables of ``jaxspec.configs.<method>``; ``what`` names the
    method in the error for an unknown ``name``)."""
    if name not in ablations:
        raise ValueError(f"unknown {what} ablation {name!r}; available: {sorted(ablations)}")
    return base.replace(model={**dict(base.model), **ablations[name], **model_overrides})
