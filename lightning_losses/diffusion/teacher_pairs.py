"""Teacher noise -> image pairs for DMD's regression loss (Yin et al. 2024, DMD1).

DMD1 regularises the one-step generator with a regression loss towards the teacher's own
deterministic samples from the SAME noise: a data set of pairs :math:`(z_n, x_n)` with

.. math::

    x_n = \\mathrm{ODE}_{D_{real}}(\\sigma_{max} z_n \\to 0), \\qquad z_n \\sim \\mathcal N(0, I),

made once before training (EDM's Heun sampler, 18 levels by default, as DMD1's EDM pairs). The
pairs are a pure function of the teacher, the seed and the sampler settings: the noise (then the
class labels) is drawn from ONE ``torch.Generator`` seeded with ``seed``, for all pairs at once,
so the batch size used to run the teacher does not change them. They are saved with safetensors
(no pickle), with the settings as metadata. From the shell::

    python -m lightning_losses.diffusion.teacher_pairs \\
        --teacher lightning_losses/assets/digits_teacher --num-pairs 1000 --out pairs.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_losses.checks import check_int, check_positive_int
from lightning_losses.diffusion.samplers import DenoiserFn, edm_heun_sampler

__all__ = [
    "TeacherPairs",
    "load_teacher_pairs",
    "main",
    "make_teacher_pairs",
    "save_teacher_pairs",
]


class TeacherPairs(NamedTuple):
    """Pairs of standard-normal noise and the teacher's ODE sample from it.

    Attributes:
        noise: ``(N, C, H, W)`` float32 standard normal :math:`z` (the generator's input is
            :math:`\\sigma_g z`, as the teacher's sampler starts at :math:`\\sigma_{max} z`).
        images: ``(N, C, H, W)`` float32 teacher samples in the data space ([-1, 1]).
        class_labels: ``(N,)`` int64 labels of a class-conditional teacher, else None.
        seed: the seed of the draws.
        num_steps: the number of Heun noise levels.
    """

    noise: Tensor
    images: Tensor
    class_labels: Tensor | None
    seed: int
    num_steps: int

    def __len__(self) -> int:  # type: ignore[override]
        return int(self.noise.shape[0])


@torch.no_grad()
def make_teacher_pairs(
    teacher: DenoiserFn,
    num_pairs: int,
    image_shape: tuple[int, int, int] | None = None,
    *,
    seed: int = 0,
    num_steps: int = 18,
    batch_size: int = 256,
    num_classes: int | None = None,
) -> TeacherPairs:
    """Run the teacher's Heun sampler on ``num_pairs`` seeded noises.

    Args:
        teacher: a denoiser ``D(x, sigma, class_labels=None)``; its ``sigma_min`` /
            ``sigma_max`` choose the Karras levels (:func:`edm_heun_sampler`'s default).
        num_pairs: how many pairs (>= 1).
        image_shape: ``(C, H, W)``; by default the teacher's ``in_channels`` and
            ``sample_size``.
        seed: seeds the noise and the labels.
        num_steps: Heun noise levels (EDM / DMD1: 18).
        batch_size: how many samples the teacher runs at once (does not change the pairs).
        num_classes: classes of a class-conditional teacher (default: its ``num_classes``);
            labels are uniform over ``{0, .., num_classes - 1}``.

    Raises:
        ValueError: for a non-positive count, steps or batch size, or an image shape that
            cannot be read from the teacher.
    """
    check_positive_int(num_pairs, "num_pairs")
    check_positive_int(num_steps, "num_steps")
    check_positive_int(batch_size, "batch_size")
    check_int(seed, "seed")
    if image_shape is None:
        size = getattr(teacher, "sample_size", None)
        channels = getattr(teacher, "in_channels", None)
        if channels is None or size is None:
            raise ValueError(
                "image_shape must be given as (C, H, W) when the teacher has no in_channels / "
                "sample_size"
            )
        height, width = (size, size) if isinstance(size, int) else size
        image_shape = (int(channels), int(height), int(width))
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (C, H, W) of positive sizes, got {image_shape}")
    if num_classes is None:
        num_classes = getattr(teacher, "num_classes", None)
    if num_classes is not None:
        check_positive_int(num_classes, "num_classes")
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(num_pairs, *image_shape, generator=generator)
    labels = None
    if num_classes is not None:
        labels = torch.randint(0, num_classes, (num_pairs,), generator=generator)
    device = next((p.device for p in getattr(teacher, "parameters", list)()), torch.device("cpu"))
    images = []
    for start in range(0, num_pairs, batch_size):
        chunk = noise[start : start + batch_size].to(device)
        chunk_labels = None if labels is None else labels[start : start + batch_size].to(device)
        sample = edm_heun_sampler(teacher, chunk, num_steps=num_steps, class_labels=chunk_labels)
        images.append(sample.float().cpu())
    return TeacherPairs(noise, torch.cat(images), labels, int(seed), int(num_steps))


def save_teacher_pairs(pairs: TeacherPairs, path: str | os.PathLike[str]) -> Path:
    """Write ``pairs`` to a ``.safetensors`` file (settings in its metadata); returns the path."""
    from safetensors.torch import save_file

    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"noise": pairs.noise.contiguous(), "images": pairs.images.contiguous()}
    if pairs.class_labels is not None:
        tensors["class_labels"] = pairs.class_labels.contiguous()
    metadata = {
        "format": "teacher_pairs",
        "seed": str(pairs.seed),
        "num_steps": str(pairs.num_steps),
    }
    save_file(tensors, str(target), metadata=metadata)
    return target


def load_teacher_pairs(path: str | os.PathLike[str]) -> TeacherPairs:
    """Read pairs written by :func:`save_teacher_pairs` (safetensors: no code is executed).

    Raises:
        FileNotFoundError: when ``path`` does not exist (the message says how to make them).
        ValueError: when the file is not a teacher-pairs file, or it is truncated / corrupt
            (the message names the file).
    """
    from safetensors import safe_open

    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(
            f"no teacher pairs at {str(source)!r}; make them once with "
            "`python -m lightning_losses.diffusion.teacher_pairs --teacher <folder> --out "
            f"{str(source)!r}` (or save_teacher_pairs(make_teacher_pairs(teacher, n), path))"
        )
    try:
        with safe_open(str(source), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{str(source)!r} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != "teacher_pairs" or not {"noise", "images"} <= tensors.keys():
        raise ValueError(
            f"{str(source)!r} is not a teacher-pairs file (expected tensors 'noise' and 'images' "
            f"and metadata format=teacher_pairs, got keys {sorted(tensors)} and metadata "
            f"{json.dumps(metadata)})"
        )
    noise, images = tensors["noise"], tensors["images"]
    labels = tensors.get("class_labels")
    if noise.shape != images.shape or noise.ndim != 4:
        raise ValueError(
            f"{str(source)!r}: noise {tuple(noise.shape)} and images {tuple(images.shape)} must "
            "be (N, C, H, W) of one shape"
        )
    if labels is not None and labels.shape != (noise.shape[0],):
        raise ValueError(f"{str(source)!r}: class_labels must have shape ({noise.shape[0]},)")
    return TeacherPairs(noise, images, labels, int(metadata["seed"]), int(metadata["num_steps"]))


def main(argv: list[str] | None = None) -> int:
    """``python -m lightning_losses.diffusion.teacher_pairs``: make and save the pairs."""
    from lightning_losses.diffusion.loading import load_denoiser

    parser = argparse.ArgumentParser(
        prog="python -m lightning_losses.diffusion.teacher_pairs",
        description="Teacher noise -> Heun-sample pairs for DMD's regression loss (safetensors).",
    )
    parser.add_argument("--teacher", required=True, help="a local teacher folder")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--num-pairs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=18)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        teacher = load_denoiser(args.teacher)
        pairs = make_teacher_pairs(
            teacher,
            args.num_pairs,
            seed=args.seed,
            num_steps=args.num_steps,
            batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = save_teacher_pairs(pairs, args.out)
    print(f"wrote {len(pairs)} pairs ({args.num_steps} Heun levels, seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
