"""OPL's pair sums in closed form: a custom autograd Function, O(B D) time, one B x D buffer.

With row norms :math:`n_i = \\lVert f_i \\rVert`, :math:`r_i = \\max(n_i, \\epsilon_n)`
(:math:`\\epsilon_n = 10^{-12}`, as ``F.normalize``), :math:`w_i = 1 / r_i`,
:math:`z_i = w_i f_i`, :math:`q_i = \\lVert z_i \\rVert^2 = (n_i w_i)^2` (1 for every row above
:math:`\\epsilon_n`), class sums :math:`S_c = \\sum_{y_i = c} z_i`, :math:`S = \\sum_c S_c` and
:math:`m_c = [n_c > 1]` (a class of one sample has no positive pair):

.. math::

    P = \\sum_c m_c \\Big(\\lVert S_c \\rVert^2 - \\sum_{y_i = c} q_i\\Big), \\qquad
    N = \\lVert S \\rVert^2 - \\sum_c \\lVert S_c \\rVert^2 .

Gradient. With upstream gradients :math:`g_P, g_N`, :math:`u_c = g_P m_c`, :math:`v = g_N` and
:math:`T_c = (u_c - v) S_c + v S`, the gradient with respect to :math:`z_i` (class :math:`c`) is
:math:`G_i = 2 (T_c - u_c z_i)`. Through the normalisation, for :math:`n_i > \\epsilon_n`,
:math:`\\partial L / \\partial f_i = (G_i - z_i (z_i \\cdot G_i)) / n_i`; the self-pair term
:math:`u_c z_i` is radial and cancels, leaving

.. math::

    \\frac{\\partial L}{\\partial f_i} = 2 w_i T_c - 2 w_i^2 (z_i \\cdot T_c)\\, f_i .

A row with :math:`n_i \\le \\epsilon_n` (a dead, all-zero feature vector) has no direction: its
gradient is 0. (Autograd through ``F.normalize`` gives it :math:`G_i / \\epsilon_n`, about
:math:`10^{12}` times the other rows' gradients.)

Cost: forward = one read of the features for the norms and one for the class sums (a sparse
(C x B) @ (B x D) product, so the normalised features are never stored); backward = one gather
of :math:`T_c` into the gradient buffer, one row-wise dot and one in-place update. A backward
with ``create_graph=True`` (double backward: gradient penalties, meta-learning) recomputes the
sums through autograd instead, so second derivatives are exact too. Memory: the
gradient (B x D) and C x D class sums; bf16 / fp16 inputs add one float32 copy during each pass.
On the CPU the backward's time is mostly the first write of the fresh gradient buffer (page
faults), as the normalised copy is for a plain ``F.normalize``; fusing the passes chunk by
chunk in cache measured no faster (benchmarks/opl.py has the ratios).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

NORM_EPS = 1e-12  # F.normalize's default: rows below it are divided by it, not by their norm


def weighted_class_sums(
    features: Tensor,
    weights: Tensor,
    inverse: Tensor,
    counts: Tensor,
    sparse: bool | None = None,
) -> Tensor:
    """``out[c] = sum over rows i of class c of weights[i] * features[i]``, shape (C, D).

    ``sparse`` (default: on CPU and CUDA) uses a sparse CSR (C x B) @ (B x D) product, which
    reads the features once and writes no B x D temporary; otherwise ``index_add_`` of the
    scaled rows (one B x D temporary).
    """
    num = counts.shape[0]
    if sparse is None:
        sparse = features.device.type in ("cpu", "cuda")
    if sparse:
        order = torch.argsort(inverse, stable=True)
        crow = torch.zeros(num + 1, dtype=torch.int64, device=features.device)
        torch.cumsum(counts, dim=0, out=crow[1:])
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            matrix = torch.sparse_csr_tensor(
                crow,
                order,
                weights[order],
                (num, features.shape[0]),
                dtype=features.dtype,
                device=features.device,
                check_invariants=False,
            )
            return torch.sparse.mm(matrix, features)
    out = features.new_zeros(num, features.shape[1])
    return out.index_add_(0, inverse, features * weights[:, None])


def differentiable_pair_sums(f: Tensor, inverse: Tensor, multi: Tensor) -> tuple[Tensor, Tensor]:
    """``(P, N)`` through autograd's element-wise ops, with the same zero-row convention
    (gradient 0 below ``NORM_EPS``): the slow path, used for double backward only."""
    norms = torch.linalg.vector_norm(f, dim=1, keepdim=True)
    z = f / norms.clamp_min(NORM_EPS)
    z = torch.where(norms > NORM_EPS, z, z.detach())
    num = multi.shape[0]
    class_sums = z.new_zeros(num, z.shape[1]).index_add_(0, inverse, z)
    class_sq = z.new_zeros(num).index_add_(0, inverse, (z * z).sum(dim=1))
    class_sum_sq = (class_sums * class_sums).sum(dim=1)
    pos_sum = torch.where(multi, class_sum_sq - class_sq, 0.0).sum()
    total = class_sums.sum(dim=0)
    return pos_sum, (total * total).sum() - class_sum_sq.sum()


def row_dots(a: Tensor, b: Tensor, chunk_elements: int = 2**16) -> Tensor:
    """``(a * b).sum(dim=1)`` for (B, D) tensors without a B x D temporary.

    On the CPU the product goes through one cache-sized buffer, chunk by chunk of rows (as fast
    as a single reduction pass, where ``bmm`` of B 1 x D by D x 1 products is 4x slower);
    elsewhere ``torch.linalg.vecdot``.
    """
    if a.device.type != "cpu":
        return torch.linalg.vecdot(a, b, dim=1)
    batch, dim = a.shape
    rows = max(1, chunk_elements // max(dim, 1))
    out = a.new_empty(batch)
    buffer = a.new_empty(min(rows, batch), dim)
    for start in range(0, batch, rows):
        stop = min(batch, start + rows)
        part = buffer[: stop - start]
        torch.mul(a[start:stop], b[start:stop], out=part)
        torch.sum(part, dim=1, out=out[start:stop])
    return out


class ClassPairSums(torch.autograd.Function):
    """``(P, N, sum of row norms)`` of the module docstring from raw features.

    Inputs: ``features`` (B, D) of any float dtype, ``inverse`` (B,) class index of each row in
    ``[0, C)``, ``counts`` (C,) rows per class, ``dtype`` the working dtype (float32 or float64).
    The third output (not differentiable) is the sum of the row norms, for a finiteness check: a
    row whose squared norm overflows has an infinite norm, which normalises it to 0 silently.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, features: Tensor, inverse: Tensor, counts: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor]:
        f = features.to(dtype)
        norms = torch.linalg.vector_norm(f, dim=1)
        weights = 1.0 / norms.clamp_min(NORM_EPS)
        sq = (norms * weights) ** 2  # q_i: exactly 1 for a row above NORM_EPS
        class_sums = weighted_class_sums(f, weights, inverse, counts)
        multi = counts > 1
        class_sq = torch.zeros_like(class_sums[:, 0]).index_add_(0, inverse, sq)
        class_sum_sq = (class_sums * class_sums).sum(dim=1)
        pos_sum = torch.where(multi, class_sum_sq - class_sq, 0.0).sum()
        total = class_sums.sum(dim=0)
        neg_sum = (total * total).sum() - class_sum_sq.sum()
        ctx.save_for_backward(features, inverse, weights, norms, class_sums, total, multi)
        ctx.dtype = dtype
        norm_total = norms.sum()
        ctx.mark_non_differentiable(norm_total)
        return pos_sum, neg_sum, norm_total

    @staticmethod
    def backward(
        ctx: FunctionCtx, grad_pos: Tensor, grad_neg: Tensor, _grad_norms: Tensor | None
    ) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        features, inverse, weights, norms, class_sums, total, multi = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiable
            with torch.enable_grad():
                pos_sum, neg_sum = differentiable_pair_sums(features.to(ctx.dtype), inverse, multi)
                objective = pos_sum * grad_pos + neg_sum * grad_neg
                (grad,) = torch.autograd.grad(objective, features, create_graph=True)
            return grad, None, None, None
        f = features.to(ctx.dtype)
        u = grad_pos * multi.to(class_sums.dtype)  # (C,)
        v = grad_neg
        table = class_sums * (u - v)[:, None] + v * total  # T_c, (C, D)
        grad = table.index_select(0, inverse)  # the only B x D buffer
        dots = row_dots(f, grad)  # f_i . T_c
        live = (norms > NORM_EPS).to(f.dtype)
        a = 2.0 * weights * live
        b = -2.0 * weights * weights * (weights * dots) * live
        grad.mul_(a[:, None]).addcmul_(f, b[:, None])
        return grad.to(features.dtype), None, None, None


def class_pair_sums(
    features: Tensor, inverse: Tensor, counts: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`ClassPairSums` applied: ``(P, N, sum of row norms)``."""
    return ClassPairSums.apply(features, inverse, counts, dtype)
