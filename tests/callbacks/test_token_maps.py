"""TokenMapLogger: the final weight of every token is the product of what each method chose, the fixed examples
are the raw first batch, images reach the loggers, training is not disturbed, the examples survive a checkpoint."""

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

from lightning_tokens import DFT, NUPADataModule, TokenLM
from lightning_tokens.callbacks.token_maps import TokenMapLogger, _log_image
from lightning_tokens.core import BatchTokenMethod, TokenMethod, TokenMethodOutput
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.modules import OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}


class EvenHalf(BatchTokenMethod):
    """Pre-forward: weight 0.5 on even positions."""

    def token_weights(self, batch, pl_module):
        weights = torch.ones_like(batch["labels"], dtype=torch.float32)
        weights[:, ::2] = 0.5
        return weights


class DropOdd(TokenMethod):
    """Post-forward: drop the odd positions."""

    def compute(self, stats, pl_module):
        keep = torch.ones_like(stats.mask)
        keep[:, 1::2] = False
        return TokenMethodOutput(mask=keep)


class ImageLogger(Logger):
    """A logger with ``log_image`` (as W&B's)."""

    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None):
        self.images.append((key, step, images[0]))


class BoardLogger(ImageLogger):
    """A logger whose experiment has ``add_image`` (as TensorBoard's SummaryWriter), and no ``log_image``."""

    log_image = None

    @property
    def experiment(self):
        return SimpleNamespace(add_image=lambda tag, image, global_step, dataformats: self.images.append((tag, global_step, image)))


def _data():
    return NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=24, num_val=4, num_test=4, batch_size=4, max_length=48)


def _fit(tmp_path, callbacks, loggers=False, steps=3):
    pl.seed_everything(0, verbose=False)
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch",
                    optimizer=OptimizerSettings(lr=1e-2, warmup=0))
    trainer = pl.Trainer(max_steps=steps, logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(model, datamodule=_data())
    return trainer, model


def test_maps_show_the_product_of_every_methods_choice_and_leave_training_alone(tmp_path):
    logger = TokenMapLogger(every_n_steps=2, num_examples=2)
    images = ImageLogger()
    board = BoardLogger()
    trainer, model = _fit(tmp_path, [EvenHalf(), DFT(), DropOdd(), logger], loggers=[images, board])
    assert trainer.callbacks[0] is logger  # moved to the front: the examples are the raw batch
    folder = tmp_path / "token_maps"  # the first logger's log_dir is None: default_root_dir
    assert sorted(p.name for p in folder.glob("*.png")) == ["step_000001.png", "step_000002.png"]
    data = json.loads((folder / "step_000002.json").read_text())
    assert data["title"].startswith("Token weights at step 2") and "EvenHalf" in data["title"]
    assert len(data["maps"]) == 2
    scored = 0
    for token_map in data["maps"]:
        for position, token in enumerate(token_map["tokens"]):
            details = token["details"]
            if token["value"] is None:
                assert details["status"] == "not scored (no label)"
                continue
            scored += 1
            assert details["data weight"] == 1.0  # not EvenHalf's: the batch was taken before it ran
            assert details["EvenHalf.weight"] == (0.5 if position % 2 == 0 else 1.0)
            assert details["DropOdd.kept"] == (0.0 if position % 2 else 1.0)
            assert details["DFT.weight"] == pytest.approx(details["p"], rel=1e-5)
            expected = details["EvenHalf.weight"] * details["DFT.weight"] * details["DropOdd.kept"]
            assert token["value"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
            assert token["dropped"] == (position % 2 == 1)
            assert details["status"] == ("dropped" if position % 2 else "weighted")
    assert scored > 0
    html = (folder / "step_000002.html").read_text(encoding="utf-8")
    assert "DFT.weight" in html and "EvenHalf.weight" in html and 'class="t dropped"' in html
    assert [step for _, step, _ in images.images] == [1, 2] and [step for _, step, _ in board.images] == [1, 2]
    image = images.images[-1][2]
    assert image.dtype.name == "uint8" and image.ndim == 3 and image.shape[2] == 3
    assert not _log_image(SimpleNamespace(), "token_maps", image, 7)

    # the same run without the logger ends with the same weights: the re-scoring changed nothing
    _, plain = _fit(tmp_path / "plain", [EvenHalf(), DFT(), DropOdd()])
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_examples_survive_a_checkpoint_and_bad_settings(tmp_path):
    logger = TokenMapLogger(every_n_steps=1, num_examples=1, folder=str(tmp_path / "maps"), first_step=False, log_to_logger=False)
    trainer, _ = _fit(tmp_path, [logger], steps=1)
    state = logger.state_dict()
    assert state["examples"]["input_ids"].shape[0] == 1
    restored = TokenMapLogger()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.examples["labels"], logger.examples["labels"])
    assert (tmp_path / "maps" / "token_maps" / "step_000001.html").exists()
    assert TokenMapLogger().state_dict() == {}
    with pytest.raises(ConfigError, match="every_n_steps=0"):
        TokenMapLogger(every_n_steps=0)
    with pytest.raises(ConfigError, match="source='test'"):
        TokenMapLogger(source="test")
    with pytest.raises(ConfigError, match="rollouts"):
        TokenMapLogger().setup(SimpleNamespace(callbacks=[]), SimpleNamespace(rollout=object()), "fit")
    with pytest.raises(ConfigError, match="hidden_states"):
        TokenMapLogger().setup(SimpleNamespace(callbacks=[]), torch.nn.Linear(1, 1), "fit")


def test_cut_shares_its_flags_with_the_map(tmp_path):
    from lightning_tokens.callbacks.cut import ContrastiveUnlikelihood
    from lightning_tokens.datamodules.contrastive import ContrastiveDataModule

    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(json.dumps({"positive_context": f"{i}+1=", "negative_context": f"{i}+1= (too high)", "response": str(i + 2)})
                              for i in range(8)) + "\n")
    pl.seed_everything(0, verbose=False)
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch")
    logger = TokenMapLogger(every_n_steps=2, num_examples=2, source="val_batch")
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
                         callbacks=[ContrastiveUnlikelihood(threshold=1.0), logger])
    trainer.fit(model, ContrastiveDataModule(train_file=str(path), batch_size=4, val_fraction=0.25, seed=0))
    data = json.loads((tmp_path / "token_maps" / "step_000002.json").read_text())
    labelled = [t for m in data["maps"] for t in m["tokens"] if t["value"] is not None]
    assert labelled and all({"ContrastiveUnlikelihood.ratio", "ContrastiveUnlikelihood.flagged", "ContrastiveUnlikelihood.loss",
                             "ContrastiveUnlikelihood.extra"} <= set(t["details"]) for t in labelled)
    assert {t["details"]["ContrastiveUnlikelihood.flagged"] for t in labelled} <= {0.0, 1.0}
