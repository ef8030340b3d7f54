"""Seeded generator of synthetic hyperspectral scenes made from *measured* spectra.

Each example is a function of its key only:
``rng = np.random.default_rng([seed, SPLIT_IDS[split], index])`` drives every random choice,
so ``generate_scene(seed, split, index, ...)`` returns bit-identical arrays on every call.

Image formation (per pixel x, per band λ; a dichromatic reflection model, Shafer 1985)::

    L(x, λ) = k · [ s(x) · R(x, λ) + h(x) ] · E(x, λ)
    E(x, λ) = m(x) · E1(λ) + (1 - m(x)) · a · E2(λ)          (single illuminant: m = 1)

* ``R`` diffuse reflectance: a dead-leaves stack of occluding objects over a backdrop
  (wall + floor, or a textured ground). Object sizes follow the scale-invariant dead-leaves
  law p(r) ∝ r^-α on [r_min, r_max] (α = 2.3; 3 is exactly scale invariant, smaller α
  gives more mid-sized objects, which reads more like a photograph); shapes are discs/ellipses, rotated rectangles, convex
  polygons, organic "blobs" (radius perturbed by a Fourier series) and colour charts (a grid
  of patches on a dark body). Every object has a material: a single spectrum, or 2-3 spectra
  of one class mixed by a random abundance field whose statistics depend on the class
  (smooth mottling, granular grain for soil/sand/pavement, oriented fibres for npv, shingle
  stripes for roofing, printed stripes/checks for man-made objects). Edges are anti-aliased
  from a signed distance with a random defocus width, and R is finally blurred by a small
  Gaussian (optics). R is floored at ``REFLECTANCE_FLOOR = 1e-3`` so the radiance is never 0
  (MRAE divides by the ground truth).
* ``s`` shading: per-object Lambertian shading of a bulged surface (sphere/dome/cylinder/flat)
  under one key-light direction with an ambient term, times a low-frequency global field
  (smooth log-normal noise, linear gradient, vignetting). ``s`` ≥ 0.05.
* ``h`` specular highlights (Blinn-Phong, glossy objects only): neutral interface reflection,
  so highlights take the colour of the illuminant — a spatial cue to the illuminant that a
  per-pixel method cannot use.
* ``E1, E2`` unit-luminance illuminants (``jaxspec.data.spectra``): daylight 4000-12000 K,
  blackbody 2500-6500 K, CIE A/FL/HP/LED or a measured lamp. With probability ``p_second``
  a second illuminant enters either as a cast shadow (soft-edged region lit by skylight
  at attenuation a ∈ [0.15, 0.6]) or as a smooth spatial gradient (window light + lamp).
* ``k`` per-scene exposure: ``k = 0.9 / P99.9(L)``, so 99.9 % of the radiance values are
  ≤ 0.9 (ARAD-1K's cubes are normalised to about [0, 1]); a few highlights may exceed 1.

The per-pixel ``label`` is the material class (``spectra.MATERIAL_CLASSES``) of the material
with the largest compositing weight at that pixel.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from scipy import ndimage

from jaxspec.data import spectra as _sp

GENERATOR_VERSION = "1.0.0"
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
REFLECTANCE_FLOOR = 1e-3
SHADING_FLOOR = 0.05
EXPOSURE_PERCENTILE = 99.9
EXPOSURE_TARGET = 0.9

# Relative probability of choosing a class for an object's material (then uniform within).
CLASS_WEIGHTS = {
    "colour_chart": 0.8, "memory_colour": 1.0, "object_patch": 1.6, "cie_test_colour": 1.4,
    "munsell": 0.6, "soil": 1.2, "sand_gravel": 0.5, "roofing": 0.8, "pavement": 0.8,
    "paint_metal": 1.0, "npv": 1.0, "burned": 0.3, "vegetation_modelled": 1.0,
}
# Texture styles per class: (style, probability).
_TEXTURES = {
    "soil": (("granular", 0.6), ("smooth", 0.3), ("uniform", 0.1)),
    "sand_gravel": (("granular", 0.8), ("smooth", 0.2)),
    "pavement": (("granular", 0.6), ("smooth", 0.3), ("uniform", 0.1)),
    "roofing": (("stripes", 0.6), ("granular", 0.3), ("uniform", 0.1)),
    "npv": (("fibres", 0.7), ("smooth", 0.3)),
    "burned": (("granular", 0.5), ("smooth", 0.5)),
    "vegetation_modelled": (("smooth", 0.6), ("granular", 0.4)),
    "paint_metal": (("uniform", 0.6), ("smooth", 0.2), ("stripes", 0.2)),
    "memory_colour": (("uniform", 0.5), ("smooth", 0.5)),
}
_TEXTURES_DEFAULT = (("uniform", 0.45), ("smooth", 0.25), ("stripes", 0.2), ("checks", 0.1))


@dataclasses.dataclass(frozen=True)
class SceneConfig:
    """Geometry/illumination knobs of the generator (all part of the example's ``params``)."""
    height: int = 128
    width: int = 128
    n_objects: tuple = (8, 28)         # per 128x128; scaled by area^0.5
    size_range: tuple = (0.03, 0.42)   # dead-leaves radius range as a fraction of min(H, W)
    p_chart: float = 0.25              # probability that one object is a colour chart
    p_second: float = 0.5              # probability of a second illuminant
    p_glossy: float = 0.35
    p_ground: float = 0.25             # textured top-down ground instead of wall + floor
    illuminant_mix: tuple = (("daylight", 0.5), ("blackbody", 0.2), ("named", 0.3))

    def __post_init__(self):
        if self.height < 8 or self.width < 8:
            raise ValueError(f"scene size must be >= 8x8, got {self.height}x{self.width}")


@dataclasses.dataclass
class Scene:
    """One generated example. ``hsi`` = scaled radiance (float32, H×W×31, > 0)."""
    hsi: np.ndarray
    reflectance: np.ndarray
    label: np.ndarray
    illuminants: list
    params: dict

    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- helpers

def _choice(rng, options):
    names = [o[0] for o in options]
    p = np.asarray([o[1] for o in options], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _smooth_noise(rng, shape, sigma):
    """Zero-mean, unit-std Gaussian random field with correlation length ~sigma (px)."""
    z = rng.standard_normal(shape)
    if np.isscalar(sigma):
        sigma = (sigma, sigma)
    z = ndimage.gaussian_filter(z, sigma, mode="wrap")
    s = z.std()
    return (z - z.mean()) / (s if s > 0 else 1.0)


def _power_law(rng, lo, hi, alpha=2.3):
    """Sample r with density ∝ r^-alpha on [lo, hi] (inverse CDF)."""
    u = rng.random()
    a = 1.0 - alpha
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


class _Sampler:
    """Draws material spectra (pool indices) of a split, class-weighted."""

    def __init__(self, pool, allowed):
        self.pool = pool
        self.by_class = {}
        for c in np.unique(pool.classes[allowed]):
            self.by_class[int(c)] = allowed[pool.classes[allowed] == c]
        names = [_sp.MATERIAL_CLASSES[c] for c in self.by_class]
        w = np.asarray([CLASS_WEIGHTS.get(n, 1.0) for n in names], float)
        self.classes = np.asarray(list(self.by_class), int)
        self.p = w / w.sum()
        means = pool.spectra[allowed].mean(axis=1)
        self.dark = allowed[means <= np.quantile(means, 0.03)]
        self.bright_neutral = allowed[np.argsort(
            -(means - 2 * pool.spectra[allowed].std(axis=1)))[: max(3, allowed.size // 100)]]

    def cls(self, rng):
        return int(self.classes[rng.choice(self.classes.size, p=self.p)])

    def spectra_of(self, rng, c, n):
        idx = self.by_class[c]
        return [int(i) for i in rng.choice(idx, size=n, replace=idx.size < n)]


# ------------------------------------------------------------------------- geometry

def _local(yy, xx, cy, cx, theta):
    c, s = math.cos(theta), math.sin(theta)
    dy, dx = yy - cy, xx - cx
    return c * dx + s * dy, -s * dx + c * dy  # (u along the major axis, v)


def _shape_sdf(shape, yy, xx, g):
    """Signed distance (px, <0 inside) and normalised local coordinates (nu, nv)."""
    u, v = _local(yy, xx, g["cy"], g["cx"], g["theta"])
    a, b = g["a"], g["b"]
    if shape == "ellipse":
        q = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        return (q - 1.0) * min(a, b), u / a, v / b
    if shape in ("rect", "chart"):
        return np.maximum(np.abs(u) - a, np.abs(v) - b), u / a, v / b
    if shape == "polygon":
        ang = np.asarray(g["angles"])
        px, py = a * np.cos(ang), a * np.sin(ang)
        d = np.full(u.shape, -np.inf)
        for i in range(ang.size):
            x0, y0, x1, y1 = px[i], py[i], px[(i + 1) % ang.size], py[(i + 1) % ang.size]
            ex, ey = x1 - x0, y1 - y0
            nrm = math.hypot(ex, ey)
            nx, ny = ey / nrm, -ex / nrm  # outward normal for counter-clockwise vertices
            d = np.maximum(d, (u - x0) * nx + (v - y0) * ny)
        return d, u / a, v / a
    if shape == "blob":
        rho, phi = np.hypot(u, v), np.arctan2(v, u)
        r = np.full(u.shape, a)
        for k, (amp, ph) in enumerate(zip(g["amps"], g["phases"]), start=2):
            r = r + a * amp * np.cos(k * phi + ph)
        return rho - r, u / a, v / a
    if shape == "halfplane":  # floor: below a tilted horizon line
        return -(v), u / a, v / a
    raise ValueError(f"unknown shape {shape!r}")


def _shading(model, nu, nv, light, bulge, ambient, gloss, shininess):
    """Lambertian + Blinn-Phong on a bulged surface; returns (diffuse s, specular h)."""
    if model == "sphere":
        rr = np.clip(nu**2 + nv**2, 0, 1)
        nz = np.sqrt(1.0 - rr) + 1.0 / max(bulge, 1e-3)
        n = np.stack([bulge * nu, bulge * nv, nz * bulge], -1)
    elif model == "cylinder":
        nz = np.sqrt(np.clip(1.0 - nv**2, 0, 1)) + 1.0 / max(bulge, 1e-3)
        n = np.stack([np.zeros_like(nv), bulge * nv, nz * bulge], -1)
    else:  # flat, slightly tilted
        n = np.broadcast_to(np.asarray([bulge * 0.1, bulge * 0.05, 1.0]), nu.shape + (3,))
    n = n / np.linalg.norm(n, axis=-1, keepdims=True)
    lam = np.clip(n @ light, 0.0, None)
    s = ambient + (1.0 - ambient) * lam
    if gloss > 0:
        h = light + np.asarray([0.0, 0.0, 1.0])
        h = h / np.linalg.norm(h)
        spec = gloss * np.clip(n @ h, 0.0, None) ** shininess
    else:
        spec = np.zeros_like(s)
    return s, spec


# ------------------------------------------------------------------------ textures

def _abundance(rng, style, n, shape, scale):
    """(h, w, n) non-negative mixing weights summing to 1 for a texture style."""
    h, w = shape
    if n == 1 or style == "uniform":
        out = np.zeros((h, w, n))
        out[..., 0] = 1.0
        return out
    if style == "smooth":
        sig = max(1.5, scale * rng.uniform(0.15, 0.5))
        z = np.stack([_smooth_noise(rng, (h, w), sig) for _ in range(n)], -1)
        t = rng.uniform(0.4, 1.2)
        z = z / t
    elif style == "granular":
        sig = rng.uniform(0.6, 1.6)
        z = np.stack([_smooth_noise(rng, (h, w), sig) for _ in range(n)], -1)
        z[..., 0] += rng.uniform(0.5, 1.5)  # a dominant grain colour
        z = z / rng.uniform(0.3, 0.8)
    elif style == "fibres":
        ang = rng.uniform(0, np.pi)
        z = np.stack([_smooth_noise(rng, (h, w), (rng.uniform(0.6, 1.2), rng.uniform(4, 10)))
                      for _ in range(n)], -1)
        # rotate the anisotropic field by resampling on rotated coordinates
        yy, xx = np.mgrid[0:h, 0:w].astype(float)
        cy, cx = (h - 1) / 2, (w - 1) / 2
        c, s = math.cos(ang), math.sin(ang)
        ry = cy + c * (yy - cy) - s * (xx - cx)
        rx = cx + s * (yy - cy) + c * (xx - cx)
        z = np.stack([ndimage.map_coordinates(z[..., i], [ry, rx], order=1, mode="wrap")
                      for i in range(n)], -1) / 0.35
    elif style in ("stripes", "checks"):
        period = rng.uniform(3.0, max(4.0, min(scale * 0.5, 24.0)))
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(float)
        t1 = (math.cos(ang) * xx + math.sin(ang) * yy) / period
        ph = np.floor(t1 + rng.random())
        if style == "checks":
            t2 = (-math.sin(ang) * xx + math.cos(ang) * yy) / period
            ph = ph + np.floor(t2 + rng.random())
        k = (ph.astype(int) % n)
        out = np.eye(n)[k]
        return ndimage.gaussian_filter(out, (0.6, 0.6, 0), mode="nearest")
    else:
        raise ValueError(f"unknown texture style {style!r}")
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------ illuminants

def _sample_illuminant(rng, cfg, family=None):
    family = family or _choice(rng, cfg.illuminant_mix)
    if family == "daylight":
        return f"daylight:{rng.uniform(4000.0, 12000.0):.1f}K"
    if family == "blackbody":
        return f"blackbody:{rng.uniform(2500.0, 6500.0):.1f}K"
    pool = _sp.illuminant_pool()
    return pool.names[int(rng.integers(len(pool)))]


# ------------------------------------------------------------------------ the generator

def generate_scene(seed: int, split: str, index: int, *, config: SceneConfig = SceneConfig(),
                   allowed: np.ndarray | None = None, include_modelled: bool = False,
                   split_seed: int = 20240611) -> Scene:
    """Generate example ``index`` of ``split`` (deterministic in all arguments).

    Args:
      seed: dataset seed (a builder config constant).
      split: "train" | "validation" | "test"; selects the reflectance subset (disjoint per
        split, :func:`jaxspec.data.spectra.split_pool`) and enters the RNG key.
      index: example index within the split.
      config: geometry / illumination settings.
      allowed: override of the pool indices materials are drawn from (default: the split's).
      include_modelled: add earthlib's PROSAIL vegetation to the pool.
      split_seed: seed of the pool partition.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    pool = _sp.reflectance_pool(include_modelled=include_modelled)
    if allowed is None:
        allowed = _sp.split_pool(pool, seed=split_seed)[split]
    allowed = np.asarray(allowed, dtype=np.int64)
    rng = np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])
    sampler = _Sampler(pool, allowed)
    H, W = config.height, config.width
    S = min(H, W)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64) + 0.5

    # ---- key light and per-scene settings
    el = rng.uniform(0.35, 1.3)  # elevation (rad)
    az = rng.uniform(-np.pi, np.pi)
    light = np.asarray([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    ambient = rng.uniform(0.15, 0.45)

    layers = []   # back to front: dicts with geometry + materials
    materials = []  # list of pool indices (or -1 for chart body resolved below)
    mat_class = []

    def add_material(i):
        materials.append(int(i))
        mat_class.append(int(pool.classes[i]))
        return len(materials) - 1

    def material_group(c=None, n=None, style=None):
        c = sampler.cls(rng) if c is None else c
        name = _sp.MATERIAL_CLASSES[c]
        style = style or _choice(rng, _TEXTURES.get(name, _TEXTURES_DEFAULT))
        if n is None:
            n = 1 if style == "uniform" else int(rng.integers(2, 4))
        idx = sampler.spectra_of(rng, c, n)
        return style, [add_material(i) for i in idx]

    # ---- backdrop
    if rng.random() < config.p_ground:
        style, mats = material_group(style=None)
        layers.append(dict(shape="full", style=style, mats=mats, model="flat",
                           bulge=rng.uniform(0, 1), gloss=0.0, shininess=1.0, scale=S))
    else:
        style, mats = material_group()
        layers.append(dict(shape="full", style=style, mats=mats, model="flat",
                           bulge=rng.uniform(0, 1), gloss=0.0, shininess=1.0, scale=S))
        if rng.random() < 0.7:  # a floor/table plane below a tilted horizon
            style, mats = material_group()
            g = dict(cy=rng.uniform(0.35, 0.75) * H, cx=W / 2, theta=rng.uniform(-0.25, 0.25),
                     a=S, b=S)
            layers.append(dict(shape="halfplane", g=g, style=style, mats=mats, model="flat",
                               bulge=rng.uniform(0.5, 1.5), gloss=0.0, shininess=1.0,
                               edge=rng.uniform(0.6, 2.0), scale=S))

    # ---- dead-leaves objects
    n_lo, n_hi = config.n_objects
    area_scale = math.sqrt(H * W / 128.0**2)
    n_obj = int(rng.integers(n_lo, n_hi + 1) * area_scale)
    chart_at = int(rng.integers(n_obj)) if (rng.random() < config.p_chart and n_obj) else -1
    r_lo, r_hi = config.size_range[0] * S, config.size_range[1] * S
    for j in range(n_obj):
        if j == chart_at:
            rows, cols = (4, 6) if rng.random() < 0.6 else (int(rng.integers(2, 5)), int(rng.integers(2, 6)))
            half_w = rng.uniform(0.22, 0.4) * S
            pitch = 2 * half_w / cols
            half_h = pitch * rows / 2
            g = dict(cy=rng.uniform(0.2, 0.8) * H, cx=rng.uniform(0.2, 0.8) * W,
                     theta=rng.normal(0, 0.12), a=half_w, b=half_h, rows=rows, cols=cols,
                     gap=rng.uniform(0.12, 0.22))
            chart_classes = [c for c in (0, 1, 2, 3, 4) if c in sampler.by_class]
            patches = []
            for _ in range(rows * cols):
                c = int(rng.choice(chart_classes))
                patches.append(add_material(sampler.spectra_of(rng, c, 1)[0]))
            body = add_material(int(rng.choice(sampler.dark)))
            layers.append(dict(shape="chart", g=g, style="chart", mats=patches + [body],
                               model="flat", bulge=rng.uniform(0, 0.5), gloss=0.0,
                               shininess=1.0, edge=rng.uniform(0.5, 1.2), scale=2 * half_w))
            continue
        r = _power_law(rng, r_lo, r_hi)
        shape = _choice(rng, (("ellipse", 0.35), ("rect", 0.2), ("polygon", 0.2), ("blob", 0.25)))
        aspect = rng.uniform(0.35, 1.0) if shape != "polygon" else 1.0
        g = dict(cy=rng.uniform(-0.05, 1.05) * H, cx=rng.uniform(-0.05, 1.05) * W,
                 theta=rng.uniform(0, np.pi), a=r, b=r * aspect)
        if shape == "polygon":
            k = int(rng.integers(3, 8))
            g["angles"] = np.sort(rng.uniform(0, 2 * np.pi, k)).tolist()
        if shape == "blob":
            g["amps"] = (rng.uniform(0, 0.18, 4) / np.arange(1, 5)).tolist()
            g["phases"] = rng.uniform(0, 2 * np.pi, 4).tolist()
        style, mats = material_group()
        model = {"ellipse": "sphere", "blob": "sphere", "rect": "cylinder",
                 "polygon": "flat"}[shape]
        if rng.random() < 0.25:
            model = "flat"
        glossy = rng.random() < config.p_glossy and model != "flat"
        layers.append(dict(shape=shape, g=g, style=style, mats=mats, model=model,
                           bulge=rng.uniform(0.6, 2.5), gloss=rng.uniform(0.1, 0.6) if glossy else 0.0,
                           shininess=rng.uniform(15, 120), edge=rng.uniform(0.5, 2.5), scale=2 * r))

    # ---- composite front to back: weight_k = alpha_k * prod_{j in front} (1 - alpha_j)
    M = len(materials)
    wts = np.zeros((H, W, M))
    shade = np.zeros((H, W))
    spec = np.zeros((H, W))
    trans = np.ones((H, W))
    for L in reversed(layers):
        if L["shape"] == "full":
            y0, y1, x0, x1 = 0, H, 0, W
            alpha = np.ones((H, W))
            nu = (xx - W / 2) / S
            nv = (yy - H / 2) / S
        else:
            g = L["g"]
            if L["shape"] == "halfplane":
                y0, y1, x0, x1 = 0, H, 0, W
            else:
                ext = math.hypot(g["a"], g["b"]) * (1.25 if L["shape"] == "blob" else 1.0) + 3
                y0, y1 = max(0, int(g["cy"] - ext)), min(H, int(math.ceil(g["cy"] + ext)))
                x0, x1 = max(0, int(g["cx"] - ext)), min(W, int(math.ceil(g["cx"] + ext)))
                if y1 <= y0 or x1 <= x0:
                    continue
            d, nu, nv = _shape_sdf(L["shape"], yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], g)
            alpha = np.clip(0.5 - d / L["edge"], 0.0, 1.0)
        tr = trans[y0:y1, x0:x1]
        wk = alpha * tr
        if not np.any(wk > 0):
            continue
        hh, ww = wk.shape
        if L["style"] == "chart":
            g = L["g"]
            pu = (nu + 1) / 2 * g["cols"]
            pv = (nv + 1) / 2 * g["rows"]
            ci = np.clip(np.floor(pu), 0, g["cols"] - 1).astype(int)
            ri = np.clip(np.floor(pv), 0, g["rows"] - 1).astype(int)
            gap = g["gap"] / 2
            inside = ((pu - np.floor(pu)) > gap) & ((pu - np.floor(pu)) < 1 - gap) & \
                     ((pv - np.floor(pv)) > gap) & ((pv - np.floor(pv)) < 1 - gap)
            inside = ndimage.gaussian_filter(inside.astype(float), 0.5)
            n_p = g["rows"] * g["cols"]
            ab = np.zeros((hh, ww, n_p + 1))
            ab[np.arange(hh)[:, None], np.arange(ww)[None, :], ri * g["cols"] + ci] = inside
            ab[..., n_p] = 1.0 - inside
        else:
            ab = _abundance(rng, L["style"], len(L["mats"]), (hh, ww), L["scale"])
        wts[y0:y1, x0:x1, L["mats"]] += wk[..., None] * ab
        s_k, h_k = _shading(L["model"], nu, nv, light, L["bulge"], ambient, L["gloss"],
                            L["shininess"])
        shade[y0:y1, x0:x1] += wk * s_k
        spec[y0:y1, x0:x1] += wk * h_k
        trans[y0:y1, x0:x1] = tr * (1.0 - alpha)

    # ---- reflectance, label
    spectra = pool.spectra[np.asarray(materials)].astype(np.float64)
    refl = wts @ spectra
    blur = rng.uniform(0.3, 0.8)
    refl = ndimage.gaussian_filter(refl, (blur, blur, 0), mode="nearest")
    refl = np.maximum(refl, REFLECTANCE_FLOOR)
    classes = np.asarray(mat_class, dtype=np.int32)
    label = classes[np.argmax(wts, axis=-1)].astype(np.int32)

    # ---- global shading field
    z = _smooth_noise(rng, (H, W), S * rng.uniform(0.15, 0.35))
    gdir = rng.uniform(0, 2 * np.pi)
    grad = ((xx - W / 2) * math.cos(gdir) + (yy - H / 2) * math.sin(gdir)) / S
    vig = 1.0 - rng.uniform(0.0, 0.35) * (((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / (0.5 * S) ** 2) / 2
    gfield = np.exp(rng.uniform(0.05, 0.3) * z + rng.uniform(0.0, 0.5) * grad) * np.clip(vig, 0.3, 1)
    shade = np.maximum(shade * gfield, SHADING_FLOOR)
    spec = spec * gfield

    # ---- illumination
    ill1 = _sample_illuminant(rng, config)
    e1 = _sp.illuminant_from_id(ill1).astype(np.float64)
    illum_params = {"primary": ill1}
    ill_ids = [ill1]
    if rng.random() < config.p_second:
        mode = "shadow" if rng.random() < 0.5 else "gradient"
        if mode == "shadow":
            ill2 = _sample_illuminant(rng, config, family="daylight") if rng.random() < 0.7 \
                else _sample_illuminant(rng, config)
            att = rng.uniform(0.15, 0.6)
            g = dict(cy=rng.uniform(0.2, 0.8) * H, cx=rng.uniform(0.2, 0.8) * W,
                     theta=rng.uniform(0, np.pi), a=rng.uniform(0.3, 0.8) * S, b=0.0,
                     angles=np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7)))).tolist())
            d, _, _ = _shape_sdf("polygon", yy, xx, g)
            width = rng.uniform(1.0, 6.0)
            m = np.clip(0.5 + d / width, 0.0, 1.0)  # 1 outside the shadow (lit by E1)
        else:
            ill2 = _sample_illuminant(rng, config)
            att = rng.uniform(0.4, 1.0)
            ang = rng.uniform(0, 2 * np.pi)
            t = ((xx - W / 2) * math.cos(ang) + (yy - H / 2) * math.sin(ang)) / S
            m = 1.0 / (1.0 + np.exp(-(t - rng.uniform(-0.3, 0.3)) / rng.uniform(0.08, 0.4)))
        e2 = _sp.illuminant_from_id(ill2).astype(np.float64)
        illum_params.update(secondary=ill2, mode=mode, attenuation=float(att))
        ill_ids.append(ill2)
        E = m[..., None] * e1 + (1.0 - m[..., None]) * (att * e2)
    else:
        E = np.broadcast_to(e1, (H, W, _sp.N_BANDS))

    radiance = (shade[..., None] * refl + spec[..., None]) * E
    p = float(np.percentile(radiance, EXPOSURE_PERCENTILE))
    k = EXPOSURE_TARGET / p
    hsi = (radiance * k).astype(np.float32)

    params = {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed), "split": split, "index": int(index),
        "config": dataclasses.asdict(config),
        "include_modelled": bool(include_modelled), "split_seed": int(split_seed),
        "illumination": illum_params,
        "light": {"elevation": float(el), "azimuth": float(az), "ambient": float(ambient)},
        "exposure_scale": k, "optical_blur_sigma": float(blur),
        "materials": materials,
        "layers": [{"shape": L["shape"], "style": L["style"], "model": L["model"],
                    "materials": L["mats"], "gloss": float(L["gloss"])} for L in layers],
    }
    return Scene(hsi=hsi, reflectance=refl.astype(np.float32), label=label,
                 illuminants=ill_ids, params=json.loads(json.dumps(params, default=float)))


def regenerate(params: dict | str) -> Scene:
    """Re-create a scene from its ``params`` (dict or the stored JSON text)."""
    if isinstance(params, (bytes, str)):
        params = json.loads(params)
    if params.get("generator_version") != GENERATOR_VERSION:
        raise ValueError(f"params were written by generator {params.get('generator_version')!r}, "
                         f"this is {GENERATOR_VERSION!r}")
    cfg = dict(params["config"])
    cfg = SceneConfig(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                         if isinstance(v, list) else v for k, v in cfg.items()})
    return generate_scene(params["seed"], params["split"], params["index"], config=cfg,
                          include_modelled=params["include_modelled"],
                          split_seed=params["split_seed"])


def srgb_preview(hsi: np.ndarray) -> np.ndarray:
    """Display-referred sRGB (uint8) of a radiance cube via CIE 1931 XYZ (for figures only)."""
    import colour
    cmf = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]
    xyz_bar = _sp._on_grid(cmf.wavelengths, cmf.values.T).T  # (31, 3)
    xyz = np.asarray(hsi, np.float64) @ xyz_bar / xyz_bar[:, 1].sum()
    m = np.asarray([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415],
                    [0.0557, -0.2040, 1.0570]])
    lin = np.clip(xyz @ m.T / max(np.percentile(xyz[..., 1], 99.5), 1e-6), 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return (srgb * 255 + 0.5).astype(np.uint8)
