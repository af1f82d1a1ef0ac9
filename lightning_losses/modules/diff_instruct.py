"""Diff-Instruct (Luo et al. 2023) one-step distillation on the shared distillation base.

Diff-Instruct minimises the Integral KL divergence between the generator's and the data's
diffused distributions. Its generator update is DMD's without the normalisation (both come from
the same score difference): with a fake denoiser :math:`D_{fake}` trained on generator samples,
a noise level :math:`\\sigma \\sim \\mathrm{LogNormal}(P_{mean}, P_{std}^2)` and
:math:`x_t = x + \\sigma\\epsilon`,

.. math::

    \\mathcal{L}_{DI} = \\frac{1}{B} \\sum_{b,c,h,w}
        \\mathrm{sg}\\big(D_{fake}(x_t) - D_{real}(x_t)\\big) \\odot x, \\qquad
    \\frac{\\partial \\mathcal{L}_{DI}}{\\partial x} = \\frac{D_{fake}(x_t) - D_{real}(x_t)}{B}
        = \\frac{\\sigma^2}{B}\\big(s_{fake}(x_t) - s_{real}(x_t)\\big)

(:func:`~lightning_losses.losses.diff_instruct_loss`). Everything else (the three networks, the
fake denoiser's EDM-weighted loss, the Embedding Loss, EMA, counters, logging, DDP notes) is
:class:`~lightning_losses.modules.distillation.OneStepDistillation`'s.

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
  ``generator_sigma`` defaults to 1.0 here (on the digits teacher, 200 generator steps at lr
  1e-4: a logistic-regression Inception score of 6.2 and pixel MMD 0.0018 with 1.0, 6.0 and
  0.0025 with the teacher's ``sigma_max`` 80; see ``configs/distillation/digits_di.yaml``);
- it calls both denoisers of the generator loss in train mode (EDM's dropout 0.13, with the
  same dropout mask for both); the teacher here is always in eval mode.

Under DDP use ``strategy="ddp_find_unused_parameters_true"`` (scripts) or
``"ddp_spawn_find_unused_parameters_true"`` (notebooks / pytest), as for every module of the
base.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_losses.losses.distillation import diff_instruct_loss
from lightning_losses.modules.distillation import OneStepDistillation

__all__ = ["DEFAULT_LR", "DiffInstructDistillation"]

#: Default learning rate of both networks, chosen for the 8x8 digits configs (a few hundred
#: generator steps); the reference's CIFAR-10 rate is 1e-5.
DEFAULT_LR = 1e-4


def _adam_zero_beta(params: object) -> torch.optim.Optimizer:
    """Diff-Instruct's optimizer: Adam, betas (0, 0.999), no weight decay, lr ``DEFAULT_LR``."""
    return torch.optim.Adam(params, lr=DEFAULT_LR, betas=(0.0, 0.999))


class DiffInstructDistillation(OneStepDistillation):
    """Diff-Instruct one-step distillation; the math and the reference's choices are in the
    module docstring.

    **Noise levels.** Both the generator loss and the fake-denoiser loss draw
    :math:`\\ln\\sigma \\sim \\mathcal{N}(P_{mean}, P_{std}^2)` (EDM's training distribution,
    -1.2 and 1.2 by default) from the module's noise generator, then clamp :math:`\\sigma` into
    the teacher's ``[sigma_min, sigma_max]``.

    **Generator loss** (:meth:`base_generator_loss`): :math:`x_t = x_{detached} +
    \\sigma\\epsilon`, both the teacher and the fake denoiser evaluated without gradient, then
    :func:`~lightning_losses.losses.diff_instruct_loss`, whose gradient with respect to x is
    :math:`(D_{fake} - D_{real}) / B`. Its scale grows with the image size (a sum over pixels):
    ``el_weight`` for a DI run is much larger than for DMD (whose gradient is averaged).

    **Schedule.** ``fake_updates_per_generator = 1`` (the reference's 1:1): every training step
    updates the generator, then the fake denoiser, so Lightning's ``global_step`` (``max_steps``)
    counts 2 per training step. The first generator step has zero Diff-Instruct gradient (the
    fake denoiser is still the teacher's copy; the reference updates the fake denoiser first).

    **Defaults** for the 8x8 digits, not CIFAR-10: Adam with betas (0, 0.999) (the reference's)
    and lr ``DEFAULT_LR`` = 1e-4 for both networks (the reference's 1e-5 with batch 128 needs
    many thousands of steps; set it in the config for CIFAR-10), no clipping, generator noise
    level ``generator_sigma = 1.0`` (the reference's ``--init_sigma``).

    Args:
        (see :class:`~lightning_losses.modules.distillation.OneStepDistillation` for the shared
        ones; only the defaults of ``fake_updates_per_generator``, the optimizers and
        ``generator_sigma`` differ)
        p_mean: mean of :math:`\\ln\\sigma` (EDM and Diff-Instruct: -1.2).
        p_std: standard deviation of :math:`\\ln\\sigma`, >= 0 (1.2).

    Raises:
        ValueError: for a non-finite ``p_mean``, a ``p_std`` that is not finite and >= 0, or any
            of the base's argument errors.
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        teacher_path: str | None = None,
        generator: nn.Module | None = None,
        num_classes: int | None = None,
        class_conditional: bool = False,
        el_weight: float = 0.0,
        embedding_loss: nn.Module | None = None,
        el_seed: int = 0,
        el_weight_mode: Literal["fixed", "auto"] = "fixed",
        fake_updates_per_generator: int = 1,
        generator_batch_size: int | None = None,
        generator_optimizer: OptimizerCallable = _adam_zero_beta,
        fake_optimizer: OptimizerCallable = _adam_zero_beta,
        grad_clip: float | None = None,
        fake_grad_clip: float | None = None,
        ema_decay: float | None = 0.999,
        log_grad_norm_every: int = 10,
        generator_sigma: float | None = 1.0,
        sigma_data: float | None = None,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ) -> None:
        for name, value in (("p_mean", p_mean), ("p_std", p_std)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a float, got {value!r}")
        if not math.isfinite(p_mean):
            raise ValueError(f"p_mean must be finite, got {p_mean}")
        if not (math.isfinite(p_std) and p_std >= 0):
            raise ValueError(f"p_std must be a finite float >= 0, got {p_std}")
        super().__init__(
            teacher=teacher,
            teacher_path=teacher_path,
            generator=generator,
            num_classes=num_classes,
            class_conditional=class_conditional,
            el_weight=el_weight,
            embedding_loss=embedding_loss,
            el_seed=el_seed,
            el_weight_mode=el_weight_mode,
            fake_updates_per_generator=fake_updates_per_generator,
            generator_batch_size=generator_batch_size,
            generator_optimizer=generator_optimizer,
            fake_optimizer=fake_optimizer,
            grad_clip=grad_clip,
            fake_grad_clip=fake_grad_clip,
            ema_decay=ema_decay,
            log_grad_norm_every=log_grad_norm_every,
            generator_sigma=generator_sigma,
            sigma_data=sigma_data,
        )
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def sample_sigma(self, n: int) -> Tensor:
        """``(n,)`` float32 levels: ``exp(p_mean + p_std * N(0, 1))`` clamped to the teacher's
        ``[sigma_min, sigma_max]``, from the module's noise generator."""
        log_sigma = self.p_mean + self.p_std * self.randn(n)
        return log_sigma.exp().clamp(float(self.teacher.sigma_min), float(self.teacher.sigma_max))

    def sample_fake_sigma(self, n: int) -> Tensor:
        """Levels of the fake-denoiser loss: :meth:`sample_sigma`."""
        return self.sample_sigma(n)

    def sample_generator_sigma(self, n: int) -> Tensor:
        """Levels of the generator loss: :meth:`sample_sigma` (the same distribution, as the
        reference)."""
        return self.sample_sigma(n)

    def base_generator_loss(
        self, x: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The Diff-Instruct loss of generated x (see the class docstring)."""
        with torch.no_grad():
            sigma = self.sample_generator_sigma(x.shape[0])
            noisy = x.detach() + sigma.view(-1, 1, 1, 1) * self.randn(*x.shape)
            denoised_real = self.teacher(noisy, sigma, labels)
            denoised_fake = self.fake_denoiser(noisy, sigma, labels)
        return diff_instruct_loss(x, denoised_real, denoised_fake), {}
