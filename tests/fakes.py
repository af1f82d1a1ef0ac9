"""Tiny fakes shared by the tests: data modules and networks small enough for 2 CPU cores.

Torch-only helpers (no Lightning import) live in :mod:`torch_fakes`.
"""

from __future__ import annotations

import pickle

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

#: Trainer settings for tests: CPU, one process, nothing written, nothing printed.
QUIET = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)
#: :data:`QUIET` as ``lightning-losses`` command-line overrides (``--trainer.logger=false``, ...).
QUIET_ARGS = [f"--trainer.{key}={str(value).lower()}" for key, value in QUIET.items()]


#: The 2-process CPU DDP strategies of the tests. Forked children inherit the imported modules;
#: spawned ones re-import Lightning first (about 10 s of CPU each on a 2-core machine).
#: test_classifier.py keeps one real ``ddp_spawn`` run, and :func:`assert_spawn_picklable`
#: checks the rest of what spawn would send.
DDP = "ddp_fork"
DDP_FIND_UNUSED = "ddp_fork_find_unused_parameters_true"


def assert_spawn_picklable(*objects: object) -> None:
    """Each object (module, data module, callback) survives the pickling ``ddp_spawn`` does."""
    for obj in objects:
        restored = pickle.loads(pickle.dumps(obj))
        assert type(restored) is type(obj)
        if isinstance(obj, nn.Module):
            for (name, a), (_, b) in zip(obj.state_dict().items(), restored.state_dict().items()):
                assert torch.equal(a, b), name


def quiet_trainer(**overrides: object) -> L.Trainer:
    """A ``Trainer`` with :data:`QUIET` settings, ``overrides`` on top."""
    return L.Trainer(**{**QUIET, **overrides})


class ToyImages(L.LightningDataModule):
    """Random 1x8x8 'images' whose class shifts the mean: learnable, tiny, deterministic.

    Labels ``arange(num) % num_classes``; the images are :meth:`make_images` of seeded N(0, 1)
    noise, served in order (no shuffling).
    """

    image_shape = (1, 8, 8)

    def __init__(self, num: int = 64, num_classes: int = 4, batch_size: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num) % num_classes
        self.num_classes = num_classes
        self.images = self.make_images(torch.randn(num, 1, 8, 8, generator=g))
        self.batch_size = batch_size

    def make_images(self, noise: Tensor) -> Tensor:
        """The images from the (num, 1, 8, 8) noise: here shifted by the label."""
        return noise + self.labels.view(-1, 1, 1, 1)

    def _loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()


class TinyMLP(nn.Module):
    """A BatchNorm-free backbone: (B, 1, 8, 8) -> (B, feature_dim) post-ReLU features."""

    def __init__(self, feature_dim: int = 8) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, feature_dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def tiny_edm_teacher(
    num_classes: int | None = None, channels: int = 1, **precond: float
) -> nn.Module:
    """A seeded random ``EDMPrecond`` around an 8x8 UNet (channels 8, 16), in eval mode;
    ``precond``: its ``sigma_min``, ``sigma_max``, ``sigma_data``."""
    from lightning_losses.diffusion import EDMPrecond, unet_for_images

    torch.manual_seed(0)
    unet = unet_for_images(channels, 8, (8, 16), num_classes=num_classes)
    return EDMPrecond(unet, **precond).eval()
