"""Argument checks shared by the RL arithmetic: each failure is a :class:`ConfigError` naming the argument
and the fix. Shape and option checks only; no check reads tensor values (that would synchronise a GPU)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError


def as_tensor(name: str, value: object) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"{name} must be a tensor or a list of numbers, got {type(value).__name__}: {error}"
        ) from None


def float_tensor(name: str, value: object) -> Tensor:
    """A floating tensor (integer and boolean inputs become the default float dtype)."""
    tensor = as_tensor(name, value)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    return tensor


def check_ndim(name: str, tensor: Tensor, ndims: tuple[int, ...], layout: str) -> None:
    if tensor.ndim not in ndims:
        raise ConfigError(f"{name} must have shape {layout}, got shape {tuple(tensor.shape)}: reshape it to {layout}.")


def check_same_shape(name: str, tensor: Tensor, ref_name: str, ref: Tensor) -> None:
    if tensor.shape != ref.shape:
        raise ConfigError(
            f"{name} has shape {tuple(tensor.shape)} but {ref_name} has shape {tuple(ref.shape)}: "
            f"pass one value per element of {ref_name}."
        )


def check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not known: use one of {', '.join(repr(c) for c in choices)}.")
    return value  # type: ignore[return-value]
