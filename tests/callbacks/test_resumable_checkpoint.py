"""ResumableCheckpoint in the test process: a SIGTERM or a first Ctrl+C (raised from a callback at a chosen
point) stops the run at the step boundary with a checkpoint that resumes to the uninterrupted weights;
other exceptions and a second Ctrl+C save nothing; the final steps are saved; handlers are restored."""

import inspect
import signal

import lightning.pytorch as pl
import pytest
import torch

from lightning_tokens import DFT, NUPADataModule, TokenLM
from lightning_tokens.callbacks import ResumableCheckpoint
from lightning_tokens.modules import OptimizerSettings

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
MAX_STEPS = 10  # 48 examples / 8 = 6 batches per epoch; validation every 5 steps (2 batches), checkpoints every 4


def _data():
    return NUPADataModule(
        tasks="Integer/max", tokenizer="char", num_train=48, num_val=16, num_test=8, batch_size=8, eval_batch_size=8, max_length=48
    )


def _fit(dirpath, *callbacks, ckpt_path=None, max_steps=MAX_STEPS, accumulate=1, **checkpoint):
    pl.seed_everything(0)
    optimizer = OptimizerSettings(lr=3e-3, warmup=0.2)
    model = TokenLM(model="tiny-llama", tokenizer="char", model_config=TINY, optimizer=optimizer, generate_in_validation=False)
    settings = {"dirpath": str(dirpath), "every_n_train_steps": 4, "save_top_k": 0, **checkpoint}
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, val_check_interval=5, check_val_every_n_epoch=None,
        limit_val_batches=2, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True, default_root_dir=str(dirpath),
        callbacks=[DFT(), *callbacks, ResumableCheckpoint(**settings)],
    )
    trainer.fit(model, datamodule=_data(), ckpt_path=ckpt_path)
    return model


class RaiseAt(pl.Callback):
    """Raise ``signals`` (or an exception) in the test process once: at the start of the ``nth`` training
    batch that follows optimizer step ``step`` (``where="train"``), after validation batch ``nth`` at that
    step (``"validation"``), or at the end of epoch ``nth`` (``"epoch_end"``)."""

    def __init__(self, step=None, signals=(signal.SIGTERM,), where="train", nth=0, error=None):
        self.step, self.signals, self.where, self.nth, self.error = step, signals, where, nth, error
        self.seen = 0

    def _maybe_fire(self, where, trainer, index):
        if where != self.where or (self.step is not None and trainer.global_step != self.step):
            return
        if index is None:
            index, self.seen = self.seen, self.seen + 1
        if index != self.nth:
            return
        self.nth = -1  # once
        if self.error is not None:
            raise self.error
        for signum in self.signals:
            signal.raise_signal(signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_fire("train", trainer, None)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._maybe_fire("validation", trainer, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe_fire("epoch_end", trainer, trainer.current_epoch)


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """Lightning ignores SIGINT for good after a KeyboardInterrupt: give the test process its handlers back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("straight")).state_dict()


def _step(path):
    return torch.load(path, weights_only=False)["global_step"]


def _assert_same_weights(model, reference):
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "step, where, nth, saved_at",
    [
        pytest.param(6, "train", 0, 7, id="mid-epoch"),
        pytest.param(5, "train", 0, 6, id="last-step-of-an-epoch"),
        pytest.param(3, "train", 0, 4, id="step-saved-already"),
        pytest.param(4, "train", 0, 5, id="step-with-validation"),
        pytest.param(5, "validation", 0, 5, id="mid-validation"),
        pytest.param(5, "validation", 1, 5, id="after-validation"),
    ],
)
def test_sigterm_saves_at_the_step_boundary_and_the_resume_is_exact(
    tmp_path, uninterrupted, step, where, nth, saved_at
):
    # "train": the signal comes before step+1 runs, which finishes; "validation": during step's validation
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, RaiseAt(step, where=where, nth=nth))
    assert stopped.value.code == 128 + signal.SIGTERM
    last = tmp_path / "last.ckpt"
    assert _step(last) == saved_at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _assert_same_weights(_fit(tmp_path, ckpt_path=str(last)), uninterrupted)


def test_a_sigterm_between_epochs_keeps_the_latest_checkpoint(tmp_path, uninterrupted):
    # after the epoch's last step and its checkpoint hooks: Lightning stops once the epoch is counted
    # complete, a state it would resume into the wrong epoch
    with pytest.warns(UserWarning, match="between two epochs.*not saved"), pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, RaiseAt(where="epoch_end", nth=0))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert _step(tmp_path / "last.ckpt") == 4
    _assert_same_weights(_fit(tmp_path, ckpt_path=str(tmp_path / "last.ckpt")), uninterrupted)


def test_with_gradient_accumulation_only_a_completed_step_is_saved(tmp_path):
    # 2 batches per optimizer step: a stop after the first batch of a step would lose its gradients
    with pytest.warns(UserWarning, match="gradient accumulation.*not saved"), pytest.raises(SystemExit):
        _fit(tmp_path / "a", RaiseAt(3, nth=0), accumulate=2, max_steps=6, every_n_train_steps=2)
    assert _step(tmp_path / "a" / "last.ckpt") == 2  # the periodic one
    with pytest.raises(SystemExit):  # the signal before the second batch of step 3: step 3 is saved
        _fit(tmp_path / "b", RaiseAt(2, nth=1), accumulate=2, max_steps=6, every_n_train_steps=2)
    assert _step(tmp_path / "b" / "last.ckpt") == 3


def test_resuming_from_last_finds_the_signal_checkpoint(tmp_path, uninterrupted):
    with pytest.raises(SystemExit):
        _fit(tmp_path, RaiseAt(6), every_n_train_steps=3)
    assert _step(tmp_path / "last.ckpt") == 7
    _assert_same_weights(_fit(tmp_path, ckpt_path="last", every_n_train_steps=3), uninterrupted)


def test_the_first_ctrl_c_stops_like_sigterm_with_status_130(tmp_path, uninterrupted):
    with pytest.raises(SystemExit) as stopped:
        _fit(tmp_path, RaiseAt(6, signals=(signal.SIGINT,)))
    assert stopped.value.code == 128 + signal.SIGINT
    assert _step(tmp_path / "last.ckpt") == 7
    _assert_same_weights(_fit(tmp_path, ckpt_path=str(tmp_path / "last.ckpt")), uninterrupted)


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    with pytest.raises(SystemExit) as stopped:  # Lightning's KeyboardInterrupt handling: status 1
        _fit(tmp_path, RaiseAt(6, signals=(signal.SIGINT, signal.SIGINT)))
    assert stopped.value.code == 1
    assert _step(tmp_path / "last.ckpt") == 4  # the periodic checkpoint, not a mid-step state


def test_other_exceptions_save_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, RaiseAt(6, error=RuntimeError("boom")))
    assert _step(tmp_path / "last.ckpt") == 4


def test_without_save_last_the_signal_checkpoint_is_named(tmp_path):
    with pytest.raises(SystemExit):
        _fit(tmp_path, RaiseAt(5), save_last=False)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=0-step=6.ckpt"]


def test_the_final_steps_are_saved_after_periodic_checkpoints(tmp_path):
    # 10 steps, every 4: Lightning's save_last alone would leave last.ckpt at step 8
    _fit(tmp_path)
    assert _step(tmp_path / "last.ckpt") == MAX_STEPS
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_handler_of_someone_else_is_left_alone(tmp_path):
    calls = []
    signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    _fit(tmp_path, RaiseAt(2, signals=(signal.SIGINT,)), max_steps=3)
    assert calls == [signal.SIGINT] and _step(tmp_path / "last.ckpt") == 3


def test_contract():
    for param in inspect.signature(ResumableCheckpoint.__init__).parameters.values():
        if param.name != "self":
            assert param.annotation is not inspect.Parameter.empty, param.name
            assert param.default is not inspect.Parameter.empty, param.name
    assert "Example" in ResumableCheckpoint.__doc__
    checkpoint = ResumableCheckpoint(every_n_train_steps=3)
    assert checkpoint.save_last is True and checkpoint._every_n_train_steps == 3
    ResumableCheckpoint(every_n_train_steps=3).load_state_dict(checkpoint.state_dict())
