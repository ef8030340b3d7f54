"""Optimisers and learning-rate schedules built from a :class:`~jaxspec.configs.base.Config`.

* ``make_schedule``: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay
  to ``lr_min`` at ``steps``:  lr(t) = lr_min + (lr - lr_min) * (1 + cos(pi * t' / T')) / 2 with
  t' = t - warmup, T' = steps - warmup (MST++: ``CosineAnnealingLR(T_max, eta_min)`` stepped every
  iteration, no warm-up), or a constant after warm-up.
* ``make_optimizer``: optional global-norm clipping followed by Adam / AdamW.
* Parameter groups: ``label_params`` assigns a label to every parameter leaf from regex rules
  on its path; ``make_optimizer(config, param_labels=..., groups=...)`` then builds an
  ``optax.multi_transform`` with one optimiser per group (each group may override ``lr``,
  ``optimizer``, ``weight_decay``, ...) and ``optax.set_to_zero()`` for frozen groups
  (``groups[label] = None``): frozen codebooks, G/D, EM or test-time masked updates.
* Freezing: ``with_frozen(tx, patterns)`` gives the parameters whose path matches one of the
  regexes exactly zero updates (``optax.multi_transform`` with ``set_to_zero``: they stay
  bitwise unchanged and keep no optimiser state); ``config.frozen`` applies it to every step
  kind (``jaxspec.train.steps.make_optimizer_for``).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

from jaxspec.configs.base import Config

FROZEN = None  # value of ``groups[label]`` for a frozen parameter group


def make_schedule(config: Config) -> optax.Schedule:
    if config.steps < 1:
        raise ValueError(f"config.steps must be >= 1, got {config.steps}")
    if not 0 <= config.warmup_steps < config.steps:
        raise ValueError(
            f"config.warmup_steps must be in [0, steps={config.steps}), got {config.warmup_steps}")
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if config.warmup_steps else config.lr, peak_value=config.lr,
            warmup_steps=config.warmup_steps, decay_steps=config.steps, end_value=config.lr_min)
    if config.schedule == "constant":
        if config.warmup_steps:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, config.lr, config.warmup_steps),
                 optax.constant_schedule(config.lr)], [config.warmup_steps])
        return optax.constant_schedule(config.lr)
    raise ValueError(f"unknown config.schedule {config.schedule!r}; use 'cosine' or 'constant'")


def _base_optimizer(config: Config) -> optax.GradientTransformation:
    schedule = make_schedule(config)
    if config.optimizer == "adam":
        opt = optax.adam(schedule, b1=config.b1, b2=config.b2)
        if config.weight_decay:  # L2 penalty added to the gradient (torch Adam weight_decay)
            opt = optax.chain(optax.add_decayed_weights(config.weight_decay), opt)
    elif config.optimizer == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        opt = optax.sgd(schedule, momentum=config.b1 or None)
    else:
        raise ValueError(f"unknown config.optimizer {config.optimizer!r}; use adam, adamw or sgd")
    if config.grad_clip is not None:
        if config.grad_clip <= 0:
            raise ValueError(f"config.grad_clip must be positive or None, got {config.grad_clip}")
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip), opt)
    return opt


def label_params(params: Any, rules: Sequence[tuple[str, str]], default: str) -> Any:
    """Label tree for ``params``: the first ``(regex, label)`` whose regex ``re.search``-es the
    '/'-joined parameter path (e.g. ``"Discriminator_0/Conv_0/kernel"``) wins, else ``default``."""
    compiled = [(re.compile(r), lab) for r, lab in rules]

    def label(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for rx, lab in compiled:
            if rx.search(name):
                return lab
        return default

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config: Config, *, param_labels: Any | Callable[[Any], Any] | None = None,
                   groups: Mapping[str, Mapping[str, Any] | None] | None = None
                   ) -> optax.GradientTransformation:
    """Optimiser for ``config``; with ``param_labels`` one optimiser per group.

    ``groups`` maps every label to config overrides for that group (``{}`` = same as config)
    or ``None`` (frozen: updates are exactly zero, and no optimiser state is kept).
    """
    if param_labels is None:
        return _base_optimizer(config)
    groups = dict(groups or {})
    if not groups:
        raise ValueError("make_optimizer: param_labels given but no groups")
    transforms = {}
    for label, overrides in groups.items():
        transforms[label] = (optax.set_to_zero() if overrides is FROZEN
                             else _base_optimizer(config.replace(**dict(overrides))))
    tx = optax.multi_transform(transforms, param_labels)

    def init(params):
        labels = param_labels(params) if callable(param_labels) else param_labels
        missing = set(jax.tree.leaves(labels)) - set(groups)
        if missing:
            raise ValueError(f"parameter labels {sorted(missing)} have no entry in groups "
                             f"{sorted(groups)}")
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update)


FROZEN_LABEL, TRAIN_LABEL = "frozen", "train"


def frozen_labels(params: Any, patterns: Sequence[str]) -> Any:
    """``"frozen"`` for leaves whose path matches one of ``patterns``, else ``"train"``."""
    return label_params(params, [(p, FROZEN_LABEL) for p in patterns], default=TRAIN_LABEL)


def with_frozen(tx: optax.GradientTransformation, patterns: Sequence[str]
                ) -> optax.GradientTransformation:
    """``tx`` on the trainable parameters, exactly zero updates on those matching
    ``patterns`` (no-op for an empty list). A pattern that matches nothing is an error at
    ``init`` (a typo must not silently train everything)."""
    patterns = tuple(patterns or ())
    if not patterns:
        return tx
    labels = lambda params: frozen_labels(params, patterns)  # noqa: E731
    inner = optax.multi_transform({TRAIN_LABEL: tx, FROZEN_LABEL: optax.set_to_zero()}, labels)

    def init(params):
        used = set(jax.tree.leaves(labels(params)))
        if FROZEN_LABEL not in used:
            raise ValueError(f"config.frozen={list(patterns)} matches no parameter path")
        return inner.init(params)

    return optax.GradientTransformationExtraArgs(init, inner.update)
