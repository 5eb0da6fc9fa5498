"""Shared fixtures. Randomness is fresh per run; the seed is printed so a failure can be replayed
with DSMOE_TEST_SEED=<seed>."""
from __future__ import annotations

import os
import secrets

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run the long variants")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long variant: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request) -> int:
    value = int(os.environ.get("DSMOE_TEST_SEED", secrets.randbits(31)))
    print(f"{request.node.nodeid}: DSMOE_TEST_SEED={value}")
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def op_library() -> str:
    """Path of the built op library. Missing library = failure, not a skip: CI builds it
    (`pip install .`, or a development build named by DSMOE_OPS_LIBRARY)."""
    try:
        from dsmoe_runtime import get_library_path
    except ImportError:  # a source checkout without `pip install .`: same lookup, by path
        import importlib.util
        from pathlib import Path

        path = Path(__file__).resolve().parents[1] / "runtime" / "_library.py"
        spec = importlib.util.spec_from_file_location("_dsmoe_runtime_library", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        get_library_path = module.get_library_path
    return get_library_path()
