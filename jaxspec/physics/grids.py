"""Wavelength grids and linear spectral resampling (numpy; used at load / build time).

Conventions: wavelengths in nm, float32 vectors, strictly increasing. The default grid of
the project is :data:`WAVELENGTHS_31` = 400, 410, ..., 700 nm (ARAD-1K, NTIRE 2020, CAVE).
"""
from __future__ import annotations

import numpy as np

__all__ = ["WAVELENGTHS_31", "CHIKUSEI_WAVELENGTHS", "wavelength_grid", "resample",
           "check_wavelengths"]


def wavelength_grid(start: float, stop: float, step: float) -> np.ndarray:
    """Uniform grid ``start, start + step, ..., stop`` (``stop`` inclusive), float32, nm.

    ``(stop - start) / step`` must be a non-negative integer (to 1e-6 relative), so the grid
    really ends at ``stop``: ``wavelength_grid(400, 700, 10)`` has 31 values.
    """
    start, stop, step = float(start), float(stop), float(step)
    if not np.all(np.isfinite([start, stop, step])):
        raise ValueError(f"wavelength_grid: start, stop, step must be finite, got {start}, {stop}, {step}")
    if step <= 0:
        raise ValueError(f"wavelength_grid: step must be > 0 nm, got {step}")
    if stop < start:
        raise ValueError(f"wavelength_grid: stop ({stop}) must be >= start ({start})")
    n = (stop - start) / step
    if abs(n - round(n)) > 1e-6 * max(1.0, n):
        raise ValueError(
            f"wavelength_grid: (stop - start) / step = {n:g} is not an integer "
            f"(start={start}, stop={stop}, step={step}); the grid would not end at stop")
    n = int(round(n))
    return (start + step * np.arange(n + 1, dtype=np.float64)).astype(np.float32)


WAVELENGTHS_31: np.ndarray = wavelength_grid(400.0, 700.0, 10.0)
WAVELENGTHS_31.setflags(write=False)

#: Nominal band centres of the Chikusei airborne HSI (Yokoya & Iwasaki 2016): 128 bands evenly
#: spaced over 363-1018 nm (5.16 nm). The grid of the ``daem_landsat`` SRF.
CHIKUSEI_WAVELENGTHS: np.ndarray = np.linspace(363.0, 1018.0, 128).astype(np.float32)
CHIKUSEI_WAVELENGTHS.setflags(write=False)


def check_wavelengths(wl, name: str = "wavelengths") -> np.ndarray:
    """Validate a wavelength vector: 1-D, finite, >= 1 value, strictly increasing; float64 copy."""
    arr = np.asarray(wl, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D vector of nm values, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN/inf: {arr}")
    if arr.size > 1 and not np.all(np.diff(arr) > 0):
        raise ValueError(f"{name} must be strictly increasing, got {arr}")
    return arr


def resample(values, src_wl, dst_wl, axis: int = -1, extrapolate: str = "constant") -> np.ndarray:
    """Piecewise-linear resampling of spectra from ``src_wl`` to ``dst_wl`` along ``axis``.

    For ``src_wl[i] <= l <= src_wl[i+1]``::

        v(l) = (1 - t) * v_i + t * v_{i+1},   t = (l - src_wl[i]) / (src_wl[i+1] - src_wl[i])

    Outside ``[src_wl[0], src_wl[-1]]``: ``extrapolate="constant"`` holds the end value
    (``v(l) = v_0`` below, ``v_{n-1}`` above; colour-science's default), ``"zero"`` gives 0.
    This is point sampling of the curve at the new band centres (the NTIRE/colour convention),
    not band integration. Returns float32 with ``values.shape[axis]`` replaced by ``len(dst_wl)``.
    """
    if extrapolate not in ("constant", "zero"):
        raise ValueError(f"resample: extrapolate must be 'constant' or 'zero', got {extrapolate!r}")
    src = check_wavelengths(src_wl, "src_wl")
    dst = check_wavelengths(dst_wl, "dst_wl")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0:
        raise ValueError("resample: values must have at least one axis (the spectral axis)")
    if not -v.ndim <= axis < v.ndim:
        raise ValueError(f"resample: axis {axis} out of range for values of shape {v.shape}")
    ax = axis % v.ndim
    if v.shape[ax] != src.size:
        raise ValueError(
            f"resample: values.shape[{axis}] = {v.shape[ax]} does not match len(src_wl) = {src.size}")
    if np.isnan(v).any():
        raise ValueError("resample: values contain NaN")
    v = np.moveaxis(v, ax, -1)
    if src.size == 1:
        out = np.broadcast_to(v, v.shape[:-1] + (dst.size,)).copy()
        if extrapolate == "zero":
            out[..., dst != src[0]] = 0.0
    else:
        idx = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, src.size - 2)
        t = (dst - src[idx]) / (src[idx + 1] - src[idx])
        inside = (dst >= src[0]) & (dst <= src[-1])
        t = np.where(inside, t, np.where(dst < src[0], 0.0, 1.0))
        out = v[..., idx] * (1.0 - t) + v[..., idx + 1] * t
        if extrapolate == "zero":
            out = np.where(inside, out, 0.0)
    return np.moveaxis(out, -1, ax).astype(np.float32)
