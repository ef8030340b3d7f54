"""jaxspec: spectral reconstruction and HSI super-resolution in JAX/Flax.

Top-level notebook API (imported lazily so ``import jaxspec`` stays cheap):
``create_model``, ``load``, ``reconstruct``, ``fuse`` (see :mod:`jaxspec.api`).
"""
__version__ = "0.1.0"

_API = ("create_model", "load", "reconstruct", "fuse")


def __getattr__(name):
    if name in _API:
        from jaxspec import api
        return getattr(api, name)
    raise AttributeError(f"module 'jaxspec' has no attribute {name!r}")
