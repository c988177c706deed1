"""VAT baselines written from the math, without fastvat (naive eager, the article's dense in-place
algorithm on an embedding matrix, torch.compile of the naive one).

The code lives in fastvat/bench/baselines.py so that ``python -m fastvat bench`` can use it;
this module re-exports it for scripts in benchmarks/.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvat.bench.baselines import (  # noqa: E402,F401
    DenseWeightVAT,
    NaiveVAT,
    compiled,
    kl_eager,
    logits_of,
    normalize_global,
    normalize_per_sample,
)

__all__ = ["NaiveVAT", "DenseWeightVAT", "compiled", "kl_eager", "logits_of", "normalize_global",
           "normalize_per_sample"]
