"""Integrations with training frameworks.

Each lives in its own module and imports its framework only when that module is used:
``import fastvat`` never imports transformers. ``fastvat.integrations.VATTrainer`` (or
``from fastvat.integrations.huggingface import VATTrainer``) loads the Hugging Face one.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VATTrainer": "fastvat.integrations.huggingface",
    "VATMixin": "fastvat.integrations.huggingface",
}

__all__ = ["huggingface", "VATTrainer", "VATMixin"]


def __getattr__(name: str) -> Any:
    if name == "huggingface":
        return importlib.import_module("fastvat.integrations.huggingface")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastvat.integrations' has no attribute {name!r}")
