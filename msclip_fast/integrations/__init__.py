"""Integrations with other libraries (DESIGN §4: the top layer).

Submodules are imported on first attribute access, so ``import msclip_fast.integrations``
imports neither open_clip nor open_clip_train:

- :mod:`msclip_fast.integrations.open_clip`: instance-level, reversible patching of open_clip
  models (:func:`~msclip_fast.integrations.open_clip.patch`, ``unpatch``).
- :mod:`msclip_fast.integrations.open_clip_train`: open_clip's training script with the
  patched model and msclip_fast's losses.
"""
from __future__ import annotations

import importlib

_SUBMODULES = ("open_clip", "open_clip_train")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
