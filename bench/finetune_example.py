"""Fine-tune a tiny Llama-like model with and without fusedloss.hf.apply: same loss curve,
less memory.

The model is built from a config (random init, nothing downloaded) and trained on a small
synthetic corpus this script makes: token sequences from a fixed random "grammar" (each
token has a few likely successors), so the loss falls from ln(vocab) towards the grammar's
entropy. Both runs start from the same weights and see the same batches; the only
difference is the head's loss: transformers' (logits (B, T, V), upcast to float32, eager
cross-entropy) or fusedloss.linear_cross_entropy from the last hidden states (no logits).

Writes <out>.json (loss per step, step times, peak memory) and <out>.png (loss curves and
peak memory, linear axes). Peak memory: the peak extra CPU memory of one training step
(forward + backward), from torch.profiler's allocation events, as bench/README.md
describes; on CUDA, max_memory_allocated.

    python bench/finetune_example.py                   # 300 steps, ~2 minutes on 2 CPU cores
    python bench/finetune_example.py --steps 50 --out /tmp/ft
"""
import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

import fusedloss
import fusedloss.hf


def corpus(vocab, n_seq, seq_len, successors=4, seed=0):
    """n_seq sequences of seq_len tokens from a random sparse bigram grammar: each token's
    next token is one of `successors` tokens, with probabilities 0.55, 0.25, 0.15, 0.05."""
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (vocab, successors), generator=g)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05][:successors])
    probs = probs / probs.sum()
    seqs = torch.empty(n_seq, seq_len, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (n_seq,), generator=g)
    for t in range(1, seq_len):
        pick = torch.multinomial(probs.expand(n_seq, -1), 1, generator=g).squeeze(1)
        seqs[:, t] = nxt[seqs[:, t - 1], pick]
    entropy = float(-(probs * probs.log()).sum())
    return seqs, entropy


def build(args):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


from harness import cpu_peak_bytes, cuda_peak_bytes  # noqa: E402  (bench/ is the script's directory)


def peak_bytes(fn, device):
    """Peak extra memory of fn(): CUDA max_memory_allocated, or on the CPU the replay of
    torch.profiler's allocation events (bench/harness.py)."""
    return cuda_peak_bytes(fn) if device.type == "cuda" else cpu_peak_bytes(fn)


def train(model, data, args, device, label):
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)  # the same batches for both runs
    losses, times = [], []

    def fwd_bwd(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    for step in range(args.steps):
        ids = data[torch.randint(0, data.shape[0], (args.batch,), generator=g)].to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = fwd_bwd(ids)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"  {label:<22} step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:7.1f} ms", flush=True)
    # one more step, measured: the gradients of the previous one freed first, as in training
    opt.zero_grad(set_to_none=True)
    ids = data[:args.batch].to(device)
    peak = peak_bytes(lambda: fwd_bwd(ids), device)
    opt.zero_grad(set_to_none=True)
    return {"loss": losses, "step_s": times, "peak_bytes": peak}


def plot(results, entropy, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    for (name, r), ls in zip(results.items(), ("-", "--")):
        ax1.plot(range(len(r["loss"])), r["loss"], label=name, lw=1.2, ls=ls)
    ax1.axhline(entropy, color="gray", ls=":", lw=1, label=f"corpus entropy {entropy:.2f}")
    ax1.set_xlim(left=0)
    ax1.set_ylim(bottom=0)  # linear axes from zero
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (nats/token)")
    ax1.set_title(title, fontsize=9)
    ax1.legend(loc="upper right")
    names = list(results)
    mib = [results[n]["peak_bytes"] / 2**20 for n in names]
    bars = ax2.bar(range(len(names)), mib, color=["tab:blue", "tab:orange"][:len(names)])
    for b_, v in zip(bars, mib):
        ax2.text(b_.get_x() + b_.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(names)), [n.replace(" + ", "\n+ ") for n in names], fontsize=8)
    ax2.set_ylabel("peak extra memory of a step (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "finetune_example"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)

    data, entropy = corpus(args.vocab, n_seq=2048, seq_len=args.seq_len)
    base = build(args)
    n_params = sum(p.numel() for p in base.parameters())
    tokens = args.batch * args.seq_len
    print(f"tiny Llama: {n_params / 1e6:.2f} M parameters, vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers; {tokens} tokens per step; logits per step "
          f"{tokens * args.vocab * 4 / 2**20:.0f} MiB in float32")
    runs = {
        "transformers (logits)": copy.deepcopy(base),
        "fusedloss.hf.apply": fusedloss.hf.apply(copy.deepcopy(base)),
    }
    results = {name: train(model, data, args, device, name) for name, model in runs.items()}
    a, b = (results[n] for n in runs)
    diff = max(abs(x - y) for x, y in zip(a["loss"], b["loss"]))
    step_ms = {n: 1e3 * sorted(r["step_s"])[len(r["step_s"]) // 2] for n, r in results.items()}
    for n, r in results.items():
        print(f"{n:<22} final loss {r['loss'][-1]:.4f}  median step {step_ms[n]:.1f} ms  "
              f"peak {r['peak_bytes'] / 2**20:.1f} MiB")
    print(f"largest loss difference between the runs: {diff:.2e}; peak memory ratio "
          f"{b['peak_bytes'] / a['peak_bytes']:.2f}")

    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "backend": fusedloss._backend.resolve("auto", device).name}
    with open(args.out + ".json", "w") as f:
        json.dump({"env": env, "config": vars(args), "corpus_entropy": entropy, "n_params": n_params,
                   "max_loss_difference": diff, "median_step_ms": step_ms, "runs": results}, f)
    title = (f"tiny Llama {n_params / 1e6:.1f}M params, vocab {args.vocab}, {tokens} tokens/step, "
             f"{device.type} ({env['backend']} backend)")
    plot(results, entropy, args.out + ".png", title)
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
