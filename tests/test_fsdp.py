"""fastvat under FSDP2 (``torch.distributed.fsdp.fully_shard``): 2 CPU processes over gloo.

Each case shards a model (the listed submodules as units, then the root), trains it for two SGD
steps on ``supervised + regularizer`` with each rank on its half of a global batch, and records each
rank's regularizer value and, per step, the full parameter gradients (``DTensor.full_tensor()``).
The parent process repeats the steps on the unsharded model. FSDP averages gradients over ranks and
each rank's loss is a mean over its half, so the reference loss is the mean of the two halves' losses,
each half with the regularizer (and the generator and global seeds) of the rank that had it. Float32
cases must agree to rounding; the bf16 mixed-precision cases to bf16 accuracy, against float32 runs of
the same algorithm (the exact power step). FSDP's gradient reductions are counted too: none during
the regularizer's call, one supervised backward's worth in the step's backward.

One spawn runs every case, then ``VATTrainer`` under accelerate's FSDP2 (starting processes and
importing transformers is most of the cost). Workers write their results, meet at a barrier and
leave with ``os._exit(0)`` (gloo can hang in destructors at teardown); the parent kills them after
a timeout.

Adding a case (another target, a causal-LM head, another policy) is one ``ShardCase`` appended to
``CASES``: ``test_sharded_training_matches_unsharded`` picks it up.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import time
import traceback
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastvat

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch < 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The unsharded references are tiny models: OpenMP threads only add spin-waits on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


WORLD = 2
STEPS = 2
LR = 0.5  # large, so that the second step runs on visibly different weights
TIMEOUT_S = 180
PAD = 0


# ------------------------------------------------------------------------------------------
# models and data (identical on every rank and in the parent: seeded)
# ------------------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3))


def _mlp_units(model):
    return [model[0], model[2], model[4]]


def _mlp_batch(rank):
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    half = slice(rank * 4, (rank + 1) * 4)
    return (x[half],), {}, y[half]


def _bert(dropout=0.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=PAD,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg).train()


def _bert_dropout():
    return _bert(dropout=0.1)


def _bert_units(model):
    """The embeddings block and every encoder layer (the usual transformer wrapping)."""
    return [model.bert.embeddings, *model.bert.encoder.layer]


def _bert_units_embedding_alone(model):
    """The nn.Embedding itself as a unit (as accelerate wraps it): its weight is a shard again by the
    time a forward hook on it runs."""
    return [model.bert.embeddings.word_embeddings, *model.bert.encoder.layer]


def _bert_rows():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 100, (4, 8), generator=g)
    am = torch.ones(4, 8, dtype=torch.long)
    am[0, 5:] = 0
    am[3, 3:] = 0
    ids[am == 0] = PAD
    return ids, am, torch.tensor([0, 1, 1, 0])


def _bert_batch(rank):
    ids, am, y = _bert_rows()
    half = slice(rank * 2, (rank + 1) * 2)
    return (), {"input_ids": ids[half], "attention_mask": am[half], "token_type_ids": torch.zeros_like(ids[half])}, \
        y[half]


VOCAB_LM = 500


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB_LM, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).train()


def _lm_units(model):
    """The decoder layers (the usual wrapping): the embedding, final norm and head stay in the root."""
    return list(model.model.layers)


def _lm_units_head_alone(model):
    """The head as a unit of its own: its weight is a shard again once its forward has run."""
    return [*model.model.layers, model.lm_head]


def _lm_batch(rank):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB_LM, (4, 10), generator=g)
    am = torch.ones(4, 10, dtype=torch.long)
    am[1, 7:] = 0
    am[2, 4:] = 0
    ids[am == 0] = PAD
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[am == 0] = -100
    half = slice(rank * 2, (rank + 1) * 2)
    return (), {"input_ids": ids[half], "attention_mask": am[half], "labels": labels[half]}, labels[half]


def _lm_loss(out, y):
    return out.loss


def _lm_head(make):
    """A regularizer on the LM's input embeddings that takes the head's input (head=), never its logits."""
    def build(model, rank, sharded):
        return make(model, embedding=model.get_input_embeddings(), head=model.get_output_embeddings(),
                    generator=_gen(rank))
    return build


def lm_case(name, regularizer, *, units=_lm_units, **kw):
    # labels travel in kwargs (the trained positions); logits= does not combine with head=
    return ShardCase(name, _tiny_lm, units, _lm_batch, _lm_head(regularizer), call=_call_without_logits,
                     supervised=_lm_loss, **kw)


def _gen(rank, base=100):
    return torch.Generator().manual_seed(base + rank)


def _vat(**kw):
    """A regularizer factory: ``fastvat.VAT`` on the model (on its input embeddings unless target="input")."""
    def make(model, rank, sharded):
        args = dict(kw)
        if args.get("target", "input") != "input":
            args["embedding"] = model.get_input_embeddings()
        return fastvat.VAT(model, generator=_gen(rank), **args)
    return make


def _mixed_vat(**kw):
    """bf16 policy: VAT's default hvp="auto" must choose the exact power step (xi = 1e-6 would round away
    in bf16); the float32 reference runs that step explicitly."""
    def make(model, rank, sharded):
        return _vat(xi=1e-6, hvp="auto" if sharded else "exact", **kw)(model, rank, sharded)
    return make


def _bf16():
    return {"mp_policy": fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


def _offload():
    return {"offload_policy": fsdp.CPUOffloadPolicy(pin_memory=False)}


def _call_unsupervised(reg, args, kwargs, y, logits):
    return reg(*args, logits=logits, **kwargs)


def _call_without_logits(reg, args, kwargs, y, logits):
    return reg(*args, **kwargs)


def _call_supervised(reg, args, kwargs, y, logits):
    return reg(*args, y=y, **kwargs)


def _logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _classification_loss(out, y):
    return F.cross_entropy(_logits_of(out).float(), y)


@dataclasses.dataclass(frozen=True)
class ShardCase:
    """One sharded-training scenario, run by both the workers (sharded) and the parent (unsharded).

    model: builds the model with a fixed seed (every call the same weights).
    units: the submodules ``fully_shard`` is applied to before the root.
    batch: ``batch(rank) -> (args, kwargs, y)``, the rank's share of the global batch.
    regularizer: ``regularizer(model, rank, sharded) -> callable``; seed its generator with the rank.
    policy: extra ``fully_shard`` keyword arguments (mixed precision, offload, reshard_after_forward).
    call: how one step calls the regularizer: ``call(reg, args, kwargs, y, logits) -> scalar``.
    supervised: the supervised loss from the model's output and y.
    probe: optional ``probe(model, rank, sharded) -> VAT``; its ``perturbation()`` at the first
        step's weights is compared by cosine similarity (the power iteration's direction itself).
    bf16: compare to bf16 accuracy (a mixed-precision policy) rather than float32 rounding.
    raises: ``(exception type name, message fragment)`` when the case must fail with that error.
    reference: the name of an earlier case whose unsharded run this one shares (units and policies
        do not change the unsharded model), to compute it once.

    A token-level model (a causal LM) needs its own ``batch`` and ``supervised``, e.g.::

        ShardCase("causal-lm", _tiny_lm, lambda m: list(m.model.layers), _lm_batch,
                  _vat(target="output"),
                  supervised=lambda out, y: F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten()))
    """

    name: str
    model: Callable[[], nn.Module]
    units: Callable[[nn.Module], list]
    batch: Callable[[int], tuple]
    regularizer: Callable
    policy: Callable[[], dict] = dict
    call: Callable = _call_unsupervised
    supervised: Callable = _classification_loss
    probe: Callable | None = None
    bf16: bool = False
    raises: tuple | None = None
    reference: str | None = None


def mlp_case(name, regularizer, **kw):
    return ShardCase(name, _mlp, _mlp_units, _mlp_batch, regularizer, **kw)


def bert_case(name, regularizer, *, units=_bert_units, **kw):
    return ShardCase(name, _bert, units, _bert_batch, regularizer, **kw)


CASES = [
    # the three targets, FSDP2's defaults (full sharding, reshard_after_forward=True)
    mlp_case("input", _vat(target="input", xi=1e-1, eps=1.0, iters=2), call=_call_without_logits),
    bert_case("output", _vat(target="output")),
    bert_case("weight", _vat(target="weight")),
    bert_case("weight-embedding-unit", _vat(target="weight"), units=_bert_units_embedding_alone, reference="weight"),
    # the exact (xi -> 0) power step
    mlp_case("input-exact", _vat(target="input", hvp="exact", iters=2), call=_call_without_logits),
    bert_case("output-exact", _vat(target="output", hvp="exact")),
    bert_case("weight-exact-embedding-unit", _vat(target="weight", hvp="exact"), units=_bert_units_embedding_alone),
    # under FSDP2 the exact step makes two passes; dropout must draw the same masks in both
    ShardCase("output-exact-dropout", _bert_dropout, _bert_units, _bert_batch, _vat(target="output", hvp="exact")),
    # policies
    bert_case("weight-no-reshard", _vat(target="weight"), policy=lambda: {"reshard_after_forward": False},
              reference="weight"),
    bert_case("output-cpu-offload", _vat(target="output"), policy=_offload, reference="output"),
    bert_case("weight-cpu-offload-exact", _vat(target="weight", hvp="exact"), policy=_offload,
              units=_bert_units_embedding_alone, reference="weight-exact-embedding-unit"),
    mlp_case("input-bf16", _mixed_vat(target="input"), policy=_bf16, call=_call_without_logits, bf16=True,
             probe=_mixed_vat(target="input")),
    bert_case("output-bf16", _mixed_vat(target="output"), policy=_bf16, bf16=True, probe=_mixed_vat(target="output")),
    bert_case("weight-bf16-embedding-unit", _mixed_vat(target="weight"), policy=_bf16, bf16=True,
              units=_bert_units_embedding_alone, probe=_mixed_vat(target="weight")),
    # a causal LM's head taken as a fused linear + KL (head=): the logits are never built
    lm_case("causal-lm-head", lambda m, **kw: fastvat.VAT(m, **kw)),
    # a head sharded as a unit of its own: whole after the forward only when not resharded after it
    lm_case("causal-lm-head-alone-no-reshard", lambda m, **kw: fastvat.VAT(m, **kw), units=_lm_units_head_alone,
            policy=lambda: {"reshard_after_forward": False}, reference="causal-lm-head"),
    lm_case("causal-lm-head-alone-resharded-refused", lambda m, **kw: fastvat.VAT(m, **kw),
            units=_lm_units_head_alone, raises=("NotImplementedError", "FSDP has resharded them")),
    lm_case("causal-lm-head-r3f", lambda m, **kw: fastvat.RandomNoise(m, eps=0.5, symmetric=True, **kw)),
    # the other regularizers
    mlp_case("random-noise", lambda m, r, s: fastvat.RandomNoise(m, eps=0.5, generator=_gen(r)),
             call=_call_without_logits),
    mlp_case("fgm", lambda m, r, s: fastvat.FGM(m, loss_fn=F.cross_entropy, eps=0.5), call=_call_supervised),
    mlp_case("pgd", lambda m, r, s: fastvat.PGD(m, loss_fn=F.cross_entropy, eps=0.5, steps=2, random_start=True,
                                                generator=_gen(r)), call=_call_supervised),
    mlp_case("gradient-penalty-refused", lambda m, r, s: fastvat.GradientPenalty(m, generator=_gen(r)),
             call=_call_without_logits, raises=("NotImplementedError", "GradientPenalty does not support models "
                                                "sharded by FSDP")),
]


# ------------------------------------------------------------------------------------------
# one training run, sharded (a worker, ranks=[rank]) or not (the parent, ranks=[0, 1])
# ------------------------------------------------------------------------------------------
def _full(grad):
    if grad is None:
        return None
    if hasattr(grad, "full_tensor"):  # a DTensor: every rank must take part in the gather
        grad = grad.full_tensor()
    return grad.detach().float().clone()


class _ReduceScatters:
    """Counts FSDP's gradient reductions (c10d reduce-scatters) inside the block; counts nothing unsharded."""

    def __init__(self, sharded):
        self.mode, self.count = None, 0
        if sharded:
            from torch.distributed.tensor.debug import CommDebugMode
            self.mode = CommDebugMode()

    def __enter__(self):
        if self.mode is not None:
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
            self.count = sum(n for op, n in self.mode.get_comm_counts().items() if "reduce_scatter" in str(op))
        return False


def train(case, model, ranks, sharded):
    """STEPS steps of SGD on mean over ``ranks`` of (supervised + regularizer); returns what was seen."""
    regs = {r: case.regularizer(model, r, sharded) for r in ranks}
    rec = {"terms": [], "grads": [], "grad_before_backward": [], "probe": {}, "reduce_scatters": []}
    args, kwargs, y = case.batch(ranks[0])
    with _ReduceScatters(sharded) as plain:
        case.supervised(model(*args, **kwargs), y).backward()
    rec["plain_reduce_scatters"] = plain.count
    model.zero_grad(set_to_none=True)
    if case.probe is not None:
        for r in ranks:
            torch.manual_seed(r)
            args, kwargs, _ = case.batch(r)
            rec["probe"][r] = case.probe(model, r, sharded).perturbation(*args, **kwargs).detach().float()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        total, terms = 0.0, {}
        for r in ranks:
            # each rank's own random stream (dropout), the same in its worker and in the parent
            torch.manual_seed(1000 * len(rec["terms"]) + r)
            args, kwargs, y = case.batch(r)
            out = model(*args, **kwargs)
            with _ReduceScatters(sharded) as during_call:
                term = case.call(regs[r], args, kwargs, y, _logits_of(out))
            terms[r] = term.detach().float()
            total = total + (case.supervised(out, y) + term) / len(ranks)
        rec["grad_before_backward"].append(any(p.grad is not None for p in model.parameters()))
        with _ReduceScatters(sharded) as during_backward:
            total.backward()
        rec["reduce_scatters"].append((during_call.count, during_backward.count))
        rec["terms"].append(terms)
        rec["grads"].append({n: _full(p.grad) for n, p in model.named_parameters()})
        opt.step()
    return rec


def _shard(case, model):
    from torch.distributed.device_mesh import init_device_mesh

    # An explicit CPU mesh: on a machine with GPUs the default mesh would move the model to one.
    kw = dict(case.policy(), mesh=init_device_mesh("cpu", (WORLD,)))
    for unit in case.units(model):
        fsdp.fully_shard(unit, **kw)
    fsdp.fully_shard(model, **kw)
    return model


# ------------------------------------------------------------------------------------------
# VATTrainer under accelerate's FSDP2
# ------------------------------------------------------------------------------------------
def _accelerate_fsdp_on_cpu():
    """accelerate applies its FSDP plugin only on accelerator devices; on CPU it quietly trains with
    DDP instead. Set the distributed type and plugin as it does on GPUs, so that its FSDP2 preparation
    (auto-wrap, mixed-precision policy) runs here."""
    import accelerate
    from accelerate.utils import DistributedType

    original = accelerate.Accelerator.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.state.distributed_type != DistributedType.FSDP:
            self.state.distributed_type = DistributedType.FSDP
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self.state.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.state.mixed_precision)
            self.state.fsdp_plugin = fsdp_plugin

    accelerate.Accelerator.__init__ = init


def _trainer_rows():
    ids, am, y = _bert_rows()
    return [{"input_ids": ids[i], "attention_mask": am[i], "token_type_ids": torch.zeros_like(ids[i]),
             "labels": y[i]} for i in range(len(y))]


TRAINER_VAT_SEED = 5


def _trainer_run(out_dir):
    import transformers
    from torch.distributed.fsdp import FSDPModule

    from fastvat.integrations.huggingface import VATTrainer

    _accelerate_fsdp_on_cpu()
    seen = {"inputs": [], "vat": [], "grads": None}

    class Recording(VATTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            seen["inputs"].append({k: v.detach().clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

        def compute_vat_loss(self, model, inputs, logits=None):
            loss = super().compute_vat_loss(model, inputs, logits)
            seen["vat"].append(loss.detach().float())
            return loss

    class Gradients(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen["grads"] = {n: _full(p.grad) for n, p in model.named_parameters()}

    args = transformers.TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=2, max_steps=1, use_cpu=True, max_grad_norm=0.0,
        fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]},
        report_to=[], save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
        # Otherwise the Trainer multiplies the supervised loss by the world size, assuming the model
        # divides it by the global count it passes as num_items_in_batch, which BERT's classifier ignores.
        average_tokens_across_devices=False)
    trainer = Recording(model=_bert(), args=args, train_dataset=_trainer_rows(), callbacks=[Gradients()],
                        vat={"target": "weight", "generator": torch.Generator().manual_seed(TRAINER_VAT_SEED)})
    trainer.train()
    seen["fsdp_units"] = sorted(type(m).__name__ for m in trainer.model.modules() if isinstance(m, FSDPModule))
    seen["fsdp_enabled"] = bool(trainer.is_fsdp_enabled)
    return seen


# ------------------------------------------------------------------------------------------
# the workers and the parent's side
# ------------------------------------------------------------------------------------------
def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD)
    results = {}
    for case in CASES:
        try:
            results[case.name] = train(case, _shard(case, case.model()), [rank], True)
        except Exception as exc:  # recorded, then asserted on in the parent
            results[case.name] = {"error": (type(exc).__name__, str(exc), traceback.format_exc())}
        dist.barrier()
    if importlib.util.find_spec("accelerate") is None:  # transformers.Trainer needs it
        results["trainer"] = {"skip": "accelerate is not installed"}
    else:
        try:
            results["trainer"] = _trainer_run(os.path.join(out_dir, "trainer"))
        except Exception as exc:
            results["trainer"] = {"error": (type(exc).__name__, str(exc), traceback.format_exc())}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, nprocs, out_dir):
    """Runs ``worker(rank, port, out_dir)`` in ``nprocs`` fresh processes; kills them after TIMEOUT_S."""
    start = time.monotonic()
    ctx = mp.start_processes(worker, args=(_free_port(), str(out_dir)), nprocs=nprocs, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() - start > TIMEOUT_S:
                pytest.fail(f"the FSDP workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(nprocs)]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    pytest.importorskip("transformers")
    return _spawn(_worker, WORLD, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def unsharded():
    runs = {}

    def run(case):
        key = case.reference or case.name
        if key not in runs:
            runs[key] = train(case, case.model(), list(range(WORLD)), False)
        return runs[key]
    return run


def _ok(res, name):
    if "error" in res:
        kind, msg, tb = res["error"]
        pytest.fail(f"{name} raised {kind} under FSDP2:\n{tb}")
    return res


def _cosine(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("case", [c for c in CASES if c.raises is None], ids=lambda c: c.name)
def test_sharded_training_matches_unsharded(sharded_results, unsharded, case):
    got = [_ok(sharded_results[r][case.name], case.name) for r in range(WORLD)]
    want = unsharded(case)
    for step in range(STEPS):
        assert not got[0]["grad_before_backward"][step], "the regularizer call wrote .grad"
        # The regularizer's passes all-gather parameters but reduce no gradient; the one backward
        # reduces each unit's gradients once, as a supervised backward does.
        for r in range(WORLD):
            assert got[r]["reduce_scatters"][step] == (0, got[r]["plain_reduce_scatters"]), \
                (step, got[r]["reduce_scatters"][step], got[r]["plain_reduce_scatters"])
        assert got[0]["plain_reduce_scatters"] >= len(case.units(case.model()))
        # After the first optimizer step the sharded and unsharded weights differ by the rounding of the
        # gradient reduction's order (~1e-7), which a KL between two nearby softmaxes magnifies.
        term_rtol = 5e-2 if case.bf16 else (1e-5 if step == 0 else 5e-4)
        for r in range(WORLD):
            term, ref = got[r]["terms"][step][r], want["terms"][step][r]
            assert float(ref) > 0
            torch.testing.assert_close(term, ref, rtol=term_rtol, atol=1e-8, msg=lambda m: f"step {step}: {m}")
        grads, ref_grads = got[0]["grads"][step], want["grads"][step]
        assert set(grads) == set(ref_grads)
        assert all(grads[n] is not None for n in ref_grads), f"step {step}: parameters without a gradient"
        if case.bf16:
            # bf16 forward and backward: a few per cent of each tensor's norm (a floor for tensors whose
            # gradient is zero up to rounding, such as attention key biases)
            total = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
            diff = torch.cat([(grads[n] - g).flatten() for n, g in ref_grads.items()]).norm()
            assert diff <= 3e-2 * total, (step, float(diff / total))
            for n, ref in ref_grads.items():
                err = float((grads[n] - ref).norm() / (ref.norm() + 1e-3 * total))
                assert err < 0.15, (step, n, err)
        else:
            for n, ref in ref_grads.items():
                torch.testing.assert_close(grads[n], ref, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=n: f"step {step}, {n}: {m}")
        # every rank gathers the same full gradients
        for n in ref_grads:
            torch.testing.assert_close(got[1]["grads"][step][n], grads[n], rtol=0, atol=0)
    for r, ref in want["probe"].items():
        assert _cosine(got[r]["probe"][r], ref) > 0.999, (case.name, r, _cosine(got[r]["probe"][r], ref))


@pytest.mark.parametrize("case", [c for c in CASES if c.raises is not None], ids=lambda c: c.name)
def test_unsupported_regularizer_raises_under_fsdp(sharded_results, case):
    for r in range(WORLD):
        res = sharded_results[r][case.name]
        assert "error" in res, f"{case.name} ran under FSDP2 instead of raising"
        kind, msg, _ = res["error"]
        assert kind == case.raises[0] and case.raises[1] in msg, msg


def test_vat_trainer_under_accelerate_fsdp2(sharded_results):
    if "skip" in sharded_results[0]["trainer"]:
        pytest.skip(sharded_results[0]["trainer"]["skip"])
    got = [_ok(sharded_results[r]["trainer"], "VATTrainer") for r in range(WORLD)]
    assert got[0]["fsdp_enabled"]
    # accelerate wrapped the layers, the nn.Embedding and the root
    assert got[0]["fsdp_units"].count("FSDPBertLayer") == 2 and "FSDPEmbedding" in got[0]["fsdp_units"]
    model = _bert()
    total = 0.0
    for r in range(WORLD):
        (inputs,) = got[r]["inputs"]
        out = model(**inputs)
        vat = fastvat.VAT(model, model.get_input_embeddings(), target="weight",
                          generator=torch.Generator().manual_seed(TRAINER_VAT_SEED))
        term = vat(**inputs, logits=out.logits)
        torch.testing.assert_close(got[r]["vat"][0], term.detach(), rtol=1e-5, atol=1e-8)
        total = total + (out.loss + term) / WORLD
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[0]["grads"][n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------------------------------
# CUDA: CPU-offloaded shards must not hide CUDA autocast from hvp="auto" (skipped without a GPU)
# ------------------------------------------------------------------------------------------
def _cuda_offload_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (1,))
    _, kwargs, _ = _bert_batch(0)
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    cosines = {}
    for target, units in (("output", _bert_units), ("weight", _bert_units_embedding_alone)):
        unsharded, sharded = _bert().cuda(), _bert().cuda()
        for unit in units(sharded):
            fsdp.fully_shard(unit, mesh=mesh, offload_policy=fsdp.CPUOffloadPolicy())
        fsdp.fully_shard(sharded, mesh=mesh, offload_policy=fsdp.CPUOffloadPolicy())
        r = {}
        for name, model in (("sharded", sharded), ("unsharded", unsharded)):
            vat = fastvat.VAT(model, embedding=model.get_input_embeddings(), target=target, xi=1e-6,
                              generator=torch.Generator("cuda").manual_seed(1))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                r[name] = vat.perturbation(**kwargs).float().cpu()
        cosines[target] = _cosine(r["sharded"], r["unsharded"])
    torch.save(cosines, os.path.join(out_dir, "rank0.pt"))
    os._exit(0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs a CUDA GPU and NCCL")
def test_cuda_offload_with_autocast_takes_the_exact_step(tmp_path):
    """With the shards on the CPU, the autocast that matters is CUDA's: a finite difference at xi=1e-6
    in bf16 would give a zero or random direction, the exact step the unsharded model's."""
    pytest.importorskip("transformers")
    (cosines,) = _spawn(_cuda_offload_worker, 1, tmp_path)
    assert all(c > 0.99 for c in cosines.values()), cosines
