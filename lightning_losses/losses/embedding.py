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
(e.g. every point identical) :math:`h` is floored at :data:`MIN_BANDWIDTH` (in the rescaled units
below) so the kernel stays finite: identical points then give :math:`k = \\sum_s 1` and distinct
points :math:`k = 0`. ``"linear"`` is :math:`k(a, b) = a \\cdot b`, for which the biased estimator
is the squared distance of the means, :math:`\\lVert \\bar x - \\bar y \\rVert^2` (mean-embedding
matching).

Numerics. Squared distances are :math:`\\lVert a \\rVert^2 + \\lVert b \\rVert^2 - 2 a \\cdot b`,
clamped at 0, with an exact 0 on the diagonal; no square root is taken, so gradients stay finite
at identical points. Both kernels' estimators are invariant to translating :math:`x` and :math:`y`
together, so the pooled (detached) mean is subtracted first: this only reduces the cancellation
in the distance formula. The centred sample is then divided by :math:`c = 2^e`, the power of two
with :math:`\\max |z| \\in [c/2, c)` (detached): the squared distances of finite features can no
longer overflow (features near :math:`10^{20}` have squared distances near :math:`10^{40}`, past
float32's :math:`3.4 \\cdot 10^{38}`) nor underflow. Dividing by a power of two is exact, and the
median-bandwidth Gaussian estimator is invariant to the scale, so nothing else changes; a fixed
``bandwidth`` is compared with :math:`(\\lVert a - b \\rVert^2 / c^2) \\cdot c \\cdot c` and the
linear estimator is multiplied by :math:`c \\cdot c` (it then overflows only when the value
itself is past the dtype's range, which raises). Everything is computed in at least float32
with autocast disabled (bf16 / fp16 inputs are upcast; float64 stays float64, so ``gradcheck``
works).

Host synchronisation. Shapes, dtypes and devices are checked without reading values; the values
are checked ONCE, on the result: :func:`mmd2` reads one flag (is the result finite), and
:class:`EmbeddingLoss` one small tensor of flags (both batches in range and finite, the result
finite). Only when a flag is False are the inputs read again, to word the error.
:meth:`EmbeddingLoss.unchecked` returns that flag unread, for a caller (a training step) that
folds it into its own single read.

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
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_losses.checks import all_true, check_class_labels, describe
from lightning_losses.losses._mmd_maps import (
    MIN_BANDWIDTH,
    _mmd2_maps,
    _mmd2_maps_per_class,
)

__all__ = [
    "KERNELS",
    "MIN_BANDWIDTH",
    "RANGE_TOLERANCE",
    "EmbeddingLoss",
    "EmbeddingLossOutput",
    "mmd2",
]

Kernel = Literal["gaussian", "linear"]
KERNELS: tuple[str, ...] = ("gaussian", "linear")

#: How far outside ``value_range`` a REAL image may lie (interpolation and rounding), as the
#: diffusion teachers' image check allows.
RANGE_TOLERANCE: float = 1e-3

DEFAULT_MULTIPLIERS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)


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
    if isinstance(bandwidth_multipliers, (str, bytes)):
        raise ValueError(
            "bandwidth_multipliers must be a sequence of positive floats, "
            f"got {bandwidth_multipliers!r}"
        )
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


def _check_sample(name: str, value: object, min_rows: int) -> Tensor:
    """Shape and dtype of one MMD sample (no value is read)."""
    if not isinstance(value, Tensor) or value.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (rows, features), got {describe(value)}"
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
    if value.shape[1] < 1:
        raise ValueError(f"{name} has 0 features (shape {tuple(value.shape)}); MMD needs >= 1")
    return value


def _non_finite_message(value: Tensor, names: Sequence[tuple[str, Tensor]]) -> str:
    """Why a result is not finite (reads the inputs: only on the error path)."""
    for name, tensor in names:
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} contains NaN or inf"
    peak = max(float(t.detach().abs().amax()) for _, t in names)
    return (
        f"the result is {value.detach().cpu().tolist()} although the inputs are finite (largest "
        f"|value| {peak:.3g}): it is past the range of {value.dtype}; pass float64 inputs or "
        "rescale them"
    )


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
        y: (n, d) second sample with the same d, on the same device.
        kernel: ``"gaussian"`` (sum of Gaussians) or ``"linear"`` (dot product).
        bandwidth: the Gaussian kernel's h, > 0; None takes the median squared distance of the
            off-diagonal pairs of the pooled sample (no gradient). Ignored by the linear kernel.
        bandwidth_multipliers: the s of :math:`\\exp(-\\lVert a - b \\rVert^2 / (s h))`, each > 0.
        unbiased: the U-statistic (needs m, n >= 2; may be slightly negative) or, if False, the
            V-statistic (m, n >= 1; >= 0 up to rounding).

    Returns:
        A 0-d tensor in at least float32 (float64 inputs give float64), differentiable with
        respect to ``x`` and ``y``. One host read (is it finite).

    Raises:
        ValueError: for a non-2-D, non-float or non-finite sample, mismatched feature sizes or
            devices, too few rows, an unknown kernel, a bandwidth / multiplier that is not > 0,
            or a (linear) value past the dtype's range.
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
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    value = _mmd2_maps([(x, y)], kernel, bandwidth, multipliers, bool(unbiased))[0]
    if not all_true(torch.isfinite(value.detach()))[0]:
        raise ValueError("mmd2: " + _non_finite_message(value, [("x", x), ("y", y)]))
    return value


class EmbeddingLossOutput(NamedTuple):
    """The Embedding Loss and its parts: ``per_feature[f]`` is the MMD^2 of feature map f."""

    loss: Tensor
    per_feature: Tensor


def _range_flag(images: Tensor, low: float, high: float) -> Tensor:
    """0-d bool: every value finite and in [low, high] (NaN compares False). No host read."""
    smallest, largest = torch.aminmax(images.detach())
    return (smallest >= low) & (largest <= high)


def _range_message(name: str, images: Tensor, low: float, high: float, why: str) -> str:
    """The error for a batch outside its range (reads it: only on the error path)."""
    values = images.detach()
    if not bool(torch.isfinite(values).all()):
        found = "NaN or inf"
    else:
        smallest, largest = (float(v) for v in torch.aminmax(values))
        found = f"values in [{smallest:.3g}, {largest:.3g}]"
    return (
        f"{name} must hold finite values in [{low:g}, {high:g}] ({why}), got {found}: scale "
        "images like the teacher's data (map [0, 1] data with 2x - 1 and [0, 255] data with "
        "x / 127.5 - 1, not standardised images), or set value_range=None to skip this check"
    )


class EmbeddingLoss(nn.Module):
    """The Embedding Loss: MMD^2 between generated and real images in a frozen bank's features.

    ``forward(generated, real)`` returns :class:`EmbeddingLossOutput` with
    ``loss = sum_f mmd2(bank(generated)[f], bank(real)[f].detach())`` over every feature map f
    the bank returns (every network, every stage). Real features are computed without gradient
    and the bank is frozen (``requires_grad_(False)`` here, and kept in eval mode), so gradients
    reach the generated batch only.

    With ``per_class=True`` (class-conditional generation; labels required) the MMD of each
    feature map is computed separately for every class present on both sides with at least 2
    samples on each side (each class with its own median bandwidth), and averaged over those
    classes with equal weights. Classes with fewer than 2 samples on either side are skipped; if
    no class qualifies the unconditional MMD of the whole batches is used instead. The per-class
    variant is OUR choice (the paper's is unknown).

    Values are checked once per call, in one host read with the result: the real batch must lie
    in ``value_range`` (within :data:`RANGE_TOLERANCE`), the generated batch in ``value_range``
    widened by ``generated_margin`` on each side (a one-step generator's output is not clipped:
    the digits teacher's one-step samples reach -1.17), both must be finite, and so must the loss.

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
        value_range: ``(low, high)`` of the image data (default [-1, 1], the teachers' range), or
            None to check only that the result is finite.
        generated_margin: how far outside ``value_range`` generated images may lie, >= 0.
    """

    def __init__(
        self,
        bank: nn.Module,
        kernel: Kernel = "gaussian",
        bandwidth_multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
        unbiased: bool = True,
        per_class: bool = False,
        bandwidth: float | None = None,
        value_range: tuple[float, float] | None = (-1.0, 1.0),
        generated_margin: float = 2.0,
    ) -> None:
        super().__init__()
        if not isinstance(bank, nn.Module):
            raise ValueError(f"bank must be an nn.Module, got {type(bank).__name__}")
        self.bandwidth_multipliers = _check_options(kernel, bandwidth, bandwidth_multipliers)
        if value_range is not None:
            try:
                low, high = (float(v) for v in value_range)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"value_range must be a (low, high) pair of floats or None, got {value_range!r}"
                ) from err
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
            value_range = (low, high)
        if (
            isinstance(generated_margin, bool)
            or not isinstance(generated_margin, (int, float))
            or not (math.isfinite(generated_margin) and generated_margin >= 0)
        ):
            raise ValueError(
                f"generated_margin must be a finite float >= 0, got {generated_margin!r}"
            )
        self.bank = bank.requires_grad_(False).eval()
        self.kernel = kernel
        self.bandwidth = bandwidth
        self.unbiased = bool(unbiased)
        self.per_class = bool(per_class)
        self.value_range = value_range
        self.generated_margin = float(generated_margin)

    def train(self, mode: bool = True) -> EmbeddingLoss:
        super().train(mode)
        self.bank.eval()  # the bank's features must not change with the train / eval mode
        return self

    def _check_images(self, generated: Tensor, real: Tensor) -> None:
        """Shapes, dtypes and devices of both batches (no value is read)."""
        min_rows = 2 if self.unbiased else 1
        images = isinstance(getattr(self.bank, "in_channels", None), int)
        for name, value in (("generated", generated), ("real", real)):
            if not isinstance(value, Tensor) or value.ndim < 2 or (images and value.ndim != 4):
                shape = "an image batch (B, C, H, W)" if images else "a batched tensor (B, C, ...)"
                raise ValueError(f"{name} must be {shape}, got {describe(value)}")
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
        if generated.device != real.device:
            raise ValueError(
                f"generated and real must be on the same device, got {generated.device} and "
                f"{real.device}"
            )
        weight = next(iter(self.bank.parameters()), None)
        if weight is not None and weight.device != generated.device:
            raise ValueError(
                f"the images are on {generated.device} but the bank is on {weight.device}: "
                "move the loss (or the module holding it) to the images' device"
            )

    def _features(self, images: Tensor) -> list[Tensor]:
        features = self.bank(images)
        if isinstance(features, Tensor):
            features = [features]
        features = list(features)
        if not features or not all(
            isinstance(f, Tensor) and f.ndim == 2 and f.shape[0] == images.shape[0]
            for f in features
        ):
            raise ValueError(
                "the bank must return a non-empty list of 2-D (B, c) feature tensors with one row "
                f"per image ({images.shape[0]}), got {[describe(f) for f in features]}"
            )
        return features

    def _flags(self, generated: Tensor, real: Tensor, loss: Tensor) -> list[Tensor]:
        flags = [torch.isfinite(loss.detach())]
        if self.value_range is not None:
            low, high = self.value_range
            margin = self.generated_margin
            flags.append(_range_flag(generated, low - margin, high + margin))
            flags.append(_range_flag(real, low - RANGE_TOLERANCE, high + RANGE_TOLERANCE))
        return flags

    def _raise(self, generated: Tensor, real: Tensor, per_feature: Tensor) -> None:
        """Word the error for a failed flag (reads the values again: the error path only)."""
        if self.value_range is not None:
            low, high = self.value_range
            margin = self.generated_margin
            checks = [
                (
                    "generated",
                    generated,
                    (low - margin, high + margin),
                    (low - margin, high + margin),
                    f"value_range {self.value_range} widened by generated_margin={margin:g}",
                ),
                (
                    "real",
                    real,
                    (low - RANGE_TOLERANCE, high + RANGE_TOLERANCE),
                    (low, high),
                    f"the value_range, to within {RANGE_TOLERANCE:g}",
                ),
            ]
            for name, images, (lo, hi), (shown_lo, shown_hi), why in checks:
                if not all_true(_range_flag(images, lo, hi))[0]:
                    raise ValueError(_range_message(name, images, shown_lo, shown_hi, why))
        for name, images in (("generated", generated), ("real", real)):
            if not all_true(torch.isfinite(images).all())[0]:
                raise ValueError(f"{name} contains NaN or inf")
        bad = (~torch.isfinite(per_feature.detach())).nonzero().flatten().tolist()
        raise ValueError(
            f"EL is not finite (feature maps {bad} of {per_feature.shape[0]}: "
            f"{per_feature.detach().cpu().tolist()}) although both batches are finite and in "
            "range: the bank's features overflow; use a bank with normalised features"
        )

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
            real: (n, C, H, W) real data in ``value_range`` (e.g. [-1, 1]); never differentiated.
            generated_labels: (m,) integer classes; required when ``per_class``, else ignored.
            real_labels: (n,) integer classes; required when ``per_class``, else ignored.

        Returns:
            :class:`EmbeddingLossOutput` ``(loss, per_feature)``; ``per_feature`` is a 1-D tensor
            with one MMD^2 per feature map, ``loss`` its sum. One host read per call.

        Raises:
            ValueError: for batches of the wrong shape, dtype or device, values outside the
                range or not finite, labels that do not fit, or a non-finite result.
        """
        output, ok = self.unchecked(generated, real, generated_labels, real_labels)
        if not all_true(ok)[0]:
            self.raise_for(generated, real, output)
        return output

    def unchecked(
        self,
        generated: Tensor,
        real: Tensor,
        generated_labels: Tensor | None = None,
        real_labels: Tensor | None = None,
    ) -> tuple[EmbeddingLossOutput, Tensor]:
        """:meth:`forward` without its host read: ``(output, ok)``, ``ok`` a 0-d bool tensor on
        the images' device (both batches finite and in range, the loss finite), NOT read.

        For a caller that folds ``ok`` into a read of its own (e.g. a training step that checks
        its batch in one :func:`~lightning_losses.checks.all_true`): when ``ok`` is False it
        must call :meth:`raise_for` (the worded error) before using the loss. Shapes, dtypes and
        devices are still checked here (no value is read for them).
        """
        self._check_images(generated, real)
        if generated_labels is not None:
            check_class_labels(generated_labels, "generated_labels", generated.shape[0])
        if real_labels is not None:
            check_class_labels(real_labels, "real_labels", real.shape[0])
        if self.per_class:
            if generated_labels is None or real_labels is None:
                raise ValueError(
                    "per_class=True needs generated_labels and real_labels (got "
                    f"generated_labels={describe(generated_labels)}, "
                    f"real_labels={describe(real_labels)})"
                )
            for name, labels in (
                ("generated_labels", generated_labels),
                ("real_labels", real_labels),
            ):
                if labels.device != generated.device:
                    raise ValueError(
                        f"{name} must be on the images' device {generated.device}, got "
                        f"{labels.device}"
                    )
        generated_features = self._features(generated)
        with torch.no_grad():
            real_features = [f.detach() for f in self._features(real)]
        if [f.shape[1] for f in generated_features] != [f.shape[1] for f in real_features]:
            raise ValueError(
                "the bank returned different feature maps for the two batches: "
                f"{[describe(f) for f in generated_features]} and "
                f"{[describe(f) for f in real_features]}"
            )
        pairs = list(zip(generated_features, real_features))
        options = (self.kernel, self.bandwidth, self.bandwidth_multipliers, self.unbiased)
        if self.per_class:
            per_feature = _mmd2_maps_per_class(pairs, generated_labels, real_labels, *options)
        else:
            per_feature = _mmd2_maps(pairs, *options)
        loss = per_feature.sum()
        ok = torch.stack(self._flags(generated, real, loss)).all()
        return EmbeddingLossOutput(loss, per_feature), ok

    def raise_for(self, generated: Tensor, real: Tensor, output: EmbeddingLossOutput) -> None:
        """Raise the ValueError that :meth:`forward` raises for a failed check of
        :meth:`unchecked`'s ``ok`` (reads the values again: the error path only)."""
        self._raise(generated, real, output.per_feature)

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel!r}, bandwidth={self.bandwidth}, "
            f"bandwidth_multipliers={self.bandwidth_multipliers}, unbiased={self.unbiased}, "
            f"per_class={self.per_class}, value_range={self.value_range}, "
            f"generated_margin={self.generated_margin}"
        )
