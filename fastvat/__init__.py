"""fastvat: virtual adversarial training and its relatives as a one-line addition to a training loop.

Every regularizer takes ``(model, embedding=None, *, <settings>)`` and is called with the model's
inputs. ``fastvat.functional`` has one-call forms; ``fastvat.inplace`` the article's in-place
perturbation with an exact restore; ``fastvat.integrations`` the training-framework integrations
(loaded on first access: ``import fastvat`` never imports transformers).
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fastvat import functional, ops
from fastvat._extension import info as _info
from fastvat.adversarial import FGM, PGD
from fastvat.noise import RandomNoise
from fastvat.penalty import GradientPenalty
from fastvat.vat import VAT, VATLoss

if TYPE_CHECKING:
    from fastvat import inplace, integrations

__version__ = "0.1.0"

# Submodules loaded on first attribute access (PEP 562): integrations imports its framework only
# when one of its own submodules is used, and inplace is rarely needed.
_LAZY_SUBMODULES = ("inplace", "integrations")


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        module = importlib.import_module(f"fastvat.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastvat' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def extension_info() -> dict[str, Any]:
    """Which kernels are in use.

    Returns:
        A dict: ``backend`` (``"compiled"``, ``"jit"`` or ``"reference"``), ``cuda_kernels``,
        ``torch``, ``torch_cuda``, ``cuda_available``, ``openmp_threads`` and ``load_error`` (why the
        compiled kernels were not used, or None).
    """
    return _info()


__all__ = ["ops", "functional", "inplace", "integrations", "extension_info", "VAT", "VATLoss", "RandomNoise",
           "GradientPenalty", "FGM", "PGD", "__version__"]
