"""Train-step builders, one per ``Method.step_kind``.

A builder has the signature ``builder(model, config, method) -> step`` where
``step(state, batch) -> (state, metrics)`` is a *pure* function (``jaxspec.train.loop`` jits
it once with the state donated and the batch sharded over ``'data'``). ``metrics`` holds scalars:
at least ``loss``, ``grad_norm`` (global L2 norm of the gradient), ``param_norm`` (of the new
parameters) and ``lr``.

Every kind goes through the method's task (:mod:`jaxspec.tasks`): the model inputs are the
task's ``input_keys`` (+ ``method.side_inputs`` as keywords), the target ``task.target_key``;
every model-state collection (``state.model_state``: ``batch_stats``, codebook EMA, ...) is
mutable at train time; ``(output, aux)`` model results add ``config.aux_loss_weights[k] *
aux[k]`` (default weight 1) to the loss; ``config.frozen`` parameters get zero updates.

Registered kinds:

* ``"supervised"``: ``loss(model(inputs), target) + sum_k w_k aux_k``; every name in
  ``method.rng_streams`` gets its own key ``fold_in(fold_in(state.rng, step), i)``.
* ``"phases"``: an ordered list of :class:`Phase` (``method.step_options["phases"]``), each
  with its own parameter subtree (path regexes), loss, optimiser (config overrides, own state)
  and repeat count, run in order inside the one jitted step; phase i+1 (and repeat r+1) sees
  the parameters and model state updated by phase i (GAN: D then G; EM: E then M).
* ``"none"``: parameter-free methods; there is nothing to train (the loop only evaluates).
* ``"groups"``: several parameter groups, each trained from **its own loss** by its own
  optimiser (adversarial G/D, EM steps updating degradation and fusion parameters from different
  objectives, frozen groups). ``method.step_options`` gives ``param_labels`` (fn params -> label
  tree), ``losses`` ({label: fn(apply_fn, variables, batch, rngs) -> (loss, aux_dict)}; a loss
  may return updated ``batch_stats`` as ``aux["batch_stats"]``, any collections as
  ``aux["model_state"]``) and ``groups`` ({label: config
  overrides or None for frozen}). The gradient of group g is dL_g/dθ_g only: each loss's
  gradient is masked to its own group, which is the stop-gradient between groups; the masked
  gradients are summed and applied by the ``optax.multi_transform`` optimiser in one update.

New kinds register with ``@register_step_kind("name")``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jaxspec.configs.base import Config
from jaxspec.train import losses as losses_lib
from jaxspec.train import optim
from jaxspec.train.state import variables_of

StepFn = Callable[[Any, Mapping[str, jax.Array]], tuple[Any, dict]]
StepBuilder = Callable[[Any, Config, Any], StepFn]

_STEP_BUILDERS: dict[str, StepBuilder] = {}


def register_step_kind(name: str):
    def deco(builder: StepBuilder) -> StepBuilder:
        _STEP_BUILDERS[name] = builder
        return builder
    return deco


NO_TRAINING = "none"


def step_kinds() -> list[str]:
    return sorted(set(_STEP_BUILDERS) | {NO_TRAINING})


def build_train_step(model, config: Config, method=None) -> StepFn:
    kind = getattr(method, "step_kind", "supervised")
    if kind == NO_TRAINING:
        raise ValueError(f"method {getattr(method, 'name', None)!r} has step_kind 'none' "
                         f"(parameter-free): there is no train step")
    if kind not in _STEP_BUILDERS:
        raise ValueError(f"unknown step kind {kind!r} for method "
                         f"{getattr(method, 'name', None)!r}; registered: {step_kinds()}")
    micro = int(getattr(config, "microbatches", 1) or 1)
    if micro > 1 and kind != "supervised":
        raise ValueError(f"config.microbatches={micro} is only supported by the 'supervised' "
                         f"step kind; method {getattr(method, 'name', None)!r} trains with "
                         f"{kind!r}: use microbatches=1")
    return _STEP_BUILDERS[kind](model, config, method)


def make_optimizer_for(config: Config, method=None) -> optax.GradientTransformation:
    """The optimiser a method trains with: per-group for kind ``"groups"``, one per phase for
    ``"phases"``, else one; ``config.frozen`` parameters get exactly zero updates."""
    opts = dict(getattr(method, "step_options", {}) or {})
    kind = getattr(method, "step_kind", "supervised")
    if kind == "groups":
        tx = optim.make_optimizer(config, param_labels=opts["param_labels"],
                                  groups=opts["groups"])
    elif kind == "phases":
        return phase_optimizers(config, _phases(method))
    else:
        tx = optim.make_optimizer(config)
    return optim.with_frozen(tx, config.frozen)


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


def model_call(task, method, apply_fn, variables, batch, *, rngs=None, collections=(),
               train: bool = True, dtype=None):
    """One forward pass through the task: ``(prediction, aux_losses, new_model_state)``.

    ``collections`` are applied as mutable (their updated trees are returned); ``dtype`` casts
    the floating inputs (mixed precision)."""
    from jaxspec.tasks import split_output
    side = tuple(getattr(method, "side_inputs", ()) or ())
    args, kwargs = task.model_inputs(batch, side)
    if dtype is not None:
        args, kwargs = cast_floating(args, dtype), cast_floating(kwargs, dtype)
    kw = dict(train=train, rngs=rngs or {})
    if collections:
        out, new_vars = apply_fn(variables, *args, **kwargs, mutable=list(collections), **kw)
        new_state = {k: new_vars[k] for k in collections if k in new_vars}
    else:
        out, new_state = apply_fn(variables, *args, **kwargs, **kw), {}
    pred, aux = split_output(out)
    return pred, aux, new_state


def aux_total(aux: Mapping[str, Any], config: Config):
    """sum_k w_k aux_k with ``w_k = config.aux_loss_weights.get(k, 1.0)`` (0 if no aux)."""
    weights = dict(config.aux_loss_weights or {})
    unknown = set(weights) - set(aux)
    if aux and unknown:
        raise ValueError(f"config.aux_loss_weights names {sorted(unknown)} but the model returns "
                         f"the auxiliary losses {sorted(aux)}")
    return sum((float(weights.get(k, 1.0)) * jnp.asarray(v, jnp.float32)
                for k, v in aux.items()), jnp.zeros((), jnp.float32))


def _task_of(method):
    from jaxspec import tasks
    return tasks.of(method) if method is not None else tasks.get("rgb2hsi")


def split_microbatches(batch, n: int):
    """Every leaf (B, ...) -> (n, B / n, ...), micro-batch k = rows ``k, k + n, k + 2n, ...``
    (a reshape (B / n, n, ...) then a swap: contiguous per-device blocks of a batch sharded
    over ``'data'`` stay on their devices)."""
    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % n:
            raise ValueError(f"config.microbatches={n}: every batch entry needs a leading batch "
                             f"axis divisible by {n}; got shape {tuple(x.shape)}")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(grad_fn, params, batch, rngs, n: int):
    """``grad_fn(params, batch, rngs) -> ((loss, (model_state, aux)), grads)``, as
    ``jax.value_and_grad(..., has_aux=True)`` returns it; ``rngs`` a dict of keys.

    Mean loss, aux and gradient of ``grad_fn`` over ``n`` equal micro-batches, one after
    the other in a ``lax.scan`` (only one micro-batch's activations are alive at a time).
    The mean of the micro-batch means is the batch mean, so for a mean-reduced loss the
    gradient is the whole batch's (to float32 rounding); micro-batch k draws its random
    numbers from ``fold_in(key, k)``. ``n == 1`` is ``grad_fn`` on the whole batch (no scan,
    the keys as given)."""
    if n == 1:
        (loss, (_, aux)), g = grad_fn(params, batch, rngs)
        return loss, aux, g

    def body(acc, xs):
        k, mb = xs
        keys = {name: jax.random.fold_in(key, k) for name, key in rngs.items()}
        (loss, (_, aux)), g = grad_fn(params, mb, keys)
        return jax.tree_util.tree_map(jnp.add, acc, (loss, aux, g)), None

    parts = split_microbatches(batch, n)
    (_, (_, aux_shape)), _ = jax.eval_shape(
        lambda: grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], parts), rngs))
    zero = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        (jax.ShapeDtypeStruct((), jnp.float32), aux_shape, params))
    total, _ = jax.lax.scan(body, zero, (jnp.arange(n), parts))
    return jax.tree_util.tree_map(lambda x: x / n, total)


@register_step_kind("supervised")
def supervised_step(model, config: Config, method=None) -> StepFn:
    """Plain supervised step. With ``compute_dtype="bfloat16"`` (mixed precision) the forward
    and backward passes run on bf16 copies of the float32 parameters and of the inputs; the
    loss, the gradients (cast back through ``astype``), the optimizer state and the model state
    (BatchNorm statistics, ...) stay float32."""
    loss_fn = losses_lib.get_loss(config.loss)
    schedule = optim.make_schedule(config)
    streams = tuple(getattr(method, "rng_streams", ()) or ())
    task = _task_of(method)
    cdt = compute_dtype(config)
    mixed = cdt != jnp.float32

    micro = int(getattr(config, "microbatches", 1) or 1)

    def step(state, batch):
        rngs = step_rngs(state, streams)
        collections = tuple(state.model_state)

        def objective(params, batch, rngs):
            variables = variables_of(cast_floating(params, cdt) if mixed else params,
                                     state.model_state)
            pred, aux, new_ms = model_call(task, method, state.apply_fn, variables, batch,
                                           rngs=rngs, collections=collections,
                                           dtype=cdt if mixed else None)
            data_loss = loss_fn(pred.astype(jnp.float32), batch[task.target_key])
            new_ms = cast_floating(new_ms, jnp.float32) if mixed else new_ms
            return data_loss + aux_total(aux, config), ({**state.model_state, **new_ms}, aux)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if micro == 1:
            (loss, (new_ms, aux)), grads = grad_fn(state.params, batch, rngs)
        else:
            if collections:
                raise ValueError(f"config.microbatches={micro} needs a model without mutable "
                                 f"state; this one updates {sorted(collections)} (e.g. BatchNorm "
                                 f"statistics), which would see micro-batches: use "
                                 f"microbatches=1")
            loss, aux, grads = accumulate_gradients(grad_fn, state.params, batch, rngs, micro)
            new_ms = state.model_state
        new_state = state.apply_gradients(grads, model_state=new_ms)
        m = _diagnostics(loss, grads, new_state.params, schedule(state.step))
        m.update({f"aux/{k}": jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        return new_state, m

    return step


# ----------------------------------------------------------------------------- phases
@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a ``"phases"`` step.

    ``params``: regexes on '/'-joined parameter paths selecting the subtree this phase updates
    (``()`` = every parameter); ``loss(apply_fn, variables, batch, rngs) -> (loss, aux)`` with
    ``aux`` a dict of scalars to log, optionally holding ``"model_state"`` (updated
    collections, seen by the next phase and kept); ``optimizer``: config overrides of this
    phase's optimiser (``{"lr": 1e-4, "b1": 0.5}``, ``{}`` = the run's); ``repeat``: how many
    updates of this phase per step (e.g. 5 critic steps)."""
    name: str
    loss: Callable
    params: tuple[str, ...] = ()
    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    repeat: int = 1


def _phases(method) -> tuple[Phase, ...]:
    opts = dict(getattr(method, "step_options", {}) or {})
    phases = tuple(opts.get("phases", ()))
    if not phases:
        raise ValueError(f"step kind 'phases' needs method.step_options['phases'] (a list of "
                         f"jaxspec.train.steps.Phase) for method {getattr(method, 'name', None)!r}")
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names must be unique, got {names}")
    for p in phases:
        if int(p.repeat) < 1:
            raise ValueError(f"phase {p.name!r}: repeat must be >= 1, got {p.repeat}")
    return phases


def _phase_labels(params, phase: Phase, frozen: tuple[str, ...]):
    rules = [(r, "frozen") for r in frozen]
    rules += [(r, "on") for r in phase.params] if phase.params else [("", "on")]
    return optim.label_params(params, rules, default="off")


def phase_transform(config: Config, phase: Phase, params):
    """(optax transform, label tree) of one phase: its optimiser on its subtree, exactly zero
    updates elsewhere and on ``config.frozen``. A phase repeated r times steps its schedule r
    times per train step (the schedule spans ``r * config.steps`` updates)."""
    r = int(phase.repeat)
    cfg = config.replace(**dict(phase.optimizer))
    cfg = cfg.replace(steps=cfg.steps * r, warmup_steps=cfg.warmup_steps * r)
    labels = _phase_labels(params, phase, tuple(config.frozen))
    tx = optax.multi_transform({"on": optim.make_optimizer(cfg), "off": optax.set_to_zero(),
                                "frozen": optax.set_to_zero()}, labels)
    return tx, labels


def phase_optimizers(config: Config, phases: tuple[Phase, ...]) -> optax.GradientTransformation:
    """``init(params) -> {phase name: opt_state}`` (each phase keeps its own state); the
    states are updated phase by phase inside the ``"phases"`` step, not by ``update``."""
    def init(params):
        out = {}
        for p in phases:
            tx, labels = phase_transform(config, p, params)
            if "on" not in jax.tree.leaves(labels):
                raise ValueError(f"phase {p.name!r}: params={list(p.params)} select no "
                                 f"(trainable) parameter")
            out[p.name] = tx.init(params)
        return out

    def update(grads, state, params=None):
        raise ValueError("the phases optimiser state is updated phase by phase by the "
                         "'phases' step, not by tx.update")

    return optax.GradientTransformation(init, update)


@register_step_kind("phases")
def phases_step(model, config: Config, method=None) -> StepFn:
    """Ordered phases in one step (see module docstring). Metrics: ``loss`` (sum of each
    phase's last loss), ``loss/<phase>``, ``<phase>/<aux>``, ``grad_norm`` (of all phases'
    last gradients, each masked to its subtree), ``param_norm``, ``lr`` (the run's schedule)."""
    if compute_dtype(config) != jnp.float32:
        raise ValueError("compute_dtype='bfloat16' is implemented for the 'supervised' step kind "
                         f"only; method {config.method!r} uses 'phases'")
    phases = _phases(method)
    schedule = optim.make_schedule(config)
    streams = tuple(getattr(method, "rng_streams", ()) or ())

    def step(state, batch):
        base_rngs = step_rngs(state, streams)
        params, mstate = state.params, dict(state.model_state)
        opt = dict(state.opt_state)
        metrics, total, sq = {}, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        for i, ph in enumerate(phases):
            tx, labels = phase_transform(config, ph, params)
            for r in range(int(ph.repeat)):
                rngs = {k: jax.random.fold_in(v, 64 * i + r) for k, v in base_rngs.items()}

                def objective(p, ph=ph, rngs=rngs, mstate=mstate):
                    return ph.loss(state.apply_fn, variables_of(p, mstate), batch, rngs)

                (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(params)
                g = jax.tree.map(lambda gi, lab: gi if lab == "on" else jnp.zeros_like(gi),
                                 g, labels)
                upd, opt[ph.name] = tx.update(g, opt[ph.name], params)
                params = optax.apply_updates(params, upd)
                aux = dict(aux or {})
                if "model_state" in aux:
                    mstate = {**mstate, **aux.pop("model_state")}
            metrics[f"loss/{ph.name}"] = loss
            metrics.update({f"{ph.name}/{k}": v for k, v in aux.items()})
            total = total + loss
            sq = sq + optax.global_norm(g) ** 2
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt,
                                  model_state=mstate)
        metrics.update(_diagnostics(total, {}, params, schedule(state.step)))
        metrics["grad_norm"] = jnp.sqrt(sq)
        return new_state, metrics

    return step


def supervised_phase_loss(task, method, config: Config, collections=()):
    """A :class:`Phase` loss = the supervised objective (config.loss on the task target +
    weighted aux losses), updating ``collections`` of the model state."""
    loss_fn = losses_lib.get_loss(config.loss)

    def loss(apply_fn, variables, batch, rngs):
        pred, aux, new_ms = model_call(task, method, apply_fn, variables, batch, rngs=rngs,
                                       collections=collections)
        value = loss_fn(pred.astype(jnp.float32), batch[task.target_key]) + aux_total(aux, config)
        return value, {"model_state": new_ms, **aux}
    return loss


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
        metrics, total, new_ms = {}, 0.0, dict(state.model_state)
        for label, lfn in group_losses.items():
            def objective(params, lfn=lfn):
                loss, aux = lfn(state.apply_fn, variables_of(params, state.model_state), batch,
                                rngs)
                return loss, aux

            (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(state.params)
            g = jax.tree.map(lambda gi, lab, label=label: gi if lab == label else jnp.zeros_like(gi),
                             g, labels)
            total_grads = jax.tree.map(jnp.add, total_grads, g)
            if isinstance(aux, Mapping) and "batch_stats" in aux:
                new_ms["batch_stats"] = aux["batch_stats"]
            if isinstance(aux, Mapping) and "model_state" in aux:
                new_ms.update(aux["model_state"])
            metrics[f"loss/{label}"] = loss
            total = total + loss
        new_state = state.apply_gradients(total_grads, model_state=new_ms)
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
