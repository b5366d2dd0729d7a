"""Vocab-parallel cross-entropy: fusedloss against Megatron-core's algorithm, on CPU processes.

W processes (gloo, one per rank) each hold a slice of the (N, V) logits (the vocabulary split
evenly); one training step is the loss of the full logits and each rank's gradient:

    fusedloss   fusedloss.distributed.vocab_parallel_cross_entropy: one fused pass over the
                slice, ONE all-gather of a few numbers per row, backward from the merged row
                statistics (a second pass, no communication)
    megatron    Megatron-core's vocab_parallel_cross_entropy written in torch.distributed ops:
                all-reduce(max), all-reduce(target logit), all-reduce(sum exp) in forward,
                the softmax kept for backward (an N x V/W buffer), no communication in backward

Time: median over --reps steps of the slowest rank's wall time (a barrier before each step;
the two implementations take turns). Bytes: what each rank hands to the collectives per step
(the payload), and what a ring algorithm sends per rank ((W-1)/W x 2 x size for an
all-reduce, (W-1) x size for an all-gather). Loss difference between the two: a sanity check.

    python bench/bench_vocab_parallel.py                 # N=2048 V=32000 fp32, W = 2 and 4
    python bench/bench_vocab_parallel.py --quick         # seconds, a smoke run
    python bench/bench_vocab_parallel.py --worlds 2 --n 4096 --json out.json

Standalone: needs only torch and fusedloss. On this 2-core machine W=4 oversubscribes the
cores (1 thread per process): its times say more about scheduling than about the algorithms.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedloss.distributed import vocab_parallel_cross_entropy


# ----------------------------------------------------------------------------- megatron
class _MegatronCE(torch.autograd.Function):
    """Megatron-core's algorithm (3 all-reduces; the softmax saved for backward), per-row loss."""

    @staticmethod
    def forward(ctx, x, target, start, group):
        c = x.shape[-1]
        logits_max = x.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = x - logits_max.unsqueeze(-1)
        t_local = target - start
        own = (t_local >= 0) & (t_local < c)
        t_safe = torch.where(own, t_local, torch.zeros_like(t_local))
        predicted = shifted.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)
        predicted = torch.where(own, predicted, torch.zeros_like(predicted))
        dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=group)
        exp_logits = shifted.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        loss = torch.log(sum_exp) - predicted
        exp_logits.div_(sum_exp.unsqueeze(-1))  # the softmax, kept for backward
        ctx.save_for_backward(exp_logits, t_safe, own)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, t_safe, own = ctx.saved_tensors
        grad = softmax  # in place, as Megatron does
        rows = torch.arange(grad.shape[0])
        grad[rows, t_safe] -= own.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def megatron(x, target, start, group):
    return _MegatronCE.apply(x, target, start, group).mean()


def fused(x, target, start, group):
    return vocab_parallel_cross_entropy(x, target, vocab_start_index=start, group=group)


IMPLS = {"fusedloss": fused, "megatron": megatron}
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_reduce")


# ----------------------------------------------------------------------------- worker
def _count(log):
    """Wrap the collectives: log (name, bytes handed in) per call."""
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            sent = a[1] if _name != "all_reduce" else a[0]
            log.append((_name, sent.numel() * sent.element_size()))
            return _fn(*a, **k)

        setattr(dist, name, wrapped)


def _ring_bytes(name, size, world):
    return 2 * (world - 1) / world * size if name == "all_reduce" else (world - 1) * size


def _worker(rank, world, port, args, out):
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    per = args.vocab // world
    start = rank * per
    g = torch.Generator().manual_seed(0)
    full = torch.randn(args.n, args.vocab, generator=g, dtype=torch.float32) * 2
    target = torch.randint(0, args.vocab, (args.n,), generator=g)
    x0 = full[:, start:start + per].clone()
    del full
    log = []
    _count(log)
    result = {}
    losses = {}
    times = {name: [] for name in IMPLS}
    for rep in range(args.reps + 1):  # rep 0: warm-up
        for name, fn in IMPLS.items():
            x = x0.clone().requires_grad_()
            log.clear()
            dist.barrier()
            t0 = time.perf_counter()
            loss = fn(x, target, start, None)
            n_fwd = len(log)
            loss.backward()
            dt = time.perf_counter() - t0
            calls = list(log)
            slowest = [None] * world
            dist.all_gather_object(slowest, dt)
            if rep > 0:
                times[name].append(max(slowest) * 1e3)
            losses[name] = loss.item()
            result[name] = dict(fwd_collectives=n_fwd, bwd_collectives=len(calls) - n_fwd,
                                payload_bytes=sum(b for _, b in calls),
                                ring_bytes=sum(_ring_bytes(c, b, world) for c, b in calls))
    for name in IMPLS:
        result[name]["ms"] = statistics.median(times[name])
        result[name]["loss"] = losses[name]
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> list:
    rows = []
    for world in args.worlds:
        out = os.path.join(args.tmp, f"vp_{world}.pt")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        res = torch.load(out)
        base = res["megatron"]["ms"]
        for name, r in res.items():
            rows.append(dict(world=world, impl=name, n=args.n, vocab=args.vocab, ms=r["ms"], vs_megatron=base / r["ms"],
                             fwd_collectives=r["fwd_collectives"], bwd_collectives=r["bwd_collectives"],
                             payload_bytes=r["payload_bytes"], ring_bytes=r["ring_bytes"],
                             loss_diff=abs(r["loss"] - res["megatron"]["loss"])))
    return rows


def table(rows) -> str:
    head = f"{'W':>2} {'impl':<10} {'fwd+bwd ms':>11} {'speedup':>8} {'collectives f/b':>16} {'payload KiB':>12} {'ring-sent KiB':>14} {'|dloss|':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['world']:>2} {r['impl']:<10} {r['ms']:>11.2f} {r['vs_megatron']:>7.2f}x "
                     f"{r['fwd_collectives']:>8}/{r['bwd_collectives']:<7} {r['payload_bytes'] / 1024:>12.1f} "
                     f"{r['ring_bytes'] / 1024:>14.1f} {r['loss_diff']:>9.1e}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="tokens (rows)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--worlds", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="threads over all the processes of a run")
    p.add_argument("--quick", action="store_true", help="N=256 V=4096, 3 reps")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.vocab, args.reps = 256, 4096, 3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        rows = run(args)
    print(f"vocab-parallel cross-entropy, fp32, N={args.n} V={args.vocab}, gloo, {platform.machine()} "
          f"{os.cpu_count()} cores; speedup = megatron's time / the row's")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
