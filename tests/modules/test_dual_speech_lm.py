"""DualSpeechLM: vocabulary extension, task formatting, Chain-of-Condition, the two token-loss streams,
training, exact resume and inference (speech → text, text → speech tokens → codec tokens → WAV)."""

from __future__ import annotations

import json
from collections import Counter

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens.callbacks import DFT
from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.models.presets import build_config
from lightning_tokens.models.tokenizers import build_char_tokenizer
from lightning_tokens.modules import LoRASettings, OptimizerSettings
from lightning_tokens.modules.speech import AcousticSettings, DualSpeechLM, SpeechSampling
from lightning_tokens.modules.speech.dual_lm import condition_choice
from lightning_tokens.modules.speech.formatting import SpeechVocabulary, extend_tokenizer, format_speech_example
from lightning_tokens.datamodules.speech import collate_speech
from tests.speech_fixtures import RecordsDataModule, speech_records

K = 16
TINY_LM = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}
TINY_ACOUSTIC = AcousticSettings(codec="tiny-encodec", n_embd=32, n_layer=1, n_head=2, block_size=256)


def _model(acoustic: AcousticSettings | None = TINY_ACOUSTIC, **kwargs) -> DualSpeechLM:
    options = dict(model="tiny-llama", tokenizer="char", model_config=TINY_LM, speech_codebook_size=K, acoustic=acoustic,
                   max_new_tokens=8)
    return DualSpeechLM(**{**options, **kwargs})


def _trainer(tmp_path, steps: int, **kwargs) -> pl.Trainer:
    options = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=str(tmp_path))
    return pl.Trainer(**{**options, **kwargs})


def test_vocabulary_extension_keeps_the_text_embeddings_of_a_pretrained_model(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = str(tmp_path / "text_lm")
    torch.manual_seed(0)
    text_lm = AutoModelForCausalLM.from_config(build_config("tiny-llama", 100, TINY_LM))
    text_lm.save_pretrained(folder)
    model = DualSpeechLM(model=folder, tokenizer="char", speech_codebook_size=K, acoustic=None)
    model.configure_model()
    embeddings = model.causal_lm.get_input_embeddings().weight
    assert embeddings.shape[0] == 100 + K + 2 == len(model.tokenizer)
    torch.testing.assert_close(embeddings[:100], text_lm.get_input_embeddings().weight, rtol=0, atol=0)
    vocab = model.speech_vocabulary
    assert (vocab.offset, vocab.open_id, vocab.close_id) == (100, 100 + K, 101 + K)


def test_task_prompts_put_speech_inline_for_understanding_and_in_the_labels_for_generation():
    tok = extend_tokenizer(build_char_tokenizer(), K)
    vocab = SpeechVocabulary.from_tokenizer(tok, K)
    prompt, answer = format_speech_example("asr", "hi", [1, 2], tok, vocab)
    assert tok.decode(prompt) == "USER: <audio><a_1><a_2></audio> Transcribe the audio.\nASSISTANT: "
    assert tok.decode(answer) == "hi</s>"
    prompt, answer = format_speech_example("tts", "hi", [5], tok, vocab)
    assert tok.decode(prompt) == "USER: Read aloud: hi\nASSISTANT: "
    assert answer == [vocab.open_id, vocab.offset + 5, vocab.close_id, tok.eos_token_id]
    with pytest.raises(DataError, match="outside the speech codebook"):
        format_speech_example("asr", "hi", [K], tok, vocab)
    with pytest.raises(DataError, match="task 'vc'"):
        format_speech_example("vc", "hi", [1], tok, vocab)


def test_chain_of_condition_draws_follow_the_probabilities_and_depend_only_on_seed_step_and_example():
    draws = Counter(condition_choice(3, step, f"u{i}") for step in range(60) for i in range(100))
    total = sum(draws.values())
    assert abs(draws["question"] / total - 0.33) < 0.02
    assert abs(draws["answer"] / total - 0.33) < 0.02
    assert abs(draws["both"] / total - 0.34) < 0.02
    assert condition_choice(3, 7, "u1") == condition_choice(3, 7, "u1")
    only_both = {condition_choice(0, s, "x", (0.0, 0.0, 1.0)) for s in range(50)}
    assert only_both == {"both"}


def test_bad_settings_fail_early_naming_the_field():
    with pytest.raises(ConfigError, match="condition_probabilities"):
        _model(condition_probabilities=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="speech_codebook_size"):
        _model(speech_codebook_size=0)
    model = _model(acoustic=None)
    with pytest.raises(DataError, match="speech_tokens"):
        model.format_batch({k: v for k, v in collate_speech(speech_records(2, 16000, K)).items() if k != "speech_tokens"})


def test_a_training_step_is_the_lm_token_loss_plus_the_acoustic_token_loss(tmp_path):
    torch.manual_seed(0)
    model = _model()
    data = RecordsDataModule(count=4, codebook_size=K, batch_size=4)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(model, datamodule=data)  # builds everything through the real hooks
    model.eval()
    batch = model.on_after_batch_transfer(collate_speech(data.records), 0)
    with torch.no_grad():
        hidden = model.hidden_states(batch)
        logits = model.causal_lm.get_output_embeddings()(hidden)
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        assert float(model.token_loss(batch["labels"], hidden=hidden, head=model.causal_lm.get_output_embeddings(), batch=batch)) == pytest.approx(float(lm), rel=1e-5)
        # the acoustic stream: cross-entropy of the decoder on the codec tokens of the tts rows only
        rows = torch.nonzero(batch["is_generation"]).flatten()
        assert rows.tolist() == [1, 3]
        codes = model.codec.encode(batch["audio"][rows], batch["audio_lengths"][rows])
        input_ids, labels = model.acoustic_vocabulary.build_targets(codes)
        assert (labels != -100).sum() == sum(len(c) + 1 for c in codes)  # the codes and the end token
        condition, mask = model.acoustic_condition(batch, hidden, rows)
        assert mask.sum(1).tolist() == [int((batch["question_mask"][r] | batch["answer_mask"][r]).sum()) for r in rows]
        out = model.acoustic_decoder(condition, mask, input_ids)
        head = model.acoustic_decoder.output_head()
        expected = torch.nn.functional.cross_entropy((out @ head.weight.T + (head.bias if head.bias is not None else 0)).flatten(0, 1), labels.flatten(), ignore_index=-100)
        assert float(model.acoustic_loss(batch, hidden)) == pytest.approx(float(expected), rel=1e-5)


def test_training_lowers_both_losses_and_logs_the_acoustic_stream_with_token_methods(tmp_path):
    torch.manual_seed(0)
    model = _model(optimizer=OptimizerSettings(lr=3e-3, warmup=0))
    data = RecordsDataModule(count=8, codebook_size=K, batch_size=4)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            losses.append((float(metrics["train/nll"]), float(metrics["train/acoustic/nll"])))

    trainer = _trainer(tmp_path, 30, callbacks=[Record(), DFT()])
    trainer.fit(model, datamodule=data)
    assert any(k.startswith("train/acoustic/DFT/") for k in trainer.callback_metrics)  # methods weight both streams
    first, last = losses[:2], losses[-2:]
    assert sum(l for l, _ in last) < 0.7 * sum(l for l, _ in first)
    assert sum(a for _, a in last) < 0.8 * sum(a for _, a in first)


def test_validation_reports_cer_and_predict_writes_text_and_wav(tmp_path):
    torch.manual_seed(0)
    model = _model(prediction_dir=str(tmp_path / "wavs"), sampling=SpeechSampling(max_speech_tokens=6, max_acoustic_tokens=12))
    data = RecordsDataModule(count=8, codebook_size=K, batch_size=4)
    trainer = _trainer(tmp_path, 2, limit_val_batches=1)
    trainer.fit(model, datamodule=data)
    assert 0.0 <= float(trainer.callback_metrics["val/cer"])
    assert 0.0 <= float(trainer.callback_metrics["val/sqa_accuracy"]) <= 1.0
    assert "val/acoustic_loss" in trainer.callback_metrics
    outputs = [row for batch in trainer.predict(model, datamodule=data) for row in batch]
    assert [o["task"] for o in outputs[:4]] == ["asr", "tts", "sqa", "tts"]
    assert isinstance(outputs[0]["prediction"], str)
    speech = outputs[1]
    assert all(0 <= t < K for t in speech["speech_tokens"]) and len(speech["speech_tokens"]) <= 6
    assert all(0 <= t < model.codec.codebook_size for t in speech["acoustic_tokens"])
    if speech["acoustic_tokens"]:
        import soundfile

        audio, rate = soundfile.read(speech["audio_file"])
        assert rate == model.codec.sample_rate and len(audio) > 0
    json.dumps(outputs)  # the prediction writer stores them as JSONL


def test_resume_is_exact(tmp_path):
    # one batch an epoch: a plain DataLoader restarts an interrupted epoch from its first batch, which is then
    # the right one (the mid-epoch position is the datamodule's to save: SpeechDataModule's tests)
    data = RecordsDataModule(count=4, codebook_size=K, batch_size=4)

    def run(steps: int, ckpt: str | None = None, save: str | None = None, seed: int = 0) -> dict:
        torch.manual_seed(seed)
        model = _model(optimizer=OptimizerSettings(lr=1e-3, warmup=0, min_lr_ratio=1.0))  # a schedule that ignores max_steps
        trainer = _trainer(tmp_path, steps)
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return {k: v.clone() for k, v in model.state_dict().items()}

    straight = run(4)
    path = str(tmp_path / "half.ckpt")
    run(2, save=path)
    resumed = run(4, ckpt=path, seed=123)  # nothing after the checkpoint may depend on the global seed
    assert straight.keys() == resumed.keys()
    assert any(k.startswith("acoustic_decoder.") for k in straight)
    assert not any("codec" in k for k in straight)  # the frozen codec is rebuilt, never saved
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_lora_trains_the_new_vocabulary_rows(tmp_path):
    torch.manual_seed(0)
    model = _model(acoustic=None, lora=LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.configure_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert not any("mlp" in n and "lora" not in n for n in trainable)


def test_sample_rate_mismatch_with_the_codec_is_refused(tmp_path):
    model = _model()
    data = RecordsDataModule(count=4, sample_rate=16000, codebook_size=K)
    with pytest.raises(ConfigError, match="data.sample_rate=16000"):
        _trainer(tmp_path, 1).fit(model, datamodule=data)


def test_the_acoustic_loss_runs_on_a_batch_without_generation_rows(tmp_path):
    torch.manual_seed(0)
    model = _model()
    model.configure_model()
    records = [r for r in speech_records(8, 24000, K) if r["task"] != "tts"][:2]
    batch = model.on_after_batch_transfer(collate_speech(records), 0)
    hidden = model.hidden_states(batch)
    loss = model.acoustic_loss(batch, hidden)
    assert float(loss) == 0.0
    loss.backward()
    assert all(p.grad is not None for p in model.acoustic_decoder.parameters())



def test_codec_cache_gives_the_same_tokens_without_running_the_codec_again():
    plain = _model()
    cached = _model(acoustic=AcousticSettings(**{**TINY_ACOUSTIC.__dict__, "cache_size": 8}))
    batch = collate_speech(speech_records(3, 24000, K, seed=4))
    expected = plain.codec_tokens(batch["audio"], batch["audio_lengths"])
    calls = []
    original = cached.codec.encode
    cached.codec.encode = lambda *args: calls.append(1) or original(*args)
    first = cached.codec_tokens(batch["audio"], batch["audio_lengths"])
    again = cached.codec_tokens(batch["audio"][[2, 0]], batch["audio_lengths"][[2, 0]])
    assert len(calls) == 1 and len(cached.codec_cache) == 3
    for a, b in zip(first, expected):
        assert torch.equal(a, b)
    assert torch.equal(again[0], expected[2]) and torch.equal(again[1], expected[0])


def test_an_acoustic_budget_beyond_the_decoder_is_refused_at_once():
    with pytest.raises(ConfigError, match=r"sampling.max_acoustic_tokens=1200.*acoustic.block_size=256"):
        _model(sampling=SpeechSampling(max_acoustic_tokens=1200))
