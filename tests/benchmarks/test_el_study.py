"""benchmarks/el_study.py: the "fewer iterations" arithmetic and the table (no training)."""

from __future__ import annotations

import math

import pytest

from tests.benchmarks import load_benchmark

el_study = load_benchmark("el_study")


def test_first_reaching_interpolates_in_log_fid():
    history = [(10, 50.0), (20, 10.0), (30, 2.0)]
    assert el_study.first_reaching(history, 10.0) == 20.0
    assert el_study.first_reaching(history, 60.0) == 10.0  # already there at the first checkpoint
    assert el_study.first_reaching(history, 1.0) is None
    # log-linear between (20, 10) and (30, 2): log(10 / 5) / log(10 / 2) of the way
    expected = 20 + 10 * math.log(2.0) / math.log(5.0)
    assert el_study.first_reaching(history, 5.0) == pytest.approx(expected)


def test_main_table_reports_paired_differences_and_crossings():
    def run(values, seconds=10.0):
        history = list(zip((10, 20, 30, 40), values))
        return {"history": history, "fid": values[-1], "seconds": seconds}

    runs = {
        "DMD": {
            "no EL": [run((40.0, 20.0, 10.0, 5.0)), run((40.0, 20.0, 10.0, 4.0))],
            "EL": [run((30.0, 10.0, 5.0, 4.0), 12.0), run((40.0, 20.0, 10.0, 5.0), 12.0)],
        }
    }
    (row,) = el_study.main_table(runs, {"DMD": 40})[2:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "DMD" and cells[1] == "40"
    assert cells[4] == "-1.000, +1.000"
    # seed 0: EL reaches 5.0 at step 30 (75%); seed 1: never reaches 4.0
    assert cells[5] == "75%, not reached"
    # mid-run (step 20) FIDs 20 and 20: EL reaches 20 at log-interpolated 10 + 10*log(1.5)/log(3)
    first = 10 + 10 * math.log(1.5) / math.log(3.0)
    assert cells[6] == f"{first / 40:.0%}, 50%"
    assert cells[7] == "1.20"


def test_compare_gives_the_paired_interval_and_a_verdict_for_fid():
    def run(final, seconds=10.0):
        return {"history": [(5, 8.0), (10, final)], "fid": final, "seconds": seconds}

    results = {
        "none": [run(4.0), run(5.0), run(6.0)],
        "EL": [run(3.0, 20.0), run(3.9, 20.0), run(5.1, 20.0)],  # always lower: helps
        "GAN": [run(4.5), run(4.0), run(6.6)],  # mixed: no detectable difference
    }
    lines = el_study.compare(results, total=10, reference="none")
    el_row = next(line for line in lines if line.startswith("| EL |"))
    gan_row = next(line for line in lines if line.startswith("| GAN |"))
    mean, low, high = el_study.paired_interval([-1.0, -1.1, -0.9])
    assert f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" in el_row
    assert "| helps |" in el_row and "2.00x" in el_row
    assert "no detectable difference" in gan_row
    assert lines[2].startswith("| none |") and "| — | — |" in lines[2]


def test_batch_pairs_compare_each_batch_and_the_smaller_batches_with_the_largest():
    def runs(*finals):
        return [{"history": [(10, f)], "fid": f, "seconds": 1.0} for f in finals]

    results = {
        "no EL, B=16": runs(5.0, 6.0, 7.0),
        "EL, B=16": runs(4.0, 5.2, 5.0),
        "no EL, B=256": runs(3.0, 3.0, 3.5),
        "EL, B=256": runs(3.0, 3.1, 3.4),
    }
    rows = {line.split("|")[1].strip(): line for line in el_study.batch_pairs(results)[2:]}
    assert list(rows) == [
        "EL - no EL at B=16",
        "EL - no EL at B=256",
        "EL at B=16 - no EL at B=256",
    ]
    mean, low, high = el_study.paired_interval([4.0 - 5.0, 5.2 - 6.0, 5.0 - 7.0])
    assert f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" in rows["EL - no EL at B=16"]
    assert "+1.000, +2.200, +1.500" in rows["EL at B=16 - no EL at B=256"]
    assert "| hurts |" in rows["EL at B=16 - no EL at B=256"]
