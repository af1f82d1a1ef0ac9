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
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_losses.checks import all_true, check_class_labels, describe, working_dtype

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

#: Floor of the median-heuristic bandwidth h (reached only when at least half of the pairwise
#: squared distances are 0, e.g. when every point is identical).
MIN_BANDWIDTH: float = 1e-12

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


# ------------------------------------------------------------------------------------------------
# The estimator, batched over feature maps: F pairs (x_f, y_f) with the same m and n rows
# ------------------------------------------------------------------------------------------------


def _power_of_two_scales(z: Tensor) -> Tensor:
    """(G, N, d) -> (G,) c = 2^e with max |z_g| in [c/2, c) (1 where that max is 0 or not
    finite), without gradient."""
    with torch.no_grad():
        peak = z.abs().amax(dim=(1, 2))
        mantissa, _ = torch.frexp(peak)
        usable = torch.isfinite(peak) & (peak > 0)
        # peak / mantissa is exactly 2^e (the quotient is representable, IEEE division).
        return torch.where(usable, peak / torch.where(usable, mantissa, 1.0), 1.0)


def _pooled_matrices(x: Tensor, y: Tensor, linear: bool) -> tuple[Tensor, Tensor]:
    """(G, m, d), (G, n, d) -> the (G, N, N) squared distances (Gram matrices if ``linear``) of
    the pooled, centred, rescaled samples z = ([x; y] - mean) / c, and the (G,) scales c.

    Distances are :math:`\\lVert z_i \\rVert^2 + \\lVert z_j \\rVert^2 - 2 z_i \\cdot z_j`, clamped
    at 0, exactly 0 on the diagonal. Plain autograd: the reference of :class:`_PooledMatrices`
    (and its double backward).
    """
    z = torch.cat([x, y], dim=1)
    z = z - z.detach().mean(dim=1, keepdim=True)
    scale = _power_of_two_scales(z)
    z = z / scale[:, None, None]
    gram = z @ z.transpose(1, 2)
    if linear:
        return gram, scale
    sq = (z * z).sum(dim=2)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * gram
    eye = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
    return d2.clamp_min(0.0).masked_fill(eye, 0.0), scale


class _PooledMatrices(torch.autograd.Function):
    """:func:`_pooled_matrices` with a closed-form backward to the rows that need it.

    With :math:`S = G + G^T` for the incoming gradient G (zero where the distance was clamped
    and on the diagonal), :math:`\\partial / \\partial z_i = 2 (\\sum_j S_{ij}) z_i - 2 (S z)_i`
    for the distances and :math:`(S z)_i` for the Gram matrix; x's rows then carry 1 / c (the
    mean and c are constants). One matrix product over the generated rows only, where autograd
    would take two over all rows. A double backward (``create_graph=True``) differentiates the
    plain-autograd reference instead.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, linear: bool) -> tuple[Tensor, Tensor]:
        z = torch.cat([x, y], dim=1)
        z = z - z.mean(dim=1, keepdim=True)
        scale = _power_of_two_scales(z)
        z = z / scale[:, None, None]
        gram = z @ z.transpose(1, 2)
        keep = None
        if linear:
            out = gram
        else:
            sq = (z * z).sum(dim=2)
            raw = sq[:, :, None] + sq[:, None, :] - 2.0 * gram
            eye = torch.eye(z.shape[1], dtype=torch.bool, device=z.device)
            keep = (raw >= 0) & ~eye  # where the gradient passes (clamp_min's rule)
            out = raw.clamp_min_(0.0).masked_fill_(eye, 0.0)
        ctx.linear = linear
        ctx.rows = x.shape[1]
        ctx.save_for_backward(x, y, z, scale, keep)
        ctx.mark_non_differentiable(scale)
        return out, scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _unused: Tensor) -> tuple[Tensor | None, ...]:
        x, y, z, scale, keep = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            with torch.enable_grad():
                out, _ = _pooled_matrices(x, y, ctx.linear)  # the saved inputs keep their graph
                wanted = [t for t, need in zip((x, y), (need_x, need_y)) if need]
                grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
            return (next(grads) if need_x else None, next(grads) if need_y else None, None)
        if keep is not None:
            grad = grad * keep
        sym = grad + grad.transpose(1, 2)
        m = ctx.rows
        rows = slice(0 if need_x else m, None if need_y else m)
        part = sym[:, rows]
        moved = part @ z  # (G, rows, d)
        if not ctx.linear:
            moved = 2.0 * (part.sum(dim=2, keepdim=True) * z[:, rows] - moved)
        moved = moved / scale[:, None, None]
        grad_x = moved[:, :m] if need_x else None
        grad_y = moved[:, -y.shape[1] :] if need_y else None
        return grad_x, grad_y, None


def _upper_pairs(n: int, device: torch.device) -> Tensor:
    """Flat indices i * n + j of the pairs i < j of an (n, n) matrix (row-major order)."""
    rows, cols = torch.triu_indices(n, n, offset=1, device=device)
    return rows * n + cols


def _median_bandwidths(d2: Tensor) -> Tensor:
    """(F, N, N) -> (F,) lower medians of the i < j squared distances, floored, no gradient."""
    with torch.no_grad():
        pairs = d2.detach().flatten(1)[:, _upper_pairs(d2.shape[1], d2.device)]
        return pairs.median(dim=1).values.clamp_min(MIN_BANDWIDTH)


def _gaussian(
    d2: Tensor, h: Tensor, multipliers: tuple[float, ...], correction: Tensor | None
) -> Tensor:
    """sum_s exp(-d2 / (s h)); h broadcasts against d2; ``correction`` (a fixed bandwidth's
    c, broadcastable) turns the rescaled distances back into the caller's units."""
    k = torch.zeros_like(d2)
    for s in multipliers:
        exponent = d2 / (-s * h)
        if correction is not None:
            exponent = exponent * correction * correction  # 0 stays 0; large -> -inf -> k = 0
        k = k + torch.exp(exponent)
    return k


def _descending(multipliers: tuple[float, ...]) -> tuple[float, ...]:
    """The multipliers from the widest kernel down (the order of the kernel's sum is free)."""
    return tuple(sorted(multipliers, reverse=True))


def _halvings(multipliers: tuple[float, ...]) -> tuple[float, ...] | None:
    """The multipliers if each is exactly half the one before (the default 4, 2, 1, 1/2, 1/4
    once sorted descending: passed in that order by :func:`_descending`), else None."""
    if len(multipliers) > 1 and all(b * 2.0 == a for a, b in zip(multipliers, multipliers[1:])):
        return multipliers
    return None


class _WeightedGaussianSum(torch.autograd.Function):
    """Per map f, :math:`\\sum_{ij} W_{ij} k_f(d_{fij})` with :func:`_gaussian`'s kernel k.

    The kernel's derivative :math:`\\sum_s -e_s / (s h)` (times c c for a fixed bandwidth) is
    summed in the forward pass, so the backward is one product; h, W and c are constants. A
    double backward differentiates the plain-autograd form instead.
    """

    @staticmethod
    def forward(
        ctx: Any,
        d2: Tensor,
        h: Tensor,
        weights: Tensor,
        multipliers: tuple[float, ...],
        correction: Tensor | None,
    ) -> Tensor:
        k = torch.zeros_like(d2)
        slope = torch.zeros_like(d2)
        halvings = _halvings(multipliers)
        e = None
        for i, s in enumerate(multipliers):
            rate = 1.0 / (-s * h)
            if correction is not None:
                rate = rate * correction * correction
            if halvings is not None and i > 0:
                e = e * e  # exp(-d / (s h)) = exp(-d / (2 s h))^2: a product, not an exp
            else:
                exponent = d2 / (-s * h)
                if correction is not None:
                    exponent = exponent * correction * correction
                e = torch.exp(exponent)
            k += e
            slope += e * rate
        ctx.multipliers = multipliers
        ctx.save_for_backward(d2, h, weights, correction, slope.mul_(weights))
        return (k * weights).sum(dim=(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        d2, h, weights, correction, slope = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            with torch.enable_grad():
                value = (_gaussian(d2, h, ctx.multipliers, correction) * weights).sum(dim=(1, 2))
                (out,) = torch.autograd.grad(value, d2, grad, create_graph=True)
            return out, None, None, None, None
        return grad[:, None, None] * slope, None, None, None, None


def _estimator_weights(m: int, n: int, unbiased: bool, dtype: torch.dtype, device) -> Tensor:
    """(N, N) W with :math:`\\widehat{\\mathrm{MMD}}^2 = \\sum_{ij} W_{ij} k(z_i, z_j)` for the
    pooled z = [x; y]: 1 / (m (m - 1)) (or 1 / m^2) within x, the same with n within y, -1 / (mn)
    between them; 0 on the diagonal for the unbiased estimator. Built on ``device``."""
    total = m + n
    in_x = torch.arange(total, device=device) < m
    within_x = 1.0 / (m * (m - 1)) if unbiased else 1.0 / (m * m)
    within_y = 1.0 / (n * (n - 1)) if unbiased else 1.0 / (n * n)

    def full(value: float) -> Tensor:  # filled on the device (no host copy), in dtype
        return torch.full((total, total), value, dtype=dtype, device=device)

    weights = torch.where(
        in_x[:, None] == in_x[None, :],
        torch.where(in_x[:, None], full(within_x), full(within_y)),
        full(-1.0 / (m * n)),
    )
    if unbiased:
        weights.fill_diagonal_(0.0)
    return weights


def _pooled_maps(
    pairs: Sequence[tuple[Tensor, Tensor]], dtype: torch.dtype, kernel: str
) -> tuple[Tensor, Tensor]:
    """Stacked (F, N, N) squared distances (gaussian) or Gram matrices (linear) of the rescaled
    pooled samples, the (F,) scales c, and the maps' order along F: maps of one width are
    computed together (:func:`_in_map_order` puts results back)."""
    groups: dict[int, list[int]] = {}
    for index, (x, _) in enumerate(pairs):
        groups.setdefault(x.shape[1], []).append(index)
    mats, scales, order = [], [], []
    for indices in groups.values():
        x = torch.stack([pairs[i][0] for i in indices]).to(dtype)
        y = torch.stack([pairs[i][1] for i in indices]).to(dtype)
        mat, scale = _PooledMatrices.apply(x, y, kernel == "linear")
        mats.append(mat)
        scales.append(scale)
        order.extend(indices)
    return torch.cat(mats), torch.cat(scales), order


def _in_map_order(values: Tensor, order: list[int]) -> Tensor:
    """(F,) values computed in :func:`_pooled_maps`' group order, back in the maps' order."""
    if order == sorted(order):
        return values
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return values[torch.tensor(inverse, device=values.device)]


def _check_bandwidth_dtype(bandwidth: float | None, kernel: str, dtype: torch.dtype) -> None:
    """A fixed bandwidth must be a normal number of the dtype the MMD is computed in."""
    info = torch.finfo(dtype)
    if kernel == "gaussian" and bandwidth is not None and not info.tiny <= bandwidth <= info.max:
        raise ValueError(
            f"bandwidth={bandwidth!r} is outside the range of {dtype} ([{info.tiny:.3g}, "
            f"{info.max:.3g}]), the dtype the MMD is computed in: pass float64 features"
        )


def _mmd2_maps(
    pairs: Sequence[tuple[Tensor, Tensor]],
    kernel: str,
    bandwidth: float | None,
    multipliers: tuple[float, ...],
    unbiased: bool,
) -> Tensor:
    """(F,) MMD^2 of F pairs of samples with equal row counts; no checks, no host read."""
    dtype = working_dtype(*[t for pair in pairs for t in pair])
    _check_bandwidth_dtype(bandwidth, kernel, dtype)
    m = pairs[0][0].shape[0]
    device = pairs[0][0].device
    with torch.autocast(device_type=device.type, enabled=False):
        mats, scales, order = _pooled_maps(pairs, dtype, kernel)
        values = _mmd2_of_matrices(mats, scales, m, kernel, bandwidth, multipliers, unbiased)
        return _in_map_order(values, order)


def _mmd2_of_matrices(
    mats: Tensor,
    scales: Tensor,
    m: int,
    kernel: str,
    bandwidth: float | None,
    multipliers: tuple[float, ...],
    unbiased: bool,
) -> Tensor:
    """(F,) MMD^2 from :func:`_pooled_maps`' matrices (x's m rows first)."""
    weights = _estimator_weights(m, mats.shape[1] - m, unbiased, mats.dtype, mats.device)
    if kernel == "linear":
        return (mats * weights).sum(dim=(1, 2)) * scales * scales
    if bandwidth is None:
        h = _median_bandwidths(mats)[:, None, None]
        return _WeightedGaussianSum.apply(mats, h, weights, _descending(multipliers), None)
    h = mats.new_tensor(bandwidth)
    return _WeightedGaussianSum.apply(
        mats, h, weights, _descending(multipliers), scales[:, None, None]
    )


def _per_class_medians(mats: Tensor, labels: Tensor, same: Tensor, members: Tensor) -> Tensor:
    """(F, N, 1): for each row, the floored lower median of the i < j squared distances within
    its class (pooled over both samples), without gradient and without a host read.

    Each pair i < j of one class carries that class's label, other pairs a sentinel above every
    label; sorting by distance, then stably by label, lines every class's distances up in order
    from the offset where its label starts (``searchsorted``).
    """
    with torch.no_grad():
        total = labels.shape[0]
        flat = _upper_pairs(total, mats.device)
        distances = mats.detach().flatten(1)[:, flat]  # (F, P)
        pair_class = torch.where(same.flatten()[flat], labels[flat // total], labels.max() + 1)
        order = distances.argsort(dim=1)
        by_class, regroup = pair_class[order].sort(dim=1, stable=True)
        ordered = distances.gather(1, order).gather(1, regroup)
        start = torch.searchsorted(by_class, labels.expand(mats.shape[0], total).contiguous())
        pairs_in_class = (members * (members - 1) / 2).long()
        index = (start + (pairs_in_class - 1).clamp_min(0) // 2).clamp_max(flat.shape[0] - 1)
        return ordered.gather(1, index).clamp_min(MIN_BANDWIDTH)[:, :, None]


def _mmd2_maps_per_class(
    pairs: Sequence[tuple[Tensor, Tensor]],
    x_labels: Tensor,
    y_labels: Tensor,
    kernel: str,
    bandwidth: float | None,
    multipliers: tuple[float, ...],
    unbiased: bool,
) -> Tensor:
    """(F,) per-class MMD^2 averaged over the classes with >= 2 rows on both sides (each with its
    own median bandwidth); the unconditional MMD^2 where no class qualifies. No host read: the
    classes enter as pair weights, :math:`\\sum_c \\widehat{\\mathrm{MMD}}^2_c = \\sum_{ij}
    W_{ij} k_{ij}` with the estimator's weights of the pair's class (0 across classes and for
    classes that do not qualify)."""
    dtype = working_dtype(*[t for pair in pairs for t in pair])
    _check_bandwidth_dtype(bandwidth, kernel, dtype)
    m = x_labels.shape[0]
    device = x_labels.device
    labels = torch.cat([x_labels.long(), y_labels.long()])  # (N,)
    total = labels.shape[0]
    with torch.autocast(device_type=device.type, enabled=False):
        mats, scales, order = _pooled_maps(pairs, dtype, kernel)
        same = labels[:, None] == labels[None, :]  # (N, N)
        count_x = same[:, :m].sum(dim=1).to(dtype)  # rows of the row's class in x
        count_y = same[:, m:].sum(dim=1).to(dtype)  # ... in y
        qualifies = (count_x >= 2) & (count_y >= 2)
        keep = (same & qualifies[:, None]).to(dtype)
        if unbiased:
            keep.fill_diagonal_(0.0)
            within_x, within_y = count_x * (count_x - 1), count_y * (count_y - 1)
        else:
            within_x, within_y = count_x * count_x, count_y * count_y
        in_x = torch.arange(total, device=device) < m
        within = keep / torch.where(in_x, within_x, within_y)[:, None].clamp_min(1.0)
        between = keep / (-(count_x * count_y))[:, None].clamp_max(-1.0)
        weights = torch.where(in_x[:, None] == in_x[None, :], within, between)
        if kernel == "linear":
            summed = (mats * weights).sum(dim=(1, 2)) * scales * scales
        elif bandwidth is not None:
            h = mats.new_tensor(bandwidth)
            summed = _WeightedGaussianSum.apply(
                mats, h, weights, _descending(multipliers), scales[:, None, None]
            )
        else:
            h = _per_class_medians(mats, labels, same, count_x + count_y)
            summed = _WeightedGaussianSum.apply(mats, h, weights, _descending(multipliers), None)
        # Each class counted once: its m_c rows add 1 / m_c each.
        classes = (qualifies[:m].to(dtype) / count_x[:m].clamp_min(1)).sum().round()
        per_class = summed / classes.clamp_min(1)
        unconditional = _mmd2_of_matrices(mats, scales, m, kernel, bandwidth, multipliers, unbiased)
    return _in_map_order(torch.where(classes > 0, per_class, unconditional), order)


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
                    low - margin,
                    high + margin,
                    f"value_range {self.value_range} widened by generated_margin={margin:g}",
                ),
                (
                    "real",
                    real,
                    low - RANGE_TOLERANCE,
                    high + RANGE_TOLERANCE,
                    f"value_range {self.value_range}, tolerance {RANGE_TOLERANCE:g}",
                ),
            ]
            for name, images, lo, hi, why in checks:
                if not all_true(_range_flag(images, lo, hi))[0]:
                    raise ValueError(_range_message(name, images, lo, hi, why))
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
        if not all(all_true(*self._flags(generated, real, loss))):
            self._raise(generated, real, per_feature)
        return EmbeddingLossOutput(loss, per_feature)

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel!r}, bandwidth={self.bandwidth}, "
            f"bandwidth_multipliers={self.bandwidth_multipliers}, unbiased={self.unbiased}, "
            f"per_class={self.per_class}, value_range={self.value_range}, "
            f"generated_margin={self.generated_margin}"
        )
