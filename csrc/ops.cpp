// The one place every fusedloss op schema is declared. csrc/cpu and csrc/cuda only add
// TORCH_LIBRARY_IMPL blocks; fusedloss/_ops.py adds the fake (meta) kernels, fusedloss/triton
// the same ops as Triton custom ops (`<name>_triton`), fusedloss/reference.py the pure-PyTorch
// reference, and fusedloss/functional.py the autograd formulas.
//
// The training step (SPEC section 3). A forward op reads the logits once and returns the
// reduced loss plus what backward needs; a backward op reads the logits once more and writes
// the gradient once, scaled by grad_output (and the "mean" denominator) read from device
// memory: 2 reads + 1 write of N x C per step, for every grad_output, no host sync. The
// reduction is folded into the forward op (deterministic: a fixed summation order).
//
// Shared conventions:
//   * `acc` is the accumulation dtype: float64 for float64 input, float32 otherwise.
//   * `reduction` is at::Reduction: 0 = "none", 1 = "mean", 2 = "sum".
//   * `out_dtype` is the dtype of the returned loss (the input's, or PyTorch's promotion).
//   * Inputs come with arbitrary strides (0 strides allowed for broadcast operands).
//   * `grad` is written, never read; it may alias the logits (inplace_backward): the
//     kernels read each logit before writing its gradient.
#include <Python.h>
#include <torch/library.h>

// `import fusedloss._C` runs the static registrations below; the module itself is empty.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden (and adds extern "C").
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(fusedloss, m) {
  // ---- softmax losses: one row = one sample's C logits
  //   logits (N, C, D)          float16/bfloat16/float32/float64, any strides
  //   target (N, D) int64       class indices (ignore_index, or out of range -> see below)
  //       or (N, C, D)          class probabilities (ce_fwd only), logits' dtype, any strides
  //   weight (C,) acc contiguous, or None (cross-entropy class weight; focal: alpha)
  //   mask   (N, C, D) bool, any strides (broadcast: 0 strides), True = class allowed
  // Forward returns
  //   out    reduction 0: (N, D) per-row loss; 1, 2: () the mean / sum; in out_dtype
  //   denom  () acc: the "mean" denominator, sum over rows of the row's count (weight[target]
  //          or 1 for counted rows, 0 for ignored / empty / out-of-range rows); written for
  //          every reduction
  //   stats  (N, D, 4) acc contiguous, per row what backward needs (csrc/common/softmax_row.h
  //          RowCoefs): [lse, coef_p, smooth, target_coef]. lse = -inf marks a row whose
  //          gradient is exactly 0 (ignored, empty, out of range): backward reads none of
  //          its logits. Otherwise, with p_c = exp(z_c - lse) (0 for masked c), w_c =
  //          weight[c] or 1, and z = softcap(x):
  //            index targets:       dloss/dz_c = coef_p p_c - smooth w_c [c allowed]
  //                                              - target_coef [c == t]
  //            probability targets: dloss/dz_c = coef_p p_c - w_c (target_coef y_c
  //                                              + smooth [c allowed])
  //          and dloss/dx_c = dloss/dz_c * dz_c/dx_c for allowed c (masked c: dloss/dz_c).
  // Out-of-range class targets: CPU raises IndexError; GPU kernels never read out of
  // bounds and give that row loss NaN and gradient 0.
  m.def(
      "ce_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? mask, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, int reduction, ScalarType out_dtype) "
      "-> (Tensor out, Tensor denom, Tensor stats)");
  // Softmax focal loss: row loss alpha_t * (1 - p_t)^gamma * -log(p_t); count 1 per counted
  // row; stats as ce_fwd with index targets (coef_p = target_coef = G, smooth = 0).
  m.def(
      "focal_fwd(Tensor logits, Tensor target, Tensor? alpha, Tensor? mask, int ignore_index, "
      "float gamma, int reduction, ScalarType out_dtype) -> (Tensor out, Tensor denom, Tensor stats)");
  // Backward of ce_fwd and focal_fwd (focal: weight None, softcap 0). Writes into grad
  // (N, C, D), logits' dtype, the gradient of the reduced loss:
  //   dloss/dx_c (from stats, above) * scale, scale = grad_out[n, d] (reduction 0, grad_out
  //   (N, D) any strides), grad_out (2, grad_out ()), grad_out / denom (1; 0 when denom == 0,
  //   SPEC rule 6). grad_out is read in any float dtype.
  m.def(
      "softmax_bwd(Tensor grad_out, Tensor logits, Tensor target, Tensor? weight, Tensor? mask, "
      "Tensor stats, Tensor denom, float softcap, int reduction, Tensor(a!) grad) -> ()");
  // The whole differentiable loss, forward and backward in C++ (csrc/autograd.cpp: a
  // torch::autograd::Function at the Autograd key, no Python autograd.Function), in the
  // caller's shapes (the canonical views are taken inside, below autograd):
  //   logits (C,), (N, C) or (N, C, d1..dK), any float dtype, any strides
  //   target class indices int64 / int32 of the logits' shape without dim 1 ((), (N,),
  //          (N, d1..dK)), or probabilities of the logits' shape, any float dtype (read in
  //          the logits' dtype)
  //   weight (C,) acc contiguous or None; mask bool, broadcastable to the logits, or None
  //   kind   0: ce_fwd (label_smoothing, z_loss, softcap); 1: focal_fwd (gamma, weight =
  //          alpha; label_smoothing = z_loss = softcap = 0)
  // Returns the forward op's `out`: reduction 0 in the target's shape (probabilities: the
  // logits' without dim 1), else (). Backward allocates the gradient (inplace_backward: writes
  // it into the logits' storage, once per forward) and calls softmax_bwd. Only the logits get
  // a gradient: the target and the weight must not require one (soft targets that do: the
  // ops above, through functional.py's _SoftmaxLossFn). Differentiating the gradient raises.
  m.def(
      "softmax_loss(Tensor logits, Tensor target, Tensor? weight, Tensor? mask, int kind, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap, float gamma, int reduction, ScalarType out_dtype, "
      "bool inplace_backward) -> Tensor");

  // ---- BCE-with-logits (gamma == 0 and alpha < 0) and torchvision's sigmoid focal loss,
  // elementwise over a 2-D view (M, L) of the input.
  //   input (M, L) any strides; target (M, L) any strides, in the input's dtype (the CPU
  //         kernels also read bool and integer targets as they are: no float copy);
  //   weight, pos_weight (M, L) acc, any strides (broadcast: 0 strides), or None.
  // Forward returns out: reduction 0: (M, L) per-element loss; 1: () the mean (NaN for an
  // empty input, as PyTorch); 2: () the sum; in out_dtype. With grad (reduction 1 or 2
  // only), it also writes there the gradient of the reduced loss for grad_output == 1
  // (the training step's usual case: 1 read + 1 write).
  m.def(
      "binary_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, Tensor(a!)? grad, "
      "float gamma, float alpha, int reduction, ScalarType out_dtype) -> Tensor");
  // Backward that recomputes: grad (M, L) input's dtype = dloss/dx * scale, scale =
  // grad_out[m, l] (reduction 0, grad_out (M, L) any strides), grad_out (2), grad_out /
  // (M * L) (1). For reduction 0, and for a second backward through the same graph.
  m.def(
      "binary_bwd(Tensor grad_out, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "float gamma, float alpha, int reduction, Tensor(a!) grad) -> ()");
  // grad *= grad_out (a 0-dim tensor, any float dtype), in place; nothing is read or
  // written when grad_out == 1 (a device-side check): the backward of binary_fwd's grad.
  m.def("scale_grad(Tensor grad_out, Tensor(a!) grad) -> ()");

  // An uninitialized tensor like `like` for a kernel's gradient output, in `like`'s layout:
  // its strides when `like` is non-overlapping and dense (channels_last stays channels_last,
  // so AccumulateGrad keeps it as .grad without a copy), contiguous otherwise. On the CPU
  // large ones come from a small cache of freed blocks (csrc/cpu/grad_pool.cpp); elsewhere
  // it is empty_strided / empty.
  m.def("empty_grad(Tensor like) -> Tensor");
}
