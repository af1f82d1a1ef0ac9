"""One-step diffusion distillation: the LightningModule base shared by DMD, Diff-Instruct and CM.

Notation (EDM sigma space): data :math:`x \\in [-1, 1]`, a noisy copy
:math:`x_\\sigma = x + \\sigma\\epsilon`, denoisers :math:`D(x_\\sigma; \\sigma, c)` that estimate
:math:`x` (:class:`~lightning_losses.diffusion.Denoiser`). The frozen teacher :math:`D_{real}` is
distilled into a one-step generator, a copy of the teacher evaluated once at the generator level
:math:`\\sigma_g` (the teacher's ``sigma_max`` unless set):

.. math::

    x = G(z) = D_G(\\sigma_g z;\\ \\sigma_g, c), \\qquad z \\sim \\mathcal{N}(0, I).

:class:`OneStepDistillation` holds the teacher, the generator and its EMA, the generator
objective, sampling, export, the data checks and the logging;
:class:`~lightning_losses.modules.score_distillation.ScoreDistillation` adds the fake denoiser of
DMD and Diff-Instruct; consistency distillation derives from the base. The generator objective
(:meth:`OneStepDistillation.generator_objective`) is
:math:`\\mathcal{L}_G = \\mathcal{L}_{base} + \\sum_k \\lambda_k L_k` over the
:class:`~lightning_losses.modules.supplementary.SupplementaryLoss` es (EL, ...) a config composes
(``supplementary_losses``; for EL also ``el_weight``).

Under DDP a step leaves parameters without gradient (the generator is not updated at every
step, or a second network is): use ``strategy="ddp_find_unused_parameters_true"`` in scripts and
``"ddp_fork_find_unused_parameters_true"`` (or its ``ddp_spawn`` twin) in notebooks / pytest on
the CPU.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_losses.checks import check_float, check_int, check_positive_int, describe
from lightning_losses.diffusion import Denoiser, split_real_batch, trusted_sigmas
from lightning_losses.diffusion.batches import RealBatch
from lightning_losses.diffusion.checks import (
    check_diffusion_images,
    check_diffusion_range,
    diffusion_image_extremes,
)
from lightning_losses.diffusion.loading import refuse_overwrite
from lightning_losses.modules._hparams import save_config_hyperparameters
from lightning_losses.modules._manual import ManualSteps
from lightning_losses.modules._noise import SeededNoise
from lightning_losses.modules.ema import ema_update
from lightning_losses.modules.supplementary import (
    SupplementaryLoss,
    collect_terms,
    weigh_terms,
)
from lightning_losses.modules.teacher import TEACHER_COMMAND, check_teacher_classes, load_teacher

__all__ = [
    "TEACHER_COMMAND",
    "GeneratorObjective",
    "OneStepDistillation",
    "RealBatch",
    "adamw",
    "load_teacher",
    "loss_logs",
    "split_real_batch",
]


def adamw(params: Any) -> torch.optim.Optimizer:
    """The default optimizer: AdamW, lr 1e-4, betas (0.9, 0.999), weight decay 0.01."""
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)


def loss_logs(prefix: str, output: NamedTuple) -> dict[str, Tensor]:
    """``{"train/<prefix>_<field>": value}`` for the fields after ``loss`` of a loss output."""
    return {f"train/{prefix}_{k}": v.detach() for k, v in output._asdict().items() if k != "loss"}


class GeneratorObjective(NamedTuple):
    """The generator objective and its parts.

    Attributes:
        loss: ``base + sum_k weight_k * terms[k]``, what is minimised.
        base: the framework's own loss (DMD, Diff-Instruct, consistency).
        terms: the UNWEIGHTED supplementary losses by name.
        logs: scalars to log (name -> detached tensor).
        base_output: the network output at which ``grad_norm_base`` is measured; None: the
            generated x (consistency distillation: its student's output on noisy real images).
        term_outputs: for a term whose loss is not a function of x (regression), the output
            its gradient norm is measured at.
    """

    loss: Tensor
    base: Tensor
    terms: dict[str, Tensor]
    logs: dict[str, Tensor]
    base_output: Tensor | None = None
    term_outputs: dict[str, Tensor] | None = None


class OneStepDistillation(SeededNoise, ManualSteps, L.LightningModule):
    """Base of the one-step distillation modules.

    **Networks.** The teacher comes as a module (``teacher``) or a folder (``teacher_path``,
    :func:`load_teacher`) and stays frozen (eval mode, ``requires_grad=False``). The generator
    starts as a deep copy of the teacher, or of ``generator`` (same channels, size, classes).
    ``class_conditional=True`` needs a conditional teacher; generated labels are uniform.

    **Schedule.** Manual optimisation. A training step draws z (and labels), generates
    x once (with gradient on a generator step: :meth:`is_generator_step`, every step here),
    updates the generator with :meth:`generator_objective` (backward, optional clipping to
    ``grad_clip``, step, EMA update), then calls :meth:`after_generator_step` (a subclass's second
    network). :meth:`train_step` runs one step without a Trainer (its optimizers from
    :meth:`configure_optimizers`) and returns the logs.

    **Supplementary losses.** ``supplementary_losses`` and, with ``el_weight > 0``, an
    :class:`~lightning_losses.modules.supplementary.EmbeddingSupplement` named ``"el"``. A term
    that needs real images needs ``(B, C, H, W)`` images of the teacher's shape in [-1, 1] in the
    batch; a batch smaller than its ``min_real_batch`` (EL: a last batch of 1) is skipped with a
    warning. Every batch with images is checked (one host read per step).

    **Randomness.** Every draw comes from the module's seeded generator
    (:class:`~lightning_losses.modules._noise.SeededNoise`).

    **EMA.** With ``ema_decay`` (None: none), ``generator_ema`` is a frozen copy updated after
    every generator step (:func:`~lightning_losses.modules.ema.ema_update`); :meth:`sample`
    uses it by default.

    **Logged** (``train/``, on generator steps): ``loss_generator``, ``loss_base``,
    ``loss_<name>`` per term, the framework's parts, ``generator_steps``; every
    ``log_grad_norm_every``-th generator step (every one with an automatic weight) the output
    gradient norms and ratios of :func:`~lightning_losses.modules.supplementary.weigh_terms`.

    Args:
        teacher: the teacher denoiser (a :class:`~lightning_losses.diffusion.Denoiser`).
        teacher_path: a local folder read by :func:`load_teacher` (when ``teacher`` is None).
        generator: the generator's initial network; None: a copy of the teacher.
        num_classes: number of classes (linked from the data module by the CLI).
        class_conditional: generate class-conditionally (the teacher must be conditional).
        supplementary_losses: terms added to the generator objective (unique names).
        el_weight: > 0 adds EL with this weight (or target ratio, ``el_weight_mode="auto"``).
        el_weight_mode: ``"fixed"`` or ``"auto"`` (see
            :class:`~lightning_losses.modules.supplementary.SupplementaryLoss`).
        embedding_loss: EL's module; None: the default random embedder bank.
        el_seed: seed of the default random embedder bank.
        generator_batch_size: samples generated per step; None: the real batch's size.
        generator_optimizer: builds the generator's optimizer from its parameters.
        grad_clip: clip the generator's gradient to this L2 norm (None: no clipping).
        ema_decay: constant EMA decay in [0, 1] of the generator; None: no EMA.
        log_grad_norm_every: log the output gradient norms every that many generator steps
            (0: never); one extra backward of each term to x.
        generator_sigma: :math:`\\sigma_g`; None: the teacher's ``sigma_max``.
        sigma_data: EDM's :math:`\\sigma_d`; None: the teacher's (0.5 when it has none).
    """

    #: Whether the base loss is a loss of the one-step samples x. When False (consistency: a
    #: loss on noisy REAL images) x is generated only for the supplementary losses.
    base_loss_uses_samples: ClassVar[bool] = True

    def __init__(
        self,
        teacher: nn.Module | None = None,
        teacher_path: str | None = None,
        generator: nn.Module | None = None,
        num_classes: int | None = None,
        class_conditional: bool = False,
        supplementary_losses: Sequence[SupplementaryLoss] | None = None,
        el_weight: float = 0.0,
        el_weight_mode: Literal["fixed", "auto"] = "fixed",
        embedding_loss: nn.Module | None = None,
        el_seed: int = 0,
        generator_batch_size: int | None = None,
        generator_optimizer: OptimizerCallable = adamw,
        grad_clip: float | None = None,
        ema_decay: float | None = 0.999,
        log_grad_norm_every: int = 10,
        generator_sigma: float | None = None,
        sigma_data: float | None = None,
    ) -> None:
        super().__init__()
        el_weight = check_float(el_weight, "el_weight", minimum=0.0)
        terms = collect_terms(
            supplementary_losses, el_weight, el_weight_mode, embedding_loss, el_seed
        )
        if generator_batch_size is not None:
            check_positive_int(generator_batch_size, "generator_batch_size")
        if grad_clip is not None:
            check_float(grad_clip, "grad_clip", minimum=0.0, strict_minimum=True)
        if ema_decay is not None:
            check_float(ema_decay, "ema_decay", minimum=0.0, maximum=1.0)
        check_int(log_grad_norm_every, "log_grad_norm_every", minimum=0)
        if num_classes is not None:
            check_positive_int(num_classes, "num_classes")
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
            ["teacher", "generator", "embedding_loss", "supplementary_losses"]
            + ["generator_optimizer", "fake_optimizer"],
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
        check_teacher_classes(teacher, num_classes, class_conditional)
        self.sigma_data = float(
            getattr(teacher, "sigma_data", 0.5) if sigma_data is None else sigma_data
        )
        check_float(self.sigma_data, "sigma_data", minimum=0.0, strict_minimum=True)
        self.generator_sigma = float(
            teacher.sigma_max if generator_sigma is None else generator_sigma
        )
        check_float(self.generator_sigma, "generator_sigma", minimum=0.0, strict_minimum=True)
        self.teacher = teacher.requires_grad_(False).eval()
        self.num_classes = teacher.num_classes if class_conditional else num_classes
        self.class_conditional = bool(class_conditional)
        generator = self.initial_generator(teacher, generator)
        self.generator = generator.requires_grad_(True).train()
        self.generator_ema: Denoiser | None = None
        if ema_decay is not None:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.build_networks()
        self.supplementary_losses = nn.ModuleList(terms)
        for term in terms:
            term.bind(self)
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.int64))

        self.el_weight = el_weight
        self.el_weight_mode = el_weight_mode
        self.generator_batch_size = generator_batch_size
        self.generator_optimizer = generator_optimizer
        self.grad_clip = grad_clip
        self.ema_decay = ema_decay
        self.log_grad_norm_every = int(log_grad_norm_every)
        self.automatic_optimization = False
        self._warned: set[str] = set()
        # Value checks queued during a training step, read at once (see defer_check).
        self._pending_checks: list[tuple[Tensor, Callable[[list[float]], None]]] = []
        self._deferring = False

    def build_networks(self) -> None:
        """Build a subclass's further networks (called before the supplementary losses bind)."""

    def initial_generator(self, teacher: Denoiser, generator: nn.Module | None) -> Denoiser:
        """The generator's first network: a deep copy of the teacher, or a checked ``generator``."""
        if generator is None:
            return copy.deepcopy(teacher)
        if not isinstance(generator, Denoiser):
            raise ValueError(f"generator must be a Denoiser, got {type(generator).__name__}")
        try:
            teacher.check_compatible(generator, name="the generator")
        except ValueError as err:
            raise ValueError(f"the generator does not fit the teacher: {err}") from err
        return generator

    @property
    def embedding_loss(self) -> nn.Module | None:
        """EL's module (the ``"el"`` term's), None without EL."""
        term = self.supplementary("el")
        return None if term is None else term.embedding_loss

    def supplementary(self, name: str) -> SupplementaryLoss | None:
        """The supplementary loss called ``name`` (None if there is none)."""
        return next((t for t in self.supplementary_losses if t.name == name), None)

    @property
    def needs_real_images(self) -> bool:
        return any(term.needs_real_images for term in self.supplementary_losses)

    @property
    def needs_samples(self) -> bool:
        """Whether a training step generates one-step samples."""
        return self.base_loss_uses_samples or len(self.supplementary_losses) > 0

    # --------------------------------------------------------------------------------------
    # Shapes, randomness, generation

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the generated images (the teacher's)."""
        size = self.teacher.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (self.teacher.in_channels, int(height), int(width))

    def step_counters(self) -> tuple[int, int]:
        """``(fake_steps, generator_steps)``; no fake denoiser here: ``(0, generator_steps)``."""
        return (0, self.host_count("generator_steps"))

    def sample_labels(self, n: int) -> Tensor | None:
        """Uniform class labels for ``n`` generated samples (None when unconditional)."""
        return self.randint(0, self.num_classes, n) if self.class_conditional else None

    def generate(
        self, z: Tensor, class_labels: Tensor | None = None, network: nn.Module | None = None
    ) -> Tensor:
        """One step from standard normal ``z``: ``network(sigma_g z, sigma_g, class_labels)``
        (``network``: the trained generator by default)."""
        network = self.generator if network is None else network
        return network(self.generator_sigma * z, self.generator_sigma, class_labels)

    def sampling_network(self, use_ema: bool = True) -> nn.Module:
        """The EMA generator when asked and present, else the trained one."""
        if use_ema and self.generator_ema is not None:
            return self.generator_ema
        return self.generator

    def draw_noise(
        self, n: int, class_labels: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]:
        """z, then the labels when conditional and not given, from ``generator`` (on its own
        device), both moved to the module's device."""
        check_positive_int(n, "n")
        if class_labels is not None and not self.class_conditional:
            raise ValueError("class_labels were given but the generator is unconditional")
        device = generator.device if generator is not None else self.device
        z = torch.randn((n, *self.image_shape), generator=generator, device=device)
        if self.class_conditional and class_labels is None:
            class_labels = torch.randint(
                0, self.num_classes, (n,), generator=generator, device=device
            )
        return z.to(self.device), None if class_labels is None else class_labels.to(self.device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        class_labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """``n`` one-step samples on the module's device: :meth:`finish_samples` of the
        generated images (here not clamped; about [-1, 1]).

        Args:
            n: number of samples.
            class_labels: ``(n,)`` integer classes of a conditional generator (uniform if None).
            generator: a ``torch.Generator`` for z (then the labels); None: the global RNG.
            use_ema: the EMA generator (when there is one; else the trained generator).
        """
        z, class_labels = self.draw_noise(n, class_labels, generator)
        return self.finish_samples(self.generate(z, class_labels, self.sampling_network(use_ema)))

    def finish_samples(self, x: Tensor) -> Tensor:
        """What :meth:`sample` makes of the generator's output ``x``: ``x`` itself here (a
        subclass may clip it)."""
        return x

    # --------------------------------------------------------------------------------------
    # Objectives

    def base_generator_loss(
        self, x: Tensor, class_labels: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The framework's generator loss of samples x (with gradient) and extra logs."""
        raise NotImplementedError

    def base_objective(
        self,
        x: Tensor | None,
        class_labels: Tensor | None,
        real: Tensor | None,
        real_labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """The base loss, its logs, and where ``grad_norm_base`` is taken (None: at x).

        Default: :meth:`base_generator_loss` of the generated x. A framework whose loss is not a
        function of x (``base_loss_uses_samples = False``) overrides this.
        """
        base, logs = self.base_generator_loss(x, class_labels)
        return base, logs, None

    def generator_objective(
        self,
        x: Tensor | None,
        real: Tensor | None,
        class_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
        grad_norms: bool = False,
    ) -> GeneratorObjective:
        """``base + sum_k weight_k * L_k(x, real)``; with ``grad_norms`` (or an automatic
        weight) also the output gradient norms and ratios in the logs.

        An automatic weight is :math:`\\lambda_k = r_k \\lVert\\nabla \\mathcal{L}_{base}\\rVert
        / \\lVert\\nabla_x L_k\\rVert` (no gradient through it; norms averaged over ranks; 0
        when the term's gradient is 0).

        Raises:
            ValueError: when a term needs real images and ``real`` is None.
        """
        base, logs, base_output = self.base_objective(x, class_labels, real, real_labels)
        logs = dict(logs)
        terms: dict[str, Tensor] = {}
        outputs: dict[str, Tensor] = {}
        for term in self.supplementary_losses:
            if term.needs_real_images and real is None:
                raise ValueError(self._missing_real_message())
            value = term(x, real, class_labels, real_labels, module=self)
            if isinstance(value, tuple):  # (loss, the output it is measured at)
                value, outputs[term.name] = value
            terms[term.name] = value
        reduce = None
        if self._trainer is not None and self.trainer.world_size > 1:
            reduce = functools.partial(self.trainer.strategy.reduce, reduce_op="mean")
        due = grad_norms or any(t.weight_mode == "auto" for t in self.supplementary_losses)
        norms = None
        if due:
            objective = GeneratorObjective(base, base, terms, logs, base_output, outputs)
            norms = self.output_grad_norms(x, objective)
        loss, weighted = weigh_terms(base, terms, self.supplementary_losses, norms, reduce)
        logs.update(weighted)
        return GeneratorObjective(loss, base, terms, logs, base_output, outputs)

    def output_grad_norms(self, x: Tensor | None, objective: GeneratorObjective) -> dict:
        """L2 norms over the batch of d(base)/d(base output or x) and of each d(term)/dx
        (``train/grad_norm_base``, ``train/grad_norm_<name>``); the graph is retained."""
        base_at = x if objective.base_output is None else objective.base_output
        measured = {"base": (objective.base, base_at)}
        at = objective.term_outputs or {}
        measured.update({name: (term, at.get(name, x)) for name, term in objective.terms.items()})
        norms = {}
        for name, (term, at) in measured.items():
            (grad,) = torch.autograd.grad(term, at, retain_graph=True, allow_unused=True)
            norm = torch.zeros((), device=at.device) if grad is None else grad.detach().float()
            norms[f"train/grad_norm_{name}"] = norm.norm()
        return norms

    # --------------------------------------------------------------------------------------
    # Data checks

    def _missing_real_message(self) -> str:
        names = [t.name for t in self.supplementary_losses if t.needs_real_images]
        return (
            f"the supplementary loss(es) {names} need REAL images from the data module: the "
            "batch must be a (B, C, H, W) image tensor, an (images, labels) pair or a dict with "
            "'images'; set el_weight: 0 for distillation without EL"
        )

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def check_real_images(self, images: Tensor, defer: bool = False) -> None:
        """Raise ValueError unless ``images`` fit the teacher's shape and hold finite values in
        [-1, 1] (one host read; with ``defer``, the value check joins :meth:`read_checks`)."""
        channels, height, width = self.image_shape
        if not defer:
            looks_unit = check_diffusion_images(images, channels, (height, width), "real images")
            self._warn_if_unit(looks_unit)
            return
        extremes = diffusion_image_extremes(images, channels, (height, width), "real images")

        def verdict(values: list[float]) -> None:
            self._warn_if_unit(check_diffusion_range(*values, "real images"))

        self.defer_check(extremes, verdict)

    def _warn_if_unit(self, looks_unit: bool) -> None:
        if looks_unit:
            self.warn_once(
                "range",
                "a real batch lies in [0, 1], which looks like [0, 1] data; the teacher "
                'expects [-1, 1] (normalize="symmetric")',
            )

    @property
    def defers_checks(self) -> bool:
        """Whether value checks may be queued now (inside :meth:`train_step`)."""
        return self._deferring

    def defer_check(self, values: Tensor, verdict: Callable[[list[float]], None]) -> None:
        """Queue a value check for the training step's ONE host read (:meth:`read_checks`,
        before its first optimizer update): ``values`` a tensor, not read here; ``verdict``
        gets them as floats and raises or warns. Outside :meth:`train_step` it is read now."""
        self._pending_checks.append((values.detach().float().reshape(-1), verdict))
        if not self._deferring:
            self.read_checks()

    def read_checks(self) -> None:
        """Read every queued check in one device-to-host copy; give each its verdict, in the
        order they were queued (the real batch's first)."""
        pending, self._pending_checks = self._pending_checks, []
        if not pending:
            return
        values = torch.cat([v for v, _ in pending]).tolist()
        start = 0
        for tensor, verdict in pending:
            verdict(values[start : start + tensor.numel()])
            start += tensor.numel()

    def optimizer_step(self, optimizer: Any, loss: Tensor, clip: float | None) -> None:
        """:meth:`read_checks` first (no update on unchecked data), then the update."""
        self.read_checks()
        super().optimizer_step(optimizer, loss, clip)

    # --------------------------------------------------------------------------------------
    # Training

    def is_generator_step(self) -> bool:
        """Whether this training step updates the generator (here: every step)."""
        return True

    def generator_update(
        self, x: Tensor | None, real: RealBatch, class_labels: Tensor | None
    ) -> dict[str, Tensor]:
        """One generator step on samples x; returns its logs."""
        step = self.host_count("generator_steps")
        for term in self.supplementary_losses:
            term.on_generator_step(step)
        due = bool(self.log_grad_norm_every) and step % self.log_grad_norm_every == 0
        objective = self.generator_objective(x, real.images, class_labels, real.labels, due)
        logs = {
            "train/loss_generator": objective.loss.detach(),
            "train/loss_base": objective.base.detach(),
            **{f"train/loss_{k}": v.detach() for k, v in objective.terms.items()},
            **objective.logs,
        }
        self.optimizer_step(self.step_optimizers()[0], objective.loss, self.grad_clip)
        self.advance("generator_steps")
        if self.generator_ema is not None:
            self.update_ema()
        logs["train/generator_steps"] = self.generator_steps.detach().float()
        return logs

    def after_generator_step(
        self, x: Tensor | None, real: RealBatch, class_labels: Tensor | None
    ) -> dict[str, Tensor]:
        """What a step does after the generator's (a second network's update); its logs."""
        return {}

    def train_step(self, batch: Any) -> dict[str, Tensor]:
        """One training step (the schedule in the class docstring); returns the logs.

        Callable without a Trainer (benchmarks, notebooks): optimizers from
        :meth:`configure_optimizers`, plain backward and clipping. The value checks of the
        step (the real batch's range, EL's finiteness) are read at once, before its first
        update: one host read.
        """
        self._pending_checks, self._deferring = [], True
        try:
            logs = self._train_step(batch)
            self.read_checks()
        finally:
            self._pending_checks, self._deferring = [], False
        return logs

    def _train_step(self, batch: Any) -> dict[str, Tensor]:
        real = split_real_batch(batch)
        if real.images is not None:
            self.check_real_images(real.images, defer=True)
        elif self.needs_real_images:
            raise ValueError(self._missing_real_message() + f"; got {describe(batch)}")
        smallest = max((t.min_real_batch for t in self.supplementary_losses), default=1)
        if real.images is not None and real.size < smallest:
            self.warn_once(
                "small",
                f"a training batch holds {real.size} real image(s) but the supplementary losses "
                f"need at least {smallest} (EL's unbiased MMD: 2): such batches are skipped. Set "
                "the data's batch size so that no last batch of 1 remains, or drop_last=True",
            )
            return {}
        n = self.generator_batch_size or real.size
        if n is None:
            raise ValueError(
                "cannot tell how many samples to generate: the batch holds no tensor; set "
                "generator_batch_size"
            )
        generator_step = self.is_generator_step()
        x = class_labels = None
        with trusted_sigmas():  # levels come from tables checked at construction
            if self.needs_samples:
                z = self.randn(n, *self.image_shape)
                class_labels = self.sample_labels(n)
                with torch.set_grad_enabled(generator_step):
                    x = self.generate(z, class_labels)
            logs: dict[str, Tensor] = {}
            if generator_step:
                logs.update(self.generator_update(x, real, class_labels))
            logs.update(self.after_generator_step(x, real, class_labels))
        return logs

    def training_step(self, batch: Any, batch_idx: int) -> None:
        logs = self.train_step(batch)
        if logs:
            n = self.generator_batch_size or split_real_batch(batch).size
            self.log_dict(logs, on_step=True, on_epoch=False, batch_size=n)

    def on_train_start(self) -> None:
        self.seed_noise()  # per rank, after a resume too

    def update_ema(self, decay: float | None = None) -> None:
        """``ema = decay * ema + (1 - decay) * generator`` (:func:`~.ema.ema_update`)."""
        if self.generator_ema is None:
            raise RuntimeError("ema_decay=None: there is no EMA generator")
        ema_update(self.generator_ema, self.generator, self.ema_decay if decay is None else decay)

    def train(self, mode: bool = True) -> OneStepDistillation:
        """Set the mode; the teacher and the EMA generator stay in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.generator_ema is not None:
            self.generator_ema.eval()
        return self

    def configure_optimizers(self) -> Any:
        return self.generator_optimizer(self.generator.parameters())

    # --------------------------------------------------------------------------------------
    # Export

    def to_pipeline(self, use_ema: bool = True, copy_weights: bool = True) -> Any:
        """The generator as a :class:`~lightning_losses.diffusion.pipelines.OneStepPipeline`
        (ValueError unless it is a UNetPrecond or DiffusersEpsDenoiser around a diffusers
        ``UNet2DModel``); ``pipeline(batch_size=n, generator=g, output_type="pt").images``
        equals ``self.sample(n, generator=g, use_ema=use_ema)`` for equally seeded ``g``."""
        from lightning_losses.diffusion.pipelines import one_step_pipeline_from_denoiser

        return one_step_pipeline_from_denoiser(
            self.sampling_network(use_ema), self.generator_sigma, copy_weights=copy_weights
        )

    def save_pretrained(
        self, path: str | os.PathLike[str], use_ema: bool = True, overwrite: bool = False
    ) -> Path:
        """Write the generator as a diffusers pipeline folder (:meth:`to_pipeline`,
        safetensors) and return it; reload it offline with that pipeline's ``from_pretrained``
        (here ``OneStepPipeline.from_pretrained``).

        Args:
            path: the folder (created if missing).
            use_ema: save the EMA generator (when there is one; else the trained generator).
            overwrite: write into a folder that already holds a saved model (a teacher, ...).

        Raises:
            FileExistsError: when ``path`` holds a saved model and ``overwrite`` is False.
        """
        root = refuse_overwrite(path, overwrite)
        pipeline = self.to_pipeline(use_ema=use_ema, copy_weights=False)
        root.mkdir(parents=True, exist_ok=True)
        pipeline.save_pretrained(root, safe_serialization=True)
        return root
