"""The Steering callback: generation and validation change with it (and only with it), the hook is on during
validation / test / predict and gone afterwards (training never sees it), bad configurations fail at setup."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import NUPADataModule, TokenLM
from lightning_tokens.analysis.steering import GrainsSettings, SteeringVectors, decoder_layers
from lightning_tokens.callbacks.steering import Steering
from lightning_tokens.core.errors import ConfigError, MissingFileError
from lightning_tokens.modules import OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2}


def _model(**kwargs):
    pl.seed_everything(0, verbose=False)
    return TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, max_new_tokens=6, loss_backend="torch", **kwargs)


def _data():
    return NUPADataModule(tasks="Integer/max", tokenizer="char", num_train=16, num_val=4, num_test=4, batch_size=4, eval_batch_size=4)


def _trainer(tmp_path, callbacks=(), **kwargs):
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), accelerator="cpu", callbacks=list(callbacks), **kwargs)


@pytest.fixture
def vectors_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    directions = {k: torch.randn(2, TINY["hidden_size"], generator=g) for k in ("pos/pca", "pos/mean", "neg/pca", "neg/mean")}
    folder = str(tmp_path / "vectors")
    SteeringVectors(directions, [0, 1], GrainsSettings(layer=-1, alpha=4.0), {"num_layers": 2}).save(folder)
    return folder


class _HookProbe(pl.Callback):
    """Counts the forward hooks on the model's decoder layers at each kind of step."""

    def __init__(self):
        self.seen = {}

    def _count(self, pl_module, stage):
        self.seen.setdefault(stage, set()).add(_hooks(pl_module))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._count(pl_module, "train")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._count(pl_module, "validate")

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._count(pl_module, "predict")


def _hooks(model):
    """Steering hooks on the decoder layers (transformers registers its own output-capturing hooks too)."""
    return sum("add_steering_hook" in h.__qualname__ for b in decoder_layers(model.causal_lm) for h in b._forward_hooks.values())


def test_generation_changes_with_steering_and_not_without(tmp_path, vectors_dir):
    model = _model()
    plain = _trainer(tmp_path).predict(model, datamodule=_data())
    again = _trainer(tmp_path).predict(model, datamodule=_data())
    probe = _HookProbe()
    steered = _trainer(tmp_path, [Steering(path=vectors_dir, alpha=4.0), probe]).predict(model, datamodule=_data())
    outputs = lambda runs: [row["output"] for batch in runs for row in batch]  # noqa: E731
    assert outputs(plain) == outputs(again)  # greedy: deterministic without steering
    assert outputs(steered) != outputs(plain)
    assert probe.seen["predict"] == {1} and _hooks(model) == 0  # on during predict, removed after
    # alpha = 0 (per-token renormalisation of h itself) changes nothing
    zero = _trainer(tmp_path, [Steering(path=vectors_dir, alpha=0.0)]).predict(model, datamodule=_data())
    assert outputs(zero) == outputs(plain)


def test_validation_is_steered_and_training_is_not(tmp_path, vectors_dir):
    settings = OptimizerSettings(lr=0.0, warmup=0)  # lr 0: the weights stay, so losses compare
    base = _trainer(tmp_path, limit_val_batches=1).validate(_model(optimizer=settings), datamodule=_data(), verbose=False)[0]["val/loss"]
    model = _model(optimizer=settings)  # the same seed: the same weights
    probe = _HookProbe()
    steering = Steering(path=vectors_dir, layer=0, mode="pos", method="mean", norm_dim=1)
    trainer = _trainer(tmp_path, [steering, probe], max_steps=2, limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=_data())
    assert probe.seen["train"] == {0} and probe.seen["validate"] == {1}
    assert not steering.active and _hooks(model) == 0
    steered = trainer.callback_metrics["val/loss"].item()
    assert steered != pytest.approx(base, abs=1e-6)
    after = _trainer(tmp_path, limit_val_batches=1).validate(model, datamodule=_data(), verbose=False)[0]["val/loss"]
    assert after == pytest.approx(base, abs=1e-6)  # nothing left behind


def test_stages_limit_where_it_steers(tmp_path, vectors_dir):
    model = _model()
    probe = _HookProbe()
    _trainer(tmp_path, [Steering(path=vectors_dir, stages=["validate"]), probe]).predict(model, datamodule=_data())
    assert probe.seen["predict"] == {0}


def test_bad_configurations_fail_early(tmp_path, vectors_dir):
    with pytest.raises(ConfigError, match="norm_dim=2"):
        Steering(path=vectors_dir, norm_dim=2)
    with pytest.raises(ConfigError, match="mode='up'"):
        Steering(path=vectors_dir, mode="up")
    with pytest.raises(ConfigError, match="stages"):
        Steering(path=vectors_dir, stages=["fit"])
    with pytest.raises(MissingFileError, match="lightning-tokens steer"):
        _trainer(tmp_path, [Steering(path=str(tmp_path / "missing"))]).predict(_model(), datamodule=_data())
    wide = str(tmp_path / "wide")
    SteeringVectors({"pos/pca": torch.randn(2, 8), "neg/pca": torch.randn(2, 8)}, [0, 1], GrainsSettings(), {"num_layers": 2}).save(wide)
    with pytest.raises(ConfigError, match="hidden size is 32"):
        _trainer(tmp_path, [Steering(path=wide)]).predict(_model(), datamodule=_data())
    deep = str(tmp_path / "deep")
    SteeringVectors({"pos/pca": torch.randn(4, 32), "neg/pca": torch.randn(4, 32)}, [0, 1, 2, 3], GrainsSettings(), {"num_layers": 4}).save(deep)
    with pytest.raises(ConfigError, match="built for 4 decoder layers"):
        _trainer(tmp_path, [Steering(path=deep)]).predict(_model(), datamodule=_data())
