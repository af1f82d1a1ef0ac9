"""benchmarks/opl.py on tiny cases: the forms agree, the tables and goal lines are built."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("opl")
    sys.modules.pop("bench_opl", None)


def test_loss_forms_agree(bench):
    features, labels = bench.make_inputs(64, 8)
    values = [float(bench.call(name, features, labels)) for name in ("closed", "autograd", "gram")]
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    assert values[0] == pytest.approx(values[2], abs=1e-6)
    bench.call("closed", features, labels)
    closed = features.grad.clone()
    bench.call("gram", features, labels)
    torch.testing.assert_close(closed, features.grad, rtol=1e-4, atol=1e-7)


def test_time_and_memory_case_and_report(bench, tmp_path):
    timing = bench.time_case(32, 4, list(bench.FORMS), reps=2, gram_budget_s=0.0)
    assert set(timing) == set(bench.FORMS)
    assert timing["gram"]["reps"] == 1 and timing["closed"]["reps"] == 2
    for stats in timing.values():
        assert 0 < stats["min_s"] <= stats["median_s"]
        assert 0 <= stats["cpu_min_s"] <= stats["cpu_median_s"]
    memory = bench.memory_case("closed", 32, 4, repeats=1)
    assert memory["peak_mib"] >= 0 and memory["repeats"] == 1
    rows = [{"B": 8192, "D": 512, "time": timing, "memory": {"closed": memory}}]
    table = bench.loss_table(rows)
    assert table.count("\n") == 3 and "| 8192 | 512 |" in table
    goals = bench.goal_lines(rows)
    assert len(goals) == 3 and all(("met" in line) for line in goals)
    assert "wall-clock" in goals[1] and "CPU time" in goals[1]
    # Every column has a header and a cell: as many separators in each line.
    lines = table.splitlines()
    assert len({line.count("|") for line in lines}) == 1
    assert lines[0].count("|") == len(bench.LOSS_COLUMNS) + 1


def test_kept_step_subsection(bench, tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text(
        f"# R\n\n{bench.TITLE}\n\nold\n\n{bench.STEP_HEADING}\n\n| t |\n\nWhole run: 3 min.\n\n"
        "## Next\n\nother\n"
    )
    kept = bench.kept_step_subsection(doc)
    assert kept.startswith(bench.STEP_HEADING) and "| t |" in kept
    assert "Whole run" not in kept and "other" not in kept
    # Kept twice: still one note.
    doc.write_text(f"{bench.TITLE}\n\n{kept}\n")
    again = bench.kept_step_subsection(doc)
    assert again.count(bench.KEPT_NOTE) == 1
    # Kept again and again: the same text, no blank line added per run.
    doc.write_text(f"{bench.TITLE}\n\n{again}\n\nWhole run: 1 min.\n")
    assert bench.kept_step_subsection(doc) == again
    assert bench.kept_step_subsection(tmp_path / "missing.md") is None
