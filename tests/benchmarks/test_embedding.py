"""benchmarks/embedding.py: the share arithmetic, the baseline loader and the host-read count."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
bench = load_benchmark("embedding")


def test_averaged_step_and_share():
    base = {"fake": [0.10, 0.10, 0.30], "gen": [0.20, 0.20, 0.90]}
    with_el = {"fake": [0.5, 0.5, 0.5], "gen": [0.25, 0.25, 0.25]}  # its fake steps are ignored
    assert bench.averaged_step(base) == pytest.approx((4 * 0.10 + 0.20) / 5)
    # (0.25 - 0.20) / 5 over the averaged step without EL (0.12)
    assert bench.share(with_el, base) == pytest.approx(0.01 / 0.12)
    low, high = bench.bootstrap(with_el, base, resamples=200)
    assert low <= bench.share(with_el, base) <= high


def _has_commit(ref: str) -> bool:
    done = subprocess.run(
        ["git", "cat-file", "-e", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    return done.returncode == 0


def _has_baseline() -> bool:
    return _has_commit(bench.BASELINE_REF)


@pytest.mark.skipif(not _has_baseline(), reason="the baseline commit is not in this checkout")
def test_baseline_loads_and_the_current_el_reads_the_host_once():
    old, new = bench.load_baseline(bench.BASELINE_REF), bench.current()
    shape = (1, 8, 8)
    reads_old = bench.count_reads(bench.build_el(old, 1), shape, 4)
    reads_new = bench.count_reads(bench.build_el(new, 1), shape, 4)
    assert reads_new == ["tolist"]
    assert len(reads_old) > 10  # two finiteness reads per feature map and per batch, and more
    errors = bench.agreement(bench.build_el(old, 1), bench.build_el(new, 1), shape, 6)
    assert errors["new"][0] < 1e-3 and errors["new"][1] < 1e-4


@pytest.mark.skipif(not _has_commit(bench.BEFORE_REF), reason="the commit is not in this checkout")
def test_a_later_commit_loads_with_its_own_mmd_module():
    import sys

    before = bench.load_baseline(bench.BEFORE_REF)
    loss_module = sys.modules[before.EmbeddingLoss.__module__]
    maps = loss_module._mmd2_maps.__module__
    assert maps.startswith("el_") and maps.endswith("_mmd_maps")  # the commit's, not the tree's
    assert bench.count_reads(bench.build_el(before, 1), (1, 8, 8), 4) == ["tolist"]
