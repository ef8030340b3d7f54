"""Spectral projection ``rgb = hsi @ srf`` (JAX; numpy inputs accepted) and shared validators."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["project", "make_consistent", "is_concrete"]


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


def make_consistent(hsi, rgb, srf) -> jax.Array:
    """The spectra nearest to ``hsi`` (per pixel, Euclidean) that reproduce ``rgb`` exactly
    through ``srf``: ``hsi + (rgb - hsi @ srf) (S^T S)^{-1} S^T`` with ``S = srf`` -- the
    orthogonal projection onto the affine set ``{r : r @ S = rgb}`` ("physically plausible"
    spectral reconstruction, Lin & Finlayson, Sensors 2020). It changes only the part of each
    spectrum the camera sees (the metameric black, ``hsi``'s null-space part, stays), so it is
    right when ``rgb`` is the linear projection of the spectra through ``srf`` (linear data
    rendered through a known SRF), and wrong for gamma-encoded or differently normalised RGB.

    ``hsi`` ``(..., C)``, ``rgb`` ``(..., K)``, ``srf`` ``(C, K)`` with ``K <= C`` of full column
    rank. float32 output of ``hsi``'s shape; jit-able and differentiable."""
    srf = jnp.asarray(srf, jnp.float32)
    rgb = jnp.asarray(rgb, jnp.float32)
    seen = project(hsi, srf)
    if rgb.shape != seen.shape:
        raise ValueError(f"make_consistent: rgb has shape {rgb.shape}, but the spectra of shape "
                         f"{tuple(jnp.shape(hsi))} project through srf {srf.shape} to {seen.shape}")
    hi = jax.lax.Precision.HIGHEST
    gram = jnp.matmul(srf.T, srf, precision=hi)                        # (K, K)
    lift = jnp.linalg.solve(gram, srf.T)                                # (K, C)
    return jnp.asarray(hsi, jnp.float32) + jnp.matmul(rgb - seen, lift, precision=hi)
