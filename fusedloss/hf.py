"""Hugging Face transformers integration (SPEC section 9).

    import fusedloss.hf
    model = fusedloss.hf.apply(AutoModelForCausalLM.from_config(cfg))  # training forwards with
    out = model(input_ids, labels=labels)                              # labels: no logits
    out.loss.backward()                                                # (out.logits is None)

    model.loss_function = fusedloss.hf.ForCausalLMLoss   # or only the loss, on the logits

`ForCausalLMLoss` is a drop-in for transformers' `ForCausalLMLoss` (transformers/loss/
loss_utils.py): the same shift, `ignore_index`, `shift_labels`, and `num_items_in_batch`
(a sum divided by it, for gradient accumulation), without upcasting the logits to float32.
`apply(model)` patches one `*ForCausalLM` instance (anything with `.model`, the decoder,
and `.lm_head`, a linear layer) so that a training forward with labels computes the loss
with `fusedloss.linear_cross_entropy` from the decoder's last hidden states and never
makes the logits. transformers is imported only by `apply`.

The loss is float32 for float16 / bfloat16 models, as transformers' (whose upcast makes it
float32): the kernels accumulate in float32 anyway, and a float32 loss keeps
grad_output / num_items_in_batch exact. float32 and float64 models get a loss in their
dtype (transformers' `.float()` would round a float64 model's loss to float32).
"""
import dataclasses
import inspect
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedloss import _backend, _ops
from fusedloss.functional import _input_grad
from fusedloss.linear import _linear_cross_entropy

__all__ = ["ForCausalLMLoss", "apply"]


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """transformers' loss dtype for a model in `dtype`, no coarser than float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _shifted(labels: Optional[Tensor], shift_labels: Optional[Tensor], ignore_index: int) -> Tensor:
    """Targets of every position as transformers makes them: labels shifted left by one, the
    last position ignored; or shift_labels as given (already shifted, e.g. sequence parallel)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels


def _divide(loss: Tensor, num_items_in_batch) -> Tensor:
    """transformers' fixed_cross_entropy: sum / num_items_in_batch (an int or a tensor)."""
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


# ----------------------------------------------------------------------------- loss on logits
class _CrossEntropyAsFn(torch.autograd.Function):
    """Cross-entropy of (N, V) logits with the loss in a chosen dtype (float32 for half
    logits): fusedloss's forward and backward ops (csrc/ops.cpp) as in cross_entropy, only
    the out_dtype differs. Backward writes the gradient once, in the logits' dtype."""

    @staticmethod
    def forward(ctx, x, target, ignore_index, reduction, out_dtype, backend):
        # x (N, V, 1); target (N, 1) int64
        out, denom, stats = _backend.IMPLS[backend].ce_fwd(x, target, None, None, ignore_index, 0.0, 0.0, 0.0,
                                                          reduction, out_dtype)
        ctx.save_for_backward(x, target, stats, denom)
        ctx.reduction, ctx.backend = reduction, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, target, stats, denom = ctx.saved_tensors
        grad = _ops.empty_grad(x)
        _backend.IMPLS[ctx.backend].softmax_bwd(grad_out, x, target, None, None, stats, denom, 0.0, ctx.reduction, grad)
        return (_input_grad(grad),) + (None,) * 5


def ForCausalLMLoss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    **kwargs,
) -> Tensor:
    """Drop-in for transformers' ForCausalLMLoss (`model.loss_function`): logits (B, T, V)
    in any float dtype, never upcast; labels (B, T) (position t predicts labels[t + 1]) or
    shift_labels (B, T) already shifted. "mean" over the non-ignored targets, or the sum
    divided by num_items_in_batch when given. Other kwargs are accepted and ignored, as
    transformers does. Extra keyword: backend (default "auto")."""
    backend = _backend.resolve(kwargs.get("backend", "auto"), logits.device).name
    target = _shifted(labels, shift_labels, ignore_index).reshape(-1).to(logits.device)
    x = logits.reshape(-1, vocab_size)
    if target.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels ({target.shape[0]} positions after the shift) and logits ({x.shape[0]} positions of "
            f"vocab_size {vocab_size}) differ; logits {tuple(logits.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64/int32 class indices, got {target.dtype}")
    reduction = 2 if num_items_in_batch is not None else 1  # "sum" / "mean"
    loss = _CrossEntropyAsFn.apply(x.unsqueeze(-1), target.to(torch.int64).unsqueeze(-1), int(ignore_index),
                                   reduction, _loss_dtype(logits.dtype), backend)
    return loss if num_items_in_batch is None else _divide(loss, num_items_in_batch)


# ----------------------------------------------------------------------------- the patched model
def _linear_loss(hidden, head, labels, *, softcap, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                 backend="auto"):
    """ForCausalLMLoss of head(hidden) (+ the softcap Gemma 2/3 put on the logits), computed by
    linear_cross_entropy without the logits."""
    target = _shifted(labels, shift_labels, ignore_index).reshape(-1).to(hidden.device)
    x = hidden.reshape(-1, hidden.shape[-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = _linear_cross_entropy(x, head.weight, target, getattr(head, "bias", None), None, reduction, ignore_index,
                                 0.0, None, None, 0.0, softcap, backend, _loss_dtype(hidden.dtype))
    return loss if num_items_in_batch is None else _divide(loss, num_items_in_batch)


def _slice_kept(hidden: Tensor, logits_to_keep) -> Tensor:
    """transformers' slice_logits_to_keep: an int keeps the last n positions (0: all); a 1-D
    tensor, those positions; a 2-D integer tensor, per-sample positions; a 2-D bool tensor,
    the True positions (flattened)."""
    if isinstance(logits_to_keep, Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


_HEAD_ARGS = ("labels", "logits_to_keep")
# config attributes whose models do more to the logits (or the loss) than lm_head + an
# optional final softcap; apply() refuses them rather than change their training silently
_UNSUPPORTED_CONFIG = {
    "logit_scale": "Cohere scales the logits",
    "logits_scaling": "Granite divides the logits",
    "output_router_logits": "mixture-of-experts models add a router auxiliary loss",
}


def _is_causal_lm_loss(fn) -> bool:
    if fn is ForCausalLMLoss:
        return True
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss as hf_loss
    except ImportError:  # pragma: no cover
        return False
    return fn is hf_loss


def apply(model, *, backend: str = "auto"):
    """Patches one *ForCausalLM instance (Llama, Qwen2/3, Mistral, Gemma 2/3, any model with
    `.model` + `.lm_head`) in place and returns it.

    A forward in training mode (model.train()) with `labels` runs the decoder, keeps the
    positions `logits_to_keep` selects, and computes transformers' ForCausalLMLoss with
    linear_cross_entropy from the last hidden states and lm_head's weight: the returned
    output has `loss` and `logits=None`. `num_items_in_batch`, `ignore_index`, `shift_labels`
    and `config.final_logit_softcapping` are honoured. Every other forward (eval, no labels,
    generation) is the original one, unchanged; so is a model whose loss_function is not
    ForCausalLMLoss. The patched forward keeps the original's signature (transformers'
    Trainer reads it) and is a method of the instance, so copy.deepcopy(model) patches the
    copy. Patching twice is a no-op.
    """
    if getattr(model, "_fusedloss_original_forward", None) is not None:
        return model
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if not isinstance(decoder, torch.nn.Module) or not isinstance(getattr(head, "weight", None), Tensor):
        raise TypeError(
            f"fusedloss.hf.apply expects a *ForCausalLM model with .model (the decoder) and .lm_head (a linear "
            f"layer); got {type(model).__name__}"
        )
    if getattr(head.weight, "ndim", 0) != 2:
        raise TypeError(f"lm_head.weight must be 2-D (vocab, hidden), got shape {tuple(head.weight.shape)}")
    config = getattr(model, "config", None)
    for attr, why in _UNSUPPORTED_CONFIG.items():
        value = getattr(config, attr, None)
        if value not in (None, False, 1, 1.0):
            raise NotImplementedError(
                f"fusedloss.hf.apply: {type(model).__name__} has config.{attr}={value!r} ({why}); not supported"
            )
    original = model.forward
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        return _fused_forward(self, *args, **kwargs)

    # a bound method's signature drops its first parameter: give `self` one to drop
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_param, *signature.parameters.values()])
    forward.__doc__, forward.__name__, forward.__qualname__ = original.__doc__, "forward", "forward"
    model._fusedloss_original_forward = original
    model._fusedloss_backend = backend
    model.forward = types.MethodType(forward, model)
    return model


def _fused_forward(self, *args, **kwargs):
    """The patched forward of apply(): the original one unless training with labels and
    transformers' causal-LM loss; then decoder -> last hidden states -> linear_cross_entropy."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = self._fusedloss_original_forward
    signature = inspect.signature(original)
    bound = signature.bind(*args, **kwargs)  # a bad call raises as the original would
    named = dict(bound.arguments)
    var_kw = next((n for n, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD), None)
    extra = dict(named.pop(var_kw, {})) if var_kw else {}
    labels = named.get("labels")
    if not (self.training and labels is not None and _is_causal_lm_loss(self.loss_function)):
        return original(*args, **kwargs)
    logits_to_keep = named.get("logits_to_keep", 0)
    return_dict = extra.pop("return_dict", named.pop("return_dict", None))
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    # the decoder gets what the original forward passes it: every argument but the head's,
    # the loss kwargs included (transformers passes **kwargs to both)
    decoder_params = inspect.signature(self.model.forward).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in decoder_params.values())
    inputs = {k: v for k, v in named.items() if k not in _HEAD_ARGS and (takes_any or k in decoder_params)}
    outputs = self.model(**inputs, **extra)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    hidden = _slice_kept(hidden, logits_to_keep)
    loss = _linear_loss(
        hidden, self.lm_head, labels, softcap=getattr(self.config, "final_logit_softcapping", None),
        num_items_in_batch=extra.get("num_items_in_batch"), ignore_index=extra.get("ignore_index", -100),
        shift_labels=extra.get("shift_labels"), backend=self._fusedloss_backend,
    )
    fields = [f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits")]
    out = CausalLMOutputWithPast(loss=loss, logits=None, **{f: getattr(outputs, f, None) for f in fields})
    return out if return_dict else out.to_tuple()
