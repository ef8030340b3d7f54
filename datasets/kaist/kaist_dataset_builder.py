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

import dataclasses
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxspec.data import readers

N_BANDS = 31
EXPECTED_BANDS = np.arange(420.0, 721.0, 10.0, dtype=np.float32)
N_SCENES, N_TEST = 30, 10
_NAME = re.compile(r"^(scene\d+)_reflectance\.exr$", re.IGNORECASE)

EXPECTED_LAYOUT = """\
  <manual_dir>/scene01_reflectance.exr ... scene30_reflectance.exr  (any folder depth;
  OpenEXR with one float channel per band named with its wavelength, e.g. 'w420nm')"""


@dataclasses.dataclass(eq=False)
class KaistConfig(tfds.core.BuilderConfig):
    srf: str = "cie1964"


class Builder(tfds.core.GeneratorBasedBuilder):
    """KAIST: 30 scenes, 31-band reflectance 420-720 nm, OpenEXR."""

    name = "kaist"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [KaistConfig(name="default", description="First 10 scenes test; RGB = hsi "
                                   "@ CIE-1964 SRF.")]
    DEFAULT_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download the KAIST hyperspectral dataset (Choi et al. 2017, "High-Quality Hyperspectral
Reconstruction Using a Spectral Prior", http://vclab.kaist.ac.kr/siggraphasia2017p1/) and place
the EXR files in manual_dir:
{EXPECTED_LAYOUT}
Reading needs the OpenEXR package (pip install 'jaxspec[exr]')."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=readers.common_features(N_BANDS, srf=True),
            metadata=tfds.core.MetadataDict(hsi_scale="reflectance as stored",
                                            rgb_scale="linear, hsi @ srf",
                                            srf=self.builder_config.srf),
            disable_shuffling=True,
            homepage="http://vclab.kaist.ac.kr/siggraphasia2017p1/",
            citation=("Choi, Jeon, Rhee, Kim, Kim, High-Quality Hyperspectral Reconstruction "
                      "Using a Spectral Prior, ACM TOG (SIGGRAPH Asia) 2017."),
            license="KAIST dataset: research use with citation (see the project page).",
        )

    def _split_generators(self, dl_manager):
        root = readers.manual_root(dl_manager, self.name, EXPECTED_LAYOUT)
        scenes: dict[str, Path] = {}
        for p in sorted(root.rglob("*_reflectance.exr")):
            m = _NAME.match(p.name)
            if m:
                scenes.setdefault(m.group(1).lower(), p)
        if len(scenes) < 2:
            raise readers.missing_layout_error(self.name, root, EXPECTED_LAYOUT,
                                               "at least two sceneNN_reflectance.exr files")
        names = sorted(scenes)
        n_test = readers.proportional_count(len(names), N_TEST, N_SCENES)
        srf_name = self.builder_config.srf
        return {"train": self._generate_examples([(n, scenes[n]) for n in names[n_test:]], srf_name),
                "test": self._generate_examples([(n, scenes[n]) for n in names[:n_test]], srf_name)}

    def _generate_examples(self, items, srf_name):
        for name, path in items:
            hsi, bands = load_scene(path)
            srf = readers.srf_on_bands(srf_name, bands)
            yield name, {"hsi": hsi, "rgb": readers.render_rgb(hsi, srf), "bands": bands,
                         "name": name, "srf": srf}


def load_scene(path: Path) -> tuple[np.ndarray, np.ndarray]:
    cube, wls, _ = readers.read_exr(path)
    if wls.shape != (N_BANDS,):
        raise ValueError(f"{path}: {wls.size} spectral channels, expected {N_BANDS} "
                         f"(420-720 nm); wavelengths {wls.tolist()}")
    if np.max(np.abs(wls - EXPECTED_BANDS)) > 5.0:
        raise ValueError(f"{path}: channel wavelengths {wls.tolist()} are not 420..720 nm step 10")
    return readers.check_cube(cube, path, N_BANDS), wls.astype(np.float32)
