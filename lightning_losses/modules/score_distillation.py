"""Score distillation: the fake denoiser and the two time-scale schedule of DMD and Diff-Instruct.

Both frameworks train a "fake" denoiser :math:`D_{fake}`, a copy of the teacher, on the
generator's detached samples, so that :math:`D_{fake} - D_{real}` estimates the difference of the
generated and the data distributions' scores (times :math:`\\sigma^2`); the generator follows
that difference (:func:`~lightning_losses.losses.dmd_loss`,
:func:`~lightning_losses.losses.diff_instruct_loss`). The fake denoiser's loss is EDM's
(:func:`~lightning_losses.losses.fake_denoiser_loss`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_losses.checks import check_float, check_positive_int
from lightning_losses.diffusion.batches import RealBatch
from lightning_losses.losses.distillation import fake_denoiser_loss
from lightning_losses.modules.distillation import OneStepDistillation, adamw, loss_logs

__all__ = ["ScoreDistillation"]


class ScoreDistillation(OneStepDistillation):
    """A :class:`~lightning_losses.modules.distillation.OneStepDistillation` with a fake denoiser.

    **Fake denoiser.** A deep copy of the teacher (``fake_denoiser``), trained with its own
    optimizer (``fake_optimizer``, clipping ``fake_grad_clip``) on ``x.detach()`` at levels from
    :meth:`sample_fake_sigma`.

    **Schedule.** With k = ``fake_updates_per_generator`` and t = ``fake_steps`` the training
    steps done before this one, a step generates x once, updates the generator when
    :math:`(t + 1) \\bmod k = 0`, then the fake denoiser on the same (pre-update) samples. After
    n steps ``fake_steps == n`` and ``generator_steps == n // k``; Lightning's
    ``trainer.global_step`` counts every optimizer step, ``n + n // k`` (``max_steps`` counts
    both). Logged: ``train/loss_fake`` every step.

    **Generator loss.** At levels from :meth:`sample_generator_sigma`, both denoisers at
    :math:`x_t = x + \\sigma\\epsilon` without gradient (:meth:`denoise_both`), then the
    subclass's ``score_loss(x, D_real, D_fake)``, its output's fields logged as
    ``train/<log_prefix>_<field>``. A subclass sets ``score_loss`` and ``log_prefix`` and
    implements the two level samplers.

    Args:
        fake_updates_per_generator: k >= 1.
        fake_optimizer: builds the fake denoiser's optimizer from its parameters.
        fake_grad_clip: clip the fake denoiser's gradient to this L2 norm (None: no clipping).
        **kwargs: the base's arguments.
    """

    def __init__(
        self,
        fake_updates_per_generator: int = 1,
        fake_optimizer: OptimizerCallable = adamw,
        fake_grad_clip: float | None = None,
        **kwargs: Any,
    ) -> None:
        check_positive_int(fake_updates_per_generator, "fake_updates_per_generator")
        if fake_grad_clip is not None:
            check_float(fake_grad_clip, "fake_grad_clip", minimum=0.0, strict_minimum=True)
        super().__init__(**kwargs)
        self.fake_updates_per_generator = int(fake_updates_per_generator)
        self.fake_optimizer = fake_optimizer
        self.fake_grad_clip = fake_grad_clip

    #: ``(x, denoised_real, denoised_fake) -> NamedTuple`` with ``loss`` first.
    score_loss: ClassVar[Callable[[Tensor, Tensor, Tensor], NamedTuple]]
    #: The prefix of the loss output's logged fields.
    log_prefix: ClassVar[str] = "score"

    def build_networks(self) -> None:
        self.fake_denoiser = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.register_buffer("fake_steps", torch.zeros((), dtype=torch.int64))

    @property
    def needs_samples(self) -> bool:
        return True

    def step_counters(self) -> tuple[int, int]:
        return (self.host_count("fake_steps"), self.host_count("generator_steps"))

    def is_generator_step(self) -> bool:
        """``(fake_steps + 1) % fake_updates_per_generator == 0``."""
        return (self.host_count("fake_steps") + 1) % self.fake_updates_per_generator == 0

    def sample_fake_sigma(self, n: int) -> Tensor:
        """``(n,)`` noise levels at which the fake denoiser is trained."""
        raise NotImplementedError

    def sample_generator_sigma(self, n: int) -> Tensor:
        """``(n,)`` noise levels of the generator loss."""
        raise NotImplementedError

    def base_generator_loss(
        self, x: Tensor, class_labels: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``score_loss`` of generated x at :meth:`sample_generator_sigma` levels; its logs."""
        sigma = self.sample_generator_sigma(x.shape[0])
        denoised_real, denoised_fake = self.denoise_both(x, sigma, class_labels)
        out = type(self).score_loss(x, denoised_real, denoised_fake)
        return out.loss, loss_logs(self.log_prefix, out)

    def denoise_both(
        self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(D_real(x_t), D_fake(x_t))`` at :math:`x_t = x + \\sigma\\epsilon` (detached x, the
        module's noise, no gradient)."""
        with torch.no_grad():
            noisy = x.detach() + sigma.view(-1, 1, 1, 1) * self.randn(*x.shape)
            return (
                self.teacher(noisy, sigma, class_labels),
                self.fake_denoiser(noisy, sigma, class_labels),
            )

    def fake_objective(self, x: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """EDM-weighted loss of the fake denoiser on detached x at :meth:`sample_fake_sigma`
        levels (:func:`~lightning_losses.losses.fake_denoiser_loss`)."""
        x = x.detach()
        sigma = self.sample_fake_sigma(x.shape[0]).to(device=x.device, dtype=torch.float32)
        noisy = x + sigma.view(-1, 1, 1, 1) * self.randn(*x.shape)
        denoised = self.fake_denoiser(noisy, sigma, class_labels)
        # the levels come from the module's checked table: no host read for them
        return fake_denoiser_loss(denoised, x, sigma, self.sigma_data, check_sigma=False)

    def after_generator_step(
        self, x: Tensor | None, real: RealBatch, class_labels: Tensor | None
    ) -> dict[str, Tensor]:
        """The fake denoiser's update on ``x.detach()``, with the supplementary losses'
        discriminator terms (a GAN head's) in the same backward."""
        loss = self.fake_objective(x, class_labels)
        logs = {"train/loss_fake": loss.detach()}
        for term in self.supplementary_losses:
            extra = term.discriminator_loss(
                x.detach(), real.images, class_labels, real.labels, self
            )
            if extra is not None:
                loss = loss + extra[0]
                logs.update(extra[1])
        self.optimizer_step(self.step_optimizers()[1], loss, self.fake_grad_clip)
        self.advance("fake_steps")
        return logs

    def configure_optimizers(self) -> Any:
        heads = [p for term in self.supplementary_losses for p in term.discriminator_parameters()]
        return [
            self.generator_optimizer(self.generator.parameters()),
            self.fake_optimizer([*self.fake_denoiser.parameters(), *heads]),
        ]
