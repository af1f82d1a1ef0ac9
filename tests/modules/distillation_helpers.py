"""Helpers shared by the distillation module tests (DMD, Diff-Instruct, consistency)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.fakes import QUIET


def fit(model: L.LightningModule, data: L.LightningDataModule, **trainer_kwargs) -> L.Trainer:
    """One quiet epoch (``trainer_kwargs`` on top) of ``model`` on ``data``."""
    trainer = L.Trainer(**{**QUIET, "max_epochs": 1, **trainer_kwargs})
    trainer.fit(model, data)
    return trainer


def state(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def changed(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


class TinyImages(L.LightningDataModule):
    """``num`` random 1x8x8 images ``scale * tanh(sharpness * N(0, 1))`` with labels in {0..3};
    module level so DDP can pickle it.

    ``scale`` > 1 leaves [-1, 1]; ``labels_only`` yields 1-D label batches without images;
    ``channels`` sets the image channels.
    """

    def __init__(
        self,
        num: int = 32,
        batch_size: int = 8,
        scale: float = 1.0,
        labels_only: bool = False,
        channels: int = 1,
        sharpness: float = 1.0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(num, channels, 8, 8, generator=g)
        self.images = scale * torch.tanh(sharpness * noise)
        self.labels = torch.arange(num) % 4
        self.batch_size = batch_size
        self.labels_only = labels_only

    def train_dataloader(self) -> DataLoader:
        dataset = self.labels if self.labels_only else TensorDataset(self.images, self.labels)
        return DataLoader(dataset, batch_size=self.batch_size)


class SameWeightsDifferentNoise(L.Callback):
    """Under DDP: the ``networks`` stay identical on every rank, the module's noise differs
    (``pair_noise``: the consistency module's pair generator instead of its ``randn``)."""

    def __init__(
        self, networks: tuple[str, ...] = ("generator", "fake_denoiser"), pair_noise: bool = False
    ) -> None:
        self.networks = networks
        self.pair_noise = pair_noise

    def on_train_end(self, trainer, pl_module) -> None:
        sums = torch.stack(
            [
                torch.stack([p.detach().double().sum() for p in network.parameters()]).sum()
                for network in (getattr(pl_module, name) for name in self.networks)
            ]
        )
        gathered = trainer.strategy.all_gather(sums)  # (world, networks)
        assert torch.equal(gathered[0], gathered[1]), gathered
        if self.pair_noise:
            generator = pl_module.pair_generator()
            noise = torch.randn(8, generator=generator, device=pl_module.device)
        else:
            noise = pl_module.randn(8)
        noise = trainer.strategy.all_gather(noise)
        assert not torch.equal(noise[0], noise[1])


class Recorder(L.Callback):
    """Generator weights at the start and after every batch, the step counters and metrics."""

    def __init__(self) -> None:
        self.start: dict[str, Tensor] = {}
        self.after: list[dict[str, Tensor]] = []
        self.counters: list[tuple[int, int]] = []
        self.metrics: list[dict[str, float]] = []
        self.ema_at_start: dict[str, Tensor] = {}
        self.counters_at_start: tuple[int, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = state(pl_module.generator)
        if pl_module.generator_ema is not None:
            self.ema_at_start = state(pl_module.generator_ema)
        self.counters_at_start = pl_module.step_counters()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(state(pl_module.generator))
        self.counters.append(pl_module.step_counters())
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def assert_float32_finite(*networks: nn.Module) -> None:
    """Every parameter finite and float32 (after bf16-mixed training, for instance)."""
    for network in networks:
        assert all(
            torch.isfinite(p).all() and p.dtype == torch.float32 for p in network.parameters()
        )
