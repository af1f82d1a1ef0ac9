"""Consistency distillation (CD, Song et al. 2023) on the one-step distillation base.

Notation as in :mod:`lightning_losses.modules.distillation` (EDM sigma space, data in [-1, 1]).
The student is a consistency model :math:`f_\\theta(x, \\sigma)`
(:class:`~lightning_losses.diffusion.consistency.ConsistencyPrecond`: the boundary-condition
parameterisation with :math:`f_\\theta(x, \\sigma_{min}) = x`, diffusers' time input
:math:`250 \\ln\\sigma`) around a copy of the teacher's UNet. One training step, with a REAL
batch x and the Karras levels :math:`\\sigma_0 = \\sigma_{max} > \\dots > \\sigma_{N-1} =
\\sigma_{min}`:

.. math::

    i \\sim \\mathcal{U}\\{0, \\dots, N-2\\}, \\quad x_{\\sigma_i} = x + \\sigma_i \\epsilon, \\quad
    \\hat x_{\\sigma_{i+1}} = \\mathrm{Heun}_{D_{real}}(x_{\\sigma_i};\\ \\sigma_i \\to
        \\sigma_{i+1}),

    \\mathcal{L}_{CD} = d\\big(f_\\theta(x_{\\sigma_i}, \\sigma_i),\\
        \\mathrm{sg}\\, f_{\\theta^-}(\\hat x_{\\sigma_{i+1}}, \\sigma_{i+1})\\big),

the Heun step being one step of the teacher's probability-flow ODE
:math:`dx/d\\sigma = (x - D_{real}(x; \\sigma)) / \\sigma` and d a distance of
:func:`~lightning_losses.losses.consistency_loss`. The generator objective is the base's
:math:`\\mathcal{L}_{CD} + \\lambda_{EL}\\, \\mathrm{EL}(x_g, x)` with one-step samples
:math:`x_g = f_\\theta(\\sigma_{max} z, \\sigma_{max})` from pure noise.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from lightning_losses.checks import check_choice, check_float, check_int
from lightning_losses.diffusion import Denoiser, heun_step, karras_sigmas
from lightning_losses.diffusion.consistency import (
    ConsistencyPrecond,
    consistency_pipeline,
    consistency_sampler,
)
from lightning_losses.losses.consistency import DISTANCES, consistency_loss
from lightning_losses.modules.distillation import OneStepDistillation, loss_logs
from lightning_losses.modules.ema import ema_update

__all__ = ["ConsistencyDistillation"]


def _radam(params: Any) -> torch.optim.Optimizer:
    """openai's CIFAR-10 CD optimizer: RAdam, lr 4e-4, betas (0.9, 0.999), eps 1e-8, no decay."""
    return torch.optim.RAdam(params, lr=4e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


class ConsistencyDistillation(OneStepDistillation):
    """Consistency distillation of a teacher into a one- or few-step consistency model.

    **Networks.** The teacher :math:`D_{real}` (frozen, as in the base). The student
    :math:`f_\\theta` = ``generator``: by default
    ``ConsistencyPrecond.from_teacher(teacher, sigma_data, sigma_min, sigma_max)``, a deep copy
    of the teacher's UNet weights in the consistency parameterisation (as openai's CD starts
    from its EDM teacher). A given ``generator`` must be a
    :class:`~lightning_losses.diffusion.consistency.ConsistencyPrecond` with the module's
    ``sigma_data``, ``sigma_min`` and ``sigma_max``. Its time input is :math:`250 \\ln\\sigma`
    (diffusers' ``CMStochasticIterativeScheduler``), 1000 times EDMPrecond's
    :math:`\\tfrac14\\ln\\sigma` and unlike a DDPM UNet's t in [0, 1000): the copied weights
    are a starting point whose time conditioning is relearnt. No fake denoiser: every
    training step is one student update.

    **Two EMAs.** The TARGET network :math:`f_{\\theta^-}` (``target_decay`` :math:`\\mu`):
    with :math:`\\mu > 0` a frozen copy ``target`` updated after every step,
    :math:`\\theta^- \\leftarrow \\mu \\theta^- + (1 - \\mu) \\theta`; with :math:`\\mu = 0`
    (openai's CIFAR-10 CD code, iCT) no copy: the student itself under ``no_grad``
    (stop-gradient). The base's ``generator_ema`` (``ema_decay``, 0.9999 in the paper) is the
    slow EMA used by :meth:`sample`, :meth:`sample_multistep` and the export; it plays no part
    in the loss.

    **Training pairs.** ``num_scales`` N Karras levels (``sigma_table``, descending, float32);
    per real image an index i uniform in ``{0, .., N-2}``, noise :math:`\\epsilon`, one Heun
    step of the teacher (:func:`~lightning_losses.diffusion.heun_step`, no gradient) from
    :math:`\\sigma_i` to :math:`\\sigma_{i+1}`, the target at :math:`\\sigma_{i+1}` (no
    gradient) and the student at :math:`\\sigma_i` (with gradient). i and the noise come from a
    SECOND generator of the module (seeded with the base's), so turning EL on, which draws
    :math:`z` from the base's generator, leaves the pairs unchanged. A teacher with a narrower
    range (a DDPM teacher: [0.01, 157]) clamps the levels it is evaluated at; the ODE step
    itself runs between the table's levels.

    **Supplementary losses** (EL, the base's single implementation): with any, every step also
    draws one-step samples :math:`x_g = f_\\theta(\\sigma_{max} z, \\sigma_{max})` (one extra
    student forward, NOT clipped, with gradient; ``generator_batch_size`` of them, default the
    real batch's size); without, that forward does not happen. ``train/grad_norm_base`` is the
    gradient norm of :math:`\\mathcal{L}_{CD}` at the student's output
    :math:`f_\\theta(x_{\\sigma_i}, \\sigma_i)`, ``train/grad_norm_el`` that of EL at
    :math:`x_g`. Logged: ``train/cm_mse`` (:class:`~lightning_losses.losses.consistency.
    ConsistencyLossOutput`).

    **Sampling.** :meth:`sample` is one step, :math:`\\mathrm{clip}(f(\\sigma_{max} z,
    \\sigma_{max}), -1, 1)` (clipping with ``clip_denoised``, as the scheduler);
    :meth:`sample_multistep` is Algorithm 1 over given levels. :meth:`save_pretrained` writes
    a diffusers ``ConsistencyModelPipeline`` + ``CMStochasticIterativeScheduler`` whose
    ``num_inference_steps=1`` output, mapped back by :math:`2 y - 1`, equals :meth:`sample`
    for the same ``torch.Generator`` seed (the pipeline returns images in [0, 1]).

    **DDP**: every student parameter gets a gradient at every step, so plain ``"ddp"`` /
    ``"ddp_spawn"`` works (the find-unused strategies too).

    Args:
        num_scales: N >= 2 Karras levels of the discretisation (18 on CIFAR-10, 40 on
            ImageNet-64).
        sigma_min: :math:`\\sigma_{min}` (boundary, 0.002).
        sigma_max: :math:`\\sigma_{max}` (one-step level, 80).
        rho: the Karras schedule's rho (7).
        target_decay: :math:`\\mu \\in [0, 1]` of the target network; 0: stop-grad student.
        distance: ``"l2"``, ``"l1"`` or ``"pseudo_huber"``.
        huber_c: the pseudo-Huber c; None: iCT's :math:`0.00054 \\sqrt{C H W}`.
        clip_denoised: clip samples to [-1, 1] (and the scheduler's ``clip_denoised``).
        generator_optimizer: the student's optimizer; default RAdam lr 4e-4, betas (0.9,
            0.999), no weight decay (openai's CIFAR-10 CD).
        **kwargs: the arguments of :class:`~lightning_losses.modules.distillation.
            OneStepDistillation` (``generator``: the student, None:
            ``ConsistencyPrecond.from_teacher(teacher, ...)``; ``sigma_data`` of the
            parameterisation, None: the teacher's); ``generator_sigma`` is ``sigma_max``.
    """

    base_loss_uses_samples = False

    def __init__(
        self,
        num_scales: int = 18,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        target_decay: float = 0.0,
        distance: str = "l2",
        huber_c: float | None = None,
        clip_denoised: bool = True,
        generator_optimizer: OptimizerCallable = _radam,
        **kwargs: Any,
    ) -> None:
        check_int(num_scales, "num_scales", minimum=2)
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}"
            )
        check_float(rho, "rho", minimum=0.0, strict_minimum=True)
        check_float(target_decay, "target_decay", minimum=0.0, maximum=1.0)
        check_choice(distance, "distance", DISTANCES)
        if huber_c is not None:
            check_float(huber_c, "huber_c", minimum=0.0, strict_minimum=True)
        # Read by initial_generator while the base builds the student (plain floats may be set
        # before nn.Module.__init__).
        self._student_sigmas = (float(sigma_min), float(sigma_max))
        super().__init__(
            generator_optimizer=generator_optimizer, generator_sigma=sigma_max, **kwargs
        )
        table = karras_sigmas(num_scales, sigma_min, sigma_max, rho)
        self.register_buffer("sigma_table", table.to(torch.float32), persistent=False)
        self.num_scales = int(num_scales)
        self.rho = float(rho)
        self.target_decay = float(target_decay)
        self.distance = distance
        self.huber_c = None if huber_c is None else float(huber_c)
        self.clip_denoised = bool(clip_denoised)
        self.target: ConsistencyPrecond | None = None
        if self.target_decay > 0:
            self.target = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self._pair_rng: torch.Generator | None = None

    def initial_generator(self, teacher: Denoiser, generator: nn.Module | None) -> Denoiser:
        """The student: ``ConsistencyPrecond.from_teacher`` or a checked ``generator``."""
        sigma_min, sigma_max = self._student_sigmas
        if generator is None:
            return ConsistencyPrecond.from_teacher(teacher, self.sigma_data, sigma_min, sigma_max)
        if not isinstance(generator, ConsistencyPrecond):
            raise ValueError(
                "generator must be a ConsistencyPrecond (the boundary-condition "
                f"parameterisation), got {type(generator).__name__}"
            )
        mine = (self.sigma_data, sigma_min, sigma_max)
        theirs = (generator.sigma_data, generator.sigma_min, generator.sigma_max)
        if mine != theirs:
            raise ValueError(
                f"the generator has (sigma_data, sigma_min, sigma_max) = {theirs} but the "
                f"module has {mine}; make them equal"
            )
        return super().initial_generator(teacher, generator)

    # --------------------------------------------------------------------------------------
    # Randomness of the training pairs

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_pair_rng"] = None  # re-seeded with the base's generator
        return state

    def seed_noise(self, seed: int | None = None) -> None:
        """(Re)seed the base's generator and, from its seed, the training pairs' generator."""
        super().seed_noise(seed)
        pair_seed = (self._rng.initial_seed() + 0x9E3779B97F4A7C15) % 2**63
        self._pair_rng = torch.Generator(device=self.device).manual_seed(pair_seed)

    def pair_generator(self) -> torch.Generator:
        """The ``torch.Generator`` of the training pairs' levels and noise (on the device)."""
        if self._pair_rng is None or self._pair_rng.device != self.device:
            self.seed_noise()
        return self._pair_rng

    # --------------------------------------------------------------------------------------
    # The consistency loss

    @property
    def target_network(self) -> nn.Module:
        """:math:`f_{\\theta^-}`: the EMA ``target`` (``target_decay > 0``) or the student."""
        return self.generator if self.target is None else self.target

    def consistency_pair(
        self, real: Tensor, labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(pred, target, sigma_i, sigma_next)`` of the training pairs of a real batch.

        ``pred`` :math:`= f_\\theta(x + \\sigma_i\\epsilon, \\sigma_i)` has a gradient;
        ``target`` :math:`= f_{\\theta^-}(\\mathrm{Heun}(x + \\sigma_i\\epsilon), \\sigma_{i+1})`
        has none. Indices and noise come from the pairs' generator.
        """
        n = real.shape[0]
        generator = self.pair_generator()
        index = torch.randint(0, self.num_scales - 1, (n,), generator=generator, device=self.device)
        sigma, sigma_next = self.sigma_table[index], self.sigma_table[index + 1]
        noise = torch.randn(real.shape, generator=generator, device=self.device)
        x = real.to(torch.float32)
        noisy = x + sigma.view(-1, 1, 1, 1) * noise
        with torch.no_grad():
            stepped = heun_step(self.teacher, noisy, sigma, sigma_next, labels)
            target = self.target_network(stepped, sigma_next, labels)
        pred = self.generator(noisy, sigma, labels)
        return pred, target, sigma, sigma_next

    def base_objective(
        self,
        x: Tensor | None,
        class_labels: Tensor | None,
        real: Tensor | None,
        real_labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """:math:`\\mathcal{L}_{CD}` on the REAL batch, measured at the student's output.

        ``x`` / ``class_labels`` (the one-step samples, present only with supplementary
        losses) are not used.

        Raises:
            ValueError: without real images, or without real labels when class conditional.
        """
        if real is None:
            raise ValueError(
                "consistency distillation trains on noisy REAL images: the batch must be a "
                "(B, C, H, W) image tensor, an (images, labels) pair or a dict with 'images'"
            )
        condition = None
        if self.class_conditional:
            if real_labels is None:
                raise ValueError(
                    "class-conditional consistency distillation needs the real batch's labels "
                    "(an (images, labels) batch)"
                )
            condition = real_labels.to(self.device)
        pred, target, _, _ = self.consistency_pair(real, condition)
        out = consistency_loss(pred, target, self.distance, self.huber_c)
        return out.loss, loss_logs("cm", out), pred

    def generator_update(
        self, x: Tensor | None, real: Any, class_labels: Tensor | None
    ) -> dict[str, Tensor]:
        logs = super().generator_update(x, real, class_labels)
        if self.target is not None:
            self.update_target()
        return logs

    def update_target(self, decay: float | None = None) -> None:
        """``target = mu * target + (1 - mu) * student`` (:func:`~.ema.ema_update`), mu =
        ``target_decay``."""
        if self.target is None:
            raise RuntimeError("target_decay=0: the target is the student itself")
        ema_update(self.target, self.generator, self.target_decay if decay is None else decay)

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        """Set the mode; the teacher, the EMA and the target stay in eval mode."""
        super().train(mode)
        if getattr(self, "target", None) is not None:
            self.target.eval()
        return self

    # --------------------------------------------------------------------------------------
    # Sampling and export

    def finish_samples(self, x: Tensor) -> Tensor:
        """Clip to [-1, 1] with ``clip_denoised``: :meth:`sample` then gives the one-step
        samples :math:`f(\\sigma_{max} z, \\sigma_{max})` (z, then the labels if not given,
        drawn from ``generator`` as in the base); the exported pipeline gives
        ``(sample + 1) / 2`` for the same seed."""
        return x.clamp(-1, 1) if self.clip_denoised else x

    @torch.no_grad()
    def sample_multistep(
        self,
        n: int,
        sigmas: Sequence[float] | Tensor,
        class_labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Few-step sampling (Algorithm 1,
        :func:`~lightning_losses.diffusion.consistency.consistency_sampler`).

        Draw order from ``generator``: z, the labels (class conditional and not given), then
        one noise per re-noising; ``sigmas=(sigma_max,)`` equals :meth:`sample`. The pipeline
        draws missing labels from the global RNG instead: pass ``class_labels`` to compare.

        Args:
            n: number of samples.
            sigmas: strictly decreasing levels in ``[sigma_min, sigma_max]``, e.g. the
                paper's two steps on CIFAR-10 ``(80.0, 0.821)``.
            class_labels: ``(n,)`` classes of a class-conditional model (uniform if None).
            generator: the ``torch.Generator`` of every draw (None: the global RNG).
            use_ema: the slow EMA student (when there is one).
        """
        z, class_labels = self.draw_noise(n, class_labels, generator)
        return consistency_sampler(
            self.sampling_network(use_ema),
            z,
            sigmas,
            class_labels=class_labels,
            generator=generator,
            clip_denoised=self.clip_denoised,
        )

    def to_pipeline(self, use_ema: bool = True, copy_weights: bool = True) -> Any:
        """The student as a diffusers ``ConsistencyModelPipeline`` (see
        :func:`~lightning_losses.diffusion.consistency.consistency_pipeline`): N =
        ``num_scales``, the module's sigmas, ``rho`` and ``clip_denoised``.

        :meth:`save_pretrained` writes it as a folder (``DiffusionPipeline.save_pretrained``):
        ``model_index.json``, ``unet/`` (config + safetensors) and ``scheduler/`` (a
        ``CMStochasticIterativeScheduler``). Offline,
        ``ConsistencyModelPipeline.from_pretrained(path)(batch_size=n, num_inference_steps=1,
        generator=torch.Generator().manual_seed(s), output_type="pt").images * 2 - 1`` equals
        ``self.sample(n, generator=torch.Generator().manual_seed(s), use_ema=use_ema)``
        (float rounding aside; class-conditional: pass the labels to both). With
        ``clip_denoised=False`` the pipeline still clamps its ``[0, 1]`` output images.

        Raises:
            ValueError: when the student is not a ConsistencyPrecond around a square
                ``UNet2DModel``.
        """
        return consistency_pipeline(
            self.sampling_network(use_ema),
            num_train_timesteps=self.num_scales,
            rho=self.rho,
            clip_denoised=self.clip_denoised,
            copy_weights=copy_weights,
        )
