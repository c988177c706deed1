// The schemas of fastvat's compiled ops (l2_normalize, perturb_, kl_div_with_logits, embedding_gather_add).
// linear_kl_div is not here: it is a Python custom op (torch.library.custom_op in fastvat/ops/linear_kl.py)
// composed of PyTorch matmuls and the ops above, with no kernel of its own.
// Kernels live in csrc/cpu/*.cpp and csrc/cuda/*.cu and register themselves
// with TORCH_LIBRARY_IMPL; fake (meta) kernels and autograd live in fastvat/ops/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastvat, m) {
  // scale * v / ||v|| with v = (x - baseline) * mask, one norm per group.
  // norm: "global" (one group), "sample" (per index of dim 0), "token" (per last-dim vector).
  // mask: float tensor whose shape is a prefix of x's shape (already broadcast by the wrapper).
  m.def(
      "l2_normalize(Tensor x, Tensor? baseline, Tensor? mask, float scale, str norm) -> Tensor");

  // delta holds the previous perturbation on entry (when has_previous) and the new one on exit:
  //   new = scale * direction / ||direction||   (global norm)
  //   weight += new - previous
  m.def(
      "perturb_(Tensor(a!) weight, Tensor direction, Tensor(b!) delta, float scale, bool has_previous) -> ()");

  // Row-wise KL(softmax(p) || softmax(q)) over the last dim of [N, C] logits, p constant.
  // Returns (per-row loss in the accumulation dtype, d loss_row / d q_logits in q's dtype).
  // grad is an empty tensor when compute_grad is false. mask: optional float [N].
  m.def(
      "kl_div_with_logits(Tensor p_logits, Tensor q_logits, Tensor? mask, bool compute_grad) -> (Tensor, Tensor)");
#ifdef FASTVAT_BENCH_OPS
  // For benchmarks and tests only, built with FASTVAT_BENCH_OPS=1 (CUDA kernel only, no fake kernel
  // or autograd): kl_div_with_logits with the kernel named by variant ("auto", as
  // kl_div_with_logits, "cached", "stream" or "stream512"; see KlVariant in csrc/cuda/kl_div.cu).
  // Same results up to the order of the float sums.
  m.def(
      "_kl_div_with_logits_variant(Tensor p_logits, Tensor q_logits, Tensor? mask, bool compute_grad, str variant) -> (Tensor, Tensor)");
#endif

  // out[n] = weight[ids[n]] + delta[delta_index[n]]  (out-of-place embedding-weight perturbation).
  // padding_idx (-1 for none) only matters to the backward, as in F.embedding.
  m.def(
      "embedding_gather_add(Tensor weight, Tensor ids, Tensor delta, Tensor delta_index, int padding_idx) -> Tensor");
  // Gradients of embedding_gather_add: a dense [num_weight_rows, H] weight gradient (as
  // F.embedding gives, zero for padding_idx when it is >= 0) and the per-row segment sum for delta.
  m.def(
      "embedding_gather_add_backward(Tensor grad, Tensor ids, Tensor delta_index, SymInt num_weight_rows, SymInt num_delta_rows, int padding_idx, bool need_weight_grad, bool need_delta_grad) -> (Tensor, Tensor)");
}

// The compiled module only has to exist so that `import fastvat._C` runs the static
// registrations above; it exposes no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastvat compiled kernels (ops are in torch.ops.fastvat)", -1, nullptr};
  return PyModule_Create(&module_def);
}
