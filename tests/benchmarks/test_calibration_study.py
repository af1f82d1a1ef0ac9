"""benchmarks/calibration_study.py: interval arithmetic, verdicts, the report from fake runs."""

from __future__ import annotations

import math

import pytest

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def study():
    return load_benchmark("calibration_study")


def test_t_interval_by_hand(study):
    mean, low, high = study.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * s / sqrt(n)
    assert mean == 3.0 and low == pytest.approx(3 - half) and high == pytest.approx(3 + half)
    assert all(math.isnan(v) for v in study.t_interval([1.0])[1:])


def test_verdicts(study):
    assert study.verdict(-0.2, -0.1) == "helps"
    assert study.verdict(0.1, 0.2) == "hurts"
    assert study.verdict(-0.1, 0.1) == "no detectable difference"
    assert study.verdict(math.nan, math.nan) == "no detectable difference"
    assert study.verdict(0.1, 0.2, lower_is_better=False) == "helps"


def _fake_runs(study, shift):
    runs = []
    for seed in range(3):
        arms = {}
        for arm in study.ARMS:
            metrics = {m: 0.5 for m in study.METRICS}
            base = 0.05 + 0.001 * seed
            arms[arm] = {
                "id": {**metrics, "ece": base + (0.1 if "balanced" in arm else 0.0)},
                "shifted": {**metrics, "ece": base - (shift if "balanced" in arm else 0.0)},
                "seconds": 0.0,
            }
        runs.append({"cal_errors": 10 + seed, "cal_size": 400, "arms": arms})
    return runs


def test_tables_and_reading_from_fake_runs(study):
    results = {"strong": _fake_runs(study, 0.02), "weak": _fake_runs(study, 0.03)}
    table = study.regime_tables(results["strong"], "strong")
    assert "10-12 wrong of 400" in table
    row = next(line for line in table.splitlines() if line.startswith("| CA, balanced (authors"))
    assert "+0.1000 [+0.1000, +0.1000]: hurts" in row and "-0.0200" in row
    text = study.reading(results)
    assert "in distribution +0.100 (hurts), shifted -0.020 (helps)" in text
    assert "`weak`" in text and "shifted -0.030" in text
