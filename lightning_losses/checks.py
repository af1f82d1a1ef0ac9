"""Argument checks shared by the whole package (torch only, no Lightning).

One wording for every error: ``"<name> must be <what is expected>, got <what came>"``, raised as
``ValueError`` (``TypeError`` is never used, so a caller catches one class). Checks of SHAPES,
DTYPES and OPTIONS here read no tensor values, so they cost no host synchronisation; checks of
VALUES (finite, in range) are the caller's, done once on a result or folded into one reduction
(:func:`all_true`), never one read per property.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HOST_READS",
    "CountHostReads",
    "all_true",
    "check_choice",
    "check_class_labels",
    "check_float",
    "check_floating",
    "check_int",
    "check_logits",
    "check_not_probabilities",
    "check_positive_int",
    "check_same_length",
    "check_tensor",
    "describe",
    "working_dtype",
]


def describe(value: object) -> str:
    """What a value is, for an error message: a tensor's shape, else its type's name."""
    if isinstance(value, Tensor):
        return str(tuple(value.shape))
    return type(value).__name__


def check_int(value: object, name: str, minimum: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``; bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is an integer >= 1 (``1.5`` and ``True`` are rejected)."""
    return check_int(value, name, minimum=1)


def check_float(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
    strict_maximum: bool = False,
) -> float:
    """Return ``value`` as a float if it is a FINITE real number within the given bounds.

    NaN and +-inf are always rejected (a bound compared with NaN is False, which would let it
    pass silently). ``strict_minimum`` / ``strict_maximum`` exclude the bound itself.
    """
    lo = "(" if strict_minimum else "["
    hi = ")" if strict_maximum else "]"
    low = "-inf" if minimum is None else minimum
    high = "inf" if maximum is None else maximum
    span = f"in {lo}{low}, {high}{hi}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number {span}, got {value!r}")
    number = float(value)
    too_low = minimum is not None and (number <= minimum if strict_minimum else number < minimum)
    too_high = maximum is not None and (number >= maximum if strict_maximum else number > maximum)
    if too_low or too_high:
        raise ValueError(f"{name} must be a finite number {span}, got {value!r}")
    return number


def check_choice(value: object, name: str, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_tensor(value: object, name: str, ndim: int | tuple[int, ...], shape: str) -> Tensor:
    """Return ``value`` if it is a tensor with ``ndim`` dimensions (``shape`` names them)."""
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if not isinstance(value, Tensor) or value.ndim not in dims:
        raise ValueError(f"{name} must be a tensor of shape {shape}, got {describe(value)}")
    return value


def check_floating(value: Tensor, name: str) -> Tensor:
    """Return ``value`` if its dtype is floating point."""
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_class_labels(
    value: object, name: str = "class_labels", length: int | None = None
) -> Tensor:
    """Return ``value`` if it is a 1-D integer tensor (of ``length`` entries when given).

    Only the shape and dtype are checked here; the range ``[0, num_classes)`` is a value check,
    left to the caller's single reduction.
    """
    labels = check_tensor(value, name, 1, "(B,)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor of class indices, got dtype {labels.dtype}; "
            "convert one-hot or soft labels with labels.argmax(dim=1)"
        )
    if length is not None and labels.shape[0] != length:
        raise ValueError(
            f"{name} must have {length} entries (one per sample), got {labels.shape[0]}"
        )
    return labels


def check_same_length(reference: Tensor, reference_name: str, other: Tensor, name: str) -> None:
    """Raise unless ``other`` has as many rows as ``reference``."""
    if other.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{name} must have one entry per row of {reference_name} ({reference.shape[0]}), "
            f"got {other.shape[0]}"
        )


def working_dtype(*dtypes: torch.dtype | Tensor) -> torch.dtype:
    """The dtype to compute in: the promotion of the inputs' dtypes and float32.

    bf16 / fp16 inputs are computed in float32 (normalisations, small epsilons and
    exponentials are not safe in half precision); float64 stays float64.
    """
    dtype = torch.float32
    for item in dtypes:
        dtype = torch.promote_types(dtype, item.dtype if isinstance(item, Tensor) else item)
    return dtype


def all_true(*conditions: Tensor) -> list[bool]:
    """Read several boolean scalars in ONE device-to-host copy; returns them as Python bools."""
    if not conditions:
        return []
    stacked = torch.stack([c.reshape(()).to(torch.bool) for c in conditions])
    return [bool(v) for v in stacked.tolist()]


#: Tensor methods and torch functions that copy a value to the host (a device synchronisation
#: on a GPU) or size their output by the data (which synchronises too).
HOST_READS = frozenset(
    {
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
        "item",
        "tolist",
        "numpy",
        "cpu",
        "nonzero",
        "argwhere",
        "masked_select",
        "unique",
        "unique_consecutive",
        "bincount",
    }
)


class CountHostReads(torch.overrides.TorchFunctionMode):
    """Context manager that records the host reads made inside it (``reads``: their names, in
    order): :data:`HOST_READS`, boolean-mask indexing and ``.to("cpu")``. For tests and
    benchmarks of the "one host read per call" promises (:func:`all_true` is one ``tolist``)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        if name in HOST_READS:
            self.reads.append(name)
        elif name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index):
                self.reads.append(f"{name}[bool mask]")
        elif name == "to" and any(
            str(a) == "cpu" for a in [*args[1:], kwargs.get("device")] if a is not None
        ):
            self.reads.append("to(cpu)")
        return func(*args, **kwargs)


def check_logits(value: object, name: str = "logits") -> Tensor:
    """Return ``value`` if it is a 2-D floating-point (N, C) tensor, C >= 2 (reads no values)."""
    logits = check_floating(check_tensor(value, name, 2, "(N, C)"), name)
    if logits.shape[1] < 2:
        raise ValueError(
            f"{name} must have C >= 2 classes (shape (N, C)), got {tuple(logits.shape)}"
        )
    return logits


def check_not_probabilities(logits: Tensor, name: str = "logits", allow: bool = False) -> None:
    """Raise when EVERY row of ``logits`` is a probability vector (in [0, 1], summing to 1
    within 1e-3), almost always probabilities passed where logits belong: one host read.

    ``allow=True`` (the caller's ``allow_probabilities``) skips the check. An empty tensor passes.
    """
    if allow or logits.numel() == 0:
        return
    x = logits.detach()
    sums = x.sum(dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
    inside = (x >= 0).all() & (x <= 1).all() & ((sums - 1).abs() <= 1e-3).all()
    if bool(inside):
        raise ValueError(
            f"{name} must be logits, got rows that are all probability vectors (in [0, 1], "
            "summing to 1): pass the classifier's logits (or their log), or set "
            "allow_probabilities=True"
        )
