"""Across the ops: argument errors that name the argument (in the wrappers and in the kernels called
directly), the ATen fallback of the CPU kernels, and the built extension being the one in use."""
import glob
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastvat
from fastvat import ops

from op_helpers import COMPILED, gather_inputs, needs_ops, randn

# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument
# ---------------------------------------------------------------------------------------------
@needs_ops
def test_bad_inputs_reach_kernel_checks():
    """Called directly, the kernels name the argument too."""
    x = randn(2, 3)
    with pytest.raises(RuntimeError, match="norm"):
        torch.ops.fastvat.l2_normalize(x, None, None, 1.0, "rows")
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastvat.l2_normalize(x, None, torch.ones(3), 1.0, "global")
    with pytest.raises(RuntimeError, match="baseline"):
        torch.ops.fastvat.l2_normalize(x, randn(3, 2), None, 1.0, "global")
    with pytest.raises(RuntimeError, match="q_logits"):
        torch.ops.fastvat.kl_div_with_logits(randn(2, 3, 4), randn(2, 3, 4), None, False)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastvat.kl_div_with_logits(x, x, torch.ones(3), False)
    with pytest.raises(RuntimeError, match="delta"):
        torch.ops.fastvat.perturb_(x, x.clone(), torch.zeros(2, 3, dtype=torch.float64), 1.0, False)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastvat.embedding_gather_add(randn(5), torch.zeros(2, dtype=torch.long), randn(1, 5),
                                               torch.zeros(2, dtype=torch.long), -1)


def test_bad_inputs_kl_and_embedding():
    p, q = randn(3, 5), randn(3, 5, seed=1)
    with pytest.raises(ValueError, match="reduction"):
        ops.kl_div_with_logits(p, q, reduction="avg")
    with pytest.raises(ValueError, match="q_logits"):
        ops.kl_div_with_logits(p, randn(3, 6))
    with pytest.raises(TypeError, match="p_logits"):
        ops.kl_div_with_logits(torch.ones(3, 5, dtype=torch.long), q)
    with pytest.raises(ValueError, match="mask"):
        ops.kl_div_with_logits(p, q, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        ops.kl_div_with_logits(p, q, mask=torch.ones(3, 5, dtype=torch.bool))
    weight, ids, delta, di = gather_inputs(torch.float32, "cpu")
    with pytest.raises(TypeError, match="weight"):
        ops.embedding_gather_add(weight.long(), ids, delta, di)
    with pytest.raises(TypeError, match="ids"):
        ops.embedding_gather_add(weight, ids.float(), delta, di)
    with pytest.raises(TypeError, match="delta"):
        ops.embedding_gather_add(weight, ids, delta.double(), di)
    with pytest.raises(ValueError, match="delta_index"):
        ops.embedding_gather_add(weight, ids, delta, di[:, :2])
    with pytest.raises(ValueError, match="delta"):
        ops.embedding_gather_add(weight, ids, randn(4, 12), di)
    bad = ids.clone()
    bad[0, 0] = 11
    with pytest.raises((ValueError, IndexError), match="ids"):
        ops.embedding_gather_add(weight, bad, delta, di)
    bad = di.clone()
    bad[0, 0] = 4
    with pytest.raises((ValueError, IndexError), match="delta_index"):
        ops.embedding_gather_add(weight, ids, delta, bad)


# ---------------------------------------------------------------------------------------------
# the ATen fallback used on CPUs without the kernels' ISA (forced with FASTVAT_CPU_SIMD=0)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded")
def test_cpu_fallback_path_matches_reference():
    code = textwrap.dedent(
        """
        import torch
        from fastvat import ops, reference as ref
        torch.manual_seed(0)
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            x, b = torch.randn(3, 4, 33).to(dt), torch.randn(3, 4, 33).to(dt)
            m = torch.rand(3, 4) > 0.3
            for norm in ("global", "sample", "token"):
                out = ops.l2_normalize(x, scale=2.0, norm=norm, mask=m, baseline=b)
                exp = ref.l2_normalize(x, scale=2.0, norm=norm, mask=m.to(dt), baseline=b)
                torch.testing.assert_close(out, exp, rtol=2e-2 if dt == torch.bfloat16 else 1e-5, atol=1e-6)
            w, d, prev = torch.randn(9, 7).to(dt), torch.randn(9, 7).to(dt), torch.randn(9, 7).to(dt)
            w2, prev2 = w.clone(), prev.clone()
            ops.perturb_(w, d, scale=1.5, previous=prev)
            ref.perturb_(w2, d, 1.5, previous=prev2)
            torch.testing.assert_close(w, w2, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(prev, prev2, rtol=2e-2, atol=1e-3)
            p, q = torch.randn(5, 40).to(dt), torch.randn(5, 40).to(dt).requires_grad_()
            mk = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
            l = ops.kl_div_with_logits(p, q, mask=mk, reduction="sum")
            (g,) = torch.autograd.grad(l, q)
            q2 = q.detach().clone().requires_grad_()
            l2 = ref.kl_div_with_logits(p, q2, mask=mk, reduction="sum")
            (g2,) = torch.autograd.grad(l2, q2)
            torch.testing.assert_close(l, l2, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(g, g2, rtol=2e-2, atol=1e-4)
            # no distribution (all -inf) -> NaN; a masked garbage row -> 0, as the SIMD kernel does
            p = torch.randn(3, 40).to(dt)
            p[0], p[2] = float("-inf"), float("nan")
            rows = ops.kl_div_with_logits(p, torch.randn(3, 40).to(dt), mask=torch.tensor([1, 1, 0]), reduction="none")
            assert torch.isnan(rows[0]) and rows[2] == 0 and torch.isfinite(rows[1]), rows
        print("fallback ok")
        """
    )
    env = dict(os.environ, FASTVAT_CPU_SIMD="0", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# the compiled extension
# ---------------------------------------------------------------------------------------------
def test_built_extension_is_the_one_in_use():
    """A built fastvat/_C*.so must load and register the ops (no silent fallback to the reference)."""
    built = glob.glob(os.path.join(os.path.dirname(fastvat.__file__), "_C*.so"))
    if not built:
        pytest.skip("no compiled module in the package folder")
    if os.environ.get("FASTVAT_BACKEND") == "reference":
        pytest.skip("FASTVAT_BACKEND=reference forces the reference")
    info = fastvat.extension_info()
    assert info["backend"] == "compiled", info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastvat::kl_div_with_logits", "CPU")
