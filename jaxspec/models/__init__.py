"""One module per method; importing this package registers every method."""
import importlib as _importlib

_METHOD_MODULES = ("mstpp", "acc")

for _name in _METHOD_MODULES:
    try:
        _importlib.import_module(f"jaxspec.models.{_name}")
    except ModuleNotFoundError as _e:  # a method module that is not written yet
        if _e.name != f"jaxspec.models.{_name}":
            raise
