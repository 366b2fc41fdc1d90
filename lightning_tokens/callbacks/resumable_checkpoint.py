"""
Resumable checkpoints
^^^^^^^^^^^^^^^^^^^^^

Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint`, plus a checkpoint when the run is told
to stop (SIGTERM, Ctrl+C) and at the end of training, at an optimizer-step boundary, so that resuming from
it gives the same weights as a run that was never interrupted.

What Lightning 2.6 does on its own: its SIGTERM handler only raises a flag (``trainer.received_sigterm``);
the training loop checks it after each batch (after the batch's ``on_train_batch_end`` hooks and its
validation, if one is due), the validation loop after each batch but the last, the fit loop once an epoch is
counted complete, and each raises :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` (a
``SystemExit`` with status 0), which callbacks see in ``on_exception``. Ctrl+C raises ``KeyboardInterrupt``
wherever the code is, possibly in the middle of an optimizer step; Lightning calls ``on_exception`` and
exits with status 1. ``ModelCheckpoint(save_on_exception=True)`` saves on any exception, mid-step ones
included, into ``last.ckpt`` too. And a checkpoint taken once the fit loop has counted an epoch complete
resumes (Lightning 2.6, ``max_steps`` training) into the wrong epoch.
"""

from __future__ import annotations

import signal
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

__all__ = ["ResumableCheckpoint"]


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves a resumable checkpoint when the run is stopped by a signal.

    Saving every ``every_n_train_steps`` optimizer steps, ``save_last``, top-k and monitoring are
    Lightning's own. Added:

    - **SIGTERM** (``kill``, a scheduler's preemption, ``docker stop``): the optimizer step in progress
      finishes and is saved as a periodic checkpoint would be (``last.ckpt``, or a checkpoint named by
      ``filename`` when ``save_last`` is off), then Lightning stops the run. A SIGTERM that comes after the
      step's checkpoint hooks (during its validation, say) is saved where Lightning stops.
    - **SIGINT** (Ctrl+C) during training takes the same path: the first one lets the current step
      finish, saves and stops; a second one aborts at once through Lightning's ``KeyboardInterrupt``
      handling, without saving (the latest checkpoint stays as it was).
    - **Exit status**: the process then exits with ``128 + signal`` (143 after SIGTERM, 130 after SIGINT),
      the status of a process killed by that signal, instead of Lightning's 0, so that a scheduler or a
      shell's ``&&`` does not take a stopped run for a finished one.
    - **End of training**: ``last.ckpt`` is written when training ends even if periodic checkpoints were
      saved before (Lightning's ``save_last`` skips the final steps when ``max_steps`` is not a multiple
      of ``every_n_train_steps``).

    Not saved (a warning names the latest checkpoint): a stop in the middle of a gradient accumulation,
    and one that comes after an epoch's last step has passed its checkpoint hooks (Lightning then stops
    between epochs, a state it does not resume exactly). Other exceptions save nothing, as they may strike
    mid-step, unless ``save_on_exception``.

    Resume with ``ckpt_path="last"`` (``--ckpt_path last``) or the file's path; with the library's
    datamodules (resumable samplers) training continues mid-epoch exactly where it stopped. A
    scheduler's grace period before SIGKILL must cover one optimizer step (plus a validation run, when
    one is due) and the save.

    Args:
        dirpath: folder of the checkpoints (``None``: the logger's or ``default_root_dir``'s ``checkpoints``).
        filename: name pattern of the checkpoints other than ``last`` (default ``{epoch}-{step}``).
        monitor: metric ranking the top-k checkpoints (``None``: the latest ones).
        verbose: log each decision.
        save_last: keep ``last.ckpt`` (``True``), or a link to the latest checkpoint (``"link"``).
        save_top_k: how many ranked checkpoints to keep (0: none, -1: all).
        save_on_exception: also save on any other exception (Lightning's switch; the state may be mid-step).
        save_weights_only: save the weights alone (not resumable).
        mode: ``min`` or ``max`` for ``monitor``.
        auto_insert_metric_name: write ``name=value`` in the file names.
        every_n_train_steps: save every N optimizer steps (``None`` or 0: not by steps).
        train_time_interval: save every time interval instead.
        every_n_epochs: save every N epochs.
        save_on_train_epoch_end: save at the end of the training epoch rather than after validation.
        enable_version_counter: add ``-v1``, ... instead of overwriting a file of another run.
        save_on_signal: save when stopped by SIGTERM or SIGINT.
        graceful_sigint: make the first Ctrl+C during training stop like SIGTERM. ``False`` leaves Ctrl+C
            to Lightning (``KeyboardInterrupt`` wherever the code is, status 1, nothing saved).

    Example::

        from lightning_tokens.callbacks import ResumableCheckpoint
        checkpoint = ResumableCheckpoint(dirpath="runs/x/checkpoints", every_n_train_steps=200, save_top_k=0)
        trainer = L.Trainer(max_steps=1000, callbacks=[checkpoint])
        trainer.fit(model, datamodule=dm)                    # kill -TERM <pid> during step 437: saves step 437
        trainer.fit(model, datamodule=dm, ckpt_path="last")  # a fresh process resumes after step 437
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        filename: str | None = None,
        monitor: str | None = None,
        verbose: bool = False,
        save_last: bool | Literal["link"] | None = True,
        save_top_k: int = 1,
        save_on_exception: bool = False,
        save_weights_only: bool = False,
        mode: str = "min",
        auto_insert_metric_name: bool = True,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | None = None,
        every_n_epochs: int | None = None,
        save_on_train_epoch_end: bool | None = None,
        enable_version_counter: bool = True,
        save_on_signal: bool = True,
        graceful_sigint: bool = True,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=monitor,
            verbose=verbose,
            save_last=save_last,
            save_top_k=save_top_k,
            save_on_exception=save_on_exception,
            save_weights_only=save_weights_only,
            mode=mode,
            auto_insert_metric_name=auto_insert_metric_name,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            every_n_epochs=every_n_epochs,
            save_on_train_epoch_end=save_on_train_epoch_end,
            enable_version_counter=enable_version_counter,
        )
        self.save_on_signal = save_on_signal
        self.graceful_sigint = graceful_sigint
        self._sigint_received = False
        self._previous_sigint: Any = None
        self._step_at_batch_start = 0
        self._mid_accumulation = False

    # ---- Ctrl+C: the same path as SIGTERM -------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._sigint_received = False
        self._mid_accumulation = False
        if self.graceful_sigint:
            self._install_sigint_handler(trainer)

    def _install_sigint_handler(self, trainer: pl.Trainer) -> None:
        """Replace Python's default Ctrl+C handler (only that one: a handler someone else installed is kept)
        while training runs. Lightning registers its SIGTERM handler before training starts; without it
        (Windows, a thread other than the main one) Ctrl+C stays as it is."""
        if threading.current_thread() is not threading.main_thread() or self._previous_sigint is not None:
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return
        if not callable(signal.getsignal(signal.SIGTERM)):
            return

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            if trainer.received_sigterm:  # a second Ctrl+C, or Ctrl+C after a SIGTERM: abort now
                self._restore_sigint_handler()
                raise KeyboardInterrupt
            self._sigint_received = True
            rank_zero_info(
                "\nCtrl+C: finishing the current step, then saving a checkpoint and stopping"
                " (Ctrl+C again aborts at once, without saving)."
            )
            signal.raise_signal(signal.SIGTERM)  # Lightning's handler: the same stop as a SIGTERM

        self._previous_sigint = signal.signal(signal.SIGINT, on_sigint)

    def _restore_sigint_handler(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint_handler()
        super().teardown(trainer, pl_module, stage)

    # ---- the saves ------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # the periodic checkpoint
        self._mid_accumulation = trainer.global_step == self._step_at_batch_start
        if self._mid_accumulation or not self._should_save_on_signal(trainer):
            return
        # stopping: save the step just taken where a periodic checkpoint is saved (the state Lightning
        # resumes best, also at an epoch's last step); Lightning stops right after this batch. Every rank
        # takes part in a save: they decide together.
        if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):
            self._save_on_signal(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint_handler()
        super().on_train_end(trainer, pl_module)
        # Lightning saves `last` here only if nothing was saved before: the steps after the latest
        # periodic checkpoint would be lost
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint_handler()
        if not isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)  # Lightning's save_on_exception (off by default)
            return
        signum = signal.SIGINT if self._sigint_received else signal.SIGTERM
        if exception.code in (None, 0):
            exception.code = 128 + int(signum)
        if not self.save_on_signal or trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            return
        if trainer.global_step == 0:  # nothing trained yet
            return
        # the signal came after the step's checkpoint hooks: Lightning stopped during or after its validation
        consistent = not self._mid_accumulation and not _between_epochs(trainer)
        if consistent and self._should_save_on_signal(trainer):
            self._save_on_signal(trainer)
        path = self.last_model_path or self._last_checkpoint_saved
        if self._last_global_step_saved == trainer.global_step and path:
            rank_zero_info(f"{signum.name}: stopped after step {trainer.global_step}; resume with --ckpt_path {path}")
        else:
            where = "in the middle of a gradient accumulation" if self._mid_accumulation else "between two epochs"
            rank_zero_warn(
                f"{signum.name}: stopped after step {trainer.global_step} {where}, where a checkpoint would not"
                f" resume exactly: not saved; the latest checkpoint is {path or 'none'}."
            )

    def _should_save_on_signal(self, trainer: pl.Trainer) -> bool:
        return (
            self.save_on_signal
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not trainer.fast_dev_run
            and self._last_global_step_saved != trainer.global_step  # saved at this step already
        )

    def _save_on_signal(self, trainer: pl.Trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        if self.save_last is True:
            self._save_last_checkpoint(trainer, candidates)
            return
        # a named checkpoint (outside the top-k ranking); with save_last="link", `last` then points to it
        self._save_checkpoint(trainer, self._get_metric_interpolated_filepath_name(candidates, trainer))
        self._save_last_checkpoint(trainer, candidates)


def _between_epochs(trainer: pl.Trainer) -> bool:
    """The fit loop counted the epoch complete and has not started the next one."""
    progress = trainer.fit_loop.epoch_progress.current
    return progress.completed == progress.started
