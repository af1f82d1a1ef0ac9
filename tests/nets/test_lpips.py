"""LPIPS on a local VGG-16 file: the distance against an explicit reference, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import vgg16

from lightning_losses.nets.lpips import CHANNELS, LPIPS, SCALE, SHIFT, TAPS


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    trunk = vgg16(weights=None).features[: TAPS[-1] + 1]
    state = {f"features.{k}": v.contiguous() for k, v in trunk.state_dict().items()}
    for layer, channels in enumerate(CHANNELS):
        state[f"lin{layer}.model.1.weight"] = torch.rand(1, channels, 1, 1)
    path = tmp_path_factory.mktemp("lpips") / "vgg_lpips.safetensors"
    save_file(state, str(path))
    return path, state


def _reference(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out layer by layer in float64 (VGG's conv / ReLU / max-pool sequence)."""
    shift = torch.tensor(SHIFT, dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor(SCALE, dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img: torch.Tensor) -> list[torch.Tensor]:
        h = (img.double().expand(-1, 3, -1, -1) - shift) / scale
        out = []
        for index in range(TAPS[-1] + 1):
            weight = state.get(f"features.{index}.weight")
            if weight is not None:
                h = F.conv2d(
                    h, weight.double(), state[f"features.{index}.bias"].double(), padding=1
                )
            elif index in (4, 9, 16, 23):
                h = F.max_pool2d(h, 2)
            else:
                h = h.clamp_min(0)
            if index in TAPS:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for layer, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        w = state[f"lin{layer}.model.1.weight"].double()
        total += ((fx - fy).square() * w).sum(1).mean((1, 2))
    return total


def test_distance_matches_the_explicit_reference(vgg_file) -> None:
    path, state = vgg_file
    lpips = LPIPS(path, resize=None)
    torch.manual_seed(1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    got = lpips(x, y)
    torch.testing.assert_close(got.double(), _reference(state, x, y), rtol=1e-4, atol=1e-6)
    assert torch.all(lpips(x, x) == 0)
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.trunk.training


def test_gradient_reaches_the_images(vgg_file) -> None:
    lpips = LPIPS(vgg_file[0], resize=16)
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    lpips(x, torch.zeros(1, 3, 8, 8)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_missing_file_or_trunk_is_a_clear_error(tmp_path: Path, vgg_file) -> None:
    with pytest.raises(FileNotFoundError, match="local weights file.*pseudo_huber"):
        LPIPS(None)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPS(tmp_path / "absent.safetensors")
    partial = {k: v for k, v in vgg_file[1].items() if not k.startswith("features.28")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks the VGG-16 trunk.*features.28"):
        LPIPS(tmp_path / "partial.safetensors")
    wrong = dict(vgg_file[1])
    wrong["lin0.model.1.weight"] = torch.ones(1, 3, 1, 1)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"lin0.weight has shape \(1, 3, 1, 1\)"):
        LPIPS(tmp_path / "wrong.safetensors")
    lpips = LPIPS(vgg_file[0], resize=None)
    with pytest.raises(ValueError, match="one shape"):
        lpips(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 8))
