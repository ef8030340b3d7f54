"""Render a grid of generated ``spectral_scenes`` examples for visual inspection.

    python -m jaxspec.data.figures --out docs/figures/spectral_scenes.png [--n 6] [--size 128]

Each row is one scene: an sRGB preview of the radiance (CIE 1931 -> sRGB, display-scaled),
three single bands (450, 550, 650 nm), the material-class label map, and the radiance and
reflectance spectra at three marked pixels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def render(out: str | Path, n: int = 6, size: int = 128, seed: int = 0, split: str = "train",
           start: int = 0) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxspec.data import scenes, spectra

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = scenes.SceneConfig(height=size, width=size)
    wl = spectra.WAVELENGTHS
    n_cls = len(spectra.MATERIAL_CLASSES)
    cmap = plt.get_cmap("tab20", n_cls)
    fig, axes = plt.subplots(n, 6, figsize=(6 * 2.4, n * 2.4), squeeze=False)
    for r in range(n):
        sc = scenes.generate_scene(seed, split, start + r, config=cfg)
        ax = axes[r]
        ax[0].imshow(scenes.srgb_preview(sc.hsi))
        ill = sc.params["illumination"]
        t = ill["primary"] + (f" + {ill['secondary']} ({ill['mode']})" if "secondary" in ill else "")
        ax[0].set_title(t, fontsize=6)
        for j, lam in enumerate((450, 550, 650)):
            b = int(np.argmin(np.abs(wl - lam)))
            ax[1 + j].imshow(sc.hsi[..., b], cmap="gray", vmin=0, vmax=1)
            ax[1 + j].set_title(f"{lam} nm", fontsize=7)
        ax[4].imshow(sc.label, cmap=cmap, vmin=-0.5, vmax=n_cls - 0.5, interpolation="nearest")
        present = [spectra.MATERIAL_CLASSES[c] for c in np.unique(sc.label)]
        ax[4].set_title(", ".join(present)[:60], fontsize=5)
        rng = np.random.default_rng(r)
        pts = rng.integers(8, size - 8, size=(3, 2))
        for (py, px), col in zip(pts, ("r", "g", "b")):
            ax[0].plot(px, py, "o", mfc="none", mec=col, ms=5)
            ax[5].plot(wl, sc.hsi[py, px], col + "-", lw=1)
            ax[5].plot(wl, sc.reflectance[py, px], col + ":", lw=1)
        ax[5].set_title("radiance (—) / reflectance (··)", fontsize=6)
        ax[5].tick_params(labelsize=5)
        for a in ax[:5]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--start", type=int, default=0)
    a = p.parse_args(argv)
    print(render(a.out, n=a.n, size=a.size, seed=a.seed, split=a.split, start=a.start))


if __name__ == "__main__":
    main()
