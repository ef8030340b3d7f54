"""Spectral projection ``rgb = hsi @ srf`` (JAX; numpy inputs accepted) and shared validators."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["project", "is_concrete"]


def is_concrete(x) -> bool:
    """True when ``x`` holds values (numpy / concrete jax array), False for a jit/grad tracer."""
    return not isinstance(x, jax.core.Tracer)


def check_finite(x, name: str, fn: str) -> None:
    """Raise ``ValueError`` if a concrete ``x`` has NaN/inf (no-op under tracing)."""
    if is_concrete(x):
        a = np.asarray(x)
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            raise ValueError(f"{fn}: {name} contains NaN or inf (shape {a.shape})")


def check_nonnegative(x, name: str, fn: str, tol: float = 0.0) -> None:
    """Raise ``ValueError`` if a concrete ``x`` has values below ``-tol`` (no-op under tracing)."""
    if is_concrete(x):
        a = np.asarray(x)
        if a.size and a.min() < -tol:
            raise ValueError(f"{fn}: {name} must be non-negative, min is {a.min():g}")


def project(hsi, srf) -> jax.Array:
    """Project spectra through an SRF: ``rgb[..., k] = sum_c hsi[..., c] * srf[c, k]``.

    ``hsi``: ``(..., C)`` spectral values (radiance or reflectance x illuminant), bands last;
    ``srf``: ``(C, K)`` (``K = 3`` for RGB, any ``K`` for multispectral) on the same grid.
    Linear, hence differentiable w.r.t. both arguments; jit-able. float32 output
    ``(..., K)``. Raises ``ValueError`` for rank/band mismatch and (for concrete inputs) NaN.
    The numpy reference is ``NTIRE2020 projectToRGB`` / ``NTIRE2022 projectCube``.
    """
    hsi = jnp.asarray(hsi, dtype=jnp.float32) if not isinstance(hsi, jax.Array) else hsi
    srf = jnp.asarray(srf, dtype=jnp.float32) if not isinstance(srf, jax.Array) else srf
    if hsi.ndim < 1:
        raise ValueError(f"project: hsi must have a band axis (..., C), got shape {hsi.shape}")
    if srf.ndim != 2:
        raise ValueError(f"project: srf must have shape (C, K), got shape {srf.shape}")
    if hsi.shape[-1] != srf.shape[0]:
        raise ValueError(
            f"project: band mismatch, hsi has {hsi.shape[-1]} bands (shape {hsi.shape}) but srf "
            f"has {srf.shape[0]} rows (shape {srf.shape})")
    check_finite(hsi, "hsi", "project")
    check_finite(srf, "srf", "project")
    return jnp.einsum("...c,ck->...k", hsi.astype(jnp.float32), srf.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
