"""Reconstruct spectral cubes from user images:
``python -m jaxspec.predict --workdir W img.png [more ...] [--out DIR --format npy|mat|tif]
[--adapt]``. A fusion run takes pairs ``LR_HSI HR_MSI`` of cubes (.npy/.mat/.tif, values in
[0, 1]) and uses the run's SRF/PSF when the method reads them; an hsi2hsi run takes cubes.
``--adapt`` runs the method's per-image test-time adaptation before predicting.

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


def read_cube(path: str | os.PathLike) -> np.ndarray:
    """(H, W, C) float32 cube from ``.npy``, ``.mat`` (key ``cube`` or the only 3-D array) or
    ``.tif`` ((C, H, W) as written by :func:`write_cube`, or (H, W, C))."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cube not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x = np.load(path)
    elif suffix == ".mat":
        import scipy.io
        d = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
        arrays = {k: v for k, v in d.items() if np.ndim(v) == 3}
        if "cube" in arrays:
            x = arrays["cube"]
        elif len(arrays) == 1:
            x = next(iter(arrays.values()))
        else:
            raise ValueError(f"{path}: expected a 'cube' or exactly one 3-D array, found "
                             f"{sorted(arrays)}")
    elif suffix in (".tif", ".tiff"):
        import tifffile
        x = tifffile.imread(path)
        if x.ndim == 3 and x.shape[0] < min(x.shape[1:]):
            x = np.moveaxis(x, 0, -1)
    else:
        raise ValueError(f"{path}: unsupported cube format {suffix!r} (use .npy, .mat, .tif)")
    x = np.asarray(x, np.float32)
    if x.ndim != 3:
        raise ValueError(f"{path}: expected an (H, W, C) cube, got shape {x.shape}")
    return x


def _fuse(model, variables, workdir, lr, hr, *, tile=None, adapt=False) -> np.ndarray:
    """jaxspec.fuse with the run's degradation (SRF resampled on the run's bands)."""
    from jaxspec import api
    from jaxspec.data import fusion as fusion_data
    deg = fusion_data.degradation_from_config(model.config)
    side = {}
    if "srf" in model.method.side_inputs:
        side["srf"] = deg.srf_matrix(api.bands_of(model, lr.shape[-1], workdir))
    if "psf" in model.method.side_inputs:
        side["psf"] = deg.psf_for(0, model.config.seed)
    return api.fuse(model, variables, lr, hr, tile=tile, adapt=adapt, **side)


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
    p.add_argument("--adapt", action="store_true",
                   help="per-image test-time adaptation (the method's adapt_loss)")
    p.add_argument("--adapt-steps", type=int, default=None, help="default: config.adapt_steps")
    p.add_argument("--adapt-lr", type=float, default=None, help="default: config.adapt_lr")
    a = p.parse_args(argv)
    from jaxspec import api
    adapt = False
    if a.adapt:
        adapt = {k: v for k, v in (("steps", a.adapt_steps), ("lr", a.adapt_lr)) if v is not None}
        adapt = adapt or True
    try:
        model, variables = api.load(a.workdir, which=a.which)
        if model.task.name == "fusion":
            if len(a.images) % 2:
                raise ValueError("a fusion method takes pairs of files: LR_HSI HR_MSI ...")
            images = [(Path(a.images[i]), (read_cube(a.images[i]), read_cube(a.images[i + 1])))
                      for i in range(0, len(a.images), 2)]
        elif model.task.name == "hsi2hsi":
            images = [(Path(f), read_cube(f)) for f in a.images]
        else:
            images = [(Path(f), read_image(f)) for f in a.images]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, x in images:
        try:
            if model.task.name == "fusion":
                cube = _fuse(model, variables, a.workdir, *x, tile=a.tile, adapt=adapt)
            else:
                cube = api.reconstruct(model, variables, x, ensemble=a.ensemble, tile=a.tile,
                                       overlap=a.overlap, adapt=adapt)
        except ValueError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
        bands = api.bands_of(model, cube.shape[-1], a.workdir)
        written = write_cube(cube, bands, out / path.stem, a.format,
                             {"method": model.name, "source": str(path)})
        print(f"{path} -> {written} {cube.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
