"""TFDS builder for ARAD-1K, the NTIRE 2022 Spectral Recovery challenge data.

Examples follow the common schema (docs/architecture.md): ``hsi`` float32 (482, 512, 31) as
stored in the challenge ``.mat`` files (key ``cube``, already normalised to about [0, 1]),
``rgb`` float32 (482, 512, 3) holding the challenge JPEG's 0..255 code values in RGB order,
``bands`` 400..700 nm step 10 (from the file's ``bands`` when present), ``name`` the file stem.
No ``srf``: the challenge camera response is private.

Splits (MST++ ``split_txt``): ``train`` = ARAD_1K_0001..0900 minus 0314, 0340, 0531 (897
scenes), ``validation`` = ARAD_1K_0901..0950 (50). The test RGB (0951..1000) has no public
ground truth and is not built. Evaluation follows the NTIRE protocol: metrics on the centre
crop ``[128:-128, 128:-128]`` (:data:`EVAL_CROP_BORDER`, also in ``info.metadata``).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils

#: Pixels dropped on each side before scoring (NTIRE 2022 ``Conf.CROP = [128:-128, 128:-128]``).
EVAL_CROP_BORDER = 128
N_BANDS = 31
DEFAULT_BANDS = np.arange(400.0, 701.0, 10.0, dtype=np.float32)
#: MST++ ``train_list.txt`` drops these three scenes (reason undocumented).
EXCLUDED_TRAIN_IDS = (314, 340, 531)
TRAIN_IDS = tuple(i for i in range(1, 901) if i not in EXCLUDED_TRAIN_IDS)
VALID_IDS = tuple(range(901, 951))
SPEC_DIRS = ("Train_Spec", "Train_spectral", "Valid_Spec", "Valid_spectral")
RGB_DIRS = ("Train_RGB", "Valid_RGB")
_ID = re.compile(r"^ARAD_1K_(\d{4})$")

EXPECTED_LAYOUT = """\
  <manual_dir>/Train_Spec/ARAD_1K_0001.mat ... (or Train_spectral/; MATLAB v7.3, key 'cube')
  <manual_dir>/Train_RGB/ARAD_1K_0001.jpg ...
  <manual_dir>/Valid_Spec/ARAD_1K_0901.mat ... (or Valid_spectral/)
  <manual_dir>/Valid_RGB/ARAD_1K_0901.jpg ...
  or MST++'s merged layout: Train_Spec/ and Train_RGB/ holding ARAD_1K_0001..0950.
  The folders may also sit one level down, e.g. <manual_dir>/ARAD_1K/Train_Spec/."""


class Builder(builder_utils.RealDatasetBuilder):
    """ARAD-1K (NTIRE 2022 spectral recovery): 31-band cubes with 8-bit JPEG RGB."""

    name = "arad1k"
    EVAL_CROP_BORDER = EVAL_CROP_BORDER  # read by jaxspec.train.loop.protocol_crop_border
    RELEASE_NOTES = {"1.0.0": "Initial release: MST++ 897/50 split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Register for the NTIRE 2022 Spectral Reconstruction challenge (CodaLab) or follow the download
links in the MST++ README (github.com/caiyuanhao1998/MST-plus-plus). Extract the training and
validation spectral and RGB archives into manual_dir:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    HSI_SCALE = "as stored (about [0, 1])"
    RGB_DESCRIPTION = "0..255 (8-bit JPEG, simulated camera, no display tone curve)"
    # The challenge RGB is simulated from the cubes (camera response, noise, JPEG), without an
    # sRGB tone curve: linear code values 0..255. predict linearises an sRGB photo to match.
    RGB_ENCODING = "linear"
    RGB_SCALE = 255.0
    HOMEPAGE = "https://codalab.lisn.upsaclay.fr/competitions/721"
    CITATION = ("Arad et al., NTIRE 2022 Spectral Recovery Challenge and Data Set, CVPRW 2022; "
                "Cai et al., MST++, CVPRW 2022 (split).")
    LICENSE = "Research use per the NTIRE 2022 challenge terms."

    def _extra_metadata(self) -> dict:
        return {"eval_crop_border": EVAL_CROP_BORDER}

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        pairs = find_pairs(root)
        splits = {}
        for split, ids in (("train", TRAIN_IDS), ("validation", VALID_IDS)):
            chosen = [(i, *pairs[i]) for i in ids if i in pairs]
            if not chosen:
                scenes = f"ARAD_1K_{ids[0]:04d}..{ids[-1]:04d}.mat with its .jpg"
                raise self.layout_error(root, f"any {split} scene ({scenes})")
            splits[split] = self._generate_examples(chosen)
        return splits

    def _generate_examples(self, chosen):
        for i, mat, jpg in chosen:
            yield f"ARAD_1K_{i:04d}", load_example(mat, jpg)


def find_pairs(root: Path) -> dict[int, tuple[Path, Path]]:
    """``{scene id: (mat, jpg)}`` over every spectral/RGB folder present under ``root``.

    A cube without its JPEG raises ``FileNotFoundError`` naming the missing JPEG.
    """
    spec_dirs = [d for name in SPEC_DIRS for d in _dirs(root, name)]
    if not spec_dirs:
        raise Builder.layout_error(root, f"a spectral folder ({' or '.join(SPEC_DIRS)})")
    rgb_dirs = [d for name in RGB_DIRS for d in _dirs(root, name)]
    if not rgb_dirs:
        raise Builder.layout_error(root, f"an RGB folder ({' or '.join(RGB_DIRS)})")
    mats: dict[int, Path] = {}
    for d in spec_dirs:
        found = builder_utils.scan_files(d, "ARAD_1K_*.mat", _scene_id, recursive=False)
        for i, p in found.items():
            mats.setdefault(i, p)
    if not mats:
        raise Builder.layout_error(root, f"ARAD_1K_*.mat in {[str(d) for d in spec_dirs]}")
    pairs = {}
    for i, mat in sorted(mats.items()):
        jpg = next((d / f"ARAD_1K_{i:04d}.jpg" for d in rgb_dirs
                    if (d / f"ARAD_1K_{i:04d}.jpg").is_file()), None)
        if jpg is None:
            raise FileNotFoundError(
                f"arad1k: RGB image ARAD_1K_{i:04d}.jpg for {mat} not found in "
                f"{[str(d) for d in rgb_dirs]}")
        pairs[i] = (mat, jpg)
    return pairs


def _scene_id(path: Path) -> int | None:
    m = _ID.match(path.stem)
    return int(m.group(1)) if m else None


def _dirs(root: Path, name: str) -> list[Path]:
    return [d for d in (root / name, root / "ARAD_1K" / name, *sorted(root.glob(f"*/{name}")))
            if d.is_dir()][:1]


def load_example(mat: Path, jpg: Path) -> dict:
    """One example: the v7.3 ``cube`` (``.T`` -> (H, W, 31)), its ``bands`` (default 400..700
    nm) and its JPEG (RGB order, 0..255)."""
    return builder_utils.cube_rgb_example(mat, jpg, n_bands=N_BANDS, default_bands=DEFAULT_BANDS)
