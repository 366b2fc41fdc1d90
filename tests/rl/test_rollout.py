"""Completion masks and rollout rows (prompt + completion, right-padded)."""

import pytest
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rl.rollout import completion_mask, rollout_rows


def test_completion_mask_keeps_the_first_eos_and_nothing_after():
    ids = torch.tensor([[2, 5, 2], [5, 6, 7], [5, 2, 2]])
    assert completion_mask(ids, 2).tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert completion_mask(ids, None).all()


def test_rows_drop_left_padding_and_label_only_completions():
    prompts = torch.tensor([[0, 0, 9], [8, 8, 9]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    completions = torch.tensor([[4, 4, 4, 4], [2, 0, 0, 0]])  # row 0 is cut by the limit, row 1 stops at once
    rows = rollout_rows(prompts, mask, completions, eos_token_id=2, pad_token_id=0)
    assert rows.input_ids.tolist() == [[9, 4, 4, 4, 4], [8, 8, 9, 2, 0]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rows.labels.tolist() == [[-100, 4, 4, 4, 4], [-100, -100, -100, 2, -100]]
    assert rows.completion_lengths.tolist() == [4, 1] and rows.truncated.tolist() == [True, False]


def test_pad_equal_to_eos_is_handled():
    rows = rollout_rows(torch.tensor([[3]]), torch.tensor([[1]]), torch.tensor([[5, 2, 2, 2]]), eos_token_id=2, pad_token_id=2)
    assert rows.input_ids.tolist() == [[3, 5, 2]] and rows.labels.tolist() == [[-100, 5, 2]]


def test_bad_prompts_are_named():
    with pytest.raises(ConfigError, match="prompt row 1 is empty"):
        rollout_rows(torch.tensor([[3], [0]]), torch.tensor([[1], [0]]), torch.tensor([[5], [5]]), 2, 0)
    with pytest.raises(ConfigError, match="must be equal"):
        rollout_rows(torch.tensor([[3, 4]]), torch.tensor([[1]]), torch.tensor([[5]]), 2, 0)
    with pytest.raises(ConfigError, match="2 completions for 1 prompt rows"):
        rollout_rows(torch.tensor([[3]]), torch.tensor([[1]]), torch.tensor([[5], [5]]), 2, 0)
