"""CPU timings of every runner under pytest-benchmark: one test per (runner, case,
implementation, mode), case by case, so a case's inputs are made once and its tests run
side by side. Each test: the implementation's own copies of the inputs, `cfg.warmup` untimed
calls (torch.compile compiles there), then pytest-benchmark's calibrated rounds; fwd+bwd
tests also record the peak extra memory of one more, untimed call (harness.cpu_peak_bytes)
in extra_info. An implementation that fails is a failed test with its error recorded; one
that cannot run (a GPU-only peer, --fl-no-compile) a skipped test with the reason.

Options: see conftest.py. Normally run through run_all.py, which prints the table.
"""
import pytest
import torch

import harness

_case = {}  # the case being measured: key, setup, implementations by name


@pytest.fixture(scope="module", autouse=True)
def _release_case(fl_config):
    """run_all goes on in this process after the session: free the last case's inputs."""
    yield
    _case.clear()
    harness.free()
    torch.set_num_threads(fl_config.threads)


def _context(item: harness.PlanItem, cfg: harness.Config) -> dict:
    key = (item.bench.name, item.case)
    if _case.get("key") != key:
        _case.clear()
        harness.free()
        torch.set_num_threads(item.bench.threads or cfg.threads)
        torch._dynamo.reset()  # each case compiles afresh (no shape-generalised recompiles)
        s = harness.make_setup(item.bench, item.case, cfg.device)
        _case.update(key=key, setup=s, impls={i.name: i for i in harness.build_impls(s, cfg.device, cfg)})
        harness.progress(f"\n  {item.bench.name} {item.case.label} {harness.dtype_name(item.case.dtype)} "
                         f"({torch.get_num_threads()} threads)")
    return _case


def test_loss(benchmark, fl_item, fl_config, request):
    meta = fl_item.meta()
    request.node.user_properties.append(("fusedloss", meta))  # read back by harness.Collector
    if fl_item.skip is not None:
        meta["skip"] = fl_item.skip
        pytest.skip(fl_item.skip)
    ctx = _context(fl_item, fl_config)
    s, impl = ctx["setup"], ctx["impls"][fl_item.impl]
    meta.update(bytes_fwd=s.bytes_fwd, bytes_fwdbwd=s.bytes_fwdbwd)
    inputs = harness.fresh_inputs(s, grad=fl_item.mode == "fwdbwd")
    step = harness.make_step(impl.fn, inputs, fl_item.mode)
    benchmark.group = f"{meta['loss']} {meta['case']} {meta['dtype']} {fl_item.mode}"
    benchmark.extra_info["fusedloss"] = meta
    try:
        for _ in range(fl_config.warmup):
            step()
        benchmark(step)
        if fl_item.mode == "fwdbwd":
            meta["peak_bytes"] = harness.peak_bytes(step, inputs, fl_config.device)
    except Exception as e:  # recorded, so the table says why the row failed
        meta["error"] = harness.error_text(e)
        pytest.fail(meta["error"], pytrace=False)
