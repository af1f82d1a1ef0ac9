"""Samplers whose order depends only on (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler

__all__ = ["EpochSeededRandomSampler"]


class EpochSeededRandomSampler(RandomSampler):
    """A shuffling sampler whose permutation is a pure function of ``seed + epoch``.

    Lightning calls ``set_epoch`` on every sampler that has it at the start of each epoch, so the
    order of epoch ``e`` is ``torch.randperm(n, generator=Generator().manual_seed(seed + e))``
    whatever happened before: a run resumed from a checkpoint sees exactly the batches of an
    uninterrupted run, and the global RNG state is never touched.

    It subclasses :class:`~torch.utils.data.RandomSampler` so that Lightning still recognises the
    loader as shuffled (under DDP it swaps it for a ``DistributedSampler(shuffle=True)``, which is
    also seeded by epoch, with ``PL_GLOBAL_SEED`` as its seed).

    Args:
        data_source: the data set (anything with ``__len__``).
        seed: base seed of the permutations.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (called by Lightning before each epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(n, generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.data_source)
