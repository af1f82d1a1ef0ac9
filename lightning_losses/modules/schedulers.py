"""Learning-rate schedules that the paper recipes need and torch does not ship in one piece."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupMultiStepLR(LambdaLR):
    """Linear warm-up, then step decay: the OPL authors' CIFAR schedule.

    The factor applied to each base learning rate at step (or epoch) ``t`` is

    .. math::

        w + (1 - w)\\,\\frac{t}{T_w} \\quad (t < T_w), \\qquad
        \\gamma^{\\,|\\{m \\in \\text{milestones} : m \\le t\\}|} \\quad (t \\ge T_w),

    with ``w = warmup_factor`` and ``T_w = warmup``. Stepped once per epoch by default, so
    ``warmup=1`` runs the first epoch at ``warmup_factor`` times the base rate.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int] = (60, 120, 160),
        gamma: float = 0.2,
        warmup: int = 1,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing, got {list(milestones)}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if not 0.0 < warmup_factor <= 1.0:
            raise ValueError(f"warmup_factor must be in (0, 1], got {warmup_factor}")
        self.milestones = list(milestones)
        self.decay = gamma
        self.warmup = warmup
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, self.factor, last_epoch)

    def factor(self, t: int) -> float:
        if t < self.warmup:
            return self.warmup_factor + (1.0 - self.warmup_factor) * t / self.warmup
        return self.decay ** sum(m <= t for m in self.milestones)


def optimizer_config(
    optimizer: Optimizer, lr_scheduler: Callable[[Optimizer], Any] | None, interval: str
) -> Optimizer | dict[str, Any]:
    """What ``configure_optimizers`` returns for one optimizer: the optimizer alone when
    ``lr_scheduler`` is None, else Lightning's dict with the scheduler
    ``lr_scheduler(optimizer)`` stepped every ``interval`` (``"epoch"`` or ``"step"``)."""
    if lr_scheduler is None:
        return optimizer
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": lr_scheduler(optimizer), "interval": interval},
    }
