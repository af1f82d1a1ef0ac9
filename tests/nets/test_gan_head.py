"""DMD2's GAN head and the bottleneck feature tap on the digits teacher's UNet."""

from __future__ import annotations

import pytest
import torch

from lightning_losses.nets.gan_head import FeatureTap, GANHead


@pytest.mark.parametrize("side", [2, 4, 8])
def test_head_gives_one_logit_per_image_and_dmd2_shapes(side: int) -> None:
    head = GANHead(64, side)
    x = torch.randn(3, 64, side, side)
    logits = head(x)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    if side == 8:  # DMD2's ImageNet-64 head: 4x4/2 then 4x4/4
        conv2 = head.layers[3]
        assert (conv2.kernel_size, conv2.stride) == ((4, 4), (4, 4))
    assert isinstance(head.layers[1], torch.nn.GroupNorm) and head.layers[1].num_groups == 32
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_head_rejects_wrong_features_and_sizes() -> None:
    head = GANHead(8, 4, hidden_channels=16)
    with pytest.raises(ValueError, match=r"features must have shape \(B, 8, 4, 4\)"):
        head(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="spatial_size"):
        GANHead(8, 3)
    with pytest.raises(ValueError, match="hidden_channels"):
        GANHead(8, 4, hidden_channels=0)


def test_tap_reads_the_teacher_bottleneck_with_its_graph() -> None:
    from lightning_losses.diffusion import EDMPrecond

    denoiser = EDMPrecond.from_pretrained("lightning_losses/assets/digits_teacher")
    head = GANHead(64, 4)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    with FeatureTap(denoiser, "unet.mid_block") as tap:
        denoiser(x, torch.full((2,), 1.0))
        features = tap.pop()
    assert features.shape == (2, 64, 4, 4)
    head(features).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    denoiser(x, torch.full((2,), 1.0))  # the hook is gone: nothing is captured any more
    assert tap.features is None
    with pytest.raises(RuntimeError, match="did not run"):
        tap.pop()
    with pytest.raises(ValueError, match="names no sub-module.*unet"):
        FeatureTap(denoiser, "unet.bottleneck")
