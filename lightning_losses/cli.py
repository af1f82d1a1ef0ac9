"""The ``lightning-losses`` command: LightningCLI over every module and data module.

    lightning-losses fit --config configs/opl/digits.yaml
    python -m lightning_losses fit --config configs/opl/cifar100_resnet56.yaml --trainer.devices 4

Any LightningModule / LightningDataModule importable by ``class_path`` works, including a
user's own subclasses. ``num_classes`` flows from the data module to the model.

From Python, :func:`run_config` runs (or only builds) a config without reading ``sys.argv``::

    cli = run_config("configs/opl/digits.yaml", ["--trainer.max_epochs=2"])
    cli.trainer.callback_metrics["val/acc"]

The configs of the repository's ``configs/`` folder also ship inside the package:
:func:`packaged_config` finds them in an installed copy (``packaged_config("opl/digits.yaml")``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, overload

import lightning as L
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

#: The subcommands of :class:`LossesCLI` (``run=True``).
SUBCOMMANDS = ("fit", "validate", "test", "predict")


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


#: The keyword arguments :class:`LossesCLI` gets besides ``args`` and ``run``: any module and data
#: module class from the config, the modules' own optimizers, the saved config overwritten.
CLI_KWARGS: dict[str, Any] = {
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "auto_configure_optimizers": False,
    "save_config_kwargs": {"overwrite": True},
}


def _build(args: list[str] | dict[str, Any] | None, run: bool) -> LossesCLI:
    return LossesCLI(L.LightningModule, L.LightningDataModule, args=args, run=run, **CLI_KWARGS)


@overload
def main(args: None = None, run: bool = True) -> None: ...


@overload
def main(args: list[str] | dict[str, Any], run: bool = True) -> LossesCLI: ...


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> LossesCLI | None:
    """The command line; with ``args`` (a list of command-line arguments or a config dict), Python.

    Without ``args`` this is the console script: it parses ``sys.argv`` and returns ``None``, so
    that ``sys.exit(main())`` exits 0 after a successful run. A failed run exits non-zero all the
    same: a bad argument or config key raises ``SystemExit(2)`` with jsonargparse's message, an
    error during training propagates its exception (status 1).

    With ``args`` it returns the :class:`LossesCLI` (``.trainer``, ``.model``, ``.datamodule``),
    ``args`` taking the place of ``sys.argv[1:]``; ``run=False`` only builds the objects.
    :func:`run_config` is the same for Python callers, from a config file or dict plus overrides.
    """
    cli = _build(args, run)
    return None if args is None else cli


def run_config(
    config: str | os.PathLike[str] | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    subcommand: str | None = "fit",
) -> LossesCLI:
    """Run one config from Python, as ``lightning-losses <subcommand> --config ...`` would.

    ``sys.argv`` is never read (a script's or a notebook kernel's own flags stay out of it), so
    callers need not patch it.

    Args:
        config: a YAML file, or a config already loaded as a dict (the keys of one subcommand's
            config: ``seed_everything``, ``trainer``, ``model``, ``data``, ...).
        overrides: command-line style overrides applied after ``config``, e.g.
            ``["--trainer.max_epochs=2", "--model.init_args.opl_weight=0"]``.
        subcommand: the Trainer method to run ("fit", "validate", "test", "predict"), or
            ``None`` to only instantiate the trainer, model and data module (then call
            ``cli.trainer.fit(cli.model, cli.datamodule)`` yourself).

    Returns:
        The :class:`LossesCLI`: ``cli.trainer`` (``callback_metrics``, ``callbacks``),
        ``cli.model``, ``cli.datamodule``.

    Raises:
        ValueError: for a ``subcommand`` that is not one of :data:`SUBCOMMANDS` or ``None``, or
            an ``overrides`` given as one string.
        FileNotFoundError: for a config path that does not exist.
        SystemExit: (status 2) from jsonargparse for a config key or value it rejects.
    """
    if subcommand is not None and subcommand not in SUBCOMMANDS:
        raise ValueError(f"subcommand must be one of {SUBCOMMANDS} or None, got {subcommand!r}")
    if isinstance(overrides, str):
        raise ValueError(f"overrides must be a list of arguments, got the string {overrides!r}")
    overrides = [str(arg) for arg in overrides]
    if isinstance(config, Mapping):
        if subcommand is None and not overrides:
            args: list[str] | dict[str, Any] = dict(config)
        else:  # jsonargparse reads a config given as a YAML string like a config file
            args = ["--config", yaml.safe_dump(dict(config), sort_keys=False), *overrides]
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config must be an existing YAML file, got {str(path)!r}")
        args = ["--config", str(path), *overrides]
    if subcommand is not None and isinstance(args, list):
        args = [subcommand, *args]
    with warnings.catch_warnings():
        # LightningCLI warns whenever ``args`` is given while sys.argv has flags of its own.
        warnings.filterwarnings("ignore", ".*args parameter is intended to run from within Python")
        return _build(args, run=subcommand is not None)


def packaged_config(name: str) -> Path:
    """A config shipped with the package, e.g. ``packaged_config("opl/digits.yaml")``.

    The repository's ``configs/`` folder is the package's ``lightning_losses/configs`` (a link
    in the source tree, real files in a wheel), so an installed copy has the same configs.
    Falls back to ``configs/`` beside the package in a source checkout without the link.

    Raises:
        FileNotFoundError: naming the places looked at, when ``name`` is in neither.
    """
    candidates = [
        Path(str(files("lightning_losses") / "configs" / name)),
        Path(__file__).resolve().parents[1] / "configs" / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"config {name!r} not found (looked at {looked})")


if __name__ == "__main__":
    main()
