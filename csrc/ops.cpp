// The one place every fusedloss op schema is declared. csrc/cpu and csrc/cuda only add
// TORCH_LIBRARY_IMPL blocks; fusedloss/_ops.py adds the fake (meta) kernels, and
// fusedloss/functional.py the autograd formulas.
//
// Shared conventions (all ops):
//   * The kernels never reduce: they return per-row (or per-element) results in the
//     accumulation dtype `acc` (float64 for float64 input, float32 otherwise), so the
//     reductions "none", "mean" and "sum" share one kernel and nothing syncs.
//   * `grad`, when given, receives d(per-row loss)/d(input), unscaled by grad_output, in
//     the input's dtype. It may alias the input (inplace_backward). None: no gradient pass.
//   * Inputs come with arbitrary strides (0 strides allowed for broadcast operands).
#include <Python.h>
#include <torch/library.h>

// `import fusedloss._C` runs the static registrations below; the module itself is empty.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden (and adds extern "C").
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fusedloss, m) {
  // Cross-entropy, one row = one sample's C logits.
  //   logits (N, C, D)          float16/bfloat16/float32/float64, any strides
  //   target (N, D) int64       class indices (ignore_index, or out of range -> see below)
  //       or (N, C, D)          class probabilities, logits' dtype, any strides
  //   weight (C,) acc, contiguous, or None
  //   mask   (N, C, D) bool, any strides (broadcast: 0 strides), True = class allowed
  //   grad   (N, C, D) logits' dtype, any strides, or None
  // returns loss (N, D) acc: the row's loss (weighted, smoothed, + z-loss), 0 for
  //   ignored and empty rows; count (N, D) acc: the row's share of the "mean"
  //   denominator (weight[target] or 1 for counted rows, 0 for ignored/empty rows;
  //   1 for non-empty rows with probability targets).
  // Out-of-range class targets: CPU raises IndexError; GPU kernels never read out of
  // bounds and give that row loss NaN and gradient 0.
  m.def(
      "ce_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? mask, Tensor(a!)? grad, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor)");
  // Softmax focal loss: row loss alpha_t * (1 - p_t)^gamma * -log(p_t).
  //   logits, mask, grad as ce_fwd; target (N, D) int64; alpha (C,) acc or None (= 1).
  // returns loss (N, D) acc and count (N, D) acc (1 for counted rows, 0 otherwise).
  m.def(
      "focal_fwd(Tensor logits, Tensor target, Tensor? alpha, Tensor? mask, Tensor(a!)? grad, "
      "int ignore_index, float gamma) -> (Tensor, Tensor)");
  // BCE-with-logits (gamma == 0 and alpha < 0) and torchvision's sigmoid focal loss,
  // elementwise over a 2-D view (M, L) of the input.
  //   input (M, L) any strides; target (M, L) input's dtype, any strides;
  //   weight, pos_weight (M, L) acc, any strides (broadcast: 0 strides), or None;
  //   grad (M, L) input's dtype or None.
  // returns loss (M, L) acc when reduce is false, else (M,) acc: the sum of each row.
  // A contiguous, uninitialized tensor like `like` for a kernel's gradient output. On the
  // CPU it comes from a small cache of freed blocks (csrc/cpu/grad_pool.cpp); elsewhere it
  // is empty_like.
  m.def("empty_grad(Tensor like) -> Tensor");
  m.def(
      "binary_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, Tensor(a!)? grad, "
      "float gamma, float alpha, bool reduce) -> Tensor");
}
