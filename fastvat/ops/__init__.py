"""The fused ops, one module per op: a validated wrapper over ``torch.ops.fastvat.*`` (schemas in
csrc/fastvat.cpp), its fake kernel and its autograd formula.

Every op has a pure-PyTorch twin in ``fastvat.reference``; when the compiled kernels are missing (or
not built for a tensor's device) the wrapper runs the reference instead, with the same validation
and the same results. The ops know nothing of VAT.
"""
from fastvat.ops._backend import BACKEND
from fastvat.ops.embedding import embedding_gather_add
from fastvat.ops.kl import REDUCTIONS, kl_div_with_logits
from fastvat.ops.linear_kl import linear_kl_div
from fastvat.ops.norm import NORMS, l2_normalize
from fastvat.ops.perturbation import perturb_, restore_

__all__ = ["BACKEND", "NORMS", "REDUCTIONS", "l2_normalize", "perturb_", "restore_", "kl_div_with_logits",
           "embedding_gather_add", "linear_kl_div"]
