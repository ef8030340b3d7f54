"""Locating, loading and preparing the TFDS builders in ``datasets/<name>/``.

``datasets/`` deliberately has no ``__init__.py`` (it would shadow the PyPI package
``datasets``), so builder modules are imported by file path under a private module name
(``_jaxspec_builders_<name>_dataset_builder``) and cached in ``sys.modules``: the TFDS
registration of the class happens exactly once per process.

Preparation is safe and keyed by its source (docs/reliability.md):

* **One builder at a time**: :func:`builder` prepares under an exclusive ``fcntl`` lock
  (``<data_dir>/<name>/<config>/.<version>.prepare.lock``, :class:`jaxspec.fs.HolderLock`):
  when several processes (parallel runs, the hosts of a multi-host job on a shared data_dir)
  reach an unprepared dataset at once, one builds and the others wait, then read its result.
* **Keyed by manual_dir**: a real dataset prepared from a ``manual_dir`` stores the
  fingerprint of that directory (:func:`manual_dir_fingerprint`: sorted relative file paths and
  sizes, hashed) in ``<data_path>/jaxspec_source.json``. A later call with a ``manual_dir``
  whose fingerprint differs (scenes added/removed, a file re-downloaded with another size), or
  a build without a stored fingerprint (prepared before fingerprints existed), deletes the
  prepared version and rebuilds it, under the lock, with a log line saying why. One data_dir
  holds one build per dataset/config: to keep builds of two manual_dirs, use two data_dirs.
  A call without ``manual_dir`` uses whatever is prepared.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from jaxspec.errors import DataNotFoundError, UsageError
from jaxspec.fs import HolderLock, describe_holder, write_json_atomic

log = logging.getLogger("jaxspec.data")

_LOCK = threading.RLock()
_MODULE_PREFIX = "_jaxspec_builders_"
FINGERPRINT_FILE = "jaxspec_source.json"


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
        raise UsageError(f"dataset name must be a non-empty string, got {name!r}")
    base, _, config = name.partition("/")
    if "/" in config:
        raise UsageError(f"dataset name must be 'name' or 'name/config', got {name!r}")
    return base, (config or None)


def load_builder_module(name: str):
    """Import ``datasets/<name>/<name>_dataset_builder.py`` once and return the module.

    Raises ``ValueError`` naming the available datasets when ``name`` is unknown.
    """
    base, _ = _split_name(name)
    if not base.replace("_", "").isalnum():
        raise UsageError(f"invalid dataset name {name!r}")
    mod_name = f"{_MODULE_PREFIX}{base}_dataset_builder"
    with _LOCK:
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        path = datasets_dir() / base / f"{base}_dataset_builder.py"
        if not path.is_file():
            raise UsageError(
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
            raise UsageError(f"{path} does not define a class named 'Builder'")
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
        raise UsageError(f"config given twice: {name!r} and config={config!r}")
    config = config or cfg_from_name
    module = load_builder_module(base)
    cls = module.Builder
    known = [c.name for c in getattr(cls, "BUILDER_CONFIGS", [])]
    if config is not None and config not in known:
        raise UsageError(f"unknown config {config!r} for dataset {base!r}; available: {known}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    kwargs = {"data_dir": str(data_dir), "file_format": "array_record"}
    if config is not None:
        kwargs["config"] = config
    b = cls(**kwargs)
    if not prepare:
        return b
    fingerprint = None
    dl_config = None
    if manual_dir is not None:
        manual_dir = Path(manual_dir).expanduser()
        if not manual_dir.is_dir():
            raise DataNotFoundError(f"manual_dir does not exist: {manual_dir}")
        dl_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
        if getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            fingerprint = manual_dir_fingerprint(manual_dir)
    if b.is_prepared() and _source_matches(b, fingerprint) is None:
        return b
    label = base + (f"/{config}" if config else "")
    lock = HolderLock(Path(b.data_path).parent / f".{b.version}.prepare.lock",
                      what=f"dataset {label} in {data_dir}", blocking=True,
                      on_wait=lambda rec: log.warning(
                          "dataset %s in %s is being prepared by %s; waiting for it", label,
                          data_dir, describe_holder(rec)))
    with lock, _LOCK:
        b = cls(**kwargs)           # another process may have prepared it while we waited
        if b.is_prepared():
            why = _source_matches(b, fingerprint)
            if why is None:
                return b
            log.warning("dataset %s in %s: %s; deleting %s and preparing it again", label,
                        data_dir, why, b.data_path)
            _remove_tree(Path(b.data_path))
            b = cls(**kwargs)
        b.download_and_prepare(download_config=dl_config, file_format="array_record")
        if fingerprint is not None:
            write_json_atomic(Path(b.data_path) / FINGERPRINT_FILE, fingerprint)
    return b


def manual_dir_fingerprint(manual_dir: str | os.PathLike) -> dict:
    """What a prepared dataset was built from: ``sha256`` over the sorted ``relative path,
    size`` of every file below ``manual_dir`` (symlinks followed; names starting with ``.``
    skipped), ``n_files``, ``total_bytes``, the directory and its top-level entries (for
    messages). Modification times are not used: copying a dataset (``cp -r``, unzip again)
    changes them without changing the data; sizes catch added, removed and re-downloaded
    files."""
    root = Path(manual_dir).expanduser().absolute()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except OSError:        # a dangling symlink: part of the layout, size unknown
                size = -1
            entries.append((p.relative_to(root).as_posix(), size))
    entries.sort()
    h = hashlib.sha256()
    for rel, size in entries:
        h.update(f"{rel}\0{size}\n".encode("utf-8", "surrogateescape"))
    top = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    return {"sha256": h.hexdigest(), "n_files": len(entries),
            "total_bytes": int(sum(max(s, 0) for _, s in entries)), "manual_dir": str(root),
            "top_level": top[:20] + (["..."] if len(top) > 20 else [])}


def prepared_source(b) -> dict | None:
    """The stored :func:`manual_dir_fingerprint` of a prepared builder (None: none stored)."""
    import json
    try:
        rec = json.loads((Path(b.data_path) / FINGERPRINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _source_matches(b, fingerprint: dict | None) -> str | None:
    """None when the prepared ``b`` may be reused for ``fingerprint``, else why not."""
    if fingerprint is None:
        return None
    stored = prepared_source(b)
    if stored is None:
        return "the prepared data record no manual_dir fingerprint (prepared by an older version)"
    if stored.get("sha256") == fingerprint["sha256"]:
        return None
    return (f"manual_dir changed since it was prepared (then {stored.get('n_files')} files, "
            f"{stored.get('total_bytes')} bytes in {stored.get('manual_dir')}; now "
            f"{fingerprint['n_files']} files, {fingerprint['total_bytes']} bytes in "
            f"{fingerprint['manual_dir']})")


def _remove_tree(path: Path) -> None:
    """Rename ``path`` aside (atomic: readers never see half a directory), then delete it."""
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{int(time.time() * 1000)}")
    path.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def resolve_eval_split(builder_or_name, split: str, data_dir=None, manual_dir=None,
                       config: str | None = None) -> str:
    """The split to evaluate on, logged: ``split`` when the (prepared) dataset has it. A dataset
    without a ``validation`` split (CAVE, ICVL, Harvard, KAIST, Chikusei: their protocols have
    only train/test) evaluates on ``test`` when asked for ``validation`` (the default
    ``eval_split``), with a warning that the validation and best-checkpoint selection then use
    the test images (docs/datasets.md, "Evaluation split"); a TFDS slice (``validation[:5]``)
    keeps its slice. Any other missing split is a ``UsageError`` listing the available ones."""
    b = builder_or_name
    if isinstance(b, str):
        b = builder(b, data_dir=data_dir, manual_dir=manual_dir, config=config)
    available = list(b.info.splits.keys())
    label = b.name + (f"/{b.builder_config.name}" if getattr(b, "builder_config", None) else "")
    if not isinstance(split, str) or not split:
        raise UsageError(f"eval split must be a split name, got {split!r}; available: "
                         f"{available}")
    base = split.split("[", 1)[0]
    if base not in available:
        if base == "validation" and "test" in available:
            new = "test" + split[len(base):]
            log.warning("dataset %s has no 'validation' split (splits: %s); evaluating on "
                        "'%s' instead: validation and best-checkpoint selection use the test "
                        "images (--set eval_split=... to choose another)", label,
                        ", ".join(available), new)
            split = new
        else:
            raise UsageError(f"unknown split {split!r} for {label}; available: {available}")
    n = b.info.splits[split.split("[", 1)[0]].num_examples
    log.info("evaluating on split '%s' of dataset %s (%d examples in '%s')", split, label, n,
             split.split("[", 1)[0])
    return split


def data_source(builder_or_name, split: str, data_dir=None, manual_dir=None,
                config: str | None = None):
    """Random-access source (``len``, ``[i]`` -> dict of numpy arrays) of one split."""
    b = builder_or_name
    if isinstance(b, str):
        b = builder(b, data_dir=data_dir, manual_dir=manual_dir, config=config)
    available = list(b.info.splits.keys())
    if not isinstance(split, str) or split.split("[", 1)[0] not in available:
        raise UsageError(f"unknown split {split!r} for {b.name}; available: {available}")
    return b.as_data_source(split=split)
