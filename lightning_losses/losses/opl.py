"""Orthogonal Projection Loss (Ranasinghe et al., ICCV 2021).

With row-normalised features :math:`f_i = F_i / \\lVert F_i \\rVert` and labels :math:`y_i`,

.. math::

    s = \\frac{\\sum_{i \\ne j,\\, y_i = y_j} f_i \\cdot f_j}{N_{pos} + \\epsilon}, \\qquad
    d = \\frac{\\sum_{y_i \\ne y_j} f_i \\cdot f_j}{N_{neg} + \\epsilon}, \\qquad
    \\mathrm{OPL} = (1 - s) + \\gamma\\, d,

pairs counted in both orders and :math:`\\epsilon = 10^{-6}` as in the authors' code.
``abs_mode`` picks the variant of :math:`d`: ``"none"`` (the reference ``loss.py``), ``"mean"``
(:math:`|d|`, the paper's equation) or ``"pair"`` (mean of :math:`|f_i \\cdot f_j|` over negative
pairs, the authors' CIFAR / ImageNet / label-noise code).

``"none"`` and ``"mean"`` never build the B x B Gram matrix: with class sums
:math:`S_c = \\sum_{y_i = c} f_i` and :math:`S = \\sum_c S_c`,

.. math::

    \\sum_{pos} = \\sum_c \\big(\\lVert S_c \\rVert^2 - \\sum_{y_i = c} \\lVert f_i \\rVert^2\\big),
    \\qquad \\sum_{neg} = \\lVert S \\rVert^2 - \\sum_c \\lVert S_c \\rVert^2,

which is O(B D) time and memory. Their forward and gradient are written in closed form
(:class:`~lightning_losses.losses._opl_function.ClassPairSums`: one pass over the features
forward, one gather-dot-update pass backward, the gradient the only B x D buffer) instead of
autograd's element-wise passes through the normalisation. ``"pair"`` keeps autograd through
the Gram matrix.

A row of norm <= 1e-12 (a dead, all-zero feature vector) is a zero vector: cosine 0 with every
row, and gradient 0 (autograd through ``F.normalize`` would give it 1e12 times the gradient of
the cosines, which has no limit at 0).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_losses.checks import (
    check_choice,
    check_class_labels,
    check_float,
    check_floating,
    check_same_length,
    check_tensor,
    working_dtype,
)
from lightning_losses.losses._opl_function import NORM_EPS, class_pair_sums

AbsMode = Literal["none", "mean", "pair"]
ABS_MODES: tuple[str, ...] = ("none", "mean", "pair")


class OPLOutput(NamedTuple):
    """The loss and its two parts: ``pos_mean`` is the paper's s, ``neg_mean`` its d."""

    loss: Tensor
    pos_mean: Tensor
    neg_mean: Tensor


def _check_inputs(features: Tensor, labels: Tensor) -> None:
    check_floating(check_tensor(features, "features", 2, "(B, D)"), "features")
    check_class_labels(labels, "labels")
    check_same_length(features, "features", labels, "labels")
    for value, name in ((features, "features"), (labels, "labels")):
        if value.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if features.shape[1] == 0:
        raise ValueError(
            f"features must have at least one column (D >= 1), got shape {tuple(features.shape)}"
        )
    if labels.device != features.device:
        raise ValueError(
            f"labels must be on the device of features ({features.device}), got {labels.device}"
        )


def _check_not_empty(features: Tensor) -> None:
    # Separate from _check_inputs: with gather_distributed one rank may hold 0 rows, only the
    # gathered batch must be non-empty.
    if features.shape[0] == 0:
        raise ValueError("features is an empty batch (B = 0); OPL needs at least one row")


def _check_options(gamma: float, abs_mode: str, eps: float) -> None:
    check_choice(abs_mode, "abs_mode", ABS_MODES)
    check_float(gamma, "gamma", minimum=0.0)
    check_float(eps, "eps", minimum=0.0, strict_minimum=True)


def pair_sums(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums and counts of pairwise dot products, from per-class sums in O(B D).

    Returns ``(pos_sum, neg_sum, pos_count, neg_count)`` over ordered pairs: positives are
    i != j with the same label, negatives pairs with different labels. ``features`` are used as
    given (normalise them first for cosines), through autograd's element-wise ops; the loss
    itself uses the closed-form gradient of :mod:`lightning_losses.losses._opl_function`. No
    input checks; see :func:`orthogonal_projection_loss`.
    """
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num = classes.shape[0]
    class_sums = features.new_zeros(num, features.shape[1]).index_add_(0, inverse, features)
    sq_norms = (features * features).sum(dim=1)
    class_sq = features.new_zeros(num).index_add_(0, inverse, sq_norms)
    class_sum_sq = (class_sums * class_sums).sum(dim=1)
    # Per class first, so a singleton class contributes exactly 0 (same reduction on both sides);
    # the total is the sum of the class sums, so one class only gives exactly 0 negatives.
    pos_sum = (class_sum_sq - class_sq).sum()
    total = class_sums.sum(dim=0)
    neg_sum = (total * total).sum() - class_sum_sq.sum()
    batch = labels.shape[0]
    same = (counts.to(features.dtype) ** 2).sum()
    return pos_sum, neg_sum, same - batch, batch * batch - same


def _class_index(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Class index of each row in ``[0, C)`` (int64) and rows per class (C,), after checking
    that every label is >= 0 (one host read: the smallest and the largest label).

    Labels below B index the classes directly (``bincount``; classes absent from the batch
    count 0 and add nothing), so the usual case needs no sort; larger labels are renumbered
    by ``torch.unique``'s sort, which keeps the class sums at most B x D.
    """
    lowest, highest = torch.stack(torch.aminmax(labels)).tolist()
    if lowest < 0:
        raise ValueError(
            f"labels must be class indices >= 0, got {lowest}; drop ignored samples "
            "(e.g. ignore_index = -100) before OPL instead of giving them a label"
        )
    if highest < labels.shape[0]:
        index = labels.long()
        return index, torch.bincount(index, minlength=highest + 1)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return inverse, counts


def _normalize_rows(features: Tensor) -> tuple[Tensor, Tensor]:
    """``F.normalize`` values with gradient 0 for rows of norm <= 1e-12 (not 1e12 x theirs);
    returns the rows and their norms."""
    norms = torch.linalg.vector_norm(features, dim=1, keepdim=True)
    z = features / norms.clamp_min(NORM_EPS)
    return torch.where(norms > NORM_EPS, z, z.detach()), norms[:, 0]


def _gram_abs_neg_sum(z: Tensor, labels: Tensor) -> Tensor:
    """Sum of |cos| over negative pairs (abs_mode="pair"): through the B x B Gram matrix, as
    |z_i . z_j| does not factor through class sums."""
    different = labels[:, None] != labels[None, :]
    return (z @ z.T).abs().masked_fill(~different, 0.0).sum()


def orthogonal_projection_loss(
    features: Tensor,
    labels: Tensor,
    gamma: float = 0.5,
    abs_mode: AbsMode = "none",
    eps: float = 1e-6,
) -> OPLOutput:
    """Orthogonal Projection Loss of a batch; see the module docstring for the math.

    Args:
        features: (B, D) penultimate features, any float dtype, D >= 1. bf16 / fp16 inputs (and
            autocast) are computed in float32; float32 / float64 inputs keep their dtype.
        labels: (B,) integer class indices >= 0, on the device of ``features``.
        gamma: weight of the negative-pair term, finite and >= 0 (0.5 in the authors' CIFAR recipe).
        abs_mode: ``"none"``, ``"mean"`` or ``"pair"`` (see the module docstring).
        eps: added to the pair counts, as in the authors' code; finite and > 0.

    Returns:
        :class:`OPLOutput` ``(loss, pos_mean, neg_mean)``. Degenerate batches never give NaN:
        no positive pair gives s = 0, no negative pair gives d = 0, B = 1 gives loss 1 with zero
        gradient. A row of norm <= 1e-12 (a dead feature vector) counts as a zero vector (cosine
        0 with every row) and gets gradient 0.

    Raises:
        ValueError: B = 0, D = 0, a bad shape / dtype / device, a negative label, a NaN or inf
        feature, or a row whose squared norm overflows the working dtype (|x| above about 1e19
        in float32: it would be normalised to 0). The checks cost two host reads per call: the
        smallest and largest label, and one for the features (plus ``torch.unique``'s own
        when a label is >= B).

    ``"none"`` and ``"mean"`` run :class:`~lightning_losses.losses._opl_function.ClassPairSums`
    (closed-form forward and gradient, O(B D); a double backward recomputes through autograd);
    ``"pair"`` uses autograd through the B x B Gram matrix (O(B^2) memory).
    """
    _check_options(gamma, abs_mode, eps)
    _check_inputs(features, labels)
    _check_not_empty(features)
    dtype = working_dtype(features.dtype)
    with torch.autocast(device_type=features.device.type, enabled=False):
        inverse, counts = _class_index(labels)
        if abs_mode == "pair":
            z, norms = _normalize_rows(features.to(dtype))
            pos_sum, _, _, _ = pair_sums(z, labels)
            neg_sum = _gram_abs_neg_sum(z, labels)
            norm_total = norms.sum()
        else:
            pos_sum, neg_sum, norm_total = class_pair_sums(features, inverse, counts, dtype)
        # Pair counts in int64 (exact; float32 rounds sum_c n_c^2 above 2^24), then the dtype.
        batch = labels.shape[0]
        same = (counts * counts).sum()
        pos_count, neg_count = (same - batch).to(dtype), (batch * batch - same).to(dtype)
        # With no pair the sum is 0 in exact arithmetic; `where` keeps the 1/eps from turning
        # rounding in the class-sum form into a value or a gradient.
        pos_mean = torch.where(pos_count > 0, pos_sum / (pos_count + eps), 0.0)
        neg_mean = torch.where(neg_count > 0, neg_sum / (neg_count + eps), 0.0)
        if abs_mode == "mean":
            neg_mean = neg_mean.abs()
        loss = (1.0 - pos_mean) + gamma * neg_mean
    # One host read for the value checks of the features. A NaN / inf feature makes its row
    # norm, hence the sum of norms, non-finite, and so does a finite row whose squared norm
    # overflows.
    if not bool(torch.isfinite(norm_total + pos_sum.detach() + neg_sum.detach())):
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or inf; check the backbone's output")
        raise ValueError(
            f"features have a row whose squared norm overflows {dtype} (largest |value| "
            f"{features.abs().max().item():.3g}); scale the features down or pass float64"
        )
    return OPLOutput(loss, pos_mean, neg_mean)


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0; backward sums every rank's gradient.

    Ranks may hold different numbers of rows (padded for the collective, trimmed after).
    Outside an initialised process group, or with one process, the tensor is returned as is.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor
    if tensor.shape[0] < max(counts):
        pad = tensor.new_zeros((max(counts) - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    return torch.cat([part[:n] for part, n in zip(all_gather(padded), counts)])


class OrthogonalProjectionLoss(nn.Module):
    """:func:`orthogonal_projection_loss` as a module.

    Args:
        gamma: weight of the negative-pair term.
        abs_mode: ``"none"``, ``"mean"`` or ``"pair"``.
        gather_distributed: all-gather features and labels from every rank first, with a gather
            whose backward sums every rank's gradient. Each rank's loss then equals the
            single-process loss on the global batch and, after DDP averages, parameter gradients
            equal single-process training. The authors compute OPL per GPU (False).
        eps: added to the pair counts.
    """

    def __init__(
        self,
        gamma: float = 0.5,
        abs_mode: AbsMode = "none",
        gather_distributed: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        _check_options(gamma, abs_mode, eps)
        self.gamma = gamma
        self.abs_mode = abs_mode
        self.gather_distributed = gather_distributed
        self.eps = eps

    def forward(self, features: Tensor, labels: Tensor) -> OPLOutput:
        if self.gather_distributed:
            _check_inputs(features, labels)  # before the gather: each rank names its own input
            features = all_gather_rows(features)
            labels = all_gather_rows(labels)
        return orthogonal_projection_loss(features, labels, self.gamma, self.abs_mode, self.eps)

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, abs_mode={self.abs_mode!r}, "
            f"gather_distributed={self.gather_distributed}, eps={self.eps}"
        )
