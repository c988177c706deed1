"""fastvat: virtual adversarial training and its relatives as a one-line addition to a training loop."""
from fastvat import ops
from fastvat._extension import info as _info
from fastvat.adversarial import FGM, PGD
from fastvat.noise import RandomNoise
from fastvat.penalty import GradientPenalty
from fastvat.vat import VAT, VATLoss

__version__ = "0.1.0"


def extension_info() -> dict:
    """Which kernels are in use: backend ('compiled', 'jit' or 'reference'), CUDA kernels, versions."""
    return _info()


__all__ = ["ops", "extension_info", "VAT", "VATLoss", "RandomNoise", "GradientPenalty", "FGM", "PGD", "__version__"]
