"""Shared test hygiene: offline hubs, no leaked process groups or environment variables."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Let user-project modules in tests/ be imported by class_path, as a user's own package would be.
sys.path.insert(0, str(Path(__file__).parent))
# Test modules are imported as ``tests.<folder>.<module>`` (import mode importlib); the ddp_spawn
# test's children unpickle functions by that name, so the repository root must be importable.
sys.path.insert(1, str(Path(__file__).parents[1]))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The models here are tiny: on 2 shared cores one thread is several times faster than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean_environment():
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Markers for a fast inner loop (`pytest -m "not slow and not ddp and not notebook"`);
    # `make test` runs them all.
    for item in items:
        if "ddp" in item.name.lower():
            item.add_marker(pytest.mark.ddp)
        if Path(str(item.fspath)).parent.name == "notebooks":
            item.add_marker(pytest.mark.notebook)
