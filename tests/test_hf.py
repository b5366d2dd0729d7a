"""fusedloss.hf (SPEC section 9) on tiny, randomly initialised transformers models.

Llama (untied head), Qwen2 (tied embeddings) and Gemma2 (final_logit_softcapping, with a
head scaled up so that the cap bites), plus Qwen3, Mistral and Gemma3 for the loss and
gradients, built from configs, nothing downloaded. The patched
model's loss and *every* parameter's gradient are compared with the unpatched model's:
in float64 against a float64 reference (the unpatched model's logits and F.cross_entropy:
transformers' own loss would round to float32), within SPEC 5; in float32 against the same
reference, within twice the unpatched float32 model's own error plus SPEC's absolute
tolerance (flash-attention's rule: the model's matmuls round too).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fusedloss  # noqa: E402
import fusedloss.hf  # noqa: E402
from conftest import TOLERANCES, check_close, check_exact  # noqa: E402

VOCAB, HIDDEN, B, T = 160, 64, 3, 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.one_thread)
SOFTCAP = 4.0


def build(kind, dtype=torch.float32):
    """A tiny random model of `kind` in train mode (dropout off in these configs). Gemma 2/3
    get final_logit_softcapping with a head scaled up so that the cap changes the loss."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=False))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    elif kind in ("gemma2", "gemma3"):
        config, cls = ((transformers.Gemma2Config, transformers.Gemma2ForCausalLM) if kind == "gemma2"
                       else (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM))
        model = cls(config(**common, head_dim=16, final_logit_softcapping=SOFTCAP, attn_implementation="eager",
                           tie_word_embeddings=False))
        with torch.no_grad():  # logits of order 10: the softcap of 4 changes the loss
            model.lm_head.weight.mul_(30.0)
    else:
        raise ValueError(kind)
    return model.to(dtype).train()


def batch(seed=1, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[-1, -2:] = -100  # padding
    return ids, labels


def reference_loss(model, ids, labels):
    """The unpatched model's loss, in the model's dtype (transformers' loss_function would
    upcast to float32): logits from the original forward, shifted, F.cross_entropy."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model)
    loss.backward()
    return loss.detach(), grads_of(model)


KINDS = ["llama", "qwen2", "gemma2"]


@pytest.mark.parametrize("kind", KINDS + ["qwen3", "mistral", "gemma3"])
def test_loss_and_every_gradient(kind):
    ids, labels = batch()
    base = build(kind)
    ref_loss, ref_grads = step(copy.deepcopy(base).double(), lambda m: reference_loss(m, ids, labels))
    hf_loss, hf_grads = step(base, lambda m: m(input_ids=ids, labels=labels).loss)  # unpatched, float32

    fused64 = fusedloss.hf.apply(copy.deepcopy(base).double())
    out = fused64(input_ids=ids, labels=labels)
    assert out.logits is None, "the patched training forward made logits"
    loss64, grads64 = step(fused64, lambda m: m(input_ids=ids, labels=labels).loss)
    check_close(loss64, ref_loss, torch.float64, f"{kind} float64 loss")
    assert grads64.keys() == ref_grads.keys(), "not every parameter got a gradient"
    for name, g in grads64.items():
        check_close(g, ref_grads[name], torch.float64, f"{kind} float64 gradient of {name}", grad=True)

    fused32 = fusedloss.hf.apply(copy.deepcopy(base))
    loss32, grads32 = step(fused32, lambda m: m(input_ids=ids, labels=labels).loss)
    assert loss32.dtype == torch.float32
    check_close(loss32, ref_loss, torch.float32, f"{kind} float32 loss")
    check_close(loss32, hf_loss, torch.float32, f"{kind} float32 loss vs the unpatched model's")
    assert grads32.keys() == hf_grads.keys()
    for name, g in grads32.items():
        err = (g.double() - ref_grads[name]).abs().max()
        hf_err = (hf_grads[name].double() - ref_grads[name]).abs().max()
        bound = 2 * hf_err + TOLERANCES[torch.float32][2]
        assert err <= bound, f"{kind} float32 gradient of {name}: error {err:.3e} > {bound:.3e} (unpatched: {hf_err:.3e})"


def test_gemma2_softcap_is_honoured():
    """The cap changes the loss here, and the patched loss is the capped one."""
    ids, labels = batch()
    model = build("gemma2", torch.float64)
    capped = reference_loss(model, ids, labels)
    model.config.final_logit_softcapping = None
    uncapped = reference_loss(model, ids, labels)
    model.config.final_logit_softcapping = SOFTCAP
    assert (capped - uncapped).abs() > 0.1, "the test's cap does not bite"
    fused = fusedloss.hf.apply(model)(input_ids=ids, labels=labels).loss
    check_close(fused, capped, torch.float64, "Gemma2 loss with final_logit_softcapping")


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_gradient_accumulation(kind):
    """Two micro-batches with num_items_in_batch = the full batch's target count give the
    full batch's mean loss and gradients (transformers' Trainer does this), as unpatched.
    Float32 tolerances although the models are float64: their RMSNorms compute in float32,
    whose rounding depends on the batch shape."""
    ids, labels = batch(b=4)
    n_items = (labels[:, 1:] != -100).sum()
    base = build(kind, torch.float64)
    full_loss, full_grads = step(copy.deepcopy(base), lambda m: reference_loss(m, ids, labels))
    accumulated = {}
    for patched in (True, False):
        model = copy.deepcopy(base)
        if patched:
            fusedloss.hf.apply(model)
        model.zero_grad(set_to_none=True)
        total = 0.0
        for rows, items in ((slice(0, 2), n_items), (slice(2, 4), int(n_items))):  # a tensor, then an int
            loss = model(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=items).loss
            loss.backward()
            total = total + loss.detach()
        what = "patched" if patched else "unpatched"
        check_close(total, full_loss, torch.float32, f"{kind} {what} accumulated loss")
        accumulated[patched] = grads_of(model)
        for name, g in accumulated[patched].items():
            check_close(g, full_grads[name], torch.float32, f"{kind} {what} accumulated gradient of {name}", grad=True)
    for name, g in accumulated[True].items():  # same micro-batches: the head's difference only
        check_close(g, accumulated[False][name], torch.float32, f"{kind} accumulated gradient of {name}", grad=True)


def test_shift_labels_logits_to_keep_return_dict():
    """shift_labels (already shifted) and logits_to_keep (the last k positions) as the
    unpatched model reads them; return_dict=False gives a tuple whose first item is the loss."""
    ids, labels = batch()
    base = build("llama", torch.float64)
    fused = fusedloss.hf.apply(copy.deepcopy(base))
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()  # transformers views it
    for kw in (dict(labels=labels, shift_labels=shift), dict(labels=labels[:, -4:], logits_to_keep=4)):
        exp = base(input_ids=ids, **kw).loss
        out = fused(input_ids=ids, **kw)
        assert out.logits is None
        check_close(out.loss, exp, torch.float32, f"loss with {sorted(kw)}")  # transformers' loss is float32
    tup = fused(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], fused(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_and_generation_unchanged(kind):
    ids, labels = batch()
    base = build(kind)
    fused = fusedloss.hf.apply(copy.deepcopy(base))
    for m in (base, fused):
        m.eval()
    with torch.no_grad():
        check_exact(fused(input_ids=ids).logits, base(input_ids=ids).logits, "eval logits")
        a, c = fused(input_ids=ids, labels=labels), base(input_ids=ids, labels=labels)  # eval with labels: original
        check_exact(a.logits, c.logits, "eval logits with labels")
        check_exact(a.loss, c.loss, "eval loss")
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        check_exact(fused.generate(ids[:1], **gen), base.generate(ids[:1], **gen), "greedy generation")
    fused.train()
    base.train()
    out = fused(input_ids=ids)  # training forward without labels: logits, no loss
    assert out.loss is None
    check_exact(out.logits.detach(), base(input_ids=ids).logits.detach(), "train-mode logits without labels")


def test_bfloat16_model():
    """A bfloat16 model: the loss is float32 (as transformers'), within bf16 tolerance of the
    unpatched model's; every parameter gets a bfloat16 gradient close to the unpatched one."""
    ids, labels = batch()
    base = build("qwen2", torch.bfloat16)
    hf_loss, hf_grads = step(copy.deepcopy(base), lambda m: m(input_ids=ids, labels=labels).loss)
    loss, grads = step(fusedloss.hf.apply(copy.deepcopy(base)), lambda m: m(input_ids=ids, labels=labels).loss)
    assert loss.dtype == torch.float32
    check_close(loss, hf_loss, torch.bfloat16, "bf16 model loss")
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16
        check_close(g, hf_grads[name], torch.bfloat16, f"bf16 gradient of {name}", grad=True)


def test_autocast_training():
    """A float32 model trained under autocast (bfloat16): loss and gradients as unpatched."""
    ids, labels = batch()
    base = build("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_loss, hf_grads = step(copy.deepcopy(base), lambda m: m(input_ids=ids, labels=labels).loss)
        loss, grads = step(fusedloss.hf.apply(copy.deepcopy(base)), lambda m: m(input_ids=ids, labels=labels).loss)
    assert loss.dtype == hf_loss.dtype == torch.float32
    check_close(loss, hf_loss, torch.bfloat16, "autocast loss")
    for name, g in grads.items():
        check_close(g, hf_grads[name], torch.bfloat16, f"autocast gradient of {name}", grad=True)


# ----------------------------------------------------------------------------- ForCausalLMLoss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_for_causal_lm_loss_matches_transformers(dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss as hf_loss

    ids, labels = batch()
    logits = (torch.randn(B, T, VOCAB, dtype=torch.float64) * 3).to(dtype)
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()  # transformers views it
    n = (shift != -100).sum()
    for kw in (dict(), dict(num_items_in_batch=n), dict(num_items_in_batch=int(n) + 3),
               dict(shift_labels=shift), dict(ignore_index=5)):
        lab = labels.masked_fill(labels == -100, 5) if "ignore_index" in kw else labels
        ll = [logits.clone().requires_grad_() for _ in range(2)]
        exp = hf_loss(ll[0], lab, VOCAB, **kw)
        out = fusedloss.hf.ForCausalLMLoss(ll[1], lab, VOCAB, **kw)
        assert out.dtype == torch.float32 == exp.dtype, f"loss dtype {out.dtype}"
        exp.backward()
        out.backward()
        check_close(out, exp, torch.float32, f"ForCausalLMLoss {kw} {dtype}")
        assert ll[1].grad.dtype == dtype
        check_close(ll[1].grad, ll[0].grad, dtype, f"ForCausalLMLoss gradient {kw} {dtype}", grad=True)


def test_for_causal_lm_loss_as_loss_function():
    ids, labels = batch()
    base = build("llama")
    model = copy.deepcopy(base)
    model.loss_function = fusedloss.hf.ForCausalLMLoss
    check_close(model(input_ids=ids, labels=labels).loss, base(input_ids=ids, labels=labels).loss, torch.float32,
                "model.loss_function = ForCausalLMLoss")
    fusedloss.hf.apply(model)  # the fused path also takes our loss_function as ForCausalLM's
    assert model(input_ids=ids, labels=labels).logits is None


def test_signature_and_deepcopy():
    """The patched forward keeps the original's signature (transformers' Trainer keeps the
    dataset columns it names); a deep copy of a patched model is patched itself."""
    import inspect

    base = build("llama")
    fused = fusedloss.hf.apply(copy.deepcopy(base))
    assert inspect.signature(fused.forward) == inspect.signature(base.forward)
    twin = copy.deepcopy(fused)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    ids, labels = batch()
    a, c = twin(input_ids=ids, labels=labels), fused(input_ids=ids, labels=labels)
    assert a.logits is None and not torch.equal(a.loss, c.loss), "the copy ran the original model's weights"
    assert twin.forward.__self__ is twin


def test_apply_refuses_and_is_idempotent():
    with pytest.raises(TypeError, match="lm_head"):
        fusedloss.hf.apply(torch.nn.Linear(2, 2))
    model = build("llama")
    assert fusedloss.hf.apply(model) is model
    forward = model.forward
    assert fusedloss.hf.apply(model) is model and model.forward is forward
    other = build("llama")
    other.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match="logit_scale"):
        fusedloss.hf.apply(other)
    custom = build("llama")
    custom.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().sum() * 0  # a user's own loss
    fusedloss.hf.apply(custom)
    ids, labels = batch()
    out = custom(input_ids=ids, labels=labels)
    assert out.logits is not None and out.loss.item() == 0.0, "a custom loss_function must be left alone"
