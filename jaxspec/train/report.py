"""Evaluation outputs of a run: ``eval.json`` and PNG figures (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def write_eval_json(path: str | os.PathLike, result: dict, **info: Any) -> Path:
    """``result`` from :func:`jaxspec.inference.evaluate_dataset` (+ ``info``) -> JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**info, "num_images": result["num_images"], "crop_border": result["crop_border"],
               "ensemble": result["ensemble"], "tile": result.get("tile"),
               "mean": result["mean"], "per_image": result["per_image"]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True))
    os.replace(tmp, path)
    return path


def _display_rgb(rgb: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(rgb, 0.5), np.percentile(rgb, 99.5)
    return np.clip((rgb - lo) / max(hi - lo, 1e-8), 0, 1)


def save_figures(out_dir: str | os.PathLike, examples: Sequence[tuple], *,
                 wavelengths: np.ndarray | None = None, bands: Sequence[int] | None = None,
                 n_pixels: int = 4, seed: int = 0) -> list[Path]:
    """One PNG per example: input RGB, true vs predicted bands, |error| heat-map (MRAE per
    pixel, mean over bands) and spectral curves at ``n_pixels`` random pixels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rgb, gt, pred in examples:
        c = gt.shape[-1]
        wl = (np.asarray(wavelengths) if wavelengths is not None and len(wavelengths) == c
              else (np.linspace(400, 700, c) if c == 31 else np.arange(c)))
        show = list(bands) if bands is not None else sorted({c // 6, c // 2, (5 * c) // 6})
        vmax = float(np.percentile(gt, 99.5)) or 1.0
        fig, axes = plt.subplots(3, len(show) + 1, figsize=(3.2 * (len(show) + 1), 9.2))
        axes[0, 0].imshow(_display_rgb(rgb))
        axes[0, 0].set_title(f"input RGB\n{name}")
        err = np.mean(np.abs(pred - gt) / np.maximum(gt, 1e-6), axis=-1)
        im = axes[1, 0].imshow(err, cmap="magma", vmin=0, vmax=float(np.percentile(err, 99)))
        axes[1, 0].set_title(f"relative abs. error (mean {err.mean():.4f})")
        fig.colorbar(im, ax=axes[1, 0], fraction=0.046)
        rng = np.random.default_rng(seed)
        ys = rng.integers(0, gt.shape[0], n_pixels)
        xs = rng.integers(0, gt.shape[1], n_pixels)
        ax = axes[2, 0]
        for i, (y, x) in enumerate(zip(ys, xs)):
            line, = ax.plot(wl, gt[y, x], "-", label=f"({y},{x}) true")
            ax.plot(wl, pred[y, x], "--", color=line.get_color(), label="pred")
            axes[0, 0].plot(x, y, "o", mfc="none", color=line.get_color())
        ax.set_xlabel("wavelength (nm)" if c == 31 or wavelengths is not None else "band")
        ax.set_title("spectra: true (-) vs pred (--)")
        ax.legend(fontsize=6)
        for j, b in enumerate(show, start=1):
            axes[0, j].imshow(gt[..., b], cmap="gray", vmin=0, vmax=vmax)
            axes[0, j].set_title(f"true {wl[b]:.0f}")
            axes[1, j].imshow(pred[..., b], cmap="gray", vmin=0, vmax=vmax)
            axes[1, j].set_title(f"pred {wl[b]:.0f}")
            e = np.abs(pred[..., b] - gt[..., b])
            im = axes[2, j].imshow(e, cmap="inferno")
            axes[2, j].set_title(f"|error| {wl[b]:.0f}")
            fig.colorbar(im, ax=axes[2, j], fraction=0.046)
        for a in axes.flat:
            if a is not ax:
                a.set_xticks([])
                a.set_yticks([])
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        path = out_dir / f"{safe}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
