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


def _write_part(folder, seeds, runs):
    import json

    folder.mkdir()
    saved = {"seeds": seeds, "samples": 100, "DMD": {"steps": 10, "runs": runs, "variances": {}}}
    (folder / "batch.json").write_text(json.dumps(saved))


def test_merge_pairs_runs_split_by_arm_and_seed_by_their_seeds(tmp_path):
    def run(seed, fid, tagged=True):
        return {
            "history": [(10, fid)],
            "fid": fid,
            "seconds": 1.0,
            **({"seed": seed} if tagged else {}),
        }

    # one folder per (arms, seed), given in an order that is not the seeds' order
    _write_part(tmp_path / "a1", [1], {"no EL, B=16": [run(1, 5.0)], "EL, B=16": [run(1, 4.0)]})
    _write_part(tmp_path / "b0", [0], {"no EL, B=256": [run(0, 3.0)]})
    _write_part(tmp_path / "a0", [0], {"no EL, B=16": [run(0, 6.0, tagged=False)],
                                        "EL, B=16": [run(0, 5.5, tagged=False)]})  # fmt: skip
    _write_part(tmp_path / "b1", [1], {"no EL, B=256": [run(1, 2.0)]})
    folders = [tmp_path / name for name in ("a1", "b0", "a0", "b1")]
    merged = el_study.merge_parts("batch", folders)
    assert merged["seeds"] == [0, 1]
    runs = merged["DMD"]["runs"]
    assert [r["fid"] for r in runs["no EL, B=16"]] == [6.0, 5.0]  # seed 0 first
    assert [r["seed"] for r in runs["EL, B=16"]] == [0, 1]  # untagged rows: the folder's seeds
    assert [r["fid"] for r in runs["no EL, B=256"]] == [3.0, 2.0]
    rows = {line.split("|")[1].strip(): line for line in el_study.batch_pairs(runs)[2:]}
    assert "+2.500, +2.000" in rows["EL at B=16 - no EL at B=256"]  # 5.5 - 3.0, 4.0 - 2.0


def test_merge_refuses_an_arm_that_misses_a_seed(tmp_path):
    run = {"history": [(10, 1.0)], "fid": 1.0, "seconds": 1.0}
    _write_part(tmp_path / "s0", [0], {"no EL, B=16": [run], "EL, B=16": [run]})
    _write_part(tmp_path / "s1", [1], {"no EL, B=16": [run]})
    with pytest.raises(ValueError, match=r"EL, B=16 ran seeds \[0\], not each of \[0, 1\]"):
        el_study.merge_parts("batch", [tmp_path / "s0", tmp_path / "s1"])


def test_arms_must_name_arms_of_the_part(tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match=r"--arms: \['EL, B=32'\] are not arms"):
            el_study.main(["--part", "batch", "--arms", "EL, B=32", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
