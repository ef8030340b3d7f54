"""TFDS builder for ``spectral_scenes``: synthetic HSI scenes made from measured spectra.

Loaded by file path through :func:`jaxspec.data.load_builder_module` (``datasets/`` is not a
package). Scene generation is :mod:`jaxspec.data.scenes`; RGB rendering is
:mod:`jaxspec.physics`. No TensorFlow: ``Tensor``/``Text`` features only, ``array_record``
files. See ``docs/spectral_scenes.md``.

Configs
-------
* ``clean`` (default): 96×96 scenes, 400/50/50, rgb = project(hsi, get_srf("cie1964")),
  float32, no noise (the NTIRE 2020 "Clean" convention without 8-bit quantisation).
* ``real``: same scenes, rgb from ``jaxspec.physics.ntire2022_camera`` (shot noise at a random
  npe in [500, 3000], exposure to mean 0.18, 8-bit, Pillow JPEG at a random quality in
  [60, 90]) through a camera drawn per example from nikon_d5100 / canon_5d_mk2 /
  sigma_sd_merrill; rgb holds 0..255 code values, ``camera`` and ``params`` record the choice.
* ``large``: 128×128 scenes, 2400/200/200, clean rendering, for longer training.
* ``tiny``: 32×32 scenes, 8/4/4, clean rendering, for tests.

Splits use disjoint reflectance sets (``jaxspec.data.spectra.split_pool``: class-stratified
70/15/15), so test materials never occur in training scenes.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from jaxspec.data import scenes as _scenes
from jaxspec.data import spectra as _spectra

_CAMERAS_REAL = ("nikon_d5100", "canon_5d_mk2", "sigma_sd_merrill")
_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class SpectralScenesConfig(tfds.core.BuilderConfig):
    """Builder config: scene size, split sizes, RGB rendering and seeds."""
    height: int = 96
    width: int = 96
    num_examples: tuple = (400, 50, 50)   # train, validation, test
    rgb_mode: str = "clean"               # "clean" | "real"
    seed: int = 0
    split_seed: int = 20240611
    include_modelled: bool = False


class Builder(tfds.core.GeneratorBasedBuilder):
    """Synthetic hyperspectral scenes (31 bands, 400-700 nm) with RGB renderings."""

    name = "spectral_scenes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (generator 1.0.0)."}
    BUILDER_CONFIGS = [
        SpectralScenesConfig(name="clean", description="96x96, 400/50/50, CIE-1964 RGB, noiseless.",
                             height=96, width=96, num_examples=(400, 50, 50), rgb_mode="clean"),
        SpectralScenesConfig(name="real", description="96x96, 400/50/50, NTIRE-2022-like camera "
                             "(shot noise, exposure, 8-bit, JPEG), camera per example.",
                             height=96, width=96, num_examples=(400, 50, 50), rgb_mode="real",
                             seed=1),
        SpectralScenesConfig(name="large", description="128x128, 2400/200/200, CIE-1964 RGB.",
                             height=128, width=128, num_examples=(2400, 200, 200),
                             rgb_mode="clean", seed=2),
        SpectralScenesConfig(name="tiny", description="32x32, 8/4/4, CIE-1964 RGB (tests).",
                             height=32, width=32, num_examples=(8, 4, 4), rgb_mode="clean",
                             seed=3),
    ]
    DEFAULT_CONFIG_NAME = "clean"

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        h, w, nb = c.height, c.width, _spectra.N_BANDS
        T = tfds.features.Tensor
        enc = tfds.features.Encoding
        features = tfds.features.FeaturesDict({
            "hsi": T(shape=(h, w, nb), dtype=np.float32, encoding=enc.BYTES,
                     doc="scaled radiance, 99.9th percentile = 0.9, > 0"),
            "rgb": T(shape=(h, w, 3), dtype=np.float32, encoding=enc.BYTES,
                     doc="clean: linear hsi @ srf; real: 0..255 code values after JPEG"),
            "bands": T(shape=(nb,), dtype=np.float32, doc="band centres, nm"),
            "name": tfds.features.Text(doc="scene key <config>/<split>/<index>"),
            "label": T(shape=(h, w), dtype=np.int32, encoding=enc.ZLIB,
                       doc="material class id (jaxspec.data.spectra.MATERIAL_CLASSES)"),
            "srf": T(shape=(nb, 3), dtype=np.float32, doc="SRF used for rgb (sum_g normalised)"),
            "reflectance": T(shape=(h, w, nb), dtype=np.float32, encoding=enc.ZLIB,
                             doc="diffuse reflectance (floored at 1e-3)"),
            "illuminant": tfds.features.Text(doc="primary[+secondary] illuminant ids"),
            "camera": tfds.features.Text(doc="SRF name used for rgb"),
            "params": tfds.features.Text(doc="JSON scene parameters (regenerate with "
                                              "jaxspec.data.scenes.regenerate)"),
        })
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=features,
            disable_shuffling=True,
            homepage="https://github.com/colour-science/colour ; https://github.com/earth-chris/earthlib",
            citation=("Ohta 1997 (ColorChecker); Pascale 2006 (BabelColor); Luo et al. 2024 (PMC); "
                      "AMPAS rawtoaces; CIE 224:2017; CIE 13.3-1995; Davis & Ohno 2010 (NIST CQS); "
                      "Anderson 2023 (earthlib) and its ICRAF-ISRIC, UCSB, JFSP, USGS sources."),
            license="Code Apache-2.0; spectra: colour-science BSD-3-Clause, earthlib MIT "
                    "(upstream libraries: attribution).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        if c.rgb_mode not in ("clean", "real"):
            raise ValueError(f"rgb_mode must be 'clean' or 'real', got {c.rgb_mode!r}")
        return {s: self._generate_examples(s, n) for s, n in zip(_SPLITS, c.num_examples)}

    def _generate_examples(self, split: str, n: int):
        for i in range(n):
            yield i, make_example(self.builder_config, split, i)


def make_example(config: SpectralScenesConfig, split: str, index: int) -> dict:
    """One example dict (numpy); deterministic in (config, split, index)."""
    import jax

    from jaxspec import physics

    scene_cfg = _scenes.SceneConfig(height=config.height, width=config.width)
    sc = _scenes.generate_scene(config.seed, split, index, config=scene_cfg,
                                include_modelled=config.include_modelled,
                                split_seed=config.split_seed)
    params = dict(sc.params)
    if config.rgb_mode == "clean":
        camera = "cie1964"
        srf = physics.get_srf(camera)
        rgb = np.asarray(physics.project(sc.hsi, srf), dtype=np.float32)
    else:
        rng = np.random.default_rng([config.seed, _scenes.SPLIT_IDS[split], index, 0xCA3])
        camera = _CAMERAS_REAL[int(rng.integers(len(_CAMERAS_REAL)))]
        npe = float(rng.uniform(500.0, 3000.0))
        quality = int(rng.integers(60, 91))
        srf = physics.get_srf(camera)
        key = jax.random.key(int(rng.integers(2**31 - 1)))
        rgb = np.asarray(physics.ntire2022_camera(key, sc.hsi, srf, npe=npe, jpeg_quality=quality,
                                                  jpeg_backend="pil"), dtype=np.float32)
        params["camera_pipeline"] = {"kind": "ntire2022", "npe": npe, "jpeg_quality": quality,
                                     "target_mean": 0.18}
    params["camera"] = camera
    params["builder_config"] = config.name
    return {
        "hsi": sc.hsi,
        "rgb": rgb,
        "bands": _spectra.WAVELENGTHS.astype(np.float32),
        "name": f"{config.name}/{split}/{index:05d}",
        "label": sc.label,
        "srf": np.asarray(srf, dtype=np.float32),
        "reflectance": sc.reflectance,
        "illuminant": "+".join(sc.illuminants),
        "camera": camera,
        "params": json.dumps(params, sort_keys=True, separators=(",", ":")),
    }
