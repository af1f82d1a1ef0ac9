"""Calibrator heads: global temperature scaling and the correctness-aware per-sample temperature.

Both share one interface, ``forward(logits, view_logits=None) -> calibrated logits`` of shape
(N, C), and ``temperature(logits, view_logits=None) -> (N,)`` temperatures with

.. math::

    \\tilde z_i = z_i / T_i, \\qquad T_i > 0,

so the argmax (the predicted class) never changes: calibration preserves accuracy. ``logits`` are
the frozen classifier's logits :math:`z_0` of the ORIGINAL inputs; ``view_logits`` are the logits
:math:`z_j` of V transformed views, shape (V, N, C), needed by
:class:`CorrectnessAwareCalibrator` only. Everything is computed in at least float32 with autocast
disabled (bf16 / fp16 logits are upcast; float64 stays float64).

This module imports torch only.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_losses.checks import (
    check_class_labels,
    check_logits,
    check_not_probabilities,
    check_positive_int,
    check_same_length,
    check_tensor,
)

__all__ = [
    "CorrectnessAwareCalibrator",
    "PostHocCalibrator",
    "TemperatureCalibrator",
    "TemperatureScaling",
    "fit_temperature",
]


def _check_bounds(t_min: float, t_max: float) -> None:
    if not (math.isfinite(t_min) and math.isfinite(t_max) and 0 < t_min < 1 < t_max):
        raise ValueError(
            f"t_min and t_max must be finite with 0 < t_min < 1 < t_max (so that T = 1 is "
            f"inside the bounds), got t_min={t_min!r}, t_max={t_max!r}"
        )


def check_fit_inputs(
    logits: Tensor, labels: Tensor, allow_probabilities: bool, name: str = "logits"
) -> None:
    """The checks every ``fit`` runs once: (N, C) float logits with N >= 1 that are finite and
    not all probability rows, (N,) integer labels in [0, C). Two host reads in all."""
    check_logits(logits, name)
    if logits.shape[0] == 0:
        raise ValueError(
            f"{name} must hold at least one sample (N >= 1) to fit a calibrator, got "
            f"{tuple(logits.shape)}: the calibration split is empty"
        )
    check_class_labels(labels, "labels")
    check_same_length(logits, name, labels, "labels")
    num_classes = logits.shape[1]
    if labels.device != logits.device:
        raise ValueError(
            f"labels must be on the device of {name} ({logits.device}), got {labels.device}"
        )
    low, high = torch.aminmax(logits.detach())  # NaN propagates; no (N, C) bool tensor
    in_range, finite, unit_range = (
        bool(v)
        for v in torch.stack(
            [
                ((labels >= 0) & (labels < num_classes)).all(),
                torch.isfinite(low + high),
                (low >= 0) & (high <= 1),
            ]
        ).tolist()
    )
    if not in_range:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}), got values in "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if not finite:
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if unit_range:  # only then can every row be a probability vector
        check_not_probabilities(logits, name, allow=allow_probabilities)


class PostHocCalibrator(nn.Module):
    """Base class of every post-hoc calibrator: calibrated logits from a frozen classifier's.

    ``forward(logits, view_logits=None, features=None)`` returns (N, C) calibrated logits in at
    least float32: their softmax is the calibrated probability vector. ``fit(logits, labels,
    view_logits=None, allow_probabilities=False)`` fits the calibrator on the CACHED logits of a
    calibration split and returns it. ``fit`` refuses N = 0, non-finite logits and logits whose
    rows are all probability vectors (unless ``allow_probabilities=True``): one check per fit;
    ``forward`` checks shapes only (no host read per call).

    ``requires_views``: whether ``view_logits`` (V, N, C) are needed. ``preserves_accuracy``:
    whether the argmax of the calibrated logits always equals the argmax of the input.
    """

    requires_views: bool = False
    preserves_accuracy: bool = True

    def _working_dtype(self, logits: Tensor) -> torch.dtype:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        for param in self.parameters():
            dtype = torch.promote_types(dtype, param.dtype)
            break
        return dtype

    def forward(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def fit(
        self,
        logits: Tensor,
        labels: Tensor,
        view_logits: Tensor | None = None,
        allow_probabilities: bool = False,
        **options: Any,
    ) -> Self:
        """Fit on the cached logits of a calibration split and return ``self``: the inputs are
        checked once (:func:`check_fit_inputs`), then :meth:`_fit` runs with ``options`` (a
        subclass's own keywords, e.g. ``max_iter`` of :class:`TemperatureScaling`)."""
        check_fit_inputs(logits, labels, allow_probabilities)
        self._fit(logits, labels, view_logits, **options)
        return self

    def _fit(self, logits: Tensor, labels: Tensor, view_logits: Tensor | None) -> None:
        """What a subclass fits, on inputs :meth:`fit` has checked."""
        raise NotImplementedError


class TemperatureCalibrator(PostHocCalibrator):
    """Base class: calibrated logits are ``logits / temperature(logits, view_logits)[:, None]``.

    Subclasses implement :meth:`temperature` returning (N,) positive temperatures in the working
    dtype (at least float32) and set ``requires_views`` (whether ``view_logits`` is needed).
    """

    def temperature(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """(N,) temperatures T_i > 0 for the N samples of ``logits``."""
        raise NotImplementedError

    def forward(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """Calibrated logits :math:`z_i / T_i`, shape (N, C), in at least float32.

        Args:
            logits: (N, C) logits of the original inputs.
            view_logits: (V, N, C) logits of the transformed views, or None where the
                calibrator does not use them (see ``requires_views``).
            features: the calibrator's precomputed inputs (see
                :meth:`CorrectnessAwareCalibrator.features`) instead of ``view_logits``.
        """
        temperature = self.temperature(logits, view_logits, features)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return logits.to(temperature.dtype) / temperature[:, None]


class TemperatureScaling(TemperatureCalibrator):
    """Temperature scaling (Guo et al., 2017): one scalar temperature for every sample.

    The parameter is :math:`\\log T` (``log_temperature``), and

    .. math::

        T = \\exp\\big(\\mathrm{clamp}(\\log T,\\ \\log t_{min},\\ \\log t_{max})\\big),

    so T stays in [t_min, t_max], positive and finite, for ANY parameter value (an unbounded
    :math:`\\exp` would give 0 or inf for :math:`|\\log T| \\gtrsim 90` in float32). The clamp is
    the identity inside the bounds (a second clamp after the exp only removes rounding); the
    defaults (1e-2, 1e2) are far from any useful temperature.
    ``view_logits`` is accepted and ignored. Fit it with :func:`fit_temperature` (LBFGS with a
    strong-Wolfe line search) or with any optimizer inside a LightningModule.

    Args:
        init_temperature: the starting T, in [t_min, t_max] (1.5 as in the authors' code).
        t_min: the lower bound of T, > 0.
        t_max: the upper bound of T, > t_min.
    """

    requires_views = False

    def __init__(
        self, init_temperature: float = 1.5, t_min: float = 1e-2, t_max: float = 1e2
    ) -> None:
        super().__init__()
        if not (math.isfinite(t_min) and math.isfinite(t_max) and 0 < t_min < t_max):
            raise ValueError(
                f"t_min and t_max must be finite with 0 < t_min < t_max, got t_min={t_min!r}, "
                f"t_max={t_max!r}"
            )
        if not (math.isfinite(init_temperature) and t_min <= init_temperature <= t_max):
            raise ValueError(
                f"init_temperature must be a float in [t_min, t_max] = [{t_min}, {t_max}], "
                f"got {init_temperature!r}"
            )
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))

    def scalar_temperature(self) -> Tensor:
        """The scalar T (0-dim, the parameter's dtype, differentiable)."""
        log_t = self.log_temperature.clamp(math.log(self.t_min), math.log(self.t_max))
        # The second clamp only removes the rounding of exp(log(t_max)) above t_max.
        return log_t.exp().clamp(self.t_min, self.t_max)

    def temperature(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """The scalar T expanded to (N,); ``view_logits`` and ``features`` are ignored."""
        check_logits(logits)
        dtype = self._working_dtype(logits)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            t = self.scalar_temperature().to(device=logits.device, dtype=dtype)
            return t.expand(logits.shape[0])

    def _fit(
        self, logits: Tensor, labels: Tensor, view_logits: Tensor | None, max_iter: int = 100
    ) -> None:
        """Fit T by NLL from the current T (see :func:`fit_temperature`).

        The fit runs in float64 on a detached copy of ``logits``; the fitted :math:`\\log T`
        is then copied into ``log_temperature`` (its dtype and device kept).
        ``view_logits`` is accepted and ignored.
        """
        check_positive_int(max_iter, "max_iter")
        z = logits.detach().to(torch.float64)
        targets = labels.long()
        replica = TemperatureScaling(1.0, self.t_min, self.t_max)
        replica = replica.to(device=logits.device, dtype=torch.float64)
        with torch.no_grad():
            replica.log_temperature.copy_(self.log_temperature.detach())
        optimizer = torch.optim.LBFGS(
            [replica.log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(replica(z), targets)
            loss.backward()
            return loss

        with torch.enable_grad(), torch.autocast(device_type=logits.device.type, enabled=False):
            optimizer.step(closure)
        with torch.no_grad():
            self.log_temperature.copy_(replica.log_temperature.detach())

    def extra_repr(self) -> str:
        t = float(self.scalar_temperature().detach())
        return f"temperature={t:.4g}, t_min={self.t_min}, t_max={self.t_max}"


def fit_temperature(
    logits: Tensor,
    labels: Tensor,
    max_iter: int = 100,
    init_temperature: float = 1.5,
    allow_probabilities: bool = False,
) -> TemperatureScaling:
    """Fit a :class:`TemperatureScaling` by minimising the NLL over :math:`\\log T`.

    Minimises :math:`-\\frac1N \\sum_i \\log \\mathrm{softmax}(z_i / T)_{\\ell_i}` with
    ``torch.optim.LBFGS(lr=1, line_search_fn="strong_wolfe")`` on the parameter
    :math:`\\log T`. The authors' recipe (LBFGS lr 0.01, 50 iterations, no line search, on T)
    stops far from the optimum (a planted T = 2.5 came back as 1.72); with the line search it
    converges in a few iterations. The fit runs in float64 on a detached copy of ``logits``
    (on their device), so the result does not depend on the logits' dtype.

    Args:
        logits: (N, C) finite uncalibrated logits of the calibration split.
        labels: (N,) integer class indices in [0, C).
        max_iter: maximum number of LBFGS iterations, >= 1.
        init_temperature: the starting T.
        allow_probabilities: fit even when every row of ``logits`` is a probability vector (in
            [0, 1], summing to 1), which is almost always probabilities passed by mistake.

    Returns:
        A float32 :class:`TemperatureScaling` on the logits' device holding the fitted T.
    """
    model = TemperatureScaling(init_temperature).to(logits.device)
    return model.fit(logits, labels, max_iter=max_iter, allow_probabilities=allow_probabilities)


def _cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, without the call when it is already ``dtype``."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _affine_t(layer: nn.Linear, inputs_t: Tensor, dtype: torch.dtype) -> Tensor:
    """``layer(inputs_t.T).T`` (out, N) for (in, N) ``inputs_t``, in ``dtype``."""
    weight = _cast(layer.weight, dtype)
    if layer.bias is None:
        return weight @ inputs_t
    return torch.addmm(_cast(layer.bias, dtype)[:, None], weight, inputs_t)


class _TemperatureParts(NamedTuple):
    """What :meth:`CorrectnessAwareCalibrator._temperature_backward` reads of the forward."""

    x: Tensor
    """(N, k V) input features in the working dtype."""
    hidden: Tensor
    """(H, N) ReLU output (transposed)."""
    sigma: Tensor
    """(N,) sigmoid of the last layer's output plus the offset."""
    raw: Tensor
    """(N,) temperature before the clamp."""
    temperature: Tensor
    """(N,) temperature."""


class CorrectnessAwareCalibrator(TemperatureCalibrator):
    """Per-sample temperature from the transformed views (Liu et al., arXiv 2404.13016).

    Input features (``features``): take the indices :math:`r_1, \\dots, r_k` of the top-k classes
    of the ORIGINAL logits :math:`z_0`, in rank order (largest first). For every transformed view
    j = 0..V-1, :math:`p_j = \\mathrm{softmax}(z_j)` at those indices. Concatenated view-major,

    .. math::

        x = [p_0(r_1), \\dots, p_0(r_k),\\ p_1(r_1), \\dots, p_1(r_k),\\ \\dots,\\
              p_{V-1}(r_1), \\dots, p_{V-1}(r_k)] \\in [0, 1]^{kV}

    (the order of the authors' ``torch.cat([p2topk1, p3topk1, p4topk1], -1)``). The original
    view's own probabilities are not in it.

    Network: :math:`u = W_2\\, \\mathrm{ReLU}(W_1 x + b_1) + b_2` (Linear(k V -> hidden), ReLU,
    Linear(hidden -> 1)), then a smooth bound instead of the authors' hard clamp to [0.1, 10]
    (which starts below 0.1, with zero gradient, for about half of random seeds):

    .. math::

        T = \\exp\\big(\\log t_{min} + (\\log t_{max} - \\log t_{min})\\,
            \\sigma(u + b_0)\\big), \\qquad
        b_0 = \\mathrm{logit}\\Big(\\frac{-\\log t_{min}}{\\log t_{max} - \\log t_{min}}\\Big),

    so :math:`T \\in (t_{min}, t_{max})` (reaching a bound only when the sigmoid saturates in
    floating point) and :math:`u = 0` gives exactly T = 1 (:math:`b_0 = 0` for the symmetric
    defaults 0.1, 10). The last layer starts with zero bias and weights of standard deviation
    ``init_std`` (1e-3), so every sample starts at :math:`T \\approx 1` whatever the seed while
    all parameters get a non-zero gradient. Calibrated logits are :math:`z_0 / T(x)`.

    Args:
        num_views: V, the number of TRANSFORMED views (the original is not counted).
        top_k: k, the number of top classes of the original logits, <= C (4 in the paper).
        hidden: width of the hidden layer (5 in the paper).
        t_min: lower bound of T, in (0, 1).
        t_max: upper bound of T, > 1.
        init_std: standard deviation of the last layer's initial weights, >= 0.
    """

    requires_views = True
    FEATURE_CHUNK_ELEMENTS = 1 << 22  # view logits per softmax call of :meth:`features`

    def __init__(
        self,
        num_views: int,
        top_k: int = 4,
        hidden: int = 5,
        t_min: float = 0.1,
        t_max: float = 10.0,
        init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        check_positive_int(num_views, "num_views")
        check_positive_int(top_k, "top_k")
        check_positive_int(hidden, "hidden")
        _check_bounds(t_min, t_max)
        if not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std must be a finite float >= 0, got {init_std!r}")
        self.num_views = num_views
        self.top_k = top_k
        self.hidden = hidden
        self.t_min = float(t_min)
        self.t_max = float(t_max)
        self.init_std = float(init_std)
        self.log_t_min = math.log(t_min)
        self.log_t_range = math.log(t_max) - math.log(t_min)
        share = -self.log_t_min / self.log_t_range  # sigma(b0) = share  <=>  T(u = 0) = 1
        self.offset = math.log(share) - math.log1p(-share)
        self.mlp = nn.Sequential(
            nn.Linear(top_k * num_views, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        self.reset_last_layer()

    def reset_last_layer(self) -> None:
        """Zero bias and N(0, init_std^2) weights in the last layer: T ~= 1 for every sample."""
        last = self.mlp[-1]
        nn.init.normal_(last.weight, std=self.init_std)
        nn.init.zeros_(last.bias)

    def _check_views(self, logits: Tensor, view_logits: Tensor | None) -> None:
        check_logits(logits)
        expected = f"({self.num_views}, {logits.shape[0]}, {logits.shape[1]})"
        if view_logits is None:
            raise ValueError(
                "CorrectnessAwareCalibrator needs the transformed views' logits: pass "
                f"view_logits of shape (num_views, N, C) = {expected}"
            )
        if not isinstance(view_logits, Tensor) or not view_logits.is_floating_point():
            kind = view_logits.dtype if isinstance(view_logits, Tensor) else type(view_logits)
            raise ValueError(f"view_logits must be a floating-point tensor, got {kind}")
        if view_logits.shape != (self.num_views, *logits.shape):
            raise ValueError(
                f"view_logits must have shape (num_views, N, C) = {expected} to match logits "
                f"{tuple(logits.shape)} and num_views={self.num_views}, got "
                f"{tuple(view_logits.shape)}"
            )
        if self.top_k > logits.shape[1]:
            raise ValueError(
                f"top_k={self.top_k} must be <= the number of classes C = {logits.shape[1]}"
            )

    def features(
        self, logits: Tensor, view_logits: Tensor | None, top: Tensor | None = None
    ) -> Tensor:
        """The (N, k V) MLP input: each view's softmax at the original top-k, view-major.

        ``out[i, j * k + r] = softmax(view_logits[j, i])[topk(logits[i])[r]]``, in the working
        dtype (at least float32). ``top``: the (N, k) indices ``logits.topk(k).indices``
        when the caller has them already (a fit that also needs the row maxima).
        """
        self._check_views(logits, view_logits)
        dtype = self._working_dtype(logits)
        n, k = logits.shape[0], self.top_k
        if top is not None and (
            top.shape != (n, k) or top.dtype != torch.long or top.device != logits.device
        ):
            raise ValueError(
                f"top must be the (N, top_k) = ({n}, {k}) int64 indices of logits.topk(top_k) on "
                f"{logits.device}, got {tuple(top.shape)} {top.dtype} on {top.device}"
            )
        out = torch.empty(n, self.num_views * k, dtype=dtype, device=logits.device)
        # In chunks of rows, one view at a time: a softmax of all N rows at once would need
        # V * N * C extra numbers (600 MB at N = 50,000, C = 1000, V = 3), and one over
        # view_logits[:, rows] would first copy that non-contiguous (V, rows, C) block. Row-wise,
        # so the result does not depend on the chunking.
        chunk = max(1, self.FEATURE_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        with torch.no_grad(), torch.autocast(device_type=logits.device.type, enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                if top is None:
                    classes = logits[rows].detach().topk(k, dim=1, sorted=True).indices
                else:
                    classes = top[rows]
                for j in range(self.num_views):
                    probs = torch.softmax(view_logits[j, rows].detach().to(dtype), dim=-1)
                    out[rows, j * k : (j + 1) * k] = probs.gather(1, classes)
        return out

    def _check_features(self, logits: Tensor, features: Tensor) -> None:
        check_logits(logits)
        expected = f"(N, top_k * num_views) = ({logits.shape[0]}, {self.top_k * self.num_views})"
        check_tensor(features, "features", 2, expected)
        if features.shape != (logits.shape[0], self.top_k * self.num_views):
            raise ValueError(
                f"features must have shape {expected} (from CorrectnessAwareCalibrator.features), "
                f"got {tuple(features.shape)}"
            )
        if not features.is_floating_point():
            raise ValueError(f"features must be a floating-point tensor, got {features.dtype}")

    def temperature_from_features(self, features: Tensor) -> Tensor:
        """(N,) per-sample temperatures from precomputed (N, k V) :meth:`features`."""
        return self._temperature_parts(features).temperature

    def _temperature_parts(
        self, features: Tensor, dtype: torch.dtype | None = None
    ) -> _TemperatureParts:
        """The network's forward (the class docstring's formulas) in ``dtype`` (None: the
        working dtype), keeping what :meth:`_temperature_backward` needs; differentiable
        (autograd) when called with grad. The layers run transposed, :math:`W_1 x^T`: (H, N)
        activations, several times faster than :math:`x W_1^T` for these small widths."""
        if dtype is None:
            dtype = torch.promote_types(features.dtype, self._working_dtype(features))
        with torch.autocast(device_type=features.device.type, enabled=False):
            layers = self.mlp
            first, last = layers[0], layers[-1]
            x = _cast(features, dtype)
            hidden = torch.relu(_affine_t(first, x.t(), dtype))  # (H, N)
            u = _affine_t(last, hidden, dtype)[0]
            sigma = torch.sigmoid(u + self.offset)
            raw = (self.log_t_min + self.log_t_range * sigma).exp()
            # The clamp is mathematically a no-op; it only removes the rounding of exp(log t_max).
            return _TemperatureParts(x, hidden, sigma, raw, raw.clamp(self.t_min, self.t_max))

    def _closed_form_parameters(self) -> list[nn.Parameter] | None:
        """``[W1, b1, W2, b2]`` when :meth:`_temperature_backward` is this calibrator's exact
        gradient (the class's own network and forward, every parameter trainable), else None."""
        cls = CorrectnessAwareCalibrator
        layers = self.mlp
        stock = (
            type(self).temperature_from_features is cls.temperature_from_features
            and type(self)._temperature_parts is cls._temperature_parts
            and type(layers) is nn.Sequential
            and [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
        )
        if not stock:
            return None
        params = [layers[0].weight, layers[0].bias, layers[2].weight, layers[2].bias]
        if len(list(self.parameters())) != 4 or not all(p.requires_grad for p in params):
            return None
        return params

    def _temperature_backward(self, parts: _TemperatureParts, grad: Tensor) -> list[Tensor]:
        """Gradients of :math:`\\sum_i g_i T_i` (``grad`` = :math:`g`, (N,)) with respect to
        ``[W1, b1, W2, b2]`` in closed form (no autograd), each in its parameter's dtype:

        .. math::

            \\frac{\\partial T}{\\partial u} = [t_{min} \\le \\hat T \\le t_{max}]\\,
            \\hat T\\, (\\log t_{max} - \\log t_{min})\\, \\sigma (1 - \\sigma),

        :math:`\\hat T` the temperature before the clamp (whose gradient is 1 on its closed
        interval, as autograd's), then the last linear layer, the ReLU (:math:`[h > 0]`) and
        the first linear layer.
        """
        first, last = self.mlp[0], self.mlp[-1]
        # clamp(raw) == raw exactly where t_min <= raw <= t_max: autograd's clamp mask.
        g = torch.where(parts.raw == parts.temperature, grad, 0.0) * parts.raw
        g = g * (1.0 - parts.sigma) * (parts.sigma * self.log_t_range)  # dL/du, (N,)
        w2 = _cast(last.weight.detach()[0], g.dtype)
        g_pre = torch.outer(w2, g).mul_(parts.hidden > 0)  # dL/d(W1 x^T + b1), (H, N)
        grads = (
            g_pre @ parts.x,
            g_pre.sum(dim=1),
            (parts.hidden @ g)[None, :],
            g.sum(dim=0, keepdim=True),
        )
        params = (first.weight, first.bias, last.weight, last.bias)
        return [_cast(gi, p.dtype) for gi, p in zip(grads, params)]

    def temperature(
        self, logits: Tensor, view_logits: Tensor | None = None, features: Tensor | None = None
    ) -> Tensor:
        """(N,) per-sample temperatures in (t_min, t_max) (see the class docstring).

        ``features`` (the output of :meth:`features` for these logits and views, computed once
        for a cached split) replace ``view_logits``: the views' softmax is then not recomputed.
        """
        if features is None:
            features = self.features(logits, view_logits)
        else:
            self._check_features(logits, features)
        dtype = self._working_dtype(logits)
        return self.temperature_from_features(features.to(dtype))

    def _fit(
        self, logits: Tensor, labels: Tensor, view_logits: Tensor | None, **options: Any
    ) -> None:
        """Train with :func:`~lightning_losses.nets.calibrator_fit.fit_calibrator` (the CA loss,
        the authors' Adam recipe by default; ``options`` are its keywords)."""
        from lightning_losses.nets.calibrator_fit import fit_calibrator

        # fit() has checked the inputs with the caller's allow_probabilities.
        fit_calibrator(self, logits, labels, view_logits, allow_probabilities=True, **options)

    def extra_repr(self) -> str:
        return (
            f"num_views={self.num_views}, top_k={self.top_k}, hidden={self.hidden}, "
            f"t_min={self.t_min}, t_max={self.t_max}"
        )
