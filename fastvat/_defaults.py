"""The one table of per-target defaults and the names every regularizer accepts.

Every regularizer (VAT, RandomNoise, GradientPenalty, FGM, PGD) takes its default ``eps`` and
``norm`` from ``DEFAULTS`` by target, and VAT its ``xi``; the norm names come from
``fastvat.reference.NORMS`` and are validated in one place (``fastvat._targets.Target``).

Why these values (README, "Choosing eps and xi"):
  - weight (global norm): the article's code: eps=1, xi=10, one power step on the vocabulary matrix.
  - input and embedding output (per-sample norm): the finite-difference step must be small next to a
    sample's norm but large next to float32 rounding. xi=0.1 gives the exact H·d direction (cosine
    > 0.995, tests/test_vat.py::test_default_xi_gives_the_hessian_direction_in_float32) where the VAT
    paper's 1e-6 gives cosines of 0.2-0.9 in float32. eps=1 on the input assumes unit-scale features.
    eps=5 on the embedding output is the value of text VAT (Miyato et al. 2017, adversarial training
    for text). It is not a tuned value: on the tweet task's validation split
    (benchmarks/results/sentiment_protocol/results.md) the protocol chose eps=2 (82.47 %) over 1
    (82.40 %) and 5 (81.47 %), differences within seed noise. Scale eps with your data.
"""
from __future__ import annotations

from typing import Literal, TypedDict

from fastvat import reference as ref

TargetName = Literal["input", "output", "weight"]
NormName = Literal["global", "sample", "token"]
NonfiniteMode = Literal["raise", "zero", "ignore"]

TARGETS: tuple[str, ...] = ("input", "output", "weight")


class TargetDefaults(TypedDict):
    eps: float
    xi: float
    norm: str
    norms: tuple[str, ...]


DEFAULTS: dict[str, TargetDefaults] = {
    "input": {"eps": 1.0, "xi": 1e-1, "norm": "sample", "norms": ref.NORMS},
    "output": {"eps": 5.0, "xi": 1e-1, "norm": "sample", "norms": ref.NORMS},
    # per-sample norms have no meaning on the shared vocabulary matrix
    "weight": {"eps": 1.0, "xi": 10.0, "norm": "global", "norms": ("global", "token")},
}
