"""Command line: ``python -m fastvat {bench,demo,experiment,info}``.

    python -m fastvat bench [--quick|--full|--smoke] [--device cpu|cuda] [--out DIR]
    python -m fastvat demo [--seeds N] [--steps N] [--out FILE.png] [--tune]
    python -m fastvat experiment ARGS...     (benchmarks/semi_supervised_sentiment.py of a source tree)
    python -m fastvat info

Bad input (unknown command or flag, a GPU asked for where there is none) prints one line on
stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

PROG = "fastvat"


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser():
    ap = _Parser(prog=PROG, description="fastvat: fast virtual adversarial training for PyTorch.")
    sub = ap.add_subparsers(dest="command", metavar="{bench,demo,experiment,info}")

    b = sub.add_parser("bench", help="benchmark fastvat against eager PyTorch and torch.compile",
                       description="Ops and a VAT training step against their baselines; one table, "
                                   "JSON, CSV and a PNG chart in --out.")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats, no sweep")
    size.add_argument("--full", action="store_true", help="the issues' shapes, torch.compile of the step, "
                                                           "MiniLM and the full sweep (long)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (for tests)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--out", default="bench_out", help="folder for bench_<device>.json/.csv/.png")
    b.add_argument("--only", choices=["ops", "step"], help="run one suite")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", help="two moons with 8 labels: supervised only vs VAT",
                       description="Two moons, 8 labelled + 1,000 unlabelled points: supervised-only vs "
                                   "fastvat.VAT, same data and init; prints test accuracies, writes a PNG.")
    d.add_argument("--seeds", type=int, default=5, help="seeds to average (default 5)")
    d.add_argument("--steps", type=int, default=300, help="Adam steps per run (default 300)")
    d.add_argument("--out", default="vat_demo.png", help="PNG of both decision boundaries")
    d.add_argument("--tune", action="store_true", help="grid-search eps/xi on the validation set instead")

    sub.add_parser("experiment", help="semi-supervised sentiment experiment (arguments passed through)",
                   add_help=False)
    sub.add_parser("info", help="which kernels are in use, and the machine")
    return ap


def _need_cuda(device):
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda was given but no CUDA GPU is available (torch.cuda.is_available() is False)")


def _experiment(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", "semi_supervised_sentiment.py")
    if not os.path.isfile(path):
        raise UsageError(f"'experiment' runs benchmarks/semi_supervised_sentiment.py from a fastvat source "
                         f"checkout; it was not found at {path}")
    spec = importlib.util.spec_from_file_location("fastvat_semi_supervised_sentiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise UsageError(f"{path} has no main(argv)")
    rc = module.main(list(argv))
    return 0 if rc is None else int(rc)


def _validate_positive(name, value):
    if value < 1:
        raise UsageError(f"{name} must be at least 1, got {value}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "experiment":
            return _experiment(argv[1:])
        try:
            args = _parser().parse_args(argv)
        except SystemExit as exc:  # --help / --version: argparse printed and asked to exit
            return 0 if exc.code is None else int(exc.code)
        if args.command is None:
            raise UsageError(f"a command is required: bench, demo, experiment or info (see '{PROG} --help')")
        if args.command == "bench":
            _need_cuda(args.device)
            from fastvat.bench import runner

            mode = "full" if args.full else "smoke" if args.smoke else "quick" if args.quick else "default"
            runner.run(device=args.device, mode=mode, out=args.out, compile=(False if args.no_compile else None),
                       progress=not args.no_progress, only=[args.only] if args.only else None)
            return 0
        if args.command == "demo":
            _validate_positive("--seeds", args.seeds)
            _validate_positive("--steps", args.steps)
            from fastvat import demo

            return demo.run(seeds=args.seeds, steps=args.steps, out=args.out, tune_only=args.tune)
        if args.command == "info":
            import fastvat
            from fastvat.bench import timing

            for k, v in {**timing.machine_info("cpu"), **fastvat.extension_info()}.items():
                print(f"{k}: {v}")
            return 0
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
