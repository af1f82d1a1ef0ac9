"""Manual optimisation steps with or without a Trainer (a LightningModule mixin)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ManualSteps:
    """Optimizer steps of a manual-optimisation LightningModule that also run without a Trainer.

    Attached to a Trainer: its (wrapped) optimizers, ``manual_backward`` and ``clip_gradients``
    (precision plugins, DDP). Alone: the optimizers of ``configure_optimizers()`` (built once),
    ``loss.backward()`` and ``clip_grad_norm_`` over the optimizer's parameters, what Lightning
    does on one device at 32-bit precision.
    """

    _standalone_optimizers: list[Any] | None = None
    _host_counts: dict[str, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_standalone_optimizers"] = None
        return state

    def host_count(self, name: str) -> int:
        """The int64 counter buffer ``name``, read once and then kept on the host (a read of a
        device buffer is a synchronisation); :meth:`advance` keeps both in step."""
        if self._host_counts is None:
            self._host_counts = {}
        if name not in self._host_counts:
            self._host_counts[name] = int(getattr(self, name))
        return self._host_counts[name]

    def advance(self, name: str) -> int:
        """Add 1 to the counter buffer ``name`` (on its device, no read) and to its host copy."""
        count = self.host_count(name) + 1
        getattr(self, name).add_(1)
        self._host_counts[name] = count
        return count

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._host_counts = None  # the counters come from the checkpoint
        return super().load_state_dict(*args, **kwargs)

    def step_optimizers(self) -> list[Any]:
        """The optimizers: the Trainer's, or without one :meth:`configure_optimizers`'s."""
        if self._trainer is not None:
            optimizers = self.optimizers()
        else:
            if self._standalone_optimizers is None:
                built = self.configure_optimizers()
                self._standalone_optimizers = list(built) if isinstance(built, list) else [built]
            optimizers = self._standalone_optimizers
        return list(optimizers) if isinstance(optimizers, list | tuple) else [optimizers]

    def optimizer_step(self, optimizer: Any, loss: Tensor, clip: float | None) -> None:
        """zero_grad, backward, optional norm clipping, step, zero_grad (with or without a
        Trainer: ``manual_backward`` / ``clip_gradients`` or their plain torch forms)."""
        optimizer.zero_grad(set_to_none=True)
        if self._trainer is not None:
            self.manual_backward(loss)
            if clip is not None:
                self.clip_gradients(optimizer, clip, gradient_clip_algorithm="norm")
        else:
            loss.backward()
            if clip is not None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
