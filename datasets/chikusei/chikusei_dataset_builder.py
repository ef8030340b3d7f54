"""TFDS builder for the Chikusei airborne hyperspectral scene (Yokoya & Iwasaki 2016).

Source: one Headwall Hyperspec-VNIR-C image, 2517 x 2335 pixels, 128 bands 363-1018 nm, 2.5 m
GSD, as MATLAB v7.3 (key ``chikusei``; h5py (128, 2335, 2517) -> ``.T`` (2517, 2335, 128)) or
the ENVI ``.hdr`` + raw version (band centres from the header).

The standard super-resolution protocol (SSPSR / HyperSR ``crop_and_save.m``):

1. centre crop to 2304 x 2048: MATLAB ``img(107:2410, 144:2191, :)``, i.e. 0-based rows
   106..2409 and columns 143..2190 (:attr:`ChikuseiConfig.crop`);
2. divide by the global maximum of the crop: ``hsi = img / max(img)``;
3. the top 512 rows give 4 non-overlapping 512 x 512 ``test`` images (``test_0``..``test_3``
   left to right);
4. the remaining 1792 x 2048 rows give the ``train`` split as non-overlapping
   ``patch_size`` x ``patch_size`` tiles (default 256 -> 7 x 8 = 56 tiles, named
   ``train_rRRRR_cCCCC`` by their top-left corner inside the crop); the loader's random crops
   (e.g. 64 x 64 for x4 SR) are drawn from these tiles.

Common schema: ``hsi`` float32 (h, w, 128) in [0, 1]; ``rgb`` float32 linear RGB rendered
through the config's SRF (zero outside 360-830 nm; ``srf`` stored); ``bands`` (128,) nm.
The crop is read block by block (h5py hyperslabs / ENVI memmap), never whole.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils, readers

N_BANDS = 128
#: Band centres when the source carries none (the MATLAB file): 363..1018 nm, evenly spaced.
DEFAULT_BANDS = np.linspace(363.0, 1018.0, N_BANDS).astype(np.float32)
MAT_NAME = "HyperspecVNIR_Chikusei_20140729.mat"
HDR_NAME = "HyperspecVNIR_Chikusei_20140729.hdr"
MAT_KEY = "chikusei"
_BLOCK_ROWS = 128

EXPECTED_LAYOUT = f"""\
  <manual_dir>/**/{MAT_NAME}   (MATLAB v7.3, key '{MAT_KEY}'), e.g.
      <manual_dir>/Hyperspec_Chikusei_MATLAB/Chikusei_MATLAB/{MAT_NAME}
  or <manual_dir>/**/{HDR_NAME} with its raw data file beside it (ENVI version)."""


@dataclasses.dataclass(eq=False)
class ChikuseiConfig(builder_utils.RenderConfig):
    """``crop``: (row0, row1, col0, col1), 0-based half-open, of the centre crop;
    ``test_size``: height and width of each test image (taken from the top rows);
    ``patch_size``: side of the non-overlapping training tiles; ``srf``: RGB rendering SRF."""
    crop: tuple = (106, 2410, 143, 2191)
    test_size: int = 512
    patch_size: int = 256


class Builder(builder_utils.RealDatasetBuilder):
    """Chikusei: 128-band VNIR airborne scene, SR protocol (4 test images + training tiles)."""

    name = "chikusei"
    RELEASE_NOTES = {"1.0.0": "Initial release: SSPSR centre crop, 4 x 512 test, 256 tiles."}
    BUILDER_CONFIGS = [ChikuseiConfig(name="default", description="Centre crop 2304x2048, / max, "
                                      "top 512 rows -> 4 test images, rest -> 256x256 tiles.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the MATLAB (or ENVI) version from https://naotoyokoya.com/Download.html
(Hyperspec_Chikusei_MATLAB.zip / Hyperspec_Chikusei_ENVI.zip) and extract into manual_dir:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    RENDERED = True
    HSI_SCALE = "global max of the crop = 1"
    HOMEPAGE = "https://naotoyokoya.com/Download.html"
    CITATION = ("Yokoya & Iwasaki, Airborne hyperspectral data over Chikusei, Tech. Rep. "
                "SAL-2016-05-27, Univ. Tokyo, 2016.")
    LICENSE = "CC BY 3.0 (acknowledgement and citation required)."

    def _extra_metadata(self) -> dict:
        c = self.builder_config
        return {"crop": list(c.crop), "test_size": c.test_size, "patch_size": c.patch_size}

    def _split_generators(self, dl_manager):
        source = find_source(self.manual_root(dl_manager))
        c = self.builder_config
        r0, r1, c0, c1 = (int(v) for v in c.crop)
        if not (0 <= r0 < r1 and 0 <= c0 < c1):
            raise ValueError(f"chikusei: invalid crop {c.crop}")
        if r1 - r0 <= c.test_size or (c1 - c0) < c.test_size:
            raise ValueError(f"chikusei: crop {c.crop} too small for test_size {c.test_size}")
        return {"train": self._generate_examples(source, "train"),
                "test": self._generate_examples(source, "test")}

    def _generate_examples(self, source: Path, split: str):
        c = self.builder_config
        with open_source(source) as img:
            arr, bands = img
            r0, r1, c0, c1 = (int(v) for v in c.crop)
            if arr.shape[0] < r1 or arr.shape[1] < c1 or arr.shape[2] != N_BANDS:
                raise ValueError(
                    f"{source}: image shape {arr.shape} cannot hold the crop rows {r0}:{r1}, "
                    f"cols {c0}:{c1} with {N_BANDS} bands")
            peak = crop_max(arr, c.crop, source)
            srf = readers.srf_on_bands(c.srf, bands)
            for name, (y, x, h, w) in tiles(c, split):
                block = np.asarray(arr[r0 + y : r0 + y + h, c0 + x : c0 + x + w, :], np.float64)
                hsi = readers.check_cube(block / peak, source, N_BANDS)
                yield name, builder_utils.rendered_example(hsi, bands, name, srf)


def tiles(c: ChikuseiConfig, split: str) -> list[tuple[str, tuple[int, int, int, int]]]:
    """``[(name, (y, x, h, w))]`` inside the crop for ``split`` (see the module docstring)."""
    r0, r1, c0, c1 = (int(v) for v in c.crop)
    height, width, t, p = r1 - r0, c1 - c0, c.test_size, c.patch_size
    if split == "test":
        return [(f"test_{k}", (0, k * t, t, t)) for k in range(width // t)]
    return [(f"train_r{y:04d}_c{x:04d}", (y, x, p, p))
            for y in range(t, height - p + 1, p) for x in range(0, width - p + 1, p)]


def find_source(root: Path) -> Path:
    """The ``.mat`` (preferred) or ENVI ``.hdr`` under ``root``."""
    for name in (MAT_NAME, HDR_NAME):
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    hits = sorted(root.rglob("*.mat")) + sorted(root.rglob("*.hdr"))
    hits = [h for h in hits if "ground_truth" not in h.name.lower()]
    if hits:
        return hits[0]
    raise Builder.layout_error(root, f"{MAT_NAME} or {HDR_NAME}")


class open_source:  # noqa: N801 - used as a context manager
    """Yields ``(array (H, W, 128) sliceable lazily, bands (128,))`` for a .mat or .hdr."""

    def __init__(self, path: Path):
        self.path, self._mat = path, None

    def __enter__(self):
        if self.path.suffix.lower() == ".hdr":
            img = readers.read_envi(self.path)
            bands = DEFAULT_BANDS if img.wavelengths is None else img.wavelengths
            return img.data, np.asarray(bands, np.float32)
        self._mat = readers.open_mat_array(self.path, MAT_KEY)
        if self._mat.ndim != 3:
            raise ValueError(f"{self.path}: '{MAT_KEY}' has shape {self._mat.shape}, expected 3-D")
        return self._mat, DEFAULT_BANDS

    def __exit__(self, *exc):
        if self._mat is not None:
            self._mat.close()


_MAX_CACHE: dict[tuple, float] = {}


def crop_max(arr, crop, source: Path) -> float:
    """``max(img[r0:r1, c0:c1, :])`` computed in blocks of rows (cached per file and crop, so
    the train and test generators share one pass)."""
    st = source.stat()
    key = (str(source.resolve()), st.st_mtime_ns, st.st_size, tuple(int(v) for v in crop))
    if key not in _MAX_CACHE:
        _MAX_CACHE[key] = _crop_max(arr, crop, source)
    return _MAX_CACHE[key]


def _crop_max(arr, crop, source: Path) -> float:
    r0, r1, c0, c1 = (int(v) for v in crop)
    peak = -np.inf
    for r in range(r0, r1, _BLOCK_ROWS):
        block = np.asarray(arr[r : min(r + _BLOCK_ROWS, r1), c0:c1, :])
        peak = max(peak, float(block.max()))
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError(f"{source}: maximum of the crop is {peak}; cannot normalise")
    return peak
