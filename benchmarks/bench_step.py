"""A VAT training step on a BERT-like model: fastvat vs the bare-pass bound, naive eager VAT,
torch.compile of it, and the article's dense weight algorithm; plus a scaling sweep.

    python benchmarks/bench_step.py [--quick] [--device cpu|cuda] [--mode full|default|smoke] [--out DIR]

Needs ``transformers`` (random-init BertConfig; no download). The logic lives in
fastvat/bench/step_bench.py (also run by ``python -m fastvat bench``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvat.bench.step_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
