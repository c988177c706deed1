"""Float64 references for the power-iteration tests: the KL divergence whose Hessian VAT's power
iteration works on, that Hessian's top eigenvector, and a cosine that ignores the sign (an
eigenvector's sign is arbitrary)."""
import torch
import torch.nn.functional as F


def kl_sum(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) summed over every row."""
    lp = F.log_softmax(p_logits, -1)
    return (lp.exp() * (lp - F.log_softmax(q_logits, -1))).sum()


def top_eigvec(h):
    """The eigenvector of the largest eigenvalue of the symmetric h, and all eigenvalues ascending."""
    vals, vecs = torch.linalg.eigh(h)
    return vecs[:, -1], vals


def abs_cos(a, b):
    a, b = a.flatten(), b.flatten()
    return float((a @ b).abs() / (a.norm() * b.norm()))
