"""Train-step builders, one per ``Method.step_kind``.

A builder has the signature ``builder(model, config, method) -> step`` where
``step(state, batch) -> (state, metrics)`` is a *pure* function (``jaxspec.train.loop`` jits
it once with the state donated and the batch sharded over ``'data'``). ``metrics`` holds scalars:
at least ``loss``, ``grad_norm`` (global L2 norm of the gradient), ``param_norm`` (of the new
parameters) and ``lr``.

Registered kinds:

* ``"supervised"``: ``loss(model.apply(variables, rgb, train=True), hsi)``; BatchNorm
  statistics are updated through the mutable ``batch_stats`` collection; every name in
  ``method.rng_streams`` gets its own key ``fold_in(fold_in(state.rng, step), i)``.
* ``"groups"``: several parameter groups, each trained from **its own loss** by its own
  optimiser (adversarial G/D, EM steps updating degradation and fusion parameters from different
  objectives, frozen groups). ``method.step_options`` gives ``param_labels`` (fn params -> label
  tree), ``losses`` ({label: fn(apply_fn, variables, batch, rngs) -> (loss, aux_dict)}; a loss
  may return updated ``batch_stats`` as ``aux["batch_stats"]``) and ``groups`` ({label: config
  overrides or None for frozen}). The gradient of group g is dL_g/dθ_g only: each loss's
  gradient is masked to its own group, which is the stop-gradient between groups; the masked
  gradients are summed and applied by the ``optax.multi_transform`` optimiser in one update.

New kinds register with ``@register_step_kind("name")``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxspec.configs.base import Config
from jaxspec.train import losses as losses_lib
from jaxspec.train import optim

StepFn = Callable[[Any, Mapping[str, jax.Array]], tuple[Any, dict]]
StepBuilder = Callable[[Any, Config, Any], StepFn]

_STEP_BUILDERS: dict[str, StepBuilder] = {}


def register_step_kind(name: str):
    def deco(builder: StepBuilder) -> StepBuilder:
        _STEP_BUILDERS[name] = builder
        return builder
    return deco


def step_kinds() -> list[str]:
    return sorted(_STEP_BUILDERS)


def build_train_step(model, config: Config, method=None) -> StepFn:
    kind = getattr(method, "step_kind", "supervised")
    if kind not in _STEP_BUILDERS:
        raise ValueError(f"unknown step kind {kind!r} for method "
                         f"{getattr(method, 'name', None)!r}; registered: {step_kinds()}")
    return _STEP_BUILDERS[kind](model, config, method)


def make_optimizer_for(config: Config, method=None) -> optax.GradientTransformation:
    """The optimiser a method trains with: per-group for kind ``"groups"``, else one."""
    opts = dict(getattr(method, "step_options", {}) or {})
    if getattr(method, "step_kind", "supervised") == "groups":
        return optim.make_optimizer(config, param_labels=opts["param_labels"],
                                    groups=opts["groups"])
    return optim.make_optimizer(config)


def step_rngs(state, streams) -> dict[str, jax.Array]:
    """Per-step keys: ``fold_in(fold_in(rng, step), i)`` for the i-th stream."""
    base = jax.random.fold_in(state.rng, state.step)
    return {name: jax.random.fold_in(base, i) for i, name in enumerate(streams)}


def _diagnostics(loss, grads, params, lr) -> dict:
    return {"loss": loss, "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params), "lr": jnp.asarray(lr, jnp.float32)}


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(config: Config):
    """``config.compute_dtype`` as a dtype; only float32 and bfloat16 are supported."""
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got "
                         f"{config.compute_dtype!r}")
    return jnp.dtype(config.compute_dtype)


def cast_floating(tree, dtype):
    """Cast the floating-point leaves of ``tree`` to ``dtype`` (integer leaves untouched)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a,
        tree)


@register_step_kind("supervised")
def supervised_step(model, config: Config, method=None) -> StepFn:
    """Plain supervised step. With ``compute_dtype="bfloat16"`` (mixed precision) the forward
    and backward passes run on bf16 copies of the float32 parameters and of the RGB batch; the
    loss, the gradients (cast back through ``astype``), the optimizer state and the BatchNorm
    statistics stay float32."""
    loss_fn = losses_lib.get_loss(config.loss)
    schedule = optim.make_schedule(config)
    streams = tuple(getattr(method, "rng_streams", ()) or ())
    cdt = compute_dtype(config)
    mixed = cdt != jnp.float32

    def step(state, batch):
        rngs = step_rngs(state, streams)
        has_bs = bool(state.batch_stats)
        rgb = batch["rgb"].astype(cdt) if mixed else batch["rgb"]

        def objective(params):
            variables = {"params": cast_floating(params, cdt) if mixed else params}
            if has_bs:
                variables["batch_stats"] = state.batch_stats
                pred, new_vars = state.apply_fn(variables, rgb, train=True, rngs=rngs,
                                                mutable=["batch_stats"])
                new_bs = cast_floating(new_vars["batch_stats"], jnp.float32)
            else:
                pred = state.apply_fn(variables, rgb, train=True, rngs=rngs)
                new_bs = state.batch_stats
            return loss_fn(pred.astype(jnp.float32), batch["hsi"]), new_bs

        (loss, new_bs), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        new_state = state.apply_gradients(grads, batch_stats=new_bs)
        return new_state, _diagnostics(loss, grads, new_state.params, schedule(state.step))

    return step


def group_step(param_labels, group_losses: Mapping[str, Callable], schedule=None,
               streams: tuple[str, ...] = ()) -> StepFn:
    """Step in which each labelled group descends its own loss (see module docstring).

    ``group_losses[label](apply_fn, variables, batch, rngs) -> (loss, aux)``. Metrics:
    ``loss`` (sum of the group losses), ``loss/<label>``, ``grad_norm``, ``param_norm``, ``lr``.
    Groups without a loss (e.g. frozen ones) receive zero gradient.
    """

    def step(state, batch):
        rngs = step_rngs(state, streams)
        labels = param_labels(state.params) if callable(param_labels) else param_labels
        total_grads = jax.tree.map(jnp.zeros_like, state.params)
        metrics, total, new_bs = {}, 0.0, state.batch_stats
        for label, lfn in group_losses.items():
            def objective(params, lfn=lfn):
                variables = {"params": params}
                if state.batch_stats:
                    variables["batch_stats"] = state.batch_stats
                loss, aux = lfn(state.apply_fn, variables, batch, rngs)
                return loss, aux

            (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(state.params)
            g = jax.tree.map(lambda gi, lab, label=label: gi if lab == label else jnp.zeros_like(gi),
                             g, labels)
            total_grads = jax.tree.map(jnp.add, total_grads, g)
            if isinstance(aux, Mapping) and "batch_stats" in aux:
                new_bs = aux["batch_stats"]
            metrics[f"loss/{label}"] = loss
            total = total + loss
        new_state = state.apply_gradients(total_grads, batch_stats=new_bs)
        lr = schedule(state.step) if schedule is not None else 0.0
        metrics.update(_diagnostics(total, total_grads, new_state.params, lr))
        return new_state, metrics

    return step


@register_step_kind("groups")
def groups_step(model, config: Config, method=None) -> StepFn:
    if compute_dtype(config) != jnp.float32:
        raise ValueError("compute_dtype='bfloat16' is implemented for the 'supervised' step kind "
                         f"only; method {config.method!r} uses 'groups'")
    opts = dict(getattr(method, "step_options", {}) or {})
    for key in ("param_labels", "losses", "groups"):
        if key not in opts:
            raise ValueError(f"step kind 'groups' needs method.step_options[{key!r}]")
    return group_step(opts["param_labels"], opts["losses"], optim.make_schedule(config),
                      tuple(getattr(method, "rng_streams", ()) or ()))
