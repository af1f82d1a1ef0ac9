"""benchmarks/opl_noise.py: selections, paired t-intervals, verdicts, memorised share, tables."""

from __future__ import annotations

import math
import statistics

import pytest

from tests.benchmarks import load_benchmark

opl_noise = load_benchmark("opl_noise")


def test_select_takes_the_first_maximum_of_each_criterion():
    history = {
        "val": [0.5, 0.7, 0.7, 0.6],
        "test": [0.6, 0.8, 0.9, 0.9],
        "memorised": [0.1, 0.2, 0.3, 0.4],
    }
    chosen = opl_noise.select(history)
    assert chosen["val"] == {"epoch": 1, "test": 0.8, "memorised": 0.2}
    assert chosen["last"] == {"epoch": 3, "test": 0.9, "memorised": 0.4}
    assert chosen["test"] == {"epoch": 2, "test": 0.9, "memorised": 0.3}
    with pytest.raises(ValueError, match="equally long"):
        opl_noise.select({"val": [0.1], "test": [], "memorised": [0.0]})


def test_paired_interval_is_the_student_t_interval():
    mean, low, high = opl_noise.paired_interval([1.0, 2.0, 3.0])
    # sd 1, n 3, t_{0.975, 2} = 4.302652729...
    half = 4.302652729911275 / math.sqrt(3)
    assert mean == pytest.approx(2.0)
    assert (low, high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-9)
    diffs = [0.3, -1.2, 2.5, 0.8, 1.1]
    mean, low, high = opl_noise.paired_interval(diffs)
    half = 2.7764451051977987 * statistics.stdev(diffs) / math.sqrt(5)
    assert (low, high) == pytest.approx((mean - half, mean + half), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        opl_noise.paired_interval([1.0])


def test_verdict_reads_the_interval():
    assert opl_noise.verdict(0.1, 2.0) == "helps"
    assert opl_noise.verdict(-2.0, -0.1) == "hurts"
    assert opl_noise.verdict(-0.5, 0.5) == "no detectable difference"
    assert opl_noise.verdict(0.0, 1.0) == "no detectable difference"


def test_memorised_share_counts_only_flipped_labels():
    predictions = [0, 1, 2, 3, 1]
    noisy = [0, 2, 2, 0, 1]
    flipped = [False, True, True, True, False]
    # flipped items 1, 2, 3: predicted as noisy label only at item 2
    assert opl_noise.memorised_share(predictions, noisy, flipped) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="no flipped"):
        opl_noise.memorised_share([0], [0], [False])


def test_tables_report_three_selections_and_both_pairs():
    def history(offset):
        return {
            "val": [0.5, 0.6 + offset, 0.55],
            "test": [0.5, 0.7 + offset, 0.8 + offset],
            "memorised": [0.1, 0.2, 0.5],
            "seconds": 1.0,
        }

    arms = ["CE", "CE+OPL", "TL", "TL+OPL"]
    offsets = {"CE": 0.0, "CE+OPL": 0.0, "TL": 0.0, "TL+OPL": 0.05}
    runs = {
        "seeds": [0, 1, 2],
        "noises": ["symmetric"],
        "arms": arms,
        "epochs": 3,
        "workers": 1,
        "wall_seconds": 3.0,
        "history": {
            "symmetric": {a: [history(offsets[a] + 0.01 * s) for s in range(3)] for a in arms}
        },
    }
    # CE+OPL's seeds get different offsets from CE's so the CE pair has some spread
    runs["history"]["symmetric"]["CE+OPL"] = [history(d) for d in (0.02, -0.01, 0.0)]
    text = opl_noise.tables(runs)
    assert "### 40% symmetric noise (3 seeds)" in text
    assert "| TL+OPL | 76.0 ± 1.0 | 86.0 ± 1.0 | 86.0 ± 1.0 | 20.0 / 50.0 | 2 |" in text
    assert "| TL+OPL − TL | best noisy-val epoch | +5.0, +5.0, +5.0 | +5.00 [+5.00, +5.00]" in text
    assert "helps" in text
    assert "| CE+OPL − CE | last epoch | +2.0, -2.0, -2.0 |" in text
    assert "no detectable difference" in text
    assert "CPU-minutes" in opl_noise.protocol(runs)
    words = opl_noise.reading(runs)
    assert "- TL+OPL − TL, symmetric: +5.00 [+5.00, +5.00], helps (paper, CIFAR-10: +0.83)" in words
    assert "TL+OPL − TL, symmetric, last epoch: +5.00 [+5.00, +5.00] (helps)" in words
    assert "symmetric: CE 50%, CE+OPL 50%, TL 50%, TL+OPL 50%." in words
