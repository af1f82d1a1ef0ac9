"""Fit a per-sample temperature calibrator by gradient descent on CACHED logits, without Lightning.

The frozen classifier's logits :math:`z_0` (N, C) and its views' logits (V, N, C) of a calibration
split do not change during the fit, so everything that depends on them alone is computed ONCE:

- the calibrator's inputs (:meth:`~lightning_losses.nets.CorrectnessAwareCalibrator.features`:
  every view's softmax at the original top-k classes), so no step touches the (V, N, C) views;
- one sorted top-k of the logits gives the calibrator's top classes, the row maxima and the
  predictions (the argmax itself only in rows whose top two logits tie);
- for the CA objective, the shifted logits :math:`d_i = z_i - \\max_k z_{ik}` and the correctness
  :math:`y_i`, so that a step's confidence :math:`c_i = 1 / \\sum_k \\exp(d_{ik} / T_i)` is one pass
  over the batch's logits with a closed-form gradient
  (:func:`~lightning_losses.losses.calibration.tempered_confidence`).

For the stock :class:`~lightning_losses.nets.CorrectnessAwareCalibrator` (every parameter
trainable) a CA step builds no autograd graph: the batch's rows of :math:`d` are gathered and
scaled by :math:`\\log_2 e / T_i` in one pass (``embedding_bag``), the confidence and the moment
:math:`\\sum_k e_{ik} s_{ik}` of its gradient take four more element-wise passes, and every other
gradient (the CA objective's, with per-row coefficients computed once per epoch, then the
temperature network's) is closed-form O(B) work; every batch of an epoch is a slice of
the epoch's features and correctness, gathered once; Adam's update runs on the four parameters
viewed as one flat vector (:class:`_FlatAdam`: ``torch.optim.Adam``'s arithmetic without its
per-step overhead, several times the rest of the O(B) work). Other calibrators take autograd
and ``torch.optim.Adam`` on the same precomputed inputs.

``precompute=False`` recomputes all of it every step through the calibrator's ``forward`` and
:func:`~lightning_losses.losses.calibration.correctness_aware_loss`: the slow reference, which
gives the same fit to rounding (tests and ``benchmarks/calibration_fit.py`` check it).

Defaults are the CA authors' recipe (their ``set_temperature``): Adam, lr 1e-4, mini-batches of
1000 in a fresh random order every epoch (the last, smaller batch kept), 10 epochs, on the whole
split, no early stopping. Options: a held-out share of the split with best-epoch selection and
``patience`` (early stopping), the objective (``"ca"``, ``"ce"``, ``"mse"``) and the CA weighting.

Imports torch only.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_losses.checks import (
    check_choice,
    check_float,
    check_int,
    check_positive_int,
    check_tensor,
)
from lightning_losses.losses.calibration import (
    CA_WEIGHTINGS,
    LOG2_E,
    _confidence_and_moment,
    _confidence_vjp,
    _objective_coefficients,
    _tempered_confidence_into,
    calibration_cross_entropy,
    calibration_mse,
    correctness_aware_loss,
    correctness_aware_objective,
)
from lightning_losses.nets.calibrators import TemperatureCalibrator, check_fit_inputs

__all__ = ["OBJECTIVES", "FitHistory", "epoch_batches", "fit_calibrator"]

OBJECTIVES: tuple[str, ...] = ("ca", "ce", "mse")


class FitHistory(NamedTuple):
    """What :func:`fit_calibrator` did."""

    steps: int
    """Optimizer steps taken."""
    epochs: int
    """Epochs run (the last possibly cut short by ``max_steps``)."""
    best_epoch: int | None
    """1-based epoch whose weights were kept (held-out selection), None without a held-out set."""
    train_loss: list[float]
    """Mean training objective of every epoch."""
    holdout_loss: list[float]
    """Held-out objective after every epoch (empty without a held-out set)."""


def _epoch_order(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool
) -> tuple[Tensor, list[tuple[int, int]]]:
    """``(order, bounds)``: a fresh ``randperm(n)``, the ``[start, stop)`` of every batch in it."""
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    return order, [(i, min(i + batch_size, stop)) for i in range(0, stop, batch_size)]


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False
) -> list[Tensor]:
    """One epoch's mini-batches of row indices: a fresh ``randperm(n)`` cut into ``batch_size``
    pieces (the last, smaller one dropped with ``drop_last``, kept otherwise as the authors'
    ``DataLoader(shuffle=True)``). :func:`fit_calibrator` draws its batches so."""
    order, bounds = _epoch_order(n, batch_size, generator, drop_last)
    return [order[start:stop] for start, stop in bounds]


class _FlatAdam:
    """``torch.optim.Adam(params, lr)`` with its defaults (betas 0.9 / 0.999, eps 1e-8, no
    weight decay), its single-tensor arithmetic on the parameters viewed as ONE flat vector:

    .. math::

        m \\leftarrow m + (1 - \\beta_1)(g - m), \\quad
        v \\leftarrow \\beta_2 v + (1 - \\beta_2) g^2, \\quad
        \\theta \\leftarrow \\theta - \\frac{\\eta}{1 - \\beta_1^t}
        \\frac{m}{\\sqrt{v} / \\sqrt{1 - \\beta_2^t} + \\epsilon}.

    Six element-wise calls per step, against ``torch.optim.Adam.step``'s bookkeeping (several
    times the closed-form step's own O(B) work for a calibrator's four small tensors). The
    parameters' ``.data`` become views of the flat vector until :meth:`release`.
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr, self.steps = params, lr, 0
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(self.flat)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        start = 0
        for p in params:
            p.data = self.flat[start : start + p.numel()].view_as(p)
            start += p.numel()

    @staticmethod
    def supports(params: list[torch.nn.Parameter]) -> bool:
        """One dtype and device, dense: what one flat vector can hold."""
        first = params[0]
        return all(
            p.dtype == first.dtype and p.device == first.device and p.layout == torch.strided
            for p in params
        )

    def step(self, grads: list[Tensor]) -> None:
        """One update with the parameters' gradients ``grads`` (in their order)."""
        torch.cat([g.reshape(-1) for g in grads], out=self.grad)
        self.steps += 1
        beta1, beta2 = self.BETAS
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.steps)
        denom = (self.exp_avg_sq.sqrt() / (1 - beta2**self.steps) ** 0.5).add_(self.EPS)
        self.flat.addcdiv_(self.exp_avg, denom, value=-step_size)

    def release(self) -> None:
        """Give every parameter its own storage again."""
        for p in self.params:
            p.data = p.data.clone()


def _top_classes(z: Tensor, calibrator: TemperatureCalibrator) -> Any:
    """``z.topk(top_k)`` for a calibrator whose :meth:`features` take ``top`` (k >= 2, so that
    it also gives the argmax: see :func:`_max_and_argmax`), else None."""
    k = getattr(calibrator, "top_k", None)
    takes_top = "top" in inspect.signature(calibrator.features).parameters
    if not takes_top or not isinstance(k, int) or not 2 <= k <= z.shape[1]:
        return None
    return z.topk(k, dim=1, sorted=True)


def _max_and_argmax(z: Tensor, top: Any) -> tuple[Tensor, Tensor]:
    """Every row's maximum and ``argmax`` (its FIRST maximal index), from a sorted top-k
    (k >= 2) when one is given: its first entry, except in rows whose top two values tie, where
    ``argmax`` itself decides (the top-k's order among ties is not specified)."""
    if top is None:
        return z.amax(dim=1), z.argmax(dim=1)
    values, indices = top
    predicted = indices[:, 0].clone()
    tied = values[:, 0] == values[:, 1]
    if bool(tied.any()):
        predicted[tied] = z[tied].argmax(dim=1)
    return values[:, 0], predicted


def _holdout_split(n: int, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(train rows, held-out rows)``: ``round(fraction * n)`` random rows held out."""
    size = int(round(fraction * n))
    if fraction > 0 and not 1 <= size <= n - 1:
        raise ValueError(
            f"holdout_fraction={fraction} of N = {n} rows holds out {size}: it must leave at "
            "least one row on each side"
        )
    order = torch.randperm(n, generator=generator)
    return order[size:].sort().values, order[:size].sort().values


def fit_calibrator(
    calibrator: TemperatureCalibrator,
    logits: Tensor,
    labels: Tensor,
    view_logits: Tensor | None = None,
    *,
    objective: Literal["ca", "ce", "mse"] = "ca",
    weighting: Literal["balanced", "split", "none"] = "balanced",
    epochs: int = 10,
    batch_size: int = 1000,
    lr: float = 1e-4,
    max_steps: int | None = None,
    holdout_fraction: float = 0.0,
    patience: int | None = None,
    selection: Literal["objective", "nll"] = "objective",
    seed: int = 0,
    drop_last: bool = False,
    precompute: bool = True,
    allow_probabilities: bool = False,
) -> FitHistory:
    """Train ``calibrator`` in place with Adam on mini-batches of cached logits.

    Args:
        calibrator: a :class:`~lightning_losses.nets.TemperatureCalibrator` with parameters,
            e.g. :class:`~lightning_losses.nets.CorrectnessAwareCalibrator`; moved to the logits'
            device.
        logits: (N, C) finite logits of the calibration split (not probabilities).
        labels: (N,) integer class indices in [0, C).
        view_logits: (V, N, C) logits of the views, for a calibrator with ``requires_views``.
        objective: ``"ca"`` (correctness-aware), ``"ce"`` (NLL) or ``"mse"`` (Brier).
        weighting: the CA weighting; ``"split"`` takes :math:`a` from the training rows' accuracy.
        epochs: passes over the training rows, >= 1.
        batch_size: rows per step, >= 1.
        lr: Adam's learning rate, > 0.
        max_steps: stop after this many steps (None: ``epochs`` decide).
        holdout_fraction: share of the rows held out (in [0, 1)); with a held-out set the
            objective is evaluated on it after every epoch and the best epoch's weights kept.
        patience: stop after this many epochs without a held-out improvement (needs a held-out
            set; None: run every epoch).
        selection: what the held-out set scores: the training ``"objective"`` or the ``"nll"``
            of the calibrated logits (the CA loss's own minimum is under-confident, so its
            held-out value cannot tell a calibrated epoch from an under-confident one).
        seed: seed of the held-out split and of the batch order.
        drop_last: drop every epoch's last, smaller batch.
        precompute: compute the inputs once (fast); False recomputes them every step.
        allow_probabilities: fit even if every row of ``logits`` is a probability vector.

    Returns:
        A :class:`FitHistory`.
    """
    if not isinstance(calibrator, TemperatureCalibrator):
        raise ValueError(
            f"calibrator must be a TemperatureCalibrator, got {type(calibrator).__name__}"
        )
    check_choice(objective, "objective", OBJECTIVES)
    check_choice(weighting, "weighting", CA_WEIGHTINGS)
    check_choice(selection, "selection", ("objective", "nll"))
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch_size")
    lr = check_float(lr, "lr", minimum=0.0, strict_minimum=True)
    if max_steps is not None:
        max_steps = check_positive_int(max_steps, "max_steps")
    holdout_fraction = check_float(
        holdout_fraction, "holdout_fraction", minimum=0.0, maximum=1.0, strict_maximum=True
    )
    if patience is not None:
        patience = check_int(patience, "patience", minimum=1)
        if holdout_fraction == 0:
            raise ValueError("patience needs a held-out set: give holdout_fraction > 0")
    if not isinstance(precompute, bool):
        raise ValueError(f"precompute must be a bool, got {precompute!r}")
    check_fit_inputs(logits, labels, allow_probabilities)
    params = [p for p in calibrator.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"calibrator {type(calibrator).__name__} has no trainable parameters")
    needs_views = calibrator.requires_views
    if needs_views:
        check_tensor(view_logits, "view_logits", 3, "(V, N, C)")
        if view_logits.shape[1:] != logits.shape:
            raise ValueError(
                f"view_logits must have shape (V, N, C) = (V, {logits.shape[0]}, "
                f"{logits.shape[1]}), got {tuple(view_logits.shape)}"
            )
        if view_logits.numel() and not bool(torch.isfinite(sum(torch.aminmax(view_logits)))):
            raise ValueError("view_logits must be finite, got NaN or inf")

    device = logits.device
    calibrator.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    train_rows, holdout_rows = _holdout_split(logits.shape[0], holdout_fraction, generator)
    dtype = calibrator._working_dtype(logits)
    with torch.no_grad():
        z = logits.detach().to(dtype)
        targets = labels.long()
        fast_inputs = precompute and hasattr(calibrator, "temperature_from_features")
        features_needed = needs_views and fast_inputs
        top = _top_classes(z, calibrator) if features_needed else None
        row_max, predicted = _max_and_argmax(z, top)
        correct = (predicted == targets).to(dtype)
        shifted = None
        if objective == "ca":  # d = z - max_k z_k (row max exactly 0), in one (N, C) allocation
            shifted = torch.empty(z.shape, dtype=dtype, device=device)
            torch.sub(z, row_max[:, None], out=shifted)
        if features_needed:
            topk_indices = None if top is None else top.indices
            features = calibrator.features(z, view_logits, topk_indices)
        else:
            features = None
    split_accuracy = correct[train_rows].mean() if weighting == "split" else None
    closed_form_params = getattr(calibrator, "_closed_form_parameters", lambda: None)()
    closed_form = (
        objective == "ca"
        and features is not None
        and closed_form_params is not None
        and len(closed_form_params) == len(params)
        and all(a is b for a, b in zip(closed_form_params, params))
    )

    def loss_of(rows: Tensor, weights_accuracy: Tensor | None) -> Tensor:
        if not precompute:  # the reference: everything from the cached tensors, every step
            views = view_logits[:, rows] if needs_views else None
            calibrated = calibrator(logits[rows], views)
            if objective == "ca":
                return correctness_aware_loss(
                    calibrated, labels[rows], weighting, weights_accuracy
                ).loss
            fn = calibration_cross_entropy if objective == "ce" else calibration_mse
            return fn(calibrated, labels[rows]).loss
        if features is not None:
            temperature = calibrator.temperature_from_features(features[rows])
        else:
            views = view_logits[:, rows] if needs_views else None
            temperature = calibrator.temperature(z[rows], views)
        temperature = temperature.to(dtype)
        if objective == "ca":
            batch = torch.index_select(shifted, 0, rows, out=gathered[: len(rows)])
            batch.mul_(LOG2_E)  # base 2, for exp2
            confidence = _tempered_confidence_into(batch, temperature, work[: len(rows)])
            return correctness_aware_objective(
                confidence, correct[rows], weighting, weights_accuracy
            ).loss
        scaled = z[rows] / temperature[:, None]
        if objective == "ce":
            return F.cross_entropy(scaled, targets[rows])
        probs = torch.softmax(scaled, dim=1)
        onehot = F.one_hot(targets[rows], probs.shape[1]).to(dtype)
        return ((probs - onehot) ** 2).sum(dim=1).mean()

    def closed_form_step(rows: Tensor, x: Tensor, y: Tensor, k: Tensor, out: Tensor) -> None:
        """One batch's CA step without autograd: ``x`` its features, ``y`` its correctness,
        ``k`` its :func:`_objective_coefficients`; every parameter's gradient in closed form,
        then Adam's update; writes twice the objective into the 0-dim ``out``. (B, C) work only in
        ``embedding_bag`` and :func:`_confidence_and_moment`; the rest is O(B)."""
        parts = calibrator._temperature_parts(x, dtype)
        # s = d log2(e) / T: the batch's rows gathered and scaled in one pass.
        scaled = F.embedding_bag(
            rows,
            shifted,
            offsets[: len(rows)],
            mode="sum",
            per_sample_weights=LOG2_E / parts.temperature,
        )
        confidence, moment = _confidence_and_moment(scaled, work[: len(rows)])
        delta = confidence - y
        grad = k * delta  # dL/dc
        torch.dot(grad, delta, out=out)
        grad_t = _confidence_vjp(grad, confidence, moment, parts.temperature)
        flat_adam.step(calibrator._temperature_backward(parts, grad_t))

    # Preallocated (B, C) buffers: a fresh 4 MB tensor every step costs page faults.
    width = (batch_size if not len(holdout_rows) else max(batch_size, len(holdout_rows)),)
    gathered = (
        torch.empty(width + z.shape[1:], dtype=dtype, device=device)
        if shifted is not None
        else None
    )
    work = torch.empty_like(gathered) if gathered is not None else None
    offsets = torch.arange(batch_size, device=device)  # one row per bag of embedding_bag
    closed_form = closed_form and _FlatAdam.supports(params)
    flat_adam = _FlatAdam(params, lr) if closed_form else None
    # The fused implementation (one kernel for every parameter) where torch has it.
    try:
        optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.Adam(params, lr=lr)
    steps, epoch = 0, 0
    train_losses: list[float] = []
    holdout_losses: list[float] = []
    best: tuple[float, int, dict] | None = None
    holdout_accuracy = (
        correct[holdout_rows].mean() if weighting == "split" and len(holdout_rows) else None
    )
    calibrator.train()
    try:
        with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
            while epoch < epochs and (max_steps is None or steps < max_steps):
                epoch += 1
                total, count = torch.zeros((), dtype=torch.float64, device=device), 0
                order, bounds = _epoch_order(len(train_rows), batch_size, generator, drop_last)
                epoch_rows = train_rows[order].to(device)
                if closed_form and bounds:  # this epoch's rows in batch order: a batch is a slice
                    x_epoch = features.index_select(0, epoch_rows[: bounds[-1][1]])
                    y_epoch = correct.index_select(0, epoch_rows[: bounds[-1][1]])
                    sizes = [stop - start for start, stop in bounds]
                    k_epoch = _objective_coefficients(y_epoch, sizes, weighting, split_accuracy)
                    doubled = torch.empty(len(bounds), dtype=dtype, device=device)
                taken = 0  # batches of this epoch done
                for start, stop in bounds:
                    if max_steps is not None and steps >= max_steps:
                        break
                    rows = epoch_rows[start:stop]
                    if closed_form:
                        with torch.no_grad():
                            x, y, k = x_epoch[start:stop], y_epoch[start:stop], k_epoch[start:stop]
                            closed_form_step(rows, x, y, k, doubled[taken])
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        loss = loss_of(rows, split_accuracy)
                        loss.backward()
                        total += loss.detach().double() * (stop - start)  # no host copy per step
                        optimizer.step()
                    steps += 1
                    taken += 1
                    count += stop - start
                if closed_form and taken:  # the batches' losses, weighted by their sizes
                    done = torch.tensor(sizes[:taken], dtype=torch.float64, device=device)
                    total += (doubled[:taken].double() * done).sum() / 2
                train_losses.append(float(total) / max(count, 1))
                if len(holdout_rows):
                    with torch.no_grad():
                        rows = holdout_rows.to(device)
                        if selection == "nll":
                            views = view_logits[:, rows] if needs_views else None
                            value = float(
                                F.cross_entropy(calibrator(z[rows], views), targets[rows])
                            )
                        else:
                            value = float(loss_of(rows, holdout_accuracy))
                    holdout_losses.append(value)
                    if best is None or value < best[0]:
                        best = (value, epoch, copy.deepcopy(calibrator.state_dict()))
                    elif patience is not None and epoch - best[1] >= patience:
                        break
    finally:
        if flat_adam is not None:
            flat_adam.release()
    calibrator.eval()
    if not all(math.isfinite(v) for v in train_losses):
        raise FloatingPointError(
            f"the {objective} objective became NaN or inf during the fit (epoch losses "
            f"{train_losses}); lower lr"
        )
    best_epoch = None
    if best is not None:
        calibrator.load_state_dict(best[2])
        best_epoch = best[1]
    return FitHistory(steps, epoch, best_epoch, train_losses, holdout_losses)
