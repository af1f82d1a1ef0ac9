"""Run every demo part and write the report: ``python -m lightning_losses.demo --out runs/demo``."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from types import ModuleType

from lightning_losses.demo import calibration, distillation, opl, quiet_lightning, run_tasks

PARTS: dict[str, ModuleType] = {
    "opl": opl,
    "calibration": calibration,
    "distillation": distillation,
}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m lightning_losses.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--quick", action="store_true", help="a smoke run in about a minute")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(4, _cores()),
        help="worker processes, one run each at a time (default: the cores, at most 4; 1: "
        "everything in this process, in order); the results do not depend on it",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (default 1: the demo's models are tiny, and one "
        "thread is as fast as more on an idle core and much faster on a busy one)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1 or args.jobs < 1:
        parser.error(f"--threads and --jobs must be >= 1, got {args.threads} and {args.jobs}")
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)
    setting = (
        f"{args.jobs} worker process{'es' if args.jobs > 1 else ''}, "
        f"{args.threads} torch thread{'s' if args.threads > 1 else ''} each"
    )
    print(f"demo: {setting} (--jobs, --threads to change)", flush=True)
    start = time.perf_counter()
    tasks = [task for name in args.parts for task in PARTS[name].tasks(args.out, args.quick)]
    results = run_tasks(tasks, jobs=args.jobs, threads=args.threads)
    sections = ["# lightning-losses demo report", ""]
    for name in args.parts:
        done = {key: value for (part, key), value in results.items() if part == name}
        sections.append(PARTS[name].report({k: v[0] for k, v in done.items()}, args.out,
                                           args.quick))  # fmt: skip
        work = sum(seconds for _, seconds in done.values())
        sections.append(f"_{name} part: {len(done)} runs, {work:.0f} s of work._\n")
    wall = time.perf_counter() - start
    sections.append(f"_Wall time {wall:.0f} s with {setting}._\n")
    report = args.out / "report.md"
    report.write_text("\n".join(sections))
    print(f"\nreport written to {report} ({wall:.0f} s)")
    return report


if __name__ == "__main__":
    main()
