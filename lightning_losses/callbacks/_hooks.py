"""The hook plumbing the callbacks share: per-split collection, step schedules, output folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor


def output_dir(trainer: L.Trainer, dirpath: str | Path | None, default: str) -> Path:
    """``dirpath``, or ``<trainer.log_dir or default_root_dir>/<default>``; created if missing."""
    root = Path(dirpath or Path(trainer.log_dir or trainer.default_root_dir) / default)
    root.mkdir(parents=True, exist_ok=True)
    return root


def generation_step(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """The step evaluations count: ``pl_module.generator_steps`` when the module has that
    buffer (the distillation modules), else ``trainer.global_step``."""
    steps = getattr(pl_module, "generator_steps", None)
    if isinstance(steps, Tensor) and steps.numel() == 1:
        return int(steps)
    return int(trainer.global_step)


class SplitHooks(L.Callback):
    """Routes the validation and test hooks to :meth:`_reset`, :meth:`_collect` and
    :meth:`_finish` with the stage name (``"val"`` or ``"test"``); the sanity check is skipped."""

    def _reset(self) -> None:
        raise NotImplementedError

    def _collect(self, stage: str, pl_module: L.LightningModule, outputs: Any, batch: Any) -> None:
        raise NotImplementedError

    def _finish(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._collect("val", pl_module, outputs, batch)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        self._collect("test", pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish("test", trainer, pl_module)


class StepScheduleHooks(L.Callback):
    """Calls :meth:`_run` after a training batch whose :func:`generation_step` is a positive
    multiple of ``every_n_steps`` (once per step value; never when it is None) and at the end of
    training when :meth:`_runs_on_train_end` (unless that step has just run)."""

    every_n_steps: int | None = None
    _last_step: int | None = None

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        raise NotImplementedError

    def _runs_on_train_end(self) -> bool:
        return True

    def _fire(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self._last_step = step
        self._run(trainer, pl_module, step)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self.every_n_steps is None:
            return
        step = generation_step(trainer, pl_module)
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._fire(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = generation_step(trainer, pl_module)
        if self._runs_on_train_end() and step != self._last_step:
            self._fire(trainer, pl_module, step)
