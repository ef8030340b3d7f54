"""Reconstruct spectral cubes from user images:
``python -m jaxspec.predict --workdir W img.png [more ...] [--out DIR --format npy|mat|tif]
[--adapt|--tta]``. A fusion run takes pairs ``LR_HSI HR_MSI`` of cubes (.npy/.mat/.tif, values
in [0, 1]) and uses the run's SRF/PSF when the method reads them; an hsi2hsi run takes cubes.
``--adapt`` (or ``--tta``, the same option) runs the method's per-image test-time adaptation
before predicting.

Memory (rgb2hsi / hsi2hsi without ``--adapt``): the process stays within ``--max-memory``
(default 4GiB): the largest tile that fits is chosen from the model's compiled memory
statistics (:func:`jaxspec.inference.tile_for_memory`; ``--tile`` overrides it), tiles are
blended one row of tiles at a time and finished rows are written straight to the ``.npy``
output (``mat``/``tif`` hold the one output array they write). ``--ensemble`` then averages the
x8 transforms of every tile. A tqdm bar over tiles goes to stderr (``--no-progress``: none).

Inputs: PNG / JPEG / TIFF / EXR of any size, read by :func:`jaxspec.data.photos.read_photo`:
8-bit and 16-bit at full depth (divided by the format's full-scale code), float TIFF in [0, 1]
(or by ``--float-scale``), alpha dropped, grey images rejected unless ``--grey replicate``.
The photo is then converted to what the run's model was trained on (``<workdir>/input.json``:
linear RGB for the built-in data, the dataset's native scale) with ``--input-encoding
srgb|linear`` (default: sRGB for 8/16-bit photos, linear for EXR) and normalised with the
run's ``rgb_norm`` as the loader did. Output stems are made unique when two inputs share one
(``a.png a.jpg`` -> ``a_png``, ``a_jpg``); the output directory is checked writable and
``--tile`` validated before anything runs. Cubes are clipped non-negative. Outputs per image,
with the band centres (nm):

* ``npy``: ``<stem>.npy`` (H, W, C) float32 + ``<stem>.json`` sidecar (bands, shape, model);
* ``mat``: ``<stem>.mat`` with ``cube`` (H, W, C) and ``bands`` (scipy.io.savemat, v5);
* ``tif``: ``<stem>.tif`` (C, H, W) float32 via tifffile, metadata ``axes="CYX"``,
  ``bands`` (nm) and ``method`` in the JSON image description.

Methods that estimate something about the photo itself (``Method.photo_info``; USSR: which
camera of its SRF dictionary took it, and the estimated SRF) print one line per image and
record the whole estimate under ``"estimate"`` in the sidecar / image description.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from jaxspec.errors import InputError, UsageError

log = logging.getLogger("jaxspec.predict")

FORMATS = ("npy", "mat", "tif")
INPUT_SPACES = ("srgb", "camera")


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


def _write_sidecar(out_stem: Path, bands, shape, info: dict) -> None:
    from jaxspec.fs import write_json_atomic
    write_json_atomic(out_stem.with_suffix(".json"),
                      {"bands": [float(b) for b in bands], "units": "nm", "shape": list(shape),
                       "layout": "HWC", **info})


class NpyRowWriter:
    """An (H, W, C) float32 ``.npy`` written row band by row band, top to bottom (HWC rows are
    contiguous in the file): a partial file, renamed into place by :meth:`close`. Plain file
    writes, not a memory map, so the written rows do not stay in the process's resident
    memory."""

    def __init__(self, path: Path, shape):
        self.path, self.shape = Path(path), tuple(int(v) for v in shape)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        self.f = open(self.tmp, "wb")
        np.lib.format.write_array_header_1_0(
            self.f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                     "fortran_order": False, "shape": self.shape})
        self.next_row = 0

    def write(self, row0: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype="<f4")
        if row0 != self.next_row or rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"rows {row0}.. {rows.shape} do not continue {self.next_row} of "
                             f"{self.shape}")
        self.f.write(memoryview(rows).cast("B"))
        self.next_row += rows.shape[0]

    def close(self) -> None:
        self.f.close()
        if self.next_row != self.shape[0]:
            self.tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {self.next_row} of {self.shape[0]} rows written")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_cube(cube: np.ndarray, bands: np.ndarray, out_stem: Path, fmt: str,
               info: dict | None = None) -> Path:
    info = dict(info or {})
    bands = [float(b) for b in bands]
    cube = np.asarray(cube, np.float32)          # no copy of a float32 cube
    if fmt == "npy":
        np.save(out_stem.with_suffix(".npy"), cube)
        _write_sidecar(out_stem, bands, cube.shape, info)
        return out_stem.with_suffix(".npy")
    if fmt == "mat":
        import scipy.io
        scipy.io.savemat(out_stem.with_suffix(".mat"),
                         {"cube": cube, "bands": np.asarray(bands, np.float32)},
                         do_compression=True)
        return out_stem.with_suffix(".mat")
    if fmt == "tif":
        import tifffile
        tifffile.imwrite(out_stem.with_suffix(".tif"),
                         np.ascontiguousarray(np.moveaxis(cube, -1, 0)),
                         photometric="minisblack",
                         metadata={"axes": "CYX", "bands": bands, "units": "nm", **info})
        return out_stem.with_suffix(".tif")
    raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")


def predict_bounded(model, variables, x: np.ndarray, out_stem: Path, fmt: str, *, workdir,
                    info: dict, max_memory: int, tile: int | None = None, overlap: int = 32,
                    ensemble: bool = False, progress: bool = False,
                    predict=None, consistent_srf=None) -> tuple[Path, tuple]:
    """Predict one (H, W, C) input (rgb2hsi: before ``rgb_norm``) and write it as ``fmt``
    within ``max_memory`` bytes of resident memory (module docstring, "Memory"). Returns
    (written path, output shape). ``predict``: a :func:`jaxspec.inference.make_predict_fn` of
    the model to reuse across images (its compiled programs are kept per shape).
    ``consistent_srf`` (C, 3): each row block made to reproduce its input RGB through it
    (:func:`jaxspec.physics.make_consistent`) before the non-negativity clip."""
    from jaxspec import api, inference
    from jaxspec.data import normalize_rgb
    module, normalization, stride, task = api._bundle(model, None, None)
    x = np.asarray(x, np.float32)
    if task.input_keys[0] == "rgb":
        x = normalize_rgb(x, normalization)
    x = x[None]
    if predict is None:
        predict = inference.make_predict_fn(module.apply, variables)
    h, w = x.shape[1:3]
    hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
    cout = int(predict.out_shape((1, min(hp, 64 * stride), min(wp, 64 * stride), x.shape[-1]))[-1])
    shape = (h, w, cout)
    out_bytes = 4 * h * w * cout
    auto = tile is None
    if auto:
        # resident now + the output when it is held (mat/tif) + slack for the XLA runtime and
        # Python temporaries that the compiled statistics do not cover
        own = (0 if fmt == "npy" else out_bytes) + (384 << 20)
        rss = inference.current_rss()
        if rss + own >= max_memory and own < max_memory:
            # a long-lived process (a notebook, a test worker) already holds more than the
            # bound: size the tiles so that this prediction adds at most max_memory
            log.warning("this process already holds %.2f GiB, more than --max-memory %.2f GiB "
                        "allows with the output; tiles are sized for %.2f GiB on top of it",
                        rss / 2**30, max_memory / 2**30, max_memory / 2**30)
            rss = 0
        reserved = rss + own
        tile = inference.tile_for_memory(predict, x.shape, max_bytes=max_memory, stride=stride,
                                         overlap=overlap, ensemble=ensemble, reserved=reserved)
    if auto and tile is not None:
        overlap = min(overlap, tile // 2 // stride * stride)
    rows = inference.predict_rows(predict, x, stride=stride, tile=tile, overlap=overlap,
                                  ensemble=ensemble, progress=progress)
    if consistent_srf is not None:
        from jaxspec import physics
        rows = ((row0, np.array(physics.make_consistent(
            r, x[:, row0:row0 + r.shape[1]], consistent_srf))) for row0, r in rows)
    info = {**info, "tile": tile, "overlap": overlap if tile is not None else None}
    bands = api.bands_of(model, cout, workdir)
    if fmt == "npy":
        path = out_stem.with_suffix(".npy")
        writer = NpyRowWriter(path, shape)
        try:
            for row0, r in rows:
                r = r[0]                                          # radiance >= 0
                writer.write(row0, np.maximum(r, 0.0, out=r if r.flags.writeable else None))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        _write_sidecar(out_stem, bands, shape, info)
        return path, shape
    cube = np.empty(shape, np.float32)
    for row0, r in rows:
        np.maximum(r[0], 0.0, out=cube[row0:row0 + r.shape[1]])
    return write_cube(cube, bands, out_stem, fmt, info), shape


def model_input_spec(workdir) -> dict:
    """The run's ``input.json`` (encoding, native scale); runs without one: linear RGB at the
    1.0 scale (the built-in data)."""
    p = Path(workdir) / "input.json"
    if p.is_file():
        return json.loads(p.read_text())
    return {"encoding": "linear", "native_scale": 1.0}


def check_consistent_input(model, spec: dict) -> None:
    """Raise :class:`jaxspec.errors.UsageError` unless ``--consistent`` applies to the run:
    an rgb2hsi model whose input is the linear RGB itself (``rgb_norm="none"``, ``input.json``
    encoding ``linear``), the projection of the spectra through an SRF."""
    from jaxspec.errors import UsageError
    if model.task.name != "rgb2hsi":
        raise UsageError(f"--consistent: projects reconstructed spectra onto their input RGB; "
                         f"{model.name!r} is a {model.task.name} method")
    if model.config.rgb_norm != "none":
        raise UsageError(f"--consistent needs the model's input to be the linear RGB itself; this "
                         f"run normalises it with rgb_norm={model.config.rgb_norm!r}")
    enc = spec.get("encoding", "linear")
    if enc != "linear":
        raise UsageError(f"--consistent needs linear RGB (the projection of the spectra through "
                         f"the SRF); this run's input encoding is {enc!r}")


def _run_srf(spec: dict, workdir) -> tuple[np.ndarray, np.ndarray] | None:
    """(srf (C, 3), band centres) the run's training RGB was rendered with, or None."""
    if "srf" not in spec:
        return None
    from jaxspec import api
    srf = np.asarray(spec["srf"], np.float64)
    recorded = workdir is not None and (Path(workdir) / "bands.json").is_file()
    if not recorded and srf.shape[0] != 31:      # band indices are not wavelengths
        return None
    return srf, np.asarray(api.bands_of(None, srf.shape[0], workdir), np.float64)


def read_model_rgb(path, spec: dict, *, grey: str = "reject", input_encoding: str | None = None,
                   input_space: str | None = None, exposure: str = "as-is", workdir=None
                   ) -> tuple[np.ndarray, dict]:
    """(H, W, 3) float32 photo in the model's input encoding, camera space and native scale
    (before the ``rgb_norm`` that :func:`jaxspec.api.reconstruct` applies) and a record of the
    conversion.

    ``input_space``: ``"srgb"`` -- the photo's linear values are sRGB primaries of a
    white-balanced (D65) scene, converted to the run's camera by
    :func:`jaxspec.data.photos.srgb_to_camera_matrix` of the SRF recorded in ``input.json``
    (the default when the run records one and expects linear RGB); ``"camera"`` -- the photo
    is already in the run's camera RGB (the default otherwise). ``exposure``: ``"as-is"`` or
    ``"normalise"`` (:func:`jaxspec.data.photos.apply_exposure` against the run's ``rgb_p99``).
    """
    from jaxspec.data.photos import (apply_exposure, read_photo, srgb_to_camera_matrix,
                                     to_model_encoding)
    expects = spec.get("encoding", "linear")
    srf = _run_srf(spec, workdir)
    defaulted = input_space is None
    if defaulted:
        input_space = "srgb" if (srf is not None and expects == "linear") else "camera"
    if input_space not in INPUT_SPACES:
        raise UsageError(f"input_space must be one of {INPUT_SPACES}, got {input_space!r}")
    matrix = None
    if input_space == "srgb":
        if expects != "linear":
            raise UsageError(f"--input-space srgb: this run's model takes {expects!r} RGB "
                             f"(its own camera's images); use --input-space camera")
        if srf is None:
            raise UsageError("--input-space srgb: the run does not record the SRF of its "
                             "training RGB (input.json has no 'srf'; runs trained before this "
                             "was recorded, or data with camera RGB); use --input-space camera")
        try:
            matrix = srgb_to_camera_matrix(*srf)
        except InputError as e:
            if not defaulted:
                raise
            log.warning("%s; feeding the photo as the run's camera RGB (--input-space camera)",
                        e)
            input_space = "camera"
    rgb, info = read_photo(path, grey=grey)
    x = to_model_encoding(np.asarray(rgb, np.float32) / np.float32(info.max_code), info,
                          encoding=input_encoding, expects=expects,
                          native_scale=float(spec.get("native_scale", 1.0)), colour_matrix=matrix)
    x, gain = apply_exposure(x, exposure, spec.get("rgb_p99"))
    rec = {"photo": info.to_dict(), "input_encoding": input_encoding or info.transfer or "srgb",
           "model_expects": expects, "input_space": input_space,
           "colour_matrix": None if matrix is None else np.round(matrix, 6).tolist(),
           "exposure": exposure, "exposure_gain": gain,
           "native_scale": float(spec.get("native_scale", 1.0)),
           "model_input_mean": [float(v) for v in x.reshape(-1, 3).mean(0)]}
    return x, rec


def _main(argv=None) -> int:
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
    p.add_argument("--adapt", "--tta", action="store_true",
                   help="per-image test-time adaptation (the method's adapt_loss); --tta is "
                        "the same option (MCGA's name for it)")
    p.add_argument("--adapt-steps", type=int, default=None, help="default: config.adapt_steps")
    p.add_argument("--adapt-lr", type=float, default=None, help="default: config.adapt_lr")
    p.add_argument("--grey", choices=("reject", "replicate"), default="reject",
                   help="grey photos: refuse (default) or replicate to RGB")
    p.add_argument("--input-encoding", choices=("srgb", "linear"), default=None,
                   help="how the photos are encoded (default: srgb; EXR: linear)")
    p.add_argument("--input-space", choices=INPUT_SPACES, default=None,
                   help="srgb: white-balanced sRGB photo, converted to the run's camera by a "
                        "3x3 colour matrix fitted on measured reflectances (default when the "
                        "run records its SRF); camera: already the run's camera RGB")
    p.add_argument("--exposure", choices=("as-is", "normalise"), default="as-is",
                   help="as-is: photo full scale = model full scale (white -> unit "
                        "reflectance); normalise: scale the photo's 99th percentile to the "
                        "training RGB's (input.json rgb_p99)")
    p.add_argument("--max-memory", default="4GiB",
                   help="resident-memory bound that picks the tile size (default 4GiB; "
                        "e.g. 2GiB, 512MiB)")
    p.add_argument("--consistent", action="store_true",
                   help="make each spectrum reproduce the model's input RGB through the run's "
                        "SRF (physically plausible reconstruction; runs on linear RGB with "
                        "rgb_norm none that record their SRF)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar over tiles")
    a = p.parse_args(argv)
    from jaxspec.errors import UsageError
    from jaxspec.data.photos import unique_output_stems
    from jaxspec.train.workdir import check_output_writable
    if a.tile is not None and a.tile < 1:
        raise UsageError(f"--tile must be a positive number of pixels, got {a.tile}")
    if a.overlap < 0 or (a.tile is not None and a.overlap >= a.tile):
        raise UsageError(f"--overlap must be in [0, --tile), got {a.overlap}")
    from jaxspec.inference import parse_bytes
    try:
        max_memory = parse_bytes(a.max_memory)
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None
    out = check_output_writable(a.out, what="--out directory")
    from jaxspec import api
    adapt = False
    if a.adapt:
        adapt = {k: v for k, v in (("steps", a.adapt_steps), ("lr", a.adapt_lr)) if v is not None}
        adapt = adapt or True
    model, variables = api.load(a.workdir, which=a.which)
    recs, consistent_srf = {}, None
    if a.consistent and model.task.name != "rgb2hsi":
        check_consistent_input(model, {})
    if model.task.name == "fusion":
        if len(a.images) % 2:
            raise UsageError("a fusion method takes pairs of files: LR_HSI HR_MSI ...")
        images = [(Path(a.images[i]), (read_cube(a.images[i]), read_cube(a.images[i + 1])))
                  for i in range(0, len(a.images), 2)]
    elif model.task.name == "hsi2hsi":
        images = [(Path(f), read_cube(f)) for f in a.images]
    else:
        spec = model_input_spec(a.workdir)
        if a.consistent:
            check_consistent_input(model, spec)
            if "srf" not in spec:
                raise UsageError(f"--consistent: {a.workdir}/input.json records no SRF")
            consistent_srf = np.asarray(spec["srf"], np.float32)
        images = []
        for f in a.images:
            x, recs[f] = read_model_rgb(f, spec, grey=a.grey, input_encoding=a.input_encoding,
                                        input_space=a.input_space, exposure=a.exposure,
                                        workdir=a.workdir)
            images.append((Path(f), x))
    stems = unique_output_stems([p for p, _ in images])
    predict = None
    if model.task.name != "fusion" and not adapt:   # one jitted function for every image
        from jaxspec import inference
        predict = inference.make_predict_fn(model.module.apply, variables)
    for (path, x), stem in zip(images, stems):
        info = {"method": model.name, "source": str(path)}
        if consistent_srf is not None:
            info["consistent"] = {"srf_from": "input.json"}
        if str(path) in recs:
            info["input"] = recs[str(path)]
        if model.method.photo_info is not None and model.task.name != "fusion":
            info["estimate"] = dict(model.method.photo_info(model.module, variables, x))
            print(f"{path}: {_estimate_line(info['estimate'])}")
        if model.task.name != "fusion" and not adapt:
            written, shape = predict_bounded(
                model, variables, x, out / stem, a.format, workdir=a.workdir, info=info,
                max_memory=max_memory, tile=a.tile, overlap=a.overlap, ensemble=a.ensemble,
                progress=not a.no_progress, predict=predict, consistent_srf=consistent_srf)
            print(f"{path} -> {written} {shape}")
            continue
        if model.task.name == "fusion":
            cube = _fuse(model, variables, a.workdir, *x, tile=a.tile, adapt=adapt)
        else:
            cube = api.reconstruct(model, variables, x, ensemble=a.ensemble, tile=a.tile,
                                   overlap=a.overlap, adapt=adapt)
            if consistent_srf is not None:
                from jaxspec import physics
                from jaxspec.data import normalize_rgb
                cube = physics.make_consistent(
                    cube, normalize_rgb(x, model.config.rgb_norm), consistent_srf)
        cube = np.maximum(np.asarray(cube, np.float32), 0.0)   # radiance/reflectance >= 0
        bands = api.bands_of(model, cube.shape[-1], a.workdir)
        written = write_cube(cube, bands, out / stem, a.format, info)
        print(f"{path} -> {written} {cube.shape}")
    return 0


def _estimate_line(est: dict) -> str:
    """One console line for a method's ``photo_info``: its ``summary`` when it gives one, else
    its scalar fields (the full record goes to the sidecar JSON)."""
    if "summary" in est:
        return str(est["summary"])
    return ", ".join(f"{k}={v}" for k, v in est.items() if not isinstance(v, (list, dict)))


def main(argv=None) -> int:
    from jaxspec.errors import run_cli
    return run_cli(_main, argv, prog="jaxspec.predict")


if __name__ == "__main__":
    sys.exit(main())
