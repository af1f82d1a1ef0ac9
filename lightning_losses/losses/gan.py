"""The non-saturating GAN losses of DMD2's discriminator head (Yin et al. 2024).

With discriminator logits :math:`l_r` on (noised) real images and :math:`l_f` on (noised)
generated images, and :math:`\\operatorname{softplus}(u) = \\log(1 + e^u)`,

.. math::

    \\mathcal{L}_D = \\operatorname{mean}\\, \\operatorname{softplus}(l_f)
        + \\operatorname{mean}\\, \\operatorname{softplus}(-l_r), \\qquad
    \\mathcal{L}_G = \\operatorname{mean}\\, \\operatorname{softplus}(-l_f),

i.e. the logistic loss of a classifier telling real (label 1) from generated (label 0), and the
generator's non-saturating loss of being classified real. Computed in at least float32 with
autocast off (softplus of bf16 logits loses the small values that carry the gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.checks import check_floating, check_tensor, working_dtype

__all__ = [
    "GANDiscriminatorOutput",
    "GANGeneratorOutput",
    "gan_discriminator_loss",
    "gan_generator_loss",
]


class GANDiscriminatorOutput(NamedTuple):
    """The discriminator loss and its parts (each a 0-d tensor).

    Attributes:
        loss: ``real_loss + fake_loss``.
        real_loss: mean softplus(-real_logits).
        fake_loss: mean softplus(fake_logits).
        real_accuracy: share of real logits > 0 (no gradient), for logging.
        fake_accuracy: share of generated logits < 0 (no gradient), for logging.
    """

    loss: Tensor
    real_loss: Tensor
    fake_loss: Tensor
    real_accuracy: Tensor
    fake_accuracy: Tensor


class GANGeneratorOutput(NamedTuple):
    """The generator loss (mean softplus(-fake_logits)) and the mean generated logit."""

    loss: Tensor
    fake_logit_mean: Tensor


def _logits(value: object, name: str) -> Tensor:
    logits = check_floating(check_tensor(value, name, (1, 2), "(B,) or (B, 1)"), name)
    if logits.ndim == 2 and logits.shape[1] != 1:
        raise ValueError(f"{name} must be a tensor of shape (B,) or (B, 1), got {logits.shape}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one logit, got an empty batch")
    return logits.reshape(-1)


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> GANDiscriminatorOutput:
    """:math:`\\operatorname{mean} \\operatorname{softplus}(l_f) + \\operatorname{mean}
    \\operatorname{softplus}(-l_r)` (module docstring).

    Args:
        real_logits: ``(B_r,)`` or ``(B_r, 1)`` logits of the head on real images.
        fake_logits: ``(B_f,)`` or ``(B_f, 1)`` logits on generated images; pass them computed
            from DETACHED samples so that this loss does not reach the generator.

    Raises:
        ValueError: for logits that are not floating 1-D / (B, 1) tensors, or empty.
    """
    real = _logits(real_logits, "real_logits")
    fake = _logits(fake_logits, "fake_logits")
    dtype = working_dtype(real, fake)
    with torch.autocast(device_type=real.device.type, enabled=False):
        real, fake = real.to(dtype), fake.to(dtype)
        real_loss = F.softplus(-real).mean()
        fake_loss = F.softplus(fake).mean()
        with torch.no_grad():
            real_accuracy = (real > 0).to(dtype).mean()
            fake_accuracy = (fake < 0).to(dtype).mean()
    return GANDiscriminatorOutput(
        real_loss + fake_loss, real_loss, fake_loss, real_accuracy, fake_accuracy
    )


def gan_generator_loss(fake_logits: Tensor) -> GANGeneratorOutput:
    """:math:`\\operatorname{mean} \\operatorname{softplus}(-l_f)`, the non-saturating loss.

    Args:
        fake_logits: ``(B,)`` or ``(B, 1)`` logits of the head on generated images, computed
            WITH the generator's graph (the head's own parameters should not be stepped by it).

    Raises:
        ValueError: for logits that are not floating 1-D / (B, 1) tensors, or empty.
    """
    fake = _logits(fake_logits, "fake_logits")
    dtype = working_dtype(fake)
    with torch.autocast(device_type=fake.device.type, enabled=False):
        fake = fake.to(dtype)
        loss = F.softplus(-fake).mean()
    return GANGeneratorOutput(loss, fake.detach().mean())
