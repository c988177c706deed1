"""ops.perturb_ / ops.restore_ against fastvat.reference: the in-place update and its rounding bit for
bit, buffer reuse, strided and aliased arguments, torch.library.opcheck, and argument checking.

Device is a parameter: the CUDA cases run when a GPU is visible (the same file is the CUDA suite).
"""
import math

import pytest
import torch

from fastvat import ops
from fastvat import reference as ref

from op_helpers import CPU_KERNELS, DEVICES, DTYPE_IDS, DTYPES, assert_close, randn, require_kernels

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_perturb_semantics(device, dtype):
    w0 = randn(37, 23, dtype=dtype, device=device)
    d1, d2 = randn(37, 23, device=device, seed=1, dtype=dtype), randn(37, 23, device=device, seed=2, dtype=dtype)
    ulp = torch.finfo(dtype).eps * w0.abs().max().item()  # one rounding of a weight-sized value

    def close(a, e, roundings):
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), rtol=0, atol=roundings * ulp)

    w = w0.clone()
    new1 = ops.perturb_(w, d1, scale=1.5)  # fresh buffer
    expected1 = ref.l2_normalize(d1, scale=1.5, norm="global")
    assert new1.dtype == dtype and new1.shape == w0.shape
    assert_close(new1, expected1, dtype)
    close(w, w0.double() + expected1.double(), 1)

    # second step reuses the buffer: previous is overwritten with the new perturbation and returned
    ptr = new1.data_ptr()
    w_ref, prev_ref = w.clone(), new1.clone()
    new2 = ops.perturb_(w, d2, scale=0.5, previous=new1)
    assert new2 is new1 and new2.data_ptr() == ptr
    ref.perturb_(w_ref, d2, 0.5, previous=prev_ref)
    assert_close(new2, prev_ref, dtype)
    close(w, w_ref, 2)
    # weight is w0 + new2 up to rounding; restore_ takes it back to w0 up to rounding
    close(w, w0.double() + new2.double(), 3)
    ops.restore_(w, new2)
    close(w, w0, 4)


def exact_norm_direction(n, mags, g):
    """n random signs times magnitudes drawn from ``mags`` (small dyadic numbers): the sum of squares
    is exact in float32 in any order, so every backend computes the same norm factor."""
    mags = torch.tensor(mags)
    return mags[torch.randint(0, len(mags), (n,), generator=g)] * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_perturb_16bit_rounding_is_exact(device, dtype):
    """delta = round(direction * f) bit for bit as torch rounds float32 -> dtype (nearest even,
    ties included), and weight = round(weight + delta) for a zero start; f = scale / ||direction||
    is made exact: every |direction| is a small dyadic number, so the norm's partial sums are exact."""
    g = torch.Generator().manual_seed(0)
    n = 3 * 16384 + 77  # several reduction chunks and a vector tail
    d = exact_norm_direction(n, [1.0, 1.5, 1.25, 1.75, 0.5, 0.75, 2.0, 1.125], g).to(dtype)
    # 1 + 2**-8 (+ 2**-11 for fp16) is halfway between two bf16 (fp16) neighbours of 1: d = 1 is a tie
    f = 1.0 + 2.0 ** -8 if dtype == torch.bfloat16 else 1.0 + 2.0 ** -11
    norm = d.double().norm().item()
    scale = f * norm
    assert float(torch.tensor(scale / norm, dtype=torch.float32)) == f
    w = torch.zeros(n, dtype=dtype, device=device)
    dd = d.to(device)
    new = ops.perturb_(w, dd, scale=scale)
    expected = (d.float() * f).to(dtype)
    assert torch.equal(new.cpu(), expected), (new.cpu() != expected).sum()
    assert torch.equal(w.cpu(), expected)
    # ties rounded to even: d = +-1 gives exactly +-1
    ones = d.abs() == 1
    assert bool(ones.any()) and torch.equal(new.cpu()[ones].abs(), torch.ones(int(ones.sum()), dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_out_and_strided_buffers(device):
    w0 = randn(40, 12, device=device)
    d = randn(40, 12, device=device, seed=1)
    # out= without previous
    w, out = w0.clone(), torch.full((40, 12), 7.0, device=device)
    assert ops.perturb_(w, d, scale=2.0, out=out) is out
    assert_close(out, ref.l2_normalize(d, scale=2.0), torch.float32)
    assert_close(w, w0 + out, torch.float32)
    # previous and out both given: previous is read, out receives the new value, previous untouched
    prev = randn(40, 12, device=device, seed=3, scale=0.1)
    prev_copy = prev.clone()
    w, out = w0.clone(), torch.empty(40, 12, device=device)
    assert ops.perturb_(w, d, scale=2.0, previous=prev, out=out) is out
    assert torch.equal(prev, prev_copy)
    assert_close(w, w0 + out - prev, torch.float32, scale=w0.abs().max().item())
    # non-contiguous weight (a transposed view) and previous (a strided view)
    wt = w0.t().contiguous().t()  # column-major storage
    store = torch.zeros(40, 24, device=device)
    prev_view = store[:, ::2]
    prev_view.copy_(prev)
    new = ops.perturb_(wt, d, scale=2.0, previous=prev_view)
    assert new is prev_view
    assert_close(prev_view, ref.l2_normalize(d, scale=2.0), torch.float32)
    assert_close(wt, w0 + prev_view - prev, torch.float32, scale=w0.abs().max().item())
    assert (store[:, 1::2] == 0).all()  # the gaps of the strided buffer are untouched


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_op_with_strided_weight_and_delta(device):
    """The op itself (not only the wrapper) updates strided weight/delta through their views."""
    require_kernels(device)
    w0, d = randn(30, 9, device=device), randn(9, 30, device=device, seed=1).t()
    prev = randn(30, 9, device=device, seed=2, scale=0.1)
    w = w0.t().contiguous().t()
    store = torch.zeros(30, 18, device=device)
    delta = store[:, 1::2]
    delta.copy_(prev)
    torch.ops.fastvat.perturb_(w, d, delta, 0.7, True)
    new = ref.l2_normalize(d, scale=0.7)
    assert_close(delta, new, torch.float32)
    assert_close(w, w0 + new - prev, torch.float32, scale=w0.abs().max().item())
    assert (store[:, 0::2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_direction_of_other_dtype_and_zero_direction(device):
    w0 = randn(16, 8, dtype=torch.bfloat16, device=device)
    d = randn(16, 8, device=device, seed=1)  # float32 direction for a bf16 weight
    w = w0.clone()
    new = ops.perturb_(w, d, scale=1.0)
    assert new.dtype == torch.bfloat16
    assert_close(new, ref.l2_normalize(d, norm="global").to(torch.bfloat16), torch.bfloat16)
    # normalised in the direction's precision (not rounded to bf16 first): with 11-bit values (more
    # than bf16 holds) whose sum of squares is exact in float32 in any order, every backend gets the
    # same factor, and new = round_bf16(d * f) bit for bit (a bf16-first cast changes 2 of these 16)
    k = torch.randint(-1023, 1024, (4, 4), generator=torch.Generator().manual_seed(5))
    d = (k.float() / 1024).to(device)
    w0 = randn(4, 4, dtype=torch.bfloat16, device=device)
    w = w0.clone()
    new = ops.perturb_(w, d, scale=1.0)
    f = torch.tensor(1.0 / math.sqrt(float((k.double() ** 2).sum()) / 1024**2), dtype=torch.float32)
    expected = (d.cpu() * f).to(torch.bfloat16)
    assert torch.equal(new.cpu(), expected), int((new.cpu() != expected).sum())
    assert torch.equal(w.cpu(), (w0.float() + new.float()).to(torch.bfloat16).cpu())
    w0 = randn(16, 8, dtype=torch.bfloat16, device=device)
    w = w0.clone()
    new = ops.perturb_(w, torch.zeros(16, 8, device=device), scale=1.0)
    assert torch.isfinite(new).all() and (new == 0).all() and torch.equal(w, w0)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_rounding_matches_the_reference_bit_for_bit(device):
    """16-bit weight with previous: weight = round(weight + (new - previous)), one rounding; a 16-bit
    direction for a wider weight: new is formed in the weight's dtype."""
    g = torch.Generator().manual_seed(3)
    n = 2 * 16384 + 5
    d = exact_norm_direction(n, [1.0, 1.5, 1.25, 0.75], g)
    scale = 0.37 * d.double().norm().item()
    w0 = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    prev0 = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
    w, prev = w0.clone().to(device), prev0.clone().to(device)
    ops.perturb_(w, d.to(torch.bfloat16).to(device), scale=scale, previous=prev)
    w_ref, prev_ref = w0.clone(), prev0.clone()
    ref.perturb_(w_ref, d.to(torch.bfloat16), scale, previous=prev_ref)
    assert torch.equal(prev.cpu(), prev_ref)
    assert torch.equal(w.cpu(), w_ref), int((w.cpu() != w_ref).sum())
    expected = (w0.float() + (prev_ref.float() - prev0.float())).to(torch.bfloat16)
    assert torch.equal(w_ref, expected)
    # bf16 direction, float32 weight: formed in float32 (not rounded to bf16 on the way)
    dir16 = (d * 1.001).to(torch.bfloat16)
    w32 = torch.zeros(n, device=device)
    new = ops.perturb_(w32, dir16.to(device), scale=scale)
    assert new.dtype == torch.float32
    assert torch.equal(new.cpu(), ref.l2_normalize(dir16.float(), scale=scale, norm="global"))


# (weight's dtype, direction's dtype)
MIXED = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float32),
         (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float64)]
MIXED_IDS = [f"w{DTYPE_IDS[DTYPES.index(a)]}-d{DTYPE_IDS[DTYPES.index(b)]}" for a, b in MIXED]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", MIXED, ids=MIXED_IDS)
@pytest.mark.parametrize("with_previous", [False, True], ids=["fresh", "previous"])
def test_perturb_direction_of_another_dtype_is_formed_in_the_wider(device, dtypes, with_previous):
    """new = scale * d / ||d|| against float64 truth, to the precision of the weight's dtype (where new
    is stored) whatever the direction's: a narrower direction is not a narrower perturbation."""
    wd, dd = dtypes
    d = randn(33, 129, dtype=dd, device=device, seed=1)
    w0 = randn(33, 129, dtype=wd, device=device, scale=0.1)
    prev0 = randn(33, 129, dtype=wd, device=device, seed=2, scale=0.01)
    w = w0.clone()
    prev = prev0.clone() if with_previous else None
    new = ops.perturb_(w, d, scale=0.7, previous=prev)
    assert new.dtype == wd
    truth = 0.7 * d.double() / d.double().norm()
    # one rounding to the weight's dtype: at most half a unit in the last place (half the subnormal
    # spacing below the normals), plus a few units of the arithmetic in a float32/float64 weight's dtype
    fi = torch.finfo(wd)
    slack = 8 * fi.eps if wd in (torch.float32, torch.float64) else 1e-3 * fi.eps
    bound = (fi.eps / 2 + slack) * truth.abs() + fi.tiny * fi.eps / 2
    excess = ((new.double() - truth).abs() - bound).max().item()
    assert excess <= 0, excess
    acc = ref.acc_dtype(wd)
    step = new.to(acc) - (prev0.to(acc) if with_previous else 0)
    assert torch.equal(w, (w0.to(acc) + step).to(wd))


@pytest.mark.skipif(not CPU_KERNELS, reason="vectorized CPU kernels not in use")
def test_perturb_independent_of_thread_count():
    w0, d, p = randn(7, 20001), randn(7, 20001, seed=1), randn(7, 20001, seed=2, scale=0.01)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w, prev = w0.clone(), p.clone()
            ops.perturb_(w, d, scale=1.0, previous=prev)
            res.append((w, prev))
    finally:
        torch.set_num_threads(before)
    for w, prev in res[1:]:
        assert torch.equal(w, res[0][0]) and torch.equal(prev, res[0][1])


# Every pair of perturb_'s tensor arguments, in the order the error message names them.
PERTURB_PAIRS = [("weight", "direction"), ("weight", "previous"), ("weight", "out"), ("direction", "previous"),
                 ("direction", "out"), ("previous", "out")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PERTURB_PAIRS, ids="-".join)
def test_perturb_rejects_partially_overlapping_arguments(device, pair):
    """Two views of one buffer, one row apart: rejected, naming both, with nothing written."""
    args = {"weight": randn(8, 7, device=device), "direction": randn(8, 7, device=device, seed=1),
            "previous": randn(8, 7, device=device, seed=2), "out": torch.zeros(8, 7, device=device)}
    buf = randn(9, 7, device=device, seed=3)
    a, b = pair
    args[a], args[b] = buf[:-1], buf[1:]
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(ValueError, match=rf"^{a} and {b} partially overlap"):
        ops.perturb_(args["weight"], args["direction"], scale=1.0, previous=args["previous"], out=args["out"])
    for k, v in args.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["previous", "out"])
def test_perturb_rejects_weight_as_its_own_perturbation_buffer(device, name):
    w, d = randn(8, 7, device=device), randn(8, 7, device=device, seed=1)
    w0 = w.clone()
    with pytest.raises(ValueError, match=rf"^weight and {name} are the same memory"):
        ops.perturb_(w, d, scale=1.0, **{name: w.view(8, 7)})
    assert torch.equal(w, w0)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_full_aliases_and_disjoint_views_still_work(device):
    """direction may be the very memory of weight, previous or out (it is read first), out that of
    previous; views that interleave in one buffer without sharing an element are separate tensors."""
    w0, d0, prev0 = randn(8, 7, device=device), randn(8, 7, device=device, seed=1), randn(8, 7, device=device, seed=2)
    new0 = ref.l2_normalize(d0, scale=1.5)

    def check(w, new, w_expected, new_expected):
        assert_close(new, new_expected, torch.float32)
        assert_close(w, w_expected, torch.float32, scale=w0.abs().max().item())

    w = w0.clone()  # direction is weight
    new = ops.perturb_(w, w, scale=1.5)
    check(w, new, w0 + ref.l2_normalize(w0, scale=1.5), ref.l2_normalize(w0, scale=1.5))
    w, prev = w0.clone(), d0.clone()  # direction is previous
    new = ops.perturb_(w, prev, scale=1.5, previous=prev)
    check(w, new, w0 + new0 - d0, new0)
    w, d, prev = w0.clone(), d0.clone(), prev0.clone()  # direction is out, previous separate
    new = ops.perturb_(w, d, scale=1.5, previous=prev, out=d)
    assert new is d and torch.equal(prev, prev0)
    check(w, new, w0 + new0 - prev0, new0)
    w, prev = w0.clone(), prev0.clone()  # out is another view of previous's memory
    new = ops.perturb_(w, d0, scale=1.5, previous=prev, out=prev.view(8, 7))
    check(w, new, w0 + new0 - prev0, new0)
    buf = torch.stack([w0, d0], -1)  # [8, 7, 2]: weight and direction interleaved
    w, d = buf[..., 0], buf[..., 1]
    new = ops.perturb_(w, d, scale=1.5)
    check(w, new, w0 + new0, new0)
    assert torch.equal(d, d0)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_perturb(device):
    require_kernels(device)
    w, d, delta = randn(6, 5, device=device), randn(6, 5, device=device, seed=1), randn(6, 5, device=device, seed=2)
    torch.library.opcheck(torch.ops.fastvat.perturb_.default, (w, d, delta, 1.5, True))
    torch.library.opcheck(torch.ops.fastvat.perturb_.default, (w, d, delta, 1.5, False))


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, raised before anything is written
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_perturb_leave_weight_untouched():
    w = randn(5, 4)
    w0 = w.clone()
    d = randn(5, 4, seed=1)
    prev = randn(5, 4, seed=2)
    prev0 = prev.clone()
    with pytest.raises(TypeError, match="weight"):
        ops.perturb_(torch.ones(5, 4, dtype=torch.int32), d, scale=1.0)
    with pytest.raises(ValueError, match="direction"):
        ops.perturb_(w, randn(4, 5), scale=1.0)
    with pytest.raises(ValueError, match="direction"):
        ops.perturb_(w, torch.empty(5, 4, device="meta"), scale=1.0)
    with pytest.raises(TypeError, match="previous"):
        ops.perturb_(w, d, scale=1.0, previous=prev.double())
    with pytest.raises(ValueError, match="out"):
        ops.perturb_(w, d, scale=1.0, previous=prev, out=torch.empty(5, 5))
    with pytest.raises(ValueError, match="scale"):
        ops.perturb_(w, d, scale=float("inf"), previous=prev)
    leaf = randn(5, 4).requires_grad_()
    with pytest.raises(ValueError, match="weight"):
        ops.perturb_(leaf, d, scale=1.0)
    with pytest.raises(ValueError, match="weight"):
        ops.restore_(leaf, d)
    assert torch.equal(w, w0) and torch.equal(prev, prev0)
