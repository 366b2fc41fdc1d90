"""TokenLM end to end on the tiny preset: training, LoRA, resume, generation metrics, bad input."""

import os

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import DFT, NUPADataModule, TokenLM
from lightning_tokens.modules import LoRASettings, OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


def _data(**kwargs):
    defaults = dict(tasks="Integer/max", tokenizer="char", num_train=48, num_val=8, num_test=8, batch_size=8, eval_batch_size=8, max_length=48)
    return NUPADataModule(**{**defaults, **kwargs})


def _model(**kwargs):
    defaults = dict(model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=OptimizerSettings(lr=3e-3, warmup=0))
    return TokenLM(**{**defaults, **kwargs})


def _trainer(tmp_path, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), enable_checkpointing=False, limit_val_batches=0, deterministic=True,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_loss_equals_the_hf_models_own_loss():
    model, dm = _model(), _data()
    model.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ours = model._loss(batch)  # outside a trainer: plain token mean
    theirs = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_resume_mid_epoch_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    # 48 examples / 8 = 6 batches per epoch: a checkpoint at step 4 (mid-epoch), training to step 10
    pl.seed_everything(0)
    straight = _model()
    every_4 = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path / "a", max_steps=10, enable_checkpointing=True, callbacks=[DFT(), every_4]).fit(
        straight, datamodule=_data()
    )
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert os.path.exists(ckpt)

    pl.seed_everything(123)  # the data follow seed_everything: resuming under another seed is refused
    with pytest.raises(ValueError, match="data seeded 0, this run seeds its data with 123"):
        _trainer(tmp_path / "c", max_steps=10, callbacks=[DFT()]).fit(_model(), datamodule=_data(), ckpt_path=ckpt)

    pl.seed_everything(0)
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG state
    resumed = _model()
    _trainer(tmp_path / "b", max_steps=10, callbacks=[DFT()]).fit(resumed, datamodule=_data(), ckpt_path=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_lora_trains_only_adapters_and_lowers_the_loss(tmp_path):
    model, dm = _model(lora=LoRASettings(r=4, alpha=8), optimizer=OptimizerSettings(lr=1e-2, warmup=0)), _data()
    model.configure_model()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    before = model._loss(batch).item()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    _trainer(tmp_path, max_steps=30).fit(model, datamodule=dm)
    assert model._loss(batch).item() < before
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name])


def test_validation_generates_and_scores_answers_and_saves_the_tokenizer(tmp_path):
    model = _model()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(model, datamodule=_data())
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/exact_match", "val/digit_match", "val/dlength"):
        assert key in metrics and torch.isfinite(metrics[key])
    assert os.path.exists(tmp_path / "ckpt" / "tokenizer" / "tokenizer.json")
    restored = TokenLM.load_from_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"))
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_configuration_fails_early_with_the_field_named(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        TokenLM(model="./checkpoints/does-not-exist")
    with pytest.raises(ValueError, match="tokenizer"):
        TokenLM(model="tiny-llama")
    with pytest.raises(ValueError, match="quantization='nf8'"):
        TokenLM(model="tiny-llama", tokenizer="char", quantization="nf8")
    with pytest.raises(ValueError, match="dtype"):
        TokenLM(model="tiny-llama", tokenizer="char", dtype="float7")
    with pytest.raises(ValueError, match="random weights"):
        TokenLM(model="tiny-llama", tokenizer="char", quantization="nf4").configure_model()


def test_labels_with_a_wrong_shape_fail_before_training(tmp_path):
    class BadData(NUPADataModule):
        def train_dataloader(self):
            for batch in super().train_dataloader():
                batch["labels"] = batch["labels"][:, :-1]
                yield batch

    with pytest.raises(ValueError, match="shape of input_ids"):
        _trainer(tmp_path, max_steps=1).fit(_model(), datamodule=BadData(tasks="Integer/max", tokenizer="char", num_train=16, num_val=4, num_test=4))


def test_a_local_checkpoint_folder_loads_with_its_weights(tmp_path):
    source = _model()
    source.configure_model()
    source.causal_lm.save_pretrained(tmp_path / "hf")
    source.tokenizer.save_pretrained(tmp_path / "hf")
    loaded = TokenLM(model=str(tmp_path / "hf"))  # tokenizer defaults to the model folder
    loaded.configure_model()
    for a, b in zip(source.causal_lm.state_dict().values(), loaded.causal_lm.state_dict().values()):
        assert torch.equal(a, b)
    assert len(loaded.tokenizer) == len(source.tokenizer)
