"""Diff-Instruct (Luo et al. 2023) one-step distillation on the shared distillation base.

Diff-Instruct minimises the Integral KL divergence between the generator's and the data's
diffused distributions. Its generator update is DMD's without the normalisation (both follow the
same score difference), at a level :math:`\\sigma \\sim \\mathrm{LogNormal}(P_{mean}, P_{std}^2)`
(:func:`~lightning_losses.losses.diff_instruct_loss`, where the formula is). The fake denoiser,
the schedule, the supplementary losses, EMA, counters and logging are
:class:`~lightning_losses.modules.score_distillation.ScoreDistillation`'s.

What the reference code does (github.com/pkulwj1994/diff_instruct, ``training/di_loss.py``,
``training/di_training_loop.py``, ``di_train.py``), and where we differ:

- the generator loss draws :math:`\\sigma` from the SAME LogNormal(-1.2, 1.2) as the fake
  denoiser's loss, and weights it by a constant (``weight = 1.0``: no :math:`\\sigma`-dependent
  weight, so none is offered here); it sums over pixels and divides by the batch size. The
  reference does not clamp :math:`\\sigma`; we clamp it into the teacher's
  ``[sigma_min, sigma_max]`` (a DDPM teacher has no levels outside its table);
- the fake-denoiser loss is EDM's, :math:`(\\sigma^2 + \\sigma_d^2) / (\\sigma\\sigma_d)^2`
  times the squared error, summed over pixels and divided by the batch size; the base averages
  over every element instead (a constant factor C*H*W, which Adam does not see);
- one fake-denoiser update per generator update, both Adam with betas (0, 0.999), eps 1e-8,
  lr 1e-5 for CIFAR-10 at batch 128 (the README's command), no weight decay, no clipping (it
  replaces NaN / inf parameter gradients by 0 / +-1e5 instead);
- the reference updates the fake denoiser FIRST, on samples generated without gradient, then the
  generator on freshly drawn samples; the base updates the generator first and then the fake
  denoiser on the same (pre-update, detached) samples, which saves one generator forward pass.
  So here the first generator step sees a fake denoiser still equal to the teacher: its
  Diff-Instruct gradient is exactly 0 (Adam does not move; EL, when on, still acts);
- its generator is :math:`G(z) = D_G(\\sigma_g z; \\sigma_g)` with ``--init_sigma`` 1.0 in the
  README's CIFAR-10 command (the code's default is 1e-3), not the teacher's ``sigma_max``:
  ``generator_sigma`` defaults to 1.0 here;
- it calls both denoisers of the generator loss in train mode (EDM's dropout 0.13, with the
  same dropout mask for both); the teacher here is always in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_losses.checks import check_float
from lightning_losses.losses.distillation import diff_instruct_loss
from lightning_losses.modules.score_distillation import ScoreDistillation

__all__ = ["DEFAULT_LR", "DiffInstructDistillation"]

#: Default learning rate of both networks, chosen for the 8x8 digits configs (a few hundred
#: generator steps); the reference's CIFAR-10 rate is 1e-5.
DEFAULT_LR = 1e-4


def _adam_zero_beta(params: object) -> torch.optim.Optimizer:
    """Diff-Instruct's optimizer: Adam, betas (0, 0.999), no weight decay, lr ``DEFAULT_LR``."""
    return torch.optim.Adam(params, lr=DEFAULT_LR, betas=(0.0, 0.999))


class DiffInstructDistillation(ScoreDistillation):
    """Diff-Instruct one-step distillation; the reference's choices are in the module docstring.

    **Noise levels.** Both the generator loss and the fake-denoiser loss draw
    :math:`\\ln\\sigma \\sim \\mathcal{N}(P_{mean}, P_{std}^2)` (EDM's training distribution,
    -1.2 and 1.2 by default) from the module's noise generator, then clamp :math:`\\sigma` into
    the teacher's ``[sigma_min, sigma_max]``.

    **Generator loss**: both denoisers at :math:`x_t = x + \\sigma\\epsilon` without gradient,
    then :func:`~lightning_losses.losses.diff_instruct_loss` (a sum over pixels: its scale grows
    with the image size, so a fixed EL weight for DI is much larger than for DMD). Logged:
    ``train/di_difference``.

    **Schedule.** ``fake_updates_per_generator = 1`` (the reference's 1:1): every training step
    updates the generator, then the fake denoiser; ``global_step`` counts 2 per training step.

    **Defaults** for the 8x8 digits, not CIFAR-10: Adam with betas (0, 0.999) (the reference's)
    and lr ``DEFAULT_LR`` for both networks (the reference's 1e-5 with batch 128 needs many
    thousands of steps), no clipping, ``generator_sigma = 1.0`` (the reference's
    ``--init_sigma``).

    Args:
        p_mean: mean of :math:`\\ln\\sigma` (EDM and Diff-Instruct: -1.2).
        p_std: standard deviation of :math:`\\ln\\sigma`, >= 0 (1.2).
        fake_updates_per_generator, generator_optimizer, fake_optimizer, generator_sigma: as
            the base's, with Diff-Instruct's defaults.
        **kwargs: the other arguments of
            :class:`~lightning_losses.modules.score_distillation.ScoreDistillation` and
            :class:`~lightning_losses.modules.distillation.OneStepDistillation`.
    """

    score_loss = staticmethod(diff_instruct_loss)
    log_prefix = "di"

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        fake_updates_per_generator: int = 1,
        generator_optimizer: OptimizerCallable = _adam_zero_beta,
        fake_optimizer: OptimizerCallable = _adam_zero_beta,
        generator_sigma: float | None = 1.0,
        **kwargs: Any,
    ) -> None:
        p_mean = check_float(p_mean, "p_mean")
        p_std = check_float(p_std, "p_std", minimum=0.0)
        super().__init__(
            fake_updates_per_generator=fake_updates_per_generator,
            generator_optimizer=generator_optimizer,
            fake_optimizer=fake_optimizer,
            generator_sigma=generator_sigma,
            **kwargs,
        )
        self.p_mean = p_mean
        self.p_std = p_std

    def sample_sigma(self, n: int) -> Tensor:
        """``(n,)`` float32 levels: ``exp(p_mean + p_std * N(0, 1))`` clamped to the teacher's
        ``[sigma_min, sigma_max]``, from the module's noise generator."""
        log_sigma = self.p_mean + self.p_std * self.randn(n)
        return log_sigma.exp().clamp(float(self.teacher.sigma_min), float(self.teacher.sigma_max))

    def sample_fake_sigma(self, n: int) -> Tensor:
        """Levels of the fake-denoiser loss: :meth:`sample_sigma`."""
        return self.sample_sigma(n)

    def sample_generator_sigma(self, n: int) -> Tensor:
        """Levels of the generator loss: :meth:`sample_sigma` (as the reference)."""
        return self.sample_sigma(n)
