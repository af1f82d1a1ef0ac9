"""PNG grids of a generative module's samples from fixed noise, during training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from lightning_losses.callbacks._hooks import StepScheduleHooks
from lightning_losses.callbacks.fid import sample_in_chunks

__all__ = ["SampleGridCallback"]


class SampleGridCallback(StepScheduleHooks):
    """Save ``num_samples`` samples of ``pl_module.sample`` as one PNG grid, from fixed noise.

    The noise comes from a CPU ``torch.Generator`` seeded with ``seed`` at every save, so
    successive grids show the same latents (and an unchanged module gives a byte-identical
    file). Images in [-1, 1] are clamped and mapped to [0, 1] (:math:`(x + 1) / 2`) and written
    with ``torchvision.utils.save_image`` (padding 2, ``nrow`` per row), as
    ``<dirpath>/step_<step:06d>.png`` where the step is ``pl_module.generator_steps`` if the
    module has that buffer, else ``trainer.global_step``.

    Saved after a training batch whose step is a positive multiple of ``every_n_steps`` (once
    per step value) and at the end of training when ``on_train_end`` (unless that step was just
    saved). Only rank 0 samples and writes. :attr:`paths` lists the files written.

    Args:
        num_samples: images per grid.
        every_n_steps: save every that many steps; None: only at the end.
        dirpath: the folder; None: ``<trainer.log_dir or default_root_dir>/samples``.
        nrow: images per row; None: ``ceil(sqrt(num_samples))``.
        seed: seed of the noise.
        on_train_end: also save when training ends.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_steps: int | None = 500,
        dirpath: str | None = None,
        nrow: int | None = None,
        seed: int = 0,
        on_train_end: bool = True,
    ) -> None:
        super().__init__()
        for name, value, allow_none in (
            ("num_samples", num_samples, False),
            ("every_n_steps", every_n_steps, True),
            ("nrow", nrow, True),
        ):
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps
        self.dirpath = dirpath
        self.nrow = nrow if nrow is not None else math.ceil(math.sqrt(num_samples))
        self.seed = int(seed)
        # Not ``self.on_train_end``: that would shadow the hook of the same name.
        self.save_on_train_end = bool(on_train_end)
        #: Every PNG written, in order.
        self.paths: list[Path] = []
        self._dir: Path | None = Path(dirpath) if dirpath is not None else None
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._last_step = None
        if self.dirpath is None:
            # trainer.log_dir broadcasts from rank 0: every rank must read it, here.
            root = trainer.log_dir or trainer.default_root_dir
            self._dir = Path(root) / "samples"

    @torch.no_grad()
    def save(
        self, pl_module: L.LightningModule, step: int, dirpath: str | Path | None = None
    ) -> Path:
        """Sample ``num_samples`` images (fixed noise) and write ``step_<step:06d>.png``.

        One process, no rank check. ``dirpath`` defaults to the folder chosen at setup (or
        ``dirpath`` given at construction).

        Raises:
            ValueError: when no folder is known.
        """
        from torchvision.utils import save_image

        folder = Path(dirpath) if dirpath is not None else self._dir
        if folder is None:
            raise ValueError("no folder to save to: pass dirpath (or run inside a Trainer)")
        chunks = list(sample_in_chunks(pl_module, self.num_samples, self.num_samples, self.seed))
        images = torch.cat(chunks).float().clamp(-1.0, 1.0).add(1.0).mul(0.5).cpu()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{int(step):06d}.png"
        save_image(images, path, nrow=self.nrow, padding=2)
        self.paths.append(path)
        return path

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if trainer.is_global_zero:
            self.save(pl_module, step)

    def _runs_on_train_end(self) -> bool:
        return self.save_on_train_end
