"""One-step diffusion distillation: a shared LightningModule base and DMD (DMD2).

Notation (EDM sigma space, ``shared/papers/distillation.md``): data :math:`x \\in [-1, 1]`, a noisy
copy :math:`x_\\sigma = x + \\sigma\\epsilon`, denoisers :math:`D(x_\\sigma; \\sigma, c)` that
estimate :math:`x`. Three networks take part, all :class:`~lightning_losses.diffusion.Denoiser` s:

- the teacher ("real" denoiser) :math:`D_{real}`: frozen (eval mode, no gradient);
- the one-step generator :math:`G`, a copy of the teacher that maps pure noise to an image in one
  evaluation at the generator noise level :math:`\\sigma_g` (the teacher's ``sigma_max`` unless
  set):

  .. math::

      x = G(z) = D_G(\\sigma_g z;\\ \\sigma_g, c), \\qquad z \\sim \\mathcal{N}(0, I);

- the "fake" denoiser :math:`D_{fake}`, another copy of the teacher, trained to denoise the
  generator's (detached) samples, so that :math:`D_{fake} - D_{real}` estimates the difference
  of the scores of the generated and the data distributions.

:class:`OneStepDistillation` holds what DMD, Diff-Instruct and consistency distillation share: the
three networks, the optional Embedding Loss (EL), the update schedule, step counters, gradient
clipping, a generator-only EMA, sampling, the data checks and the logging. A subclass implements
:meth:`OneStepDistillation.base_generator_loss` (and, with a fake denoiser,
:meth:`OneStepDistillation.sample_fake_sigma`); a framework whose loss is not a function of the
one-step samples (consistency distillation, a loss on noisy real images) sets
``base_loss_uses_samples = False`` and overrides :meth:`OneStepDistillation.base_objective`
instead. :class:`DMDDistillation` is DMD2 without its GAN head.

The generator objective, ONE implementation for every framework
(:meth:`OneStepDistillation.generator_objective`):

.. math::

    \\mathcal{L}_G = \\mathcal{L}_{base}(x) + \\lambda_{EL}\\, \\mathrm{EL}(x, x_{real}),

EL being :class:`~lightning_losses.losses.EmbeddingLoss` between the generated batch and a REAL
batch from the data module (MMD^2 in the feature spaces of random frozen networks). With
``el_weight == 0`` the EL module is not even built and the real batch is not needed.

Under DDP the generator and the fake denoiser are updated in separate backward passes (and the
generator not at every step), so every step leaves parameters without gradient: use
``strategy="ddp_find_unused_parameters_true"`` in scripts and
``"ddp_spawn_find_unused_parameters_true"`` in notebooks / pytest.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_losses.diffusion import Denoiser, karras_sigmas
from lightning_losses.diffusion.checks import check_diffusion_images
from lightning_losses.losses.distillation import dmd_loss, fake_denoiser_loss
from lightning_losses.losses.embedding import EmbeddingLoss
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.nets.embedders import RandomEmbedderBank

__all__ = [
    "TEACHER_COMMAND",
    "DMDDistillation",
    "GeneratorObjective",
    "OneStepDistillation",
    "RealBatch",
    "load_teacher",
    "split_real_batch",
]

#: The command that trains and exports the digits teacher the distillation configs load.
TEACHER_COMMAND = "lightning-losses fit --config configs/distillation/digits_teacher.yaml"
#: Real images must lie in [-1, 1] up to this slack (interpolation and float rounding).


def _adamw(params: Any) -> torch.optim.Optimizer:
    """The default optimizer of both networks: AdamW, lr 1e-4, betas (0.9, 0.999), wd 0.01."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)


def load_teacher(path: str | os.PathLike[str]) -> Denoiser:
    """The teacher denoiser in a LOCAL folder (eval mode; nothing is downloaded).

    Three layouts are accepted:

    - ``edm_config.json`` + ``unet/``: written by ``DiffusionTeacher.save_pretrained``, loaded
      as an :class:`~lightning_losses.diffusion.EDMPrecond` by
      :meth:`~lightning_losses.modules.teacher.DiffusionTeacher.from_pretrained`;
    - a diffusers DDPM pipeline folder, ``model_index.json`` (optional) + ``unet/`` +
      ``scheduler/`` (``DDPMPipeline.save_pretrained``, or a local copy of
      ``google/ddpm-cifar10-32``), loaded as a
      :class:`~lightning_losses.diffusion.DiffusersEpsDenoiser` (EDM sigma space,
      :math:`\\sigma_t = \\sqrt{(1 - \\bar\\alpha_t) / \\bar\\alpha_t}`);
    - a flat unet + scheduler pair, ``config.json`` + weights + ``scheduler_config.json`` side
      by side, loaded the same way.

    Raises:
        FileNotFoundError: when ``path`` does not exist or matches none of the layouts; the
            message names the command that trains and exports the digits teacher and lists the
            layouts.
        ValueError: when ``path`` holds a distilled ``OneStepPipeline`` (a generator, not a
            teacher), or a model other than a ``UNet2DModel``.
    """
    root = Path(path).expanduser()
    layouts = (
        "accepted layouts: edm_config.json + unet/ (DiffusionTeacher.save_pretrained); a "
        "diffusers DDPM pipeline folder, model_index.json + unet/ + scheduler/ (e.g. a local "
        "copy of google/ddpm-cifar10-32); or config.json + scheduler_config.json side by side "
        "(a flat unet + scheduler pair)"
    )
    hint = (
        f"Train and export the digits teacher first: {TEACHER_COMMAND} (it writes "
        "runs/distillation/digits_teacher/export), or set model.init_args.teacher_path to a "
        f"local teacher folder; {layouts}"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"no teacher at {str(root)!r}. {hint}")
    if (root / "edm_config.json").is_file():
        from lightning_losses.modules.teacher import DiffusionTeacher

        return DiffusionTeacher.from_pretrained(root)
    pipeline_index = root / "model_index.json"
    is_pipeline = pipeline_index.is_file() or (
        (root / "unet" / "config.json").is_file()
        and (root / "scheduler" / "scheduler_config.json").is_file()
    )
    is_flat = (root / "config.json").is_file() and (root / "scheduler_config.json").is_file()
    if not (is_pipeline or is_flat):
        raise FileNotFoundError(f"{str(root)!r} holds no teacher I can read. {hint}")
    if pipeline_index.is_file():
        import json

        pipeline_class = json.loads(pipeline_index.read_text()).get("_class_name")
        if pipeline_class == "OneStepPipeline":
            raise ValueError(
                f"{str(root)!r} holds a distilled one-step generator (OneStepPipeline), not a "
                "teacher: load it with lightning_losses.diffusion.OneStepPipeline.from_pretrained"
            )
    from lightning_losses.diffusion import DiffusersEpsDenoiser

    return DiffusersEpsDenoiser.from_pretrained(root)


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _is_label_tensor(value: object) -> bool:
    return (
        isinstance(value, Tensor)
        and value.ndim == 1
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


class RealBatch(NamedTuple):
    """What a training batch holds: real images and labels (None when absent), its size."""

    images: Tensor | None
    labels: Tensor | None
    size: int | None


def split_real_batch(batch: Any) -> RealBatch:
    """Read real images (and labels) from a batch, without raising when there are none.

    Images are a 4-D ``(B, C, H, W)`` tensor: the batch itself, the first item of an
    ``(images, labels, ...)`` sequence, or ``batch["images" | "image" | "pixel_values"]``. Labels
    are a 1-D integer tensor: the second item of the sequence or ``batch["labels" | "label" |
    "class_labels"]``. ``size`` is the length of the first tensor found (None if there is none).
    """
    images = labels = None
    first: Tensor | None = None
    if isinstance(batch, Tensor):
        first = batch
        images = batch if batch.ndim == 4 else None
    elif isinstance(batch, dict):
        tensors = [v for v in batch.values() if isinstance(v, Tensor) and v.ndim >= 1]
        first = tensors[0] if tensors else None
        images = next((batch[k] for k in ("images", "image", "pixel_values") if k in batch), None)
        labels = next((batch[k] for k in ("labels", "label", "class_labels") if k in batch), None)
    elif isinstance(batch, list | tuple):
        tensors = [v for v in batch if isinstance(v, Tensor) and v.ndim >= 1]
        first = tensors[0] if tensors else None
        if batch and isinstance(batch[0], Tensor) and batch[0].ndim == 4:
            images = batch[0]
            labels = batch[1] if len(batch) > 1 else None
    if not (isinstance(images, Tensor) and images.ndim == 4):
        images = None
    if not _is_label_tensor(labels):
        labels = None
    size = None
    if images is not None:
        size = images.shape[0]
    elif isinstance(first, Tensor) and first.ndim >= 1:
        size = first.shape[0]
    return RealBatch(images, labels, size)


class GeneratorObjective(NamedTuple):
    """The generator objective and its parts.

    Attributes:
        loss: ``base + el_weight * el`` (``base`` alone when EL is off), what is minimised.
        base: the framework's own loss (DMD, Diff-Instruct, consistency).
        el: the unweighted Embedding Loss, None when ``el_weight == 0``.
        logs: extra scalars the framework wants logged (name -> detached tensor).
        base_output: the network output at which ``grad_norm_base`` is measured; None: the
            generated x (DMD, Diff-Instruct). Consistency distillation gives its student's
            output on noisy real images, as its loss does not depend on x.
    """

    loss: Tensor
    base: Tensor
    el: Tensor | None
    logs: dict[str, Tensor]
    base_output: Tensor | None = None


class OneStepDistillation(L.LightningModule):
    """Base of the one-step distillation modules (DMD, Diff-Instruct, consistency).

    **Networks.** The teacher :math:`D_{real}` comes as a module (``teacher``) or as a folder
    (``teacher_path``, loaded with :func:`load_teacher`); it is frozen: eval mode whatever
    ``train()`` is asked, ``requires_grad=False``. The generator starts as a deep copy of the
    teacher (or of ``generator`` when given, which must match the teacher's channels, size and
    classes) and samples in one step, :math:`x = D_G(\\sigma_g z; \\sigma_g, c)` with
    :math:`z \\sim \\mathcal{N}(0, I)` of the teacher's ``(C, H, W)``. Subclasses that use a fake
    denoiser (``uses_fake_denoiser``) get one more deep copy of the teacher, trained with the
    EDM-weighted loss :func:`~lightning_losses.losses.fake_denoiser_loss` on detached generator
    samples at noise levels from :meth:`sample_fake_sigma`.

    **Classes.** ``class_conditional=True`` needs a class-conditional teacher: labels of the
    generated batch are drawn uniformly from ``{0, .., num_classes - 1}`` and passed to every
    denoiser. ``num_classes`` is linked from the data module by the CLI; on its own it changes
    nothing.

    **Schedule.** Manual optimisation, two optimizers: ``generator_optimizer`` on the generator
    and ``fake_optimizer`` on the fake denoiser (AdamW, lr 1e-4, betas (0.9, 0.999), weight decay
    0.01 by default). With k = ``fake_updates_per_generator`` and t the number of training steps
    done before this one (``fake_steps``), a training step

    1. draws z (and labels) and generates x once (with gradient only on a generator step);
    2. if :math:`(t + 1) \\bmod k = 0`, updates the generator with :meth:`generator_objective`
       on x (backward, optional clipping to ``grad_clip``, step, EMA update);
    3. updates the fake denoiser on ``x.detach()`` (these same, pre-update samples).

    After n training steps ``fake_steps == n`` and ``generator_steps == n // k``; the first
    generator update comes after k - 1 fake updates. Lightning's ``trainer.global_step`` counts
    every optimizer step, ``n + n // k`` (so ``max_steps`` counts both). Without a fake denoiser
    every step is a generator step.

    **EL.** With ``el_weight > 0``, :meth:`generator_objective` adds ``el_weight`` times
    ``embedding_loss(x, real_images, labels, real_labels)`` (default:
    ``EmbeddingLoss(RandomEmbedderBank(in_channels, seed=el_seed))``; a bank with
    ``maybe_resample`` is re-drawn from ``generator_steps``, the same on every rank). The real
    batch comes from the data module and must be ``(B, C, H, W)`` images of the teacher's
    channels and size, in [-1, 1] (e.g. ``DigitsDataModule(normalize="symmetric")``); otherwise,
    or when ``el_weight > 0`` and the batch holds no images, ValueError. Images are checked
    whenever a batch has them (two scalars read per step).

    **Randomness.** z, labels, noise levels and noise come from a ``torch.Generator`` of the
    module, seeded at the start of fit from ``torch.initial_seed()`` (what ``seed_everything``
    sets), the global rank and the step counters: every rank draws different samples (Lightning
    seeds every rank alike), and a resumed run does not replay its first steps' noise.

    **EMA.** With ``ema_decay`` :math:`\\beta` (None: no EMA), ``generator_ema`` is a frozen copy
    of the generator (outside the optimizers, inside the ``state_dict``), updated after every
    generator step: :math:`\\bar\\theta_j = \\beta \\bar\\theta_{j-1} + (1 - \\beta)\\theta_j`,
    :math:`\\bar\\theta_0 = \\theta_0`. :meth:`sample` uses it by default.

    **Logged** (``train/``, per step): ``loss_fake``; on generator steps ``loss_generator``,
    ``loss_base``, ``loss_el`` (EL on) and the step counters; every ``log_grad_norm_every``-th
    generator step the L2 norms of the gradients with respect to the generator's output x
    (the whole batch) of the base loss, ``grad_norm_base``, and of the UNWEIGHTED EL,
    ``grad_norm_el``, with ``grad_norm_ratio = el_weight * grad_norm_el / grad_norm_base`` (the
    share of EL in the generator's update: choose ``el_weight`` with it; a framework that is
    not a loss of x measures ``grad_norm_base`` at its own network output, see
    :meth:`base_objective`). Lightning's loggers
    repeat a step metric's last value at the steps that did not log it, so the generator's
    metrics show plateaus between generator steps (``train/generator_steps`` tells them apart).

    Args:
        teacher: the teacher denoiser (a :class:`~lightning_losses.diffusion.Denoiser`).
        teacher_path: a local folder read by :func:`load_teacher` (when ``teacher`` is None):
            one written by ``DiffusionTeacher.save_pretrained`` or a diffusers DDPM pipeline.
        generator: the generator's initial network; None: a copy of the teacher.
        num_classes: number of classes (linked from the data module by the CLI).
        class_conditional: generate class-conditionally (the teacher must be conditional).
        el_weight: :math:`\\lambda_{EL}` >= 0; 0 turns EL off. With ``el_weight_mode="auto"``
            the target ratio :math:`r` of the automatic weight instead.
        el_weight_mode: ``"fixed"`` (:math:`\\lambda_{EL}` = ``el_weight``) or ``"auto"`` (OUR
            option, not the paper's): every generator step
            :math:`\\lambda_{EL} = r \\lVert\\nabla \\mathcal{L}_{base}\\rVert /
            \\lVert\\nabla_x \\mathrm{EL}\\rVert` (no gradient through it; norms averaged over
            ranks), so that EL's share of the generator's update is held at ``r`` whatever the
            framework's loss scale; one ``r`` serves DMD, Diff-Instruct and CM.
        embedding_loss: the EL module (called as ``(generated, real, generated_labels,
            real_labels)`` and returning an object with ``.loss`` or a tensor); None: the
            default bank. Only used (and built) when ``el_weight > 0``.
        el_seed: seed of the default random embedder bank.
        fake_updates_per_generator: k, fake-denoiser updates per generator update (>= 1).
        generator_batch_size: samples generated per step; None: the real batch's size.
        generator_optimizer: builds the generator's optimizer from its parameters.
        fake_optimizer: builds the fake denoiser's optimizer from its parameters.
        grad_clip: clip the generator's gradient to this L2 norm (None: no clipping).
        fake_grad_clip: the same for the fake denoiser.
        ema_decay: constant EMA decay in [0, 1] of the generator; None: no EMA.
        log_grad_norm_every: log the output gradient norms every that many generator steps
            (0: never). Costs one extra backward of each term to x.
        generator_sigma: :math:`\\sigma_g` of the one-step generator; None: the teacher's
            ``sigma_max`` (80 for EDM teachers, as DMD2).
        sigma_data: EDM's :math:`\\sigma_d` of the fake-denoiser weighting; None: the teacher's
            ``sigma_data`` (0.5 when it has none).
    """

    #: Whether the framework trains a fake denoiser (DMD, Diff-Instruct) or not (consistency).
    uses_fake_denoiser: ClassVar[bool] = True
    #: Whether the base loss is a loss of the one-step samples x (DMD, Diff-Instruct). When
    #: False (consistency: a loss on noisy REAL images) x is generated only for EL.
    base_loss_uses_samples: ClassVar[bool] = True

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
        generator_optimizer: OptimizerCallable = _adamw,
        fake_optimizer: OptimizerCallable = _adamw,
        grad_clip: float | None = None,
        fake_grad_clip: float | None = None,
        ema_decay: float | None = 0.999,
        log_grad_norm_every: int = 10,
        generator_sigma: float | None = None,
        sigma_data: float | None = None,
    ) -> None:
        super().__init__()
        if el_weight_mode not in ("fixed", "auto"):
            raise ValueError(f'el_weight_mode must be "fixed" or "auto", got {el_weight_mode!r}')
        if not (isinstance(el_weight, int | float) and math.isfinite(el_weight) and el_weight >= 0):
            raise ValueError(f"el_weight must be a finite float >= 0, got {el_weight!r}")
        if isinstance(fake_updates_per_generator, bool) or fake_updates_per_generator < 1:
            raise ValueError(
                f"fake_updates_per_generator must be an int >= 1, got {fake_updates_per_generator}"
            )
        if generator_batch_size is not None and generator_batch_size < 1:
            raise ValueError(f"generator_batch_size must be >= 1, got {generator_batch_size}")
        for name, value in (("grad_clip", grad_clip), ("fake_grad_clip", fake_grad_clip)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1], got {ema_decay}")
        if log_grad_norm_every < 0:
            raise ValueError(f"log_grad_norm_every must be >= 0, got {log_grad_norm_every}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be None or >= 1, got {num_classes}")
        if teacher is not None and teacher_path is not None:
            raise ValueError("give teacher (a module) or teacher_path (a folder), not both")
        if teacher is None and teacher_path is None:
            raise ValueError(
                "give the teacher: teacher (a Denoiser) or teacher_path (a folder written by "
                "DiffusionTeacher.save_pretrained or a local diffusers DDPM pipeline; for "
                f"digits: {TEACHER_COMMAND})"
            )
        save_config_hyperparameters(
            self,
            ["teacher", "generator", "embedding_loss", "generator_optimizer", "fake_optimizer"],
        )
        if teacher is None:
            teacher = load_teacher(teacher_path)
        if not isinstance(teacher, Denoiser):
            raise ValueError(
                "teacher must be a lightning_losses.diffusion.Denoiser (EDMPrecond, "
                f"DiffusersEpsDenoiser, ...), got {type(teacher).__name__}"
            )
        if teacher.sample_size is None:
            raise ValueError("the teacher has no sample_size: one-step generation needs the size")
        self._check_classes(teacher, num_classes, class_conditional)
        if generator is None:
            generator = copy.deepcopy(teacher)
        elif not isinstance(generator, Denoiser):
            raise ValueError(f"generator must be a Denoiser, got {type(generator).__name__}")
        else:
            try:
                teacher.check_compatible(generator, name="the generator")
            except ValueError as err:
                raise ValueError(f"the generator does not fit the teacher: {err}") from err

        self.teacher = teacher.requires_grad_(False).eval()
        self.generator = generator.requires_grad_(True).train()
        self.fake_denoiser: Denoiser | None = None
        if self.uses_fake_denoiser:
            self.fake_denoiser = copy.deepcopy(teacher).requires_grad_(True).train()
        self.generator_ema: Denoiser | None = None
        if ema_decay is not None:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.embedding_loss: nn.Module | None = None
        if el_weight > 0:
            if embedding_loss is None:
                bank = RandomEmbedderBank(teacher.in_channels, seed=el_seed)
                embedding_loss = EmbeddingLoss(bank)
            self.embedding_loss = embedding_loss
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("fake_steps", torch.zeros((), dtype=torch.int64))

        self.num_classes = teacher.num_classes if class_conditional else num_classes
        self.class_conditional = bool(class_conditional)
        self.el_weight = float(el_weight)
        self.el_weight_mode = el_weight_mode
        self.fake_updates_per_generator = int(fake_updates_per_generator)
        self.generator_batch_size = generator_batch_size
        self.generator_optimizer = generator_optimizer
        self.fake_optimizer = fake_optimizer
        self.grad_clip = grad_clip
        self.fake_grad_clip = fake_grad_clip
        self.ema_decay = ema_decay
        self.log_grad_norm_every = int(log_grad_norm_every)
        self.generator_sigma = float(
            teacher.sigma_max if generator_sigma is None else generator_sigma
        )
        if not self.generator_sigma > 0:
            raise ValueError(f"generator_sigma must be > 0, got {generator_sigma}")
        self.sigma_data = float(
            getattr(teacher, "sigma_data", 0.5) if sigma_data is None else sigma_data
        )
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.automatic_optimization = False
        self._rng: torch.Generator | None = None
        self._range_warned = False

    @staticmethod
    def _check_classes(teacher: Denoiser, num_classes: int | None, conditional: bool) -> None:
        if conditional:
            if teacher.num_classes is None:
                raise ValueError(
                    "class_conditional=True but the teacher is unconditional (num_classes=None)"
                )
            if num_classes is not None and num_classes != teacher.num_classes:
                raise ValueError(
                    f"num_classes={num_classes} (from the data) but the teacher has "
                    f"{teacher.num_classes} classes"
                )
        elif teacher.num_classes is not None:
            raise ValueError(
                f"the teacher is class conditional ({teacher.num_classes} classes): set "
                "class_conditional=True"
            )

    # --------------------------------------------------------------------------------------
    # Shapes, randomness, generation

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the generated images (the teacher's)."""
        size = self.teacher.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.teacher.in_channels, int(height), int(width))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_rng"] = None  # re-seeded at the start of fit, per process
        return state

    def seed_noise(self, seed: int | None = None) -> None:
        """(Re)seed the module's noise generator on its device.

        Default seed: a function of ``torch.initial_seed()``, the global rank and the step
        counters (called at the start of fit).
        """
        if seed is None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            steps = (int(self.fake_steps), int(self.generator_steps))
            seed = hash((torch.initial_seed(), rank, *steps)) % 2**63
        self._rng = torch.Generator(device=self.device).manual_seed(int(seed))

    def _noise_generator(self) -> torch.Generator:
        if self._rng is None or self._rng.device != self.device:
            self.seed_noise()
        return self._rng

    def randn(self, *shape: int) -> Tensor:
        """Standard normal float32 noise from the module's generator, on its device."""
        return torch.randn(shape, generator=self._noise_generator(), device=self.device)

    def randint(self, low: int, high: int, n: int) -> Tensor:
        """``n`` integers uniform in ``[low, high)`` from the module's generator."""
        return torch.randint(low, high, (n,), generator=self._noise_generator(), device=self.device)

    def sample_labels(self, n: int) -> Tensor | None:
        """Uniform class labels for ``n`` generated samples (None when unconditional)."""
        if not self.class_conditional:
            return None
        return self.randint(0, self.num_classes, n)

    def generate(
        self, z: Tensor, labels: Tensor | None = None, network: nn.Module | None = None
    ) -> Tensor:
        """One step from standard normal ``z``: ``network(sigma_g * z, sigma_g, labels)``.

        ``network`` defaults to the trained generator.
        """
        network = self.generator if network is None else network
        return network(self.generator_sigma * z, self.generator_sigma, labels)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """``n`` one-step samples (not clamped; about [-1, 1]) on the module's device.

        Args:
            n: number of samples.
            labels: ``(n,)`` integer classes of a class-conditional generator (uniform if None);
                refused by an unconditional one.
            generator: a ``torch.Generator`` for z (and the labels), drawn on its own device and
                moved to the module's; None: the global RNG.
            use_ema: the EMA generator (when there is one; else the trained generator).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if labels is not None and not self.class_conditional:
            raise ValueError("labels were given but the generator is unconditional")
        device = generator.device if generator is not None else self.device
        z = torch.randn((n, *self.image_shape), generator=generator, device=device)
        z = z.to(self.device)
        if self.class_conditional:
            if labels is None:
                labels = torch.randint(
                    0, self.num_classes, (n,), generator=generator, device=device
                )
            labels = labels.to(self.device)
        network = self.generator_ema if use_ema and self.generator_ema is not None else None
        return self.generate(z, labels, network)

    # --------------------------------------------------------------------------------------
    # Objectives

    def base_generator_loss(
        self, x: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The framework's generator loss of samples x (with gradient) and extra logs."""
        raise NotImplementedError

    def base_objective(
        self,
        x: Tensor | None,
        labels: Tensor | None,
        real: Tensor | None,
        real_labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """The base loss of a generator step, its logs, and where ``grad_norm_base`` is taken.

        Default: :meth:`base_generator_loss` of the generated x, measured at x (the third item
        None). A framework whose loss is not a function of x (``base_loss_uses_samples =
        False``; x is then None unless EL is on) overrides this and returns its network output.
        """
        base, logs = self.base_generator_loss(x, labels)
        return base, logs, None

    def sample_fake_sigma(self, n: int) -> Tensor:
        """``(n,)`` noise levels at which the fake denoiser is trained."""
        raise NotImplementedError

    def embedding_term(
        self,
        x: Tensor,
        real: Tensor,
        labels: Tensor | None = None,
        real_labels: Tensor | None = None,
    ) -> Tensor:
        """The unweighted EL between generated ``x`` and real images."""
        if self.embedding_loss is None:
            raise RuntimeError("EL is off (el_weight == 0): there is no embedding_loss")
        out = self.embedding_loss(x, real, labels, real_labels)
        return out if isinstance(out, Tensor) else out.loss

    def generator_objective(
        self,
        x: Tensor | None,
        real: Tensor | None,
        labels: Tensor | None = None,
        real_labels: Tensor | None = None,
    ) -> GeneratorObjective:
        """``base + el_weight * EL(x, real)`` (EL only when el_weight > 0), the base from
        :meth:`base_objective` (:meth:`base_generator_loss` of x by default).

        Raises:
            ValueError: when ``el_weight > 0`` and ``real`` is None.
        """
        base, logs, base_output = self.base_objective(x, labels, real, real_labels)
        if self.embedding_loss is None:
            return GeneratorObjective(base, base, None, logs, base_output)
        if real is None:
            raise ValueError(self._missing_real_message())
        el = self.embedding_term(x, real, labels, real_labels)
        if self.el_weight_mode == "fixed":
            return GeneratorObjective(base + self.el_weight * el, base, el, logs, base_output)
        objective = GeneratorObjective(base, base, el, logs, base_output)
        norms = self.output_grad_norms(x, objective, weight=1.0)
        if self._trainer is not None and self.trainer.world_size > 1:
            # One weight on every rank: the mean of the ranks' norms.
            for name in ("train/grad_norm_base", "train/grad_norm_el"):
                norms[name] = self.trainer.strategy.reduce(norms[name], reduce_op="mean")
        el_norm = norms["train/grad_norm_el"]
        weight = torch.where(
            el_norm > 0,
            self.el_weight * norms["train/grad_norm_base"] / el_norm.clamp_min(1e-30),
            torch.zeros_like(el_norm),
        ).detach()
        norms["train/grad_norm_ratio"] = weight * el_norm / norms["train/grad_norm_base"]
        logs = {**logs, **norms, "train/el_weight": weight}
        return GeneratorObjective(base + weight * el, base, el, logs, base_output)

    def fake_objective(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """EDM-weighted loss of the fake denoiser on detached samples x, sigma from
        :meth:`sample_fake_sigma`:

        .. math::

            \\mathcal{L}_{fake} = \\mathrm{mean}\\Big(\\big(\\sigma^{-2} + \\sigma_d^{-2}\\big)
                \\big(D_{fake}(x + \\sigma\\epsilon; \\sigma) - x\\big)^2\\Big).
        """
        if self.fake_denoiser is None:
            raise RuntimeError(f"{type(self).__name__} has no fake denoiser")
        x = x.detach()
        sigma = self.sample_fake_sigma(x.shape[0]).to(device=x.device, dtype=torch.float32)
        noisy = x + sigma.view(-1, 1, 1, 1) * self.randn(*x.shape)
        denoised = self.fake_denoiser(noisy, sigma, labels)
        return fake_denoiser_loss(denoised, x, sigma, self.sigma_data)

    def output_grad_norms(
        self, x: Tensor | None, objective: GeneratorObjective, weight: float | None = None
    ) -> dict[str, Tensor]:
        """L2 norms of d(base)/dx and d(EL)/dx over the batch (graph retained), and their ratio.

        The base term is measured at ``objective.base_output`` when it is set (x otherwise).
        ``grad_norm_ratio = weight * grad_norm_el / grad_norm_base`` (``weight``: ``el_weight``
        when None); it is NaN when the base gradient is exactly 0 (e.g. Diff-Instruct's first
        step, before the fake denoiser has moved away from the teacher).
        """
        base_at = x if objective.base_output is None else objective.base_output
        terms = {"train/grad_norm_base": (objective.base, base_at)}
        if objective.el is not None:
            terms["train/grad_norm_el"] = (objective.el, x)
        norms = {}
        for name, (term, at) in terms.items():
            (grad,) = torch.autograd.grad(term, at, retain_graph=True, allow_unused=True)
            norms[name] = (
                torch.zeros((), device=at.device) if grad is None else grad.detach().float().norm()
            )
        if objective.el is not None:
            weight = self.el_weight if weight is None else weight
            base_norm = norms["train/grad_norm_base"]
            norms["train/grad_norm_ratio"] = torch.where(
                base_norm > 0, weight * norms["train/grad_norm_el"] / base_norm, float("nan")
            )
        return norms

    # --------------------------------------------------------------------------------------
    # Data checks

    def _missing_real_message(self) -> str:
        return (
            f"el_weight={self.el_weight} > 0 needs REAL images from the data module: the batch "
            "must be a (B, C, H, W) image tensor, an (images, labels) pair or a dict with "
            "'images'; set el_weight: 0 for distillation without EL"
        )

    def check_real_images(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` fit the teacher's shape and lie in [-1, 1]."""
        channels, height, width = self.image_shape
        looks_unscaled = check_diffusion_images(images, channels, (height, width), "real images")
        if looks_unscaled and not self._range_warned:
            self._range_warned = True
            rank_zero_warn(
                "a real batch lies in [0, 1], which looks like [0, 1] data; the teacher "
                'expects [-1, 1] (normalize="symmetric")'
            )

    # --------------------------------------------------------------------------------------
    # Training

    def is_generator_step(self) -> bool:
        """Whether this training step updates the generator: ``(fake_steps + 1) % k == 0``."""
        if self.fake_denoiser is None:
            return True
        return (int(self.fake_steps) + 1) % self.fake_updates_per_generator == 0

    def _optimizers(self) -> tuple[Any, Any | None]:
        optimizers = self.optimizers()
        if isinstance(optimizers, list | tuple):
            return optimizers[0], (optimizers[1] if len(optimizers) > 1 else None)
        return optimizers, None

    def _resample_embedders(self, step: int) -> None:
        bank = getattr(self.embedding_loss, "bank", None)
        if hasattr(bank, "maybe_resample"):
            bank.maybe_resample(step)

    def _generator_update(
        self,
        optimizer: Any,
        x: Tensor | None,
        real: RealBatch,
        labels: Tensor | None,
    ) -> dict[str, Tensor]:
        step = int(self.generator_steps)
        if self.embedding_loss is not None:
            self._resample_embedders(step)
        objective = self.generator_objective(x, real.images, labels, real.labels)
        logs = {
            "train/loss_generator": objective.loss.detach(),
            "train/loss_base": objective.base.detach(),
            **objective.logs,
        }
        if objective.el is not None:
            logs["train/loss_el"] = objective.el.detach()
        due = self.log_grad_norm_every and step % self.log_grad_norm_every == 0
        if due and "train/grad_norm_base" not in logs:  # the auto weight logs them already
            logs.update(self.output_grad_norms(x, objective))
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(objective.loss)
        if self.grad_clip is not None:
            self.clip_gradients(optimizer, self.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.generator_steps += 1
        if self.generator_ema is not None:
            self.update_ema()
        return logs

    def _fake_update(self, optimizer: Any, x: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        loss = self.fake_objective(x.detach(), labels)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.fake_grad_clip is not None:
            self.clip_gradients(optimizer, self.fake_grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.fake_steps += 1
        return {"train/loss_fake": loss.detach()}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One step of the schedule in the class docstring (manual optimisation)."""
        real = split_real_batch(batch)
        if real.images is not None:
            self.check_real_images(real.images)
        elif self.el_weight > 0:
            raise ValueError(self._missing_real_message() + f"; got {_shape(batch)}")
        n = self.generator_batch_size or real.size
        if n is None:
            raise ValueError(
                "cannot tell how many samples to generate: the batch holds no tensor; set "
                "generator_batch_size"
            )
        generator_optimizer, fake_optimizer = self._optimizers()
        generator_step = self.is_generator_step()
        x = labels = None
        # The one-step samples feed the base loss, the fake denoiser and EL; a framework that
        # uses none of them (consistency distillation without EL) skips that generator forward.
        if (
            self.base_loss_uses_samples
            or self.fake_denoiser is not None
            or self.embedding_loss is not None
        ):
            z = self.randn(n, *self.image_shape)
            labels = self.sample_labels(n)
            with torch.set_grad_enabled(generator_step):
                x = self.generate(z, labels)
        logs: dict[str, Tensor] = {}
        if generator_step:
            logs.update(self._generator_update(generator_optimizer, x, real, labels))
            logs["train/generator_steps"] = self.generator_steps.detach().float()
        if self.fake_denoiser is not None:
            logs.update(self._fake_update(fake_optimizer, x, labels))
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n)

    def on_train_start(self) -> None:
        self.seed_noise()

    @torch.no_grad()
    def update_ema(self, decay: float | None = None) -> None:
        """``ema = decay * ema + (1 - decay) * generator`` (buffers copied), in the EMA's dtype."""
        if self.generator_ema is None:
            raise RuntimeError("ema_decay=None: there is no EMA generator")
        decay = self.ema_decay if decay is None else float(decay)
        ema_params = dict(self.generator_ema.named_parameters())
        for name, param in self.generator.named_parameters():
            ema_params[name].lerp_(param.detach().to(ema_params[name].dtype), 1.0 - decay)
        ema_buffers = dict(self.generator_ema.named_buffers())
        for name, buffer in self.generator.named_buffers():
            ema_buffers[name].copy_(buffer)

    def train(self, mode: bool = True) -> OneStepDistillation:
        """Set the mode; the teacher and the EMA generator stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.generator_ema is not None:
            self.generator_ema.eval()
        return self

    def configure_optimizers(self) -> Any:
        generator_optimizer = self.generator_optimizer(self.generator.parameters())
        if self.fake_denoiser is None:
            return generator_optimizer
        return [generator_optimizer, self.fake_optimizer(self.fake_denoiser.parameters())]

    # --------------------------------------------------------------------------------------
    # Export

    def to_pipeline(self, use_ema: bool = True, copy_weights: bool = True) -> Any:
        """The generator as a :class:`~lightning_losses.diffusion.pipelines.OneStepPipeline`.

        ``pipeline(batch_size=n, generator=g, output_type="pt").images`` equals
        ``self.sample(n, generator=g, use_ema=use_ema)`` for equally seeded ``g``: the same
        draws (z, then labels) and :math:`x = D_G(\\sigma_g z; \\sigma_g, c)`.

        Args:
            use_ema: the EMA generator (when there is one; else the trained generator, as
                :meth:`sample`).
            copy_weights: give the pipeline its own copy of the UNet (default), so that moving
                or changing it leaves this module alone; False shares the weights.

        Raises:
            ValueError: when the generator is not an ``EDMPrecond`` or ``DiffusersEpsDenoiser``
                around a diffusers ``UNet2DModel``.
        """
        from lightning_losses.diffusion.pipelines import one_step_pipeline_from_denoiser

        network = self.generator_ema if use_ema and self.generator_ema is not None else None
        network = self.generator if network is None else network
        return one_step_pipeline_from_denoiser(
            network, self.generator_sigma, copy_weights=copy_weights
        )

    def save_pretrained(self, path: str | os.PathLike[str], use_ema: bool = True) -> Path:
        """Write the generator as a diffusers pipeline folder and return the folder.

        Layout (``DiffusionPipeline.save_pretrained``): ``model_index.json`` (the class
        ``OneStepPipeline``, the parameterization "edm" or "eps", :math:`\\sigma_g`, EDM's
        ``sigma_data`` / ``sigma_min`` / ``sigma_max`` or the DDPM ``prediction_type``,
        ``num_classes``), ``unet/`` (config + safetensors weights) and, for a generator
        distilled from a DDPM teacher, ``scheduler/``. Reload it, offline, with
        ``OneStepPipeline.from_pretrained(path)``; it samples what :meth:`sample` does for the
        same ``torch.Generator`` seed.

        Args:
            path: the folder (created if missing).
            use_ema: save the EMA generator (when there is one; else the trained generator).

        Raises:
            ValueError: when the generator is not an ``EDMPrecond`` or ``DiffusersEpsDenoiser``
                around a diffusers ``UNet2DModel``.
        """
        root = Path(path).expanduser()
        pipeline = self.to_pipeline(use_ema=use_ema, copy_weights=False)
        root.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(root, safe_serialization=True)
        return root


class DMDDistillation(OneStepDistillation):
    """Distribution Matching Distillation as in DMD2 (Yin et al. 2024), without the GAN head.

    Noise levels come from a Karras table of ``num_sigmas`` levels, ASCENDING (index 0 =
    ``sigma_min``, as DMD2 indexes it), clamped to the teacher's ``[sigma_min, sigma_max]``.

    Generator loss (:func:`~lightning_losses.losses.dmd_loss`): per sample an index i uniform in
    ``dm_index_range`` (inclusive; DMD2: 20..980 of 1000), :math:`x_t = x + \\sigma_i\\epsilon`,

    .. math::

        g = \\frac{D_{fake}(x_t) - D_{real}(x_t)}{\\operatorname{mean}_{c,h,w}
            \\lvert x - D_{real}(x_t) \\rvert}, \\qquad
        \\mathcal{L}_{DMD} = \\tfrac12 \\operatorname{mean}\\big((x - \\mathrm{sg}(x - g))^2\\big),

    both denoisers evaluated without gradient, so :math:`\\partial \\mathcal{L}/\\partial x =
    g / N` moves x towards :math:`D_{real}` and away from :math:`D_{fake}`.

    Fake denoiser: the EDM-weighted loss on detached samples at a level drawn uniformly from the
    whole table (all ``num_sigmas`` entries).

    Two time-scale update (DMD2): ``fake_updates_per_generator = 5`` fake-denoiser updates per
    generator update. Training step t (0-based) updates the generator when
    :math:`(t + 1) \\bmod 5 = 0`, before that step's fake update and on the same samples; DMD2
    updates it when :math:`t \\bmod 5 = 0`, so its first generator update (fake denoiser still
    equal to the teacher) has zero DMD gradient; ours comes after 4 fake updates.

    Defaults for 8x8 digits, not ImageNet: AdamW lr 1e-4 for both networks (DMD2 uses 2e-6 with
    7 x 40 images a step on ImageNet-64; a few hundred generator steps on a tiny teacher need a
    larger rate), betas (0.9, 0.999) and weight decay 0.01 (DMD2's, PyTorch's defaults). DMD2
    also clips both gradients at norm 10 (``grad_clip`` / ``fake_grad_clip``, off by default) and
    warms the learning rates up over 500 steps (not here).

    Args:
        (see :class:`OneStepDistillation` for the shared ones)
        num_sigmas: entries of the Karras table (DMD2: 1000).
        sigma_min: smallest level of the table before clamping (EDM: 0.002).
        sigma_max: largest level of the table before clamping (EDM: 80).
        rho: the Karras schedule's rho (7).
        dm_index_range: inclusive ``(low, high)`` table indices of the generator loss' levels.
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
        fake_updates_per_generator: int = 5,
        generator_batch_size: int | None = None,
        generator_optimizer: OptimizerCallable = _adamw,
        fake_optimizer: OptimizerCallable = _adamw,
        grad_clip: float | None = None,
        fake_grad_clip: float | None = None,
        ema_decay: float | None = 0.999,
        log_grad_norm_every: int = 10,
        generator_sigma: float | None = None,
        sigma_data: float | None = None,
        num_sigmas: int = 1000,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        dm_index_range: tuple[int, int] = (20, 980),
    ) -> None:
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
        low, high = (int(i) for i in dm_index_range)
        if not 0 <= low <= high < num_sigmas:
            raise ValueError(
                f"dm_index_range must satisfy 0 <= low <= high < num_sigmas={num_sigmas}, got "
                f"{tuple(dm_index_range)}"
            )
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

    def base_generator_loss(
        self, x: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The DMD2 distribution-matching loss of generated x (see the class docstring)."""
        with torch.no_grad():
            sigma = self.sample_dm_sigma(x.shape[0])
            noisy = x.detach() + sigma.view(-1, 1, 1, 1) * self.randn(*x.shape)
            denoised_real = self.teacher(noisy, sigma, labels)
            denoised_fake = self.fake_denoiser(noisy, sigma, labels)
        return dmd_loss(x, denoised_real, denoised_fake), {}
