"""benchmarks/commands.py: the table's arithmetic, with the runs faked (no training here)."""

from __future__ import annotations

import pytest

from tests.benchmarks import load_benchmark

commands = load_benchmark("commands")


def test_threads_table_medians_and_ratios(monkeypatch):
    seconds = {(1, False): [10.0, 12.0, 11.0], (1, True): [13.0, 11.0, 12.0],
               (2, False): [8.0, 8.0, 9.0], (2, True): [40.0, 30.0, 35.0]}  # fmt: skip
    calls = []

    def fake_run(threads, busy):
        calls.append((threads, busy))
        value = seconds[threads, busy][sum(c == (threads, busy) for c in calls) - 1]
        return {"seconds": value, "acc": 0.99 if threads == 1 else 0.98, "load": 0.5}

    monkeypatch.setattr(commands, "one_run", fake_run)
    table = commands.threads_table(3, [1, 2])
    assert len(calls) == 12
    assert calls[:4] == [(1, False), (1, True), (2, False), (2, True)]
    assert calls[4:8] == [(2, True), (2, False), (1, True), (1, False)]  # interleaved
    assert "| 1 | 11.0 s | 12.0 s | 1.09x | 0.5-0.5 | 0.99 |" in table
    assert "| 2 | 8.0 s | 35.0 s | 4.38x | 0.5-0.5 | 0.98 |" in table


def test_main_rejects_bad_counts():
    for argv in (["threads", "--repeats", "0"], ["threads", "--threads", "0"]):
        with pytest.raises(SystemExit):
            commands.main(argv)
