"""Compile-time cost accounting: parameter counts and XLA FLOP counts.

XLA's ``cost_analysis()`` counts a multiply-add as **2** FLOPs (and also counts elementwise
ops, reductions, softmax, GELU, normalisation), whereas most papers in spectral reconstruction
quote fvcore/thop "FLOPs" that are really multiply-accumulates (MACs), often in units of
2**30 (MST++'s ``my_summary``). :func:`count_flops` returns XLA FLOPs; divide by 2 for a
MAC-like figure (see docs/methods/mstpp.md for the comparison).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

__all__ = ["count_params", "count_flops", "cost_analysis"]


def count_params(tree: Any) -> int:
    """Total number of scalar entries in a pytree of arrays (e.g. ``variables['params']``)."""
    return int(sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree)))


def cost_analysis(fn: Callable, *args, **kwargs) -> dict[str, float]:
    """``jax.jit(fn).lower(*args).compile().cost_analysis()`` as a flat dict.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct`` s (nothing is executed). Older JAX
    versions returned a list with one dict per computation; both forms are accepted.
    """
    compiled = jax.jit(fn, **kwargs).lower(*args).compile()
    cost = compiled.cost_analysis()
    if cost is None:
        raise ValueError("this backend's compiler reports no cost analysis")
    if isinstance(cost, (list, tuple)):
        merged: dict[str, float] = {}
        for part in cost:
            for k, v in (part or {}).items():
                merged[k] = merged.get(k, 0.0) + float(v)
        return merged
    return {k: float(v) for k, v in cost.items()}


def count_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs of one call of ``fn(*args)`` as counted by XLA (multiply-add = 2 FLOPs)."""
    cost = cost_analysis(fn, *args, **kwargs)
    if "flops" not in cost:
        raise ValueError(f"cost analysis has no 'flops' entry (keys: {sorted(cost)})")
    return float(cost["flops"])
