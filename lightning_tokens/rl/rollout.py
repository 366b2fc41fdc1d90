"""Rollout batches for policy-gradient training, as pure functions: which generated tokens count, and the
training rows built from prompts and their completions.

Generation returns ``(N, P + C)`` ids: ``N`` left-padded prompts followed by ``C`` generated positions.
A completion ends at its first end-of-sequence token (kept: the policy chose to stop there, so it is
trained) and everything after it is padding, as in TRL's ``GRPOTrainer``. The training rows drop the
prompts' left padding, so each row is ``prompt + completion`` from position 0, right-padded: the
positions the model sees in training equal those it saw while generating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError

__all__ = ["RolloutRows", "completion_mask", "rollout_rows", "unpadded"]


def completion_mask(completion_ids: Tensor, eos_token_id: int | None) -> Tensor:
    """``(N, C)`` bool mask of the generated tokens up to and including each row's first ``eos_token_id``.

    Rows without an end-of-sequence token (cut by the length limit) keep every position.

    Example:
        >>> completion_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), eos_token_id=2)
        tensor([[ True,  True, False, False],
                [ True,  True,  True,  True]])
    """
    if completion_ids.ndim != 2:
        raise ConfigError(f"completion_ids must be (N, C), got shape {tuple(completion_ids.shape)}.")
    if eos_token_id is None:
        return torch.ones_like(completion_ids, dtype=torch.bool)
    is_eos = completion_ids == eos_token_id
    # positions strictly after the first eos: an eos occurred earlier in the row
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after


def unpadded(ids: Tensor, mask: Tensor) -> list[list[int]]:
    """Each row's tokens without its padding (``mask`` 0), as lists: prompts as generation engines take them.

    Example:
        >>> unpadded(torch.tensor([[0, 3, 4], [5, 6, 7]]), torch.tensor([[0, 1, 1], [1, 1, 1]]))
        [[3, 4], [5, 6, 7]]
    """
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


@dataclass
class RolloutRows:
    """Training rows of a rollout.

    Attributes:
        input_ids: ``(N, L)`` prompt + completion, right-padded with ``pad_token_id``.
        attention_mask: ``(N, L)`` 1 on prompt and completion tokens.
        labels: ``(N, L)`` the completion tokens (labels are not shifted: ``labels[:, t]`` is predicted
            from positions ``< t``), -100 on prompts and padding.
        completion_lengths: ``(N,)`` tokens per completion (its eos included).
        truncated: ``(N,)`` bool, completions that reached the length limit without an eos.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    completion_lengths: Tensor
    truncated: Tensor


def rollout_rows(
    prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, eos_token_id: int | None, pad_token_id: int
) -> RolloutRows:
    """Join left-padded prompts and their generated continuations into right-padded training rows.

    Args:
        prompt_ids: ``(N, P)`` left-padded prompts (one row per completion).
        prompt_mask: ``(N, P)`` 1 on prompt tokens.
        completion_ids: ``(N, C)`` the generated positions.
        eos_token_id: the token that ends a completion (``None``: completions end at the length limit).
        pad_token_id: the padding id of ``input_ids``.

    Example:
        >>> rows = rollout_rows(torch.tensor([[0, 3, 4], [3, 4, 5]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
        ...                     torch.tensor([[7, 2, 0], [8, 9, 9]]), eos_token_id=2, pad_token_id=0)
        >>> rows.input_ids.tolist(), rows.labels.tolist()
        ([[3, 4, 7, 2, 0, 0], [3, 4, 5, 8, 9, 9]], [[-100, -100, 7, 2, -100, -100], [-100, -100, -100, 8, 9, 9]])
    """
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.ndim != 2:
        raise ConfigError(
            f"prompt_input_ids {tuple(prompt_ids.shape)} and prompt_attention_mask {tuple(prompt_mask.shape)} "
            "must be equal (N, P) shapes."
        )
    if completion_ids.shape[0] != prompt_ids.shape[0]:
        raise ConfigError(f"{completion_ids.shape[0]} completions for {prompt_ids.shape[0]} prompt rows.")
    keep = completion_mask(completion_ids, eos_token_id)
    prompt_lengths = prompt_mask.long().sum(-1)
    empty = (prompt_lengths == 0).nonzero().flatten()
    if empty.numel():
        raise ConfigError(f"prompt row {int(empty[0])} is empty (its attention mask is all 0): every prompt needs a token.")
    completion_lengths = keep.long().sum(-1)
    total = prompt_lengths + completion_lengths
    n, width = prompt_ids.shape[0], int(total.max())
    input_ids = torch.full((n, width), pad_token_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    labels = torch.full((n, width), -100, dtype=prompt_ids.dtype, device=prompt_ids.device)
    attention = torch.zeros((n, width), dtype=torch.long, device=prompt_ids.device)
    for row in range(n):
        prompt = prompt_ids[row][prompt_mask[row].bool()]
        completion = completion_ids[row][keep[row]]
        p, c = prompt.shape[0], completion.shape[0]
        input_ids[row, :p], input_ids[row, p : p + c] = prompt, completion
        labels[row, p : p + c] = completion
        attention[row, : p + c] = 1
    if eos_token_id is None:
        truncated = torch.ones(n, dtype=torch.bool, device=prompt_ids.device)
    else:
        truncated = ~((completion_ids == eos_token_id) & keep).any(-1)
    return RolloutRows(input_ids, attention, labels, completion_lengths, truncated)
