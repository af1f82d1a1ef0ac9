"""Supplementary generator losses: terms a config adds to a distillation's generator objective.

A :class:`SupplementaryLoss` is an ``nn.Module`` returning an UNWEIGHTED scalar of the one-step
samples (and, when it needs them, a real batch); the distillation module adds
``weight * loss`` to its base loss
(:meth:`~lightning_losses.modules.distillation.OneStepDistillation.generator_objective`). The
weight is fixed, or automatic (``weight_mode="auto"``: the term's gradient norm at the generator
output held at ``weight`` times the base loss's, OUR option). Each term is logged under its own
``name``: ``train/loss_<name>``, ``train/grad_norm_<name>``, ``train/grad_norm_ratio_<name>`` and,
when automatic, ``train/weight_<name>``.

:class:`EmbeddingSupplement` is the Embedding Loss (EL): MMD^2 between generated and real images
in the feature spaces of random frozen networks (:class:`~lightning_losses.losses.EmbeddingLoss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from lightning_losses.checks import check_choice, check_float, check_int
from lightning_losses.losses.embedding import EmbeddingLoss
from lightning_losses.nets.embedders import RandomEmbedderBank

__all__ = [
    "WEIGHT_MODES",
    "EmbeddingSupplement",
    "SupplementaryLoss",
    "collect_terms",
    "weigh_terms",
]

WEIGHT_MODES = ("fixed", "auto")


class SupplementaryLoss(nn.Module):
    """Base of the supplementary generator losses.

    Subclasses implement :meth:`forward` (the unweighted loss, with gradient to ``x``) and may
    override :meth:`bind` (called once by the module at construction: build what needs the
    image shape) and :meth:`on_generator_step` (called before every generator step).

    Args:
        weight: :math:`\\lambda \\ge 0` (fixed mode), or the target ratio
            :math:`r = \\lambda \\lVert\\nabla_x L\\rVert / \\lVert\\nabla \\mathcal{L}_{base}
            \\rVert` (auto mode).
        weight_mode: ``"fixed"`` or ``"auto"``.
        name: the name the term is logged under (unique within a module).
    """

    #: Whether :meth:`forward` needs a real batch (then a batch without images is an error).
    needs_real_images: ClassVar[bool] = False
    #: The smallest real batch the term accepts; smaller batches are skipped by the module.
    min_real_batch: ClassVar[int] = 1

    def __init__(
        self, weight: float = 1.0, weight_mode: Literal["fixed", "auto"] = "fixed", name: str = ""
    ) -> None:
        super().__init__()
        self.weight = check_float(weight, "weight", minimum=0.0)
        self.weight_mode = check_choice(weight_mode, "weight_mode", WEIGHT_MODES)
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be a non-empty identifier, got {name!r}")
        self.name = name

    def bind(self, module: Any) -> None:
        """Called by the distillation module once, at its construction."""

    def on_generator_step(self, step: int) -> None:
        """Called before every generator step with the number of steps done."""

    def forward(
        self,
        x: Tensor,
        real: Tensor | None,
        class_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
        module: Any = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The unweighted loss of generated ``x`` (with gradient), given a real batch and the
        distillation ``module``; or ``(loss, output)`` when the loss is not a function of x,
        ``output`` being the generator output its gradient norm is measured at."""
        raise NotImplementedError

    def discriminator_loss(
        self,
        x: Tensor,
        real: Tensor,
        class_labels: Tensor | None,
        real_labels: Tensor | None,
        module: Any,
    ) -> tuple[Tensor, dict[str, Tensor]] | None:
        """A term added to the fake denoiser's loss (its logs), or None (the default)."""
        return None

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the fake denoiser's optimizer (a GAN head's)."""
        return []


class EmbeddingSupplement(SupplementaryLoss):
    """The Embedding Loss (EL) as a supplementary loss.

    ``embedding_loss(x, real, class_labels, real_labels)``; None: the default
    ``EmbeddingLoss(RandomEmbedderBank(C, seed=seed))`` of the module's C channels, built at
    :meth:`bind`. A bank with ``maybe_resample`` is re-drawn from the generator step count (the
    same on every rank). EL's unbiased MMD needs at least 2 real images.

    Args:
        weight, weight_mode, name: as :class:`SupplementaryLoss` (name ``"el"``).
        embedding_loss: the EL module (returns a tensor or an object with ``.loss``).
        seed: seed of the default random embedder bank.
    """

    needs_real_images = True
    min_real_batch = 2

    def __init__(
        self,
        weight: float = 1.0,
        weight_mode: Literal["fixed", "auto"] = "fixed",
        embedding_loss: nn.Module | None = None,
        seed: int = 0,
        name: str = "el",
    ) -> None:
        super().__init__(weight, weight_mode, name)
        if embedding_loss is not None and not isinstance(embedding_loss, nn.Module):
            raise ValueError(
                f"embedding_loss must be an nn.Module, got {type(embedding_loss).__name__}"
            )
        self.seed = check_int(seed, "seed")
        self.embedding_loss = embedding_loss

    def bind(self, module: Any) -> None:
        if self.embedding_loss is None:
            channels = module.image_shape[0]
            self.embedding_loss = EmbeddingLoss(RandomEmbedderBank(channels, seed=self.seed))

    def on_generator_step(self, step: int) -> None:
        bank = getattr(self.embedding_loss, "bank", None)
        if hasattr(bank, "maybe_resample"):
            bank.maybe_resample(step)

    def forward(
        self,
        x: Tensor,
        real: Tensor | None,
        class_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
        module: Any = None,
    ) -> Tensor:
        loss = self.embedding_loss
        if getattr(module, "defers_checks", False) and hasattr(loss, "unchecked"):
            # EL's finiteness flag joins the training step's one host read.
            output, ok = loss.unchecked(x, real, class_labels, real_labels)

            def verdict(values: list[float]) -> None:
                if not values[0]:
                    loss.raise_for(x, real, output)

            module.defer_check(ok, verdict)
            return output.loss
        out = loss(x, real, class_labels, real_labels)
        return out if isinstance(out, Tensor) else out.loss


def collect_terms(
    supplementary_losses: Sequence[SupplementaryLoss] | None,
    el_weight: float = 0.0,
    el_weight_mode: str = "fixed",
    embedding_loss: nn.Module | None = None,
    el_seed: int = 0,
) -> list[SupplementaryLoss]:
    """The terms of a module: ``supplementary_losses``, after an ``"el"``
    :class:`EmbeddingSupplement` when ``el_weight > 0`` (the modules' EL shorthand).

    Raises:
        ValueError: for a term that is not a :class:`SupplementaryLoss`, or two with one name.
    """
    terms = list(supplementary_losses or ())
    for term in terms:
        if not isinstance(term, SupplementaryLoss):
            raise ValueError(
                "supplementary_losses must hold SupplementaryLoss modules, got "
                f"{type(term).__name__}"
            )
    check_choice(el_weight_mode, "el_weight_mode", WEIGHT_MODES)
    if el_weight > 0:
        terms.insert(0, EmbeddingSupplement(el_weight, el_weight_mode, embedding_loss, el_seed))
    names = [term.name for term in terms]
    if len(set(names)) != len(names):
        raise ValueError(f"supplementary losses must have unique names, got {names}")
    return terms


def weigh_terms(
    base: Tensor,
    terms: dict[str, Tensor],
    losses: Sequence[SupplementaryLoss],
    norms: dict[str, Tensor] | None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``base + sum_k weight_k * terms[k]`` and the logs of the weights and ratios.

    An automatic weight is :math:`\\lambda_k = r_k \\lVert\\nabla \\mathcal{L}_{base}\\rVert
    / \\lVert\\nabla_x L_k\\rVert` (no gradient through it; 0 when the term's gradient is 0),
    from ``norms`` (``train/grad_norm_base`` and ``train/grad_norm_<name>``, averaged over ranks
    with ``reduce``, e.g. the strategy's mean). With ``norms``, the logs hold them and
    ``train/grad_norm_ratio_<name> = weight * grad_norm_<name> / grad_norm_base`` (NaN when the
    base gradient is exactly 0) and, for automatic weights, ``train/weight_<name>``.

    Raises:
        ValueError: when a term has an automatic weight but ``norms`` is None.
    """
    weights: dict[str, Tensor | float] = {}
    logs: dict[str, Tensor] = {}
    auto = [t for t in losses if t.weight_mode == "auto"]
    if auto and norms is None:
        raise ValueError("automatic weights need the output gradient norms")
    if norms is not None:
        norms = dict(norms)
        if auto and reduce is not None:  # one weight on every rank
            for key in ["base"] + [t.name for t in auto]:
                norms[f"train/grad_norm_{key}"] = reduce(norms[f"train/grad_norm_{key}"])
        base_norm = norms["train/grad_norm_base"]
        for t in auto:
            norm = norms[f"train/grad_norm_{t.name}"]
            weight = torch.where(
                norm > 0, t.weight * base_norm / norm.clamp_min(1e-30), torch.zeros_like(norm)
            ).detach()
            weights[t.name] = logs[f"train/weight_{t.name}"] = weight
    for t in losses:
        weights.setdefault(t.name, t.weight)
    if norms is not None:
        for name in terms:
            ratio = weights[name] * norms[f"train/grad_norm_{name}"] / base_norm
            norms[f"train/grad_norm_ratio_{name}"] = torch.where(base_norm > 0, ratio, float("nan"))
        logs.update(norms)
    loss = base
    for name, value in terms.items():
        loss = loss + weights[name] * value
    return loss, logs
