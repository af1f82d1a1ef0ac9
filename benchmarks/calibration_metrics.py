"""Speed and memory of our CalibrationError against torchmetrics' MulticlassCalibrationError.

Both metrics receive the SAME float32 probability chunks (generated chunk by chunk, so N x C never
sits in memory), in batches of ``--batch`` rows; the order in which the metrics see a chunk
rotates, so neither always reads a cache-warm chunk. Timed: ``update()`` calls and the final
``compute()``, nothing else (generation is excluded).

Memory: the bytes of each metric's state after all updates (sum over its registered states of
numel x element size), and, unless ``--no-rss``, the peak RSS of a child process that generates
the same chunks and updates only that metric (plus a child that only generates, as the baseline).

Prints a markdown table (command, date, machine). Full run:
``python benchmarks/calibration_metrics.py``; smoke test: ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
import torchmetrics
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError

from lightning_losses.metrics import CalibrationError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import PeakRSS, header, markdown_table, status_kib  # noqa: E402

OURS = "ours: CalibrationError"
THEIRS = "torchmetrics: MulticlassCalibrationError"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of samples N")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes C")
    parser.add_argument("--batch", type=int, default=10_000, help="rows per update()")
    parser.add_argument("--n-bins", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--quick", action="store_true", help="N=20k, C=100, batch 2k")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--child", choices=["none", "ours", "torchmetrics"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.classes, args.batch = 20_000, 100, 2_000
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def chunks(args: argparse.Namespace) -> Iterator[tuple[Tensor, Tensor]]:
    """Float32 softmax probabilities with a per-row temperature; labels = argmax 70% of the time."""
    g = torch.Generator().manual_seed(args.seed)
    for start in range(0, args.n, args.batch):
        rows = min(args.batch, args.n - start)
        scale = 1.0 + 7.0 * torch.rand(rows, 1, generator=g)
        probs = (scale * torch.randn(rows, args.classes, generator=g)).softmax(dim=1)
        agree = torch.rand(rows, generator=g) < 0.7
        random_labels = torch.randint(0, args.classes, (rows,), generator=g)
        yield probs, torch.where(agree, probs.argmax(dim=1), random_labels)


def make_metrics(args: argparse.Namespace) -> dict[str, Metric]:
    return {
        OURS: CalibrationError(n_bins=args.n_bins),
        THEIRS: MulticlassCalibrationError(num_classes=args.classes, n_bins=args.n_bins),
        OURS + " (validate_args=False)": CalibrationError(n_bins=args.n_bins, validate_args=False),
        THEIRS + " (validate_args=False)": MulticlassCalibrationError(
            num_classes=args.classes, n_bins=args.n_bins, validate_args=False
        ),
    }


def state_bytes(metric: Metric) -> int:
    """Bytes held by a metric's registered states (tensors and lists of tensors)."""
    total = 0
    for name in metric._defaults:  # the registered state names (torchmetrics keeps no public list)
        value = getattr(metric, name)
        for t in value if isinstance(value, list) else [value]:
            total += t.numel() * t.element_size()
    return total


def run_child(args: argparse.Namespace) -> None:
    """Generate the chunks, update one metric (or none), report the peak RSS of that loop.

    The imports (torch, torchmetrics, matplotlib via torchmetrics) peak above the loop, so the
    peak mark is reset after them (:class:`harness.PeakRSS`): what is reported is the peak RSS
    during updates + compute.
    """
    metric = None
    if args.child != "none":
        metric = make_metrics(args)[OURS if args.child == "ours" else THEIRS]
    before = status_kib("VmRSS") / 1024
    with PeakRSS() as peak:
        for probs, labels in chunks(args):
            if metric is not None:
                metric.update(probs, labels)
            del probs, labels
        value = float(metric.compute()) if metric is not None else float("nan")
    growth = peak.bytes / 2**20
    record = {"before_mib": before, "peak_mib": before + growth, "method": peak.method}
    print(json.dumps({**record, "value": value}))


def child_rss(kind: str) -> dict[str, float]:
    argv = [a for a in sys.argv[1:] if a != "--no-rss"]
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", kind]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def fmt_bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    metrics = make_metrics(args)
    names = list(metrics)
    update_s = dict.fromkeys(names, 0.0)
    for i, (probs, labels) in enumerate(chunks(args)):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            metrics[name].update(probs, labels)
            update_s[name] += time.perf_counter() - t0
    compute_s, values = {}, {}
    for name in names:
        t0 = time.perf_counter()
        values[name] = float(metrics[name].compute())
        compute_s[name] = time.perf_counter() - t0
    rss = {}
    if not args.no_rss:
        rss["none"] = child_rss("none")
        rss[OURS] = child_rss("ours")
        rss[THEIRS] = child_rss("torchmetrics")

    base = update_s[OURS] + compute_s[OURS]
    print(header(["python", *sys.argv]))
    print(
        f"Data: N = {args.n:,} float32 softmax rows, C = {args.classes}, {args.n_bins} bins, "
        f"update() in batches of {args.batch:,}, the same chunks fed to every metric "
        f"(torchmetrics {torchmetrics.__version__}).\n"
    )
    headers = [
        "metric",
        "update total (s)",
        "compute (s)",
        "total (s)",
        "time / ours",
        "state after all updates",
        "peak RSS in the loop, child (MiB)",
        "ECE",
    ]
    rows = []
    for name in names:
        total = update_s[name] + compute_s[name]
        peak = "-"
        if name in rss:
            grown = rss[name]["peak_mib"] - rss[name]["before_mib"]
            peak = f"{rss[name]['peak_mib']:.0f} (+{grown:.0f} over start)"
        rows.append(
            [
                name,
                f"{update_s[name]:.2f}",
                f"{compute_s[name]:.4f}",
                f"{total:.2f}",
                f"{total / base:.2f}x",
                fmt_bytes(state_bytes(metrics[name])),
                peak,
                f"{values[name]:.6f}",
            ]
        )
    print(markdown_table(headers, rows), end="")
    if rss:
        none = rss["none"]
        how = f"{none['method']}, after the imports"
        print(
            f"\nPeak RSS ({how}) of a child that generates the same chunks and updates no metric: "
            f"{none['peak_mib']:.0f} MiB (+{none['peak_mib'] - none['before_mib']:.0f} over "
            f"its {none['before_mib']:.0f} MiB after imports)."
        )


if __name__ == "__main__":
    main()
