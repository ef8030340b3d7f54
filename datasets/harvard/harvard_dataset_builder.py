"""TFDS builder for the Harvard real-world hyperspectral database (Chakrabarti & Zickler 2011).

Common schema: ``hsi`` float32 (1040, 1392, 31), 420..720 nm step 10, normalised per image:
``hsi = x / max(x)`` with ``x = ref * calib`` (``calib`` = the 31 per-band multipliers of an
optional ``calib.txt`` next to the images or in manual_dir; 1 otherwise) and the maximum taken
over valid pixels (``lbl != 0``; all pixels if none are marked). ``ref`` is uncalibrated
radiance-like data, not reflectance despite its name. ``label`` int32 (H, W) is the ``lbl``
mask (0 = invalid: moving objects / saturation; do not train or score there). ``rgb`` float32
is rendered linearly through the config's SRF on the 420-720 nm grid (``srf`` stored).
``name``: ``CZ_hsdb/imga1`` style (folder/stem).

Splits (no official one): image files sorted by name (``CZ_hsdb`` outdoor/daylight and
``CZ_hsdbi`` indoor together); every 5th (indices 4, 9, 14, ...) -> ``test``, the rest ->
``train`` (about 80/20, stratified over both folders by the sort order).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils, readers

N_BANDS = 31
BANDS = np.arange(420.0, 721.0, 10.0, dtype=np.float32)
FOLDERS = ("CZ_hsdb", "CZ_hsdbi")
TEST_EVERY = 5

EXPECTED_LAYOUT = """\
  <manual_dir>/CZ_hsdb/img*.mat    (MATLAB v5, keys 'ref' (H, W, 31) and 'lbl' (H, W))
  <manual_dir>/CZ_hsdbi/img*.mat   (optional indoor set)
  <manual_dir>/CZ_hsdb/calib.txt   (optional: 31 per-band multipliers)"""


@dataclasses.dataclass(eq=False)
class HarvardConfig(builder_utils.RenderConfig):
    """``use_calib``: multiply by ``calib.txt`` when present; ``srf``: RGB rendering SRF."""
    use_calib: bool = True


class Builder(builder_utils.RealDatasetBuilder):
    """Harvard: 50 daylight + 27 indoor scenes, 31 bands 420-720 nm, with validity masks."""

    name = "harvard"
    BUILDER_CONFIGS = [HarvardConfig(name="default", description="Every 5th image test; "
                                     "per-image max normalisation; RGB = hsi @ CIE-1964 SRF.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download CZ_hsdb.zip (and optionally CZ_hsdbi.zip) from
http://vision.seas.harvard.edu/hyperspec/ and extract into manual_dir:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    LABEL = RENDERED = True
    HSI_SCALE = "per-image max = 1"
    HOMEPAGE = "http://vision.seas.harvard.edu/hyperspec/"
    CITATION = "Chakrabarti & Zickler, Statistics of Real-World Hyperspectral Images, CVPR 2011."
    LICENSE = "Harvard hyperspectral database: research use with citation."

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        folders = [d for d in (readers.find_dir(root, [f]) for f in FOLDERS) if d is not None]
        if not folders:
            raise self.layout_error(root, "CZ_hsdb/")
        files = sorted((p for d in folders for p in d.glob("*.mat")),
                       key=lambda p: (p.parent.name, p.stem))
        if len(files) < 2:
            raise self.layout_error(root, "at least two CZ_hsdb/img*.mat files")
        test = files[TEST_EVERY - 1 :: TEST_EVERY] or files[-1:]
        train = [p for p in files if p not in test]
        srf = readers.srf_on_bands(self.builder_config.srf, BANDS)
        return {"train": self._generate_examples(train, root, srf),
                "test": self._generate_examples(test, root, srf)}

    def _generate_examples(self, paths, root, srf):
        for p in paths:
            calib = find_calib(p, root) if self.builder_config.use_calib else None
            hsi, label = load_image(p, calib)
            name = f"{p.parent.name}/{p.stem}"
            yield name, builder_utils.rendered_example(hsi, BANDS, name, srf, label)


def find_calib(mat: Path, root: Path) -> np.ndarray | None:
    """The 31 multipliers of ``calib.txt`` beside ``mat`` or in ``root``; None if absent."""
    for cand in (mat.parent / "calib.txt", root / "calib.txt"):
        if cand.is_file():
            try:
                vals = np.array(cand.read_text().replace(",", " ").split(), dtype=np.float64)
            except ValueError as err:
                raise ValueError(f"{cand}: not a list of numbers: {err}") from err
            if vals.shape != (N_BANDS,) or not np.all(np.isfinite(vals)) or np.any(vals <= 0):
                raise ValueError(f"{cand}: expected {N_BANDS} positive multipliers, got {vals.size}")
            return vals
    return None


def load_image(path: Path, calib: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(hsi, label)``: ``hsi = ref * calib / max over valid pixels``, ``label = lbl != 0``."""
    data = readers.read_mat(path, ["ref", "lbl"])
    ref = np.asarray(data["ref"], np.float64)
    if ref.ndim != 3 or ref.shape[-1] != N_BANDS:
        raise ValueError(f"{path}: 'ref' has shape {ref.shape}, expected (H, W, {N_BANDS})")
    lbl = np.asarray(data["lbl"])
    if lbl.shape != ref.shape[:2]:
        raise ValueError(f"{path}: 'lbl' shape {lbl.shape} differs from 'ref' {ref.shape[:2]}")
    if calib is not None:
        ref = ref * calib
    label = (lbl != 0).astype(np.int32)
    valid = ref[label.astype(bool)] if label.any() else ref
    peak = float(valid.max())
    if not np.isfinite(peak) or peak <= 0:
        raise ValueError(f"{path}: 'ref' maximum is {peak}; cannot normalise")
    return readers.check_cube(ref / peak, path, N_BANDS), label
