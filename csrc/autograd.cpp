// fusedloss::softmax_loss (schema: csrc/ops.cpp): cross-entropy and softmax focal loss with
// forward and backward in C++, for the C++ backends (CPU and CUDA alike: every tensor op goes
// through the dispatcher, which picks the device's kernel).
//
// Why: at small shapes a training step is host overhead. A Python torch.autograd.Function
// costs ~13 us in apply and ~40 us in the engine's trip back into Python for backward,
// several times the ops themselves (8 x 10: ce_fwd ~3 us, softmax_bwd ~3 us). Here the
// autograd node is a C++ CppNode, as PyTorch's own losses are: called from C++, a step
// (forward + backward) costs what at::cross_entropy_loss's does (~23 us at 8 x 10).
//
// Same semantics as fusedloss/functional.py's _SoftmaxLossFn (which keeps the soft-target
// gradients, the triton and torch backends and the fallback chain):
//   * everything backward needs is in save_for_backward (saved-tensor hooks see it); ctx
//     keeps only scalars, so nothing of size N x C outlives backward;
//   * the gradient is a fresh buffer in the logits' layout (large CPU ones from the cache of
//     csrc/cpu/grad_pool.cpp, as fusedloss._ops.empty_grad), or the logits' storage with
//     inplace_backward, which then serves one backward per forward;
//   * differentiating the returned gradient (create_graph=True, then backward) raises.
//
// Registrations: Autograd (the differentiable op) and CompositeExplicitAutograd (the
// forward alone, for calls below autograd: torch.inference_mode, meta tensors); the fake
// kernel is fusedloss/_ops.py's. torch.compile traces through the Autograd kernel (ce_fwd /
// focal_fwd in the forward graph, softmax_bwd in the backward graph), with symbolic sizes.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fusedloss {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;
using FwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

constexpr int64_t kCrossEntropy = 0;
constexpr int64_t kFocal = 1;

constexpr const char* kConsumed =
    "fusedloss: with inplace_backward=True the gradient can be computed once per forward (it "
    "overwrote the logits); run the loss again for a second backward";
constexpr const char* kNoDoubleBackward =
    "fusedloss: double backward (differentiating a gradient) is not implemented for fusedloss losses";

// The ops, looked up once (static registrations: they exist once the library is loaded).
const auto& ce_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss::ce_fwd", "")
          .typed<FwdOutputs(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, double,
                            double, double, int64_t, at::ScalarType)>();
  return op;
}

const auto& focal_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fusedloss::focal_fwd", "")
                             .typed<FwdOutputs(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                               const OptTensor&, int64_t, double, int64_t, at::ScalarType)>();
  return op;
}

const auto& softmax_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusedloss::softmax_bwd", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                      const at::Tensor&, const at::Tensor&, double, int64_t, const at::Tensor&)>();
  return op;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

void check_kind(int64_t kind, double label_smoothing, double z_loss, double softcap) {
  TORCH_CHECK(kind == kCrossEntropy || kind == kFocal,
              "softmax_loss: kind must be 0 (cross-entropy) or 1 (softmax focal), got ", kind);
  TORCH_CHECK(kind == kCrossEntropy || (label_smoothing == 0.0 && z_loss == 0.0 && softcap == 0.0),
              "softmax_loss: focal (kind 1) takes label_smoothing = z_loss = softcap = 0, got ", label_smoothing,
              ", ", z_loss, ", ", softcap);
}

// ---- the user's shapes and the ops' canonical rows (functional.py's _rows3, _index_rows).
// The views are taken here, below autograd, rather than in Python: no view node in the graph
// and no Python view call (together ~10 us of a small step). Views taken below autograd have
// version counters of their own, so what is saved for backward is the caller's tensors
// (whose counters catch an in-place change between forward and backward; a converted target
// is a copy of our own), and backward takes the views again.

// Sizes are SymInts throughout (sym_size, reshape_symint, ...): under torch.compile with
// dynamic shapes this code runs on fake tensors with symbolic sizes, and reading a size as an
// int would specialize the graph to it (a recompile per shape).
struct Rows {
  c10::SymInt N, C, D;
};

// logits (C,) -> (1, C, 1); (N, C) -> (N, C, 1); (N, C, d1..dK) -> (N, C, d1 * .. * dK).
Rows rows_of(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 1, "softmax_loss: logits must be (C,), (N, C) or (N, C, d1..dK), got shape ",
              logits.sym_sizes());
  if (logits.dim() == 1) return {1, logits.sym_size(0), 1};
  c10::SymInt D = 1;
  for (int64_t i = 2; i < logits.dim(); ++i) D = D * logits.sym_size(i);
  return {logits.sym_size(0), logits.sym_size(1), D};
}

// The target in the dtype the ops read, in its own shape: class indices as int64,
// probabilities in the logits' dtype (a converted copy, which backward saves, or the target).
at::Tensor target_as_read(const at::Tensor& target, const at::Tensor& logits) {
  if (at::isFloatingType(target.scalar_type())) {
    TORCH_CHECK(target.sym_sizes() == logits.sym_sizes(),
                "softmax_loss: probability target must have the logits' shape ", logits.sym_sizes(), ", got ",
                target.sym_sizes());
    return target.scalar_type() == logits.scalar_type() ? target : target.to(logits.scalar_type());
  }
  const bool one_row = logits.dim() == 1;
  bool ok = target.dim() == (one_row ? 0 : logits.dim() - 1);
  if (ok && !one_row) {
    ok = target.sym_size(0) == logits.sym_size(0);
    for (int64_t i = 2; ok && i < logits.dim(); ++i) ok = target.sym_size(i - 1) == logits.sym_size(i);
  }
  TORCH_CHECK(ok, "softmax_loss: class target must have the logits' shape without dim 1 (", logits.sym_sizes(),
              " logits), got ", target.sym_sizes());
  return target.scalar_type() == at::kInt ? target.to(at::kLong) : target;
}

// The loss's shape for reduction "none": the target's (class indices), the logits' without
// dim 1 (probabilities).
std::vector<c10::SymInt> loss_shape(const at::Tensor& logits, const at::Tensor& target) {
  if (!at::isFloatingType(target.scalar_type())) return target.sym_sizes().vec();
  std::vector<c10::SymInt> shape;
  if (logits.dim() >= 2) {
    shape.push_back(logits.sym_size(0));
    for (int64_t i = 2; i < logits.dim(); ++i) shape.push_back(logits.sym_size(i));
  }
  return shape;
}

// The canonical views (copies only where the dims d1..dK don't merge), below autograd.
struct Canonical {
  at::Tensor x, target;
  OptTensor mask;
};

Canonical canonical(const Rows& r, const at::Tensor& logits, const at::Tensor& target, const OptTensor& mask) {
  Canonical c;
  c.x = logits.reshape_symint({r.N, r.C, r.D});
  c.target = at::isFloatingType(target.scalar_type()) ? target.reshape_symint({r.N, r.C, r.D})
                                                       : target.reshape_symint({r.N, r.D});
  if (mask.has_value() && mask->defined()) {
    c.mask = mask->expand_symint(logits.sym_sizes()).reshape_symint({r.N, r.C, r.D});
  }
  return c;
}

// The forward op of `kind` on the canonical views; `out` in the loss's shape.
FwdOutputs run_forward(const at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                       const OptTensor& mask, int64_t kind, int64_t ignore_index, double label_smoothing,
                       double z_loss, double softcap, double gamma, int64_t reduction, at::ScalarType out_dtype) {
  const Rows r = rows_of(logits);
  const Canonical c = canonical(r, logits, target, mask);
  FwdOutputs outs =
      kind == kCrossEntropy
          ? ce_fwd_op().call(c.x, c.target, weight, c.mask, ignore_index, label_smoothing, z_loss, softcap, reduction,
                             out_dtype)
          : focal_fwd_op().call(c.x, c.target, weight, c.mask, ignore_index, gamma, reduction, out_dtype);
  if (reduction == 0) std::get<0>(outs) = std::get<0>(outs).view_symint(loss_shape(logits, target));  // (N, D)
  return outs;
}

// A gradient buffer like fusedloss._ops.empty_grad, in `like`'s layout (its strides when it is
// non-overlapping and dense, else contiguous): CPU buffers of 1 MB or more from the
// extension's cache of freed blocks (fusedloss::empty_grad, csrc/cpu/grad_pool.cpp), except
// for traced tensors (torch.compile: functional / fake), which get empty_strided as there.
at::Tensor empty_grad(const at::Tensor& like) {
  constexpr int64_t kPooledBytes = int64_t(1) << 20;  // grad_pool.cpp kMinPooled
  if (!like.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize})) &&
      like.device().is_cpu() && like.numel() * static_cast<int64_t>(like.element_size()) >= kPooledBytes) {
    static const auto handle = c10::Dispatcher::singleton().findOp({"fusedloss::empty_grad", ""});
    if (handle.has_value() && handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      static const auto op = handle->typed<at::Tensor(const at::Tensor&)>();
      return op.call(like);
    }
  }
  if (like.is_non_overlapping_and_dense()) return at::empty_strided_symint(like.sym_sizes(), like.sym_strides(), like.options());
  return at::empty_symint(like.sym_sizes(), like.options());
}

}  // namespace

// The two autograd Functions, outside the anonymous namespace: their nodes are named after
// them (grad_fn.name(): "torch::autograd::CppNode<fusedloss::SoftmaxLossBackward>").

// Identity on the gradient that backward returns under create_graph=True, whose own backward
// raises: the fused kernels give no second derivative. Unlike a once-differentiable node this
// also fires when grad_output itself does not require grad (a gradient penalty), instead of
// silently returning a gradient with no graph. (functional.py's _NoDoubleBackward.)
struct NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& g) { return g.view_as(g); }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false, kNoDoubleBackward);
    return {};
  }
};

// The loss (functional.py's _SoftmaxLossFn, without the soft-target gradients).
struct SoftmaxLossBackward : public torch::autograd::Function<SoftmaxLossBackward> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                            const OptTensor& weight, const OptTensor& mask, int64_t kind, int64_t ignore_index,
                            double label_smoothing, double z_loss, double softcap, double gamma, int64_t reduction,
                            at::ScalarType out_dtype, bool inplace_backward) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor t = target_as_read(target, logits);
    auto [out, denom, stats] = run_forward(logits, t, weight, mask, kind, ignore_index, label_smoothing, z_loss,
                                           softcap, gamma, reduction, out_dtype);
    // backward reads the class weight only for the smoothing term (class-index targets) or
    // the target term (probability targets); otherwise it is already in the row's stats.
    // Focal: alpha is in the stats.
    const bool bwd_weight = kind == kCrossEntropy && weight.has_value() &&
                            (label_smoothing > 0.0 || at::isFloatingType(t.scalar_type()));
    ctx->save_for_backward(
        {logits, t, bwd_weight ? *weight : at::Tensor(), mask.value_or(at::Tensor()), stats, denom});
    ctx->saved_data["softcap"] = kind == kCrossEntropy ? softcap : 0.0;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["inplace"] = inplace_backward;
    ctx->saved_data["used"] = false;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool inplace = ctx->saved_data["inplace"].toBool();
    // before unpacking: the logits' values have been overwritten
    TORCH_CHECK(!(inplace && ctx->saved_data["used"].toBool()), kConsumed);
    variable_list grads(13);  // one per forward argument; the target and the weight get none
    if (!ctx->needs_input_grad(0)) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    ctx->saved_data["used"] = true;
    const Rows r = rows_of(logits);
    at::Tensor grad;   // as returned: the logits' shape
    at::Tensor grad3;  // the (N, C, D) view of it the kernel writes
    Canonical c;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      c = canonical(r, logits, saved[1], opt(saved[3]));
      if (inplace) {
        // the logits' storage; where the dims d1..dK don't merge, a fresh copy of the logits
        // (_SoftmaxLossFn writes into its forward's copy: the same values)
        grad3 = c.x;
        if (!c.x.is_alias_of(logits)) grad = c.x.view_symint(logits.sym_sizes());
      } else {
        // in the layout of the (N, C, D) view the kernel reads: a view of the logits where
        // d1..dK merge (channels_last: (N, C, H*W) with strides (HWC, 1, C), whose rows are
        // contiguous), so the gradient has the logits' strides and AccumulateGrad keeps it
        // as .grad without a copy; a contiguous buffer where the view was a copy
        grad3 = empty_grad(c.x);
        grad = grad3.view_symint(logits.sym_sizes());
      }
      const at::Tensor& go = grad_outputs[0];
      softmax_bwd_op().call(reduction == 0 ? go.reshape_symint({r.N, r.D}) : go, c.x, c.target, opt(saved[2]), c.mask,
                            saved[4], saved[5], ctx->saved_data["softcap"].toDouble(), reduction, grad3);
    }
    if (!grad.defined()) grad = logits.detach();  // inplace: shares the logits' version counter, as in Python
    if (c10::GradMode::is_enabled()) {  // create_graph=True: mark it, so differentiating it raises
      grad = NoDoubleBackward::apply(grad.detach().requires_grad_());
    }
    grads[0] = std::move(grad);
    return grads;
  }
};

namespace {

void check_no_grad_wanted(const at::Tensor& target, const OptTensor& weight) {
  TORCH_CHECK(!c10::GradMode::is_enabled() ||
                  !(target.requires_grad() || (weight.has_value() && weight->defined() && weight->requires_grad())),
              "softmax_loss: gives no gradient to the target or the weight, and one of them requires grad; "
              "detach it, or use fusedloss.cross_entropy, which computes those gradients");
}

// Autograd key: the differentiable op.
at::Tensor softmax_loss_autograd(const at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                                 const OptTensor& mask, int64_t kind, int64_t ignore_index, double label_smoothing,
                                 double z_loss, double softcap, double gamma, int64_t reduction,
                                 at::ScalarType out_dtype, bool inplace_backward) {
  check_kind(kind, label_smoothing, z_loss, softcap);
  check_no_grad_wanted(target, weight);
  return SoftmaxLossBackward::apply(logits, target, weight, mask, kind, ignore_index, label_smoothing, z_loss,
                                    softcap, gamma, reduction, out_dtype, inplace_backward);
}

// Below autograd (inference_mode, meta tensors, ...): the forward op's loss.
at::Tensor softmax_loss_forward(const at::Tensor& logits, const at::Tensor& target, const OptTensor& weight,
                                const OptTensor& mask, int64_t kind, int64_t ignore_index, double label_smoothing,
                                double z_loss, double softcap, double gamma, int64_t reduction,
                                at::ScalarType out_dtype, bool /*inplace_backward*/) {
  check_kind(kind, label_smoothing, z_loss, softcap);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return std::get<0>(run_forward(logits, target_as_read(target, logits), weight, mask, kind, ignore_index,
                                 label_smoothing, z_loss, softcap, gamma, reduction, out_dtype));
}

}  // namespace
}  // namespace fusedloss

TORCH_LIBRARY_IMPL(fusedloss, Autograd, m) { m.impl("softmax_loss", &fusedloss::softmax_loss_autograd); }

TORCH_LIBRARY_IMPL(fusedloss, CompositeExplicitAutograd, m) {
  m.impl("softmax_loss", &fusedloss::softmax_loss_forward);
}
