"""JS divergence, truncation, top-k overlap, cross-sampling and the divergence report."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tokens.analysis import cross_sample, divergence_report, js_divergence, top_k_overlap, trajectory_divergence, truncate_logprobs
from lightning_tokens.core.errors import ConfigError


def _naive_js(p, q):
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_js_matches_the_spec_value_and_a_naive_float64_sum():
    p, q = [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]
    assert js_divergence(torch.tensor(p).log(), torch.tensor(q).log()).item() == pytest.approx(0.147097, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 50, generator=g).softmax(-1).double(), torch.randn(4, 50, generator=g).softmax(-1).double()
    got = js_divergence(a.log(), b.log())
    expected = torch.tensor([_naive_js(x.tolist(), y.tolist()) for x, y in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_js_is_defined_and_bounded_for_disjoint_truncated_supports():
    p = torch.tensor([0.0, 0.0, 1.0]).log()  # -inf entries, as a top-k sampler leaves them
    q = torch.tensor([1.0, 0.0, 0.0]).log()
    assert js_divergence(p, q).item() == pytest.approx(math.log(2), abs=1e-12)
    assert js_divergence(p, p).item() == 0.0


def test_truncation_keeps_what_the_sampler_keeps():
    logp = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    assert truncate_logprobs(logp, top_k=2).exp().tolist() == pytest.approx([4 / 7, 3 / 7, 0, 0])
    # top-p 0.75: 0.4 + 0.3 = 0.7 < 0.75, so the third token (crossing it) stays too
    assert truncate_logprobs(logp, top_p=0.75).exp().tolist() == pytest.approx([4 / 9, 3 / 9, 2 / 9, 0])
    assert truncate_logprobs(logp).exp().tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ConfigError, match="top_p=0"):
        truncate_logprobs(logp, top_p=0.0)


def test_top_k_overlap():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    b = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert top_k_overlap(a, b, k=2).tolist() == [1.0, 0.0]


class _Fixed(torch.nn.Module):
    """A 'model' whose next-token logits depend only on the last token: logits = table[last token]."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_cross_sampling_switches_exactly_where_the_models_diverge():
    vocab = 4
    same = torch.zeros(vocab, vocab)
    same[:, 3] = 5.0  # both models like token 3 after anything ...
    other = same.clone()
    other[1] = torch.tensor([0.0, 0.0, 9.0, 0.0])  # ... except after token 1, where the intermediate wants 2
    prompts = torch.tensor([[0, 1], [0, 0]])
    mask = torch.ones_like(prompts)
    g = torch.Generator().manual_seed(0)
    tokens, switched, js = cross_sample(_Fixed(same), prompts, mask, 3, None, 0, _Fixed(other), epsilon=0.1, generator=g)
    assert switched[0, 0] and not switched[0, 1:].any() and not switched[1].any()
    assert tokens[0, 0] == 2  # drawn from the intermediate model (p = 0.9996)
    expected = js_divergence(F.log_softmax(same[1], -1), F.log_softmax(other[1], -1))
    assert js[0, 0].item() == pytest.approx(expected.item()) and js[1].abs().max() == 0
    plain, never, zero = cross_sample(_Fixed(same), prompts, mask, 3, None, 0, generator=torch.Generator().manual_seed(0))
    assert not never.any() and zero.abs().max() == 0


def test_sampling_stops_rows_at_eos_and_pads():
    table = torch.zeros(4, 4)
    table[:, 2] = 20.0  # always emits 2 = eos
    tokens, _, _ = cross_sample(_Fixed(table), torch.tensor([[1]]), torch.tensor([[1]]), 4, 2, 0)
    assert tokens.tolist() == [[2, 0, 0, 0]]


def test_trajectory_divergence_equals_full_logit_js_per_position():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2)
    base, tuned = LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 20, (2, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6] = -100
    stats = trajectory_divergence(base, tuned, ids, torch.ones_like(ids), labels, temperature=0.8)
    with torch.no_grad():
        lp = F.log_softmax(base(ids).logits[:, :-1] / 0.8, -1)
        lq = F.log_softmax(tuned(ids).logits[:, :-1] / 0.8, -1)
    expected = js_divergence(lp, lq)
    mask = stats["mask"]
    assert mask[:, 1:].equal(labels[:, 1:] != -100)
    torch.testing.assert_close(stats["js"][:, 1:][mask[:, 1:]], expected[mask[:, 1:]], rtol=1e-5, atol=1e-7)
    assert (stats["js"][~mask] == 0).all()
    same = trajectory_divergence(base, base, ids, torch.ones_like(ids), labels)
    assert same["js"].abs().max() < 1e-9 and (same["overlap"][same["mask"]] == 1).all()


def test_report_of_a_model_against_itself(tmp_path):
    table = torch.randn(6, 6)
    model = _Fixed(table)

    class Tok:
        eos_token_id, pad_token_id = 5, 0

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(str(int(t)) for t in r) for r in rows]

    batch = {"prompt_input_ids": torch.tensor([[0, 1], [2, 3]]), "prompt_attention_mask": torch.ones(2, 2, dtype=torch.long),
             "prompts": ["a", "b"], "answers": ["x", "y"]}
    reward = lambda completions, prompts, answers: [float(len(c) > 1) for c in completions]  # noqa: E731
    report = divergence_report(model, model, Tok(), [batch], reward, max_new_tokens=4)
    s = report.summary
    assert s["mean_js"] == 0 and s["near_zero_fraction"] == 1 and s["switched_fraction_forward"] == 0
    assert s["accuracy_base"] == s["accuracy_tuned"] == s["accuracy_forward"] == s["accuracy_backward"]
    paths = report.write(str(tmp_path / "out"))
    assert json.load(open(paths["summary.json"]))["examples"] == 2.0
    assert open(paths["tokens.csv"]).readline().strip() == "example,position,token,js,overlap,tuned_top1_base_prob"
    assert open(paths["divergence.png"], "rb").read(4) == b"\x89PNG"
