"""Helpers shared by the distillation module tests (DMD, Diff-Instruct, consistency)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

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
