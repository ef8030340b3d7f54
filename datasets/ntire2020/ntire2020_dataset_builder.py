"""TFDS builder for NTIRE 2020 Spectral Reconstruction (ARAD_HS), Clean and RealWorld tracks.

Common schema: ``hsi`` float32 (482, 512, 31) from the challenge ``.mat`` (key ``cube``, v5 or
v7.3, detected with ``h5py.is_hdf5``; values as stored, about [0, 1]); ``rgb`` float32 0..255
code values of the track's 8-bit input (``clean``: lossless ``_clean.png``; ``real_world``:
``_RealWorld.jpg``), RGB order; ``bands`` 400..700 nm step 10 (from the file's ``bands`` when
present); ``name`` the scene id (``ARAD_HS_0001``).

Splits come from the challenge folders: ``train`` = ``NTIRE2020_Train_Spectral`` (450 scenes),
``validation`` = ``NTIRE2020_Validation_Spectral`` (10). The test tracks have no public ground
truth and are not built.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxspec.data import builder_utils

N_BANDS = 31
DEFAULT_BANDS = np.arange(400.0, 701.0, 10.0, dtype=np.float32)
_ID = re.compile(r"^ARAD_HS_(\d{4})$")
_SPLIT_FOLDERS = {"train": "Train", "validation": "Validation"}

EXPECTED_LAYOUT = """\
  <manual_dir>/NTIRE2020_Train_Spectral/ARAD_HS_0001.mat ...   (MATLAB v5 or v7.3, key 'cube')
  <manual_dir>/NTIRE2020_Train_Clean/ARAD_HS_0001_clean.png ...        (config 'clean')
  <manual_dir>/NTIRE2020_Train_RealWorld/ARAD_HS_0001_RealWorld.jpg ... (config 'real_world')
  <manual_dir>/NTIRE2020_Validation_Spectral/ARAD_HS_0451.mat ...
  <manual_dir>/NTIRE2020_Validation_Clean/ or NTIRE2020_Validation_RealWorld/
  (folders may sit one level down, e.g. <manual_dir>/NTIRE2020/NTIRE2020_Train_Spectral/)"""


@dataclasses.dataclass(eq=False)
class Ntire2020Config(tfds.core.BuilderConfig):
    """``track``: ``"Clean"`` or ``"RealWorld"`` (folder and file suffix)."""
    track: str = "Clean"
    suffix: str = "_clean.png"


class Builder(builder_utils.RealDatasetBuilder):
    """NTIRE 2020 spectral reconstruction: 31-band cubes with Clean or RealWorld RGB."""

    name = "ntire2020"
    BUILDER_CONFIGS = [
        Ntire2020Config(name="clean", description="Clean track: CIE-1964-based RGB, 8-bit PNG.",
                        track="Clean", suffix="_clean.png"),
        Ntire2020Config(name="real_world", description="RealWorld track: mosaic + noise + "
                        "demosaic + JPEG (quality 80).", track="RealWorld",
                        suffix="_RealWorld.jpg"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Register for the NTIRE 2020 Spectral Reconstruction challenge (CodaLab; data by B. Arad, BGU)
and extract the Train/Validation Spectral archives plus the Clean and/or RealWorld RGB archives
into manual_dir:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    HSI_SCALE = "as stored (about [0, 1])"
    RGB_DESCRIPTION = "0..255 (8-bit, hsi projected through the track's camera response)"
    # Clean: "calculated numerically using the ground-truth HS images and supplied spectral
    # sensitivity functions" (Arad et al. 2020), i.e. linear; RealWorld adds noise, demosaicing
    # and JPEG to the same linear projection. Linear code values 0..255 for both tracks.
    RGB_ENCODING = "linear"
    RGB_SCALE = 255.0
    HOMEPAGE = "https://competitions.codalab.org/competitions/22225"
    CITATION = ("Arad et al., NTIRE 2020 Challenge on Spectral Reconstruction from an RGB "
                "Image, CVPRW 2020.")
    LICENSE = "Research use per the NTIRE 2020 challenge terms."

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        cfg = self.builder_config
        splits = {}
        for split, folder in _SPLIT_FOLDERS.items():
            spec_name = f"NTIRE2020_{folder}_Spectral"
            spec = self.require_dir(root, spec_name)
            rgb = self.require_dir(root, f"NTIRE2020_{folder}_{cfg.track}")
            mats = builder_utils.scan_files(spec, "ARAD_HS_*.mat", _scene_stem, recursive=False)
            if not mats:
                raise self.layout_error(root, f"{spec_name}/ARAD_HS_*.mat")
            pairs = []
            for mat in mats.values():
                img = rgb / f"{mat.stem}{cfg.suffix}"
                if not img.is_file():
                    raise FileNotFoundError(f"ntire2020: RGB image {img} for {mat} not found")
                pairs.append((mat, img))
            splits[split] = self._generate_examples(pairs)
        return splits

    def _generate_examples(self, pairs):
        for mat, img in pairs:
            yield mat.stem, load_example(mat, img)


def _scene_stem(path: Path) -> str | None:
    return path.stem if _ID.match(path.stem) else None


def load_example(mat: Path, img: Path) -> dict:
    """One example: the ``cube`` (v5 or v7.3), its ``bands`` (default 400..700 nm) and the
    track's 8-bit RGB image (RGB order, 0..255)."""
    return builder_utils.cube_rgb_example(mat, img, n_bands=N_BANDS, default_bands=DEFAULT_BANDS)
