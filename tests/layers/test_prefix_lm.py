"""Prefix-LM mask (against DualSpeechLM's ``attention_mask``) and the acoustic GPT."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.layers.prefix_lm import AcousticGPT, AcousticVocabulary, Adapter, prefix_lm_mask
from lightning_tokens.ops import linear_cross_entropy


def reference_attention_mask(loss_mask: torch.Tensor, prefix_lm: bool = True) -> torch.Tensor:
    """The reference's logic (causal_att.py ``attention_mask``), re-done in float64 for the comparison."""
    batch, length = loss_mask.shape
    axis = torch.arange(length, dtype=torch.float64)
    start = axis.unsqueeze(0).masked_fill(~loss_mask, 1e8).min(dim=1).values
    end = axis.unsqueeze(0).masked_fill(~loss_mask, -1e8).max(dim=1).values
    assert torch.all(end - start == loss_mask.double().sum(dim=-1) - 1)
    mask = (axis.unsqueeze(1) >= axis.unsqueeze(0)).repeat(batch, 1, 1)
    if prefix_lm:
        mask = torch.where(start.view(batch, 1, 1) > axis.view(1, 1, length), True, mask)
    return torch.where(end.view(batch, 1, 1) < axis.view(1, 1, length), False, mask)


def random_target_mask(generator: torch.Generator, batch: int, length: int) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        start = int(torch.randint(0, length, (1,), generator=generator))
        stop = int(torch.randint(start + 1, length + 1, (1,), generator=generator))
        mask[row, start:stop] = True
    return mask


# ---- the mask ----
def test_mask_hand_case_condition_two_targets_three():
    target = torch.tensor([[False, False, True, True, True, False]])
    mask = prefix_lm_mask(target)[0].int().tolist()
    assert mask[0] == [1, 1, 0, 0, 0, 0]  # prefix rows see the whole prefix, no target
    assert mask[1] == [1, 1, 0, 0, 0, 0]
    assert mask[2] == [1, 1, 1, 0, 0, 0]  # target rows: prefix + earlier targets + itself
    assert mask[3] == [1, 1, 1, 1, 0, 0]
    assert mask[4] == [1, 1, 1, 1, 1, 0]
    assert mask[5] == [1, 1, 1, 1, 1, 0]  # padding row: prefix + targets, never the padding column
    causal = prefix_lm_mask(target, prefix_lm=False)[0].int().tolist()
    assert causal[0] == [1, 0, 0, 0, 0, 0]
    assert causal[3] == [1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("prefix_lm", [True, False])
def test_mask_equals_reference_on_random_cases(prefix_lm):
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        batch, length = (
            int(torch.randint(1, 5, (1,), generator=generator)),
            int(torch.randint(1, 12, (1,), generator=generator)),
        )
        target = random_target_mask(generator, batch, length)
        ours = prefix_lm_mask(target, prefix_lm)
        ref = reference_attention_mask(target, prefix_lm)
        last = torch.where(target, torch.arange(length), -1).max(dim=1).values
        for row in range(batch):  # the contract: every non-padding row
            keep = slice(0, int(last[row]) + 1)
            assert torch.equal(ours[row, keep], ref[row, keep])
        assert torch.equal(ours, ref)  # padding rows happen to match too
        assert bool(ours.any(dim=-1).all()), "no row may be all-False"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ([[False, True, True], [False, False, False]], "row 1 has no target"),
        ([[True, True, False], [True, False, True]], "row 1 has more than one run"),
    ],
)
def test_mask_rejects_rows_without_one_target_run(target, message):
    with pytest.raises(DataError, match=message):
        prefix_lm_mask(torch.tensor(target))


def test_mask_rejects_non_bool():
    with pytest.raises(DataError, match="bool"):
        prefix_lm_mask(torch.ones(2, 3))


# ---- vocabulary ----
def test_vocabulary_ids_and_targets():
    vocab = AcousticVocabulary(4096)
    assert (vocab.pad, vocab.special_decoder, vocab.start, vocab.end, vocab.size) == (4096, 4097, 4098, 4099, 4100)
    small = AcousticVocabulary(10)
    input_ids, labels = small.build_targets([torch.tensor([1, 2, 3]), torch.tensor([4]), None])
    assert input_ids.tolist() == [[12, 1, 2, 3], [12, 4, 13, 10], [12, 11, 13, 10]]
    assert labels.tolist() == [[1, 2, 3, 13], [4, 13, -100, -100], [11, 13, -100, -100]]
    with pytest.raises(DataError, match=r"codes_list\[1\].*outside the codebook"):
        small.build_targets([torch.tensor([1]), torch.tensor([10])])


def test_adapter_is_linear_relu_linear():
    adapter = Adapter(4, 3, hidden=5)
    x = torch.randn(2, 4)
    expected = adapter.fc2(torch.relu(adapter.fc1(x)))
    assert torch.equal(adapter(x), expected)
    assert Adapter(6, 2).fc1.out_features == 6


# ---- the model ----
def tiny_model(speaker_dim: int | None = None, **kwargs) -> AcousticGPT:
    torch.manual_seed(0)
    model = AcousticGPT(
        20, condition_dim=12, n_embd=32, n_layer=2, n_head=4, block_size=64, speaker_dim=speaker_dim, **kwargs
    )
    return model.eval()


def test_forward_shape_and_tied_head():
    model = tiny_model(speaker_dim=6)
    hidden = model(
        torch.randn(3, 5, 12), torch.ones(3, 5, dtype=torch.bool), torch.randint(0, 20, (3, 7)), torch.randn(3, 6)
    )
    assert hidden.shape == (3, 7, 32)
    assert model.wte.weight is model.head.weight and model.output_head() is model.head
    with pytest.raises(ConfigError, match="speaker"):
        model(torch.randn(3, 5, 12), None, torch.randint(0, 20, (3, 7)))


def test_targets_are_causal_and_prefix_is_bidirectional():
    model = tiny_model()
    condition, ids = torch.randn(2, 5, 12), torch.randint(0, 16, (2, 6))
    base = model(condition, None, ids)
    later = ids.clone()
    later[:, 4] = (later[:, 4] + 1) % 16
    changed = model(condition, None, later)
    torch.testing.assert_close(changed[:, :4], base[:, :4], rtol=0, atol=1e-6)
    assert (changed[:, 4:] - base[:, 4:]).abs().max() > 1e-4
    last = condition.clone()
    last[:, -1] += 1.0
    assert (model(last, None, ids)[:, 0] - base[:, 0]).abs().max() > 1e-4
    # bidirectional prefix: after one block, the FIRST condition position already reads the last one
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out[0][:, 0]))
    model(condition, None, ids), model(last, None, ids)
    handle.remove()
    assert (seen[0] - seen[1]).abs().max() > 1e-4


def test_speaker_conditions_the_output():
    model = tiny_model(speaker_dim=6)
    condition, ids, speaker = torch.randn(1, 5, 12), torch.randint(0, 16, (1, 4)), torch.randn(1, 6)
    assert (model(condition, None, ids, speaker) - model(condition, None, ids, speaker + 1)).abs().max() > 1e-4


def test_padded_condition_positions_change_nothing():
    model = tiny_model(speaker_dim=6)
    condition, ids, speaker = torch.randn(2, 5, 12), torch.randint(0, 16, (2, 6)), torch.randn(2, 6)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    base = model(condition, mask, ids, speaker)
    alone = model(condition[1:, :3], None, ids[1:], speaker[1:])
    torch.testing.assert_close(base[1:], alone, rtol=0, atol=1e-5)
    padded = torch.cat([condition, 100 * torch.randn(2, 4, 12)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    out = model(padded, padded_mask, ids, speaker)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, rtol=0, atol=1e-5)


def test_all_padded_condition_stays_finite():
    model = tiny_model()
    out = model(torch.randn(2, 4, 12), torch.zeros(2, 4, dtype=torch.bool), torch.randint(0, 16, (2, 3)))
    assert torch.isfinite(out).all()


def test_loss_ignores_pad_positions():
    model = tiny_model()
    vocab = model.vocabulary
    input_ids, labels = vocab.build_targets([torch.randint(0, 16, (6,)), torch.randint(0, 16, (2,))])
    assert (labels[input_ids == vocab.pad] == -100).all() and (labels == vocab.pad).sum() == 0
    hidden = model(torch.randn(2, 4, 12), None, input_ids)
    logits = hidden @ model.head.weight.T
    full = F.cross_entropy(logits.reshape(-1, vocab.size), labels.reshape(-1))
    keep = labels != -100
    assert int(keep.sum()) == 7 + 3
    only_real = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(full, only_real)
    fused = linear_cross_entropy(hidden, model.head.weight, labels)
    torch.testing.assert_close(fused.sum() / keep.sum(), full, rtol=1e-5, atol=1e-6)
    assert (fused[~keep] == 0).all()


def _sample_without_cache(model, condition, mask, max_new_tokens, generator, speaker=None, **kw):
    """Re-runs the full forward for every token (no cache), drawing through the model's own sampler."""
    vocab = model.vocabulary
    ids = torch.full((condition.shape[0], 1), vocab.start)
    finished = torch.zeros(condition.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(condition, mask, ids, speaker)[:, -1] @ model.head.weight.T
        token = torch.where(finished, vocab.end, model._sample(logits, kw["top_p"], kw["temperature"], generator))
        ids = torch.cat([ids, token[:, None]], dim=1)
        finished |= token == vocab.end
        if finished.all():
            break
    out = []
    for row in ids[:, 1:]:
        stop = (row == vocab.end).nonzero()
        out.append(row[: int(stop[0, 0])] if len(stop) else row)
    return out


@pytest.mark.parametrize(("top_p", "temperature"), [(1.0, 1.0), (0.5, 1.0), (None, 0.0)])
def test_generate_matches_uncached_loop_and_stops_at_end(top_p, temperature):
    model = tiny_model(speaker_dim=6)
    condition, speaker = torch.randn(4, 5, 12), torch.randn(4, 6)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 5, [True] * 4 + [False]])
    kw = {"top_p": top_p, "temperature": temperature}
    codes = model.generate(condition, mask, 60, generator=torch.Generator().manual_seed(3), speaker=speaker, **kw)
    expected = _sample_without_cache(model, condition, mask, 60, torch.Generator().manual_seed(3), speaker, **kw)
    assert [c.tolist() for c in codes] == [c.tolist() for c in expected]
    for item in codes:
        assert item.dtype == torch.long and ((item >= 0) & (item < 16)).all()
    if temperature == 1.0 and top_p == 1.0:  # near-uniform over 17 allowed ids: each item meets end early
        assert all(len(item) < 60 for item in codes)
        assert len({len(item) for item in codes}) > 1


def test_generate_never_emits_specials_and_stops_at_end():
    model = tiny_model()
    vocab = model.vocabulary
    with torch.no_grad():  # a constant final hidden state, so the head rows alone set the logits
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(torch.linspace(-1, 1, 32))
        direction = model.ln_f.bias
        model.head.weight[vocab.pad] = 50 * direction
        model.head.weight[vocab.special_decoder] = 40 * direction
        model.head.weight[vocab.start] = 40 * direction
        model.head.weight[5] = 10 * direction
    codes = model.generate(torch.randn(2, 3, 12), None, 8, temperature=0.0)
    assert [c.tolist() for c in codes] == [[5] * 8, [5] * 8]  # no special ids, never stopped
    with torch.no_grad():
        model.head.weight[vocab.end] = 20 * direction
    codes = model.generate(torch.randn(2, 3, 12), None, 8, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert [c.tolist() for c in codes] == [[], []]


def test_generate_validates_options():
    model = tiny_model()
    with pytest.raises(ConfigError, match="top_p"):
        model.generate(torch.randn(1, 3, 12), None, 4, top_p=0.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        model.generate(torch.randn(1, 3, 12), None, 65)


def test_state_dict_round_trip():
    model = tiny_model(speaker_dim=6)
    state = model.state_dict()
    other = AcousticGPT(20, condition_dim=12, n_embd=32, n_layer=2, n_head=4, block_size=64, speaker_dim=6).eval()
    other.load_state_dict(state)
    assert other.wte.weight is other.head.weight
    args = (torch.randn(2, 5, 12), None, torch.randint(0, 16, (2, 4)), torch.randn(2, 6))
    torch.testing.assert_close(other(*args), model(*args), rtol=0, atol=0)
