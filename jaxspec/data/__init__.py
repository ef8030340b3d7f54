"""Datasets and input pipelines (see docs/architecture.md, "jaxspec.data").

* Builders: :func:`load_builder_module`, :func:`list_datasets`, :func:`builder`,
  :func:`data_source`, :func:`resolve_eval_split` (TFDS ``array_record`` builders in ``datasets/<name>/``).
* Pipeline: :func:`make_loader` (grain), :func:`normalize_rgb`, :func:`random_crop_augment`.
* Fusion pairs synthesised from any HSI dataset: :mod:`jaxspec.data.fusion`
  (:class:`~jaxspec.data.fusion.Degradation`, ``make_loader(..., fusion=...)``).
* The built-in ``spectral_scenes`` generator: :mod:`jaxspec.data.spectra` (measured pools),
  :mod:`jaxspec.data.scenes` (seeded scene synthesis), :mod:`jaxspec.data.figures`.
"""
from jaxspec.data.builders import (
    builder, data_source, datasets_dir, default_data_dir, list_datasets, load_builder_module,
    resolve_eval_split)
from jaxspec.data.pipeline import (
    NORMALIZATIONS, center_crop, make_loader, normalize_rgb, random_crop_augment)

__all__ = [
    "builder", "data_source", "datasets_dir", "default_data_dir", "list_datasets",
    "load_builder_module", "NORMALIZATIONS", "center_crop", "make_loader", "normalize_rgb",
    "random_crop_augment", "resolve_eval_split",
]
