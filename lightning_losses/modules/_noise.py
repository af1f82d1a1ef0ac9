"""The seeded noise generator of the distillation modules (a LightningModule mixin)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class SeededNoise:
    """A ``torch.Generator`` of the module, on its device, for every random draw of a step.

    Seeded at the start of fit (:meth:`seed_noise`) from ``torch.initial_seed()`` (what
    ``seed_everything`` sets), the global rank and :meth:`step_counters`: every rank draws
    different samples, and a resumed run does not replay its first steps' noise.
    """

    _rng: torch.Generator | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_rng"] = None  # re-seeded at the start of fit, per process
        return state

    def step_counters(self) -> tuple[int, ...]:
        """The counters that enter the default seed."""
        raise NotImplementedError

    def seed_noise(self, seed: int | None = None) -> None:
        """(Re)seed the module's noise generator on its device; default seed: a function of
        ``torch.initial_seed()``, the global rank and the step counters."""
        if seed is None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            seed = hash((torch.initial_seed(), rank, *self.step_counters())) % 2**63
        self._rng = torch.Generator(device=self.device).manual_seed(int(seed))

    def noise_generator(self) -> torch.Generator:
        """The module's ``torch.Generator`` (seeded on first use, or again after a move)."""
        if self._rng is None or self._rng.device != self.device:
            self.seed_noise()
        return self._rng

    def randn(self, *shape: int) -> Tensor:
        """Standard normal float32 noise from the module's generator, on its device."""
        return torch.randn(shape, generator=self.noise_generator(), device=self.device)

    def randint(self, low: int, high: int, n: int) -> Tensor:
        """``n`` integers uniform in ``[low, high)`` from the module's generator."""
        return torch.randint(low, high, (n,), generator=self.noise_generator(), device=self.device)
