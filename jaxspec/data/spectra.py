"""Measured reflectance and illuminant pools on the 31-band grid (400-700 nm, 10 nm).

Everything here is numpy and is computed once per process (``functools.lru_cache``); the
first call imports ``colour`` (~1.3 s) and reads earthlib's ENVI library (~0.2 s), later
calls are free.

Reflectances (all *measured*; see ``docs/spectral_scenes.md`` for citations/licences)
------------------------------------------------------------------------------------
colour-science 0.4.7 (BSD-3):
  * ``SDS_COLOURCHECKERS['ColorChecker N Ohta']`` (24), ``['BabelColor Average']`` (24) ->
    class ``colour_chart``; ``['ISO 17321-1']`` is the Ohta data again and is skipped.
  * ``['PMC']`` (30, Luo 2024 preferred-memory-colour chart: skin, sky, foliage ...) ->
    ``memory_colour``.
  * rawtoaces 190 training patches (``read_training_data_rawtoaces_v1``), clipped at 0 ->
    ``object_patch``.
  * CIE 2017 colour-fidelity TCS (99), CIE 1995 (14) / CIE 2024 (15) TCS -> ``cie_test_colour``.
  * NIST CQS 7.4 / 9.0 Munsell samples (15 + 15) -> ``munsell``.
earthlib 1.1.0 (MIT; upstream ICRAF-ISRIC soil, UCSB urban, JFSP, USGS, specevo libraries):
  the 5261 *measured* spectra of ``spectra.sli`` (columns 0:31 = 400-700 nm), classed by
  LEVEL_2/LEVEL_3 into ``soil``, ``sand_gravel``, ``roofing``, ``pavement``, ``paint_metal``,
  ``npv`` (litter, bark, wood) and ``burned`` (char). The 2000 PROSAIL canopy spectra are
  *modelled*; they are only added (class ``vegetation_modelled``) with ``include_modelled=True``.

All sources sampled on 5 nm or 10 nm grids that contain 400..700/10 are read *at* the grid
points (no interpolation); others are linearly interpolated. Values are clipped to
[0, 1.5] (rawtoaces has -2e-16 entries; a few fluorescent/retro-reflective patches exceed 1).

De-duplication: spectra are visited in the order above and a spectrum is dropped when an
earlier kept one is within ``max_k |r_k - r'_k| < dedupe_tol`` (default 0.004, i.e. below the
repeatability of a spectrophotometer); this removes ISO/Ohta style copies, the CIE 1995 ⊂ 2024
and CQS 7.4 ∩ 9.0 overlaps and near-identical soil replicates.

Illuminants
-----------
* ``daylight``: CIE D-series at a correlated colour temperature T (4000-12000 K),
  S(λ) = S0(λ) + M1 S1(λ) + M2 S2(λ) with x_D from the CIE polynomial in 1/T,
  y_D = -3 x_D² + 2.870 x_D - 0.275,
  M1 = (-1.3515 - 1.7703 x_D + 5.9114 y_D) / (0.0241 + 0.2562 x_D - 0.7341 y_D),
  M2 = (0.0300 - 31.4424 x_D + 30.0717 y_D) / (0.0241 + 0.2562 x_D - 0.7341 y_D).
* ``blackbody``: Planck's law B(λ, T) ∝ λ^-5 / (exp(c2 / (λ T)) - 1), c2 = 1.4388e-2 m·K,
  T in 2500-6500 K.
* ``named``: CIE A, FL1-12, FL3.1-3.15, HP1-5, LED-* from ``colour.SDS_ILLUMINANTS`` and the 56
  measured lamps of ``colour.SDS_LIGHT_SOURCES`` except ``LPS`` (low-pressure sodium is
  monochromatic: one band above 5 % of its peak, spectral recovery is undefined).

Every illuminant is floored at 1 % of its 400-700 nm maximum (an ambient/stray-light floor:
several LED and triphosphor lamps are exactly 0 in some bands, which would make radiance
exactly 0 and MRAE undefined) and then normalised to **unit luminance**:
E(λ) <- E(λ) / Y,  Y = Σ_λ E(λ) ȳ(λ) / Σ_λ ȳ(λ)  (ȳ: CIE 1931 2° on the same grid),
so an equal-energy spectrum E = 1 keeps Y = 1.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

WAVELENGTHS = np.arange(400.0, 701.0, 10.0, dtype=np.float32)
N_BANDS = 31

# Material classes = the per-pixel ``label`` values of spectral_scenes (index = label id).
MATERIAL_CLASSES = (
    "colour_chart",      # 0  Macbeth ColorChecker (Ohta, BabelColor average)
    "memory_colour",     # 1  PMC preferred-memory-colour chart (skin, sky, foliage ...)
    "object_patch",      # 2  rawtoaces 190 training patches (paints, fabrics, natural objects)
    "cie_test_colour",   # 3  CIE 2017 / 1995 / 2024 test colour samples
    "munsell",           # 4  NIST CQS Munsell samples
    "soil",              # 5  ICRAF-ISRIC soils
    "sand_gravel",       # 6  sand, gravel, dirt
    "roofing",           # 7  composite / wood shingle, tile, concrete tile
    "pavement",          # 8  road, sidewalk, parking lot, asphalt, driveway, bridge ...
    "paint_metal",       # 9  urban paint, metal, glass, other built materials
    "npv",               # 10 non-photosynthetic vegetation: litter, bark, wood
    "burned",            # 11 char
    "vegetation_modelled",  # 12 PROSAIL canopy (modelled, opt-in only)
)
CLASS_ID = {name: i for i, name in enumerate(MATERIAL_CLASSES)}

_EXCLUDED_LIGHT_SOURCES = ("LPS",)
ILLUMINANT_FLOOR = 0.01  # fraction of the 400-700 nm maximum


@dataclasses.dataclass(frozen=True)
class ReflectancePool:
    """Aligned reflectance spectra.

    Attributes:
      spectra: float32 (N, 31) reflectance in [0, 1.5] on ``WAVELENGTHS``.
      classes: int32 (N,) index into ``MATERIAL_CLASSES``.
      sources: tuple of N source tags, e.g. ``"colour:Ohta:dark skin"``, ``"earthlib:FS15R_FS4275"``.
    """
    spectra: np.ndarray
    classes: np.ndarray
    sources: tuple

    def __len__(self) -> int:
        return int(self.spectra.shape[0])


@dataclasses.dataclass(frozen=True)
class IlluminantPool:
    """Named illuminants (unit luminance, floored) plus the daylight/blackbody bases.

    Attributes:
      names: tuple of ids such as ``"cie:A"``, ``"cie:FL11"``, ``"lamp:HPS"``.
      spectra: float32 (N, 31).
      families: tuple of N family tags (``"cie_a"``, ``"fluorescent"``, ``"hid"``, ``"led"``,
        ``"lamp"``).
    """
    names: tuple
    spectra: np.ndarray
    families: tuple

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown illuminant {name!r}; known: {list(self.names)[:8]}...") from None


def _on_grid(wavelengths, values) -> np.ndarray:
    """Values of a spectrum (or (n, L) stack, wavelengths along the last axis) on WAVELENGTHS.

    Exact sampling when the source grid contains every target wavelength, linear
    interpolation (constant extrapolation) otherwise.
    """
    wl = np.asarray(wavelengths, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted(wl, WAVELENGTHS)
    idx = np.clip(idx, 0, len(wl) - 1)
    if np.all(np.abs(wl[idx] - WAVELENGTHS) < 1e-6):
        return v[..., idx]
    flat = v.reshape(-1, v.shape[-1])
    out = np.stack([np.interp(WAVELENGTHS, wl, row) for row in flat])
    return out.reshape(v.shape[:-1] + (N_BANDS,))


def _sd_values(sd) -> np.ndarray:
    return _on_grid(sd.wavelengths, sd.values)


def _colour_reflectances():
    import colour
    import colour.characterisation
    import colour.quality
    from colour.quality import cfi2017
    from colour.quality.datasets import SDS_TCS, SDS_VS

    spectra, classes, sources = [], [], []

    def add(values, cls, tag):
        spectra.append(np.asarray(values, np.float64))
        classes.append(CLASS_ID[cls])
        sources.append(tag)

    for chart, tag in (("ColorChecker N Ohta", "Ohta"), ("BabelColor Average", "BabelColor")):
        for patch, sd in colour.SDS_COLOURCHECKERS[chart].items():
            add(_sd_values(sd), "colour_chart", f"colour:{tag}:{patch}")
    for patch, sd in colour.SDS_COLOURCHECKERS["PMC"].items():
        add(_sd_values(sd), "memory_colour", f"colour:PMC:{patch}")
    msd = colour.characterisation.read_training_data_rawtoaces_v1()
    vals = _on_grid(msd.wavelengths, msd.values.T)
    for label, row in zip(msd.labels, vals):
        add(row, "object_patch", f"colour:rawtoaces190:{label}")
    msd = cfi2017.load_TCS_CIE2017(colour.SpectralShape(380, 780, 5))
    vals = _on_grid(msd.wavelengths, msd.values.T)
    for label, row in zip(msd.labels, vals):
        add(row, "cie_test_colour", f"colour:CIE2017TCS:{label}")
    for key in ("CIE 1995", "CIE 2024"):
        for patch, sd in SDS_TCS[key].items():
            add(_sd_values(sd), "cie_test_colour", f"colour:{key}TCS:{patch}")
    for key in ("NIST CQS 7.4", "NIST CQS 9.0"):
        for patch, sd in SDS_VS[key].items():
            add(_sd_values(sd), "munsell", f"colour:{key}:{patch}")
    return spectra, classes, sources


def _earthlib_class(level2: str, level3: str):
    if level2 == "bare":
        return "soil" if level3 == "soil" else "sand_gravel"
    if level2 == "built":
        if level3 in ("comp_shingle", "wood_shingle", "concrete_tile", "tile"):
            return "roofing"
        if level3 in ("road", "sidewalk", "parking_lot", "asphalt", "driveway", "bridge",
                      "gravel", "manhole"):
            return "pavement"
        return "paint_metal"
    if level2 == "npv":
        return "npv"
    if level2 == "burned":
        return "burned"
    if level2 == "vegetation":
        return "vegetation_modelled"
    return None


def _earthlib_reflectances(include_modelled: bool):
    import csv
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("earthlib")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("earthlib is not installed (pip install earthlib==1.1.0)")
    data_dir = Path(spec.origin).parent / "data"
    sli, meta = data_dir / "spectra.sli", data_dir / "spectra.csv"
    for p in (sli, meta):
        if not p.exists():
            raise FileNotFoundError(f"earthlib spectral library file missing: {p}")
    with open(meta, newline="") as f:
        rows = list(csv.DictReader(f))
    n = len(rows)
    data = np.fromfile(sli, dtype="<f4")
    if data.size % n:
        raise ValueError(f"{sli}: {data.size} values is not a multiple of {n} spectra")
    data = data.reshape(n, -1)
    # Band centres 0.40..2.45 um step 0.01 -> the first 31 columns are 400..700 nm.
    vals = data[:, :N_BANDS].astype(np.float64)
    spectra, classes, sources = [], [], []
    for row, v in zip(rows, vals):
        modelled = row.get("LEVEL_4", "") == "simulated" or row["SOURCE"] == "prosail"
        if modelled and not include_modelled:
            continue
        cls = _earthlib_class(row["LEVEL_2"], row["LEVEL_3"])
        if cls is None:
            continue
        spectra.append(v)
        classes.append(CLASS_ID[cls])
        sources.append(f"earthlib:{row['SOURCE']}:{row['LEVEL_3']}:{row['NAME']}")
    return spectra, classes, sources


def _dedupe_fast(spectra: np.ndarray, tol: float) -> np.ndarray:
    """Greedy de-duplication (first occurrence wins) with a sorted-mean pre-filter.

    Two spectra with max-abs difference < tol have means within tol, so only neighbours in
    mean order need to be compared.
    """
    means = spectra.mean(axis=1)
    order = np.argsort(means, kind="stable")
    sorted_means = means[order]
    removed = np.zeros(len(spectra), dtype=bool)
    for i in range(len(spectra)):  # original order: first occurrence wins
        if removed[i]:
            continue
        lo = np.searchsorted(sorted_means, means[i] - tol, side="left")
        hi = np.searchsorted(sorted_means, means[i] + tol, side="right")
        cand = order[lo:hi]
        cand = cand[(cand > i) & ~removed[cand]]
        if cand.size:
            d = np.max(np.abs(spectra[cand] - spectra[i]), axis=1)
            removed[cand[d < tol]] = True
    return np.flatnonzero(~removed)


@functools.lru_cache(maxsize=4)
def reflectance_pool(include_modelled: bool = False, dedupe_tol: float = 0.004) -> ReflectancePool:
    """All measured reflectances on the 31-band grid (cached per argument tuple).

    Args:
      include_modelled: also add earthlib's 2000 PROSAIL canopy spectra (class
        ``vegetation_modelled``); they are simulated, not measured.
      dedupe_tol: max-abs-difference threshold under which a later spectrum counts as a
        duplicate of an earlier one (0 disables de-duplication).
    """
    s1, c1, t1 = _colour_reflectances()
    s2, c2, t2 = _earthlib_reflectances(include_modelled)
    spectra = np.clip(np.stack(s1 + s2), 0.0, 1.5)
    classes = np.asarray(c1 + c2, dtype=np.int32)
    sources = tuple(t1 + t2)
    if dedupe_tol > 0:
        keep = _dedupe_fast(spectra, dedupe_tol)
        spectra, classes = spectra[keep], classes[keep]
        sources = tuple(sources[i] for i in keep)
    spectra = spectra.astype(np.float32)
    spectra.setflags(write=False)
    classes.setflags(write=False)
    return ReflectancePool(spectra=spectra, classes=classes, sources=sources)


@functools.lru_cache(maxsize=1)
def _ybar() -> np.ndarray:
    import colour
    cmf = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]
    return _on_grid(cmf.wavelengths, cmf.values.T)[1]


def normalize_illuminant(e: np.ndarray, floor: float = ILLUMINANT_FLOOR) -> np.ndarray:
    """Floor at ``floor * max`` and scale to unit luminance Y = Σ E ȳ / Σ ȳ (see module doc)."""
    e = np.asarray(e, dtype=np.float64)
    if e.shape[-1] != N_BANDS:
        raise ValueError(f"illuminant must have {N_BANDS} bands, got shape {e.shape}")
    if not np.all(np.isfinite(e)) or np.any(np.max(e, axis=-1) <= 0):
        raise ValueError("illuminant must be finite with a positive maximum")
    e = np.maximum(e, floor * np.max(e, axis=-1, keepdims=True))
    ybar = _ybar()
    y = (e @ ybar) / ybar.sum()
    return (e / y[..., None]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _daylight_basis() -> np.ndarray:
    from colour.colorimetry import SDS_BASIS_FUNCTIONS_CIE_ILLUMINANT_D_SERIES as B
    return np.stack([_sd_values(B[k]) for k in ("S0", "S1", "S2")])


def daylight_xy(cct: float) -> tuple[float, float]:
    """CIE daylight-locus chromaticity for a CCT in [4000, 25000] K (CIE 15:2004)."""
    t = float(cct)
    if not 4000.0 <= t <= 25000.0:
        raise ValueError(f"daylight CCT must be in [4000, 25000] K, got {cct}")
    if t <= 7000.0:
        x = -4.6070e9 / t**3 + 2.9678e6 / t**2 + 0.09911e3 / t + 0.244063
    else:
        x = -2.0064e9 / t**3 + 1.9018e6 / t**2 + 0.24748e3 / t + 0.237040
    y = -3.000 * x * x + 2.870 * x - 0.275
    return x, y


def daylight(cct: float) -> np.ndarray:
    """CIE D-series relative SPD at ``cct`` (K), unit luminance (see module docstring)."""
    x, y = daylight_xy(cct)
    m = 0.0241 + 0.2562 * x - 0.7341 * y
    m1 = (-1.3515 - 1.7703 * x + 5.9114 * y) / m
    m2 = (0.0300 - 31.4424 * x + 30.0717 * y) / m
    s0, s1, s2 = _daylight_basis()
    return normalize_illuminant(s0 + m1 * s1 + m2 * s2)


def blackbody(temperature: float) -> np.ndarray:
    """Planckian radiator at ``temperature`` (K), unit luminance."""
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"blackbody temperature must be > 0 K, got {temperature}")
    lam = WAVELENGTHS.astype(np.float64) * 1e-9
    c2 = 1.4387768775e-2
    b = lam**-5 / np.expm1(c2 / (lam * t))
    return normalize_illuminant(b)


def _family(name: str) -> str:
    if name == "A":
        return "cie_a"
    if name.startswith("FL"):
        return "fluorescent"
    if name.startswith("HP"):
        return "hid"
    if name.startswith("LED"):
        return "led"
    return "lamp"


@functools.lru_cache(maxsize=1)
def illuminant_pool() -> IlluminantPool:
    """Named illuminants (CIE A/FL/HP/LED and the measured lamps), floored and unit-Y."""
    import colour
    names, spectra, families = [], [], []
    for key, sd in colour.SDS_ILLUMINANTS.items():
        if key == "A" or key.startswith(("FL", "HP", "LED")):
            names.append(f"cie:{key}")
            spectra.append(_sd_values(sd))
            families.append(_family(key))
    for key, sd in colour.SDS_LIGHT_SOURCES.items():
        if key in _EXCLUDED_LIGHT_SOURCES:
            continue
        names.append(f"lamp:{key}")
        spectra.append(_sd_values(sd))
        families.append("lamp")
    arr = normalize_illuminant(np.stack(spectra))
    arr.setflags(write=False)
    return IlluminantPool(names=tuple(names), spectra=arr, families=tuple(families))


def illuminant_from_id(illum_id: str) -> np.ndarray:
    """Spectrum for an id produced by the scene generator.

    ``"daylight:6504K"``, ``"blackbody:3200K"`` (temperatures may be fractional) or a named
    id from :func:`illuminant_pool` (``"cie:FL11"``, ``"lamp:HPS"``).
    """
    kind, _, rest = illum_id.partition(":")
    if kind in ("daylight", "blackbody"):
        if not rest.endswith("K"):
            raise ValueError(f"bad illuminant id {illum_id!r}: expected e.g. '{kind}:6500K'")
        t = float(rest[:-1])
        return daylight(t) if kind == "daylight" else blackbody(t)
    pool = illuminant_pool()
    return pool.spectra[pool.index(illum_id)]


def split_pool(pool: ReflectancePool, seed: int = 20240611,
               fractions=(0.70, 0.15, 0.15)) -> dict[str, np.ndarray]:
    """Disjoint train/validation/test reflectance index sets, stratified by class.

    Within each class the indices are permuted by ``np.random.default_rng([seed, class_id])``
    and cut at the cumulative ``fractions``; a class with fewer than 3 members goes entirely
    to train. Returns ``{"train", "validation", "test"}`` -> sorted int64 index arrays.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    out = {"train": [], "validation": [], "test": []}
    for c in np.unique(pool.classes):
        idx = np.flatnonzero(pool.classes == c)
        if idx.size < 3:
            out["train"].append(idx)
            continue
        perm = np.random.default_rng([seed, int(c)]).permutation(idx)
        n_val = max(1, int(round(fractions[1] * idx.size)))
        n_test = max(1, int(round(fractions[2] * idx.size)))
        n_train = idx.size - n_val - n_test
        out["train"].append(perm[:n_train])
        out["validation"].append(perm[n_train:n_train + n_val])
        out["test"].append(perm[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in out.items()}
