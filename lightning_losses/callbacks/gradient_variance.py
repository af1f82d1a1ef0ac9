"""The generator's gradient noise at fixed weights, and its floor as the batch grows.

For K independent mini-batches of size B drawn at the SAME weights :math:`\\theta`, with
:math:`g_k = \\nabla_\\theta \\mathcal L(\\text{batch}_k)` flattened over the chosen parameters,

.. math::

    V(B) = \\frac{1}{K - 1} \\sum_{k=1}^{K} \\lVert g_k - \\bar g \\rVert_2^2
    \\qquad (\\bar g = \\tfrac1K \\textstyle\\sum_k g_k),

the unbiased estimate of the trace of the gradient's covariance. For a mean over B i.i.d.
per-sample terms :math:`V(B) = b / B`; a loss whose noise does not average out over the batch
(a shared noise draw, a moving target such as DMD's fake denoiser) has a floor,
:math:`V(B) = a + b / B`. :func:`fit_variance_floor` fits ``a`` and ``b`` by least squares in
:math:`1 / B` (the EL paper's claim: EL lowers DMD's floor ``a``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_losses.callbacks._hooks import StepScheduleHooks, generation_step
from lightning_losses.checks import check_int, check_positive_int

__all__ = [
    "GradientVarianceCallback",
    "VarianceFloor",
    "fit_variance_floor",
    "generator_gradient_variance",
    "gradient_variance",
]

LossFn = Callable[[int], Mapping[str, Tensor] | Tensor]


def gradient_variance(
    loss_fn: LossFn, parameters: Iterable[nn.Parameter], num_batches: int = 8
) -> dict[str, float]:
    """:math:`V` of each named loss over ``num_batches`` independent draws (module docstring).

    Args:
        loss_fn: ``loss_fn(k)`` draws the k-th independent mini-batch and returns a scalar loss
            or a mapping ``{name: scalar loss}`` (e.g. the base loss and base + EL); it must
            not step any optimizer (the weights stay fixed).
        parameters: the parameters whose gradient is measured (e.g. the generator's).
        num_batches: K >= 2.

    Returns:
        ``{name: V}`` as Python floats (float64 accumulation).

    Raises:
        ValueError: for K < 2, no parameters with ``requires_grad``, or a loss that is not a
            finite scalar.
    """
    check_int(num_batches, "num_batches", minimum=2)
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("parameters must hold at least one tensor with requires_grad=True")
    sums: dict[str, Tensor] = {}
    squares: dict[str, Tensor] = {}
    for k in range(num_batches):
        losses = loss_fn(k)
        if isinstance(losses, Tensor):
            losses = {"loss": losses}
        for name, loss in losses.items():
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn({k})[{name!r}] must be a scalar tensor")
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            flat = torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).detach().double().flatten()
                    for p, g in zip(params, grads)
                ]
            )
            if not bool(torch.isfinite(flat).all()):
                raise ValueError(f"loss_fn({k})[{name!r}] has a non-finite gradient")
            sums[name] = sums.get(name, 0) + flat
            squares[name] = squares.get(name, 0) + flat.square().sum()
    # sum_k ||g_k - mean||^2 = sum_k ||g_k||^2 - ||sum_k g_k||^2 / K
    return {
        name: float((squares[name] - sums[name].square().sum() / num_batches) / (num_batches - 1))
        for name in sums
    }


class VarianceFloor(NamedTuple):
    """The fit :math:`V(B) = a + b / B`: ``floor`` is a, ``slope`` b, ``residual`` the RMS error."""

    floor: float
    slope: float
    residual: float


def fit_variance_floor(batch_sizes: Sequence[int], variances: Sequence[float]) -> VarianceFloor:
    """Least-squares :math:`a + b / B` through the points ``(B_i, V_i)`` (at least 2 sizes).

    Raises:
        ValueError: for fewer than two distinct batch sizes, lengths that differ, a batch size
            < 1 or a non-finite variance.
    """
    if len(batch_sizes) != len(variances):
        raise ValueError(
            f"batch_sizes ({len(batch_sizes)}) and variances ({len(variances)}) must have "
            "one length"
        )
    for size in batch_sizes:
        check_int(size, "batch_sizes[i]", minimum=1)
    if len(set(batch_sizes)) < 2:
        raise ValueError(f"batch_sizes must hold at least two distinct sizes, got {batch_sizes}")
    x = torch.tensor([1.0 / b for b in batch_sizes], dtype=torch.float64)
    y = torch.tensor([float(v) for v in variances], dtype=torch.float64)
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"variances must be finite, got {list(variances)}")
    design = torch.stack([torch.ones_like(x), x], dim=1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    residual = (design @ solution - y).square().mean().sqrt()
    return VarianceFloor(float(solution[0]), float(solution[1]), float(residual))


def generator_gradient_variance(
    module: Any,
    real_images: Tensor,
    batch_sizes: Sequence[int] = (16, 64, 256),
    num_batches: int = 8,
    real_labels: Tensor | None = None,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """:math:`V(B)` of a distillation module's generator objectives at its current weights.

    For every batch size B, ``num_batches`` independent draws of B noises (and B real images
    from ``real_images``, without replacement) give the gradients with respect to the
    generator's parameters of the base loss (``"base"``) and of base + each supplementary term
    at its weight (``"base+<name>"``; an automatic weight as the step would compute it). The
    module's own noise stream is saved and restored, so training continues exactly as
    without the diagnostic; no optimizer is stepped.

    Args:
        module: a :class:`~lightning_losses.modules.distillation.OneStepDistillation`.
        real_images: ``(N, C, H, W)`` real images in [-1, 1], ``N >= max(batch_sizes)``.
        batch_sizes: the Bs to measure (>= 2 distinct for :func:`fit_variance_floor`).
        num_batches: K >= 2 draws per B.
        real_labels: ``(N,)`` labels of the real images, for class-conditional terms.
        seed: seeds the draws (noise and the choice of real images).

    Returns:
        ``{objective: {B: V(B)}}``.

    Raises:
        ValueError: for fewer real images than the largest batch, or bad sizes.
    """
    from lightning_losses.diffusion import trusted_sigmas

    sizes = [check_positive_int(b, "batch_sizes[i]") for b in batch_sizes]
    if not sizes:
        raise ValueError("batch_sizes must hold at least one size")
    if real_images.ndim != 4 or real_images.shape[0] < max(sizes):
        raise ValueError(
            f"real_images must be (N, C, H, W) with N >= max(batch_sizes) = {max(sizes)}, got "
            f"{tuple(real_images.shape)}"
        )
    saved_rng, was_training = module._rng, module.training
    picker = torch.Generator().manual_seed(int(seed))
    results: dict[str, dict[int, float]] = {}
    try:
        module.seed_noise(int(seed))
        module.train()
        params = list(module.generator.parameters())
        for size in sizes:

            def loss_fn(k: int, size: int = size) -> dict[str, Tensor]:
                index = torch.randperm(real_images.shape[0], generator=picker)[:size]
                real = real_images[index].to(module.device)
                labels = None if real_labels is None else real_labels[index].to(module.device)
                z = module.randn(size, *module.image_shape)
                class_labels = module.sample_labels(size)
                with trusted_sigmas():
                    x = module.generate(z, class_labels)
                    objective = module.generator_objective(x, real, class_labels, labels)
                losses = {"base": objective.base}
                for term in module.supplementary_losses:
                    weight = objective.logs.get(f"train/weight_{term.name}", term.weight)
                    losses[f"base+{term.name}"] = (
                        objective.base + weight * objective.terms[term.name]
                    )
                return losses

            for name, value in gradient_variance(loss_fn, params, num_batches).items():
                results.setdefault(name, {})[size] = value
    finally:
        module._rng = saved_rng
        module.train(was_training)
        module.zero_grad(set_to_none=True)
    return results


class GradientVarianceCallback(StepScheduleHooks):
    """Measure :func:`generator_gradient_variance` at the end of training (and every
    ``every_n_generator_steps`` if set), fit :math:`a + b / B` per objective, log and keep it.

    Logged (to the trainer's loggers) as ``diag/grad_var_<objective>_B<B>`` and
    ``diag/grad_var_floor_<objective>``; every measurement is appended to ``self.history`` as
    ``{"step", "variances", "floors"}``. Real images come from the training data loader (the
    first batches, up to ``num_real`` images).

    Args:
        batch_sizes: the Bs (at least two distinct ones).
        num_batches: K draws per B.
        num_real: how many real images to draw the real batches from (>= max(batch_sizes)).
        every_n_generator_steps: also measure during training; None: only at the end.
        seed: seeds the draws.
    """

    def __init__(
        self,
        batch_sizes: Sequence[int] = (16, 64, 256),
        num_batches: int = 8,
        num_real: int = 512,
        every_n_generator_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_sizes = [check_positive_int(b, "batch_sizes[i]") for b in batch_sizes]
        if len(set(self.batch_sizes)) < 2:
            raise ValueError(f"batch_sizes needs two distinct sizes, got {list(batch_sizes)}")
        self.num_batches = check_int(num_batches, "num_batches", minimum=2)
        self.num_real = check_int(num_real, "num_real", minimum=max(self.batch_sizes))
        self.every_n_steps = None
        if every_n_generator_steps is not None:
            self.every_n_steps = check_positive_int(
                every_n_generator_steps, "every_n_generator_steps"
            )
        self.seed = check_int(seed, "seed")
        self.history: list[dict[str, Any]] = []
        self._real: tuple[Tensor, Tensor | None] | None = None
        self._last_step = None

    def _real_pool(self, trainer: L.Trainer) -> tuple[Tensor, Tensor | None]:
        if self._real is None:
            from lightning_losses.diffusion import split_real_batch

            images, labels = [], []
            for batch in trainer.train_dataloader:
                real = split_real_batch(batch)
                if real.images is None:
                    raise ValueError("GradientVarianceCallback needs real images in the batches")
                images.append(real.images)
                labels.append(real.labels)
                if sum(len(i) for i in images) >= self.num_real:
                    break
            pool = torch.cat(images)[: self.num_real]
            if pool.shape[0] < max(self.batch_sizes):
                raise ValueError(
                    f"the training data holds {pool.shape[0]} images, fewer than the largest "
                    f"batch size {max(self.batch_sizes)}"
                )
            pool_labels = None
            if all(label is not None for label in labels):
                pool_labels = torch.cat(labels)[: self.num_real]
            self._real = (pool, pool_labels)
        return self._real

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Measure now; returns (and appends to ``history``) the record."""
        images, labels = self._real_pool(trainer)
        variances = generator_gradient_variance(
            pl_module, images, self.batch_sizes, self.num_batches, labels, self.seed
        )
        floors = {
            name: fit_variance_floor(list(by_size), list(by_size.values()))
            for name, by_size in variances.items()
        }
        step = generation_step(trainer, pl_module)
        record = {"step": step, "variances": variances, "floors": floors}
        self.history.append(record)
        metrics = {
            f"diag/grad_var_{name}_B{size}": value
            for name, by_size in variances.items()
            for size, value in by_size.items()
        }
        metrics.update({f"diag/grad_var_floor_{n}": f.floor for n, f in floors.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        summary = ", ".join(f"{n}: a={f.floor:.4g}, b={f.slope:.4g}" for n, f in floors.items())
        rank_zero_info(f"gradient variance at generator step {step}: {summary}")
        return record

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self.measure(trainer, pl_module)
