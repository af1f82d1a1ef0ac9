"""Reading images and class labels out of a training batch (torch only)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "RealBatch", "split_real_batch"]

#: Dict keys under which a batch may hold its images, and its labels.
IMAGE_KEYS = ("images", "image", "pixel_values")
LABEL_KEYS = ("labels", "label", "class_labels")


class RealBatch(NamedTuple):
    """What a training batch holds: real images and labels (None when absent), its size."""

    images: Tensor | None
    labels: Tensor | None
    size: int | None


def _is_label_tensor(value: object) -> bool:
    return (
        isinstance(value, Tensor)
        and value.ndim == 1
        and not value.is_floating_point()
        and not value.is_complex()
        and value.dtype != torch.bool
    )


def split_real_batch(batch: Any) -> RealBatch:
    """Read real images (and labels) from a batch, without raising when there are none.

    Images are a 4-D ``(B, C, H, W)`` tensor: the batch itself, the first item of an
    ``(images, labels, ...)`` sequence, or ``batch[k]`` for k in :data:`IMAGE_KEYS`. Labels are
    a 1-D integer tensor: the second item of the sequence or ``batch[k]`` for k in
    :data:`LABEL_KEYS`. ``size`` is the length of the first tensor found (None if there is
    none). The caller decides whether missing images are an error.
    """
    images = labels = None
    first: Tensor | None = None
    if isinstance(batch, Tensor):
        first = batch
        images = batch if batch.ndim == 4 else None
    elif isinstance(batch, dict):
        tensors = [v for v in batch.values() if isinstance(v, Tensor) and v.ndim >= 1]
        first = tensors[0] if tensors else None
        images = next((batch[k] for k in IMAGE_KEYS if k in batch), None)
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
    elif isinstance(batch, list | tuple):
        tensors = [v for v in batch if isinstance(v, Tensor) and v.ndim >= 1]
        first = tensors[0] if tensors else None
        if batch and isinstance(batch[0], Tensor) and batch[0].ndim == 4:
            images = batch[0]
            labels = batch[1] if len(batch) > 1 else None
    if not (isinstance(images, Tensor) and images.ndim == 4):
        images = None
    if not _is_label_tensor(labels):
        labels = None
    size = None
    if images is not None:
        size = images.shape[0]
    elif isinstance(first, Tensor) and first.ndim >= 1:
        size = first.shape[0]
    return RealBatch(images, labels, size)
