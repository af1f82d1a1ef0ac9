"""``make demo``: every paper's main experiment on bundled data, one markdown report.

Each part (``opl``, ``calibration``, ``distillation``) is a module with

- ``tasks(out_dir, quick) -> list[Task]``: its independent runs (one config each), and
- ``report(results, out_dir, quick) -> str``: its JSON, figures and markdown section from the
  runs' results (``{task.key: result}``),

and ``run(out_dir, quick) -> str``, the two in one process. ``python -m lightning_losses.demo``
runs the tasks of every part in a pool of worker processes, one torch thread each (the models
are tiny: one thread per process and one process per core is the fastest use of a small CPU),
longest first, and writes ``<out>/report.md``. Every run seeds itself, so the results do not
depend on the number of workers or on the order. The configs come from the installed package
(:func:`lightning_losses.cli.packaged_config`): the demo runs from any folder after ``pip install``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    """One run of a demo part: ``function(**kwargs)`` in some worker process.

    Attributes:
        part: the part's name ("opl", "calibration", "distillation").
        key: unique within the part; ``report`` finds the result under it.
        function: a module-level function (worker processes import it by name).
        kwargs: picklable arguments.
        cost: expected seconds on one quiet core (longest tasks start first).
        after: the key of a task of the same part that must finish before this one starts.
    """

    part: str
    key: str
    function: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0
    after: str | None = None


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore the old count.

    The demo's models are tiny (an 8x8 CNN, an 8x8 UNet): one thread per process is as fast as
    several on an idle machine and many times faster when other jobs share the cores (each extra
    thread waits for the slowest core at every parallel region).
    """
    import torch

    check_positive(threads, "threads")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_positive(value: object, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def quiet_lightning() -> None:
    """Lightning's INFO lines and warnings off (the demo prints its own progress)."""
    import lightning  # noqa: F401  (its import sets its loggers' levels: set ours after)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    quiet_lightning()


def _timed(function: Callable[..., Any], kwargs: dict[str, Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function(**kwargs)
    return result, time.perf_counter() - start


def run_tasks(tasks: list[Task], jobs: int = 1, threads: int = 1) -> dict[tuple[str, str], Any]:
    """Run ``tasks``; return ``{(part, key): (result, seconds)}``.

    ``jobs=1``: in this process, in the list's order (each ``after`` must come earlier in the
    list). ``jobs > 1``: that many worker processes (spawned, ``threads`` torch threads each);
    at most ``jobs`` tasks are handed out at a time, the most costly ready one first. A task's
    exception is raised here.
    """
    check_positive(jobs, "jobs")
    check_positive(threads, "threads")
    ids = [(t.part, t.key) for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task (part, key) pairs must be unique, got {ids}")
    for task in tasks:
        if task.after is not None and (task.part, task.after) not in ids:
            raise ValueError(f"task {task.part}/{task.key} runs after an unknown {task.after!r}")
    results: dict[tuple[str, str], Any] = {}
    if jobs == 1:
        with torch_threads(threads):
            for task in tasks:
                if task.after is not None and (task.part, task.after) not in results:
                    raise ValueError(f"{task.part}/{task.key} is listed before {task.after!r}")
                results[task.part, task.key] = _timed(task.function, task.kwargs)
        return results
    pending = sorted(tasks, key=lambda t: -t.cost)
    running: dict[Future, Task] = {}
    context = get_context("spawn")  # no forked copies of a parent's torch threads or locks
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:  # fmt: skip
        while pending or running:
            ready = [t for t in pending if t.after is None or (t.part, t.after) in results]
            for task in ready[: jobs - len(running)]:
                pending.remove(task)
                running[pool.submit(_timed, task.function, task.kwargs)] = task
            if not running:
                raise RuntimeError(f"tasks wait on each other: {[t.key for t in pending]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                results[task.part, task.key] = future.result()
    return results


def part_results(results: dict[tuple[str, str], Any], part: str) -> dict[str, Any]:
    """``{key: result}`` of one part (the seconds dropped)."""
    return {key: value[0] for (p, key), value in results.items() if p == part}


def save_figure(fig: Any, path: str | Path, dpi: int) -> None:
    """Lay out a pyplot figure (``tight_layout``), write it to ``path`` at ``dpi`` and close it
    (pyplot keeps a figure alive until it is closed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
