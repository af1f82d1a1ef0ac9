"""``make demo``: every paper's main experiment on bundled data, one markdown report.

Each part is a module with ``run(out_dir, quick) -> str`` returning its report section;
``python -m lightning_losses.demo`` runs them in order and writes ``<out>/report.md``. The
configs come from the installed package (:func:`lightning_losses.cli.packaged_config`), so the
demo runs from any folder after ``pip install``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, then restore the old count.

    The demo's models are tiny (an 8x8 CNN, an 8x8 UNet): one thread per process is as fast as
    several on an idle machine and many times faster when other jobs share the cores (each extra
    thread waits for the slowest core at every parallel region).
    """
    import torch

    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
