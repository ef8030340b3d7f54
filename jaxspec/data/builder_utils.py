"""What the real-data TFDS builders in ``datasets/<name>/`` share.

``datasets/`` is not a package (docs/architecture.md), so the builders cannot import each
other; the logic they have in common lives here, next to the file readers it calls
(:mod:`jaxspec.data.readers`):

* :class:`RealDatasetBuilder`: the base class. ``_info`` is assembled from declared class
  attributes (common schema of ``readers.common_features``, ``disable_shuffling``,
  ``hsi_scale`` / ``rgb`` / ``rgb_encoding`` / ``rgb_scale`` / ``srf`` metadata); :meth:`~RealDatasetBuilder.manual_root`,
  :meth:`~RealDatasetBuilder.layout_error` and :meth:`~RealDatasetBuilder.require_dir` raise
  the ``FileNotFoundError`` naming the manual_dir, the expected layout and the first thing not
  found.
* :class:`RenderConfig`: a builder config carrying the SRF name of the rendered RGB.
* Finding and splitting files: :func:`scan_files`, :func:`split_head`.
* Building examples: :func:`optional_bands`, :func:`cube_rgb_example` (cube + 8-bit image
  pairs), :func:`rendered_example` (``rgb = hsi @ srf``), :class:`SrfCache`.

The first entry of ``BUILDER_CONFIGS`` is a builder's default config (TFDS picks it when
``DEFAULT_BUILDER_CONFIG_NAME`` is unset).
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxspec.data import readers
from jaxspec.errors import DataError

__all__ = [
    "RealDatasetBuilder", "RenderConfig", "SrfCache", "cube_rgb_example", "module_summary",
    "optional_bands", "rendered_example", "scan_files", "split_head",
]


def module_summary(cls: type) -> str:
    """First paragraph of the docstring of the module defining ``cls`` (the TFDS
    ``description``), or of the class docstring when the module is not importable by name."""
    module = sys.modules.get(cls.__module__)
    doc = (module.__doc__ if module is not None else None) or cls.__doc__ or ""
    return doc.strip().split("\n\n")[0]


@dataclasses.dataclass(eq=False)
class RenderConfig(tfds.core.BuilderConfig):
    """Config of a builder whose ``rgb`` is rendered as ``hsi @ srf``: ``srf`` is the SRF name
    for :func:`jaxspec.data.readers.srf_on_bands` (default ``"cie1964"``, the NTIRE 2020 Clean
    convention)."""
    srf: str = "cie1964"


class RealDatasetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the manual-download real-data builders (abstract, never registered).

    A subclass declares ``name``, ``BUILDER_CONFIGS``, ``MANUAL_DOWNLOAD_INSTRUCTIONS``,
    ``EXPECTED_LAYOUT`` (the paths below manual_dir, quoted in every layout error), ``N_BANDS``,
    ``HSI_SCALE``, ``HOMEPAGE``, ``CITATION``, ``LICENSE``; a dataset with its own RGB states
    ``RGB_DESCRIPTION`` and the input encoding of that RGB: ``RGB_ENCODING`` (``"linear"`` or
    ``"srgb"``) and ``RGB_SCALE`` (the code value of full scale: 255 for 8-bit images), which
    the training loop records in ``input.json`` so that ``predict`` converts a photo the same
    way (defaults: the rendered ``hsi @ srf``, linear, scale 1);
    ``LABEL = True`` adds the ``label`` map; ``RENDERED = True`` (``rgb = hsi @ srf``, config a
    :class:`RenderConfig`) adds the ``srf`` feature and ``srf`` metadata. Further metadata come
    from :meth:`_extra_metadata`. It implements ``_split_generators`` and
    ``_generate_examples``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    EXPECTED_LAYOUT: str = ""
    N_BANDS: int = 0
    LABEL: bool = False
    RENDERED: bool = False
    HSI_SCALE: str = ""
    RGB_DESCRIPTION: str = "linear, hsi @ srf"
    RGB_ENCODING: str = "linear"   # read by jaxspec.train.loop.input_record
    RGB_SCALE: float = 1.0
    HOMEPAGE: str = ""
    CITATION: str = ""
    LICENSE: str = ""

    def _extra_metadata(self) -> dict:
        """Dataset-specific ``info.metadata`` entries (none by default)."""
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        meta = {"hsi_scale": self.HSI_SCALE, "rgb": self.RGB_DESCRIPTION,
                "rgb_encoding": self.RGB_ENCODING, "rgb_scale": float(self.RGB_SCALE)}
        if self.RENDERED:
            meta["srf"] = self.builder_config.srf
        meta.update(self._extra_metadata())
        return tfds.core.DatasetInfo(
            builder=self,
            description=module_summary(type(self)),
            features=readers.common_features(self.N_BANDS, label=self.LABEL, srf=self.RENDERED),
            metadata=tfds.core.MetadataDict(**meta),
            disable_shuffling=True,
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            license=self.LICENSE,
        )

    @classmethod
    def manual_root(cls, dl_manager) -> Path:
        """The manual_dir; ``FileNotFoundError`` with the expected layout if missing/empty."""
        return readers.manual_root(dl_manager, cls.name, cls.EXPECTED_LAYOUT)

    @classmethod
    def layout_error(cls, root: Path, first_missing: str) -> FileNotFoundError:
        """``FileNotFoundError("<name>: <first_missing> not found under manual_dir <root>.
        Expected layout: ...")`` (to raise)."""
        return readers.missing_layout_error(cls.name, root, cls.EXPECTED_LAYOUT, first_missing)

    @classmethod
    def require_dir(cls, root: Path, name: str) -> Path:
        """The folder ``name`` at ``root`` or one level below (:func:`readers.find_dir`), else
        :meth:`layout_error` naming ``name/``."""
        found = readers.find_dir(root, [name])
        if found is None:
            raise cls.layout_error(root, name + "/")
        return found


def scan_files(folder: Path, pattern: str, key: Callable[[Path], Hashable | None] | None = None,
               *, recursive: bool = True) -> dict:
    """``{key(p): p}`` over the files matching ``pattern`` in ``folder`` (``rglob`` when
    ``recursive``, else ``glob``), visited in sorted path order so the first hit of a repeated
    key wins. ``key`` (default: the file stem) returns ``None`` to skip a file. Insertion order
    is the sorted path order; sort the keys for a stable split order."""
    key = key or (lambda p: p.stem)
    hits = folder.rglob(pattern) if recursive else folder.glob(pattern)
    found: dict = {}
    for p in sorted(hits):
        k = key(p) if p.is_file() else None
        if k is not None:
            found.setdefault(k, p)
    return found


def split_head(items: Mapping[str, Path], n_head: int) -> tuple[list, list]:
    """``(head, tail)``: the ``(name, path)`` pairs of ``items`` sorted by name, the first
    ``n_head`` and the rest (e.g. CAVE's alphabetical first 20 -> train, KAIST's first 10 ->
    test)."""
    pairs = sorted(items.items())
    return pairs[:n_head], pairs[n_head:]


def optional_bands(data: Mapping[str, np.ndarray], path: Path | str, n_bands: int,
                   default: np.ndarray) -> np.ndarray:
    """Band centres (nm, float32 (n_bands,)) from a file's optional ``bands`` variable, else
    ``default``; ``ValueError`` naming ``path`` when the count differs from ``n_bands``."""
    if "bands" not in data:
        return default
    bands = np.asarray(data["bands"], np.float32).reshape(-1)
    if bands.shape != (n_bands,):
        raise DataError(f"{path}: 'bands' has {bands.size} values, expected {n_bands}")
    return bands


def cube_rgb_example(mat: Path, img: Path, *, n_bands: int, default_bands: np.ndarray,
                     key: str = "cube") -> dict:
    """One example from a ``.mat`` cube (v5 or v7.3 variable ``key``, (H, W, n_bands), values as
    stored; optional ``bands``) and its 8-bit RGB image ``img`` (0..255 code values as float32,
    RGB order, same H x W); ``name`` is the ``.mat`` stem (NTIRE 2020 / 2022 challenge data)."""
    data = readers.read_mat(mat, key, optional=["bands"])
    cube = readers.check_cube(data[key], mat, n_bands)
    bands = optional_bands(data, mat, n_bands, default_bands)
    rgb = readers.read_rgb_image(img)
    if rgb.shape[:2] != cube.shape[:2]:
        raise DataError(
            f"{img}: RGB size {rgb.shape[:2]} differs from cube {mat} {cube.shape[:2]}")
    return {"hsi": cube, "rgb": rgb.astype(np.float32), "bands": bands, "name": mat.stem}


def rendered_example(hsi: np.ndarray, bands: np.ndarray, name: str, srf: np.ndarray,
                     label: np.ndarray | None = None) -> dict:
    """An example of a builder without RGB of its own: ``rgb[h, w, k] = sum_c hsi[h, w, c] *
    srf[c, k]`` (:func:`readers.render_rgb`, linear), ``srf`` stored alongside; ``label`` only
    when given (Harvard, HySpecNet)."""
    example = {"hsi": hsi, "rgb": readers.render_rgb(hsi, srf), "bands": bands, "name": name,
               "srf": srf}
    if label is not None:
        example["label"] = label
    return example


class SrfCache:
    """``srfs(bands)`` = :func:`readers.srf_on_bands` ``(name, bands)``, computed once per
    distinct band grid (files of one dataset nearly always share it)."""

    def __init__(self, name: str):
        self.name = name
        self._cache: dict[bytes, np.ndarray] = {}

    def __call__(self, bands: np.ndarray) -> np.ndarray:
        bands = np.asarray(bands, np.float32)
        k = bands.tobytes()
        if k not in self._cache:
            self._cache[k] = readers.srf_on_bands(self.name, bands)
        return self._cache[k]

