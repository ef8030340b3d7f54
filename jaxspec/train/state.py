"""Training state: a pytree of (step, params, opt_state, batch_stats, rng).

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


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any           # {} for models without BatchNorm
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        """Variables for ``model.apply`` (params, plus batch_stats when the model has them)."""
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v

    def apply_gradients(self, grads, **changes) -> "TrainState":
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **changes)

    def to_pytree(self) -> dict:
        """What a checkpoint stores."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "batch_stats": self.batch_stats, "rng": self.rng}

    def from_pytree(self, tree: dict) -> "TrainState":
        return self.replace(**{k: tree[k] for k in
                               ("step", "params", "opt_state", "batch_stats", "rng")})


def init_variables(model, rng, input_shape) -> dict:
    """``model.init`` on a zero RGB batch of ``input_shape`` (B, H, W, 3), train=False."""
    params_rng, dropout_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "dropout": dropout_rng},
                      jnp.zeros(input_shape, jnp.float32), train=False)


def create_train_state(model, tx: optax.GradientTransformation, rng, input_shape,
                       out_sharding=None) -> TrainState:
    """Initialise params / batch_stats / optimiser state under ``jit`` (placed by
    ``out_sharding``, e.g. replicated over the data mesh)."""
    rng = jnp.asarray(rng, jnp.uint32)
    init_rng, state_rng = jax.random.split(rng)

    def init(init_rng, state_rng):
        variables = init_variables(model, init_rng, input_shape)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=variables.get("batch_stats", {}), rng=state_rng,
                          apply_fn=model.apply, tx=tx)

    fn = jax.jit(init, out_shardings=out_sharding) if out_sharding is not None else jax.jit(init)
    return fn(init_rng, state_rng)


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
