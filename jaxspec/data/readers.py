"""Readers for the on-disk formats of the real spectral datasets.

Every reader returns numpy arrays in image orientation, bands last, (H, W, C), and follows
one error contract:

* a missing file raises :class:`~jaxspec.errors.DataNotFoundError` (a ``FileNotFoundError``)
  naming the path;
* a corrupt, truncated or unexpected file raises :class:`~jaxspec.errors.DataError` (a
  ``ValueError``) naming the path and the problem. No other exception escapes a reader for a
  malformed file (``tests/test_readers_fuzz.py`` feeds them mutated files).

Formats (see ``/docs/datasets.md`` for which dataset uses which):

* MATLAB ``.mat``: v7.3 files are HDF5 and are read with h5py; MATLAB stores arrays
  column-major, so an array MATLAB calls (H, W, C) reads back from HDF5 as (C, W, H) and is
  transposed (``.T``). v4/v5/v7 files are read with ``scipy.io.loadmat`` and are already
  (H, W, C). The kind is detected with ``h5py.is_hdf5`` (which accepts MATLAB's 512-byte
  user block), never guessed from the file name.
* 16-bit PNG (CAVE bands): :func:`read_png16`; multi-channel band images (CAVE's
  ``watercolors``) are collapsed by :func:`collapse_channels`.
* 8-bit RGB images (JPEG/PNG/BMP): :func:`read_rgb_image`, always RGB channel order.
* OpenEXR (KAIST): :func:`read_exr`, wavelengths parsed from the channel names.
* GeoTIFF int16 (HySpecNet-11k / EnMAP): :func:`read_geotiff_int16` (tifffile, no GDAL).
* ENVI ``.hdr`` + raw binary (Chikusei): :func:`read_envi` (own header parser, numpy memmap).
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxspec.errors import DataError, DataNotFoundError

__all__ = [
    "MatArray",
    "EnviImage",
    "collapse_channels",
    "is_mat_v73",
    "open_mat_array",
    "parse_envi_header",
    "parse_wavelength_nm",
    "read_envi",
    "read_exr",
    "read_geotiff_int16",
    "read_mat",
    "read_png16",
    "read_rgb_image",
    # builder helpers
    "VISIBLE_RANGE_NM",
    "check_cube",
    "common_features",
    "find_dir",
    "manual_root",
    "missing_layout_error",
    "proportional_count",
    "render_rgb",
    "srf_on_bands",
]


def _typed_errors(what: str):
    """Decorator: any exception other than the project's typed errors raised while reading
    (h5py/scipy/Pillow/tifffile/numpy on a malformed file raise OSError, RuntimeError,
    KeyError, struct.error, ...) becomes a :class:`DataError` naming the file (the first
    argument) and ``what`` was being read."""
    import functools

    from jaxspec.errors import JaxspecError

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except JaxspecError:
                raise
            except (MemoryError, Exception) as err:  # noqa: BLE001 - see docstring
                target = args[0] if args else kwargs.get("path", "?")
                if isinstance(target, MatArray):
                    target = target.path
                msg = " ".join(str(err).split())[:300] or type(err).__name__
                raise DataError(f"{target}: corrupt, truncated or unreadable {what}: "
                                f"{msg}") from err
        return wrapper
    return deco


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DataNotFoundError(f"File not found: {p}")
    return p


# ----------------------------------------------------------------------------- MATLAB
@_typed_errors('MATLAB file')
def is_mat_v73(path: str | os.PathLike) -> bool:
    """True when ``path`` is a MATLAB v7.3 (HDF5) file, False for v4/v5/v7."""
    import h5py

    p = _existing_file(path)
    return bool(h5py.is_hdf5(str(p)))


def _h5_to_matlab(ds, path: Path, key: str) -> np.ndarray:
    import h5py

    if not isinstance(ds, h5py.Dataset):
        raise DataError(
            f"{path}: key {key!r} is a MATLAB struct/group, not a numeric array"
        )
    try:
        arr = ds[()]
    except (OSError, RuntimeError) as err:
        raise DataError(f"{path}: cannot read {key!r} (corrupt or truncated file): {err}") from err
    arr = np.asarray(arr)
    if arr.dtype.names is not None:  # MATLAB complex arrays: compound (real, imag)
        arr = arr["real"] + 1j * arr["imag"]
    return arr.T  # column-major (C, W, H) -> MATLAB's (H, W, C)


@_typed_errors('MATLAB file')
def read_mat(path: str | os.PathLike, keys: str | Sequence[str],
             optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Reads variables from a MATLAB ``.mat`` file of any version.

    Args:
      path: the ``.mat`` file.
      keys: one variable name or several. Every name must exist.
      optional: names read only when present (e.g. ``bands``).

    Returns:
      ``{key: array}`` with each array in MATLAB's orientation (a MATLAB (H, W, C) variable
      comes back (H, W, C); a scalar comes back (1, 1); a row vector (1, N)), in the stored
      dtype. v7.3 (HDF5) data is transposed (``np.asarray(f[key]).T``); v5 data comes from
      ``scipy.io.loadmat`` unchanged.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is not a readable MATLAB file, or a key is missing (the message
        lists the variables present).
    """
    p = _existing_file(path)
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise DataError("read_mat: `keys` is empty")
    optional = [k for k in optional if k not in keys]
    if is_mat_v73(p):
        import h5py

        try:
            f = h5py.File(str(p), "r")
        except OSError as err:
            raise DataError(f"{p}: not a readable MATLAB v7.3/HDF5 file: {err}") from err
        with f:
            present = sorted(k for k in f.keys() if not k.startswith("#"))
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"{p}: variable(s) {missing} not found; present: {present}")
            return {k: _h5_to_matlab(f[k], p, k) for k in keys + [o for o in optional if o in f]}
    import scipy.io

    try:
        data = scipy.io.loadmat(str(p), variable_names=keys + optional)
    except Exception as err:  # scipy raises ValueError/TypeError/OSError/MatReadError
        raise DataError(f"{p}: not a readable MATLAB v5 file: {err}") from err
    missing = [k for k in keys if k not in data]
    if missing:
        try:
            present = sorted(n for n, *_ in scipy.io.whosmat(str(p)))
        except Exception:  # pragma: no cover - whosmat on a file loadmat just read
            present = []
        raise DataError(f"{p}: variable(s) {missing} not found; present: {present}")
    return {k: np.asarray(data[k]) for k in keys + [o for o in optional if o in data]}


class MatArray:
    """A lazily read MATLAB array in MATLAB's (H, W, C) orientation.

    For v7.3 files only the requested hyperslab is read from disk: ``a[r0:r1, c0:c1, :]`` maps
    to ``ds[:, c0:c1, r0:r1].T`` on the HDF5 dataset, so a crop of a multi-gigabyte cube
    (Chikusei) never loads the whole array. v5 files are loaded whole (scipy cannot do
    partial reads). Supports basic slicing with steps of 1 only. Use as a context manager or
    call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = _existing_file(path)
        self._file = None
        try:
            self._open(key)
        except BaseException:
            self.close()
            raise

    @_typed_errors("MATLAB file")
    def _open(self, key: str) -> None:
        self.key = key
        self._file = None
        self._ds = None
        self._array = None
        if is_mat_v73(self.path):
            import h5py

            try:
                self._file = h5py.File(str(self.path), "r")
            except OSError as err:
                raise DataError(f"{self.path}: not a readable MATLAB v7.3/HDF5 file: {err}") from err
            if key not in self._file:
                present = sorted(self._file.keys())
                self._file.close()
                raise DataError(f"{self.path}: variable {key!r} not found; present: {present}")
            ds = self._file[key]
            if not isinstance(ds, h5py.Dataset):
                self._file.close()
                raise DataError(f"{self.path}: key {key!r} is a MATLAB struct/group, not an array")
            self._ds = ds
            self.shape = tuple(reversed(ds.shape))
            self.dtype = ds.dtype
        else:
            self._array = read_mat(self.path, key)[key]
            self.shape = self._array.shape
            self.dtype = self._array.dtype
        self.ndim = len(self.shape)

    @_typed_errors("MATLAB array")
    def __getitem__(self, index) -> np.ndarray:
        if self._array is not None:
            return np.asarray(self._array[index])
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > self.ndim or any(not isinstance(s, slice) for s in index):
            raise DataError("MatArray supports only basic slices, e.g. a[0:10, 5:20, :]")
        index = index + (slice(None),) * (self.ndim - len(index))
        for s in index:
            if s.step not in (None, 1):
                raise DataError("MatArray slices must have step 1")
        try:
            out = self._ds[tuple(reversed(index))]
        except (OSError, RuntimeError) as err:
            raise DataError(
                f"{self.path}: cannot read {self.key!r} (corrupt or truncated file): {err}"
            ) from err
        return np.asarray(out).T

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MatArray":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_mat_array(path: str | os.PathLike, key: str) -> MatArray:
    """Opens ``key`` of a ``.mat`` file lazily (see :class:`MatArray`)."""
    return MatArray(path, key)


# ----------------------------------------------------------------------------- PNG
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_header(path: Path) -> tuple[int, int, int, int]:
    with open(path, "rb") as fh:
        head = fh.read(33)
    if len(head) < 33 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file (bad signature or IHDR)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, depth, colour


def _decode_png16_multichannel(path: Path, width: int, height: int, colour: int) -> np.ndarray:
    """Exact decoder for non-interlaced 16-bit grey+alpha / RGB / RGBA PNGs.

    Pillow reduces 16-bit multi-channel PNGs to 8 bits; this keeps all 16. The PNG scanline
    filters (None, Sub, Up, Average, Paeth) are undone per row (PNG spec section 9).
    """
    data = path.read_bytes()
    pos, idat, interlace = 8, [], 0
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if len(body) < length:
            raise DataError(f"{path}: truncated PNG chunk {ctype!r}")
        if ctype == b"IHDR":
            interlace = body[12]
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + length
    if interlace:
        raise DataError(f"{path}: interlaced 16-bit multi-channel PNGs are not supported")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise DataError(f"{path}: corrupt PNG image data: {err}") from err
    channels = _PNG_CHANNELS[colour]
    bpp = 2 * channels
    stride = width * bpp
    if len(raw) < height * (stride + 1):
        raise DataError(f"{path}: truncated PNG image data")
    rows = np.frombuffer(raw, np.uint8)[: height * (stride + 1)].reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        ftype = int(rows[y, 0])
        line = rows[y, 1:].astype(np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 1:  # Sub: x = f + x[i-bpp]; a running sum per byte lane
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) & 0xFF
        elif ftype == 2:  # Up
            cur = (line + prev) & 0xFF
        elif ftype in (3, 4):  # Average / Paeth: sequential along the row
            cur = np.empty(stride, np.int32)
            for i in range(stride):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b = int(prev[i])
                if ftype == 3:
                    pred = (a + b) >> 1
                else:
                    c = int(prev[i - bpp]) if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                cur[i] = (int(line[i]) + pred) & 0xFF
        else:
            raise DataError(f"{path}: bad PNG filter type {ftype} in row {y}")
        out[y] = cur
        prev = cur
    return out.view(">u2").reshape(height, width, channels).astype(np.uint16)


@_typed_errors('PNG')
def read_png16(path: str | os.PathLike) -> np.ndarray:
    """Reads a PNG as uint16 on the 16-bit scale (0..65535).

    16-bit greyscale is returned as stored, (H, W). 8-bit images are rescaled by 257 (so that
    value / 65535 has the same meaning). Multi-channel images are returned (H, W, K) with all
    channels (including alpha); pass them to :func:`collapse_channels`.
    """
    from PIL import Image, UnidentifiedImageError

    p = _existing_file(path)
    width, height, depth, colour = _png_header(p)
    if colour not in _PNG_CHANNELS:
        raise DataError(f"{p}: invalid PNG colour type {colour}")
    if depth == 16 and _PNG_CHANNELS[colour] > 1:
        return _decode_png16_multichannel(p, width, height, colour)
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{p}: corrupt or truncated PNG: {err}") from err
    if arr.dtype == np.uint8 or arr.dtype == bool:
        return arr.astype(np.uint16) * 257
    if arr.dtype.kind in "iu":
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"{p}: PNG values outside the 16-bit range")
        return arr.astype(np.uint16)
    raise DataError(f"{p}: unsupported PNG pixel type {arr.dtype}")


# ITU-R BT.601 luma weights (MATLAB's rgb2gray, used by ISET's loadCAVEData); they sum to 1,
# so a replicated grey image collapses to itself exactly.
_LUMA = np.array([0.299, 0.587, 0.114])


def collapse_channels(img: np.ndarray) -> np.ndarray:
    """Collapses a multi-channel band image to one channel (CAVE ``watercolors`` quirk).

    ``(H, W)`` is returned unchanged. ``(H, W, K)``: alpha is dropped (K = 2 or 4); K = 1 gives
    that channel; K = 3 gives BT.601 luma as MATLAB ``rgb2gray``: 0.299 R + 0.587 G + 0.114 B (exact when
    the channels are replicated grey, which is what these files hold). Returns float64.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        return img.astype(np.float64)
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"collapse_channels: expected (H, W) or (H, W, 1..4), got {img.shape}")
    k = img.shape[-1]
    if k in (1, 2):
        return img[..., 0].astype(np.float64)
    return img[..., :3].astype(np.float64) @ _LUMA


# ----------------------------------------------------------------------------- RGB
@_typed_errors('image')
def read_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an 8-bit JPEG/PNG/BMP as uint8 (H, W, 3) in RGB order (alpha dropped, grey
    replicated, palettes expanded). Files written by OpenCV from BGR arrays are standard
    files, so decoding with Pillow yields RGB."""
    from PIL import Image, UnidentifiedImageError

    p = _existing_file(path)
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise DataError(f"{p}: expected an 8-bit RGB image, got mode {im.mode}")
            arr = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{p}: corrupt or truncated image: {err}") from err
    return np.ascontiguousarray(arr, dtype=np.uint8)


# ----------------------------------------------------------------------------- EXR
_WL_PATTERNS = (
    re.compile(r"(\d+(?:[.,]\d+)?)\s*nm", re.IGNORECASE),  # w420nm, S0.420,00nm, 420.5nm
    re.compile(r"(?:^|[._\-])w(\d+(?:\.\d+)?)$", re.IGNORECASE),  # w420
    re.compile(r"^(\d+(?:\.\d+)?)$"),  # 420
)


def parse_wavelength_nm(name: str) -> float | None:
    """Wavelength in nm from a spectral channel name, or None when it has none.

    Accepts ``w420nm`` (KAIST), ``S0.420,00nm`` / ``420.00nm`` (spectral EXR conventions),
    ``w420`` and a bare ``420``; a range ``400-410nm`` gives its centre.
    """
    rng = re.search(r"(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*nm", name, re.IGNORECASE)
    if rng:
        return 0.5 * (float(rng.group(1)) + float(rng.group(2)))
    for pat in _WL_PATTERNS:
        m = pat.search(name)
        if m:
            return float(m.group(1).replace(",", "."))
    return None


@_typed_errors('EXR file')
def read_exr(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Reads a multispectral OpenEXR file (OpenEXR 3.x Python API).

    Returns:
      ``(cube, wavelengths, others)``: ``cube`` float32 (H, W, C) with the spectral channels
      sorted by wavelength, ``wavelengths`` float32 (C,) in nm parsed from the channel names
      (:func:`parse_wavelength_nm`), and ``others`` the non-spectral channels (e.g. R, G, B)
      as float32 (H, W). H and W come from the header's displayWindow; the dataWindow pixels
      are placed at their offset inside it (pixels outside the dataWindow are 0).
    """
    import OpenEXR

    p = _existing_file(path)
    try:
        with OpenEXR.File(str(p), separate_channels=True) as f:
            header = f.header()  # a live view: copy what is needed before the file closes
            display = [np.array(v, np.int64) for v in header["displayWindow"]]
            window = [np.array(v, np.int64) for v in header["dataWindow"]]
            channels = {name: np.array(ch.pixels) for name, ch in f.channels().items()}
    except Exception as err:  # OpenEXR raises RuntimeError/ValueError/KeyError on bad input
        raise DataError(f"{p}: corrupt, truncated or non-EXR file: {err}") from err
    (dx0, dy0), (dx1, dy1) = display
    (wx0, wy0), (wx1, wy1) = window
    height, width = int(dy1 - dy0 + 1), int(dx1 - dx0 + 1)

    def place(px: np.ndarray, name: str) -> np.ndarray:
        if px.shape != (wy1 - wy0 + 1, wx1 - wx0 + 1):
            raise DataError(f"{p}: channel {name!r} has shape {px.shape}, not the dataWindow")
        out = np.zeros((height, width), np.float32)
        y0, x0 = int(wy0 - dy0), int(wx0 - dx0)
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + px.shape[0], height), min(x0 + px.shape[1], width)
        if ye > ys and xe > xs:
            out[ys:ye, xs:xe] = px[ys - y0 : ye - y0, xs - x0 : xe - x0]
        return out

    spectral, others = [], {}
    for name, px in channels.items():
        wl = parse_wavelength_nm(name)
        if wl is None:
            others[name] = place(px, name)
        else:
            spectral.append((wl, name, px))
    if not spectral:
        raise DataError(f"{p}: no spectral channels (names with a wavelength) among {sorted(channels)}")
    spectral.sort(key=lambda t: t[0])
    wls = np.array([w for w, _, _ in spectral], np.float32)
    if np.any(np.diff(wls) <= 0):
        raise DataError(f"{p}: duplicate wavelengths in channel names {[n for _, n, _ in spectral]}")
    cube = np.stack([place(px, n) for _, n, px in spectral], axis=-1)
    return cube, wls, others


# ----------------------------------------------------------------------------- GeoTIFF
@_typed_errors('GeoTIFF')
def read_geotiff_int16(path: str | os.PathLike) -> tuple[np.ndarray, int | None]:
    """Reads a multi-band int16 GeoTIFF (EnMAP L2A / HySpecNet-11k) with tifffile.

    Returns ``(array, nodata)``: int16 (H, W, C) whatever the interleave on disk, and the
    GDAL nodata value (TIFF tag 42113) or None.
    """
    import tifffile

    p = _existing_file(path)
    try:
        with tifffile.TiffFile(str(p)) as tif:
            series = tif.series[0]
            axes = series.axes
            arr = series.asarray()
            tag = tif.pages[0].tags.get(42113)
            nodata = None
            if tag is not None:
                try:
                    nodata = int(float(str(tag.value).strip("\x00 ")))
                except ValueError:
                    nodata = None
    except Exception as err:  # tifffile/zlib/imagecodecs raise many types on bad input
        raise DataError(f"{p}: corrupt, truncated or non-TIFF file: {err}") from err
    if arr.dtype != np.int16:
        raise DataError(f"{p}: expected int16 data, got {arr.dtype}")
    if arr.ndim == 2:
        return arr[..., None], nodata
    if arr.ndim != 3:
        raise DataError(f"{p}: expected a 3-D band stack, got shape {arr.shape} (axes {axes})")
    if axes.endswith("YX"):  # band-interleaved: (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    elif not axes.startswith("YX"):
        raise DataError(f"{p}: unrecognised axis order {axes!r}")
    return np.ascontiguousarray(arr), nodata


# ----------------------------------------------------------------------------- ENVI
_ENVI_DTYPES = {
    1: np.uint8, 2: np.int16, 3: np.int32, 4: np.float32, 5: np.float64,
    12: np.uint16, 13: np.uint32, 14: np.int64, 15: np.uint64,
}


@_typed_errors('ENVI header')
def parse_envi_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parses an ENVI ``.hdr`` file into ``{lower-case key: str | list[str]}``.

    Braced values ``{a, b, ...}`` (which may span lines) become lists of stripped strings.
    """
    p = _existing_file(path)
    text = p.read_text(errors="replace")
    lines = text.splitlines()
    if not lines or not lines[0].strip().upper().startswith("ENVI"):
        raise DataError(f"{p}: not an ENVI header (first line must be 'ENVI')")
    out: dict[str, Any] = {}
    i = 1
    while i < len(lines):
        line = lines[i]
        i += 1
        if "=" not in line:
            continue
        key, val = line.split("=", 1)
        key, val = key.strip().lower(), val.strip()
        if val.startswith("{"):
            while "}" not in val and i < len(lines):
                val += " " + lines[i].strip()
                i += 1
            if "}" not in val:
                raise DataError(f"{p}: unterminated '{{' in value of {key!r}")
            inner = val[1 : val.index("}")]
            out[key] = [v.strip() for v in inner.split(",") if v.strip()] if key != "description" else inner.strip()
        else:
            out[key] = val
    return out


class EnviImage:
    """An ENVI image: ``data`` is a read-only memmap viewed as (H, W, C); ``wavelengths`` is
    float32 (C,) in nm or None; ``header`` the parsed header."""

    def __init__(self, data: np.ndarray, wavelengths: np.ndarray | None, header: dict[str, Any], path: Path):
        self.data, self.wavelengths, self.header, self.path = data, wavelengths, header, path

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape


def _envi_data_file(hdr: Path, header: dict[str, Any]) -> Path:
    if "data file" in header:
        cand = hdr.parent / str(header["data file"])
        if cand.is_file():
            return cand
    stem = hdr.with_suffix("")
    for cand in (stem, *(stem.with_suffix(s) for s in (".dat", ".img", ".raw", ".bsq", ".bil", ".bip", ".DAT", ".IMG", ".RAW"))):
        if cand.is_file():
            return cand
    raise DataNotFoundError(
        f"ENVI data file for {hdr} not found (looked for {stem.name} with no extension or "
        f".dat/.img/.raw/.bsq/.bil/.bip)"
    )


@_typed_errors('ENVI image')
def read_envi(path: str | os.PathLike) -> EnviImage:
    """Opens an ENVI image from its ``.hdr`` (the raw file beside it is memory-mapped).

    Header keys used: ``samples`` (W), ``lines`` (H), ``bands`` (C), ``data type``,
    ``interleave`` (bsq: (C, H, W) on disk; bil: (H, C, W); bip: (H, W, C)), ``byte order``
    (0 little, 1 big), ``header offset``, ``wavelength`` and ``wavelength units``
    (micrometres are converted to nm; unitless values below 10 are taken as micrometres).
    """
    hdr = _existing_file(path)
    header = parse_envi_header(hdr)
    try:
        width, height, bands = (int(header[k]) for k in ("samples", "lines", "bands"))
        dtype_code = int(header["data type"])
    except KeyError as err:
        raise DataError(f"{hdr}: ENVI header lacks required key {err.args[0]!r}") from err
    except ValueError as err:
        raise DataError(f"{hdr}: bad integer in ENVI header: {err}") from err
    if dtype_code not in _ENVI_DTYPES:
        raise DataError(f"{hdr}: unsupported ENVI data type {dtype_code}")
    dtype = np.dtype(_ENVI_DTYPES[dtype_code]).newbyteorder(">" if header.get("byte order", "0").strip() == "1" else "<")
    interleave = str(header.get("interleave", "bsq")).lower()
    disk_shape = {"bsq": (bands, height, width), "bil": (height, bands, width), "bip": (height, width, bands)}
    if interleave not in disk_shape:
        raise DataError(f"{hdr}: unknown interleave {interleave!r}")
    offset = int(header.get("header offset", 0))
    data_path = _envi_data_file(hdr, header)
    needed = offset + width * height * bands * dtype.itemsize
    if data_path.stat().st_size < needed:
        raise DataError(
            f"{data_path}: truncated ENVI data file ({data_path.stat().st_size} bytes, header "
            f"{hdr.name} needs {needed})"
        )
    mm = np.memmap(data_path, dtype=dtype, mode="r", offset=offset, shape=disk_shape[interleave])
    view = {"bsq": (1, 2, 0), "bil": (0, 2, 1), "bip": (0, 1, 2)}[interleave]
    data = mm.transpose(view)
    wl = None
    if "wavelength" in header:
        try:
            wl = np.array([float(v) for v in header["wavelength"]], np.float64)
        except ValueError as err:
            raise DataError(f"{hdr}: bad wavelength list: {err}") from err
        if wl.shape != (bands,):
            raise DataError(f"{hdr}: {wl.size} wavelengths for {bands} bands")
        units = str(header.get("wavelength units", "")).lower()
        if units.startswith("micro") or units in ("um", "µm") or (not units.startswith("nano") and units not in ("nm",) and wl.max() < 10):
            wl = wl * 1000.0
        wl = wl.astype(np.float32)
    return EnviImage(data, wl, header, hdr)



# ----------------------------------------------------------------------------- builder helpers
# Shared by the real-data TFDS builders in ``datasets/<name>/`` (which are not a package and so
# cannot share a module of their own).

#: The visible range outside which an RGB rendering SRF is set to zero (nm). Camera curves are
#: extrapolated with constant end values by :func:`jaxspec.physics.get_srf`; for wide-range
#: sensors (Chikusei 363-1018 nm, EnMAP 418-2445 nm) that would leak NIR/SWIR into RGB.
VISIBLE_RANGE_NM = (360.0, 830.0)


def srf_on_bands(name: str, bands: np.ndarray) -> np.ndarray:
    """SRF ``name`` sampled at arbitrary band centres ``bands`` (any order), float32 (C, 3).

    ``S[l] = get_srf(name, sorted(bands))`` un-normalised, set to 0 outside
    :data:`VISIBLE_RANGE_NM`, then scaled so the green column sums to 1 (the physics
    ``"sum_g"`` convention: a flat unit spectrum renders to G = 1), and returned in the order
    of ``bands``.
    """
    from jaxspec.physics import get_srf, normalize_srf

    bands = np.asarray(bands, np.float64)
    order = np.argsort(bands, kind="stable")
    wl = bands[order]
    if np.any(np.diff(wl) <= 0):
        raise DataError(f"srf_on_bands: duplicate band centres in {bands}")
    s = np.asarray(get_srf(name, wl, normalize=None), np.float64)
    s[(wl < VISIBLE_RANGE_NM[0]) | (wl > VISIBLE_RANGE_NM[1])] = 0.0
    s = normalize_srf(s, "sum_g")
    out = np.empty_like(s)
    out[order] = s
    return out.astype(np.float32)


def render_rgb(hsi: np.ndarray, srf: np.ndarray) -> np.ndarray:
    """Linear RGB ``rgb[h, w, k] = sum_c hsi[h, w, c] * srf[c, k]`` as float32 (numpy, used at
    build time; identical to :func:`jaxspec.physics.project`)."""
    hsi = np.asarray(hsi, np.float32)
    if hsi.shape[-1] != srf.shape[0]:
        raise DataError(f"render_rgb: hsi has {hsi.shape[-1]} bands, srf has {srf.shape[0]} rows")
    return np.tensordot(hsi, np.asarray(srf, np.float32), axes=([-1], [0])).astype(np.float32)


def common_features(n_bands: int, *, label: bool = False, srf: bool = False):
    """The common example schema (docs/architecture.md) as a ``tfds.features.FeaturesDict``.

    Spatial sizes are dynamic (``None``) because real images differ in size; images are stored
    as raw bytes (``Encoding.BYTES``), the label map zlib-compressed.
    """
    import tensorflow_datasets as tfds

    T, enc = tfds.features.Tensor, tfds.features.Encoding
    feats = {
        "hsi": T(shape=(None, None, n_bands), dtype=np.float32, encoding=enc.BYTES,
                 doc="spectral cube (H, W, C) in the dataset's declared scale"),
        "rgb": T(shape=(None, None, 3), dtype=np.float32, encoding=enc.BYTES,
                 doc="RGB in its native scale (8-bit sources: 0..255; rendered: linear)"),
        "bands": T(shape=(n_bands,), dtype=np.float32, doc="band centre wavelengths, nm"),
        "name": tfds.features.Text(doc="example id"),
    }
    if label:
        feats["label"] = T(shape=(None, None), dtype=np.int32, encoding=enc.ZLIB,
                           doc="per-pixel class / validity map")
    if srf:
        feats["srf"] = T(shape=(n_bands, 3), dtype=np.float32,
                         doc="SRF the rgb was rendered with (sum_g normalised)")
    return tfds.features.FeaturesDict(feats)


def manual_root(dl_manager, dataset: str, expected: str) -> Path:
    """The manual directory of a TFDS download manager, or a ``FileNotFoundError`` that names
    the directory and the expected layout (``expected``: a short description of the paths)."""
    try:
        return Path(os.fspath(dl_manager.manual_dir))
    except AssertionError as err:
        where = getattr(dl_manager, "_manual_dir", None)
        raise DataNotFoundError(
            f"{dataset}: manual_dir {where} does not exist or is empty. Expected layout:\n"
            f"{expected}\n(see docs/datasets.md; pass it with --manual-dir)"
        ) from err


def find_dir(root: Path, candidates: Sequence[str], *, depth: int = 2) -> Path | None:
    """First directory named one of ``candidates`` (in preference order) at ``root`` or up to
    ``depth - 1`` levels below it (archives often extract into an extra folder)."""
    for name in candidates:
        for level in range(depth):
            pattern = "/".join(["*"] * level + [name])
            hits = sorted(p for p in root.glob(pattern) if p.is_dir())
            if hits:
                return hits[0]
    return None


def missing_layout_error(dataset: str, root: Path, expected: str, first_missing: str) -> FileNotFoundError:
    """A ``FileNotFoundError`` naming the manual_dir, the expected layout and the first thing
    not found."""
    return DataNotFoundError(
        f"{dataset}: {first_missing} not found under manual_dir {root}. Expected layout:\n{expected}"
    )


def proportional_count(n_available: int, n_part: int, n_total: int) -> int:
    """``round(n_available * n_part / n_total)`` clipped to [1, n_available - 1]: the size of a
    split defined on a full dataset of ``n_total`` items, applied to the ``n_available`` present
    (e.g. CAVE's 20-of-32 training scenes -> 4 of 6)."""
    if n_available < 2:
        raise DataError(f"need at least 2 items to split, found {n_available}")
    k = int(np.floor(n_available * n_part / n_total + 0.5))
    return min(max(k, 1), n_available - 1)


def check_cube(cube: np.ndarray, path: Path | str, n_bands: int | None = None) -> np.ndarray:
    """float32 (H, W, C) cube, finite; ``ValueError`` naming ``path`` otherwise."""
    cube = np.asarray(cube)
    if cube.ndim != 3:
        raise DataError(f"{path}: expected a (H, W, C) cube, got shape {cube.shape}")
    if n_bands is not None and cube.shape[-1] != n_bands:
        raise DataError(f"{path}: expected {n_bands} bands, got shape {cube.shape}")
    cube = cube.astype(np.float32, copy=False)
    if not np.all(np.isfinite(cube)):
        raise DataError(f"{path}: cube contains NaN or inf")
    return np.ascontiguousarray(cube)
