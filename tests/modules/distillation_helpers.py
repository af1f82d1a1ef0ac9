"""Helpers shared by the distillation module tests (DMD, Diff-Instruct, consistency, GAN /
regression): fitting, weight snapshots, the tiny data, DDP checks, EL comparisons, configs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import pytest
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_losses.cli import main
from lightning_losses.diffusion import EDMPrecond
from lightning_losses.losses import EmbeddingLoss
from tests.fakes import DDP_FIND_UNUSED, QUIET, assert_spawn_picklable, tiny_edm_teacher

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

#: The distillation configs (``digits_dmd.yaml``, ``digits_cm_el.yaml``, ...).
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "distillation"


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
    """``num`` random 1x8x8 images, :meth:`make_images` of seeded N(0, 1) noise, with labels
    ``arange(num) % 4``, in order; module level so DDP can pickle it.

    ``labels_only`` yields 1-D label batches without images.
    """

    def __init__(self, num: int = 32, batch_size: int = 8, labels_only: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.images = self.make_images(torch.randn(num, 1, 8, 8, generator=g))
        self.labels = torch.arange(num) % 4
        self.batch_size = batch_size
        self.labels_only = labels_only

    def make_images(self, noise: Tensor) -> Tensor:
        """The images from the (num, 1, 8, 8) noise: ``tanh``, in (-1, 1)."""
        return torch.tanh(noise)

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


def fit_ddp(
    model: L.LightningModule,
    data: L.LightningDataModule,
    strategy: str = DDP_FIND_UNUSED,
    **same_weights: object,
) -> L.Trainer:
    """One epoch on two CPU processes; :class:`SameWeightsDifferentNoise` (``same_weights``)
    checks the ranks, and the generator must have moved."""
    assert_spawn_picklable(model, data)
    before = state(model.generator)
    trainer = fit(
        model,
        data,
        devices=2,
        strategy=strategy,
        callbacks=[SameWeightsDifferentNoise(**same_weights)],
    )
    assert changed(state(model.generator), before)
    return trainer


def assert_ema_of_the_recorded_weights(
    network: nn.Module, recorder: Recorder, decay: float
) -> None:
    """``network`` is the EMA of the k generator weights ``recorder`` saw after the start:
    ``decay^k theta_0 + sum_j (1 - decay) decay^(k - j) theta_j`` (float64 reference)."""
    thetas = [recorder.start] + recorder.after
    k = len(recorder.after)
    for name, value in state(network).items():
        expected = decay**k * thetas[0][name].double()
        for j in range(1, k + 1):
            expected += (1 - decay) * decay ** (k - j) * thetas[j][name].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


def fit_el_off_and_on(
    make: Callable[[float], L.LightningModule], weight: float, data: L.LightningDataModule
) -> list[tuple[L.LightningModule, Recorder]]:
    """``make(0.0)`` and ``make(weight)`` (the EL weight) fitted on ``data`` from the same seed."""
    runs = []
    for el_weight in (0.0, weight):
        L.seed_everything(0)
        model = make(el_weight)
        recorder = Recorder()
        fit(model, data, callbacks=[recorder])
        runs.append((model, recorder))
    return runs


def assert_el_changes_only_the_generator_objective(
    runs: Sequence[tuple[L.LightningModule, Recorder]], weight: float
) -> None:
    """Of :func:`fit_el_off_and_on` with a fake denoiser, one step: the fake denoiser saw the
    same samples and noise (same loss, same weights); the generator objective is the same base
    loss plus ``weight * EL``."""
    (off, off_recorder), (on, on_recorder) = runs
    off_logs, on_logs = off_recorder.metrics[-1], on_recorder.metrics[-1]
    assert off.embedding_loss is None and "train/loss_el" not in off_logs
    assert isinstance(on.embedding_loss, EmbeddingLoss) and on_logs["train/loss_el"] > 0
    assert on_logs["train/loss_fake"] == off_logs["train/loss_fake"]
    assert_same(state(on.fake_denoiser), state(off.fake_denoiser))
    assert on_logs["train/loss_base"] == off_logs["train/loss_base"]
    assert off_logs["train/loss_generator"] == off_logs["train/loss_base"]
    expected = on_logs["train/loss_base"] + weight * on_logs["train/loss_el"]
    assert on_logs["train/loss_generator"] == pytest.approx(expected, rel=1e-6)
    added = on_logs["train/loss_generator"] - off_logs["train/loss_generator"]
    assert added == pytest.approx(weight * on_logs["train/loss_el"], rel=1e-5)
    assert changed(state(on.generator), state(off.generator))


# ------------------------------------------------------------------------------------------
# Teachers on disk and the configs


def export_tiny_teacher(root: Path) -> EDMPrecond:
    """:func:`~tests.fakes.tiny_edm_teacher`, saved to ``root`` by ``EDMPrecond.save_pretrained``
    (``unet/`` + ``edm_config.json``: the layout of the configs' ``teacher_path``)."""
    teacher = tiny_edm_teacher()
    teacher.save_pretrained(root)
    return teacher


def cli_args(config: Path, teacher: Path, tmp_path: Path) -> list[str]:
    """``config`` with the teacher folder ``teacher``, on the CPU, writing under ``tmp_path``."""
    return [
        "--config",
        str(config),
        f"--model.init_args.teacher_path={teacher}",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
    ]


def instantiate_digits_config(config: Path, tmp_path: Path, cls: type) -> LightningCLI:
    """A digits config built (``run=False``) with a tiny exported teacher: a ``cls`` module,
    the digits in [-1, 1] at 8x8, with EL exactly when the file name ends in ``_el.yaml``."""
    export_tiny_teacher(tmp_path / "export")
    cli = main(args=cli_args(config, tmp_path / "export", tmp_path), run=False)
    assert isinstance(cli.model, cls)
    assert cli.datamodule.normalize == "symmetric" and cli.datamodule.image_size == 8
    if config.name.endswith("_el.yaml"):
        assert cli.model.el_weight > 0 and cli.model.embedding_loss is not None
    else:
        assert cli.model.el_weight == 0 and cli.model.embedding_loss is None
    return cli


def fit_config_and_reload(
    config: Path, tmp_path: Path, cls: type, *overrides: str
) -> L.LightningModule:
    """``lightning-losses fit`` of ``config`` with a tiny exported teacher (``overrides`` on top,
    quiet, checkpoints in ``tmp_path/ckpt``), then ``cls.load_from_checkpoint`` of the last
    checkpoint, with no arguments: its weights must be the saved ones."""
    export_tiny_teacher(tmp_path / "export")
    main(
        args=[
            "fit",
            *cli_args(config, tmp_path / "export", tmp_path),
            *overrides,
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.callbacks.dirpath={tmp_path}/ckpt",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    model = cls.load_from_checkpoint(path)  # the teacher and the optimizers from the config
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert_same(state(model), saved)
    return model


def assert_configs_differ_only_in_el_weight(
    names: Sequence[str],
    trainer_keys: Sequence[str] = ("max_steps", "precision", "accelerator", "devices"),
) -> tuple[dict, dict]:
    """The config without EL and the one with it (``names`` in :data:`CONFIGS`) differ only in
    ``el_weight`` (and the run names), both with the committed teacher; returns them."""
    plain, with_el = (yaml.safe_load((CONFIGS / name).read_text()) for name in names)
    assert plain["data"] == with_el["data"]
    assert plain["model"]["init_args"].pop("el_weight") == 0.0
    assert with_el["model"]["init_args"].pop("el_weight") > 0
    assert plain["model"] == with_el["model"]
    assert plain["model"]["init_args"]["teacher_path"] == "lightning_losses/assets/digits_teacher"
    for key in trainer_keys:
        assert plain["trainer"].get(key) == with_el["trainer"].get(key), key
    return plain, with_el
