"""TFDS builder for the CAVE multispectral image database (Yasuma et al., Columbia, 2010).

Common schema: ``hsi`` float32 (512, 512, 31) relative reflectance = 16-bit PNG value / 65535
(band ``_NN`` is 400 + 10 (NN - 1) nm); ``rgb`` float32 (512, 512, 3) linear RGB rendered from
the reflectance through the config's SRF (``rgb = hsi @ srf``, default ``"cie1964"``, the
NTIRE 2020 Clean convention; ``srf`` stored with each example); ``bands`` 400..700 nm step 10;
``name`` the scene (e.g. ``balloons``). The shipped ``*_RGB.bmp`` sRGB renderings are not
stored (they are display-referred; render your own from ``hsi``).

Quirks handled: the scene folder is nested twice in the official zip
(``<scene>_ms/<scene>_ms/``) but once in some repacks, so scenes are found with
``**/*_ms_01.png``; ``watercolors_ms`` band PNGs are multi-channel and are collapsed
(:func:`jaxspec.data.readers.collapse_channels`, MATLAB ``rgb2gray`` weights; the channels hold
the same grey); stray files (``Thumbs.db``, ``*.bmp``) are ignored.

Splits (no official one; scene names sorted alphabetically):
* ``default``: first 20 -> ``train``, last 12 -> ``test`` (the common fusion/SR convention).
* ``fusion``: first 16 -> ``train``, last 16 -> ``test``.
With fewer than 32 scenes present the same rule is applied proportionally:
``n_train = round(n * 20 / 32)`` (resp. ``n * 16 / 32``), clipped to [1, n - 1].
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from jaxspec.data import builder_utils, readers

N_BANDS = 31
BANDS = np.arange(400.0, 701.0, 10.0, dtype=np.float32)
N_SCENES = 32
SCENES = (
    "balloons", "beads", "cd", "chart_and_stuffed_toy", "clay", "cloth", "egyptian_statue",
    "face", "fake_and_real_beers", "fake_and_real_food", "fake_and_real_lemon_slices",
    "fake_and_real_lemons", "fake_and_real_peppers", "fake_and_real_strawberries",
    "fake_and_real_sushi", "fake_and_real_tomatoes", "feathers", "flowers", "glass_tiles",
    "hairs", "jelly_beans", "oil_painting", "paints", "photo_and_face", "pompoms",
    "real_and_fake_apples", "real_and_fake_peppers", "sponges", "stuffed_toys", "superballs",
    "thread_spools", "watercolors",
)
_FIRST_BAND = re.compile(r"^(?P<scene>.+)_ms_01\.png$", re.IGNORECASE)

EXPECTED_LAYOUT = """\
  <manual_dir>/<scene>_ms/<scene>_ms/<scene>_ms_01.png ... _31.png  (official zip layout)
  or <manual_dir>/<scene>_ms/<scene>_ms_01.png ... (one level), at any depth below manual_dir,
  e.g. <manual_dir>/complete_ms_data/balloons_ms/balloons_ms/balloons_ms_01.png"""


@dataclasses.dataclass(eq=False)
class CaveConfig(builder_utils.RenderConfig):
    """``n_train``: training scenes out of the full 32 (rest test); ``srf``: RGB rendering SRF
    name for :func:`jaxspec.physics.get_srf`."""
    n_train: int = 20


class Builder(builder_utils.RealDatasetBuilder):
    """CAVE: 32 indoor scenes, 31 bands 400-700 nm, 16-bit reflectance PNGs."""

    name = "cave"
    BUILDER_CONFIGS = [
        CaveConfig(name="default", description="Alphabetical first 20 train / last 12 test; "
                   "RGB = hsi @ CIE-1964 SRF.", n_train=20, srf="cie1964"),
        CaveConfig(name="fusion", description="Alphabetical first 16 train / last 16 test; "
                   "RGB = hsi @ CIE-1964 SRF.", n_train=16, srf="cie1964"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download complete_ms_data.zip from https://cave.cs.columbia.edu/repository/Multispectral and
extract it into manual_dir:
{EXPECTED_LAYOUT}"""
    EXPECTED_LAYOUT = EXPECTED_LAYOUT
    N_BANDS = N_BANDS
    RENDERED = True
    HSI_SCALE = "reflectance [0, 1] (PNG / 65535)"
    HOMEPAGE = "https://cave.cs.columbia.edu/repository/Multispectral"
    CITATION = ("Yasuma, Mitsunaga, Iso, Nayar, Generalized Assorted Pixel Camera: "
                "Postcapture Control of Resolution, Dynamic Range and Spectrum, IEEE TIP 2010.")
    LICENSE = "Columbia CAVE research database: free for research use with citation."

    def _split_generators(self, dl_manager):
        scenes = find_scenes(self.manual_root(dl_manager))
        n_train = readers.proportional_count(len(scenes), self.builder_config.n_train, N_SCENES)
        train, test = builder_utils.split_head(scenes, n_train)
        srf = readers.srf_on_bands(self.builder_config.srf, BANDS)
        return {"train": self._generate_examples(train, srf),
                "test": self._generate_examples(test, srf)}

    def _generate_examples(self, items, srf):
        for name, folder in items:
            yield name, builder_utils.rendered_example(load_scene(folder, name), BANDS, name, srf)


def find_scenes(root: Path) -> dict[str, Path]:
    """``{scene: folder holding its band PNGs}`` for every ``*_ms_01.png`` below ``root``
    (the first folder in sorted order wins if a scene appears twice)."""
    first_bands = builder_utils.scan_files(root, "*_ms_01.png", _scene_name)
    scenes = {scene: p.parent for scene, p in first_bands.items()}
    if len(scenes) < 2:
        raise Builder.layout_error(root, "at least two scenes (<scene>_ms_01.png files)"
                                   if scenes else "any <scene>_ms_01.png")
    return scenes


def _scene_name(path: Path) -> str | None:
    m = _FIRST_BAND.match(path.name)
    return m.group("scene") if m else None


def load_scene(folder: Path, scene: str) -> np.ndarray:
    """The (H, W, 31) reflectance cube of ``scene``: band ``k`` is ``<scene>_ms_{k:02d}.png``
    / 65535, multi-channel bands collapsed to one channel."""
    bands = []
    for k in range(1, N_BANDS + 1):
        path = folder / f"{scene}_ms_{k:02d}.png"
        img = readers.read_png16(path)
        if img.ndim == 3:
            img = readers.collapse_channels(img)
        if bands and img.shape != bands[0].shape:
            raise ValueError(f"{path}: size {img.shape} differs from band 01 {bands[0].shape}")
        bands.append(np.asarray(img, np.float64) / 65535.0)
    return readers.check_cube(np.stack(bands, axis=-1), folder, N_BANDS)
