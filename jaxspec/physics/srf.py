"""Spectral response functions (SRFs) of RGB cameras and observers: library, loaders, registry.

Every SRF is a float32 array ``S`` of shape ``(n_bands, 3)`` sampled on a wavelength grid
(default :data:`~jaxspec.physics.grids.WAVELENGTHS_31`), columns R, G, B, so that an RGB pixel
is ``rgb = spectrum @ S`` (see :func:`jaxspec.physics.project`).

Normalisation (one convention, used everywhere; ``normalize=`` argument):

* ``"sum_g"`` (default): one scalar for all three channels, ``S <- S / sum_l S_G(l)``, so a flat
  unit spectrum gives G = 1 on the requested grid and R/G/B ratios (the camera's white balance)
  are kept. For the CIE observers this is ``Y = 1`` for the equal-energy spectrum.
* ``"peak"``: ``S <- S / max_{l,c} S_c(l)`` (global peak 1; channel ratios kept).
* ``None``: the curve as measured / published, only resampled.

Curves are point-sampled at the grid wavelengths by linear interpolation; outside a curve's
measured range the end value is held (``extrapolate="constant"``), e.g. Sigma SD Merrill at
690/700 nm. The colour-science data are loaded lazily (``import colour`` costs ~1 s).
"""
from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from jaxspec.physics.grids import CHIKUSEI_WAVELENGTHS, WAVELENGTHS_31, check_wavelengths, resample

__all__ = [
    "get_srf", "list_srfs", "register_srf", "unregister_srf", "normalize_srf", "load_srf_csv",
    "parse_camspec_database", "load_ntire2022_rgb_qe", "NTIRE2022_RGB_GAINS", "NORMALIZATIONS",
]

NORMALIZATIONS = ("sum_g", "peak", None)
#: Analog channel gains of the NTIRE 2022 challenge code (``Conf.ANALOG_CHANNEL_GAIN``), R, G, B.
NTIRE2022_RGB_GAINS = np.array([2.2933984, 1.0, 1.62308182], dtype=np.float64)


# ----------------------------------------------------------------------------- normalisation
def normalize_srf(srf, normalize: str | None = "sum_g") -> np.ndarray:
    """Scale an SRF ``(n_bands, 3)`` by one scalar: ``"sum_g"`` -> sum of G column = 1,
    ``"peak"`` -> global maximum = 1, ``None`` -> unchanged. Returns float32."""
    s = _check_srf_array(srf, "srf")
    if normalize is None:
        return s.astype(np.float32)
    if normalize == "sum_g":
        denom = float(s[:, 1].sum())
        what = "the green channel sums to"
    elif normalize == "peak":
        denom = float(s.max())
        what = "the peak is"
    else:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if not denom > 0:
        raise ValueError(f"cannot normalise SRF: {what} {denom} on this grid (must be > 0)")
    return (s / denom).astype(np.float32)


def _check_srf_array(arr, name: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape (n_bands, 3) (columns R, G, B), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


# ----------------------------------------------------------------------------- built-in curves
# Each loader returns (wavelengths_nm, values (n, 3)) at the source's native sampling.
def _colour_msds(msds) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(msds.wavelengths, np.float64), np.asarray(msds.values, np.float64)


def _cie1964():
    import colour
    return _colour_msds(colour.MSDS_CMFS["CIE 1964 10 Degree Standard Observer"])


def _cie1931():
    import colour
    return _colour_msds(colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"])


def _nikon_d5100():
    import colour
    return _colour_msds(colour.MSDS_CAMERA_SENSITIVITIES["Nikon 5100 (NPL)"])


def _sigma_sd_merrill():
    import colour
    return _colour_msds(colour.MSDS_CAMERA_SENSITIVITIES["Sigma SDMerill (NPL)"])


def _canon_5d_mk2():
    import colour
    from colour.characterisation import aces_it
    path = os.path.join(aces_it.ROOT_RESOURCES_RAWTOACES, "CANON_EOS_5DMark_II_RGB_Sensitivities.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"colour-science rawtoaces file not found: {path}")
    sds = colour.io.read_sds_from_csv_file(path)
    wl = np.asarray(sds["R"].wavelengths, np.float64)
    vals = np.stack([np.asarray(sds[c].values, np.float64) for c in ("R", "G", "B")], axis=1)
    return wl, vals


def _daem_nikon():
    # The Nikon SRF of the HSI-MSI fusion literature, as DAEM ships it
    # (Degradation_params/srf/Nikon_srf.mat, 31 x 3 on 400-700/10 nm). The table is a
    # digitisation: each column is integer counts over a column total (200, 164, 209), so every
    # column sums to 1. The file's column order is B, G, R; stored here as R, G, B.
    b = np.r_[[5, 7, 12, 15, 23, 25, 30, 26, 24, 19, 10, 4], np.zeros(19)] / 200.0
    g = np.r_[np.zeros(5), [1, 2, 3, 5, 7, 12, 13, 15, 16, 17, 20, 13, 11, 9, 5],
              np.ones(8), [2, 2, 3]] / 164.0
    r = np.r_[np.zeros(16), [1, 3, 10, 12, 13, 22, 20, 20, 18, 17, 16, 16, 14, 14, 13]] / 209.0
    return WAVELENGTHS_31.astype(np.float64), np.stack([r, g, b], axis=1)


# DAEM's Degradation_params/srf/landsat_srf.mat (128 x 3, key "data"): Landsat-8 OLI bands 1-3
# (coastal 435-451, blue 452-512, green 533-590 nm) on the Chikusei grid, non-zero on bands
# 12-47 only, each column summing to 1. (first band index, values) per column, 6 significant
# digits; its one negative interpolation artefact (-2.4e-5, band 47) is dropped (set to 0).
_DAEM_LANDSAT = (
    (12, (0.000864593, 0.103597, 0.302902, 0.312543, 0.256436, 0.0236578)),
    (14, (1.38228e-05, 0.000145513, 0.00420606, 0.0575764, 0.0803303, 0.0782889, 0.0782998,
          0.0751152, 0.0799608, 0.0841406, 0.0864025, 0.086787, 0.0862736, 0.0863968, 0.0868366,
          0.0290038, 0.000202207, 2.00413e-05)),
    (29, (1.22787e-05, 0.000129131, 0.000749162, 0.00842293, 0.0611898, 0.0854384, 0.0862461,
          0.0880527, 0.0867286, 0.0854938, 0.0860188, 0.0870651, 0.0869172, 0.0866707, 0.086607,
          0.0582641, 0.00594714, 7.15516e-05)),
)


def _daem_landsat():
    vals = np.zeros((CHIKUSEI_WAVELENGTHS.size, 3))
    for c, (start, col) in enumerate(_DAEM_LANDSAT):
        vals[start:start + len(col), c] = col
    return CHIKUSEI_WAVELENGTHS.astype(np.float64), vals


_BUILTIN: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], str]] = {
    "cie1964": (_cie1964, "CIE 1964 10-degree CMFs x,y,z used as R,G,B (NTIRE 2020 Clean convention)"),
    "cie1931": (_cie1931, "CIE 1931 2-degree CMFs x,y,z used as R,G,B"),
    "nikon_d5100": (_nikon_d5100, "Nikon D5100, NPL (Darrodi et al. 2015), colour-science"),
    "sigma_sd_merrill": (_sigma_sd_merrill, "Sigma SD Merrill, NPL, 400-680 nm, held constant above"),
    "canon_5d_mk2": (_canon_5d_mk2, "Canon EOS 5D Mark II, rawtoaces (AMPAS) via colour-science"),
    "daem_nikon": (_daem_nikon, "Nikon SRF of the HSI-MSI fusion protocols (DAEM Nikon_srf.mat), R,G,B"),
    "daem_landsat": (_daem_landsat, "Landsat-8 OLI bands 1-3 on the 128-band Chikusei grid "
                                    "(DAEM landsat_srf.mat); columns coastal, blue, green"),
}
#: Default grid of each built-in whose native grid is not WAVELENGTHS_31 (``get_srf(name)``
#: without ``wavelengths`` returns the curve on this grid, i.e. with its own band count).
_DEFAULT_GRID: dict[str, np.ndarray] = {"daem_landsat": CHIKUSEI_WAVELENGTHS}
_USER: dict[str, tuple[np.ndarray, np.ndarray]] = {}


@functools.lru_cache(maxsize=None)
def _builtin_native(name: str) -> tuple[np.ndarray, np.ndarray]:
    wl, vals = _BUILTIN[name][0]()
    return wl, vals


def list_srfs() -> list[str]:
    """Names accepted by :func:`get_srf`: the built-ins then registered user curves (sorted)."""
    return list(_BUILTIN) + sorted(_USER)


def register_srf(name: str, array, wavelengths=WAVELENGTHS_31, *, overwrite: bool = False) -> None:
    """Register a user SRF ``array`` ``(n, 3)`` sampled at ``wavelengths`` (nm) under ``name``.

    The raw curve is stored; :func:`get_srf` resamples and normalises it like a built-in.
    Built-in names cannot be replaced; an existing user name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_srf: name must be a non-empty string, got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"register_srf: {name!r} is a built-in SRF and cannot be replaced")
    if name in _USER and not overwrite:
        raise ValueError(f"register_srf: {name!r} is already registered (pass overwrite=True)")
    a = _check_srf_array(array, "register_srf: array")
    wl = check_wavelengths(wavelengths, "register_srf: wavelengths")
    if wl.size != a.shape[0]:
        raise ValueError(
            f"register_srf: array has {a.shape[0]} bands but wavelengths has {wl.size} values")
    if (a < 0).any():
        raise ValueError(f"register_srf: {name!r} has negative responses (min {a.min():g})")
    _USER[name] = (wl.copy(), a.copy())


def unregister_srf(name: str) -> None:
    """Remove a user-registered SRF (built-ins cannot be removed)."""
    if name not in _USER:
        raise ValueError(f"unregister_srf: {name!r} is not a registered user SRF")
    del _USER[name]


def get_srf(name: str, wavelengths=None, normalize: str | None = "sum_g") -> np.ndarray:
    """SRF ``name`` on ``wavelengths`` as float32 ``(len(wavelengths), 3)``, columns R, G, B
    (for the multispectral ``daem_landsat``: OLI bands coastal, blue, green).

    ``S[l, c] = normalize(interp_linear(curve_c, l))`` with constant extrapolation beyond the
    measured range; see the module docstring for ``normalize`` (default ``"sum_g"``: a flat
    unit spectrum projects to G = 1). ``wavelengths=None`` is :data:`WAVELENGTHS_31`, except
    for curves defined on another sensor's bands (``daem_landsat``: the 128-band
    :data:`CHIKUSEI_WAVELENGTHS`). Names: :func:`list_srfs`.
    """
    if wavelengths is None:
        wavelengths = _DEFAULT_GRID.get(name, WAVELENGTHS_31)
    if name in _BUILTIN:
        src_wl, vals = _builtin_native(name)
    elif name in _USER:
        src_wl, vals = _USER[name]
    else:
        raise ValueError(f"get_srf: unknown SRF {name!r}; available: {list_srfs()}")
    wl = check_wavelengths(wavelengths, "get_srf: wavelengths")
    s = resample(vals, src_wl, wl, axis=0, extrapolate="constant")
    return normalize_srf(np.clip(s, 0.0, None), normalize)


# ----------------------------------------------------------------------------- file loaders
def _check_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"SRF file not found: {p}")
    if not p.is_file():
        raise ValueError(f"SRF path is not a regular file: {p}")
    return p


def _finish(wl, vals, wavelengths, normalize, src: Path) -> np.ndarray:
    wl = np.asarray(wl, np.float64)
    if wl.size > 1 and not np.all(np.diff(wl) > 0):
        raise ValueError(f"{src}: wavelengths are not strictly increasing")
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"{src}: contains NaN/inf responses")
    dst = check_wavelengths(wavelengths, "wavelengths")
    s = resample(np.asarray(vals, np.float64), wl, dst, axis=0, extrapolate="constant")
    return normalize_srf(np.clip(s, 0.0, None), normalize)


_SPLIT = re.compile(r"[,\s;]+")


def load_srf_csv(path, wavelengths=WAVELENGTHS_31, normalize: str | None = "sum_g") -> np.ndarray:
    """Read an SRF text file with columns ``wl, R, G, B`` and resample it to ``wavelengths``.

    Comma, semicolon or whitespace separated; ``#`` comment lines, blank lines and one optional
    non-numeric header line are skipped (e.g. the butcherg ``ssf_data`` CSVs). Missing file ->
    ``FileNotFoundError``; a non-numeric row after data started, or a row without 4 columns ->
    ``ValueError`` naming the file and line.
    """
    p = _check_file(path)
    rows: list[list[float]] = []
    header_seen = False
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = [f for f in _SPLIT.split(line) if f]
            try:
                nums = [float(f) for f in fields]
            except ValueError:
                if rows or header_seen:
                    raise ValueError(f"{p}:{lineno}: non-numeric row {line[:60]!r}") from None
                header_seen = True
                continue
            if len(nums) < 4:
                raise ValueError(f"{p}:{lineno}: expected 4 columns wl,R,G,B, got {len(nums)}")
            rows.append(nums[:4])
    if len(rows) < 2:
        raise ValueError(f"{p}: needs at least 2 data rows of wl,R,G,B, found {len(rows)}")
    a = np.asarray(rows, np.float64)
    return _finish(a[:, 0], a[:, 1:4], wavelengths, normalize, p)


#: Native sampling of the Jiang et al. (2013) database: 400-720 nm, 10 nm, 33 values.
CAMSPEC_WAVELENGTHS = np.arange(400.0, 721.0, 10.0)


def parse_camspec_database(path, wavelengths=WAVELENGTHS_31,
                           normalize: str | None = "sum_g") -> dict[str, np.ndarray]:
    """Parse Jiang et al. (WACV 2013) ``camspec_database.txt`` into ``{camera: (n, 3)}``.

    Format: per camera a name line (starts with a letter) then three lines R, G, B of 33
    tab-separated values at 400-720 nm / 10 nm. Blank lines, header text and a stray line are
    tolerated: a line starting with a letter opens a new record; records that collect no numeric
    rows (URLs, headers) are dropped; other non-numeric lines (e.g. ``400nm-720nm, step 10nm``,
    ``-----``) are ignored. A record with != 3 numeric rows or a row with != 33 values raises
    ``ValueError`` naming the file and line. Curves are resampled to ``wavelengths`` (columns
    0-30 for the default 400-700 grid) and normalised with ``normalize``.
    """
    p = _check_file(path)
    records: list[tuple[str, int, list[tuple[int, list[float]]]]] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.strip()
            if not line:
                continue
            if line[0].isalpha():
                records.append((line, lineno, []))
                continue
            fields = [f for f in re.split(r"[\t ,]+", line) if f]
            try:
                nums = [float(f) for f in fields]
            except ValueError:
                continue  # stray non-numeric text line
            if not records:
                raise ValueError(f"{p}:{lineno}: numeric row before any camera name line")
            if len(nums) != CAMSPEC_WAVELENGTHS.size:
                raise ValueError(
                    f"{p}:{lineno}: expected {CAMSPEC_WAVELENGTHS.size} values (400-720 nm / 10 nm), "
                    f"got {len(nums)}")
            records[-1][2].append((lineno, nums))
    out: dict[str, np.ndarray] = {}
    for name, lineno, rows in records:
        if not rows:
            continue  # header / URL line
        if len(rows) != 3:
            raise ValueError(
                f"{p}:{lineno}: camera {name!r} has {len(rows)} R/G/B rows, expected 3")
        if name in out:
            raise ValueError(f"{p}:{lineno}: duplicate camera name {name!r}")
        vals = np.asarray([r for _, r in rows], np.float64).T  # (33, 3)
        out[name] = _finish(CAMSPEC_WAVELENGTHS, vals, wavelengths, normalize, p)
    if not out:
        raise ValueError(f"{p}: no camera records found (name line + 3 rows of 33 values)")
    return out


def load_ntire2022_rgb_qe(path, wavelengths=WAVELENGTHS_31, apply_gains: bool = True,
                          normalize: str | None = "sum_g", green: str = "mean") -> np.ndarray:
    """Read the NTIRE 2022 ``RGB_Camera_QE.csv`` (``Wavelength[nm],R,G1,G2,B``, 360-750/1 nm).

    ``G = (G1 + G2) / 2`` (``green="mean"``; the challenge code uses ``green="G1"``, which
    differs by < 1e-2 of the peak). With ``apply_gains`` the challenge's analog gains
    :data:`NTIRE2022_RGB_GAINS` = [2.2933984, 1, 1.62308182] multiply R, G, B. The challenge
    projects with the raw (``normalize=None``) curve on cubes in [0, 1]; the default here is the
    project-wide ``"sum_g"``.
    """
    if green not in ("mean", "G1", "G2"):
        raise ValueError(f"load_ntire2022_rgb_qe: green must be 'mean', 'G1' or 'G2', got {green!r}")
    p = _check_file(path)
    with open(p, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{p}:1: empty file") from None
        need = ["Wavelength[nm]", "R", "G1", "G2", "B"]
        missing = [c for c in need if c not in header]
        if missing:
            raise ValueError(f"{p}:1: header {header} lacks columns {missing}")
        cols = [header.index(c) for c in need]
        rows = []
        for lineno, rec in enumerate(reader, start=2):
            if not rec or all(not f.strip() for f in rec):
                continue
            try:
                rows.append([float(rec[c]) for c in cols])
            except (ValueError, IndexError):
                raise ValueError(f"{p}:{lineno}: malformed row {','.join(rec)[:80]!r}") from None
    if len(rows) < 2:
        raise ValueError(f"{p}: needs at least 2 data rows, found {len(rows)}")
    a = np.asarray(rows, np.float64)
    g = {"mean": 0.5 * (a[:, 2] + a[:, 3]), "G1": a[:, 2], "G2": a[:, 3]}[green]
    vals = np.stack([a[:, 1], g, a[:, 4]], axis=1)
    if apply_gains:
        vals = vals * NTIRE2022_RGB_GAINS
    return _finish(a[:, 0], vals, wavelengths, normalize, p)
