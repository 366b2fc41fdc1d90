"""Intuitive Fine-Tuning: the spec's toy values, a float64 loop reference of the authors' get_cumsum_weight
(both sides, every norm, with gradients), the greedy embedding mix at the right positions, gamma = lambda = 0
as plain SFT, the lambda schedules, and short TokenLM fits."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import DFT, NUPADataModule, TokenLM
from lightning_tokens.callbacks.ift import (
    IntuitiveFineTuning,
    discounted_cumsum,
    greedy_next_tokens,
    ift_lambda,
    ift_weights,
)
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.stats import OutputHead, TokenStats
from lightning_tokens.modules import LoRASettings, OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
TOY_P = [0.158445, 0.178949, 0.25]  # the spec's shared toy (NLL [1.84235, 1.720653, 1.386294])


# ---- the spec's toy ------------------------------------------------------------------------------------
def test_toy_weights_and_loss_match_the_spec():
    nll = -torch.tensor([TOY_P], dtype=torch.float64).log()
    weights = ift_weights(-nll, torch.ones(1, 3, dtype=torch.bool), gamma=0.95)
    torch.testing.assert_close(weights, torch.tensor([[1.549853, 0.995724, 0.454422]], dtype=torch.float64), atol=2e-6, rtol=0)
    assert (weights * nll).mean().item() == pytest.approx(1.732877, abs=1e-6)
    assert nll.mean().item() == pytest.approx(1.649766, abs=1e-6)  # SFT


def test_toy_through_token_stats_and_the_callback():
    """Logits whose label probabilities are the toy's, scored by TokenStats (shifted labels), weighted by the callback."""
    p = torch.tensor(TOY_P)
    rows = torch.stack([torch.tensor([q, (1 - q) / 3, (1 - q) / 3, (1 - q) / 3]).log() for q in p])
    logits = torch.cat([rows, torch.zeros(1, 4)]).unsqueeze(0)  # position t scores labels[t + 1]
    labels = torch.tensor([[-100, 0, 0, 0]])
    stats = TokenStats(labels, logits=logits)
    out = IntuitiveFineTuning().compute(stats, None)
    loss = (out.weights * stats.nll).sum() / stats.mask.sum()
    assert loss.item() == pytest.approx(1.732877, abs=2e-6)
    torch.testing.assert_close(out.weights[0, 1:], torch.tensor([1.549853, 0.995724, 0.454422]), atol=3e-6, rtol=0)


# ---- a float64 loop reference of get_cumsum_weight (TsinghuaC3I/Intuitive-Fine-Tuning@03adb93, src/trainers.py)
def _loop_cumsum(row, gamma, from_the_right):
    """Discounted sums of a list of 0-d tensors, one position at a time."""
    out, running = [None] * len(row), torch.zeros((), dtype=torch.float64)
    order = reversed(range(len(row))) if from_the_right else range(len(row))
    for i in order:
        running = row[i] + gamma * running
        out[i] = running
    return out


def _reference_weights(logps, mask, gamma, side, norm, propagation):
    """The authors' arithmetic written out element by element (the reference's layout: logps already 0 off
    the mask, one row per sequence)."""
    if gamma == 0:
        return torch.ones_like(logps)
    batch, length = logps.shape
    rows = []
    for b in range(batch):
        n = mask[b].sum().to(torch.float64)
        items = []
        for t in range(length):
            value = {"mask": mask[b, t].to(torch.float64), "loss": -logps[b, t] / n, "logps": -logps[b, t]}[propagation]
            items.append(value if mask[b, t] else torch.zeros((), dtype=torch.float64))
        rows.append(_loop_cumsum(items, gamma, from_the_right=side == "left"))
    if side == "left":
        cums = [[c if mask[b, t] else torch.zeros((), dtype=torch.float64) for t, c in enumerate(r)] for b, r in enumerate(rows)]
        transform = {"L1": lambda c: c, "L2": lambda c: c**2, "log": lambda c: torch.log(c + 1), "softmax": None}[norm]
    else:
        filled = [[c if mask[b, t] else torch.tensor(1e6, dtype=torch.float64) for t, c in enumerate(r)] for b, r in enumerate(rows)]
        shift = torch.stack([c for r in filled for c in r if c.item() != 0]).min()  # over the whole batch
        cums = [[c + shift for c in r] for r in filled]
        transform = {"L1": lambda c: 1 / c, "L2": lambda c: 1 / c**2, "log": lambda c: 1 / torch.log(c + 1), "softmax": None}[norm]
    out = []
    for b in range(batch):
        if norm == "softmax":
            values = torch.stack(cums[b]) if side == "left" else 1 / torch.stack(cums[b])
            weights = torch.softmax(values, dim=-1)
        else:
            weights = torch.stack([transform(c) for c in cums[b]])
        weights = weights * mask[b]
        out.append(weights * mask[b].sum() / weights.sum())
    return torch.stack(out)


def _random_case(seed, batch=4, length=9):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(batch, length, generator=g, dtype=torch.float64) * 4 - 0.01
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):  # a prompt, a response, padding
        start = int(torch.randint(0, 3, (), generator=g))
        end = int(torch.randint(start + 1, length + 1, (), generator=g))
        mask[b, start:end] = True
    return logps, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("norm", ["L1", "L2", "softmax", "log"])
@pytest.mark.parametrize("gamma", [0.95, 1.0, 0.5])
def test_weights_equal_the_float64_loop_reference_with_gradients(side, norm, gamma):
    logps, mask = _random_case(seed=hash((side, norm, gamma)) % 1000)
    for propagation in ("loss", "logps", "mask"):
        ours_in = logps.clone().requires_grad_()
        ref_in = logps.clone().requires_grad_()
        garbage = torch.where(mask, ours_in, ours_in - 7.0)  # ours ignores what lies off the mask
        ours = ift_weights(garbage, mask, gamma, side, norm, propagation)
        ref = _reference_weights(ref_in * mask, mask, gamma, side, norm, propagation)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
        if propagation == "mask":
            continue
        nll_ours, nll_ref = -(ours_in * mask), -(ref_in * mask)
        (ours * nll_ours).sum().backward()
        (ref * nll_ref).sum().backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("norm", ["L1", "softmax"])
def test_float32_and_the_library_layout(side, norm):
    """float32 input; labels-indexed layout with a never-scored column 0 (the reference drops it): same weights."""
    logps, mask = _random_case(seed=3)
    ref = _reference_weights(logps * mask, mask, 0.95, side, norm, "loss")
    padded = ift_weights(torch.cat([torch.zeros(4, 1), logps.float()], 1), torch.cat([torch.zeros(4, 1, dtype=torch.bool), mask], 1),
                         0.95, side, norm)
    assert padded.dtype == torch.float32 and (padded[:, 0] == 0).all()
    torch.testing.assert_close(padded[:, 1:].double(), ref, rtol=2e-6, atol=1e-6)


def test_edge_cases():
    logps, mask = _random_case(seed=4)
    mask[1] = False  # a row without tokens: zeros (the reference divides 0 by 0)
    for side in ("left", "right"):
        w = ift_weights(logps, mask, 0.95, side)
        assert torch.isfinite(w).all() and (w[1] == 0).all()
        rows = mask.any(-1)
        torch.testing.assert_close((w.sum(-1) / mask.sum(-1).clamp(min=1))[rows], torch.ones(int(rows.sum()), dtype=torch.float64))
    assert torch.equal(ift_weights(logps, mask, gamma=0.0), mask.double())  # SFT
    with pytest.raises(ConfigError, match="gamma must lie in"):
        ift_weights(logps, mask, gamma=1.5)
    with pytest.raises(ConfigError, match="side='middle'"):
        ift_weights(logps, mask, side="middle")


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_discounted_cumsum_across_blocks(gamma):
    x = torch.randn(3, 11, dtype=torch.float64)
    for reverse in (False, True):
        ref = torch.stack([torch.stack(_loop_cumsum(list(row), gamma, from_the_right=reverse)) for row in x])
        torch.testing.assert_close(discounted_cumsum(x, gamma, reverse=reverse, block=4), ref)


def test_greedy_next_tokens_in_chunks_equal_the_full_argmax():
    g = torch.Generator().manual_seed(0)
    rows, weight, bias = torch.randn(23, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    targets = torch.randint(0, 40, (23,), generator=g)
    ids, nll = greedy_next_tokens(rows, OutputHead(weight, bias), targets, chunk_size=5)
    logits = rows @ weight.T + bias
    assert torch.equal(ids, logits.argmax(-1))
    torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(logits, targets, reduction="none"))


# ---- the gradient through the weights --------------------------------------------------------------------
def _stats(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    head = torch.randn(12, 8, generator=g)
    labels = torch.randint(0, 12, (2, 6), generator=g)
    labels[:, :2] = -100
    return hidden, TokenStats(labels, hidden=hidden, head=OutputHead(head))


def test_gradient_flows_through_the_weights_unless_detached():
    hidden, stats = _stats()
    weights = IntuitiveFineTuning().compute(stats, None).weights
    assert weights.requires_grad
    (weights * stats.nll).sum().backward()
    through = hidden.grad.clone()

    hidden, stats = _stats()
    weights = IntuitiveFineTuning(detach_weights=True).compute(stats, None).weights
    assert not weights.requires_grad
    (weights * stats.nll).sum().backward()
    assert not torch.allclose(through, hidden.grad)
    # detached: the gradient is that of sum(sg(w) * nll)
    hidden2, stats2 = _stats()
    (weights.detach() * stats2.nll).sum().backward()
    torch.testing.assert_close(hidden.grad, hidden2.grad)


def test_sequence_reduction_is_the_references_mean_of_sequence_means():
    _, stats = _stats(1)
    stats.mask[0, 4:] = False  # unequal lengths
    stats = TokenStats(torch.where(stats.mask, stats.labels, -100), hidden=stats.hidden, head=stats.head)
    nll, n = stats.nll.detach(), stats.mask.sum(-1)
    plain = IntuitiveFineTuning().compute(stats, None).weights.detach()
    seq = IntuitiveFineTuning(reduction="sequence").compute(stats, None).weights.detach()
    reference = ((plain * nll).sum(-1) / n).mean()
    assert ((seq * nll).sum() / n.sum()).item() == pytest.approx(reference.item(), rel=1e-6)


# ---- the embedding mix ---------------------------------------------------------------------------------
def _tiny_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch", **kwargs)
    model.configure_model()
    return model


def _batch(model):
    g = torch.Generator().manual_seed(1)
    vocab = model.causal_lm.get_input_embeddings().weight.shape[0]
    input_ids = torch.randint(3, vocab, (2, 10), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, :6] = -100
    labels[1, 9] = -100  # padding at the end
    return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


def test_embedding_mix_puts_the_greedy_predictions_at_the_response_positions():
    model = _tiny_model()
    batch = _batch(model)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    method = IntuitiveFineTuning(max_lambda=0.3, min_lambda=0.3)
    method.on_train_batch_start(trainer, model, batch, 0)
    mix = batch["embedding_mix"]

    lm = model.causal_lm
    with torch.no_grad():
        greedy = lm(input_ids=batch["input_ids"]).logits.argmax(-1)  # greedy[:, t - 1] predicts position t
    response = batch["labels"] != -100
    response[:, 0] = False
    expected_tokens = batch["input_ids"].clone()
    expected_tokens[:, 1:] = torch.where(response[:, 1:], greedy[:, :-1], batch["input_ids"][:, 1:])
    assert torch.equal(mix["tokens"], expected_tokens)
    assert torch.equal(mix["weight"], response.float() * 0.3)
    assert (greedy[:, :-1][response[:, 1:]] != batch["input_ids"][:, 1:][response[:, 1:]]).any()  # a real test

    # hand-built inputs_embeds: (1 - λ)·E(x) + λ·E(ŷ) at the response positions, E(x) elsewhere
    emb = lm.get_input_embeddings().weight
    manual = emb[batch["input_ids"]].clone()
    manual[response] = 0.7 * emb[batch["input_ids"]][response] + 0.3 * emb[expected_tokens][response]
    with torch.no_grad():
        ours = model.hidden_states(batch)
        by_hand = lm.get_decoder()(inputs_embeds=manual, attention_mask=batch["attention_mask"]).last_hidden_state
        clean = model.hidden_states({k: v for k, v in batch.items() if k != "embedding_mix"})
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, clean)
    # causal: positions before the first mixed one are untouched
    torch.testing.assert_close(ours[0, :4], clean[0, :4])
    logs = method._logs
    assert logs["lambda"] == 0.3 and 0 <= float(logs["greedy_match"]) <= 1
    assert float(logs["clean_nll"]) == pytest.approx(
        torch.nn.functional.cross_entropy(lm(input_ids=batch["input_ids"]).logits[:, :-1][response[:, 1:]],
                                          batch["labels"][:, 1:][response[:, 1:]]).item(), rel=1e-4)


def test_a_reference_model_embeds_the_mix_with_its_own_embeddings():
    model, other = _tiny_model(0), _tiny_model(5)
    batch = _batch(model)
    batch["embedding_mix"] = {"tokens": torch.full_like(batch["input_ids"], 4), "weight": torch.full((2, 10), 0.5)}
    ref_lm = other.causal_lm
    emb = ref_lm.get_input_embeddings().weight
    manual = 0.5 * emb[batch["input_ids"]] + 0.5 * emb[batch["embedding_mix"]["tokens"]]
    with torch.no_grad():
        ours = model.hidden_states(batch, causal_lm=ref_lm)
        by_hand = ref_lm.get_decoder()(inputs_embeds=manual, attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)


def test_a_zero_weight_mix_is_the_plain_forward_bit_for_bit_with_gradients():
    model = _tiny_model()
    batch = _batch(model)
    plain = model.hidden_states(batch)
    plain.square().sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    batch["embedding_mix"] = {"tokens": torch.randint(0, 10, (2, 10)), "weight": torch.zeros(2, 10)}
    mixed = model.hidden_states(batch)
    mixed.square().sum().backward()
    assert torch.equal(plain, mixed)
    for a, p in zip(plain_grads, model.parameters()):
        assert torch.equal(a, p.grad)


def test_bad_mix_shapes_are_refused():
    model = _tiny_model()
    batch = _batch(model)
    batch["embedding_mix"] = {"tokens": torch.zeros(2, 9, dtype=torch.long), "weight": torch.zeros(2, 9)}
    with pytest.raises(ConfigError, match="indexed like input_ids"):
        model.hidden_states(batch)


# ---- lambda --------------------------------------------------------------------------------------------
def test_lambda_schedules():
    assert ift_lambda(0) == 0.2 and ift_lambda(10_000) == 0.2  # static, the paper's
    values = [ift_lambda(s, 0.0, 0.4, "linear", lambda_warmup_steps=100) for s in (0, 25, 100, 500)]
    assert values == pytest.approx([0.0, 0.1, 0.4, 0.4])
    noisy = [ift_lambda(s, 0.2, 0.2, None, lambda_disturb="normal", disturb_std=0.5, seed=3) for s in range(400)]
    assert all(0.0 <= v <= 1.0 for v in noisy) and len(set(noisy)) > 300
    assert sum(noisy) / len(noisy) == pytest.approx(0.2, abs=0.02)  # E[λ(1 + 0.5 ε)] = λ (clamping aside)
    eps = torch.randn((), generator=torch.Generator().manual_seed(3 + 7), dtype=torch.float64).item()
    assert noisy[7] == pytest.approx(min(max(0.2 + eps * 0.5 * 0.2, 0.0), 1.0))
    assert ift_lambda(0, 0.9, 0.9, lambda_disturb="normal", disturb_std=100.0, seed=0) in (0.0, 1.0)  # clamped


def test_lambda_depends_on_the_step_alone_so_a_resume_is_exact():
    first = IntuitiveFineTuning(lambda_disturb="normal", lambda_schedule="linear", min_lambda=0.0, max_lambda=0.5, lambda_warmup_steps=4)
    run = [first.lambda_at(s) for s in range(10)]
    resumed = IntuitiveFineTuning(lambda_disturb="normal", lambda_schedule="linear", min_lambda=0.0, max_lambda=0.5, lambda_warmup_steps=4)
    resumed.load_state_dict(first.state_dict())
    assert first.state_dict() == {}  # no state: λ is a function of trainer.global_step, which checkpoints restore
    assert [resumed.lambda_at(s) for s in range(6, 10)] == run[6:]


def test_bad_settings():
    with pytest.raises(ConfigError, match="gamma"):
        IntuitiveFineTuning(gamma=-0.1)
    with pytest.raises(ConfigError, match="max_lambda"):
        IntuitiveFineTuning(max_lambda=1.5)
    with pytest.raises(ConfigError, match="lambda_schedule='cosine'"):
        IntuitiveFineTuning(lambda_schedule="cosine")
    with pytest.raises(ConfigError, match="propagation_norm"):
        IntuitiveFineTuning(propagation_norm="L3")
    with pytest.raises(ConfigError, match="reduction"):
        IntuitiveFineTuning(reduction="batch")


def test_setup_refuses_modules_without_the_first_pass_or_with_rollouts():
    class Plain(pl.LightningModule):
        pass

    class Rollouts(pl.LightningModule):
        rollout = None

        def hidden_states(self, batch):
            return None

        def output_head(self):
            return None

    method = IntuitiveFineTuning()
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[method], enable_progress_bar=False)
    with pytest.raises(ConfigError, match="hidden_states and output_head"):
        method.setup(trainer, Plain(), "fit")
    with pytest.raises(ConfigError, match="rollouts"):
        method.setup(trainer, Rollouts(), "fit")


# ---- fits ----------------------------------------------------------------------------------------------
def _fit(callbacks, steps=3, seed=0, lora=None, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    model = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=TINY,
                    optimizer=OptimizerSettings(lr=3e-3, warmup=0), lora=lora)
    data = NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=48, num_val=4, num_test=4, batch_size=8, max_length=48)
    settings = {"logger": False, "enable_checkpointing": False, **trainer_kwargs}
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=callbacks, **settings)
    trainer.fit(model, datamodule=data)
    return trainer, model


def test_gamma_zero_lambda_zero_is_plain_sft_exactly():
    _, sft = _fit([])
    trainer, ift = _fit([IntuitiveFineTuning(gamma=0.0, min_lambda=0.0, max_lambda=0.0)])
    for a, b in zip(sft.parameters(), ift.parameters()):
        assert torch.equal(a, b)
    assert trainer.callback_metrics["train/IntuitiveFineTuning/lambda"] == 0.0


def test_gamma_zero_is_sft_on_the_mixed_inputs():
    """With γ = 0 the weights are 1: the step is SFT's on the batch with the mix applied by hand."""
    model = _tiny_model()
    batch = _batch(model)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    method = IntuitiveFineTuning(gamma=0.0)
    method.on_train_batch_start(trainer, model, batch, 0)
    stats = TokenStats(batch["labels"], hidden=model.hidden_states(batch), head=model.output_head())
    out = method.compute(stats, model)
    assert torch.equal(out.weights[stats.mask], torch.ones(int(stats.mask.sum())))


def test_token_lm_trains_with_ift():
    trainer, _ = _fit([IntuitiveFineTuning(lambda_schedule="linear", min_lambda=0.1, max_lambda=0.3, lambda_warmup_steps=2,
                                           lambda_disturb="normal")])
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    for key in ("lambda", "greedy_match", "clean_nll", "max_weight"):
        assert f"train/IntuitiveFineTuning/{key}" in metrics
    assert float(metrics["train/IntuitiveFineTuning/lambda"]) == pytest.approx(ift_lambda(2, 0.1, 0.3, "linear", 2, "normal", 0.5, 0), rel=1e-6)
    assert not math.isclose(float(metrics["train/loss"]), float(metrics["train/nll"]), rel_tol=1e-6)


def test_lora_fit_composed_with_dft():
    trainer, model = _fit([IntuitiveFineTuning(), DFT()], steps=2, lora=LoRASettings(r=4))
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "train/DFT/mean_weight" in metrics
    assert trainer.global_step == 2


def test_resumed_fit_gets_the_uninterrupted_lambdas(tmp_path):
    class Record(pl.Callback):
        def __init__(self, method):
            self.method, self.values = method, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(self.method._logs["lambda"])

    def run(steps, folder, ckpt=None):
        method = IntuitiveFineTuning(lambda_disturb="normal", disturb_std=0.5, seed=7)
        record = Record(method)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0, every_n_train_steps=2)
        pl.seed_everything(0, verbose=False)
        model = TokenLM(model="tiny-llama", tokenizer="char", loss_backend="torch", model_config=TINY)
        data = NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=48, num_val=4, num_test=4, batch_size=8, max_length=48)
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_val_batches=0, callbacks=[method, record, checkpoint], default_root_dir=str(tmp_path))
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        return record.values

    full = run(4, "full")
    run(2, "first_half")
    resumed = run(4, "second_half", ckpt=str(tmp_path / "first_half" / "last.ckpt"))
    assert len(full) == 4 and len(resumed) == 2 and len(set(full)) == 4
    assert resumed == full[2:]
