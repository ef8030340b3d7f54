"""Training state: a pytree of (step, params, opt_state, model_state, rng).

``model_state`` maps every mutable Flax collection of the model other than ``params``
(``batch_stats``, codebook EMA statistics, ...) to its tree; it is updated by the train steps
(``mutable=list(model_state)``), checkpointed and restored with the rest, and merged into the
variables for ``model.apply`` (:attr:`TrainState.variables`).

``rng`` is a raw ``uint32[2]`` key (``jax.random.PRNGKey``) so the state checkpoints as plain
arrays; step ``t`` derives its randomness as ``fold_in(rng, t)``, so a resumed run draws the
same numbers as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

STATE_KEYS = ("step", "params", "opt_state", "model_state", "rng")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any           # {collection: tree}; {} for models without mutable state
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def batch_stats(self):
        """The ``batch_stats`` collection ({} if the model has none)."""
        return self.model_state.get("batch_stats", {})

    @property
    def variables(self) -> dict:
        """Variables for ``model.apply``: params plus every non-empty model-state collection."""
        return variables_of(self.params, self.model_state)

    def apply_gradients(self, grads, **changes) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

    def to_pytree(self) -> dict:
        """What a checkpoint stores."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "model_state": self.model_state, "rng": self.rng}

    def from_pytree(self, tree: dict) -> "TrainState":
        return self.replace(**{k: tree[k] for k in STATE_KEYS})


def variables_of(params, model_state) -> dict:
    v = {"params": params}
    v.update({k: c for k, c in (model_state or {}).items() if c})
    return v


def split_variables(variables) -> tuple[Any, dict]:
    """Flax variables -> (params, {collection: tree}) (empty params for parameter-free models)."""
    variables = dict(variables)
    params = variables.pop("params", {})
    return params, variables


def init_variables(model, rng, input_shape=None, *, inputs=None, kwargs=None) -> dict:
    """``model.init(..., train=False)`` on zero inputs: ``inputs`` (a tuple of arrays, e.g.
    :meth:`jaxspec.tasks.Task.example_inputs`) or one zero batch of ``input_shape``."""
    params_rng, dropout_rng = jax.random.split(rng)
    if inputs is None:
        inputs = (jnp.zeros(input_shape, jnp.float32),)
    return model.init({"params": params_rng, "dropout": dropout_rng}, *inputs, train=False,
                      **dict(kwargs or {}))


def create_train_state(model, tx: optax.GradientTransformation, rng, input_shape=None,
                       out_sharding=None, *, inputs=None, kwargs=None) -> TrainState:
    """Initialise params / model state / optimiser state under ``jit`` (placed by
    ``out_sharding``, e.g. replicated over the data mesh). Inputs as for
    :func:`init_variables`."""
    rng = jnp.asarray(rng, jnp.uint32)
    init_rng, state_rng = jax.random.split(rng)

    def init(init_rng, state_rng):
        variables = init_variables(model, init_rng, input_shape, inputs=inputs, kwargs=kwargs)
        params, model_state = split_variables(variables)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=model_state, rng=state_rng, apply_fn=model.apply, tx=tx)

    fn = jax.jit(init, out_shardings=out_sharding) if out_sharding is not None else jax.jit(init)
    return fn(init_rng, state_rng)


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def save_variable_tree(path, tree) -> "Path":
    """Save a (nested) Flax variable tree (``{"params": ..., "batch_stats": ...}`` or any
    nested mapping of arrays) as ``.npz`` with ``/``-joined keys; returns the written path."""
    from pathlib import Path

    from flax import traverse_util
    path = Path(path)
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
    return path if path.suffix == ".npz" else path.with_suffix(path.suffix + ".npz")


def load_variable_tree(path, template=None) -> dict:
    """Load an ``.npz`` written by :func:`save_variable_tree` (e.g. user-provided weights of
    one sub-network, read by ``config.init_from`` entries with a ``"file"``). With
    ``template``, every leaf must exist with the template's shape (``ValueError`` names the
    first mismatch); ``FileNotFoundError`` for a missing file."""
    from pathlib import Path

    from flax import traverse_util
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such parameter file {str(p)!r}")
    try:
        with np.load(p) as z:
            flat = {tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files}
    except (ValueError, OSError) as e:   # not an .npz / a pickle we refuse to load
        raise ValueError(f"{p}: not an .npz variable tree ({e})") from None
    if template is not None:
        want = {k: np.shape(v) for k, v in traverse_util.flatten_dict(dict(template)).items()}
        missing = sorted("/".join(k) for k in set(want) - set(flat))
        extra = sorted("/".join(k) for k in set(flat) - set(want))
        if missing or extra:
            raise ValueError(f"{p}: parameter tree does not match: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for k, s in want.items():
            if tuple(flat[k].shape) != tuple(s):
                raise ValueError(f"{p}: {'/'.join(k)} has shape {tuple(flat[k].shape)}, "
                                 f"expected {tuple(s)}")
    return traverse_util.unflatten_dict(flat)
