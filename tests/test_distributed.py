"""fusedloss.distributed.vocab_parallel_cross_entropy on real process groups (gloo, CPU
processes, world sizes 1-4, uneven slices, one of them empty): every rank's loss and gradient
against the single-process loss of the full logits, the collectives counted, bad input.

One spawn per world size runs every case (a spawn costs seconds); the parent compares. The
references are computed in the parent in float64 from the full logits: PyTorch's own
F.cross_entropy where its formula is the contract (finite logits, no mask / z-loss /
softcap), and the single-process fusedloss.cross_entropy (torch backend) for the rules of
SPEC section 2 that PyTorch has no formula for (masks, -inf, z-loss, softcap).
"""
import os
import socket
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fusedloss
from fusedloss.distributed import vocab_parallel_cross_entropy

V = 11
SIZES = {1: [V], 2: [4, V - 4], 3: [5, 0, V - 5], 4: [3, 1, V - 6, 2]}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3)}
GRAD_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}


def _case(name, dtype=torch.float64, n=7, reduction="mean", weight=False, eps=0.0, z_loss=0.0, softcap=None,
          mask=None, neg_inf=False, ignore=False, kdim=False, nan=False, backend="cpu", grad_out=None):
    return dict(name=name, dtype=dtype, n=n, reduction=reduction, weight=weight, eps=eps, z_loss=z_loss,
                softcap=softcap, mask=mask, neg_inf=neg_inf, ignore=ignore, kdim=kdim, nan=nan, backend=backend,
                grad_out=grad_out)


CASES = [
    _case("plain"),
    _case("plain-none", reduction="none"),
    _case("plain-sum", reduction="sum", grad_out=0.37),
    _case("weight", weight=True, ignore=True),
    _case("smoothing", eps=0.1, ignore=True),
    _case("smoothing-weight-sum", eps=0.2, weight=True, reduction="sum"),
    _case("smoothing-1", eps=1.0, weight=True),
    _case("zloss-weight", z_loss=1e-2, weight=True),
    _case("softcap", softcap=3.0, eps=0.1, reduction="none"),
    _case("mask", mask="rows", eps=0.1, weight=True),
    _case("mask-none", mask="rows", reduction="none", z_loss=1e-3),
    _case("neg-inf", neg_inf=True, eps=0.1, reduction="none"),
    _case("neg-inf-mean", neg_inf=True, ignore=True),
    _case("all-ignored", ignore="all"),
    _case("kdim", kdim=True, eps=0.1, weight=True, reduction="none"),
    _case("nan-row", nan=True, reduction="none"),
    _case("float32", dtype=torch.float32, eps=0.1, weight=True, z_loss=1e-3),
    _case("bfloat16", dtype=torch.bfloat16, reduction="sum"),
    _case("torch-backend", backend="torch", eps=0.1, mask="rows", z_loss=1e-3),
    _case("triton-backend", backend="triton", eps=0.1, weight=True, mask="rows", reduction="none"),
]


def make(case):
    """Full logits (N, V[, 3]), target, weight (V,), mask (N, V[, 3]) and the loss kwargs of a case."""
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))  # the same in every process
    n = case["n"]
    shape = (n, V, 3) if case["kdim"] else (n, V)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(case["dtype"])
    t = torch.randint(0, V, (n, 3) if case["kdim"] else (n,), generator=g)
    t[0], t[1] = 5, 0  # owned by the slice after the empty one (world 3), by the first rank
    if case["ignore"] == "all":
        t[:] = -100
    elif case["ignore"]:
        t[2] = -100
    mask = None
    if case["mask"] == "rows":
        mask = torch.rand(shape, generator=g) > 0.3
        mask[3] = False  # a row empty on every rank
        mask[4, :5] = False  # row 4: the first 5 classes masked, target among them
        t[4] = 2
        mask[5] = False
        mask[5, 7] = True  # row 5: one class allowed, not the target
        t[5] = 8
    if case["neg_inf"]:
        x[1, :] = float("-inf")  # empty row
        x[3, 2] = float("-inf")
        t[3] = 2  # masked target: loss +inf, finite gradient
        x[4, ::2] = float("-inf")
    if case["nan"]:
        x[2, 6] = float("nan")
        x[3, 1] = float("nan")
        t[3] = -100  # ignored: its NaN does not count
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if case["weight"] else None
    kw = dict(reduction=case["reduction"], label_smoothing=case["eps"], z_loss=case["z_loss"], softcap=case["softcap"])
    return x, t, w, mask, kw


# ----------------------------------------------------------------------------- workers
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
               "reduce_scatter_tensor", "all_to_all_single", "send", "recv", "barrier", "all_gather_object")


def _count_collectives(counter):
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*a, _fn=fn, _name=name, **k):
            counter[counter["phase"]] += 1
            return _fn(*a, **k)

        setattr(dist, name, wrapped)


def _slice(v, start, size, dim=1):
    return None if v is None else v.narrow(dim, start, size)


def _run_case(case, rank, world, counter):
    x, t, w, mask, kw = make(case)
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    xl = _slice(x, start, sizes[rank]).clone().requires_grad_()
    counter["fwd"] = counter["bwd"] = 0
    counter["phase"] = "fwd"
    loss = vocab_parallel_cross_entropy(
        xl, t, weight=_slice(w, start, sizes[rank], 0), mask=_slice(mask, start, sizes[rank]),
        vocab_start_index=start if case["name"] != "plain" else None, backend=case["backend"], **kw)
    counter["phase"] = "bwd"
    go = torch.full_like(loss, case["grad_out"] or 1.0)
    if case["reduction"] == "none":
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
    loss.backward(go)
    return dict(loss=loss.detach(), grad=xl.grad, fwd=counter["fwd"], bwd=counter["bwd"])


def _bad_inputs(rank, world):
    """Errors every rank must raise alike (after the collective: no rank is left waiting)."""
    out = {}
    sizes = SIZES[world]
    start = sum(sizes[:rank])
    x = torch.randn(4, sizes[rank], dtype=torch.float64)
    for name, kwargs in [
        ("target-outside", dict(target=torch.tensor([0, V, 1, 2]))),
        ("target-negative", dict(target=torch.tensor([0, -3, 1, 2]))),
        ("overlap", dict(target=torch.tensor([0, 1, 1, 2]), vocab_start_index=max(start - 1, 0))),
        ("gap", dict(target=torch.tensor([0, 1, 1, 2]), vocab_start_index=start + (rank > 0))),
    ]:
        if world == 1 and name in ("overlap", "gap"):
            kwargs["vocab_start_index"] = 1  # a slice that does not start at 0
        kwargs.setdefault("vocab_start_index", start)
        try:
            vocab_parallel_cross_entropy(x, kwargs.pop("target"), **kwargs)
            out[name] = None
        except Exception as e:  # noqa: BLE001 -- reported to the parent
            out[name] = (type(e).__name__, str(e))
    if world > 1:  # a different number of rows on one rank: caught by the size exchange
        xr = torch.randn(4 + (rank == world - 1), sizes[rank], dtype=torch.float64)
        try:
            vocab_parallel_cross_entropy(xr, torch.zeros(xr.shape[0], dtype=torch.int64))
            out["rows-differ"] = None
        except Exception as e:  # noqa: BLE001
            out["rows-differ"] = (type(e).__name__, str(e))
    return out


def _lm_head_and_batch():
    g = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(8, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 8, generator=g, dtype=torch.float64))
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 1] = -100
    return head, h, labels


def _colwise(world, local_output):
    """The README's recipe: a ColwiseParallel lm_head (torch's tensor parallelism, its own
    uneven chunks of the vocabulary) gives each rank (B, T, V_r) local logits; or, with
    use_local_output=False, a DTensor sharded along the vocabulary."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    head, h, labels = _lm_head_and_batch()
    mesh = init_device_mesh("cpu", (world,))
    head = parallelize_module(head, mesh, ColwiseParallel(use_local_output=local_output))
    logits = head(h)  # (B, T, V_r): this rank's slice (or the DTensor of them)
    loss = vocab_parallel_cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    loss.backward()
    return dict(loss=loss.detach(), weight_grad=head.weight.grad.to_local(), vocab=head.weight.to_local().shape[0])


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    counter = {"fwd": 0, "bwd": 0, "phase": "fwd"}
    _count_collectives(counter)
    results = {}
    for case in CASES:
        try:
            results[case["name"]] = _run_case(case, rank, world, counter)
        except Exception:  # noqa: BLE001 -- reported to the parent, per case
            results[case["name"]] = traceback.format_exc()
    results["bad"] = _bad_inputs(rank, world)
    for local_output in (True, False):
        try:
            results["colwise", local_output] = _colwise(world, local_output)
        except Exception:  # noqa: BLE001
            results["colwise", local_output] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda w: f"world{w}")
def ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"vp{world}")
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return world, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- references
def _reference(case):
    """Loss and full gradient of the single-process loss on the full logits, float64."""
    x, t, w, mask, kw = make(case)
    x64 = x.to(torch.float64).requires_grad_()
    loss = fusedloss.cross_entropy(x64, t, weight=w, mask=mask, backend="torch", **kw)
    go = torch.full_like(loss, case["grad_out"] or 1.0)
    if case["reduction"] == "none":
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
    loss.backward(go)
    return loss.detach(), x64.grad


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_every_rank_equals_the_full_loss(ranks, case):
    world, results = ranks
    ref_loss, ref_grad = _reference(case)
    sizes = SIZES[world]
    losses = []
    for rank, res in enumerate(results):
        r = res[case["name"]]
        assert not isinstance(r, str), f"rank {rank} raised:\n{r}"
        tol = TOL[case["dtype"]]
        torch.testing.assert_close(r["loss"].to(torch.float64), ref_loss, equal_nan=True, **tol)
        start = sum(sizes[:rank])
        torch.testing.assert_close(r["grad"].to(torch.float64), ref_grad.narrow(1, start, sizes[rank]), equal_nan=True,
                                   rtol=0, atol=GRAD_ATOL[case["dtype"]])
        assert r["grad"].dtype == case["dtype"]
        losses.append(r["loss"])
        # 1 all-gather in forward (2 with the size exchange of vocab_start_index=None), none in backward
        assert r["fwd"] == (0 if world == 1 else 2 if case["name"] == "plain" else 1), r["fwd"]
        assert r["bwd"] == 0
    for other in losses[1:]:  # bitwise the same loss on every rank
        assert torch.equal(other.nan_to_num(), losses[0].nan_to_num())


@pytest.mark.parametrize("case", [c for c in CASES if not (c["mask"] or c["neg_inf"] or c["z_loss"] or c["softcap"] or c["nan"])],
                         ids=lambda c: c["name"])
def test_matches_pytorch_cross_entropy(ranks, case):
    """Finite logits, no extras: PyTorch's own F.cross_entropy in float64 on the full logits."""
    world, results = ranks
    x, t, w, _, kw = make(case)
    x64 = x.to(torch.float64).requires_grad_()
    loss = F.cross_entropy(x64, t, weight=w, reduction=kw["reduction"], label_smoothing=kw["label_smoothing"])
    if case["ignore"] == "all" and kw["reduction"] == "mean":  # PyTorch: NaN; SPEC rule 6: 0
        loss = torch.zeros((), dtype=torch.float64, requires_grad=True)
    go = torch.full_like(loss, case["grad_out"] or 1.0)
    if case["reduction"] == "none":
        go = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).view_as(loss)
    (grad,) = torch.autograd.grad(loss, x64, go, allow_unused=True)
    grad = torch.zeros_like(x64) if grad is None else grad
    start = 0
    for rank, res in enumerate(results):
        r = res[case["name"]]
        assert not isinstance(r, str), f"rank {rank} raised:\n{r}"
        torch.testing.assert_close(r["loss"].to(torch.float64), loss.detach(), **TOL[case["dtype"]])
        size = SIZES[world][rank]
        torch.testing.assert_close(r["grad"].to(torch.float64), grad.narrow(1, start, size), rtol=0,
                                   atol=GRAD_ATOL[case["dtype"]])
        start += size


def test_bad_input_raises_on_every_rank(ranks):
    world, results = ranks
    for rank, res in enumerate(results):
        bad = res["bad"]
        for name in ("target-outside", "target-negative"):
            assert bad[name] is not None and bad[name][0] == "IndexError", (rank, name, bad[name])
            assert "no rank's vocabulary slice" in bad[name][1]
        for name in ("overlap", "gap"):
            assert bad[name] is not None and bad[name][0] == "ValueError", (rank, name, bad[name])
            assert "do not tile" in bad[name][1]
        if world > 1:
            assert bad["rows-differ"] is not None and bad["rows-differ"][0] == "ValueError", bad["rows-differ"]
            assert "different numbers of rows" in bad["rows-differ"][1]


@pytest.mark.parametrize("local_output", [True, False], ids=["local-logits", "dtensor-logits"])
def test_colwise_parallel_lm_head(ranks, local_output):
    world, results = ranks
    head, h, labels = _lm_head_and_batch()
    loss = F.cross_entropy(head(h).flatten(0, 1), labels.flatten(), label_smoothing=0.1)
    loss.backward()
    start = 0
    for rank, res in enumerate(results):
        r = res["colwise", local_output]
        assert not isinstance(r, str), f"rank {rank} raised:\n{r}"
        torch.testing.assert_close(r["loss"], loss.detach(), **TOL[torch.float64])
        torch.testing.assert_close(r["weight_grad"], head.weight.grad[start:start + r["vocab"]], rtol=0, atol=1e-12)
        start += r["vocab"]
    assert start == V


# ----------------------------------------------------------------------------- single process
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-2), dict(softcap=2.0, reduction="sum")],
                         ids=["plain", "smoothing-zloss", "softcap-sum"])
def test_gradcheck_single_process(backend, opts):
    """No process group: one process holds the whole vocabulary. gradcheck in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.tensor([0, 3, -100, 6, 2])
    w = torch.rand(7, dtype=torch.float64, generator=g) + 0.5
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_cross_entropy(x, t, weight=w, backend=backend, **opts), (x,))


def test_argument_errors():
    x = torch.randn(3, 5)
    with pytest.raises(TypeError, match="class indices"):
        vocab_parallel_cross_entropy(x, torch.rand(3, 5))
    with pytest.raises(ValueError, match="vocab_start_index"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2]), vocab_start_index=-1)
    with pytest.raises(ValueError, match="weight"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.ones(4))
    with pytest.raises(ValueError, match="batch_size"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 2]), reduction="avg")
