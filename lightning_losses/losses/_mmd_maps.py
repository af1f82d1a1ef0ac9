"""The MMD^2 estimator of :mod:`lightning_losses.losses.embedding`, batched over feature maps.

Private: the public functions (:func:`~lightning_losses.losses.embedding.mmd2`,
:class:`~lightning_losses.losses.embedding.EmbeddingLoss`) check their inputs and read the host
once; everything here reads no value on the host (no synchronisation) and checks nothing but a
fixed bandwidth's range. The math is in the public module's docstring; the closed-form
gradients are in :class:`_PooledMatrices` and :class:`_WeightedGaussianSum`, each with a double
backward through the plain-autograd form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_losses.checks import working_dtype

#: Floor of the median-heuristic bandwidth h (reached only when at least half of the pairwise
#: squared distances are 0, e.g. when every point is identical).
MIN_BANDWIDTH: float = 1e-12


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
        z -= z.mean(dim=1, keepdim=True)
        scale = _power_of_two_scales(z)
        z /= scale[:, None, None]
        keep = None
        if linear:
            out = z @ z.transpose(1, 2)
        else:
            sq = z.square().sum(dim=2)
            # |z_i|^2 + |z_j|^2 - 2 z_i . z_j in one (G, N, N) buffer (the product added in place)
            out = (sq[:, :, None] + sq[:, None, :]).baddbmm_(z, z.transpose(1, 2), alpha=-2.0)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                keep = out >= 0  # where the gradient passes (clamp_min's rule), off the diagonal
                keep.diagonal(dim1=1, dim2=2).fill_(False)
            out.clamp_min_(0.0).diagonal(dim1=1, dim2=2).fill_(0.0)
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
        m = ctx.rows
        rows = slice(0 if need_x else m, None if need_y else m)
        part = grad[:, rows] + grad.transpose(1, 2)[:, rows]  # the rows of G + G^T needed
        moved = part @ z  # (G, rows, d)
        if not ctx.linear:
            moved = 2.0 * (part.sum(dim=2, keepdim=True) * z[:, rows] - moved)
        moved = moved / scale[:, None, None]
        grad_x = moved[:, :m] if need_x else None
        grad_y = moved[:, -y.shape[1] :] if need_y else None
        return grad_x, grad_y, None


#: Constant tensors rebuilt at every call otherwise (pair indices, estimator weights), per
#: size, dtype and device; cleared when it grows past :data:`_CACHE_SIZE` entries.
_CACHE: dict[tuple, Tensor] = {}
_CACHE_SIZE = 64


def _cached(key: tuple, build: Any) -> Tensor:
    value = _CACHE.get(key)
    if value is None:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        value = _CACHE[key] = build()
    return value


def _upper_pairs(n: int, device: torch.device) -> Tensor:
    """Flat indices i * n + j of the pairs i < j of an (n, n) matrix (row-major order)."""

    def build() -> Tensor:
        rows, cols = torch.triu_indices(n, n, offset=1, device=device)
        return rows * n + cols

    return _cached(("pairs", n, str(device)), build)


def _median_bandwidths(d2: Tensor) -> Tensor:
    """(F, N, N) -> (F,) lower medians of the i < j squared distances, floored, no gradient."""
    with torch.no_grad():
        flat = d2.detach().flatten(1)
        pairs = torch.index_select(flat, 1, _upper_pairs(d2.shape[1], d2.device))
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
        need_slope = ctx.needs_input_grad[0]
        halvings = _halvings(multipliers)
        k = slope = e = None
        for i, s in enumerate(multipliers):
            rate = 1.0 / (-s * h)
            if correction is not None:
                rate = rate * correction * correction
            if halvings is not None and i > 0:
                e = e.square_()  # exp(-d / (s h)) = exp(-d / (2 s h))^2: a product, not an exp
            else:
                exponent = d2 / (-s * h)
                if correction is not None:
                    exponent = exponent * correction * correction
                e = exponent.exp_()
            if k is None:
                k = e.clone()
                slope = e * rate if need_slope else None
            else:
                k += e
                if need_slope:
                    slope.addcmul_(e, rate)
        ctx.multipliers = multipliers
        ctx.save_for_backward(
            d2, h, weights, correction, slope.mul_(weights) if need_slope else None
        )
        # sum_ij W_ij k_ij per map as one matrix-vector product (no (F, N, N) product tensor)
        return k.flatten(1) @ weights.flatten()

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
    """:func:`_build_estimator_weights`, cached per (m, n, unbiased, dtype, device): treat
    the result as read-only."""
    key = ("weights", m, n, bool(unbiased), dtype, str(device))
    return _cached(key, lambda: _build_estimator_weights(m, n, unbiased, dtype, device))


def _build_estimator_weights(m: int, n: int, unbiased: bool, dtype: torch.dtype, device) -> Tensor:
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
