"""Writers of tiny fixtures in each real dataset's native on-disk format (used by
``tests/test_real_datasets.py``). Every writer produces a file the real reader would accept
from the original source: MATLAB v7.3 with its 512-byte user block and column-major storage,
scipy v5, 16-bit PNG (greyscale via Pillow, multi-channel with every PNG row filter), OpenEXR
with wavelength channel names, int16 GeoTIFF, ENVI header + raw."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_MAT_CLASS = {
    np.dtype(np.float64): b"double", np.dtype(np.float32): b"single",
    np.dtype(np.uint16): b"uint16", np.dtype(np.int16): b"int16", np.dtype(np.uint8): b"uint8",
    np.dtype(np.int32): b"int32", np.dtype(np.uint32): b"uint32", np.dtype(bool): b"logical",
}


def write_mat_v73(path: Path, variables: dict[str, np.ndarray]) -> Path:
    """A MATLAB v7.3 file: HDF5 with a 512-byte MAT header user block; each (H, W, C) array is
    stored column-major (``arr.T``, so h5py sees (C, W, H)) with its ``MATLAB_class``."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in variables.items():
            v = np.asarray(v)
            if v.ndim < 2:
                v = v.reshape(1, -1)
            ds = f.create_dataset(k, data=v.T)
            ds.attrs["MATLAB_class"] = np.bytes_(_MAT_CLASS[v.dtype])
    head = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    head = head.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(head.ljust(512, b"\x00"))
    return path


def write_mat_v5(path: Path, variables: dict[str, np.ndarray]) -> Path:
    import scipy.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables, do_compression=True)
    return path


def write_png16_grey(path: Path, img: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(img, np.uint16)).save(path)
    return path


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def write_png16_multichannel(path: Path, img: np.ndarray) -> Path:
    """A 16-bit grey+alpha / RGB / RGBA PNG (Pillow cannot write these). Row ``y`` uses PNG
    filter ``y % 5`` so every filter type (None, Sub, Up, Average, Paeth) is exercised."""
    img = np.asarray(img, ">u2")
    h, w, c = img.shape
    colour = {2: 4, 3: 2, 4: 6}[c]
    bpp = 2 * c
    rows = img.reshape(h, w * c).view(np.uint8).reshape(h, w * bpp).astype(np.int32)
    out = []
    prev = np.zeros(w * bpp, np.int32)
    for y in range(h):
        x = rows[y]
        a = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        cc = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        ftype = y % 5
        pred = [np.zeros_like(x), a, prev, (a + prev) >> 1, _paeth(a, prev, cc)][ftype]
        out.append(bytes([ftype]) + ((x - pred) & 0xFF).astype(np.uint8).tobytes())
        prev = x

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_rgb(path: Path, rgb_uint8: np.ndarray, **save_kwargs) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(rgb_uint8, np.uint8)).save(path, **save_kwargs)
    return path


def write_exr(path: Path, cube: np.ndarray, wavelengths, extra: dict | None = None,
              name_fmt: str = "w{:.0f}nm") -> Path:
    """KAIST-style multispectral EXR: one float channel per band named ``w420nm`` etc., plus
    ``extra`` channels (e.g. R, G, B)."""
    import OpenEXR

    chans = {name_fmt.format(wl): np.ascontiguousarray(cube[..., i], np.float32)
             for i, wl in enumerate(wavelengths)}
    for k, v in (extra or {}).items():
        chans[k] = np.ascontiguousarray(v, np.float32)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with OpenEXR.File(header, chans) as f:
        f.write(str(path))
    return path


def write_geotiff_int16(path: Path, cube_hwc: np.ndarray, nodata: int = -32768) -> Path:
    """EnMAP-style GeoTIFF: int16, band-interleaved (planar), deflate, GDAL nodata tag."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.moveaxis(np.asarray(cube_hwc, np.int16), -1, 0)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="separate",
                     compression="zlib", extratags=[(42113, "s", 0, str(nodata), True)])
    return path


def write_envi(hdr_path: Path, cube_hwc: np.ndarray, wavelengths=None, interleave: str = "bsq",
               data_ext: str = ".dat", byte_order: int = 0, units: str = "Nanometers") -> Path:
    codes = {np.dtype(np.uint16): 12, np.dtype(np.int16): 2, np.dtype(np.float32): 4,
             np.dtype(np.float64): 5}
    cube = np.asarray(cube_hwc)
    h, w, c = cube.shape
    disk = {"bsq": cube.transpose(2, 0, 1), "bil": cube.transpose(0, 2, 1), "bip": cube}[interleave]
    dt = cube.dtype.newbyteorder(">" if byte_order else "<")
    hdr_path = Path(hdr_path)
    hdr_path.parent.mkdir(parents=True, exist_ok=True)
    hdr_path.with_suffix(data_ext).write_bytes(np.ascontiguousarray(disk, dt).tobytes())
    lines = ["ENVI", "description = {test cube}", f"samples = {w}", f"lines   = {h}",
             f"bands   = {c}", "header offset = 0", "file type = ENVI Standard",
             f"data type = {codes[cube.dtype]}", f"interleave = {interleave}",
             f"byte order = {byte_order}"]
    if wavelengths is not None:
        lines.append(f"wavelength units = {units}")
        wl = list(wavelengths)
        lines.append("wavelength = {" + ",\n ".join(f"{v:.3f}" for v in wl) + "}")
    hdr_path.write_text("\n".join(lines) + "\n")
    return hdr_path


def truncate(path: Path, keep: int | None = None) -> Path:
    """Cut a file to ``keep`` bytes (default: half) to simulate an interrupted download."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: (len(data) // 2 if keep is None else keep)])
    return path


def smooth_cube(rng: np.random.Generator, h: int, w: int, c: int, lo: float = 0.05,
                hi: float = 0.95) -> np.ndarray:
    """A positive, spatially and spectrally smooth random cube in [lo, hi] (float64)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    t = np.linspace(0, 1, c)
    a, b, f = rng.uniform(0.2, 1.0, 3)
    cube = (0.5 + 0.25 * np.sin(2 * np.pi * (a * yy + f))[..., None] * np.cos(np.pi * t * b)
            + 0.2 * xx[..., None] * t)
    cube = (cube - cube.min()) / (np.ptp(cube) + 1e-12)
    return lo + (hi - lo) * cube
