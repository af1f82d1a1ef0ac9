"""benchmarks/calibration_fit.py --ca-speedup, tiny: the table is built, the fits agree."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "calibration_fit.py"


def test_ca_speedup_tiny():
    spec = importlib.util.spec_from_file_location("bench_calibration_fit", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    body = module.ca_speedup(n=600, c=10, steps=6, batch_size=100, seed=0)
    assert body.count("\n|") >= 4  # header, rule and three rows
    differences = [float(x) for x in re.findall(r"(\d\.\de-\d+) \(relative", body)]
    assert len(differences) == 2 and max(differences) < 1e-5
