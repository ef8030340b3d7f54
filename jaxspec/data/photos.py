"""Reading user photos for ``predict`` at full depth, and converting them to a model's input.

:func:`read_photo` returns ``(rgb, info)``: ``rgb`` float32 (H, W, 3) holding the file's code
values unchanged (0..255 for 8-bit, 0..65535 for 16-bit, the stored values for float), and
``info`` (:class:`PhotoInfo`) with ``max_code`` — the code value of full scale (255, 65535 or
1.0) — so ``rgb / info.max_code`` is the image in [0, 1]. Formats:

=========  ==================================================================================
PNG        8-bit (Pillow) and 16-bit at full depth (:func:`jaxspec.data.readers.read_png16`;
           Pillow reduces 16-bit RGB PNGs to their high byte); palette images expanded.
JPEG, BMP  8-bit (Pillow); CMYK JPEGs converted to RGB by Pillow.
TIFF       tifffile; uint8 (255), uint16 (65535), float. Float TIFFs: values in [0, 1] are
           full scale 1.0; values in (1, 255] are taken as 0..255 code values (full scale
           255, ``info.float_scale_inferred``); larger values need an explicit
           ``float_scale=``. Planar (3, H, W) layouts are transposed.
EXR        OpenEXR (when installed): channels R, G, B (any layer prefix), scene-linear, full
           scale 1.0, ``info.transfer = "linear"``.
=========  ==================================================================================

Alpha is dropped (``info.alpha_dropped``). Grey images (one channel, or grey+alpha) are
rejected with :class:`~jaxspec.errors.InputError` unless ``grey="replicate"`` (then the channel
is copied to R, G, B and ``info.grey_replicated`` is set). A missing file raises
:class:`~jaxspec.errors.InputNotFoundError`; an empty, truncated, corrupt or non-image file
raises :class:`~jaxspec.errors.InputError` naming the file (CLI exit code 2).

:func:`to_model_encoding` converts ``rgb / max_code`` (encoding ``"srgb"`` or ``"linear"``) to
what a model was trained on, with the exact IEC 61966-2-1 sRGB transfer functions
(:func:`srgb_to_linear`, :func:`linear_to_srgb`). :func:`unique_output_stems` gives every input
a distinct output stem.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxspec.errors import InputError, InputNotFoundError

__all__ = ["ENCODINGS", "EXPOSURES", "PhotoInfo", "apply_exposure", "linear_to_srgb",
           "read_photo", "srgb_to_camera_matrix", "srgb_to_linear", "to_model_encoding",
           "unique_output_stems"]

ENCODINGS = ("srgb", "linear")
EXPOSURES = ("as-is", "normalise")
_MAX_PIXELS = 1 << 28          # 268 M pixels: larger headers are corrupt or not a photo


@dataclasses.dataclass(frozen=True)
class PhotoInfo:
    """What :func:`read_photo` found.

    ``path``; ``format`` (``png``/``jpeg``/``bmp``/``tiff``/``exr``/...); ``bit_depth`` (8, 16,
    32 for float32 TIFF, 16 for half EXR...); ``dtype`` of the stored samples; ``max_code`` full
    scale (255.0, 65535.0 or 1.0); ``channels`` in the file (1-4); ``alpha_dropped``;
    ``grey_replicated``; ``float_scale_inferred`` (float TIFF whose scale was guessed from its
    values); ``transfer`` the file's own transfer hint (``"linear"`` for EXR, else None: the
    caller's ``--input-encoding``, sRGB by default, decides); ``shape`` (H, W).
    """
    path: str
    format: str
    bit_depth: int
    dtype: str
    max_code: float
    channels: int
    shape: tuple[int, int]
    alpha_dropped: bool = False
    grey_replicated: bool = False
    float_scale_inferred: bool = False
    transfer: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------- sRGB (IEC 61966-2-1)
def srgb_to_linear(v):
    """IEC 61966-2-1 sRGB decoding of values in [0, 1]: ``v / 12.92`` for ``v <= 0.04045``,
    else ``((v + 0.055) / 1.055) ** 2.4`` (float64 internally, float32 out; values outside
    [0, 1] are extended symmetrically / by the same power law)."""
    v = np.asarray(v, np.float64)
    a = np.abs(v)
    out = np.where(a <= 0.04045, a / 12.92, ((a + 0.055) / 1.055) ** 2.4)
    return (np.sign(v) * out).astype(np.float32)


def linear_to_srgb(v):
    """IEC 61966-2-1 sRGB encoding (inverse of :func:`srgb_to_linear`): ``12.92 v`` for
    ``v <= 0.0031308``, else ``1.055 v ** (1 / 2.4) - 0.055``."""
    v = np.asarray(v, np.float64)
    a = np.abs(v)
    out = np.where(a <= 0.0031308, 12.92 * a, 1.055 * a ** (1 / 2.4) - 0.055)
    return (np.sign(v) * out).astype(np.float32)


def to_model_encoding(img01, info: PhotoInfo | None = None, encoding: str | None = None,
                      expects: str = "linear", native_scale: float = 1.0,
                      colour_matrix=None) -> np.ndarray:
    """Convert a photo in [0, 1] (``rgb / info.max_code``) to a model's input encoding.

    Args:
      img01: float (H, W, 3) in [0, 1] (HDR/linear floats may exceed 1).
      info: from :func:`read_photo`; its ``transfer`` ("linear" for EXR) is the default
        ``encoding``.
      encoding: how the file is encoded: ``"srgb"`` (display-referred 8/16-bit photos: the
        default) or ``"linear"`` (``--input-encoding`` overrides).
      expects: what the model was trained on: ``"linear"`` (linear RGB, e.g. ``hsi @ srf`` of
        the built-in data and rendered real datasets) or ``"srgb"`` (display-referred images,
        e.g. NTIRE Clean PNGs).
      colour_matrix: optional 3x3 ``A`` applied to the linear RGB (``x @ A``) when the model
        expects linear RGB, e.g. :func:`srgb_to_camera_matrix` of the run's SRF.
      native_scale: full scale of the training RGB before the loader's normalisation: 1.0
        for linear data, 255.0 for 8-bit sources (common schema: "8-bit sources keep 0..255
        code values"); the caller then applies ``normalize_rgb(x, config.rgb_norm)`` exactly
        as the loader did.

    Returns float32 (H, W, 3): ``native_scale * T(img01) [@ colour_matrix]`` with ``T`` the
    sRGB decoding (srgb -> linear), encoding (linear -> srgb) or the identity.
    """
    if encoding is None:
        encoding = (info.transfer if info is not None and info.transfer else "srgb")
    for name, v in (("encoding", encoding), ("expects", expects)):
        if v not in ENCODINGS:
            raise InputError(f"{name} must be one of {ENCODINGS}, got {v!r}")
    x = np.asarray(img01, np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise InputError(f"to_model_encoding: expected (H, W, 3), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InputError("to_model_encoding: image contains NaN or inf")
    if encoding == "srgb" and expects == "linear":
        x = srgb_to_linear(np.clip(x, 0.0, 1.0))
    elif encoding == "linear" and expects == "srgb":
        x = linear_to_srgb(np.clip(x, 0.0, None))
    if colour_matrix is not None and expects == "linear":
        a = np.asarray(colour_matrix, np.float32)
        if a.shape != (3, 3) or not np.all(np.isfinite(a)):
            raise InputError(f"colour_matrix must be a finite 3x3 matrix, got {a.shape}")
        x = np.maximum(np.clip(x, 0.0, None) @ a, 0.0)
    return (x * np.float32(native_scale)).astype(np.float32)


# ------------------------------------------------------------------------- output names
def unique_output_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One distinct output stem per input, in order.

    A stem used by one input only stays the stem (``a.png`` -> ``a``). Inputs whose stems
    collide get their suffix appended: ``a.png``, ``a.jpg`` -> ``a_png``, ``a_jpg``. The same
    file name in different folders (``x/a.png``, ``y/a.png``) gets the parent folder name:
    ``x_a_png``, ``y_a_png``. The same path given twice raises ``InputError``.
    """
    paths = [Path(p) for p in paths]
    resolved = [os.path.abspath(p) for p in paths]
    seen: dict[str, int] = {}
    for i, r in enumerate(resolved):
        if r in seen:
            raise InputError(f"{paths[i]} is given twice (arguments {seen[r] + 1} and {i + 1})")
        seen[r] = i
    stems = [p.stem for p in paths]
    out = []
    for p, stem in zip(paths, stems):
        if stems.count(stem) == 1:
            out.append(stem)
            continue
        name = f"{stem}_{p.suffix.lstrip('.').lower()}" if p.suffix else stem
        same_name = [q for q in paths if q.name == p.name]
        if len(same_name) > 1:
            name = f"{p.parent.name or 'root'}_{name}"
        out.append(name)
    if len(set(out)) != len(out):
        dup = sorted({s for s in out if out.count(s) > 1})
        raise InputError(f"cannot give distinct output names to inputs {dup}: rename them")
    return out


# ------------------------------------------------------------------------- colour space
@functools.lru_cache(maxsize=16)
def _srgb_to_camera_cached(srf_bytes: bytes, n_bands: int, wl_bytes: bytes) -> np.ndarray:
    import colour

    from jaxspec.data import spectra
    from jaxspec.physics import grids
    srf = np.frombuffer(srf_bytes, np.float64).reshape(n_bands, 3)
    wl = np.frombuffer(wl_bytes, np.float64)
    grid = np.asarray(grids.WAVELENGTHS_31, np.float64)
    if wl.shape != grid.shape or not np.allclose(wl, grid):
        # sensors with overlapping detectors (EnMAP/HySpecNet: VNIR and SWIR share ~900-1000
        # nm) list some wavelengths twice or out of order: sort, average repeated ones
        order = np.argsort(wl, kind="stable")
        wl, srf = wl[order], srf[order]
        uw, inv = np.unique(wl, return_inverse=True)
        if len(uw) != len(wl):
            srf = np.stack([srf[inv == i].mean(0) for i in range(len(uw))])
            wl = uw
        srf = np.asarray(grids.resample(srf, wl, grid, axis=0, extrapolate="zero"), np.float64)
    if not np.all(srf.sum(0) > 0):
        raise InputError("srgb_to_camera_matrix: the srf has a channel with no response in "
                         "400-700 nm, where a photo's sRGB is defined")
    refl = np.asarray(spectra.reflectance_pool().spectra, np.float64)          # (N, 31)
    cmf = colour.MSDS_CMFS["CIE 1931 2 Degree Standard Observer"]
    xyz_bar = spectra._on_grid(cmf.wavelengths, cmf.values.T).T                 # (31, 3)
    e = spectra._sd_values(colour.SDS_ILLUMINANTS["D65"])
    xyz = (refl * e) @ xyz_bar / float(e @ xyz_bar[:, 1])                      # Y(white) = 1
    m = np.asarray(colour.models.RGB_COLOURSPACE_sRGB.matrix_XYZ_to_RGB, np.float64)
    srgb_lin = xyz @ m.T
    target = refl @ srf
    a, *_ = np.linalg.lstsq(srgb_lin, target, rcond=None)
    return a.astype(np.float32)


def srgb_to_camera_matrix(srf, wavelengths=None) -> np.ndarray:
    """3x3 colour-correction matrix ``A`` with ``camera_rgb ~= linear_srgb @ A``.

    A display-referred photo (sRGB, the standard of phone and camera JPEGs) is white-balanced:
    a perfect white reflector is (1, 1, 1), and its linear values are the sRGB primaries of the
    CIE 1931 XYZ of the scene under D65. A model trained on ``rgb = hsi @ srf`` expects the
    RGB of that camera instead. ``A`` is the least-squares map, over every measured reflectance
    of :func:`jaxspec.data.spectra.reflectance_pool`, from the photo's linear sRGB of the
    reflectance (lit by D65, CIE 1931 2-degree observer, sRGB matrix of colour-science) to
    ``reflectance @ srf`` (the camera's RGB of the reflectance under an equal-energy light), so
    the model sees a white-balanced scene with white at unit reflectance and returns
    reflectance-like spectra. ``srf`` is (C, 3) on ``wavelengths`` (default: the 31-band
    400-700 nm grid); other grids are resampled onto it (zero outside).
    """
    srf = np.asarray(srf, np.float64)
    if srf.ndim != 2 or srf.shape[1] != 3:
        raise InputError(f"srgb_to_camera_matrix: srf must be (C, 3), got shape {srf.shape}")
    if not np.all(np.isfinite(srf)):
        raise InputError("srgb_to_camera_matrix: srf contains NaN or inf")
    if wavelengths is None:
        from jaxspec.physics import grids
        if srf.shape[0] != len(grids.WAVELENGTHS_31):
            raise InputError(f"srgb_to_camera_matrix: a {srf.shape[0]}-band srf needs its "
                             f"wavelengths")
        wavelengths = grids.WAVELENGTHS_31
    wl = np.asarray(wavelengths, np.float64)
    if wl.shape != (srf.shape[0],):
        raise InputError(f"srgb_to_camera_matrix: {wl.shape[0] if wl.ndim else 0} wavelengths "
                         f"for a {srf.shape[0]}-band srf")
    return _srgb_to_camera_cached(np.ascontiguousarray(srf).tobytes(), srf.shape[0],
                                  np.ascontiguousarray(wl).tobytes()).copy()


def apply_exposure(x, exposure: str = "as-is", reference: float | None = None,
                   percentile: float = 99.0) -> tuple[np.ndarray, float]:
    """``(x * gain, gain)``. ``"as-is"``: gain 1 (the photo's full scale is the model's: a
    white-balanced photo's white maps to unit reflectance). ``"normalise"``: the gain that
    puts the image's ``percentile``-th percentile (over all pixels and channels) at
    ``reference`` -- the same statistic of the training RGB, recorded by training in
    ``input.json`` -- so an under- or over-exposed photo reaches the exposure range the model
    was trained on. A black image keeps gain 1."""
    if exposure not in EXPOSURES:
        raise InputError(f"exposure must be one of {EXPOSURES}, got {exposure!r}")
    x = np.asarray(x, np.float32)
    if exposure == "as-is":
        return x, 1.0
    if reference is None or not np.isfinite(reference) or reference <= 0:
        raise InputError("exposure='normalise' needs the training RGB's reference level "
                         "(input.json 'rgb_p99'); this run does not record it")
    level = float(np.percentile(x, percentile))
    gain = float(reference) / level if level > 0 else 1.0
    return (x * np.float32(gain)).astype(np.float32), gain


# ------------------------------------------------------------------------- reading
def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"v/1\x01"):
        return "exr"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _finish(arr: np.ndarray, path: Path, fmt: str, *, bit_depth: int, max_code: float,
            grey: str, channels_hint: int | None = None, **flags) -> tuple[np.ndarray, PhotoInfo]:
    """Channels -> (H, W, 3) float32 per the grey/alpha policy; the PhotoInfo."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or 0 in arr.shape:
        raise InputError(f"{path}: expected an RGB image, got an array of shape {arr.shape}")
    channels = channels_hint or arr.shape[-1]
    alpha = arr.shape[-1] in (2, 4)
    if alpha:
        arr = arr[..., :-1]
    replicated = False
    if arr.shape[-1] == 1:
        if grey != "replicate":
            raise InputError(f"{path}: greyscale image ({channels} channel(s)); an RGB photo is "
                             f"needed (pass grey='replicate' / --grey replicate to copy the "
                             f"grey channel to R, G and B)")
        arr = np.repeat(arr, 3, axis=-1)
        replicated = True
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{path}: image contains NaN or inf")
    info = PhotoInfo(path=str(path), format=fmt, bit_depth=int(bit_depth),
                     dtype=str(flags.pop("dtype")), max_code=float(max_code), channels=channels,
                     shape=(int(out.shape[0]), int(out.shape[1])), alpha_dropped=alpha,
                     grey_replicated=replicated, **flags)
    return out, info


def _read_png(path: Path, grey: str):
    from jaxspec.data import readers
    from PIL import Image

    width, height, depth, colour = readers._png_header(path)
    if width * height > _MAX_PIXELS or width == 0 or height == 0:
        raise InputError(f"{path}: implausible PNG size {width}x{height}")
    channels = readers._PNG_CHANNELS.get(colour)
    if channels is None:
        raise InputError(f"{path}: invalid PNG colour type {colour}")
    if depth == 16:
        arr = readers.read_png16(path)     # full 16 bits, all channels incl. alpha
        return _finish(arr, path, "png", bit_depth=16, max_code=65535.0, grey=grey,
                       dtype="uint16", channels_hint=channels)
    with Image.open(path) as im:
        im.load()
        if im.mode == "P":
            has_alpha = "transparency" in im.info
            im = im.convert("RGBA" if has_alpha else "RGB")
        elif im.mode == "1":
            im = im.convert("L")
        arr = np.asarray(im)
    return _finish(arr, path, "png", bit_depth=8, max_code=255.0, grey=grey, dtype="uint8",
                   channels_hint=channels if colour != 3 else None)


def _read_pillow(path: Path, fmt: str, grey: str):
    from PIL import Image

    with Image.open(path) as im:
        if im.width * im.height > _MAX_PIXELS:
            raise InputError(f"{path}: implausible image size {im.width}x{im.height}")
        im.load()
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            arr = np.asarray(im).astype(np.uint16)
            return _finish(arr, path, fmt, bit_depth=16, max_code=65535.0, grey=grey,
                           dtype="uint16")
        if mode in ("I", "F"):
            raise InputError(f"{path}: unsupported {mode!r} (32-bit) {fmt} image")
        if mode == "1":
            im = im.convert("L")
        elif mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in mode else "RGB")
        arr = np.asarray(im)
    return _finish(arr, path, fmt, bit_depth=8, max_code=255.0, grey=grey, dtype="uint8")


def _read_tiff(path: Path, grey: str, float_scale):
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        if not tif.series:
            raise InputError(f"{path}: TIFF without image data")
        series = tif.series[0]
        shape = tuple(int(s) for s in series.shape)
        if int(np.prod(shape, dtype=np.float64)) > 4 * _MAX_PIXELS:
            raise InputError(f"{path}: implausible TIFF size {shape}")
        arr = series.asarray()
    arr = np.asarray(arr)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 2, 3, 4) and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)       # planar (C, H, W)
    flags = {}
    if arr.dtype == np.uint8:
        depth, max_code = 8, 255.0
    elif arr.dtype == np.uint16:
        depth, max_code = 16, 65535.0
    elif arr.dtype.kind == "f":
        depth = arr.dtype.itemsize * 8
        data = arr[..., :3] if arr.ndim == 3 and arr.shape[-1] in (2, 4) else arr
        if not np.all(np.isfinite(data)):
            raise InputError(f"{path}: float TIFF contains NaN or inf")
        hi = float(data.max()) if data.size else 0.0
        lo = float(data.min()) if data.size else 0.0
        if lo < 0:
            raise InputError(f"{path}: float TIFF has negative values (min {lo:g})")
        if float_scale is not None:
            max_code = float(float_scale)
            if max_code <= 0:
                raise InputError(f"float_scale must be > 0, got {float_scale!r}")
        elif hi <= 1.0 + 1e-6:
            max_code = 1.0
        elif hi <= 255.0 + 1e-3:
            max_code, flags["float_scale_inferred"] = 255.0, True
        else:
            raise InputError(f"{path}: float TIFF with values up to {hi:g}: its full scale is "
                             f"ambiguous; pass float_scale= (e.g. 1.0 for linear HDR, 65535)")
    else:
        raise InputError(f"{path}: unsupported TIFF sample type {arr.dtype} (uint8, uint16 or "
                         f"float needed)")
    return _finish(arr, path, "tiff", bit_depth=depth, max_code=max_code, grey=grey,
                   dtype=str(arr.dtype), **flags)


def _read_exr(path: Path, grey: str):
    try:
        import OpenEXR
    except ImportError as err:  # pragma: no cover - optional dependency
        raise InputError(f"{path}: reading EXR needs the 'OpenEXR' package "
                         f"(pip install OpenEXR)") from err
    with OpenEXR.File(str(path), separate_channels=True) as f:
        channels = {name: np.array(ch.pixels) for name, ch in f.channels().items()}
    by_last = {}
    for name, px in channels.items():
        by_last.setdefault(name.rsplit(".", 1)[-1].upper(), px)
    if all(c in by_last for c in "RGB"):
        planes = [by_last[c] for c in "RGB"]
    elif "Y" in by_last:
        planes = [by_last["Y"]]
    else:
        raise InputError(f"{path}: EXR without R, G, B (or Y) channels; found {sorted(channels)}")
    if len({p.shape for p in planes}) != 1 or planes[0].ndim != 2:
        raise InputError(f"{path}: EXR channels of different or non-2-D shapes")
    arr = np.stack(planes, axis=-1)
    depth = arr.dtype.itemsize * 8
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{path}: EXR contains NaN or inf")
    return _finish(arr, path, "exr", bit_depth=depth, max_code=1.0, grey=grey,
                   dtype=str(planes[0].dtype), transfer="linear")


def read_photo(path: str | os.PathLike, *, grey: str = "reject",
               float_scale: float | None = None) -> tuple[np.ndarray, PhotoInfo]:
    """Read a user photo (PNG 8/16-bit, JPEG, BMP, TIFF uint8/uint16/float, EXR).

    Args:
      path: the file; its format is detected from its first bytes, not its name.
      grey: ``"reject"`` (default: ``InputError`` for a one-channel image) or ``"replicate"``.
      float_scale: full scale of a float TIFF (default: inferred, see the module docstring).

    Returns:
      ``(rgb, info)``: float32 (H, W, 3) code values and :class:`PhotoInfo`
      (``rgb / info.max_code`` is in [0, 1] for integer files).

    Raises:
      InputNotFoundError: the file does not exist.
      InputError: empty, truncated, corrupt, unsupported or grey (with ``grey="reject"``)
        image; the message names the file.
    """
    if grey not in ("reject", "replicate"):
        raise InputError(f"grey must be 'reject' or 'replicate', got {grey!r}")
    p = Path(os.fspath(path))
    if not p.exists():
        raise InputNotFoundError(f"image not found: {p}")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError as err:
        raise InputError(f"{p}: cannot read: {err.strerror or err}") from err
    if size == 0:
        raise InputError(f"{p}: empty file (0 bytes)")
    fmt = _sniff(head)
    if fmt is None:
        raise InputError(f"{p}: not an image file this reader knows (PNG, JPEG, BMP, TIFF, "
                         f"EXR); first bytes {head[:8]!r}")
    try:
        if fmt == "png":
            return _read_png(p, grey)
        if fmt == "tiff":
            return _read_tiff(p, grey, float_scale)
        if fmt == "exr":
            return _read_exr(p, grey)
        return _read_pillow(p, fmt, grey)
    except InputError:
        raise
    except MemoryError as err:
        raise InputError(f"{p}: image too large to decode ({err})") from err
    except Exception as err:  # noqa: BLE001 - decoders raise OSError/ValueError/SyntaxError/
        # struct.error/EOFError/zlib.error/KeyError/IndexError/... on malformed files
        msg = " ".join(str(err).split())[:200] or type(err).__name__
        raise InputError(f"{p}: corrupt, truncated or unsupported {fmt.upper()} file: "
                         f"{msg}") from err
