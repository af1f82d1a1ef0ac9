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

Cost: forward = one pass over the features (per chunk of rows: the norms, the rows divided
into one reused buffer, ``index_add_`` into the class sums); backward = one pass (per chunk:
gather :math:`T_c` into the gradient, the row dots through a reused buffer, the in-place
update). The normalised features are never stored. A backward
with ``create_graph=True`` (double backward: gradient penalties, meta-learning) recomputes the
sums through autograd instead, so second derivatives are exact too. Memory: the
gradient (B x D) and C x D class sums; bf16 / fp16 inputs add one float32 copy during each pass.
On the CPU the passes share one work buffer per thread and dtype, kept between calls (at most
``CHUNK_ELEMENTS`` elements: 1 MiB in float32; see :func:`work_buffer`).

On the CPU an element-wise kernel here runs at about the same bandwidth whether its chunk
fits the L2 cache or not (measured from 32 KiB to 2 MiB per buffer), while each kernel call
costs a few microseconds; so the chunk is sized for few calls (1 MiB per buffer: 16 chunks at
B = 8192, D = 512), not for L2. Both passes together cost about twice the CPU time of a plain
``F.normalize(x).sum(0)`` (benchmarks/opl.py has the ratios). Whether the fresh gradient's
first write page-faults depends on the allocator, as for the normalised copy of
``F.normalize``: in a loop like the benchmark's, glibc reuses the freed block of the previous
gradient (no fault), while a fresh mapping faults on every page.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

NORM_EPS = 1e-12  # F.normalize's default: rows below it are divided by it, not by their norm


CHUNK_ELEMENTS = 2**18  # elements per chunk on the CPU: 1 MiB of float32 per buffer


def chunk_rows(features: Tensor) -> int:
    """Rows per chunk: a cache-sized block on the CPU, the whole batch elsewhere (where a
    Python loop would cost one kernel launch per op and chunk)."""
    batch, dim = features.shape
    if features.device.type != "cpu":
        return max(batch, 1)
    return max(1, min(batch, CHUNK_ELEMENTS // max(dim, 1)))


_SCRATCH = threading.local()  # per thread: dtype -> the CPU work buffer of the two passes


def work_buffer(f: Tensor, rows: int) -> Tensor:
    """A (rows, D) buffer of ``f``'s dtype and device for one pass; its contents are garbage.

    On the CPU one flat buffer per thread and dtype (at most ``CHUNK_ELEMENTS`` elements,
    1 MiB in float32) is kept and reused across calls: a fresh one of the size of a small
    batch is freed beside the gradient each call, and glibc then returns both to the system
    and faults them in again on the next call. Elsewhere the device's caching allocator reuses
    memory by itself.
    """
    dim = f.shape[1]
    if f.device.type != "cpu" or rows * dim > CHUNK_ELEMENTS:
        return f.new_empty(rows, dim)
    cache = _SCRATCH.__dict__
    flat = cache.get(f.dtype)
    if flat is None or flat.numel() < rows * dim:
        flat = cache[f.dtype] = torch.empty(CHUNK_ELEMENTS, dtype=f.dtype)
    return flat[: rows * dim].view(rows, dim)


def norms_and_class_sums(f: Tensor, inverse: Tensor, num: int) -> tuple[Tensor, Tensor]:
    """Row norms (B,) and class sums of the normalised rows ``S`` (C, D) in one pass over ``f``.

    Chunk by chunk of rows (views from one ``split`` each, so the loop makes no slices of its
    own): the norms, the rows divided by them into one reused buffer (still in cache),
    ``index_add_`` into the class sums. Three kernels per chunk, no sort and no B x D
    temporary on the CPU; one chunk (the whole batch) elsewhere.
    """
    batch, dim = f.shape
    rows = chunk_rows(f)
    norms = f.new_empty(batch)
    class_sums = f.new_zeros(num, dim)
    buffer = work_buffer(f, rows)
    for part, norm, index in zip(f.split(rows), norms.split(rows), inverse.split(rows)):
        scaled = buffer[: part.shape[0]]
        torch.linalg.vector_norm(part, dim=1, out=norm)
        torch.div(part, norm.clamp_min(NORM_EPS)[:, None], out=scaled)
        class_sums.index_add_(0, index, scaled)
    return norms, class_sums


def gradient(
    f: Tensor, inverse: Tensor, table: Tensor, a: Tensor, c: Tensor, dtype: torch.dtype
) -> Tensor:
    """``grad_i = a_i T_{y_i} + c_i (f_i . T_{y_i}) f_i`` in one pass over ``f``, written straight
    into the (B, D) result of ``dtype``; chunk by chunk of rows (views from one ``split`` each):
    gather ``T`` into the result, the row dots through one reused buffer, the in-place update
    while the chunk is in cache."""
    batch, dim = f.shape
    rows = chunk_rows(f)
    same = dtype == f.dtype
    grad = torch.empty((batch, dim), dtype=f.dtype if same else dtype, device=f.device)
    work = grad if same else f.new_empty(rows, dim)
    buffer = work_buffer(f, rows)
    dots = f.new_empty(batch, 1)
    chunks = zip(
        f.split(rows),
        grad.split(rows),
        inverse.split(rows),
        dots.split(rows),
        a[:, None].split(rows),
        c[:, None].split(rows),
    )
    for part, result, index, dot, a_part, c_part in chunks:
        n = part.shape[0]
        out = result if same else work[:n]
        torch.index_select(table, 0, index, out=out)
        product = buffer[:n]
        torch.mul(part, out, out=product)
        torch.sum(product, dim=1, keepdim=True, out=dot)
        out.mul_(a_part).addcmul_(part, dot.mul_(c_part))
        if not same:
            result.copy_(out)
    return grad


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
        norms, class_sums = norms_and_class_sums(f, inverse, counts.shape[0])
        weights = 1.0 / norms.clamp_min(NORM_EPS)
        sq = (norms * weights) ** 2  # q_i: exactly 1 for a row above NORM_EPS
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
        live = (norms > NORM_EPS).to(f.dtype)
        a = 2.0 * weights * live
        c = -2.0 * weights * weights * weights * live
        return gradient(f, inverse, table, a, c, features.dtype), None, None, None


def class_pair_sums(
    features: Tensor, inverse: Tensor, counts: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`ClassPairSums` applied: ``(P, N, sum of row norms)``."""
    return ClassPairSums.apply(features, inverse, counts, dtype)
