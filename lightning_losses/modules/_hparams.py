"""Saving hyper-parameters of modules that take networks and callables as arguments."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

try:  # set while LightningCLI instantiates a module: the arguments as configs, not objects
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - a Lightning without it stores only plain values
    _given_hyperparameters = None


def save_config_hyperparameters(module: L.LightningModule, object_args: Sequence[str]) -> None:
    """``save_hyperparameters`` that never pickles a live network or callable.

    Under LightningCLI the ``object_args`` arrive as ``class_path`` configs and are kept, so
    ``Module.load_from_checkpoint(path)`` rebuilds them; built in Python, they are left out and
    must be passed again: ``Module.load_from_checkpoint(path, backbone=...)``.
    """
    from_cli = _given_hyperparameters is not None and _given_hyperparameters.get() is not None
    import inspect

    frame = inspect.currentframe().f_back  # the caller's __init__
    module.save_hyperparameters(ignore=[] if from_cli else list(object_args), frame=frame)
