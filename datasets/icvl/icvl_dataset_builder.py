"""TFDS builder for the ICVL / BGU hyperspectral database (Arad & Ben-Shahar, ECCV 2016).

Common schema: ``hsi`` float32 (H, W, 31) = ``rad`` / 4095 (12-bit radiance counts; v7.3
``.mat``, read with h5py and transposed, typically 1392 x 1300, some images shorter);
``rgb`` float32 (H, W, 3) linear RGB rendered from ``hsi`` through the config's SRF
(``rgb = hsi @ srf``, default ``"cie1964"``; the files' own ``rgb`` variable has undocumented
provenance and is not used); ``srf`` stored; ``bands`` from the file's ``bands`` (400..700 nm
step 10 when absent); ``name`` the file stem.

Splits (no official one): ``test`` = the 10-image list common in the literature
(:data:`TEST_IMAGES`, e.g. ayoungkim-tech/Unrolled_C-DOE_HSI), ``train`` = every other
``.mat`` found.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils, readers

N_BANDS = 31
DEFAULT_BANDS = np.arange(400.0, 701.0, 10.0, dtype=np.float32)
#: ICVL radiance is 12-bit: counts / 4095 gives [0, 1].
MAX_COUNT = 4095.0
TEST_IMAGES = (
    "4cam_0411-1648", "BGU_0522-1203", "Master5000K_2900K", "bguCAMP_0514-1659",
    "bgu_0403-1459", "eve_0331-1551", "gavyam_0823-0933", "lehavim_0910-1600",
    "objects_0924-1601", "omer_0331-1118",
)

EXPECTED_LAYOUT = """\
  <manual_dir>/**/<image>.mat   (MATLAB v7.3, keys 'rad' (and 'bands'); 31-band files, any
  folder depth), including the 10 test images, e.g. <manual_dir>/BGU_0522-1203.mat"""

#: ICVL's config: the SRF of the rendered RGB only.
IcvlConfig = builder_utils.RenderConfig


class Builder(builder_utils.RealDatasetBuilder):
    """ICVL: ~201 outdoor/indoor radiance images, 31 bands 400-700 nm."""

    name = "icvl"
    BUILDER_CONFIGS = [IcvlConfig(
        name="default", description="10-image test list; RGB = hsi @ CIE-1964 SRF.", srf="cie1964")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the 31-band .mat files from the BGU ICVL hyperspectral database
(https://icvl.cs.bgu.ac.il/hyperspectral/, also mirrored as "BGU Hyperspectral Database") into
manual_dir:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    RENDERED = True
    HSI_SCALE = "radiance counts / 4095"
    HOMEPAGE = "https://icvl.cs.bgu.ac.il/hyperspectral/"
    CITATION = ("Arad & Ben-Shahar, Sparse Recovery of Hyperspectral Signal from Natural "
                "RGB Images, ECCV 2016.")
    LICENSE = "BGU ICVL database: research use with citation."

    def _extra_metadata(self) -> dict:
        return {"test_images": list(TEST_IMAGES)}

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        files = builder_utils.scan_files(root, "*.mat")
        if not files:
            raise self.layout_error(root, "any *.mat file")
        test = [files[n] for n in TEST_IMAGES if n in files]
        train = [p for n, p in sorted(files.items()) if n not in TEST_IMAGES]
        if not test:
            raise self.layout_error(root, f"any test image ({TEST_IMAGES[0]}.mat, ...)")
        if not train:
            raise self.layout_error(root, "any training image (a .mat not in the test list)")
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, paths):
        srf_for = builder_utils.SrfCache(self.builder_config.srf)
        for p in paths:
            hsi, bands = load_image(p)
            yield p.stem, builder_utils.rendered_example(hsi, bands, p.stem, srf_for(bands))


def load_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(rad / 4095 as float32 (H, W, 31), bands (31,))`` from one v7.3 file."""
    data = readers.read_mat(path, "rad", optional=["bands"])
    rad = np.asarray(data["rad"])
    if rad.ndim != 3 or rad.shape[-1] != N_BANDS:
        raise ValueError(f"{path}: 'rad' has shape {rad.shape}, expected (H, W, {N_BANDS})")
    hsi = readers.check_cube(rad.astype(np.float64) / MAX_COUNT, path, N_BANDS)
    return hsi, builder_utils.optional_bands(data, path, N_BANDS, DEFAULT_BANDS)
