"""The speech recipe end to end through the CLI, on tiny models: make_speech_data → fit a SpeechTokenizer →
speech_tokens → fit DualSpeechLM → predict (transcripts and WAV files)."""

from __future__ import annotations

import json
import math

import pytest
import soundfile

from lightning_tokens.cli import cli, main

FAST = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--checkpoint.every_n_train_steps=2"]


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
    from lightning_tokens.datamodules.speech_synthesis import available_voices

    voices = [v for v in available_voices() if v.startswith("espeak:")]
    if not voices:
        pytest.skip("no espeak-ng voice: pip install 'lightning-tokens[speech-data]'")
    folder = tmp_path_factory.mktemp("speech")
    main(["make_speech_data", "--output_dir", str(folder / "data"), "--num_utterances", "12", "--seed", "3",
          "--voices", json.dumps(voices[:1]), "--val_fraction", "0.25"])
    return folder


@pytest.mark.slow
def test_speech_recipe_through_the_cli(speech_data):
    data, runs = speech_data / "data", speech_data / "runs"
    records = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert len(records) == 9 and {r["task"] for r in records} == {"asr", "tts", "sqa"}
    tokenizer = ["--config", "configs/speech_tokenizer.yaml", "--model.init_args.whisper=tiny-whisper",
                 "--model.init_args.max_source_positions=50", "--model.init_args.language_model=tiny-llama",
                 "--model.init_args.language_model_tokenizer=char", "--model.init_args.codebook_size=32",
                 "--model.init_args.hidden_dim=32", "--model.init_args.code_dim=16",
                 f"--data.init_args.train_file={data / 'train.jsonl'}", f"--data.init_args.val_file={data / 'val.jsonl'}"]
    cli(["fit", *tokenizer, *FAST, f"--output_dir={runs / 'tok'}"])
    ckpt = runs / "tok" / "checkpoints" / "last.ckpt"
    tokens = runs / "speech_tokens.jsonl"
    cli(["speech_tokens", *tokenizer, f"--ckpt_path={ckpt}", f"--output={tokens}", "--trainer.logger=false"])
    written = [json.loads(line) for line in tokens.read_text().splitlines()]
    assert [r["text"] for r in written] == [r["text"] for r in records]
    for row in written:  # 25 tokens a second of 16 kHz audio, codes in the codebook
        samples = soundfile.info(str(tokens.parent / row["audio"])).frames
        assert len(row["speech_tokens"]) == math.ceil(samples / 640)
        assert all(0 <= t < 32 for t in row["speech_tokens"])
    assert (runs / "speech_tokens.val.jsonl").exists()

    lm = ["--config", "configs/dual_speech_lm.yaml", "--model.init_args.speech_codebook_size=32",
          "--model.init_args.model_config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
          "--model.init_args.acoustic.n_embd=16", "--model.init_args.acoustic.n_layer=1",
          "--model.init_args.max_new_tokens=4", "--model.init_args.sampling.max_speech_tokens=4",
          "--model.init_args.sampling.max_acoustic_tokens=8", "--data.init_args.batch_size=4",
          f"--data.init_args.train_file={tokens}", f"--data.init_args.val_file={runs / 'speech_tokens.val.jsonl'}"]
    run = cli(["fit", *lm, *FAST, f"--output_dir={runs / 'lm'}"])
    assert "val/cer" in run.trainer.callback_metrics and "train/acoustic/loss" in run.trainer.callback_metrics
    out = runs / "predictions.jsonl"
    cli(["predict", *lm, f"--output_dir={runs / 'lm'}", f"--ckpt_path={runs / 'lm' / 'checkpoints' / 'last.ckpt'}",
         f"--predictions.output={out}"])
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(predictions) == 3
    for row in predictions:
        if row["task"] == "tts":
            assert "speech_tokens" in row
            if row.get("acoustic_tokens"):
                assert soundfile.info(row["audio_file"]).samplerate == 24000
        else:
            assert isinstance(row["prediction"], str)
