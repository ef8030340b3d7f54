"""Per-method configurations (frozen dataclasses with paper / cpu / smoke presets)."""
from jaxspec.configs.base import Config

__all__ = ["Config"]
