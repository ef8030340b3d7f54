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

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxspec.data import readers

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


@dataclasses.dataclass(eq=False)
class IcvlConfig(tfds.core.BuilderConfig):
    srf: str = "cie1964"


class Builder(tfds.core.GeneratorBasedBuilder):
    """ICVL: ~201 outdoor/indoor radiance images, 31 bands 400-700 nm."""

    name = "icvl"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [IcvlConfig(name="default", description="10-image test list; RGB = hsi @ "
                                  "CIE-1964 SRF.", srf="cie1964")]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the 31-band .mat files from the BGU ICVL hyperspectral database
(https://icvl.cs.bgu.ac.il/hyperspectral/, also mirrored as "BGU Hyperspectral Database") into
manual_dir:
{EXPECTED_LAYOUT}"""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=readers.common_features(N_BANDS, srf=True),
            metadata=tfds.core.MetadataDict(hsi_scale="radiance counts / 4095",
                                            rgb_scale="linear, hsi @ srf",
                                            srf=self.builder_config.srf,
                                            test_images=list(TEST_IMAGES)),
            disable_shuffling=True,
            homepage="https://icvl.cs.bgu.ac.il/hyperspectral/",
            citation=("Arad & Ben-Shahar, Sparse Recovery of Hyperspectral Signal from Natural "
                      "RGB Images, ECCV 2016."),
            license="BGU ICVL database: research use with citation.",
        )

    def _split_generators(self, dl_manager):
        root = readers.manual_root(dl_manager, self.name, EXPECTED_LAYOUT)
        files: dict[str, Path] = {}
        for p in sorted(root.rglob("*.mat")):
            files.setdefault(p.stem, p)
        if not files:
            raise readers.missing_layout_error(self.name, root, EXPECTED_LAYOUT, "any *.mat file")
        test = [files[n] for n in TEST_IMAGES if n in files]
        train = [p for n, p in sorted(files.items()) if n not in TEST_IMAGES]
        if not test:
            raise readers.missing_layout_error(self.name, root, EXPECTED_LAYOUT,
                                               f"any test image ({TEST_IMAGES[0]}.mat, ...)")
        if not train:
            raise readers.missing_layout_error(self.name, root, EXPECTED_LAYOUT,
                                               "any training image (a .mat not in the test list)")
        srf_name = self.builder_config.srf
        return {"train": self._generate_examples(train, srf_name),
                "test": self._generate_examples(test, srf_name)}

    def _generate_examples(self, paths, srf_name):
        srfs: dict[bytes, np.ndarray] = {}
        for p in paths:
            hsi, bands = load_image(p)
            key = bands.tobytes()
            if key not in srfs:
                srfs[key] = readers.srf_on_bands(srf_name, bands)
            srf = srfs[key]
            yield p.stem, {"hsi": hsi, "rgb": readers.render_rgb(hsi, srf), "bands": bands,
                           "name": p.stem, "srf": srf}


def load_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(rad / 4095 as float32 (H, W, 31), bands (31,))`` from one v7.3 file."""
    data = readers.read_mat(path, "rad", optional=["bands"])
    rad = np.asarray(data["rad"])
    if rad.ndim != 3 or rad.shape[-1] != N_BANDS:
        raise ValueError(f"{path}: 'rad' has shape {rad.shape}, expected (H, W, {N_BANDS})")
    hsi = readers.check_cube(rad.astype(np.float64) / MAX_COUNT, path, N_BANDS)
    bands = DEFAULT_BANDS
    if "bands" in data:
        bands = np.asarray(data["bands"], np.float32).reshape(-1)
        if bands.shape != (N_BANDS,):
            raise ValueError(f"{path}: 'bands' has {bands.size} values, expected {N_BANDS}")
    return hsi, bands
