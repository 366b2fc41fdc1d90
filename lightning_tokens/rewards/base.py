"""Reward specifications (buildable from YAML) and the checked, weighted combination of rewards."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.imports import import_object

RewardFn = Callable[..., Sequence[float]]


@dataclass
class RewardSpec:
    """One reward function and its weight.

    Attributes:
        function: import path of a callable (``"package.module.function"`` or ``"package.module:function"``)
            or of a class, which is instantiated with ``kwargs`` and then called.
        weight: its weight in the total reward.
        kwargs: keyword arguments of the class (classes only).
        name: the name its logs use (``train/rewards/<name>/mean``); defaults to the function's name.
    """

    function: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass
class RewardResult:
    """Rewards of one batch of completions.

    Attributes:
        total: ``(N,)`` float32 weighted sum of every function's rewards.
        per_function: ``name → (N,)`` rewards of each function, unweighted.
    """

    total: Tensor
    per_function: dict[str, Tensor]


def resolve_reward(spec: RewardSpec | RewardFn | str) -> tuple[str, RewardFn, float]:
    """``(name, callable, weight)`` of a spec, a callable (weight 1) or an import path (weight 1).

    Raises:
        ConfigError: the path does not import, names nothing callable, or ``kwargs`` go to a function.
    """
    if isinstance(spec, str):
        spec = RewardSpec(spec)
    if not isinstance(spec, RewardSpec):
        if not callable(spec):
            raise ConfigError(f"a reward must be a RewardSpec, an import path or a callable, got {type(spec).__name__}.")
        return getattr(spec, "__name__", type(spec).__name__), spec, 1.0
    try:
        target = import_object(spec.function)
    except ConfigError as error:
        raise ConfigError(f"reward function: {error}") from None
    if inspect.isclass(target):
        try:
            target = target(**spec.kwargs)
        except TypeError as error:
            raise ConfigError(f"reward {spec.function}: kwargs {spec.kwargs} do not fit the class: {error}") from None
    elif spec.kwargs:
        raise ConfigError(
            f"reward {spec.function} is a function, so it takes no kwargs (got {sorted(spec.kwargs)}): "
            "pass a class path to configure it, or drop kwargs."
        )
    if not callable(target):
        raise ConfigError(f"reward {spec.function} is not callable.")
    weight = float(spec.weight)
    if not math.isfinite(weight):
        raise ConfigError(f"reward {spec.function}: weight={spec.weight} must be a finite number.")
    name = spec.name or spec.function.replace(":", ".").rsplit(".", 1)[-1]
    return name, target, weight


class Rewards:
    """Calls reward functions on completions, checks their results and sums them with their weights.

    A function that raises, returns something other than one finite number per completion, stops the
    run with an error that names the function and the prompt concerned.

    Args:
        specs: the reward functions (:class:`RewardSpec`, import paths or callables).

    Example:
        >>> rewards = Rewards([RewardSpec("lightning_tokens.rewards.FormatReward", 0.5, {"pattern": r"^\\d+$"})])
        >>> rewards(["12", "x"], ["p", "p"], {}).total.tolist()
        [0.5, 0.0]
    """

    def __init__(self, specs: Sequence[RewardSpec | RewardFn | str]) -> None:
        if not specs:
            raise ConfigError("rewards is empty: list at least one reward function (e.g. lightning_tokens.rewards.nupa_exact_match).")
        self.functions = [resolve_reward(spec) for spec in specs]
        names = [name for name, _, _ in self.functions]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"two reward functions are both named {duplicates}: give each a distinct `name`.")

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.functions]

    def __call__(self, completions: list[str], prompts: list[str], columns: Mapping[str, Any]) -> RewardResult:
        per_function: dict[str, Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for name, function, weight in self.functions:
            try:
                values = function(completions=completions, prompts=prompts, **columns)
            except Exception as error:
                raise RuntimeError(
                    f"reward function {name!r} raised {type(error).__name__}: {error} (first prompt of the batch: "
                    f"{_short(prompts[0]) if prompts else '<none>'})"
                ) from error
            rewards = _check_values(name, values, completions, prompts)
            per_function[name] = rewards
            total += weight * rewards
        return RewardResult(total=total, per_function=per_function)


def reward_columns(batch: Mapping[str, Any], repeat: int = 1) -> dict[str, list[Any]]:
    """The batch's per-prompt list columns (``answers``, ``domains``...), which reward functions receive as
    keywords, each entry repeated ``repeat`` times (one per completion of a prompt).

    Example:
        >>> reward_columns({"prompts": ["a", "b"], "answers": ["1", "2"], "input_ids": None}, repeat=2)
        {'answers': ['1', '1', '2', '2']}
    """
    n = len(batch["prompts"])
    return {
        key: [v for v in value for _ in range(repeat)] for key, value in batch.items()
        if key != "prompts" and isinstance(value, (list, tuple)) and len(value) == n
    }


def _check_values(name: str, values: Any, completions: list[str], prompts: list[str]) -> Tensor:
    try:
        values = list(values)
    except TypeError:
        raise RuntimeError(
            f"reward function {name!r} returned {type(values).__name__}; it must return a list of floats, one per completion."
        ) from None
    if len(values) != len(completions):
        raise RuntimeError(
            f"reward function {name!r} returned {len(values)} rewards for {len(completions)} completions: "
            "return one float per completion."
        )
    out = []
    for i, value in enumerate(values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise RuntimeError(
                f"reward function {name!r} returned {value!r} for completion {i} of prompt {_short(prompts[i])}: "
                "rewards must be finite numbers."
            )
        out.append(number)
    return torch.tensor(out, dtype=torch.float32)


def _short(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
