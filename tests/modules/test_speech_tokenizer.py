"""SpeechTokenizer (USTokenizer): loss weights, EMA codebook, token rate, batching, frozen LM, checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.modules.causal_lm import OptimizerSettings
from lightning_tokens.modules.speech.tokenizer import FROZEN_PREFIXES, SpeechTokenizer, _hidden_size, tokenizer_loss
from tests.helpers import trainer

TINY = dict(codebook_size=16, code_dim=16, hidden_dim=32, num_layers=1)
FAST = OptimizerSettings(lr=3e-3, weight_decay=0.05, betas=(0.9, 0.999), warmup=0, min_lr_ratio=1.0)


def _model(**kwargs) -> SpeechTokenizer:
    torch.manual_seed(0)
    model = SpeechTokenizer(**{**TINY, "optimizer": FAST, **kwargs})
    model.configure_model()
    return model


def _batch(lengths: list[int], seed: int = 0, tasks: list[str] | None = None, texts: list[str] | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    audio = torch.zeros(len(lengths), max(lengths))
    t = torch.arange(max(lengths)) / 16000
    for i, n in enumerate(lengths):  # a tone plus noise, different per item
        audio[i, :n] = 0.3 * torch.sin(2 * math.pi * (200 + 150 * i) * t[:n]) + 0.05 * torch.randn(n, generator=gen)
    size = len(lengths)
    return {
        "audio": audio,
        "audio_lengths": torch.tensor(lengths),
        "text": texts or [f"word {i}" for i in range(size)],
        "task": tasks or ["asr"] * size,
        "ids": [str(i) for i in range(size)],
        "question": [None] * size,
    }


def _loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False)


def test_loss_reference_weights():
    assert tokenizer_loss(0.1, 0.02, 2.0) == pytest.approx(11.0)
    assert tokenizer_loss(0.1, 0.02, 2.0, understanding_weight=0.0) == pytest.approx(1.0)
    assert tokenizer_loss(0.1, 0.02, 2.0, 2.0, 10.0, 1.0) == pytest.approx(2.4)


def test_ema_update_moves_embed_avg_by_a_fifth_of_the_batch_sum():
    model = _model(understanding_weight=0.0)
    book = model.vq._codebook
    assert book.decay == 0.8 and book.eps == 1e-5
    book.embed_avg.zero_()
    book.cluster_size.zero_()
    embed = book.embed.clone()
    latents = torch.randn(2, 5, 16)
    tokens = torch.tensor([5, 3])  # the last two frames of item 1 are padding
    model.train()
    _, codes, _ = model.quantize(latents, tokens)
    valid = codes >= 0
    assert valid.sum() == 8 and torch.all(codes[1, 3:] == -1)
    # nearest code by L2 against the codebook before the update
    nearest = torch.cdist(latents[valid], embed[0]).argmin(-1)
    assert torch.equal(codes[valid], nearest)
    onehot = F.one_hot(nearest, 16).float()
    assert torch.allclose(book.embed_avg[0], 0.2 * onehot.T @ latents[valid], atol=1e-6)
    assert torch.allclose(book.cluster_size[0], 0.2 * onehot.sum(0), atol=1e-6)
    # embed = embed_avg / Laplace-smoothed cluster sizes (reference formula)
    n = book.cluster_size[0]
    smoothed = (n + 1e-5) / (n.sum() + 16 * 1e-5) * n.sum()
    assert torch.allclose(book.embed[0], book.embed_avg[0] / smoothed[:, None], atol=1e-5)
    # eval mode: no update
    before = book.embed_avg.clone()
    model.eval()
    model.quantize(latents, tokens)
    assert torch.equal(book.embed_avg, before)


def test_token_rate_and_batches_equal_items_alone():
    model = _model(understanding_weight=0.0).eval()
    batch = _batch([32000, 20000, 9000])
    codes = model.encode(batch["audio"], 16000, batch["audio_lengths"])
    assert [len(c) for c in codes] == [50, 32, 15]  # ceil(len / 640): 25 tokens per second
    for i, n in enumerate(batch["audio_lengths"].tolist()):
        alone = model.encode(batch["audio"][i, :n], sample_rate=16000)
        assert torch.equal(alone[0], codes[i])
    features = model.decode_features(codes)
    assert [tuple(f.shape) for f in features] == [(100, 64), (64, 64), (30, 64)]
    # 1 s at 44.1 kHz is resampled to 16 kHz: 25 tokens
    assert len(model.encode(torch.randn(44100), sample_rate=44100)[0]) == 25


def test_reconstruction_only_loads_no_language_model():
    model = _model(understanding_weight=0.0)
    assert model.language_model is None and not hasattr(model, "to_llm")
    model.train()
    out = model.compute_losses(_batch([8000, 6000]))
    assert out["ce"] is None
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(model, _loader([_batch([8000, 6000])]))
    losses = fit.callback_metrics
    expected = tokenizer_loss(losses["train/commit"], losses["train/reconstruction"], 0.0)
    assert float(losses["train/loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert "train/understanding_ce" not in losses


def test_ce_gradients_reach_the_encoder_not_the_language_model():
    model = _model()
    model.train()
    lm = model.language_model
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    out = model.compute_losses(_batch([8000, 5000, 4000], tasks=["asr", "sqa", "asr"]))
    out["ce"].backward()
    for module in (model.downsample, model.encoder, model.to_llm, model.llm_conv):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in lm.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())  # CE does not reach the reconstruction branch
    # CE is the per-token mean over the transcript tokens (each "word i" + eos = 7 tokens, 2 asr records)
    assert 0 < float(out["ce"]) < 2 * math.log(len(model.text_tokenizer))


def test_only_understanding_tasks_train_ce():
    model = _model()
    model.train()
    out = model.compute_losses(_batch([8000, 6000], tasks=["sqa", "sqa"], texts=["", ""]))
    assert out["ce"] is None and out["recon"] > 0


def test_bad_inputs_name_the_field():
    model = _model(understanding_weight=0.0)
    with pytest.raises(DataError, match="audio"):
        model.compute_losses({"audio": torch.zeros(8000), "audio_lengths": torch.tensor([8000])})
    with pytest.raises(DataError, match="audio_lengths"):
        model.compute_losses({"audio": torch.zeros(2, 8000), "audio_lengths": torch.tensor([8000])})
    with pytest.raises(DataError, match="sample_rate"):
        model.encode(torch.zeros(8000), sample_rate=0)
    with pytest.raises(ConfigError, match="hidden_size"):
        _hidden_size(SimpleNamespace(config=SimpleNamespace()), "mystery-lm")
    with_lm = _model()
    with pytest.raises(DataError, match="text"):
        with_lm.compute_losses({**_batch([8000]), "text": [""]})
    with pytest.raises(ConfigError, match="codebook_decay"):
        SpeechTokenizer(codebook_decay=1.0)


def test_checkpoint_drops_frozen_networks_and_reloads(tmp_path):
    model = _model()
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(model, _loader([_batch([8000, 6000])]))
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith(FROZEN_PREFIXES) for k in state)
    assert "vq._codebook.embed_avg" in state and "vq._codebook.cluster_size" in state
    loaded = SpeechTokenizer.load_from_checkpoint(path).eval()
    batch = _batch([8000])
    assert torch.equal(loaded.encode(batch["audio"], 16000)[0], model.eval().encode(batch["audio"], 16000)[0])


def _fit(model: SpeechTokenizer, batches: list[dict], steps: int, ckpt: str | None = None, **kwargs):
    fit = trainer(max_steps=steps, limit_val_batches=0, **kwargs)
    fit.fit(model, _loader(batches), ckpt_path=ckpt)
    return fit


def test_exact_resume(tmp_path):
    # one batch per epoch: a plain DataLoader restarts an interrupted epoch from its first batch, which is
    # then the right one (mid-epoch position is the datamodule's to save, not this module's)
    batches = [_batch([8000, 5000, 6000], seed=1, tasks=["asr", "sqa", "asr"])]
    straight = _model()
    _fit(straight, batches, 4)
    first = _model()
    fit = _fit(first, batches, 2)
    path = str(tmp_path / "half.ckpt")
    fit.save_checkpoint(path)
    resumed = _model()
    torch.manual_seed(123)  # nothing after the checkpoint may depend on the global seed
    _fit(resumed, batches, 4, ckpt=path)
    ours, theirs = resumed.state_dict(), straight.state_dict()
    assert ours.keys() == theirs.keys()
    assert "vq._codebook.embed_avg" in ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_short_fit_reduces_the_loss():
    batches = [_batch([8000, 6000], seed=3), _batch([7000, 8000], seed=4)]
    model = _model()

    def total() -> float:
        model.eval()
        with torch.no_grad():
            values = []
            for batch in batches:
                out = model.compute_losses(batch)
                values.append(float(tokenizer_loss(0.0, out["recon"], out["ce"])))
        return sum(values) / len(values)

    before = total()
    _fit(model, batches, 8)
    after = total()
    assert after < 0.8 * before, (before, after)


def test_validation_logs_rate_usage_and_table():
    model = _model()
    fit = trainer(max_steps=1, num_sanity_val_steps=0, val_check_interval=1)
    fit.fit(model, _loader([_batch([32000, 16000])]), _loader([_batch([32000, 16000], seed=5)]))
    metrics = fit.callback_metrics
    # 2 s → 50 tokens, 1 s → 25: 75 tokens for 3 s
    assert float(metrics["val/tokens_per_second_of_audio"]) == pytest.approx(25.0)
    assert 0 < float(metrics["val/codebook_usage"]) <= 1
    assert 1 <= float(metrics["val/perplexity"]) <= 16
    assert {"val/reconstruction", "val/understanding_ce"} <= set(metrics)
    # train/loss is the whole objective (token_loss's own train/loss, the CE alone, is overwritten)
    total = tokenizer_loss(metrics["train/commit"], metrics["train/reconstruction"], metrics["train/understanding_ce"])
    assert float(metrics["train/loss"]) == pytest.approx(float(total), rel=1e-5)
    assert float(metrics["train/loss"]) != pytest.approx(float(metrics["train/understanding_ce"]))


def test_feature_cache_gives_the_same_features_and_skips_the_frozen_encoder():
    plain = _model(understanding_weight=0.0)
    cached = _model(understanding_weight=0.0, feature_cache_size=8)
    batch = _batch([8000, 5000, 12000], seed=2)
    expected, frames = plain.whisper_features(batch["audio"], batch["audio_lengths"])
    calls = []
    cached.whisper_encoder.register_forward_hook(lambda *args: calls.append(1))
    first, _ = cached.whisper_features(batch["audio"], batch["audio_lengths"])
    assert len(calls) == 1
    # the same utterances in another order and padding: served from the cache
    reordered, frames2 = cached.whisper_features(batch["audio"][[2, 0]], batch["audio_lengths"][[2, 0]])
    assert len(calls) == 1
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(reordered[0, : int(frames[2])], expected[2, : int(frames[2])], rtol=0, atol=0)
    assert len(cached.feature_cache) == 3
    with pytest.raises(ConfigError, match="feature_cache_size"):
        SpeechTokenizer(feature_cache_size=-1)
