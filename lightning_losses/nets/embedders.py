"""A bank of frozen, randomly initialised embedding networks for the Embedding Loss (EL).

The EL paper (Ying et al., arXiv 2604.22379) matches generated and real images by MMD in the
feature spaces of "a diverse set of randomly initialised networks"; its networks are unknown to us.
EVERYTHING here is OUR choice, and each knob is a parameter:

- families, cycled over the networks (``families`` picks and orders them):

  * ``"convnet"``: plain ConvNet, 3 stages of conv3x3-ReLU-avgpool2, widths w, 2w, 4w (the random
    ConvNet of dataset condensation by distribution matching, without its instance norm);
  * ``"resnet"``: small pre-activation ResNet with GroupNorm, a conv3x3 stem and 3 basic blocks
    (w, stride 1; 2w, stride 2; 4w, stride 2);
  * ``"wide"``: wide shallow net, one conv5x5 layer with 8w channels and ReLU;
  * ``"patch_mlp"``: strided patch-MLP, a 4x4 / stride 4 patchify conv to 4w channels with GELU,
    then 2 residual token-MLP blocks (LayerNorm, Linear 4w -> 8w, GELU, Linear 8w -> 4w);

- features: the global average pool (over space, or over tokens) of every stage's output, so a
  network gives one (B, c) tensor per stage and the bank the list over all networks;
- no BatchNorm anywhere: only GroupNorm and LayerNorm, which normalise each sample on its own, so
  a sample's features never depend on the rest of the batch;
- initialisation: weights ~ N(0, 2 / fan_in) (Kaiming, ReLU gain), biases ~ U(-1/sqrt(fan_in),
  1/sqrt(fan_in)), norms' affine parameters at 1 and 0, all drawn from one CPU
  ``torch.Generator`` seeded with ``seed``, network by network. The weights are thus a function
  of ``seed`` alone: identical on every rank and on every device, independent of (and not
  advancing) the global RNG.

Computation (the same features, up to float rounding, as the plain layers): a frozen bank's wide
net is one gathered-patch matrix product with a fused ReLU-mean backward; the patch-MLP's patchify
is a reshape and a matrix product; outputs used only pooled are pooled before their last linear
map (the ResNet's last block: convolutions of window means, :func:`_mean_of_conv`; the patch-MLP's
last Linear); the ConvNet skips the pooling after its last stage, whose map is unused.

Inputs are images of at least 8 x 8 (``min_size``); 8 x 8 to 64 x 64 is the intended range (larger
works, at a cost linear in the pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.checks import check_tensor

__all__ = ["EMBEDDER_FAMILIES", "RandomEmbedderBank"]

#: The network families of :class:`RandomEmbedderBank`, in the default cycling order.
EMBEDDER_FAMILIES: tuple[str, ...] = ("convnet", "resnet", "wide", "patch_mlp")


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, dividing the channels."""
    return math.gcd(channels, 8)


def _patch_rows(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, int]:
    """The input patches of ``conv`` as rows: (B, C, H, W) -> ((B L, C k_h k_w), L).

    Row ``b L + l`` holds output position l's receptive field, flattened as the weight is, so
    ``rows @ weight.flatten(1).T`` is the convolution. Non-overlapping patches (stride = kernel,
    no padding) are a reshape; others ``unfold``.
    """
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = conv.kernel_size, conv.stride, conv.padding
    batch, channels, height, width = x.shape
    if (s_h, s_w) == (k_h, k_w) and (p_h, p_w) == (0, 0):
        h, w = height // k_h, width // k_w
        patches = x[:, :, : h * k_h, : w * k_w].reshape(batch, channels, h, k_h, w, k_w)
        rows = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch * h * w, channels * k_h * k_w)
        return rows, h * w
    patches = F.unfold(x, (k_h, k_w), padding=(p_h, p_w), stride=(s_h, s_w))  # (B, C k k, L)
    length = patches.shape[2]
    return patches.transpose(1, 2).reshape(batch * length, patches.shape[1]), length


def _conv_tokens(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` as one matrix product, (B, C, H, W) -> (B, H' W', out) tokens (row-major).

    The same sums as the convolution, in a layout whose ReLU / GELU and spatial mean are
    contiguous passes; used for a layer on the image's few channels, where the CPU convolution
    kernels (most of all their backward to the input) are slow.
    """
    rows, length = _patch_rows(x, conv)
    weight = conv.weight.flatten(1)
    out = torch.addmm(conv.bias, rows, weight.T) if conv.bias is not None else rows @ weight.T
    return out.view(x.shape[0], length, conv.out_channels)


#: Gather indices of :func:`_patch_index`, per (C, H, W, conv geometry, device).
_PATCH_INDEX_CACHE: dict[tuple, Tensor] = {}


def _patch_index(
    channels: int, height: int, width: int, conv: nn.Conv2d, device: torch.device
) -> tuple[Tensor, int]:
    """Flat indices that gather ``conv``'s input patches, and the output positions L.

    The image is zero-padded by ``conv.padding`` and flattened per sample to
    ``C (H + 2 p_h) (W + 2 p_w)`` values followed by one constant 1 (the bias' input). Entry
    ``k L + l`` of the index is the flat position of output l's k-th input value (C, k_h, k_w
    order, as the weight is flattened); entries ``K L + l`` point at the 1. Gathered, it is a
    (K + 1, L) matrix per sample, the right factor of ``weight @ patches``. Stride taken into
    account; cached (a few small tensors per geometry).
    """
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = conv.kernel_size, conv.stride, conv.padding
    key = (channels, height, width, k_h, k_w, s_h, s_w, p_h, p_w, str(device))
    cached = _PATCH_INDEX_CACHE.get(key)
    if cached is None:
        padded_h, padded_w = height + 2 * p_h, width + 2 * p_w
        out_h, out_w = (padded_h - k_h) // s_h + 1, (padded_w - k_w) // s_w + 1

        def arange(n: int) -> Tensor:  # built on the device: no copy there
            return torch.arange(n, device=device)

        c = arange(channels)[:, None, None]
        ky, kx = arange(k_h)[None, :, None], arange(k_w)[None, None, :]
        taps = (c * padded_h * padded_w + ky * padded_w + kx).flatten()  # (K,)
        oy, ox = arange(out_h)[:, None] * s_h, arange(out_w)[None, :] * s_w
        starts = (oy * padded_w + ox).flatten()  # (L,)
        one = torch.full((starts.shape[0], 1), channels * padded_h * padded_w, device=device)
        rows = torch.cat([starts[:, None] + taps[None, :], one], dim=1)  # (L, K + 1)
        cached = rows.T.contiguous().flatten()  # tap-major: entry k L + l
        _PATCH_INDEX_CACHE[key] = cached
    return cached, cached.shape[0] // (channels * conv.kernel_size[0] * conv.kernel_size[1] + 1)


class _ConvReLUMean(torch.autograd.Function):
    """``relu(conv(x))`` averaged over each sample's L output positions, with a fused backward.

    Input: the padded image flattened per sample with a trailing 1 (see :func:`_patch_index`),
    (B, P + 1). The patches are gathered as (B, K + 1, L) and ``weight`` ends with the bias: one
    product per sample, :math:`(C, K + 1) \\times (K + 1, L)`, whose (C, L) result stays in the
    cache (one (B L, K + 1) x (K + 1, C) product is several times slower on the CPU), the mean
    over L then a contiguous pass. Backward, with the weight constant (a frozen bank): the
    gradient of patch entry (k, l) of sample b is :math:`\\sum_c W_{ck}\\, 1[out_{bcl} > 0]\\,
    g_{bc} / L`: the activation turned in place into its sign times :math:`g_{bc} / L` (no new
    B C L tensor), one product per sample with :math:`W^T`, and a scatter-add back to the padded
    image (``index_add_``), instead of autograd's passes over the activations for the mean's and
    the ReLU's backward and an ``unfold`` / ``fold`` pair. A second backward of a retained graph
    recomputes the activation from the saved input.
    """

    @staticmethod
    def _activation(flat: Tensor, weight: Tensor, index: Tensor, length: int) -> Tensor:
        patches = torch.index_select(flat, 1, index).view(flat.shape[0], weight.shape[1], length)
        return torch.matmul(weight, patches).clamp_min_(0.0)  # (B, C, L)

    @staticmethod
    def forward(ctx: Any, flat: Tensor, weight: Tensor, index: Tensor, length: int) -> Tensor:
        out = _ConvReLUMean._activation(flat, weight, index, length)
        ctx.save_for_backward(flat, weight, index)
        ctx.out = out  # consumed (overwritten) by the first backward
        ctx.length = length
        return out.mean(dim=2)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        flat, weight, index = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        out, ctx.out = ctx.out, None
        if out is None:  # a second backward (retain_graph=True): the same activation again
            out = _ConvReLUMean._activation(flat, weight, index, ctx.length)
        scaled = out.sign_().mul_((grad / ctx.length)[:, :, None])  # (B, C, L)
        patches = torch.matmul(weight.T, scaled)  # (B, K + 1, L), the index's order
        grad_flat = torch.zeros_like(flat)
        grad_patches = patches.view(flat.shape[0], index.shape[0])
        return grad_flat.index_add_(1, index, grad_patches), None, None, None


def _relu_mean_of_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``relu(conv(x)).mean(dim=(2, 3))``: fused when the weights are frozen (the bank's)."""
    if (
        conv.weight.requires_grad
        or conv.bias is None
        or conv.bias.requires_grad
        or conv.dilation != (1, 1)
        or conv.groups != 1
        or torch.is_autocast_enabled(x.device.type)
        or torch.is_grad_enabled()
        and x.requires_grad
        and x.dtype != conv.weight.dtype
    ):
        return F.relu(_conv_tokens(x, conv)).mean(dim=1)
    batch, channels, height, width = x.shape
    (p_h, p_w) = conv.padding
    index, length = _patch_index(channels, height, width, conv, x.device)
    padded = F.pad(x, (p_w, p_w, p_h, p_h)).flatten(1)
    flat = torch.cat([padded, torch.ones(batch, 1, dtype=x.dtype, device=x.device)], dim=1)
    weight = torch.cat([conv.weight.flatten(1), conv.bias[:, None]], dim=1).to(x.dtype)
    return _ConvReLUMean.apply(flat, weight, index, length)


class _ImageConv(torch.autograd.Function):
    """A frozen convolution of the input image, with its input gradient as a matrix product.

    The forward is ``F.conv2d``; the backward, for the few input channels of an image, is
    :math:`\\partial x_{p} = \\sum_{l, k : \\mathrm{patch}(l, k) = p} \\sum_c g_{c l}
    W_{c k}`: one batched product of the weight with the output gradient and a scatter-add of
    the patches (:func:`_patch_index`), where the CPU convolution's backward to a 1-channel
    input is several times slower. The weight and bias are constants (a frozen bank).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, conv: nn.Conv2d) -> Tensor:
        out = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        ctx.conv = conv
        ctx.input_shape = x.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        conv = ctx.conv
        batch, channels, height, width = ctx.input_shape
        (p_h, p_w) = conv.padding
        index, length = _patch_index(channels, height, width, conv, grad.device)
        taps = index.shape[0] // length  # C k_h k_w + 1 (the last: the bias' input, dropped)
        weight = conv.weight.flatten(1).to(grad.dtype)  # (C_out, C k_h k_w)
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], dim=1)
        # (K + 1, C_out) @ (B, C_out, L) -> (B, K + 1, L): the index's (tap-major) order
        rows = torch.matmul(weight.T, grad.reshape(batch, grad.shape[1], length))
        padded_h, padded_w = height + 2 * p_h, width + 2 * p_w
        flat = grad.new_zeros(batch, channels * padded_h * padded_w + 1)
        flat.index_add_(1, index, rows.reshape(batch, length * taps))
        padded = flat[:, :-1].view(batch, channels, padded_h, padded_w)
        return padded[:, :, p_h : p_h + height, p_w : p_w + width], None


def _image_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a network's first convolution: :class:`_ImageConv` when the weights are
    frozen, the input needs its gradient and has at most 4 channels; else the plain layer."""
    if (
        x.requires_grad
        and torch.is_grad_enabled()
        and x.shape[1] <= 4
        and not conv.weight.requires_grad
        and (conv.bias is None or not conv.bias.requires_grad)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and x.dtype == conv.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        return _ImageConv.apply(x, conv)
    return conv(x)


#: Window-mean matrices of :func:`_window_means`, per (H, W, conv geometry, dtype, device).
_WINDOW_CACHE: dict[tuple, Tensor] = {}


def _window_means(height: int, width: int, conv: nn.Conv2d, like: Tensor) -> Tensor:
    """(H W, k_h k_w) M with :math:`M_{p t} = \\#\\{o : \\text{output } o\\text{'s tap } t
    \\text{ reads input } p\\} / L` for ``conv``'s geometry (L output positions; taps reading
    the zero padding count nothing). Built and cached in ``like``'s dtype and on its device."""
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = conv.kernel_size, conv.stride, conv.padding
    key = (height, width, k_h, k_w, s_h, s_w, p_h, p_w, like.dtype, str(like.device))
    cached = _WINDOW_CACHE.get(key)
    if cached is None:
        out_h = (height + 2 * p_h - k_h) // s_h + 1
        out_w = (width + 2 * p_w - k_w) // s_w + 1
        o_y = torch.arange(out_h, device=like.device)[:, None, None, None] * s_h
        o_x = torch.arange(out_w, device=like.device)[None, :, None, None] * s_w
        t_y = torch.arange(k_h, device=like.device)[None, None, :, None]
        t_x = torch.arange(k_w, device=like.device)[None, None, None, :]
        y, x = (
            (o_y + t_y - p_h).expand(-1, out_w, -1, k_w),
            (o_x + t_x - p_w).expand(out_h, -1, k_h, -1),
        )
        tap = (t_y * k_w + t_x).expand(out_h, out_w, -1, -1)
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        # Taps reading the padding go to a spare last row, dropped (no data-sized indexing).
        rows = torch.where(inside, y * width + x, height * width)
        counts = like.new_zeros(height * width + 1, k_h * k_w)  # small integers: exact
        ones = like.new_ones(rows.shape)
        counts = counts.index_put_((rows, tap), ones, accumulate=True)[:-1]
        cached = counts / (out_h * out_w)
        _WINDOW_CACHE[key] = cached
    return cached


#: Largest C H W x C_out matrix :func:`_mean_of_conv` folds a frozen convolution into.
_MAX_FOLDED = 1 << 22


def _folded_mean_weight(conv: nn.Conv2d, height: int, width: int, like: Tensor) -> Tensor:
    """(C H W, C_out) :math:`V_{(c p) o} = \\sum_t W_{o c t} M_{p t}` for a frozen ``conv``
    (:func:`_window_means`' M), so ``conv(x).mean(dim=(2, 3)) = x.flatten(1) @ V + b``. Kept on
    the module, rebuilt when the weight changes (a re-draw bumps its version) or the input's
    size, dtype or device does."""
    weight = conv.weight
    key = (height, width, weight.data_ptr(), weight._version, like.dtype, str(like.device))
    cached = conv.__dict__.get("_folded_mean")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            window = _window_means(height, width, conv, like)  # (H W, T)
            taps = weight.to(like).flatten(2)  # (C_out, C, T)
            folded = torch.einsum("oct,pt->cpo", taps, window).reshape(-1, weight.shape[0])
        cached = (key, folded.contiguous())
        conv.__dict__["_folded_mean"] = cached
    return cached[1]


def _mean_of_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x).mean(dim=(2, 3))`` without the convolution, for an output used only pooled.

    The spatial mean of a convolution is linear in the input's window means: with :math:`P_{c
    t} = \\sum_p x_{c p} M_{p t}` the mean over the output positions of the input that tap t
    reads (:func:`_window_means`; zero padding adds nothing), :math:`\\mathrm{mean}_o\\,
    \\mathrm{conv}(x)_o = b + \\sum_{c, t} W_{\\cdot c t} P_{c t}`: the same sums in another
    order. A frozen convolution on a small input is folded into ONE (C H W, C_out) matrix
    (:func:`_folded_mean_weight`): one matrix product per call (the stride-1 3 x 3 convolution
    at 2 x 2 then costs 9 / 4 times fewer multiplications); otherwise two small products. A
    1 x 1 convolution is applied to the mean of its strided input. Dilated or grouped
    convolutions are computed plainly.
    """
    if conv.dilation != (1, 1) or conv.groups != 1 or x.ndim != 4:
        return conv(x).mean(dim=(2, 3))
    batch, channels, height, width = x.shape
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):  # the mean of the strided input
        (s_h, s_w) = conv.stride
        pooled = x[:, :, ::s_h, ::s_w].mean(dim=(2, 3))
        return F.linear(pooled, conv.weight.flatten(1).to(x.dtype), bias)
    frozen = not conv.weight.requires_grad and (conv.bias is None or not conv.bias.requires_grad)
    if frozen and channels * height * width * conv.out_channels <= _MAX_FOLDED:
        folded = _folded_mean_weight(conv, height, width, x)
        flat = x.reshape(batch, channels * height * width)
        return torch.addmm(bias, flat, folded) if bias is not None else flat @ folded
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    window = _window_means(height, width, conv, x)
    pooled = (x.reshape(batch * channels, height * width) @ window).view(batch, channels * taps)
    return F.linear(pooled, conv.weight.flatten(1).to(x.dtype), bias)


class _ConvNet(nn.Module):
    """Plain ConvNet: conv3x3-ReLU-avgpool2 stages; pooled features after each ReLU."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        widths = [in_channels, width, 2 * width, 4 * width]
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, padding=1) for i in range(3)
        )
        self.feature_dims = widths[1:]

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for i, conv in enumerate(self.convs):
            x = F.relu(_image_conv(x, conv) if i == 0 else conv(x))
            features.append(x.mean(dim=(2, 3)))
            if i + 1 < len(self.convs):  # the last stage's pooled map would be unused
                x = F.avg_pool2d(x, 2)
        return features


class _Block(nn.Module):
    """Pre-activation basic block with GroupNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return h + self.shortcut(x)

    def pooled(self, x: Tensor) -> Tensor:
        """``forward(x).mean(dim=(2, 3))`` with the last convolutions folded into the mean
        (:func:`_mean_of_conv`): for the last block, whose output is only pooled."""
        h = F.relu(self.norm2(self.conv1(F.relu(self.norm1(x)))))
        if isinstance(self.shortcut, nn.Conv2d):
            skip = _mean_of_conv(x, self.shortcut)
        else:
            skip = x.mean(dim=(2, 3))
        return _mean_of_conv(h, self.conv2) + skip


class _ResNet(nn.Module):
    """Small GroupNorm ResNet: stem, then blocks (w, 1), (2w, 2), (4w, 2); pooled per block."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            [_Block(width, width, 1), _Block(width, 2 * width, 2), _Block(2 * width, 4 * width, 2)]
        )
        self.feature_dims = [width, 2 * width, 4 * width]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = _image_conv(x, self.stem)
        features = []
        for block in self.blocks[:-1]:
            x = block(x)
            features.append(x.mean(dim=(2, 3)))
        features.append(self.blocks[-1].pooled(x))  # its output is only pooled
        return features


class _Wide(nn.Module):
    """Wide shallow net: one conv5x5 with 8w channels and ReLU, pooled."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8 * width, 5, padding=2)
        self.feature_dims = [8 * width]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [_relu_mean_of_conv(x, self.conv)]


class _PatchMLP(nn.Module):
    """Strided patch-MLP: 4x4/stride-4 patchify + GELU, 2 residual token MLPs; token-pooled."""

    patch_size = 4

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        dim = 4 * width
        self.patchify = nn.Conv2d(in_channels, dim, self.patch_size, stride=self.patch_size)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
            )
            for _ in range(2)
        )
        self.feature_dims = [dim] * 3

    def forward(self, x: Tensor) -> list[Tensor]:
        tokens = F.gelu(_conv_tokens(x, self.patchify))  # (B, N, dim)
        features = [tokens.mean(dim=1)]
        for block in self.blocks[:-1]:
            tokens = tokens + block(tokens)
            features.append(tokens.mean(dim=1))
        # The last block's tokens are only pooled: its final Linear acts on the pooled tokens
        # (a linear map commutes with the mean), on B rows instead of B N.
        *head, last = self.blocks[-1]
        hidden = tokens
        for layer in head:
            hidden = layer(hidden)
        features.append(features[-1] + last(hidden.mean(dim=1)))
        return features


_FAMILY_CLASSES: dict[str, type[nn.Module]] = {
    "convnet": _ConvNet,
    "resnet": _ResNet,
    "wide": _Wide,
    "patch_mlp": _PatchMLP,
}


@torch.no_grad()
def _initialise(network: nn.Module, generator: torch.Generator) -> None:
    """Draw every weight of ``network`` from ``generator`` (CPU), then copy it into place."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            weight = torch.randn(module.weight.shape, generator=generator)
            module.weight.copy_(weight * math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                bias = torch.rand(module.bias.shape, generator=generator) * (2 * bound) - bound
                module.bias.copy_(bias)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            module.bias.fill_(0.0)


class RandomEmbedderBank(nn.Module):
    """Frozen, randomly initialised networks of different families; see the module docstring.

    ``forward(x)`` maps images (B, in_channels, H, W), H and W >= 8, to the list of globally pooled
    (B, c) features of every stage of every network (``feature_dims`` lists the c's, in order).
    The bank is frozen: every parameter has ``requires_grad=False`` and the bank stays in eval
    mode whatever ``train(mode)`` is asked (no module here behaves differently anyway). Gradients
    still flow through it to its input.

    Args:
        in_channels: image channels.
        num_networks: networks in the bank; network i has family ``families[i % len(families)]``.
        seed: the weights are a deterministic function of it (identical on every rank, independent
            of the global RNG).
        width: base width w of every family (see the module docstring).
        resample_every: if > 0, :meth:`maybe_resample` re-draws the weights every that many steps.
        families: the families to cycle through (default :data:`EMBEDDER_FAMILIES`).
    """

    #: The smallest spatial size every family accepts.
    min_size: int = 8

    def __init__(
        self,
        in_channels: int,
        num_networks: int = 4,
        seed: int = 0,
        width: int = 32,
        resample_every: int = 0,
        families: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = _check_int("in_channels", in_channels, 1)
        self.num_networks = _check_int("num_networks", num_networks, 1)
        self.seed = _check_int("seed", seed, 0)
        self.width = _check_int("width", width, 1)
        self.resample_every = _check_int("resample_every", resample_every, 0)
        chosen = tuple(EMBEDDER_FAMILIES if families is None else families)
        unknown = [f for f in chosen if f not in _FAMILY_CLASSES]
        if not chosen or unknown:
            raise ValueError(
                f"families must be a non-empty sequence of {EMBEDDER_FAMILIES}, got {families!r}"
            )
        self.families = [chosen[i % len(chosen)] for i in range(num_networks)]
        # Building modules draws PyTorch's default init from the global RNG: keep it untouched.
        with torch.random.fork_rng(devices=[]):
            self.networks = nn.ModuleList(
                _FAMILY_CLASSES[family](in_channels, width) for family in self.families
            )
        self.feature_dims: list[int] = [d for net in self.networks for d in net.feature_dims]
        self.current_seed = self.seed
        self.reset_parameters(self.seed)
        self.requires_grad_(False)
        super().train(False)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-draw every weight from ``seed`` (default: the constructor's ``seed``)."""
        seed = self.seed if seed is None else _check_int("seed", seed, 0)
        generator = torch.Generator().manual_seed(seed)
        for network in self.networks:
            _initialise(network, generator)
        self.current_seed = seed

    def maybe_resample(self, step: int) -> bool:
        """Re-draw the weights from ``seed + step // resample_every`` at every multiple of it.

        Does something only when ``resample_every > 0``, ``step > 0`` and
        ``step % resample_every == 0``. Pass a step that every rank agrees on (e.g. the module's
        own generator-step counter) and every rank holds the same weights afterwards: the new
        seed is a function of the step, and no communication is needed. The weights are in the
        state dict, so a resumed run continues with the networks it checkpointed.

        Returns:
            Whether the weights were re-drawn.
        """
        step = _check_int("step", step, 0)
        if self.resample_every > 0 and step > 0 and step % self.resample_every == 0:
            self.reset_parameters(self.seed + step // self.resample_every)
            return True
        return False

    def train(self, mode: bool = True) -> RandomEmbedderBank:
        """Stay in eval mode whatever ``mode`` is (the bank is frozen)."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        check_tensor(x, "x", 4, "(B, C, H, W) (a 4-D image batch)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels (shape {tuple(x.shape)}) but the bank was built "
                f"with in_channels={self.in_channels}"
            )
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(
                f"x has spatial size {tuple(x.shape[2:])}; the bank needs at least "
                f"{self.min_size} x {self.min_size}"
            )
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        weight = next(self.parameters())
        if x.device != weight.device:
            raise ValueError(
                f"x is on {x.device} but the bank is on {weight.device}: move one to the other"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        return [feature for network in self.networks for feature in network(x)]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, families={self.families}, seed={self.seed}, "
            f"width={self.width}, resample_every={self.resample_every}"
        )
