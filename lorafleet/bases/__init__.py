"""Base models: the built-in ones, loading from a path, and what adapters need to know of a base.

The names live in ``catalog``; they are looked up lazily so that commands which never touch a
model (``lorafleet registry list``) do not pay for importing torch and diffusers.
"""

from __future__ import annotations

# Imports inside functions: names resolve lazily, so that commands that never touch a model do not
# import torch.

_EXPORTS = {
    "BUILTIN_BASES", "DEFAULT_BASE", "LoadedBase", "base_id", "base_spec", "export_base", "family_of_base",
    "load_base", "spec_from_pipeline",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        from . import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
