"""Train-state fixtures shared by the per-method tests (one real step of every ablation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.train import optim
from jaxspec.train.state import TrainState


def random_state(model, cfg, input_shape=(1, 16, 16, 3), seed: int = 0, std: float = 0.2,
                 rngs=None, tx=None):
    """A train state whose parameters are drawn on the host (``eval_shape`` + numpy, N(0, std)):
    the initialisers' random-number kernels take longer to compile than a whole tiny step.
    ``rngs``: extra PRNG streams ``init`` needs (e.g. ``("mask",)``); ``tx``: the optimiser
    (default ``optim.make_optimizer(cfg)``; ``steps.make_optimizer_for`` honours ``frozen``)."""
    keys = {"params": jax.random.PRNGKey(0), **{s: jax.random.PRNGKey(1) for s in rngs or ()}}
    shapes = jax.eval_shape(model.init, keys, jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype),
                          shapes["params"])
    tx = tx if tx is not None else optim.make_optimizer(cfg)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state={}, rng=jax.random.PRNGKey(seed), apply_fn=model.apply, tx=tx)
