"""Typed, frozen training configuration shared by every method.

A method's presets (``paper``, ``cpu``, ``smoke``) differ only in schedule and data shapes
(steps, crop, batch, learning rate, evaluation cadence); the architecture lives in
``model`` and is identical across presets, so a method has a single parameter count.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping


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
    eval_crop_border: int = 0         # NTIRE 2022 protocol uses 128 on 482x512 images
    max_eval_images: int | None = None
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
    loss: str = "mrae"
    # --- bookkeeping ---------------------------------------------------------------------
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 250
    keep_last: int = 3
    compute_dtype: str = "float32"    # "bfloat16" optional on accelerators
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # method-specific knobs

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**dict(d))
