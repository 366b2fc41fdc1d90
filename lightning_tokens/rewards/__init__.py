"""Reward functions for reinforcement learning (``GRPO``), TRL's calling convention.

A reward function receives the decoded ``completions`` and ``prompts`` (one entry per completion) and
every list column of the batch (``answers``, ``domains``...) as keyword arguments, and returns one float
per completion. :class:`RewardSpec` names one by import path, so YAML can list them; :class:`Rewards`
calls them, checks what they return, and combines them with their weights.

Built in: :func:`nupa_exact_match` (Number Cookbook exact match through ``nupa_scores``),
:class:`FormatReward` (a regular expression the completion must match) and
:class:`TimeMasterReward` (TimeMaster's ``<class>`` accuracy/format reward with an optional judged ``<extension>``
bonus, R_max = 1.5; :func:`timemaster_reward` for one completion).

Example:
    >>> rewards = Rewards([RewardSpec("lightning_tokens.rewards.nupa_exact_match")])
    >>> result = rewards(["1287", "12"], ["744 + 543 = "] * 2, {"answers": ["1287"] * 2, "domains": ["Integer"] * 2})
    >>> result.total.tolist()
    [1.0, 0.0]
"""

from lightning_tokens.rewards.base import RewardResult, Rewards, RewardSpec, resolve_reward, reward_columns
from lightning_tokens.rewards.format import FormatReward
from lightning_tokens.rewards.nupa import nupa_digit_match, nupa_exact_match
from lightning_tokens.rewards.timemaster import TimeMasterReward, timemaster_reward

__all__ = [
    "FormatReward",
    "RewardResult",
    "RewardSpec",
    "Rewards",
    "TimeMasterReward",
    "nupa_digit_match",
    "nupa_exact_match",
    "resolve_reward",
    "reward_columns",
    "timemaster_reward",
]
