"""The demo's task runner: the same results in one process and in a pool, order constraints kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_losses.demo import Task, part_results, run_tasks, torch_threads


def _write(path: str, text: str) -> str:
    Path(path).write_text(text)
    return text


def _read_and_threads(path: str) -> tuple[str, int]:
    return Path(path).read_text(), torch.get_num_threads()


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _tasks(tmp_path: Path) -> list[Task]:
    path = str(tmp_path / "first.txt")
    return [
        Task("a", "first", _write, {"path": path, "text": "written"}, cost=0.1),
        # most costly, but waits for "first": it must see the file
        Task("a", "second", _read_and_threads, {"path": path}, cost=10.0, after="first"),
        Task("b", "first", dict, {"x": 1}, cost=5.0),  # same key, another part
    ]


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_tasks_results_and_dependencies(tmp_path, jobs):
    results = run_tasks(_tasks(tmp_path), jobs=jobs, threads=1)
    assert set(results) == {("a", "first"), ("a", "second"), ("b", "first")}
    assert part_results(results, "a") == {"first": "written", "second": ("written", 1)}
    assert part_results(results, "b") == {"first": {"x": 1}}
    assert all(seconds >= 0 for _, seconds in results.values())


def test_run_tasks_raises_a_tasks_error_from_a_worker(tmp_path):
    tasks = [Task("a", "ok", dict, {}), Task("a", "bad", _fail, {"message": "boom"})]
    with pytest.raises(RuntimeError, match="boom"):
        run_tasks(tasks, jobs=2)


def test_run_tasks_rejects_bad_task_lists(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_tasks([Task("a", "x", dict), Task("a", "x", dict)])
    with pytest.raises(ValueError, match="unknown 'nope'"):
        run_tasks([Task("a", "x", dict, after="nope")])
    first, second, _ = _tasks(tmp_path)
    with pytest.raises(ValueError, match="listed before 'first'"):
        run_tasks([second, first], jobs=1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs must be a positive int"):
            run_tasks([], jobs=bad)
        with pytest.raises(ValueError, match="threads must be a positive int"):
            run_tasks([], threads=bad)


def test_torch_threads_restores_the_count():
    before = torch.get_num_threads()
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"), torch_threads(0):
        pass
