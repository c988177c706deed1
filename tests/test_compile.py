"""torch.compile: the fused ops trace into one graph with no break, and VAT on a compiled model
gives the eager loss and gradients.

Compilation on a 2-core CPU is slow, so these use backend="aot_eager" (dynamo + AOTAutograd, the
part that sees graph breaks and the ops' fake kernels and autograd) and one inductor test.
"""
import pytest
import torch
import torch.nn.functional as F

import fastvat
from fastvat import ops

from models import TinyText, mlp

BACKEND = fastvat.extension_info()["backend"]
needs_kernels = pytest.mark.skipif(
    BACKEND == "reference",
    reason="the compiled fastvat kernels are not loaded (backend 'reference'): there are no custom ops to trace",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Recorder:
    """A torch.compile backend that records the FX graphs it is given and runs them eagerly via AOTAutograd."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def has_op(self, name):
        """Whether torch.ops.fastvat.<name> is a node of a recorded graph (traced as one op, not decomposed)."""
        nodes = (str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function")
        return any(t == f"fastvat.{name}" or t.startswith(f"fastvat.{name}.") for t in nodes)


def _compiled(fn):
    rec = _Recorder()
    return torch.compile(fn, fullgraph=True, backend=rec), rec


# ------------------------------------------------------------------------------------------
# each op, called directly, compiles to one graph (fullgraph=True raises on any graph break)
# ------------------------------------------------------------------------------------------
@needs_kernels
def test_l2_normalize_compiles_without_graph_break():
    def f(x, mask, base):
        return ops.l2_normalize(x, scale=2.0, norm="sample", mask=mask, baseline=base) * 3

    x = torch.randn(3, 5, 4, requires_grad=True)
    base = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    cf, rec = _compiled(f)
    got = cf(x, mask, base)
    assert len(rec.graphs) == 1 and rec.has_op("l2_normalize")
    want = f(x, mask, base)
    torch.testing.assert_close(got, want)
    (g_c,) = torch.autograd.grad(got.square().sum(), x)
    (g_e,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(g_c, g_e)


@needs_kernels
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kl_div_with_logits_and_backward_compile_without_graph_break(reduction):
    def f(p, q, mask):
        return ops.kl_div_with_logits(p, q, mask=mask, reduction=reduction)

    p = torch.randn(4, 6, 7)
    q = torch.randn(4, 6, 7, requires_grad=True)
    mask = torch.rand(4, 6) > 0.3
    cf, rec = _compiled(f)
    got = cf(p, q, mask)
    assert len(rec.graphs) == 1 and rec.has_op("kl_div_with_logits")
    want = f(p, q, mask)
    torch.testing.assert_close(got, want)
    got.backward()
    g_c = q.grad.clone()
    q.grad = None
    want.backward()
    torch.testing.assert_close(g_c, q.grad)


@needs_kernels
def test_embedding_gather_add_and_backward_compile_without_graph_break():
    def f(w, ids, delta, index):
        return ops.embedding_gather_add(w, ids, delta, index, padding_idx=0).sum(-1)

    w = torch.randn(20, 8, requires_grad=True)
    ids = torch.tensor([[3, 5, 3, 0], [7, 5, 0, 0]])
    rows, index = torch.unique(ids, sorted=True, return_inverse=True)
    delta = torch.randn(rows.numel(), 8, requires_grad=True)
    cf, rec = _compiled(f)
    got = cf(w, ids, delta, index)
    assert len(rec.graphs) == 1 and rec.has_op("embedding_gather_add")
    want = f(w, ids, delta, index)
    torch.testing.assert_close(got, want)
    gw_c, gd_c = torch.autograd.grad((got * got).sum(), (w, delta))
    gw_e, gd_e = torch.autograd.grad((want * want).sum(), (w, delta))
    torch.testing.assert_close(gw_c, gw_e)
    torch.testing.assert_close(gd_c, gd_e)
    assert (gw_c[0] == 0).all()  # padding_idx gets no gradient, as in F.embedding


@needs_kernels
def test_explain_reports_no_graph_break_for_all_ops_together():
    def f(x, p, w, ids, delta, index):
        e = ops.embedding_gather_add(w, ids, delta, index) + x
        r = ops.l2_normalize(e, scale=0.5, norm="token")
        return ops.kl_div_with_logits(p, r, reduction="sum")

    ids = torch.tensor([[1, 2, 2]])
    rows, index = torch.unique(ids, sorted=True, return_inverse=True)
    args = (torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(5, 4), ids, torch.randn(rows.numel(), 4), index)
    explanation = torch._dynamo.explain(f)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# ------------------------------------------------------------------------------------------
# VAT with a compiled model equals eager
# ------------------------------------------------------------------------------------------
def _step(model, make_vat, args, kwargs, y):
    """One supervised + VAT step; returns the VAT loss and the gradients."""
    model.zero_grad()
    vat = make_vat(model)
    logits = model(*args, **kwargs)
    loss_vat = vat(*args, logits=logits, **kwargs)
    (F.cross_entropy(logits, y) + loss_vat).backward()
    return loss_vat.detach(), [p.grad.clone() for p in model.parameters()]


def _compare(model, make_vat, args, kwargs, y, backend):
    eager = _step(model, make_vat, args, kwargs, y)
    compiled_model = torch.compile(model, backend=backend)
    compiled = _step(compiled_model, make_vat, args, kwargs, y)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert float(eager[0]) > 0
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target", ["output", "weight"])
def test_vat_on_compiled_text_model_matches_eager(target):
    model = TinyText(vocab=30, dim=8, hidden=16, classes=3, dtype=torch.float32, seed=0)
    ids = torch.tensor([[1, 4, 9, 0], [2, 2, 7, 5], [3, 8, 0, 0]])
    am = (ids != 0).long()
    y = torch.tensor([0, 1, 2])

    def make_vat(m):
        return fastvat.VAT(m, embedding=model.emb, target=target, xi=1e-1, iters=1,
                           generator=torch.Generator().manual_seed(3))

    # Default dynamo config: both targets patch the embedding's forward for the duration of a pass,
    # which dynamo guards on (it does not, by default, guard on hooks added after compilation).
    _compare(model, make_vat, (ids,), {"attention_mask": am}, y, "aot_eager")


def test_output_target_on_compiled_model_is_never_silently_unperturbed():
    """With dynamo's default config (no guards on submodule hooks): either the eager result or a clear
    error, never a loss computed without the perturbation."""
    model = TinyText(vocab=30, dim=8, hidden=16, classes=3, dtype=torch.float32, seed=0)
    ids = torch.tensor([[1, 4, 9, 0], [2, 2, 7, 5]])
    am = (ids != 0).long()

    def run(m):
        return fastvat.VAT(m, embedding=model.emb, generator=torch.Generator().manual_seed(3))(ids, attention_mask=am)

    want = run(model)
    compiled = torch.compile(model, backend="aot_eager")
    compiled(ids, attention_mask=am)  # compiled once, before the hook exists
    try:
        got = run(compiled)
    except ValueError as exc:
        assert "never called the embedding" in str(exc)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vat_on_inductor_compiled_model_matches_eager():
    model = mlp((6, 16, 3))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0, 1])

    def make_vat(m):
        return fastvat.VAT(m, xi=1e-1, iters=2, generator=torch.Generator().manual_seed(3))

    _compare(model, make_vat, (x,), {}, y, "inductor")
