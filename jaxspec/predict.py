"""Reconstruct spectral cubes from user images:
``python -m jaxspec.predict --workdir W img.png [more ...] [--out DIR --format npy|mat|tif]``.

Inputs: PNG / JPEG / TIFF of any size (8-bit, 16-bit or float; 16-bit values are rescaled to
0..255 so every normalisation sees the 8-bit scale; alpha channels are dropped; grey images are
rejected). Outputs per image, with the band centres (nm):

* ``npy``: ``<stem>.npy`` (H, W, C) float32 + ``<stem>.json`` sidecar (bands, shape, model);
* ``mat``: ``<stem>.mat`` with ``cube`` (H, W, C) and ``bands`` (scipy.io.savemat, v5);
* ``tif``: ``<stem>.tif`` (C, H, W) float32 via tifffile, metadata ``axes="CYX"``,
  ``bands`` (nm) and ``method`` in the JSON image description.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

FORMATS = ("npy", "mat", "tif")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) float32 RGB from PNG/JPEG/TIFF (8-bit scale)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile
        img = tifffile.imread(path)
        if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
            img = np.moveaxis(img, 0, -1)
    else:
        from PIL import Image
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                raise ValueError(f"{path}: single-channel image (mode {im.mode}); RGB needed")
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGB")
            img = np.asarray(im)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: expected an RGB image, got array of shape {img.shape}")
    img = img[..., :3]
    if img.dtype == np.uint16:
        return img.astype(np.float32) * np.float32(255.0 / 65535.0)
    return img.astype(np.float32)


def write_cube(cube: np.ndarray, bands: np.ndarray, out_stem: Path, fmt: str,
               info: dict | None = None) -> Path:
    info = dict(info or {})
    bands = [float(b) for b in bands]
    if fmt == "npy":
        np.save(out_stem.with_suffix(".npy"), cube.astype(np.float32))
        out_stem.with_suffix(".json").write_text(json.dumps(
            {"bands": bands, "units": "nm", "shape": list(cube.shape), "layout": "HWC", **info},
            indent=2))
        return out_stem.with_suffix(".npy")
    if fmt == "mat":
        import scipy.io
        scipy.io.savemat(out_stem.with_suffix(".mat"),
                         {"cube": cube.astype(np.float32), "bands": np.asarray(bands, np.float32)},
                         do_compression=True)
        return out_stem.with_suffix(".mat")
    if fmt == "tif":
        import tifffile
        tifffile.imwrite(out_stem.with_suffix(".tif"),
                         np.ascontiguousarray(np.moveaxis(cube.astype(np.float32), -1, 0)),
                         photometric="minisblack",
                         metadata={"axes": "CYX", "bands": bands, "units": "nm", **info})
        return out_stem.with_suffix(".tif")
    raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxspec.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training workdir (best checkpoint used)")
    p.add_argument("images", nargs="+")
    p.add_argument("--out", default=".", help="output directory")
    p.add_argument("--format", choices=FORMATS, default="npy")
    p.add_argument("--ensemble", action="store_true", help="x8 flip/transpose self-ensemble")
    p.add_argument("--tile", type=int, default=None, help="tile size for large images")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--which", choices=("best", "latest"), default="best")
    a = p.parse_args(argv)
    from jaxspec import api
    try:
        model, variables = api.load(a.workdir, which=a.which)
        images = [(Path(f), read_image(f)) for f in a.images]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, rgb in images:
        cube = api.reconstruct(model, variables, rgb, ensemble=a.ensemble, tile=a.tile,
                               overlap=a.overlap)
        bands = api.bands_of(model, cube.shape[-1], a.workdir)
        written = write_cube(cube, bands, out / path.stem, a.format,
                             {"method": model.name, "source": str(path)})
        print(f"{path} -> {written} {cube.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
