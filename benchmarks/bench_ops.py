"""fastvat ops vs the eager PyTorch composition they replace and torch.compile of the reference.

    python benchmarks/bench_ops.py [--quick] [--device cpu|cuda] [--mode full|default|smoke] [--out DIR]

The logic lives in fastvat/bench/op_bench.py (also run by ``python -m fastvat bench``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastvat.bench.op_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
