"""One module per method; each registers itself on import. ``jaxspec.registry.get(name)``
imports only the module of ``name`` (no eager import here: a broken model file must not break
the other methods)."""
