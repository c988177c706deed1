"""VAT under DistributedDataParallel (2 CPU processes, gloo).

Proves: the power iteration triggers no all-reduce and writes no .grad (a counting comm hook sees
nothing during the VAT call, then exactly one backward's worth of buckets); the final gradients
equal a single-process run over the same global batch; ``no_sync`` defers the reduction as usual.

The single-process reference: DDP averages gradients over ranks and each rank's loss is a mean over
its half, so the equivalent loss is the mean of the two halves' losses. Each rank seeds its VAT
generator with 100 + rank, and the reference makes two half-batch VAT calls with those same seeds,
so every random start is identical.
"""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastvat

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))


def _data():
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def _half(t, rank):
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def _vat(model, rank):
    return fastvat.VAT(model, xi=1e-1, eps=1.0, iters=2, generator=torch.Generator().manual_seed(100 + rank))


def _worker(rank, port, out_dir):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp = DDP(_model())
        reduced = [0]

        def counting_allreduce(state, bucket):
            reduced[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)
        x, y = _data()
        x, y = _half(x, rank), _half(y, rank)

        def clear():
            for p in ddp.parameters():
                p.grad = None

        # Two supervised steps: the second gives one backward's worth of buckets (after DDP's
        # first-iteration bucket rebuild).
        for _ in range(2):
            clear()
            start = reduced[0]
            F.cross_entropy(ddp(x), y).backward()
        per_backward = reduced[0] - start
        assert per_backward >= 1

        results = {}
        for name, vat_model in (("module", ddp.module), ("ddp", ddp)):
            clear()
            logits = ddp(x)
            vat = _vat(vat_model, rank)
            start = reduced[0]
            loss_vat = vat(x, logits=logits)
            assert reduced[0] == start, f"{name}: the VAT call triggered {reduced[0] - start} all-reduces"
            assert all(p.grad is None for p in ddp.parameters()), f"{name}: the VAT call wrote .grad"
            (F.cross_entropy(logits, y) + loss_vat).backward()
            assert reduced[0] - start == per_backward, (name, reduced[0] - start, per_backward)
            results[name] = [p.grad.detach().clone() for p in ddp.parameters()]
            results[name + "_loss"] = loss_vat.detach()

        # no_sync (gradient accumulation): nothing is reduced inside, the next backward reduces all
        clear()
        start = reduced[0]
        with ddp.no_sync():
            logits = ddp(x)
            (F.cross_entropy(logits, y) + _vat(ddp, rank)(x, logits=logits)).backward()
        assert reduced[0] == start, "no_sync: a reduction happened"
        logits = ddp(x)
        (F.cross_entropy(logits, y) + _vat(ddp, rank)(x, logits=logits)).backward()
        assert reduced[0] - start == per_backward
        results["accumulated"] = [p.grad.detach().clone() for p in ddp.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    """Single process, same global batch: the mean of the two halves' (supervised + VAT) losses."""
    model = _model()
    x, y = _data()
    total, vat_losses = 0.0, []
    for rank in range(WORLD):
        xr, yr = _half(x, rank), _half(y, rank)
        logits = model(xr)
        loss_vat = _vat(model, rank)(xr, logits=logits)
        vat_losses.append(loss_vat.detach())
        total = total + (F.cross_entropy(logits, yr) + loss_vat) / WORLD
    total.backward()
    return [p.grad.detach().clone() for p in model.parameters()], vat_losses


def test_ddp_gradients_match_single_process_and_power_iteration_does_not_communicate(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the DDP workers did not finish in 240 s")
    want, vat_losses = _reference()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for rank, res in enumerate(results):
        for name in ("module", "ddp"):
            torch.testing.assert_close(res[name + "_loss"], vat_losses[rank])
            for got, ref in zip(res[name], want):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        # two accumulated micro-batches of the same data: twice the gradient
        for got, ref in zip(res["accumulated"], want):
            torch.testing.assert_close(got, 2 * ref, rtol=1e-5, atol=1e-7)
    assert float(vat_losses[0]) > 0 and not torch.equal(vat_losses[0], vat_losses[1])
