"""Torch-only test helpers: no Lightning import.

Kept free of Lightning so that a test whose processes need only torch does not import it
(:mod:`fakes` imports Lightning: several seconds on a small CPU).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import Tensor


def clustered_features(
    num_per_class: int, num_classes: int, dim: int, spread: float = 0.5, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Gaussian clusters around random class centres, float64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    noise = spread * torch.randn(labels.shape[0], dim, generator=g, dtype=torch.float64)
    return centres[labels] + noise, labels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_child(rank: int, function: Callable, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = function(rank)
        # Both ranks finish every collective before either tears gloo down: a rank that
        # destroys the group while the other still talks to it can abort in gloo's threads.
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
    torch.save(result, Path(out) / f"{rank}.pt")


def run_gloo(function: Callable[[int], Any], world_size: int = 2) -> list[Any]:
    """``function(rank)`` in ``world_size`` forked processes joined in one gloo group.

    ``function`` runs in forked children (they inherit this process's imports); it returns
    tensors and plain containers (saved with ``torch.save``, read back with
    ``weights_only=True``). Returns the ranks' results, rank 0 first.
    """
    with tempfile.TemporaryDirectory(prefix="gloo_") as out:
        args = (function, world_size, _free_port(), out)
        mp.start_processes(_gloo_child, args=args, nprocs=world_size, start_method="fork")
        return [torch.load(Path(out) / f"{r}.pt", weights_only=True) for r in range(world_size)]
