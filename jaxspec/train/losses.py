"""Training losses on (B, H, W, C) spectral cubes, selected by ``Config.loss``.

All losses reduce to a scalar mean over every element of the batch (the MST++ convention:
the MRAE loss is the mean over N*C*H*W elements, not a mean of per-image means; the two are
equal for equal-sized crops).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

from jaxspec.errors import UsageError

LossFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def mrae_loss(pred, gt, eps: float = 0.0):
    """Mean relative absolute error  L = mean(|pred - gt| / (gt + eps)).

    ``eps=0`` is MST++'s ``Loss_MRAE`` exactly when gt > 0 everywhere (the built-in data floor
    the reflectance so gt > 0). Elements with gt <= 0 (exact zeros in CAVE, Harvard, Chikusei,
    HySpecNet) are left out: the loss is then the mean over the elements with gt > 0 (0 when
    there are none), finite with a finite gradient, instead of inf/nan. The 2024
    ``Loss_MRAE_custom`` variant corresponds to replacing zeros of gt by 1e-8 (``mrae_eps``).
    """
    if eps:
        return jnp.mean(jnp.abs(pred - gt) / (gt + eps))
    pos = gt > 0
    rel = jnp.where(pos, jnp.abs(pred - gt) / jnp.where(pos, gt, 1), 0)
    # counted in floating point: a global batch on a pod slice holds more than 2^31 elements
    # (an int32 count wraps, and comparing it with ``pos.size`` does not even trace); exact
    # below 2^24 elements, relative error ~1e-7 above
    n = jnp.sum(pos, dtype=rel.dtype)
    return jnp.where(jnp.all(pos), jnp.mean(rel), jnp.sum(rel) / jnp.maximum(n, 1))


def mrae_eps_loss(pred, gt):
    """MRAE with zeros of gt replaced by 1e-8 in the denominator (MST++ ``Loss_MRAE_custom``)."""
    denom = jnp.where(gt == 0, 1e-8, gt)
    return jnp.mean(jnp.abs(pred - gt) / denom)


def l1_loss(pred, gt):
    """L = mean(|pred - gt|)."""
    return jnp.mean(jnp.abs(pred - gt))


def mse_loss(pred, gt):
    """L = mean((pred - gt)^2)."""
    return jnp.mean(jnp.square(pred - gt))


def rmse_loss(pred, gt):
    """L = sqrt(mean((pred - gt)^2)) over the whole batch."""
    return jnp.sqrt(jnp.mean(jnp.square(pred - gt)))


def sam_loss(pred, gt, eps: float = 1e-8):
    """Mean spectral angle (radians): mean_pixels arccos(<p, g> / (|p| |g|)), clipped for safety."""
    num = jnp.sum(pred * gt, axis=-1)
    den = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(gt, axis=-1) + eps
    return jnp.mean(jnp.arccos(jnp.clip(num / den, -1.0 + 1e-7, 1.0 - 1e-7)))


def spectral_difference_loss(pred, gt):
    """CCNet's spectral difference loss (its Eq. 15; ``"diff"``), mean over pixels::

        L_diff = mean_pixels (1/C) sum_i sum_{j != i} | |Y_i - Y_j| - |Yhat_i - Yhat_j| |

    ``pred``, ``gt``: ``(..., C)``. The ``C(C-1)`` ordered pairs are twice the ``i < j``
    pairs, which is what is computed (a ``(..., C(C-1)/2)`` gather instead of ``(..., C, C)``).
    """
    c = gt.shape[-1]
    if pred.shape != gt.shape:
        raise ValueError(f"spectral_difference_loss: pred {pred.shape} and gt {gt.shape} differ")
    iu, ju = np.triu_indices(c, k=1)
    d_gt = jnp.abs(gt[..., iu] - gt[..., ju])
    d_pr = jnp.abs(pred[..., iu] - pred[..., ju])
    return 2.0 * jnp.mean(jnp.sum(jnp.abs(d_gt - d_pr), axis=-1)) / c


LOSSES: dict[str, LossFn] = {
    "mrae": mrae_loss,
    "mrae_eps": mrae_eps_loss,
    "l1": l1_loss,
    "mse": mse_loss,
    "rmse": rmse_loss,
    "sam": sam_loss,
    "diff": spectral_difference_loss,
}


def get_loss(name: str) -> LossFn:
    """Loss by name; ``"a+0.1*b"`` sums weighted named losses (e.g. ``"mrae+0.1*sam"``)."""
    if name in LOSSES:
        return LOSSES[name]
    terms = []
    for term in name.split("+"):
        w, _, n = term.strip().rpartition("*")
        n = n.strip()
        if n not in LOSSES:
            raise UsageError(f"unknown config.loss {n!r} in {name!r}; available: {sorted(LOSSES)}")
        try:
            weight = float(w) if w else 1.0
        except ValueError as e:
            raise UsageError(f"bad config.loss weight {w!r} in {name!r}") from e
        terms.append((weight, LOSSES[n]))

    def combined(pred, gt):
        return sum(wt * fn(pred, gt) for wt, fn in terms)

    return combined
