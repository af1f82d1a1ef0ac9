"""Scaling baselines of post-hoc calibration, fitted in closed loop on cached logits.

- :class:`EnsembleTemperatureScaling` (Zhang, Kailkhura, Han 2020, "Mix-n-Match"):

  .. math::

      p_i = w_1\\, \\mathrm{softmax}(z_i / T) + w_2\\, \\mathrm{softmax}(z_i) + w_3 / C,
      \\qquad w \\ge 0,\\ w_1 + w_2 + w_3 = 1;

  T is fitted first by temperature scaling (NLL), then :math:`w` by minimising the NLL
  (``loss="nll"``) or the Brier score (``loss="mse"``, the authors' default) of :math:`p` over
  the simplex (parametrised as :math:`w = \\mathrm{softmax}(a)`). Every term preserves the order
  of :math:`z_i`, so the argmax (the accuracy) is unchanged.
- :class:`VectorScaling` / :class:`MatrixScaling` (Guo et al. 2017):
  :math:`z' = \\mathrm{diag}(v) z + b` and :math:`z' = W z + b`, fitted by NLL. Both can change
  the argmax (``preserves_accuracy = False``): report the accuracy after them. Matrix scaling has
  :math:`C^2 + C` parameters and overfits at large C: ``off_diagonal`` and ``bias`` add the ODIR
  penalty of Dirichlet calibration (Kull et al. 2019),
  :math:`\\lambda_{od} \\frac{1}{C(C-1)} \\sum_{j \\ne k} W_{jk}^2
  + \\lambda_b \\frac1C \\sum_k b_k^2`.

Every ``fit`` runs LBFGS with a strong-Wolfe line search in float64 on the full calibration split
(the objectives are convex in the parameters for vector / matrix scaling; ETS's weights are a
3-parameter problem), then keeps the parameters in float32. ``forward`` returns calibrated
LOGITS (log-probabilities for ETS), in at least float32. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.checks import check_choice, check_float, check_logits, check_positive_int
from lightning_losses.nets.calibrators import (
    PostHocCalibrator,
    TemperatureScaling,
)

__all__ = ["EnsembleTemperatureScaling", "MatrixScaling", "VectorScaling"]


def _lbfgs(params: list[Tensor], objective: Callable[[], Tensor], max_iter: int) -> None:
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad(), torch.autocast(device_type=params[0].device.type, enabled=False):
        optimizer.step(closure)


class EnsembleTemperatureScaling(PostHocCalibrator):
    """Ensemble temperature scaling (see the module docstring): ``forward`` returns ``log p``.

    Args:
        loss: ``"nll"`` or ``"mse"`` (multi-class Brier), the objective of the weights.
        max_iter: LBFGS iterations of each of the two fits.
    """

    def __init__(self, loss: Literal["nll", "mse"] = "nll", max_iter: int = 100) -> None:
        super().__init__()
        self.loss = check_choice(loss, "loss", ("nll", "mse"))
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.temperature = TemperatureScaling(1.0)
        # w = softmax(weight_logits); (w1, w2, w3) = (1, 0, 0) is plain temperature scaling.
        self.weight_logits = nn.Parameter(torch.tensor([0.0, -30.0, -30.0]))

    def weights(self) -> Tensor:
        """(3,) weights :math:`(w_1, w_2, w_3)` on the simplex."""
        return torch.softmax(self.weight_logits, dim=0)

    @staticmethod
    def _mixture(z: Tensor, t: Tensor, w: Tensor) -> Tensor:
        c = z.shape[1]
        return w[0] * torch.softmax(z / t, dim=1) + w[1] * torch.softmax(z, dim=1) + w[2] / c

    def forward(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """``log p`` of the mixture, shape (N, C), in at least float32."""
        check_logits(logits)
        dtype = self._working_dtype(logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.to(dtype)
            t = self.temperature.scalar_temperature().to(dtype)
            return self._mixture(z, t, self.weights().to(dtype)).log()

    def _fit(self, logits: Tensor, labels: Tensor, view_logits: Tensor | None) -> None:
        """T by NLL (temperature scaling), then the weights by ``loss``."""
        self.temperature.fit(logits, labels, max_iter=self.max_iter)
        z = logits.detach().to(torch.float64)
        t = self.temperature.scalar_temperature().detach().to(torch.float64)
        a = torch.zeros(3, dtype=torch.float64, device=z.device, requires_grad=True)
        onehot = F.one_hot(labels.long(), z.shape[1]).to(torch.float64)

        def objective() -> Tensor:
            p = self._mixture(z, t, torch.softmax(a, dim=0))
            if self.loss == "nll":
                return -(p.gather(1, labels.long()[:, None]).clamp_min(1e-300).log()).mean()
            return ((p - onehot) ** 2).sum(dim=1).mean()

        _lbfgs([a], objective, self.max_iter)
        with torch.no_grad():
            self.weight_logits.copy_(a.detach().to(self.weight_logits))

    def extra_repr(self) -> str:
        w = [round(float(v), 4) for v in self.weights().detach()]
        return f"loss={self.loss!r}, weights={w}"


class VectorScaling(PostHocCalibrator):
    """:math:`z' = v \\odot z + b` (per-class scale and bias), fitted by NLL.

    Args:
        num_classes: C.
        max_iter: LBFGS iterations.
    """

    preserves_accuracy = False

    def __init__(self, num_classes: int, max_iter: int = 200) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.max_iter = check_positive_int(max_iter, "max_iter")
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def _check(self, logits: Tensor) -> None:
        check_logits(logits)
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have num_classes={self.num_classes} columns, got "
                f"{tuple(logits.shape)}"
            )

    def _transform(self, z: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        return z * scale + bias

    def forward(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """Calibrated logits (N, C) in at least float32."""
        self._check(logits)
        dtype = self._working_dtype(logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self._transform(logits.to(dtype), self.scale.to(dtype), self.bias.to(dtype))

    def _penalty(self, scale: Tensor, bias: Tensor) -> Tensor:
        return scale.new_zeros(())

    def _fit(self, logits: Tensor, labels: Tensor, view_logits: Tensor | None) -> None:
        """Minimise the mean NLL (plus the penalty) with LBFGS in float64."""
        self._check(logits)
        z = logits.detach().to(torch.float64)
        targets = labels.long()
        scale = self.scale.detach().to(torch.float64).clone().requires_grad_()
        bias = self.bias.detach().to(torch.float64).clone().requires_grad_()

        def objective() -> Tensor:
            return F.cross_entropy(self._transform(z, scale, bias), targets) + self._penalty(
                scale, bias
            )

        _lbfgs([scale, bias], objective, self.max_iter)
        with torch.no_grad():
            self.scale.copy_(scale.detach())
            self.bias.copy_(bias.detach())


class MatrixScaling(VectorScaling):
    """:math:`z' = W z + b`, fitted by NLL with the optional ODIR penalty (module docstring).

    Args:
        num_classes: C.
        off_diagonal: :math:`\\lambda_{od} \\ge 0`, the penalty on W's off-diagonal entries.
        bias: :math:`\\lambda_b \\ge 0`, the penalty on b.
        max_iter: LBFGS iterations.
    """

    def __init__(
        self, num_classes: int, off_diagonal: float = 0.0, bias: float = 0.0, max_iter: int = 200
    ) -> None:
        super().__init__(num_classes, max_iter)
        self.off_diagonal = check_float(off_diagonal, "off_diagonal", minimum=0.0)
        self.bias_penalty = check_float(bias, "bias", minimum=0.0)
        self.scale = nn.Parameter(torch.eye(num_classes))  # W, identity at the start

    def _transform(self, z: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
        return z @ scale.T + bias

    def _penalty(self, scale: Tensor, bias: Tensor) -> Tensor:
        c = self.num_classes
        penalty = scale.new_zeros(())
        if self.off_diagonal > 0 and c > 1:
            off = scale - torch.diag(torch.diagonal(scale))
            penalty = penalty + self.off_diagonal * (off**2).sum() / (c * (c - 1))
        if self.bias_penalty > 0:
            penalty = penalty + self.bias_penalty * (bias**2).sum() / c
        return penalty

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, off_diagonal={self.off_diagonal}, "
            f"bias={self.bias_penalty}"
        )
