"""Run every demo part and write the report: ``python -m lightning_losses.demo --out runs/demo``."""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

from lightning_losses.demo import calibration, distillation, opl, torch_threads

PARTS = {"opl": opl.run, "calibration": calibration.run, "distillation": distillation.run}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--quick", action="store_true", help="a smoke run in well under a minute")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the demo's models are tiny, and one thread is as fast "
        "as more on an idle machine and much faster on a busy one)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads: {args.threads} (--threads N to change)")
    sections = ["# lightning-losses demo report", ""]
    with torch_threads(args.threads):
        for name in args.parts:
            start = time.perf_counter()
            sections.append(PARTS[name](args.out, quick=args.quick))
            sections.append(f"_{name} part: {time.perf_counter() - start:.0f} s._\n")
    sections.append(f"_torch threads: {args.threads}._\n")
    report = args.out / "report.md"
    report.write_text("\n".join(sections))
    print(f"\nreport written to {report}")
    return report


if __name__ == "__main__":
    main()
