"""The ``lightning-losses`` command: LightningCLI over every module and data module.

    lightning-losses fit --config configs/opl/digits.yaml
    python -m lightning_losses fit --config configs/opl/cifar100_resnet56.yaml --trainer.devices 4

Any LightningModule / LightningDataModule importable by ``class_path`` works, including a
user's own subclasses. ``num_classes`` flows from the data module to the model.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class LossesCLI(LightningCLI):
    """LightningCLI with the links every config here relies on."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )

    def after_fit(self) -> None:
        """Modules with ``test_after_fit = True`` (post-hoc calibration) report right after fit."""
        if getattr(self.model, "test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule)


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> LossesCLI:
    """Run the CLI; ``args`` replaces ``sys.argv`` (for notebooks and tests)."""
    return LossesCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
