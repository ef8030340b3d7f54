"""Closed-form per-pixel RGB -> spectrum regression baselines.

Two classical baselines for spectral reconstruction, both fitted in closed form (ridge-
regularised least squares, float64 numpy) on pixels sampled from training images:

* **Linear** regression: :math:`\\hat s = W^\\top \\rho` (optionally with a bias row),
  rho = (r, g, b). With a noiseless linear camera this is the best *linear* estimator.
* **Root-polynomial** regression (Finlayson, Mackiewicz & Hurlbert 2015, colour correction;
  Lin & Finlayson 2016/2017, spectral recovery): the features are the k-th roots of all
  degree-k monomials of (r, g, b), k = 1..degree, de-duplicated:

  - degree 1 (3 terms): r, g, b
  - degree 2 (6 terms): + sqrt(rg), sqrt(gb), sqrt(rb)
  - degree 3 (13 terms): + cbrt(r g^2), cbrt(r^2 g), cbrt(g b^2), cbrt(g^2 b), cbrt(r b^2),
    cbrt(r^2 b), cbrt(rgb)
  - degree 4 (22 terms): + the 4th roots of r^3 g, r^2 g b, ... (9 new terms)

  Every term is homogeneous of degree 1, so without a bias the prediction is *exposure
  invariant*: scaling the RGB by k scales the predicted spectrum by k (Lin & Finlayson's
  point against plain polynomial regression).

The model input is ``jaxspec.data.normalize_rgb(rgb, model.normalization)`` -- the same RGB
normalisation the learned models use -- and :func:`predict` applies it to raw (B, H, W, 3)
images. Note that the ``"minmax"`` normalisation (MST++) is per image, so it removes the
overall exposure before the regression.

Objective, with N pixels, design matrix X (N, F[+1]) and targets Y (N, C):

.. math:: \\min_W \\frac{1}{N}\\|XW - Y\\|_F^2 + \\lambda \\|W_{\\mathrm{feat}}\\|_F^2
   \\quad\\Rightarrow\\quad (X^\\top X / N + \\lambda D)\\,W = X^\\top Y / N

where D = diag(1, ..., 1, 0) leaves the bias row unpenalised. ``ridge`` = lambda is per
pixel (independent of N). lambda = 0 uses the minimum-norm ``lstsq`` solution.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np

__all__ = [
    "RegressionBaseline", "root_polynomial_exponents", "root_polynomial_features",
    "fit_linear", "fit_root_polynomial", "predict", "sample_pixels", "load",
]

_FORMAT_VERSION = 1
KINDS = ("linear", "root_polynomial")


def _normalize(rgb, mode: str):
    """The one RGB normalisation of the project, ``jaxspec.data.normalize_rgb``."""
    from jaxspec.data import normalize_rgb
    return normalize_rgb(rgb, mode)


# --------------------------------------------------------------------------- features
def root_polynomial_exponents(degree: int) -> tuple[tuple[tuple[int, int, int], int], ...]:
    """Root-polynomial terms up to ``degree`` as ``((a_r, a_g, a_b), k)``: term = (r^a_r g^a_g b^a_b)^(1/k).

    All monomials of total degree k = 1..degree, reduced by gcd(a) and de-duplicated, in
    order of increasing k. Counts: 3, 6, 13, 22 for degree 1..4.
    """
    if int(degree) != degree or not 1 <= degree <= 6:
        raise ValueError(f"root-polynomial degree must be an integer in 1..6, got {degree!r}")
    seen, terms = set(), []
    for k in range(1, int(degree) + 1):
        exps = [e for e in itertools.product(range(k, -1, -1), repeat=3) if sum(e) == k]
        for e in exps:
            gcd = math.gcd(*e)
            reduced = tuple(a // gcd for a in e)
            if reduced not in seen:
                seen.add(reduced)
                terms.append((reduced, k // gcd))
    return tuple(terms)


def root_polynomial_features(rgb, degree: int):
    """(..., 3) -> (..., F) root-polynomial features, F = len(root_polynomial_exponents(degree)).

    numpy in -> numpy out (keeps float64, used for fitting); anything else -> jnp (jit-able).
    Degree-1 terms are r, g, b unchanged. For the root terms (k >= 2) channels are clipped
    at 0 first (negative values from noise would make the roots undefined).
    """
    xp = np if isinstance(rgb, np.ndarray) else jnp
    rgb = xp.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"root_polynomial_features: `rgb` must end in 3 channels, got shape "
                         f"{tuple(rgb.shape)}")
    pos = xp.maximum(rgb, 0.0)
    out = []
    for exps, k in root_polynomial_exponents(degree):
        if k == 1:
            out.append(rgb[..., exps.index(1)])
            continue
        prod = 1.0
        for i, a in enumerate(exps):
            if a:
                prod = prod * pos[..., i] ** a
        out.append(xp.sqrt(prod) if k == 2 else xp.cbrt(prod) if k == 3 else prod ** (1.0 / k))
    return xp.stack(out, axis=-1)


def _design(rgb, degree: int, bias: bool):
    xp = np if isinstance(rgb, np.ndarray) else jnp
    f = root_polynomial_features(rgb, degree)
    if bias:
        f = xp.concatenate([f, xp.ones_like(f[..., :1])], axis=-1)
    return f


# --------------------------------------------------------------------------- model
@dataclasses.dataclass(frozen=True)
class RegressionBaseline:
    """A fitted per-pixel regression RGB -> C bands.

    ``coef`` (F [+1 bias row last], C) float32 multiplies the features of
    ``normalize_rgb(rgb, normalization)``; ``degree`` 1 is linear regression.
    """
    kind: str
    degree: int
    coef: np.ndarray
    bias: bool = False
    ridge: float = 0.0
    normalization: str = "none"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"RegressionBaseline: kind must be one of {KINDS}, got {self.kind!r}")
        n_feat = len(root_polynomial_exponents(self.degree)) + int(self.bias)
        coef = np.asarray(self.coef, np.float32)
        if coef.ndim != 2 or coef.shape[0] != n_feat:
            raise ValueError(f"RegressionBaseline: coef must have shape ({n_feat}, C) for "
                             f"degree {self.degree}, bias={self.bias}; got {coef.shape}")
        object.__setattr__(self, "coef", coef)

    @property
    def n_bands(self) -> int:
        return self.coef.shape[1]

    @property
    def n_features(self) -> int:
        return self.coef.shape[0]

    def save(self, path) -> Path:
        """Write the model to ``path`` (.npz, no pickles)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, coef=self.coef, kind=np.str_(self.kind), degree=np.int64(self.degree),
                 bias=np.bool_(self.bias), ridge=np.float64(self.ridge),
                 normalization=np.str_(self.normalization),
                 format_version=np.int64(_FORMAT_VERSION))
        return path

    @classmethod
    def load(cls, path) -> "RegressionBaseline":
        """Read a model written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RegressionBaseline.load: no such file: {path}")
        with np.load(path, allow_pickle=False) as z:
            missing = {"coef", "kind", "degree", "bias", "ridge", "normalization"} - set(z.files)
            if missing:
                raise ValueError(f"RegressionBaseline.load: {path} lacks {sorted(missing)}")
            return cls(kind=str(z["kind"]), degree=int(z["degree"]), coef=z["coef"],
                       bias=bool(z["bias"]), ridge=float(z["ridge"]),
                       normalization=str(z["normalization"]))


load = RegressionBaseline.load


# --------------------------------------------------------------------------- fitting
def _check_pixels(rgb, hsi, fn: str):
    rgb = np.asarray(rgb)
    hsi = np.asarray(hsi)
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise ValueError(f"{fn}: `rgb` must be pixels of shape (N, 3), got {rgb.shape}")
    if hsi.ndim != 2:
        raise ValueError(f"{fn}: `hsi` must be pixels of shape (N, C), got {hsi.shape}")
    if rgb.shape[0] != hsi.shape[0]:
        raise ValueError(f"{fn}: `rgb` {rgb.shape} and `hsi` {hsi.shape} have different "
                         "pixel counts")
    for arg, x in (("rgb", rgb), ("hsi", hsi)):
        if not np.issubdtype(x.dtype, np.number):
            raise ValueError(f"{fn}: `{arg}` must be numeric, got dtype {x.dtype}")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{fn}: `{arg}` (shape {x.shape}) contains NaN or inf")
    return rgb.astype(np.float64), hsi.astype(np.float64)


def _solve(x: np.ndarray, y: np.ndarray, ridge: float, bias: bool, fn: str) -> np.ndarray:
    n, f = x.shape
    if n < f:
        raise ValueError(f"{fn}: need at least as many pixels as features ({f}), got {n}")
    if ridge == 0:
        return np.linalg.lstsq(x, y, rcond=None)[0]
    d = np.ones(f)
    if bias:
        d[-1] = 0.0
    return np.linalg.solve(x.T @ x / n + ridge * np.diag(d), x.T @ y / n)


def _fit(kind, degree, rgb, hsi, ridge, bias, normalization, fn):
    if not ridge >= 0:
        raise ValueError(f"{fn}: ridge must be >= 0, got {ridge}")
    rgb, hsi = _check_pixels(rgb, hsi, fn)
    x = _design(rgb, degree, bias)                      # float64 numpy
    coef = _solve(x, hsi, float(ridge), bias, fn)
    return RegressionBaseline(kind=kind, degree=degree, coef=coef, bias=bias,
                              ridge=float(ridge), normalization=normalization)


def fit_linear(rgb, hsi, ridge: float = 0.0, *, bias: bool = False,
               normalization: str = "none") -> RegressionBaseline:
    """Least-squares linear map from (N, 3) RGB pixels to (N, C) spectra.

    ``rgb`` must already be in the model's input space, i.e. normalised with
    ``normalization`` (use :func:`sample_pixels`); the mode is stored in the model so that
    :func:`predict` applies it to raw images. See the module docstring for the objective.
    """
    return _fit("linear", 1, rgb, hsi, ridge, bias, normalization, "fit_linear")


def fit_root_polynomial(rgb, hsi, degree: int = 2, ridge: float = 0.0, *, bias: bool = False,
                        normalization: str = "none") -> RegressionBaseline:
    """Root-polynomial regression (Lin & Finlayson) of the given ``degree`` (2 or 3 usual).

    Same inputs and objective as :func:`fit_linear`, on the features of
    :func:`root_polynomial_features`. ``bias=True`` breaks exposure invariance.
    """
    root_polynomial_exponents(degree)  # validates degree
    return _fit("root_polynomial", int(degree), rgb, hsi, ridge, bias, normalization,
                "fit_root_polynomial")


def predict(model: RegressionBaseline, rgb):
    """Apply ``model`` to raw RGB images (B, H, W, 3) -> (B, H, W, C) float32 (jnp, jit-able).

    ``rgb`` is normalised with ``model.normalization`` first, exactly as for training.
    """
    shape = np.shape(rgb)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"predict: `rgb` must have shape (B, H, W, 3), got {tuple(shape)}")
    x = _normalize(jnp.asarray(rgb, jnp.float32), model.normalization)
    return _design(x, model.degree, model.bias) @ jnp.asarray(model.coef)


def sample_pixels(images: Iterable, num_pixels: int, *, seed: int = 0,
                  normalization: str = "none", hsi_key: str = "hsi", rgb_key: str = "rgb"):
    """Sample (rgb, hsi) training pixels: returns ((N, 3), (N, C)) float32 arrays.

    ``images`` yields examples, each a dict with ``rgb_key`` (H, W, 3) and ``hsi_key``
    (H, W, C) (e.g. a ``jaxspec.data.data_source``), or ``(rgb, hsi)`` tuples. Each RGB image
    is normalised *as a whole image* with ``normalize_rgb(rgb, normalization)`` before its
    pixels are drawn (``"minmax"`` is per image), then ``ceil(num_pixels / n_images)`` pixels
    are drawn uniformly without replacement per image (all pixels if the image is smaller),
    seeded by ``seed``; the result is truncated to ``num_pixels``.
    """
    if num_pixels < 1:
        raise ValueError(f"sample_pixels: num_pixels must be >= 1, got {num_pixels}")
    examples = list(images)
    if not examples:
        raise ValueError("sample_pixels: `images` is empty")
    per = -(-int(num_pixels) // len(examples))
    rng = np.random.default_rng(seed)
    rgbs, hsis = [], []
    for i, ex in enumerate(examples):
        rgb, hsi = (ex[rgb_key], ex[hsi_key]) if isinstance(ex, dict) else ex
        rgb, hsi = np.asarray(rgb, np.float32), np.asarray(hsi, np.float32)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or hsi.ndim != 3 or hsi.shape[:2] != rgb.shape[:2]:
            raise ValueError(f"sample_pixels: example {i}: need rgb (H, W, 3) and hsi (H, W, C) "
                             f"on the same grid, got {rgb.shape} and {hsi.shape}")
        rgb = np.asarray(_normalize(rgb[None], normalization)[0], np.float32)
        rgb, hsi = rgb.reshape(-1, 3), hsi.reshape(-1, hsi.shape[-1])
        idx = rng.choice(len(rgb), size=min(per, len(rgb)), replace=False)
        rgbs.append(rgb[idx])
        hsis.append(hsi[idx])
    return np.concatenate(rgbs)[:num_pixels], np.concatenate(hsis)[:num_pixels]
