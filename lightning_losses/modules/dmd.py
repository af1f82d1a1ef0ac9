"""Distribution Matching Distillation as in DMD2 (Yin et al. 2024), a score distillation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_losses.checks import check_positive_int
from lightning_losses.diffusion import karras_sigmas
from lightning_losses.losses.distillation import dmd_loss
from lightning_losses.modules.score_distillation import ScoreDistillation

__all__ = ["DMDDistillation"]


class DMDDistillation(ScoreDistillation):
    """DMD2 one-step distillation (its GAN head is a supplementary loss, not built in).

    Noise levels come from a Karras table of ``num_sigmas`` levels, ASCENDING (index 0 =
    ``sigma_min``, as DMD2 indexes it), clamped to the teacher's ``[sigma_min, sigma_max]``.
    The generator loss (:func:`~lightning_losses.losses.dmd_loss`, where the formula is) takes
    per sample a level of index uniform in ``dm_index_range`` (inclusive; DMD2: 20..980 of
    1000); the fake denoiser's loss a level uniform over the whole table. Logged:
    ``train/dmd_difference`` and ``train/dmd_normalizer`` (:class:`~lightning_losses.losses.
    distillation.DMDLossOutput`).

    Two time-scale update (DMD2): ``fake_updates_per_generator = 5``. Training step t (0-based)
    updates the generator when :math:`(t + 1) \\bmod 5 = 0`, before that step's fake update;
    DMD2 updates it when :math:`t \\bmod 5 = 0`, so its first generator update (fake denoiser
    still equal to the teacher) has zero DMD gradient, ours comes after 4 fake updates.

    Defaults for 8x8 digits, not ImageNet: AdamW lr 1e-4 for both networks (DMD2: 2e-6 with
    7 x 40 images a step on ImageNet-64), betas (0.9, 0.999), weight decay 0.01. DMD2 also clips
    both gradients at norm 10 (``grad_clip`` / ``fake_grad_clip``, off by default) and warms the
    learning rates up over 500 steps (not here).

    Args:
        fake_updates_per_generator: k of the two time-scale update (DMD2: 5).
        num_sigmas: entries of the Karras table (DMD2: 1000).
        sigma_min: smallest level of the table before clamping (EDM: 0.002).
        sigma_max: largest level of the table before clamping (EDM: 80).
        rho: the Karras schedule's rho (7).
        dm_index_range: inclusive ``(low, high)`` table indices of the generator loss' levels.
        **kwargs: the arguments of
            :class:`~lightning_losses.modules.score_distillation.ScoreDistillation` and
            :class:`~lightning_losses.modules.distillation.OneStepDistillation`.
    """

    score_loss = staticmethod(dmd_loss)
    log_prefix = "dmd"

    def __init__(
        self,
        fake_updates_per_generator: int = 5,
        num_sigmas: int = 1000,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        dm_index_range: tuple[int, int] = (20, 980),
        **kwargs: Any,
    ) -> None:
        check_positive_int(num_sigmas, "num_sigmas")
        low, high = (int(i) for i in dm_index_range)
        if not 0 <= low <= high < num_sigmas:
            raise ValueError(
                f"dm_index_range must satisfy 0 <= low <= high < num_sigmas={num_sigmas}, got "
                f"{tuple(dm_index_range)}"
            )
        super().__init__(fake_updates_per_generator=fake_updates_per_generator, **kwargs)
        table = karras_sigmas(num_sigmas, sigma_min, sigma_max, rho).flip(0)
        table = table.clamp(self.teacher.sigma_min, self.teacher.sigma_max)
        self.register_buffer("sigma_table", table.to(torch.float32), persistent=False)
        self.dm_index_range = (low, high)

    def sample_fake_sigma(self, n: int) -> Tensor:
        """Levels of the fake-denoiser loss: uniform over the whole table."""
        return self.sigma_table[self.randint(0, self.sigma_table.numel(), n)]

    def sample_dm_sigma(self, n: int) -> Tensor:
        """Levels of the generator loss: uniform over the table indices ``dm_index_range``."""
        low, high = self.dm_index_range
        return self.sigma_table[self.randint(low, high + 1, n)]

    def sample_generator_sigma(self, n: int) -> Tensor:
        """Levels of the generator loss: :meth:`sample_dm_sigma`."""
        return self.sample_dm_sigma(n)
