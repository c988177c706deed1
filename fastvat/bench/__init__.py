"""Benchmarks of fastvat against eager PyTorch and torch.compile baselines.

Used by ``python -m fastvat bench`` and by the scripts in ``benchmarks/``. Nothing in the core
library imports this package; ``transformers`` is imported lazily, by the step benchmark only.

Modules:
  timing     — timers (torch.utils.benchmark), copy bandwidth, peak memory, machine info,
               the JSON / CSV / PNG writers and the text table;
  baselines  — VAT written from the math without fastvat: naive eager, the article's dense
               in-place algorithm on an embedding matrix, torch.compile of the naive one;
  ops        — each fastvat op against the eager composition it replaces and torch.compile;
  step       — VAT training steps on a BERT-like model, the bare-pass bound, scaling sweep;
  runner     — what ``python -m fastvat bench`` runs.
"""
