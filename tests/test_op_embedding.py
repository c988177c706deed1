"""ops.embedding_gather_add against fastvat.reference: every dtype x index dtype, repeated and padding
ids, strided and empty inputs, gradients (gradcheck in float64), index range checks in the kernel,
and torch.library.opcheck.

Device is a parameter: the CUDA cases run when a GPU is visible (the same file is the CUDA suite).
"""
import pytest
import torch

from fastvat import ops
from fastvat import reference as ref

from op_helpers import (COMPILED, DEVICES, DTYPE_IDS, DTYPES, assert_close, gather_inputs, randn, require_kernels,
                        uses_kernels)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("index_dtypes", [(torch.int64, torch.int64), (torch.int32, torch.int64), (torch.int32, torch.int32)],
                         ids=["i64", "i32_i64", "i32"])
def test_embedding_gather_add(device, dtype, index_dtypes):
    weight, ids, delta, di = gather_inputs(dtype, device, *index_dtypes)
    weight.requires_grad_()
    delta.requires_grad_()
    out = ops.embedding_gather_add(weight, ids, delta, di, padding_idx=0)
    w2, d2 = weight.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
    expected = ref.embedding_gather_add(w2, ids.long(), d2, di.long(), padding_idx=0)
    assert out.shape == (3, 5, 13) and out.dtype == dtype
    assert_close(out, expected, dtype)
    go = randn(3, 5, 13, dtype=dtype, device=device, seed=9, scale=2.0)
    gw, gd = torch.autograd.grad(out, (weight, delta), go)
    if uses_kernels(device):
        # F.embedding's backward sums repeated rows in the half dtype; the kernels sum in float32
        # and round once, so compare with sums taken in float64 and rounded once.
        w64, d64 = w2.detach().double().requires_grad_(), d2.detach().double().requires_grad_()
        out64 = ref.embedding_gather_add(w64, ids.long(), d64, di.long(), padding_idx=0)
        gw_ref, gd_ref = (g.to(dtype) for g in torch.autograd.grad(out64, (w64, d64), go.double()))
    else:
        gw_ref, gd_ref = torch.autograd.grad(expected, (w2, d2), go)
    assert_close(gw, gw_ref, dtype)
    assert_close(gd, gd_ref, dtype)
    assert (gw[0] == 0).all()  # padding row
    used = set(ids.flatten().tolist())
    assert all((gw[r] == 0).all() for r in range(11) if r not in used)


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_gather_add_noncontig_and_empty(device):
    weight = randn(13, 11, device=device).t()  # [11, 13], column-major
    delta = randn(13, 4, device=device, seed=1).t()
    ids = torch.tensor([[1, 2, 10], [0, 0, 5]], device=device).t()
    di = torch.tensor([[3, 0, 1], [2, 2, 2]], device=device).t()
    out = ops.embedding_gather_add(weight, ids, delta, di)
    torch.testing.assert_close(out, weight[ids] + delta[di])
    e = torch.empty(0, 7, dtype=torch.long, device=device)
    assert ops.embedding_gather_add(weight, e, delta, e).shape == (0, 7, 13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_idx", [None, 2, -9])
def test_embedding_gather_add_gradcheck(device, padding_idx):
    weight, ids, delta, di = gather_inputs(torch.float64, device)
    weight.requires_grad_()
    delta.requires_grad_()
    if padding_idx is not None:
        # the padding row gets no gradient (as in F.embedding), which gradcheck would flag: keep it out
        pad = padding_idx % 11
        ids = torch.where(ids == pad, (pad + 1) % 11, ids)
    fn = lambda w, d: ops.embedding_gather_add(w, ids, d, di, padding_idx=padding_idx)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight, delta))
    if padding_idx is not None:
        ids2 = ids.clone()
        ids2[0, 1] = pad
        (gw,) = torch.autograd.grad(ops.embedding_gather_add(weight, ids2, delta, di, padding_idx=padding_idx).sum(), weight)
        assert (gw[pad] == 0).all() and (gw[ids2[0, 0]] != 0).all()


@pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded")
def test_embedding_gather_add_kernel_checks_index_range():
    weight, ids, delta, di = gather_inputs(torch.float32, "cpu")
    bad = ids.clone()
    bad[1, 2] = 11
    with pytest.raises(IndexError, match="ids"):
        torch.ops.fastvat.embedding_gather_add(weight, bad, delta, di, -1)
    bad = di.clone()
    bad[0, 0] = -1
    with pytest.raises(IndexError, match="delta_index"):
        torch.ops.fastvat.embedding_gather_add(weight, ids, delta, bad, -1)
    with pytest.raises(IndexError, match="delta_index"):
        torch.ops.fastvat.embedding_gather_add_backward(randn(3, 5, 13), ids, bad, 11, 4, -1, True, True)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_embedding(device):
    require_kernels(device)
    weight, ids, delta, di = gather_inputs(torch.float64, device)
    weight.requires_grad_()
    delta.requires_grad_()
    torch.library.opcheck(torch.ops.fastvat.embedding_gather_add.default, (weight, ids, delta, di, 0))
    grad = randn(3, 5, 13, device=device, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fastvat.embedding_gather_add_backward.default, (grad, ids, di, 11, 4, 0, True, True)
    )
    torch.library.opcheck(
        torch.ops.fastvat.embedding_gather_add_backward.default, (grad, ids, di, 11, 4, -1, False, True)
    )
