"""``TokensCLI`` (LightningCLI with the library's sections and subcommands), :func:`cli` and the console
entry point :func:`main`."""

from __future__ import annotations

import json
import os
import pickle
import sys
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

# imported so that YAML can name classes by their short names (TokenLM, DFT, NUPADataModule, ...)
import lightning_tokens.callbacks  # noqa: F401
import lightning_tokens.datamodules  # noqa: F401
import lightning_tokens.modules  # noqa: F401
from lightning_tokens.callbacks.prediction_writer import JSONLPredictionWriter
from lightning_tokens.callbacks.resumable_checkpoint import ResumableCheckpoint
from lightning_tokens.cli.config_edits import apply_output_dir
from lightning_tokens.cli.messages import silence_known_third_party_messages
from lightning_tokens.cli.trainer import TokensTrainer
from lightning_tokens.core.errors import LightningTokensError


class TokensCLI(LightningCLI):
    """LightningCLI with the offline subcommands (``score``, ``star_score``, ``generic_labels``, ``export``),
    the prediction writer as ``--predictions.output`` and the checkpointing as the ``checkpoint`` section
    (:class:`~lightning_tokens.callbacks.ResumableCheckpoint`: ``--checkpoint.every_n_train_steps 200``
    saves a resumable ``last.ckpt`` every 200 optimizer steps and on SIGTERM / Ctrl+C)."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "score": {"model", "datamodule"},
            "star_score": {"model", "datamodule"},
            "generic_labels": {"model", "datamodule"},
            "export": {"model", "datamodule"},
            "divergence": {"model", "datamodule"},
            "saliency": {"model", "datamodule"},
            "steer": {"model", "datamodule"},
            "extract_codes": {"model", "datamodule"},
            "speech_tokens": {"model", "datamodule"},
        }

    @override
    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyper-parameters of ``--ckpt_path`` (a file) before the subcommand, with
        ``weights_only=True``: its refusal becomes the library's error, and ``--trust_checkpoint true`` goes
        on without them (the config is used as given; the subcommand then loads the file as trusted)."""
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            from lightning_tokens.modules.checkpoints import untrusted_checkpoint_error

            options = self.config.get(self.config.get("subcommand") or "", {}) or {}
            if not options.get("trust_checkpoint"):
                raise untrusted_checkpoint_error(options.get("ckpt_path"), error) from None
            rank_zero_info("--trust_checkpoint: the checkpoint's hyper-parameters are not merged into the config.")

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(JSONLPredictionWriter, "predictions")
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.add_argument(
            "--output_dir",
            type=Optional[str],
            default=None,
            help="One folder for the run: sets trainer.default_root_dir, the logger's save_dir and "
            "checkpoint.dirpath (<output_dir>/checkpoints) together.",
        )

    @override
    def before_instantiate_classes(self) -> None:
        self.edit_config(self.config[self.subcommand] if self.subcommand else self.config)

    def edit_config(self, config: Any) -> None:
        """Edits of the parsed config (of the running subcommand) before anything is built: ``output_dir``.
        Subclasses extend it (``compare`` swaps the token methods here)."""
        apply_output_dir(config)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """Lightning's, except that ``--trainer.enable_checkpointing false`` leaves the ``checkpoint``
        section's callback out (Lightning refuses a checkpoint callback with it)."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        keys = self._parser(self.subcommand).callback_keys
        if config.get("enable_checkpointing") is False:
            keys = [key for key in keys if key != "checkpoint"]
        return self._instantiate_trainer(config, [self._get(self.config_init, key) for key in keys])


def cli(args: list[str] | None = None, run: bool = True, cli_class: type[TokensCLI] | None = None) -> TokensCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, ``None`` reads ``sys.argv``;
    ``cli_class`` a subclass of :class:`TokensCLI` to build instead."""
    return (cli_class or TokensCLI)(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=TokensTrainer,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=1234,
        args=args,
        run=run,
    )


#: Set to 1 (or pass ``--debug``) to see the traceback of the library's own user errors.
DEBUG_ENV = "LIGHTNING_TOKENS_DEBUG"


def main(args: list[str] | None = None) -> None:
    """Console-script entry point. The library's own user errors
    (:class:`~lightning_tokens.core.errors.LightningTokensError`: a bad option, an unreadable data line, a
    missing reference, an untrusted checkpoint) print one line that names the problem and the fix, and
    exit with status 2; ``--debug`` anywhere on the command line, or ``LIGHTNING_TOKENS_DEBUG=1``, shows
    their traceback. Any other exception is unexpected and keeps its traceback.
    """
    given = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in given or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    remaining = [arg for arg in given if arg != "--debug"]
    if args is None:
        sys.argv[1:] = remaining  # LightningCLI reads sys.argv itself (and warns when given both)
    silence_known_third_party_messages()
    try:
        if remaining[:1] == ["compare"]:
            from lightning_tokens.compare import main as compare_main

            compare_main(remaining[1:])
        elif remaining[:1] == ["make_speech_data"]:
            make_speech_data_main(remaining[1:])
        else:
            cli(None if args is None else remaining)
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None or debug:
            raise
        print(f"lightning-tokens: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def make_speech_data_main(args: list[str]) -> None:
    """``lightning-tokens make_speech_data --output_dir data/speech [--num_utterances 600 --seed 0 ...]``: synthesise
    the offline spoken dataset (:func:`~lightning_tokens.datamodules.speech_synthesis.make_speech_data`; needs the
    ``speech-data`` extra, GPL-licensed voices that the library itself never imports)."""
    from jsonargparse import auto_cli

    from lightning_tokens.datamodules.speech_synthesis import make_speech_data

    summary = auto_cli(make_speech_data, args=args, as_positional=False)
    print(json.dumps(summary, indent=2, default=str))


def _user_error(error: BaseException) -> LightningTokensError | None:
    """The library's user error behind ``error``: itself, or what a wrapper (jsonargparse re-raises errors
    of ``__init__`` as its own) was caused by."""
    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, LightningTokensError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None
