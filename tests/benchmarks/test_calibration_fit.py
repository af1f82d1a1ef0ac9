"""benchmarks/calibration_fit.py --ca-speedup, tiny: the table is built, the fits agree."""

from __future__ import annotations

import re

from tests.benchmarks import load_benchmark


def test_ca_speedup_tiny():
    module = load_benchmark("calibration_fit")
    body = module.ca_speedup(n=600, c=10, steps=6, batch_size=100, seed=0)
    assert body.count("\n|") >= 4  # header, rule and three rows
    differences = [float(x) for x in re.findall(r"(\d\.\de[-+]\d+) \(relative", body)]
    # reference - float64, fast - reference, fast - float64, both evaluated in float64,
    # then the two float64 fits
    assert len(differences) == 6 and max(differences) < 1e-5
    assert differences[-1] < 1e-12
    assert "ms per step" in body and "one-off work" in body
