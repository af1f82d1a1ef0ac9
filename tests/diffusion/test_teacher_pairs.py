"""Teacher noise -> image pairs: seeded, independent of the batch size, safetensors round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_losses.diffusion.samplers import edm_heun_sampler
from lightning_losses.diffusion.teacher_pairs import (
    load_teacher_pairs,
    make_teacher_pairs,
    save_teacher_pairs,
)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(mu_c, s^2 I) data: mu + (x - mu) s^2 / (s^2 + sigma^2)."""

    sigma_min, sigma_max = 0.002, 80.0
    in_channels, sample_size = 1, 4

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.calls = 0

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None
    ) -> Tensor:
        self.calls += 1
        s2 = 0.25
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        mu = torch.zeros_like(x)
        if class_labels is not None:
            mu = (class_labels.to(x.dtype) / 10).view(-1, 1, 1, 1).expand_as(x)
        return mu + (x - mu) * s2 / (s2 + sigma**2)


def test_pairs_are_the_heun_samples_of_seeded_noise_for_any_batch_size() -> None:
    teacher = GaussianDenoiser()
    pairs = make_teacher_pairs(teacher, 5, seed=3, num_steps=6, batch_size=2)
    again = make_teacher_pairs(teacher, 5, seed=3, num_steps=6, batch_size=5)
    assert pairs.noise.shape == pairs.images.shape == (5, 1, 4, 4)
    assert pairs.class_labels is None and len(pairs) == 5
    torch.testing.assert_close(pairs.noise, again.noise, rtol=0, atol=0)
    torch.testing.assert_close(pairs.images, again.images)
    expected_noise = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pairs.noise, expected_noise, rtol=0, atol=0)
    torch.testing.assert_close(pairs.images, edm_heun_sampler(teacher, expected_noise, num_steps=6))
    other = make_teacher_pairs(teacher, 5, seed=4, num_steps=6)
    assert not torch.equal(other.noise, pairs.noise)


def test_the_ode_sample_of_a_gaussian_teacher_is_the_scaled_noise() -> None:
    # For N(0, s^2) data the probability-flow ODE maps sigma_max * z to
    # s * sigma_max / sqrt(s^2 + sigma_max^2) * z: the pairs converge to it as steps grow.
    exact = 0.5 * 80 / (0.25 + 80**2) ** 0.5
    errors = []
    for steps in (18, 64, 256):
        pairs = make_teacher_pairs(GaussianDenoiser(), 4, seed=0, num_steps=steps)
        torch.testing.assert_close(
            pairs.images, pairs.noise * (pairs.images / pairs.noise)[0, 0, 0, 0]
        )
        errors.append(abs((pairs.images / pairs.noise).median().item() - exact))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-4


def test_class_conditional_pairs_round_trip_through_safetensors(tmp_path: Path) -> None:
    teacher = GaussianDenoiser(num_classes=3)
    pairs = make_teacher_pairs(teacher, 7, seed=1, num_steps=4)
    assert pairs.class_labels is not None and pairs.class_labels.shape == (7,)
    assert int(pairs.class_labels.max()) < 3
    path = save_teacher_pairs(pairs, tmp_path / "sub" / "pairs.safetensors")
    loaded = load_teacher_pairs(path)
    for name in ("noise", "images", "class_labels"):
        torch.testing.assert_close(getattr(loaded, name), getattr(pairs, name), rtol=0, atol=0)
    assert (loaded.seed, loaded.num_steps) == (1, 4)


def test_bad_arguments_and_files_raise_naming_them(tmp_path: Path) -> None:
    teacher = GaussianDenoiser()
    with pytest.raises(ValueError, match="num_pairs"):
        make_teacher_pairs(teacher, 0)
    with pytest.raises(ValueError, match="num_steps"):
        make_teacher_pairs(teacher, 2, num_steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_shape"):
        make_teacher_pairs(lambda x, s, class_labels=None: x, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image_shape"):
        make_teacher_pairs(teacher, 2, image_shape=(1, 0, 4))
    with pytest.raises(FileNotFoundError, match="make_teacher_pairs"):
        load_teacher_pairs(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_teacher_pairs(corrupt)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a teacher-pairs file"):
        load_teacher_pairs(other)
    pairs = make_teacher_pairs(teacher, 3, num_steps=2)
    path = save_teacher_pairs(pairs, tmp_path / "pairs.safetensors")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="pairs.safetensors"):
        load_teacher_pairs(path)


def test_the_command_writes_pairs_of_the_committed_teacher_and_fails_clearly(
    tmp_path: Path, repo_root: Path
) -> None:
    import subprocess
    import sys

    out = tmp_path / "pairs.safetensors"
    command = [sys.executable, "-m", "lightning_losses.diffusion.teacher_pairs"]
    teacher = repo_root / "lightning_losses/assets/digits_teacher"
    args = ["--teacher", str(teacher), "--out", str(out), "--num-pairs", "3", "--num-steps", "2"]
    done = subprocess.run(command + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 3 pairs" in done.stdout
    pairs = load_teacher_pairs(out)
    assert pairs.images.shape == (3, 1, 8, 8) and pairs.num_steps == 2
    bad = subprocess.run(
        command + ["--teacher", str(tmp_path / "none"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "no denoiser folder" in bad.stderr
