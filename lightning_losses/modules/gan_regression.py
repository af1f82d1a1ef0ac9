"""The supplementary losses EL is compared with: DMD2's GAN head and DMD1's regression loss.

:class:`GANSupplement` (DMD2): a small head (:class:`~lightning_losses.nets.gan_head.GANHead`) on
the FAKE denoiser's bottleneck features (its UNet's mid block), real and generated images each
noised at their own level drawn uniformly from the whole Karras table. The generator term is
:func:`~lightning_losses.losses.gan_generator_loss` (through the frozen fake denoiser and head);
the discriminator term, :func:`~lightning_losses.losses.gan_discriminator_loss` on detached
samples times ``discriminator_weight``, is added to the fake denoiser's loss, in the same
backward and with the same optimizer (the head's parameters join it). DMD and Diff-Instruct
only: consistency distillation has no fake denoiser.

:class:`RegressionSupplement` (DMD1): :class:`~lightning_losses.losses.RegressionLoss` between
:math:`G(z_n)` and the teacher's ODE sample :math:`x_n` of the same noise, on pairs from
:func:`~lightning_losses.diffusion.make_teacher_pairs` (a safetensors file), a fresh mini-batch of
pairs every generator step (one more generator forward).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_losses.checks import check_float, check_positive_int
from lightning_losses.diffusion import karras_sigmas, load_teacher_pairs
from lightning_losses.losses.gan import gan_discriminator_loss, gan_generator_loss
from lightning_losses.losses.regression import RegressionLoss
from lightning_losses.modules.supplementary import SupplementaryLoss
from lightning_losses.nets.gan_head import FeatureTap, GANHead

__all__ = ["GANSupplement", "RegressionSupplement"]


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of ``modules`` without gradient inside the block (restored after)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class _OwnNoise:
    """A noise generator of the term, seeded from the module's, so that the term's draws leave
    the module's (and so the base loss and the fake denoiser's) noise unchanged."""

    _rng: torch.Generator | None = None
    _offset = 0

    def generator(self, module: Any) -> torch.Generator:
        base = module.noise_generator()
        if self._rng is None or self._rng.device != base.device:
            seed = (base.initial_seed() + 0x5851F42D4C957F2D + self._offset) % 2**63
            self._rng = torch.Generator(device=base.device).manual_seed(seed)
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state["_rng"] = None
        return state


class GANSupplement(_OwnNoise, SupplementaryLoss):
    """DMD2's GAN head as a supplementary loss (module docstring).

    Args:
        weight: the generator loss' weight (DMD2: 3e-3 on ImageNet-64), or with
            ``weight_mode="auto"`` the target gradient ratio.
        weight_mode: ``"fixed"`` or ``"auto"``.
        discriminator_weight: the discriminator loss' weight in the fake denoiser's loss
            (DMD2: 1e-2).
        feature_path: the fake denoiser's sub-module whose output the head reads.
        num_sigmas: levels of the Karras table the two noise levels are drawn from (1000).
        hidden_channels: the head's width (None: the bottleneck's channels, as DMD2).
        name: the logged name.
    """

    needs_real_images = True
    _offset = 1

    def __init__(
        self,
        weight: float = 3e-3,
        weight_mode: Literal["fixed", "auto"] = "fixed",
        discriminator_weight: float = 1e-2,
        feature_path: str = "unet.mid_block",
        num_sigmas: int = 1000,
        hidden_channels: int | None = None,
        name: str = "gan",
    ) -> None:
        super().__init__(weight, weight_mode, name)
        self.discriminator_weight = check_float(
            discriminator_weight, "discriminator_weight", minimum=0.0
        )
        self.feature_path = feature_path
        self.num_sigmas = check_positive_int(num_sigmas, "num_sigmas")
        self.hidden_channels = hidden_channels
        self.head: GANHead | None = None

    def bind(self, module: Any) -> None:
        fake = getattr(module, "fake_denoiser", None)
        if fake is None:
            raise ValueError(
                f"the GAN head reads the fake denoiser's features, and {type(module).__name__} "
                "has none: use it with DMDDistillation or DiffInstructDistillation (not with "
                "ConsistencyDistillation)"
            )
        channels, height, width = module.image_shape
        labels = torch.zeros(1, dtype=torch.long) if module.class_conditional else None
        with torch.no_grad(), FeatureTap(fake, self.feature_path) as tap:
            fake(torch.zeros(1, channels, height, width), 1.0, labels)
            features = tap.pop()
        self.head = GANHead(features.shape[1], features.shape[-1], self.hidden_channels)
        teacher = module.teacher
        table = karras_sigmas(self.num_sigmas).clamp(teacher.sigma_min, teacher.sigma_max)
        self.register_buffer("sigma_table", table.to(torch.float32), persistent=False)

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def logits(self, module: Any, images: Tensor, class_labels: Tensor | None) -> Tensor:
        """Head logits of ``images`` noised at levels uniform over the table."""
        rng = self.generator(module)
        n = images.shape[0]
        index = torch.randint(0, self.sigma_table.numel(), (n,), generator=rng, device=rng.device)
        sigma = self.sigma_table.to(images.device)[index.to(images.device)]
        noise = torch.randn(images.shape, generator=rng, device=rng.device).to(images.device)
        noisy = images.to(torch.float32) + sigma.view(-1, 1, 1, 1) * noise
        with FeatureTap(module.fake_denoiser, self.feature_path) as tap:
            module.fake_denoiser(noisy, sigma, class_labels)
            features = tap.pop()
        return self.head(features)

    def forward(
        self,
        x: Tensor,
        real: Tensor | None,
        class_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
        module: Any = None,
    ) -> Tensor:
        """The generator loss ``mean softplus(-l(x))``; the head and fake denoiser frozen."""
        with frozen(module.fake_denoiser, self.head):
            return gan_generator_loss(self.logits(module, x, class_labels)).loss

    def discriminator_loss(
        self,
        x: Tensor,
        real: Tensor,
        class_labels: Tensor | None,
        real_labels: Tensor | None,
        module: Any,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``discriminator_weight`` times the discriminator loss on real and detached x."""
        if module.class_conditional and real_labels is None:
            raise ValueError("a class-conditional GAN head needs the real batch's labels")
        real_labels = real_labels if module.class_conditional else None
        out = gan_discriminator_loss(
            self.logits(module, real, real_labels), self.logits(module, x.detach(), class_labels)
        )
        logs = {f"train/{self.name}_d_{k}": v.detach() for k, v in out._asdict().items()}
        return self.discriminator_weight * out.loss, logs


class RegressionSupplement(_OwnNoise, SupplementaryLoss):
    """DMD1's regression loss on teacher noise -> image pairs (module docstring).

    Args:
        pairs_path: a safetensors file of
            :func:`~lightning_losses.diffusion.save_teacher_pairs`.
        weight: the loss' weight (DMD1: 0.25 with LPIPS), or the auto mode's target ratio.
        weight_mode: ``"fixed"`` or ``"auto"``.
        batch_size: pairs per generator step.
        regression_loss: the distance (default pseudo-Huber,
            :class:`~lightning_losses.losses.RegressionLoss`).
        name: the logged name.
    """

    _offset = 2

    def __init__(
        self,
        pairs_path: str | os.PathLike[str],
        weight: float = 0.25,
        weight_mode: Literal["fixed", "auto"] = "fixed",
        batch_size: int = 64,
        regression_loss: nn.Module | None = None,
        name: str = "regression",
    ) -> None:
        super().__init__(weight, weight_mode, name)
        pairs = load_teacher_pairs(pairs_path)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.register_buffer("pair_noise", pairs.noise, persistent=False)
        self.register_buffer("pair_images", pairs.images, persistent=False)
        labels = pairs.class_labels
        self.register_buffer("pair_labels", labels, persistent=False)
        self.regression_loss = RegressionLoss() if regression_loss is None else regression_loss

    def bind(self, module: Any) -> None:
        shape = tuple(self.pair_noise.shape[1:])
        if shape != module.image_shape:
            raise ValueError(
                f"the teacher pairs are {shape} images but the generator makes "
                f"{module.image_shape}: make the pairs with this module's teacher"
            )
        if module.class_conditional != (self.pair_labels is not None):
            raise ValueError("class-conditional teacher pairs need a class-conditional module")

    def forward(
        self,
        x: Tensor,
        real: Tensor | None,
        class_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
        module: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """``(loss, G(z_n))``: the regression loss of a random mini-batch of pairs, and the
        generator output its gradient norm is measured at."""
        rng = self.generator(module)
        count = self.pair_noise.shape[0]
        index = torch.randint(
            0, count, (min(self.batch_size, count),), generator=rng, device=rng.device
        )
        index = index.to(self.pair_noise.device)
        labels = None if self.pair_labels is None else self.pair_labels[index]
        generated = module.generate(self.pair_noise[index], labels)
        return self.regression_loss(generated, self.pair_images[index]).loss, generated
