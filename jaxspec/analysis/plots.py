"""Figures for the Lipschitz study (matplotlib, Agg backend, PNG files)."""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

__all__ = ["plot_heatmap", "plot_decay", "decay_profile"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _prep(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    return path


def plot_heatmap(m: np.ndarray, path: str, *, title: str = "", floor: float = 1e-8) -> str:
    """C x C heat-map of ``log10 ||J_ij||_2`` (rows i = output, columns j = input)."""
    m = np.asarray(m, np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"expected a square (C, C) matrix, got shape {m.shape}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(np.log10(np.maximum(m, floor)), cmap="magma", origin="upper")
    ax.set_xlabel("input channel j")
    ax.set_ylabel("output channel i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 ||J_ij||_2")
    fig.tight_layout()
    fig.savefig(_prep(path), dpi=110)
    plt.close(fig)
    return path


def decay_profile(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances ``d = |i - j|`` and the mean and max of ``||J_ij||_2`` at each distance."""
    m = np.asarray(m, np.float64)
    c = m.shape[0]
    i, j = np.indices(m.shape)
    dist = np.abs(i - j)
    d = np.arange(c)
    return d, np.array([m[dist == k].mean() for k in d]), np.array([m[dist == k].max()
                                                                     for k in d])


def plot_decay(mats: Mapping[str, np.ndarray], path: str, *, floor: float = 1e-10) -> str:
    """``||J_ij||_2`` against ``|i - j|`` (all pairs as dots, the mean as a line), log scale."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k, (name, m) in enumerate(mats.items()):
        m = np.asarray(m, np.float64)
        i, j = np.indices(m.shape)
        col = f"C{k}"
        ax.scatter(np.abs(i - j).ravel() + 0.08 * (k - 1), np.maximum(m.ravel(), floor), s=4,
                   alpha=0.35, color=col)
        d, mean, _ = decay_profile(m)
        ax.plot(d, np.maximum(mean, floor), color=col, label=f"{name} (mean)")
    ax.set_yscale("log")
    ax.set_xlabel("|i - j|")
    ax.set_ylabel("||J_ij||_2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(_prep(path), dpi=110)
    plt.close(fig)
    return path
