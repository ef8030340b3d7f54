"""Reproduction of Tables 2 and 3 of Sinha (2023): channel-to-channel 2-Lipschitz constants.

Table 2: MST spectral self-attention; Table 3: adjacent channel coupling (ACC).  Entry
(row ``j``, column ``i``) is ``||J_{i,j}||_2 = ||dY_i / dX_j||_2`` for channels {0, 5, 20} of a
31-channel feature map whose values span [0, 255] ("RGB images with dynamic range of 255").

The paper does not say which weights or which feature map it used; here the attention modules
are studied in isolation (the paper perturbs "the inputs to the attention modules") with given
or seeded-random weights, on a 31-band spectral feature map min-max scaled to [0, 255].
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.analysis import jacobian as jac

__all__ = ["CHANNELS", "PAPER_TABLE2", "PAPER_TABLE3", "synthetic_feature_map",
           "mst_attention", "acc_attention", "lipschitz_table", "format_table",
           "reproduce_tables"]

CHANNELS = (0, 5, 20)
# rows j = 0, 5, 20; columns ||J_{0,j}||, ||J_{5,j}||, ||J_{20,j}||
PAPER_TABLE2 = np.array([[3.894, 0.0011, 0.0013],
                         [0.050, 0.428, 0.0011],
                         [0.00043, 0.0008, 0.426]])
PAPER_TABLE3 = np.array([[0.431, 0.0, 0.0],
                         [0.0, 0.770, 0.0],
                         [0.0, 0.0, 0.776]])


def synthetic_feature_map(h: int = 64, w: int = 64, c: int = 31, *, seed: int = 0,
                          value_range: tuple[float, float] = (0.0, 255.0),
                          n_materials: int = 6) -> np.ndarray:
    """A smooth spectral scene (1, H, W, C) min-max scaled to ``value_range``.

    Linear mixing of ``n_materials`` smooth spectra (two Gaussian bumps over the band index
    on a baseline) with spatially smooth abundances (softmax of Gaussian-filtered noise) and a
    smooth shading field -- neighbouring bands are strongly correlated, as in real HSI.
    """
    from scipy.ndimage import gaussian_filter
    if h < 1 or w < 1 or c < 1:
        raise ValueError(f"h, w, c must be positive; got {(h, w, c)}")
    rng = np.random.default_rng(seed)
    band = np.arange(c, dtype=np.float64)
    spectra = []
    for _ in range(n_materials):
        s = rng.uniform(0.05, 0.3) * np.ones(c)
        for _ in range(2):
            mu, sd, a = rng.uniform(0, c), rng.uniform(2, 8), rng.uniform(0.2, 1.0)
            s = s + a * np.exp(-0.5 * ((band - mu) / sd) ** 2)
        spectra.append(s)
    spectra = np.stack(spectra)                                    # (K, C)
    sigma = max(min(h, w) / 8, 1.0)
    logits = np.stack([gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in
                       range(n_materials)], -1)
    logits = logits / (logits.std() + 1e-12) * 3
    ab = np.exp(logits - logits.max(-1, keepdims=True))
    ab /= ab.sum(-1, keepdims=True)
    shade = 0.6 + 0.4 * gaussian_filter(rng.uniform(size=(h, w)), sigma)
    cube = (ab @ spectra) * shade[..., None]
    lo, hi = value_range
    cube = (cube - cube.min()) / (cube.max() - cube.min()) * (hi - lo) + lo
    return cube[None].astype(np.float32)


def mst_attention(dim: int = 31, heads: int = 1, *, seed: int = 0, params=None,
                  hw: int = 8) -> tuple[Callable, Mapping]:
    """MST++ spectral-wise MSA (``layers.SpectralMSA``) as ``fn(x) -> y`` with its variables."""
    from jaxspec import layers
    mod = layers.SpectralMSA(dim=dim, heads=heads)
    if params is None:
        params = mod.init(jax.random.PRNGKey(seed), jnp.zeros((1, hw, hw, dim)))
    return (lambda x: mod.apply(params, x)), params


def acc_attention(dim: int = 31, *, recurrent: bool = True, seed: int = 0, params=None,
                  hw: int = 8) -> tuple[Callable, Mapping]:
    """The ACC coupling module (``models.acc.ACC``) as ``fn(x) -> y`` with its variables."""
    from jaxspec.models.acc import ACC
    mod = ACC(recurrent=recurrent)
    if params is None:
        params = mod.init(jax.random.PRNGKey(seed), jnp.zeros((1, hw, hw, dim)))
    return (lambda x: mod.apply(params, x)), params


def lipschitz_table(fn: Callable, x, channels: Sequence[int] = CHANNELS, *,
                    method: str = "power", **kw) -> np.ndarray:
    """Table in the paper's layout: ``T[r, col] = ||J_{channels[col], channels[r]}||_2``."""
    m = jac.block_norm_matrix(fn, x, method=method, channels=channels, **kw)   # M[i, j]
    return m.T


def format_table(ours: np.ndarray, paper: np.ndarray | None = None,
                 channels: Sequence[int] = CHANNELS, title: str = "") -> str:
    """Plain-text / Markdown table with ``ours (paper)`` cells."""
    head = "| j | " + " | ".join(f"‖J_{{{i},j}}‖₂" for i in channels) + " |"
    lines = [title, "", head, "|" + "---|" * (len(channels) + 1)] if title else [
        head, "|" + "---|" * (len(channels) + 1)]
    for r, j in enumerate(channels):
        cells = []
        for col in range(len(channels)):
            v = f"{ours[r, col]:.4g}"
            if paper is not None:
                v += f" ({paper[r, col]:.4g})"
            cells.append(v)
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce_tables(x=None, *, size: int = 32, seed: int = 0, method: str = "power",
                     mst_params=None, acc_params=None, out_dir: str | None = None,
                     heatmap_size: int = 12, verbose: bool = True) -> dict:
    """Tables 2-3 (MST S-MSA vs ACC, recurrent and parallel) and, with ``out_dir``, figures.

    Args:
      x: (1, H, W, 31) feature map; default :func:`synthetic_feature_map` of ``size`` scaled to
        [0, 255].
      method: ``"power"`` (matrix-free norms), ``"exact"`` or ``"perturbation"`` (the paper's
        random-perturbation estimate).
      mst_params / acc_params: trained variables (else seeded random initialisations).
      out_dir: write ``heatmap_<name>.png`` (C x C ``||J_ij||_2``, exact, on a
        ``heatmap_size`` crop) and ``decay.png`` (``||J_ij||`` against ``|i - j|``).
    Returns:
      dict with ``tables`` {name: (3, 3)}, ``paper`` {name: (3, 3)}, ``text`` and, with
      ``out_dir``, ``matrices`` {name: (C, C)} and ``figures`` [paths].
    """
    if x is None:
        x = synthetic_feature_map(size, size, 31, seed=seed)
    x = np.asarray(x, np.float32)
    if x.ndim == 3:
        x = x[None]
    c = x.shape[-1]
    if max(CHANNELS) >= c:
        raise ValueError(f"Tables 2-3 use channels {CHANNELS}: x needs >= 21 channels, got {c}")
    fns = {
        "mst": mst_attention(c, seed=seed, params=mst_params)[0],
        "acc": acc_attention(c, recurrent=True, seed=seed, params=acc_params)[0],
        "acc_parallel": acc_attention(c, recurrent=False, seed=seed, params=acc_params)[0],
    }
    paper = {"mst": PAPER_TABLE2, "acc": PAPER_TABLE3, "acc_parallel": PAPER_TABLE3}
    titles = {"mst": "Table 2 -- MST spectral self-attention (ours (paper))",
              "acc": "Table 3 -- ACC, recurrent coupling (ours (paper))",
              "acc_parallel": "Table 3 -- ACC, parallel coupling Eq. 4 (ours (paper))"}
    tables = {n: lipschitz_table(f, x, method=method) for n, f in fns.items()}
    text = "\n\n".join(format_table(tables[n], paper[n], title=titles[n]) for n in fns)
    out = dict(tables=tables, paper=paper, text=text)
    if verbose:
        print(text)
    if out_dir is not None:
        from jaxspec.analysis import plots
        xs = x[:, :heatmap_size, :heatmap_size]
        mats = {n: jac.block_norm_matrix(f, xs, method="exact") for n, f in fns.items()}
        figs = [plots.plot_heatmap(m, f"{out_dir}/heatmap_{n}.png",
                                   title=f"{n}: ||J_ij||_2 ({heatmap_size}x{heatmap_size})")
                for n, m in mats.items()]
        figs.append(plots.plot_decay(mats, f"{out_dir}/decay.png"))
        out.update(matrices=mats, figures=figs)
    return out
