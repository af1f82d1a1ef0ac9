"""A user's own project: subclasses the package's module outside the package, overrides hooks."""

from __future__ import annotations

from lightning_losses.modules import OPLClassifier


class MyClassifier(OPLClassifier):
    """Counts training epochs and doubles the CE term (a hook and an objective override)."""

    def __init__(self, *args, ce_scale: float = 2.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ce_scale = ce_scale
        self.epochs_seen = 0

    def on_train_epoch_end(self) -> None:
        self.epochs_seen += 1

    def compute_loss(self, features, logits, labels, with_opl, **kwargs):
        # **kwargs: the base class passes ``indices`` for losses with per-sample state.
        loss, ce, opl = super().compute_loss(features, logits, labels, with_opl, **kwargs)
        return loss + (self.ce_scale - 1.0) * ce, ce, opl
