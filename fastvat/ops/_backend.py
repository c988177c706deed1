"""Which backend an op runs on: the compiled kernels when they are loaded and built for the
tensor's device, else the pure-PyTorch reference (same validation, same results)."""
from __future__ import annotations

import torch

from fastvat import _extension

BACKEND = _extension.load()
HAVE_KERNELS = BACKEND != "reference"


def use_kernel(t: torch.Tensor) -> bool:
    if not HAVE_KERNELS:
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda":
        return _extension._STATE["cuda"]
    return t.device.type == "meta"
