"""Maximum Mean Discrepancy and the Embedding Loss (EL) of one-step diffusion distillation.

MMD. For samples :math:`x_1..x_m` and :math:`y_1..y_n` in :math:`\\mathbb{R}^d` and a kernel
:math:`k`, the unbiased estimator (U-statistic) of :math:`\\mathrm{MMD}^2` is

.. math::

    \\widehat{\\mathrm{MMD}}^2_u = \\frac{1}{m(m-1)} \\sum_{i \\ne j} k(x_i, x_j)
        + \\frac{1}{n(n-1)} \\sum_{i \\ne j} k(y_i, y_j)
        - \\frac{2}{mn} \\sum_{i, j} k(x_i, y_j),

which needs :math:`m, n \\ge 2`, can be slightly negative, and has expectation 0 when both samples
come from the same distribution. The biased estimator (V-statistic) keeps the diagonals,

.. math::

    \\widehat{\\mathrm{MMD}}^2_b = \\frac{1}{m^2} \\sum_{i, j} k(x_i, x_j)
        + \\frac{1}{n^2} \\sum_{i, j} k(y_i, y_j) - \\frac{2}{mn} \\sum_{i, j} k(x_i, y_j) \\ge 0.

Kernels. ``"gaussian"`` is a sum of Gaussians over the bandwidth multipliers :math:`s`,

.. math::

    k(a, b) = \\sum_s \\exp\\big(-\\lVert a - b \\rVert^2 / (s\\, h)\\big),

with :math:`h` the median squared distance over the off-diagonal pairs :math:`i < j` of the pooled
sample :math:`z = [x; y]` (the lower median of the :math:`N(N-1)/2` values, as ``torch.median``
takes it; computed without gradient), unless ``bandwidth`` gives :math:`h`. When the median is 0
(e.g. every point identical) :math:`h` is floored at :data:`MIN_BANDWIDTH` so the kernel stays
finite: identical points then give :math:`k = \\sum_s 1` and distinct points :math:`k = 0`.
``"linear"`` is :math:`k(a, b) = a \\cdot b`, for which the biased estimator is the squared
distance of the means, :math:`\\lVert \\bar x - \\bar y \\rVert^2` (mean-embedding matching).

Numerics. Squared distances are :math:`\\lVert a \\rVert^2 + \\lVert b \\rVert^2 - 2 a \\cdot b`,
clamped at 0, with an exact 0 on the diagonal; no square root is taken, so gradients stay finite
at identical points. Both kernels' estimators are invariant to translating :math:`x` and :math:`y`
together, so the pooled (detached) mean is subtracted first: this only reduces the cancellation
in the distance formula. Everything is computed in at least float32 with autocast disabled
(bf16 / fp16 inputs are upcast; float64 stays float64, so ``gradcheck`` works).

Embedding Loss (Ying et al., arXiv 2604.22379; only the abstract is known to us). The MMD between
generated and REAL images in the feature spaces of a bank of frozen, randomly initialised networks
(e.g. :class:`lightning_losses.nets.RandomEmbedderBank`), summed over every feature map:

.. math::

    \\mathrm{EL} = \\sum_f \\widehat{\\mathrm{MMD}}^2\\big(\\phi_f(G(z)),
        \\mathrm{sg}(\\phi_f(x_{real}))\\big).

The kernel, the estimator and the per-class variant are OUR choices, all configurable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "KERNELS",
    "MIN_BANDWIDTH",
    "EmbeddingLoss",
    "EmbeddingLossOutput",
    "mmd2",
]

Kernel = Literal["gaussian", "linear"]
KERNELS: tuple[str, ...] = ("gaussian", "linear")

#: Floor of the median-heuristic bandwidth h (reached only when at least half of the pairwise
#: squared distances are 0, e.g. when every point is identical).
MIN_BANDWIDTH: float = 1e-12

DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


def _shape(value: object) -> object:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_options(
    kernel: str, bandwidth: float | None, bandwidth_multipliers: Sequence[float]
) -> tuple[float, ...]:
    """Validate the kernel options; return the multipliers as a tuple of floats."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if bandwidth is not None:
        if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)):
            raise ValueError(f"bandwidth must be a positive float or None, got {bandwidth!r}")
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be a finite float > 0 or None, got {bandwidth!r}")
    try:
        multipliers = tuple(float(s) for s in bandwidth_multipliers)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"bandwidth_multipliers must be a sequence of positive floats, "
            f"got {bandwidth_multipliers!r}"
        ) from err
    if not multipliers or not all(math.isfinite(s) and s > 0 for s in multipliers):
        raise ValueError(
            "bandwidth_multipliers must be a non-empty sequence of finite floats > 0, "
            f"got {bandwidth_multipliers!r}"
        )
    return multipliers


def _check_sample(name: str, value: Tensor, min_rows: int) -> None:
    if not isinstance(value, Tensor) or value.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (rows, features), got {_shape(value)}"
        )
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.shape[0] < min_rows:
        hint = (
            "the unbiased estimator needs at least 2 (unbiased=False accepts 1)"
            if min_rows > 1
            else "MMD needs at least 1"
        )
        raise ValueError(f"{name} has {value.shape[0]} rows; {hint}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")


def _squared_distances(z: Tensor) -> Tensor:
    """(N, d) -> (N, N) squared Euclidean distances, >= 0, exactly 0 on the diagonal."""
    sq = (z * z).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    eye = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return d2.clamp_min(0.0).masked_fill(eye, 0.0)


def _median_bandwidth(d2: Tensor) -> Tensor:
    """Lower median of the off-diagonal (i < j) squared distances, floored, without gradient."""
    with torch.no_grad():
        upper = torch.ones_like(d2, dtype=torch.bool).triu(diagonal=1)
        return d2.detach().masked_select(upper).median().clamp_min(MIN_BANDWIDTH)


def _off_diagonal_sum(k: Tensor) -> Tensor:
    eye = torch.eye(k.shape[0], dtype=torch.bool, device=k.device)
    return k.masked_fill(eye, 0.0).sum()


def mmd2(
    x: Tensor,
    y: Tensor,
    kernel: Kernel = "gaussian",
    bandwidth: float | None = None,
    bandwidth_multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    unbiased: bool = True,
) -> Tensor:
    """Squared Maximum Mean Discrepancy between two samples; see the module docstring for the math.

    Args:
        x: (m, d) first sample, any float dtype (no extra dimensions: flatten them yourself).
        y: (n, d) second sample with the same d.
        kernel: ``"gaussian"`` (sum of Gaussians) or ``"linear"`` (dot product).
        bandwidth: the Gaussian kernel's h, > 0; None takes the median squared distance of the
            off-diagonal pairs of the pooled sample (no gradient). Ignored by the linear kernel.
        bandwidth_multipliers: the s of :math:`\\exp(-\\lVert a - b \\rVert^2 / (s h))`, each > 0.
        unbiased: the U-statistic (needs m, n >= 2; may be slightly negative) or, if False, the
            V-statistic (m, n >= 1; >= 0 up to rounding).

    Returns:
        A 0-d tensor in at least float32 (float64 inputs give float64), differentiable with
        respect to ``x`` and ``y``.

    Raises:
        ValueError: for a non-2-D, non-float or non-finite sample, mismatched feature sizes,
            too few rows, an unknown kernel, or a bandwidth / multiplier that is not > 0.
    """
    multipliers = _check_options(kernel, bandwidth, bandwidth_multipliers)
    min_rows = 2 if unbiased else 1
    _check_sample("x", x, min_rows)
    _check_sample("y", y, min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features, got x {tuple(x.shape)} "
            f"and y {tuple(y.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    m, n = x.shape[0], y.shape[0]
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = torch.cat([x.to(dtype), y.to(dtype)])
        z = z - z.detach().mean(dim=0, keepdim=True)
        if kernel == "linear":
            k = z @ z.T
        else:
            d2 = _squared_distances(z)
            h = _median_bandwidth(d2) if bandwidth is None else d2.new_tensor(bandwidth)
            k = torch.zeros_like(d2)
            for s in multipliers:
                k = k + torch.exp(d2 / (-s * h))
        k_xx, k_yy, k_xy = k[:m, :m], k[m:, m:], k[:m, m:]
        if unbiased:
            xx = _off_diagonal_sum(k_xx) / (m * (m - 1))
            yy = _off_diagonal_sum(k_yy) / (n * (n - 1))
        else:
            xx = k_xx.sum() / (m * m)
            yy = k_yy.sum() / (n * n)
        return xx + yy - 2.0 * k_xy.sum() / (m * n)


class EmbeddingLossOutput(NamedTuple):
    """The Embedding Loss and its parts: ``per_feature[f]`` is the MMD^2 of feature map f."""

    loss: Tensor
    per_feature: Tensor


def _check_labels(name: str, labels: Tensor | None, batch: int) -> None:
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of shape (B,), got {_shape(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}"
        )
    if labels.shape[0] != batch:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the batch has {batch} rows")


class EmbeddingLoss(nn.Module):
    """The Embedding Loss: MMD^2 between generated and real images in a frozen bank's features.

    ``forward(generated, real)`` returns :class:`EmbeddingLossOutput` with
    ``loss = sum_f mmd2(bank(generated)[f], bank(real)[f].detach())`` over every feature map f
    the bank returns (every network, every stage). Real features are computed without gradient
    and the bank is frozen (``requires_grad_(False)`` here, and kept in eval mode), so gradients
    reach the generated batch only.

    With ``per_class=True`` (class-conditional generation; labels required) the MMD of each
    feature map is computed separately for every class present on both sides with at least 2
    samples on each side, and averaged over those classes with equal weights. Classes with fewer
    than 2 samples on either side are skipped; if no class qualifies the unconditional MMD of the
    whole batches is used instead. The per-class variant is OUR choice (the paper's is unknown).

    Args:
        bank: an ``nn.Module`` mapping a batch (B, ...) to a list of (B, c_f) feature tensors.
            If it has an ``in_channels`` attribute, inputs must have that many channels (dim 1);
            if it has ``min_size``, their spatial sizes must be at least that.
        kernel: ``"gaussian"`` or ``"linear"``, see :func:`mmd2`.
        bandwidth_multipliers: the Gaussian kernel's multipliers of the median bandwidth.
        unbiased: unbiased (default) or biased MMD estimator.
        per_class: per-class MMD, averaged over classes (see above).
        bandwidth: a fixed Gaussian bandwidth h for every feature map instead of the median
            heuristic (which adapts to each feature map's scale; recommended).
    """

    def __init__(
        self,
        bank: nn.Module,
        kernel: Kernel = "gaussian",
        bandwidth_multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
        unbiased: bool = True,
        per_class: bool = False,
        bandwidth: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(bank, nn.Module):
            raise ValueError(f"bank must be an nn.Module, got {type(bank).__name__}")
        self.bandwidth_multipliers = _check_options(kernel, bandwidth, bandwidth_multipliers)
        self.bank = bank.requires_grad_(False).eval()
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.unbiased = bool(unbiased)
        self.per_class = bool(per_class)

    def train(self, mode: bool = True) -> EmbeddingLoss:
        super().train(mode)
        self.bank.eval()  # the bank's features must not change with the train / eval mode
        return self

    def _check_images(self, generated: Tensor, real: Tensor) -> None:
        min_rows = 2 if self.unbiased else 1
        for name, value in (("generated", generated), ("real", real)):
            if not isinstance(value, Tensor) or value.ndim < 2:
                raise ValueError(
                    f"{name} must be a batched tensor (B, C, ...), got {_shape(value)}"
                )
            if not value.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
            if value.shape[0] < min_rows:
                raise ValueError(
                    f"{name} has batch size {value.shape[0]}; the "
                    f"{'unbiased' if self.unbiased else 'biased'} MMD needs at least {min_rows}"
                )
            channels = getattr(self.bank, "in_channels", None)
            if isinstance(channels, int) and value.shape[1] != channels:
                raise ValueError(
                    f"{name} has {value.shape[1]} channels (shape {tuple(value.shape)}) but the "
                    f"bank expects {channels}"
                )
            min_size = getattr(self.bank, "min_size", None)
            if isinstance(min_size, int) and any(s < min_size for s in value.shape[2:]):
                raise ValueError(
                    f"{name} has spatial size {tuple(value.shape[2:])}; the bank needs at least "
                    f"{min_size} x {min_size}"
                )
        if generated.shape[1:] != real.shape[1:]:
            raise ValueError(
                f"generated {tuple(generated.shape)} and real {tuple(real.shape)} must have the "
                "same channels and size"
            )
        for name, value in (("generated", generated), ("real", real)):
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} contains NaN or inf")

    def _features(self, images: Tensor) -> list[Tensor]:
        features = self.bank(images)
        if isinstance(features, Tensor):
            features = [features]
        features = list(features)
        if not features or not all(isinstance(f, Tensor) and f.ndim == 2 for f in features):
            raise ValueError(
                "the bank must return a non-empty list of 2-D (B, c) feature tensors, got "
                f"{[_shape(f) for f in features]}"
            )
        return features

    def _mmd(self, x: Tensor, y: Tensor) -> Tensor:
        return mmd2(x, y, self.kernel, self.bandwidth, self.bandwidth_multipliers, self.unbiased)

    def _class_indices(
        self, generated_labels: Tensor, real_labels: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """(generated rows, real rows) of every class with >= 2 samples on both sides."""
        gen_counts = Counter(generated_labels.tolist())
        real_counts = Counter(real_labels.tolist())
        classes = sorted(c for c in gen_counts if gen_counts[c] >= 2 and real_counts.get(c, 0) >= 2)
        return [
            (
                (generated_labels == c).nonzero().squeeze(1),
                (real_labels == c).nonzero().squeeze(1),
            )
            for c in classes
        ]

    def forward(
        self,
        generated: Tensor,
        real: Tensor,
        generated_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
    ) -> EmbeddingLossOutput:
        """EL between a generated batch (with gradient) and a real batch (treated as constant).

        Args:
            generated: (m, C, H, W) generator samples.
            real: (n, C, H, W) real data in the same range (e.g. [-1, 1]); never differentiated.
            generated_labels: (m,) integer classes; required when ``per_class``, else ignored.
            real_labels: (n,) integer classes; required when ``per_class``, else ignored.

        Returns:
            :class:`EmbeddingLossOutput` ``(loss, per_feature)``; ``per_feature`` is a 1-D tensor
            with one MMD^2 per feature map, ``loss`` its sum.
        """
        self._check_images(generated, real)
        _check_labels("generated_labels", generated_labels, generated.shape[0])
        _check_labels("real_labels", real_labels, real.shape[0])
        groups: list[tuple[Tensor, Tensor]] = []
        if self.per_class:
            if generated_labels is None or real_labels is None:
                raise ValueError(
                    "per_class=True needs generated_labels and real_labels (got "
                    f"generated_labels={_shape(generated_labels)}, "
                    f"real_labels={_shape(real_labels)})"
                )
            groups = self._class_indices(generated_labels, real_labels)
        generated_features = self._features(generated)
        with torch.no_grad():
            real_features = [f.detach() for f in self._features(real)]
        if len(generated_features) != len(real_features):
            raise ValueError("the bank returned different numbers of feature maps for the batches")
        terms = []
        for gen_f, real_f in zip(generated_features, real_features):
            if groups:
                per_class = [self._mmd(gen_f[gi], real_f[ri]) for gi, ri in groups]
                terms.append(torch.stack(per_class).mean())
            else:
                terms.append(self._mmd(gen_f, real_f))
        per_feature = torch.stack(terms)
        return EmbeddingLossOutput(per_feature.sum(), per_feature)

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel!r}, bandwidth={self.bandwidth}, "
            f"bandwidth_multipliers={self.bandwidth_multipliers}, unbiased={self.unbiased}, "
            f"per_class={self.per_class}"
        )
