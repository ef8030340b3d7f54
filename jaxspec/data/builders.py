"""Locating, loading and preparing the TFDS builders in ``datasets/<name>/``.

``datasets/`` deliberately has no ``__init__.py`` (it would shadow the PyPI package
``datasets``), so builder modules are imported by file path under a private module name
(``_jaxspec_builders_<name>_dataset_builder``) and cached in ``sys.modules``: the TFDS
registration of the class happens exactly once per process.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

_LOCK = threading.RLock()
_MODULE_PREFIX = "_jaxspec_builders_"


def datasets_dir() -> Path:
    """Directory holding the builders: ``$JAXSPEC_DATASETS_DIR`` or ``<repo>/datasets``."""
    env = os.environ.get("JAXSPEC_DATASETS_DIR")
    if env:
        return Path(env).expanduser()
    # == Path(jaxspec.__file__).parents[1] / "datasets"; computed from this file because a
    # stale editable install can import ``jaxspec`` as a namespace package (__file__ None).
    return Path(__file__).resolve().parents[2] / "datasets"


def default_data_dir() -> Path:
    """``$JAXSPEC_DATA_DIR`` or ``~/tensorflow_datasets``."""
    env = os.environ.get("JAXSPEC_DATA_DIR")
    return Path(env).expanduser() if env else Path("~/tensorflow_datasets").expanduser()


def list_datasets() -> list[str]:
    """Names ``<name>`` with a ``datasets/<name>/<name>_dataset_builder.py`` file, sorted."""
    root = datasets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and (p / f"{p.name}_dataset_builder.py").is_file())


def _split_name(name: str) -> tuple[str, str | None]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    base, _, config = name.partition("/")
    if "/" in config:
        raise ValueError(f"dataset name must be 'name' or 'name/config', got {name!r}")
    return base, (config or None)


def load_builder_module(name: str):
    """Import ``datasets/<name>/<name>_dataset_builder.py`` once and return the module.

    Raises ``ValueError`` naming the available datasets when ``name`` is unknown.
    """
    base, _ = _split_name(name)
    if not base.replace("_", "").isalnum():
        raise ValueError(f"invalid dataset name {name!r}")
    mod_name = f"{_MODULE_PREFIX}{base}_dataset_builder"
    with _LOCK:
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        path = datasets_dir() / base / f"{base}_dataset_builder.py"
        if not path.is_file():
            raise ValueError(
                f"unknown dataset {base!r}: no builder file {path}; available: {list_datasets()}")
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise
        if not hasattr(module, "Builder"):
            del sys.modules[mod_name]
            raise ValueError(f"{path} does not define a class named 'Builder'")
        return module


def builder(name: str, data_dir=None, manual_dir=None, config: str | None = None,
            prepare: bool = True):
    """A prepared TFDS builder for ``name`` (``"spectral_scenes"`` or ``"spectral_scenes/real"``).

    Args:
      name: dataset name, optionally ``name/config``.
      data_dir: TFDS data directory (default :func:`default_data_dir`).
      manual_dir: directory with manually downloaded files (real datasets), passed as
        ``tfds.download.DownloadConfig(manual_dir=...)``.
      config: builder-config name (conflicts with a config given in ``name``).
      prepare: run ``download_and_prepare(file_format="array_record")`` if not yet prepared.
    """
    import tensorflow_datasets as tfds

    base, cfg_from_name = _split_name(name)
    if cfg_from_name and config and cfg_from_name != config:
        raise ValueError(f"config given twice: {name!r} and config={config!r}")
    config = config or cfg_from_name
    module = load_builder_module(base)
    cls = module.Builder
    known = [c.name for c in getattr(cls, "BUILDER_CONFIGS", [])]
    if config is not None and config not in known:
        raise ValueError(f"unknown config {config!r} for dataset {base!r}; available: {known}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    kwargs = {"data_dir": str(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = config
    b = cls(**kwargs)
    if prepare and not b.is_prepared():
        dl_config = None
        if manual_dir is not None:
            manual_dir = Path(manual_dir).expanduser()
            if not manual_dir.is_dir():
                raise FileNotFoundError(f"manual_dir does not exist: {manual_dir}")
            dl_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        with _LOCK:
            b.download_and_prepare(download_config=dl_config, file_format="array_record")
    return b


def data_source(builder_or_name, split: str, data_dir=None, manual_dir=None,
                config: str | None = None):
    """Random-access source (``len``, ``[i]`` -> dict of numpy arrays) of one split."""
    b = builder_or_name
    if isinstance(b, str):
        b = builder(b, data_dir=data_dir, manual_dir=manual_dir, config=config)
    available = list(b.info.splits.keys())
    if not isinstance(split, str) or split.split("[", 1)[0] not in available:
        raise ValueError(f"unknown split {split!r} for {b.name}; available: {available}")
    return b.as_data_source(split=split)
