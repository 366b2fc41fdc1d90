"""Generation over image tokens: extract_codes (function and CLI), the codes datamodule (rows, class
dropout, split, errors), guided KV-cached sampling, a DFT fit on code batches, the predict grid."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_tokens.callbacks import DFT
from lightning_tokens.cli import cli
from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.datamodules.image_codes import (
    CodeVocabulary,
    ImageCodesDataModule,
    code_tokenizer_dir,
    extract_codes,
    load_codes,
    save_codes,
    write_code_tokenizer,
)
from lightning_tokens.datamodules.images import DigitImages, ImageDataModule, LabelledImages, collate_images
from lightning_tokens.modules.causal_lm import TokenLM
from lightning_tokens.modules.image_generation import cfg_scale_at, generate_codes, guided_logits, load_image_tokenizer
from lightning_tokens.modules.image_tokenizer import FlexibleImageTokenizer

GENERATOR_CONFIG = str(Path(__file__).parents[2] / "configs" / "retok_generator.yaml")
SMALL_LM = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}


def _tokenizer_config(folder: Path) -> str:
    """A tiny tokenizer (no teacher, no perceptual network) on 12 + 4 shape images."""
    config = folder / "tokenizer.yaml"
    config.write_text(
        "seed_everything: 0\ntrainer: {accelerator: cpu, logger: false, enable_progress_bar: false, max_steps: 1, limit_val_batches: 0}\n"
        "model:\n  class_path: lightning_tokens.modules.image_tokenizer.FlexibleImageTokenizer\n"
        "  init_args: {preset: tiny, semantic_teacher: null, perceptual_weight: 0.0, encoder_depth: 1, decoder_depth: 1, semantic_layer: 1}\n"
        "data:\n  class_path: lightning_tokens.datamodules.images.ImageDataModule\n"
        "  init_args: {sources: [shapes], image_size: 32, num_train: 12, num_val: 4, batch_size: 4, seed: 0}\n"
    )
    return str(config)


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory) -> str:
    """A tiny tokenizer after one training step of `lightning-tokens fit` (the checkpoint the CLI writes)."""
    folder = tmp_path_factory.mktemp("tok")
    cli(["fit", "--config", _tokenizer_config(folder), f"--output_dir={folder}", "--checkpoint.save_last=true"])
    return str(folder / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def image_tokenizer(tokenizer_ckpt) -> FlexibleImageTokenizer:
    return load_image_tokenizer(tokenizer_ckpt)


def _codes_file(folder: Path, rows: int = 400, num_classes: int = 3, codebook: int = 16, n: int = 8, ckpt: str | None = None, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, num_classes, (rows,), generator=g)
    tensors = {"codes": torch.randint(0, codebook, (rows, n), generator=g), "labels": labels}
    path = folder / "codes.safetensors"
    save_codes(path, tensors, codebook, num_classes, 32, ckpt)
    write_code_tokenizer(path, num_classes, codebook)  # as extract_codes does
    return str(path)


# ---- extraction ------------------------------------------------------------------------------------
def test_extract_codes_are_the_full_codes_with_their_classes(image_tokenizer):
    digits = DigitImages(32, indices=list(range(10)))
    loader = DataLoader(LabelledImages(digits), batch_size=4, collate_fn=collate_images)
    out = extract_codes(image_tokenizer, loader)
    images = torch.stack([digits[i] for i in range(10)])
    assert out["codes"].shape == (10, 32) and out["codes"].dtype == torch.int64
    assert torch.equal(out["codes"], image_tokenizer.encode(images))
    assert out["labels"].tolist() == [int(t) for t in digits.targets] == list(range(10))  # scans 0..9 are digits 0..9
    unlabelled = extract_codes(image_tokenizer, [{"images": images[:3]}])
    assert unlabelled["labels"].tolist() == [-1, -1, -1]


def test_codes_file_round_trip_and_bad_values(tmp_path):
    path = _codes_file(tmp_path, rows=5, ckpt="tok.ckpt")
    data = load_codes(path)
    assert (data.codebook_size, data.num_tokens, data.num_classes, data.image_size, data.tokenizer_ckpt) == (16, 8, 3, 32, "tok.ckpt")
    with pytest.raises(DataError, match="'codes'.*codebook_size=16"):
        save_codes(tmp_path / "bad.safetensors", {"codes": torch.full((2, 8), 16), "labels": torch.zeros(2, dtype=torch.long)}, 16, 3, 32, None)
    with pytest.raises(DataError, match="'labels'"):
        save_codes(tmp_path / "bad.safetensors", {"codes": torch.zeros(2, 8, dtype=torch.long), "labels": torch.tensor([0, 3])}, 16, 3, 32, None)
    # a file whose codes exceed its own metadata (written by hand) is refused on load, naming the field
    from safetensors.torch import save_file

    meta = {"codebook_size": "4", "num_tokens": "8", "num_classes": "3", "image_size": "32"}
    save_file({"codes": torch.full((2, 8), 7), "labels": torch.zeros(2, dtype=torch.long)}, str(tmp_path / "hand.safetensors"), metadata=meta)
    with pytest.raises(DataError, match="field 'codes'"):
        ImageCodesDataModule(codes_file=str(tmp_path / "hand.safetensors"))


# ---- the datamodule --------------------------------------------------------------------------------
def test_rows_are_class_then_codes_with_labels_on_codes(tmp_path):
    path = _codes_file(tmp_path)
    data = ImageCodesDataModule(codes_file=path, max_tokens=5, class_dropout=0.0, num_val=40, batch_size=8, seed=3)
    data.setup("fit")
    vocab = CodeVocabulary(3, 16)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (8, 6) and bool(batch["attention_mask"].all())
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(batch["labels"][:, 1:], batch["input_ids"][:, 1:])
    train, val = data.split_indices()
    assert len(val) == 40 and not set(train) & set(val) and len(train) + len(val) == 400
    assert data.split_indices() != ImageCodesDataModule(codes_file=path, num_val=40, seed=4).split_indices()
    stored = load_codes(path)
    first = data.train_set[0]
    assert torch.equal(first[1:], stored.codes[train[0], :5] + vocab.code_offset)
    assert int(first[0]) == int(vocab.class_token_ids(stored.labels[train[0] : train[0] + 1])[0])
    # the saved word-level tokenizer names the same ids
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(code_tokenizer_dir(path)))
    assert len(saved) == vocab.size == 3 + 4 + 16 and saved.pad_token_id == 0
    label = int(stored.labels[train[0]])
    tokens = saved.convert_ids_to_tokens(first.tolist())
    assert tokens[0] == (f"<class_{label}>" if label >= 0 else "<class_null>")
    assert tokens[1:] == [f"<code_{int(c)}>" for c in stored.codes[train[0], :5]]


def test_class_dropout_rate_is_seeded_and_resumable(tmp_path):
    path = _codes_file(tmp_path, rows=4000)
    data = ImageCodesDataModule(codes_file=path, num_val=0, seed=11)
    data.setup("fit")
    rows, null = data.train_set, CodeVocabulary(3, 16).null_class_id
    labelled = [i for i in range(len(rows)) if int(rows.classes[i]) != null]
    dropped = [int(rows[(0, i)][0]) == null for i in labelled]
    assert 0.085 < sum(dropped) / len(dropped) < 0.115
    unknown = [i for i in range(len(rows)) if int(rows.classes[i]) == null]
    assert unknown and all(int(rows[(0, i)][0]) == null for i in unknown)  # no class: always <class_null>
    again = ImageCodesDataModule(codes_file=path, num_val=0, seed=11)
    again.setup("fit")
    assert [again.train_set.dropped(0, i) for i in labelled] == [rows.dropped(0, i) for i in labelled]
    assert [rows.dropped(1, i) for i in labelled] != [rows.dropped(0, i) for i in labelled]  # new draw each epoch
    a, b = iter(data.train_dataloader()), iter(again.train_dataloader())
    assert all(torch.equal(next(a)["input_ids"], next(b)["input_ids"]) for _ in range(3))
    # resume: a restored datamodule skips the batches already seen and draws the same dropout
    restored = ImageCodesDataModule(codes_file=path, num_val=0, seed=11)
    restored.load_state_dict({"epoch": 0, "batches": 2, "seed": 11})
    full = list(iter(data.train_dataloader()))
    assert torch.equal(next(iter(restored.train_dataloader()))["input_ids"], full[2]["input_ids"])


def test_max_tokens_above_n_and_bad_options_raise(tmp_path):
    path = _codes_file(tmp_path)
    with pytest.raises(ConfigError, match="max_tokens=9.*N=8"):
        ImageCodesDataModule(codes_file=path, max_tokens=9)
    with pytest.raises(ConfigError, match="class_dropout"):
        ImageCodesDataModule(codes_file=path, class_dropout=1.0)
    with pytest.raises(Exception, match="extract_codes"):
        ImageCodesDataModule(codes_file=str(tmp_path / "missing.safetensors"))


# ---- sampling --------------------------------------------------------------------------------------
def _lm(path: str) -> TokenLM:
    torch.manual_seed(0)
    model = TokenLM(model="tiny-llama", tokenizer=str(code_tokenizer_dir(path)), model_config=SMALL_LM)
    model.configure_model()
    return model.eval()


def test_cfg_scale_one_is_plain_conditional_sampling(tmp_path):
    path = _codes_file(tmp_path)
    model, vocab = _lm(path), CodeVocabulary(3, 16)
    classes = vocab.class_token_ids(torch.tensor([0, 1, 2, -1]))
    codes = generate_codes(model.causal_lm, classes, 6, vocab.code_offset, 16, vocab.null_class_id, cfg_scale=1.0,
                           temperature=1.3, generator=torch.Generator().manual_seed(5))
    generator, ids = torch.Generator().manual_seed(5), classes[:, None]
    with torch.no_grad():
        for _ in range(6):  # no cache, full recompute, same draws
            logits = model.causal_lm(input_ids=ids).logits[:, -1, vocab.code_offset : vocab.code_offset + 16] / 1.3
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator) + vocab.code_offset], 1)
    assert codes.shape == (4, 6) and torch.equal(codes, ids[:, 1:] - vocab.code_offset)
    guided = generate_codes(model.causal_lm, classes, 32, vocab.code_offset, 16, vocab.null_class_id, cfg_scale=4.0,
                            cfg_schedule="constant", top_k=3, generator=torch.Generator().manual_seed(5))
    assert guided.shape == (4, 32) and int(guided.min()) >= 0 and int(guided.max()) < 16


class _HandBuiltLM(torch.nn.Module):
    """Logits over [pad, cls, null, code0, code1, code2]: one vector for class rows, one for null rows."""

    COND = torch.tensor([9.0, 9.0, 9.0, 2.0, 1.0, 0.0])
    UNCOND = torch.tensor([9.0, 9.0, 9.0, 2.5, 0.0, 0.0])

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        self.seen.append(input_ids.clone())
        first = input_ids[:, 0] if past_key_values is None else past_key_values
        logits = torch.where((first == 2)[:, None], self.UNCOND, self.COND)[:, None, :]
        return SimpleNamespace(logits=logits, past_key_values=first)


def test_guided_logits_follow_the_formula_and_the_step_schedule():
    # guided at s = 3: uncond + 3 (cond - uncond) = [1.0, 3.0, 0.0] -> code 1; cond alone -> code 0
    torch.testing.assert_close(guided_logits(_HandBuiltLM.COND[3:], _HandBuiltLM.UNCOND[3:], 3.0), torch.tensor([1.0, 3.0, 0.0]))
    run = lambda lm, **kw: generate_codes(lm, torch.tensor([1, 1]), 4, 3, 3, 2, temperature=0, **kw)  # noqa: E731
    lm = _HandBuiltLM()
    assert run(lm, cfg_scale=3.0, cfg_schedule="constant").tolist() == [[1] * 4] * 2
    assert lm.seen[0][:, 0].tolist() == [1, 1, 2, 2]  # cond and uncond rows in one batch
    assert lm.seen[1].tolist() == [[4]] * 4  # the sampled code fed to both halves
    assert run(_HandBuiltLM(), cfg_scale=1.0).tolist() == [[0] * 4] * 2
    # step schedule, ratio 0.5 of 4: positions 0, 1 unguided, 2, 3 guided
    assert run(_HandBuiltLM(), cfg_scale=3.0, step_ratio=0.5).tolist() == [[0, 0, 1, 1]] * 2
    assert [cfg_scale_at(t, 256, 1.5) for t in (0, 46, 47, 255)] == [1.0, 1.0, 1.5, 1.5]  # 0.18 * 256 = 46.08


# ---- token methods apply unchanged -----------------------------------------------------------------
def test_dft_trains_a_token_lm_on_code_batches(tmp_path):
    path = _codes_file(tmp_path)
    torch.manual_seed(0)
    model = TokenLM(model="tiny-llama", tokenizer=str(code_tokenizer_dir(path)), model_config=SMALL_LM)
    data = ImageCodesDataModule(codes_file=path, num_val=8, batch_size=8, seed=0)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DFT()], limit_val_batches=0, default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.causal_lm.get_input_embeddings().weight.shape[0] == CodeVocabulary(3, 16).size


# ---- the CLI ---------------------------------------------------------------------------------------
def test_cli_extract_codes_then_predict_grid(tmp_path, tokenizer_ckpt, image_tokenizer):
    config = _tokenizer_config(tmp_path)
    output = tmp_path / "codes.safetensors"
    cli(["extract_codes", "--config", config, f"--ckpt_path={tokenizer_ckpt}", f"--output={output}"])
    stored = load_codes(output)
    assert stored.codes.shape == (16, 32) and stored.labels.tolist() == [-1] * 16
    assert (stored.codebook_size, stored.num_classes, stored.image_size, stored.tokenizer_ckpt) == (256, 0, 32, tokenizer_ckpt)
    data = ImageDataModule(sources=["shapes"], image_size=32, num_train=12, num_val=4, seed=0)
    images = torch.cat([b["images"] for b in data.ordered_dataloader("train")])
    assert torch.equal(stored.codes[:12], image_tokenizer.encode(images))
    assert (code_tokenizer_dir(output) / "tokenizer.json").is_file()

    # a class-conditional codes file with the same tokenizer: 3 classes x 2 samples, k = 4 of 32
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    codes = _codes_file(labelled, rows=20, num_classes=3, codebook=256, n=32, ckpt=tokenizer_ckpt)
    grid = tmp_path / "grid.png"
    predictions = tmp_path / "samples.jsonl"
    cli([
        "predict", "--config", GENERATOR_CONFIG, f"--output_dir={tmp_path / 'gen'}", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", f"--data.init_args.codes_file={codes}",
        f"--model.init_args.tokenizer={code_tokenizer_dir(codes)}", f"--model.init_args.model_config={SMALL_LM}",
        "--model.init_args.samples_per_class=2", "--model.init_args.num_tokens=4", f"--model.init_args.grid_file={grid}",
        f"--predictions.output={predictions}",
    ])
    with Image.open(grid) as image:
        assert image.size == (2 * 33 + 1, 3 * 33 + 1)  # columns = samples, rows = classes, 32 px + 1 px padding
    records = [__import__("json").loads(line) for line in predictions.read_text().splitlines()]
    assert [r["class"] for r in records] == [0, 0, 1, 1, 2, 2] and all(len(r["codes"]) == 4 for r in records)
    assert all(0 <= c < 256 for r in records for c in r["codes"])
