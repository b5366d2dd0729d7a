"""pytest options and parametrization of bench/test_bench_cpu.py (pytest-benchmark).

    python -m pytest bench/test_bench_cpu.py [--fl-quick] [--fl-losses ce,linear] [--fl-threads 2]
        [--fl-no-compile] [--benchmark-json FILE] [--benchmark-autosave] [--benchmark-compare]

run_all.py (and each bench_<loss>.py) runs the same tests in its own process and prints the
side-by-side table from their JSON; `pytest` alone prints pytest-benchmark's tables.
"""
import pytest
import torch

import benches
import harness


def pytest_addoption(parser):
    g = parser.getgroup("fusedloss benchmarks")
    g.addoption("--fl-losses", default=",".join(benches.BENCHES), help="comma-separated runners (run_all --losses)")
    g.addoption("--fl-quick", action="store_true", help="tiny shapes (CI smoke)")
    g.addoption("--fl-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    g.addoption("--fl-no-compile", action="store_true", help="skip the torch.compile rows")
    g.addoption("--fl-warmup", type=int, default=None, help="untimed calls before each benchmark")


def _config(config) -> harness.Config:
    opt = config.getoption
    if opt("--fl-threads"):
        torch.set_num_threads(opt("--fl-threads"))
    cfg = harness.Config(device=torch.device("cpu"), compile=not opt("--fl-no-compile"),
                         threads=torch.get_num_threads())
    if opt("--fl-quick"):
        harness.quick_config(cfg)
    if opt("--fl-warmup") is not None:
        cfg.warmup = opt("--fl-warmup")
    return cfg


def pytest_configure(config):
    config.fl_config = _config(config)


@pytest.fixture(scope="session")
def fl_config(request):
    return request.config.fl_config


def pytest_generate_tests(metafunc):
    if "fl_item" in metafunc.fixturenames:
        cfg = metafunc.config.fl_config
        try:
            picked = benches.select(metafunc.config.getoption("--fl-losses"))
        except ValueError as e:
            raise pytest.UsageError(str(e))
        items = harness.plan(picked, cfg)
        metafunc.parametrize("fl_item", items, ids=[i.id for i in items])
