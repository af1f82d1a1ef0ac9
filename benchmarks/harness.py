"""One shared harness for the benchmarks: machine description, peak RSS, one output convention.

Output convention: a benchmark builds a markdown section (a ``## <title>`` heading, a header with
the exact command, the UTC date and :func:`machine`, then its tables), prints it, and writes it
into docs/RESULTS.md with :func:`replace_section`, which replaces only that ``## `` section and
keeps every other byte of the file.

Peak RSS: :class:`PeakRSS` reads the kernel's high-water mark ``VmHWM`` of this process after
resetting it to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0). ``getrusage``'s
``ru_maxrss`` is a lifetime maximum (in a child started by fork it can include the parent's), so it
is only the fallback, and the method used is reported. :func:`child_peak_rss` runs a command and
returns the peak RSS of that child alone (``RUSAGE_CHILDREN`` of a fresh process that waits on it).
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "RESULTS.md"
#: ``lightning.Trainer`` settings of the benchmarks' in-process runs: one CPU process that
#: writes and prints nothing (no logger, checkpoint, progress bar, model summary or sanity
#: validation). Override a key by passing it after: ``{**QUIET_TRAINER, "logger": logger}``.
QUIET_TRAINER: dict[str, object] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


def status_kib(field: str, pid: str = "self") -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/{pid}/status")


def machine() -> str:
    """CPU model, cores, RAM, torch version and threads, load average, Python: one line."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{os.cpu_count()}-core CPU ({cpu})"]
    try:
        with open("/proc/meminfo") as meminfo:
            parts.append(f"{int(meminfo.readline().split()[1]) / 2**20:.0f} GiB RAM")
    except (OSError, ValueError, IndexError):
        pass
    try:
        load = os.getloadavg()
        parts.append("load average " + " / ".join(f"{x:.2f}" for x in load) + " (1/5/15 min)")
    except OSError:
        pass
    if "torch" in sys.modules:  # describe torch only if the benchmark uses it (no import cost)
        torch = sys.modules["torch"]
        parts.append(
            f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}"
        )
    parts.append(f"Python {platform.python_version()}")
    return ", ".join(parts)


class PeakRSS:
    """Peak RSS growth of this process over a block: ``with PeakRSS() as p: ...; p.bytes``.

    Growth = VmHWM after the block minus VmRSS before it, with VmHWM reset at entry; where the
    reset is not available the baseline is the old VmHWM (so only growth above the old peak
    shows) and :attr:`method` says so.
    """

    def __init__(self) -> None:
        self.method = "VmHWM reset via /proc/self/clear_refs"
        self.bytes = 0
        self._base_kib = 0

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._base_kib = status_kib("VmRSS")
            if status_kib("VmHWM") > self._base_kib + 64:  # reset did not take
                raise OSError
        except OSError:
            try:
                self._base_kib = status_kib("VmHWM")
                self.method = "no reset (VmHWM not resettable): growth above the earlier peak"
            except OSError:
                self._base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self.method = "lifetime ru_maxrss (no /proc): growth above the earlier peak"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("lifetime"):
            now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        else:
            now = status_kib("VmHWM")
        self.bytes = max(0, now - self._base_kib) * 1024


def child_peak_rss(argv: list[str], **kwargs: object) -> tuple[int, int]:
    """Run ``argv`` and return ``(returncode, peak RSS of that child in bytes)``.

    A small Python waiter process spawns the command, so ``RUSAGE_CHILDREN`` counts only it.
    """
    waiter = (
        "import resource, subprocess, sys;"
        "rc = subprocess.call(sys.argv[1:]);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", waiter, *argv], capture_output=True, text=True, check=True, **kwargs
    )
    kib, rc = out.stdout.split()[-2:]
    return int(rc), int(kib) * 1024


def header(command: list[str] | None = None) -> str:
    """Command, UTC date, machine: the lines every section starts with."""
    argv = sys.argv if command is None else command
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Command: `{shlex.join(argv)}`  \nDate: {date}  \nMachine: {machine()}\n"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table (``|`` in cells escaped)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def section(title: str, body: str, command: list[str] | None = None) -> str:
    """``## title``, the header, then ``body``."""
    if not title.startswith("## "):
        raise ValueError(f"title must start with '## ', got {title!r}")
    return f"{title}\n\n{header(command)}\n{body.rstrip()}\n"


def replace_section(path: Path, text: str) -> None:
    """Write section ``text`` (starting with its ``## `` heading) into ``path``: replace the
    section with the same heading, up to the next ``## `` line, or append it; every other byte
    of the file is kept."""
    heading = text.splitlines()[0]
    if not heading.startswith("## "):
        raise ValueError(f"text must start with a '## ' heading, got {heading!r}")
    old = path.read_text() if path.exists() else ""
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    block = text if text.endswith("\n") else text + "\n"
    if start is None:
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        path.write_text(old + sep + block)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    if end < len(lines):
        block += "\n"
    path.write_text("".join(lines[:start]) + block + "".join(lines[end:]))


def publish(title: str, body: str, path: Path = RESULTS, command: list[str] | None = None) -> str:
    """Print the section and write it into ``path`` (docs/RESULTS.md by default)."""
    text = section(title, body, command)
    print(text)
    replace_section(path, text)
    return text


def paired_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided Student-t interval ``(mean, low, high)``
    (scipy's t quantile; scikit-learn, which the digits data needs, brings scipy)."""
    import math
    import statistics

    from scipy.stats import t

    n = len(diffs)
    if n < 2:
        raise ValueError(f"a t-interval needs at least 2 paired differences, got {n}")
    mean = statistics.fmean(diffs)
    half = float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, lower_is_better: bool = False) -> str:
    """``"helps"`` / ``"hurts"`` when the interval of (variant - reference) excludes 0, else
    ``"no detectable difference"``; ``lower_is_better`` for metrics such as FID or ECE."""
    if low > 0 or high < 0:
        better = (high < 0) == lower_is_better
        return "helps" if better else "hurts"
    return "no detectable difference"
