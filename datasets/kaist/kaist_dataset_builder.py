"""TFDS builder for the KAIST hyperspectral database (Choi et al., SIGGRAPH Asia 2017).

Common schema: ``hsi`` float32 (H, W, 31) reflectance as stored in
``sceneNN_reflectance.exr`` (OpenEXR float channels named with their wavelength, e.g.
``w420nm``; 31 bands 420..720 nm step 10 are expected; the size, about 2704 x 3376, is read
from the header's displayWindow); ``bands`` parsed from the channel names; ``rgb`` float32
linear RGB rendered through the config's SRF on those bands (``srf`` stored; the files' own
R/G/B channels are not used); ``name`` the scene (``scene01``).

Splits (no standard one): scenes sorted by name; the first 10 of 30 -> ``test`` (CASSI
benchmarks test on 10 KAIST scenes; their 256 x 256 crops are not reproduced here), the rest
-> ``train``; with fewer scenes present the count is scaled: ``round(n * 10 / 30)``.
One example is a full image (about 1.1 GB as float32); the loader's random crops take it from
there.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils, readers

N_BANDS = 31
EXPECTED_BANDS = np.arange(420.0, 721.0, 10.0, dtype=np.float32)
N_SCENES, N_TEST = 30, 10
_NAME = re.compile(r"^(scene\d+)_reflectance\.exr$", re.IGNORECASE)

EXPECTED_LAYOUT = """\
  <manual_dir>/scene01_reflectance.exr ... scene30_reflectance.exr  (any folder depth;
  OpenEXR with one float channel per band named with its wavelength, e.g. 'w420nm')"""


#: KAIST's config: the SRF of the rendered RGB only.
KaistConfig = builder_utils.RenderConfig


class Builder(builder_utils.RealDatasetBuilder):
    """KAIST: 30 scenes, 31-band reflectance 420-720 nm, OpenEXR."""

    name = "kaist"
    BUILDER_CONFIGS = [KaistConfig(name="default", description="First 10 scenes test; RGB = hsi "
                                   "@ CIE-1964 SRF.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the KAIST hyperspectral dataset (Choi et al. 2017, "High-Quality Hyperspectral
Reconstruction Using a Spectral Prior", http://vclab.kaist.ac.kr/siggraphasia2017p1/) and place
the EXR files in manual_dir:
{EXPECTED_LAYOUT}
Reading needs the OpenEXR package (pip install 'jaxspec[exr]')."""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    RENDERED = True
    HSI_SCALE = "reflectance as stored"
    HOMEPAGE = "http://vclab.kaist.ac.kr/siggraphasia2017p1/"
    CITATION = ("Choi, Jeon, Rhee, Kim, Kim, High-Quality Hyperspectral Reconstruction "
                "Using a Spectral Prior, ACM TOG (SIGGRAPH Asia) 2017.")
    LICENSE = "KAIST dataset: research use with citation (see the project page)."

    def _split_generators(self, dl_manager):
        root = self.manual_root(dl_manager)
        scenes = builder_utils.scan_files(root, "*_reflectance.exr", _scene_name)
        if len(scenes) < 2:
            raise self.layout_error(root, "at least two sceneNN_reflectance.exr files")
        n_test = readers.proportional_count(len(scenes), N_TEST, N_SCENES)
        test, train = builder_utils.split_head(scenes, n_test)
        return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

    def _generate_examples(self, items):
        srf_for = builder_utils.SrfCache(self.builder_config.srf)
        for name, path in items:
            hsi, bands = load_scene(path)
            yield name, builder_utils.rendered_example(hsi, bands, name, srf_for(bands))


def _scene_name(path: Path) -> str | None:
    m = _NAME.match(path.name)
    return m.group(1).lower() if m else None


def load_scene(path: Path) -> tuple[np.ndarray, np.ndarray]:
    cube, wls, _ = readers.read_exr(path)
    if wls.shape != (N_BANDS,):
        raise ValueError(f"{path}: {wls.size} spectral channels, expected {N_BANDS} "
                         f"(420-720 nm); wavelengths {wls.tolist()}")
    if np.max(np.abs(wls - EXPECTED_BANDS)) > 5.0:
        raise ValueError(f"{path}: channel wavelengths {wls.tolist()} are not 420..720 nm step 10")
    return readers.check_cube(cube, path, N_BANDS), wls.astype(np.float32)
