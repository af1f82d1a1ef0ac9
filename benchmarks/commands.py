"""How long the project's commands take, and how they bear a busy machine.

    python benchmarks/commands.py threads            # one OPL demo run: threads x busy core
    python benchmarks/commands.py threads --repeats 1 --no-write

``threads``: the unit of the demo's OPL part (``configs/opl/digits.yaml``, seed 0, clean labels,
CE + OPL, 30 epochs: one of its 12 runs), each time in a fresh process, with 1 and with 2 torch
threads, on its own and while another process keeps one core busy (``python -c 'while 1:
pass'``). The conditions are interleaved within each repeat; the table gives the median wall time
of each and the ratio busy / on its own. The result goes into docs/RESULTS.md under
``## Commands: the demo's torch threads on a busy core`` (``--no-write``: print only).
On a machine shared with other jobs "on its own" is not quiet: the load averages are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

TITLE = "## Commands: the demo's torch threads on a busy core"
#: One run of the demo's OPL part, timed inside the child (imports excluded).
RUN = """
import json, logging, sys, time, warnings
import torch, yaml
torch.set_num_threads(int(sys.argv[1]))
for name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore")
from lightning_losses.demo import opl
base = yaml.safe_load(opl.CONFIG.read_text())
start = time.perf_counter()
outcome = opl._run_config(base, seed=0, opl_weight=1.0, noise=0.0)
print(json.dumps({"seconds": time.perf_counter() - start, "acc": outcome["acc"]}))
"""


def one_run(threads: int, busy: bool) -> dict[str, float]:
    """Wall time of one OPL run in a fresh process (with a busy-loop process beside it)."""
    import json

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    spinner = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if busy else None
    try:
        load = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, "-c", RUN, str(threads)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "load": load}


def threads_table(repeats: int, thread_counts: list[int]) -> str:
    conditions = [(t, busy) for t in thread_counts for busy in (False, True)]
    runs: dict[tuple[int, bool], list[dict[str, float]]] = {c: [] for c in conditions}
    for repeat in range(repeats):
        for condition in conditions if repeat % 2 == 0 else conditions[::-1]:
            runs[condition].append(one_run(*condition))
            r = runs[condition][-1]
            print(f"threads {condition[0]} busy={condition[1]}: {r['seconds']:.1f} s "
                  f"(load {r['load']:.1f})", flush=True)  # fmt: skip
    rows = []
    for threads in thread_counts:
        alone = statistics.median(r["seconds"] for r in runs[threads, False])
        busy = statistics.median(r["seconds"] for r in runs[threads, True])
        loads = [r["load"] for c in ((threads, False), (threads, True)) for r in runs[c]]
        accs = sorted({round(r["acc"], 4) for c in runs if c[0] == threads for r in runs[c]})
        rows.append([threads, f"{alone:.1f} s", f"{busy:.1f} s", f"{busy / alone:.2f}x",
                     f"{min(loads):.1f}-{max(loads):.1f}", ", ".join(map(str, accs))])  # fmt: skip
    headers = ["torch threads", "on its own", "one core busy", "busy / own",
               "1-min load before runs", "test acc"]  # fmt: skip
    note = (
        f"One OPL demo run (`configs/opl/digits.yaml`, seed 0, clean, CE + OPL, 30 epochs), "
        f"a fresh process each time, median of {repeats}, conditions interleaved; the busy core "
        "is `python -c 'while 1: pass'`. The test accuracy differs between thread counts "
        "(the order of floating-point sums), not between runs of one count.\n\n"
    )
    return note + harness.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["threads"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(t < 1 for t in args.threads):
        parser.error("--repeats and --threads must be >= 1")
    start = time.perf_counter()
    body = threads_table(args.repeats, args.threads)
    body += f"\n_{time.perf_counter() - start:.0f} s in all._\n"
    command = ["python", "benchmarks/commands.py", *(argv if argv is not None else sys.argv[1:])]
    if args.no_write:
        text = harness.section(TITLE, body, command)
        print(text)
        return text
    return harness.publish(TITLE, body, command=command)


if __name__ == "__main__":
    main()
