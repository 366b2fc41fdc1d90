"""The ``lightning-tokens`` command: Lightning's CLI over every module and datamodule of the library.

    lightning-tokens fit --config configs/quickstart.yaml
    lightning-tokens validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    lightning-tokens predict --config configs/quickstart.yaml --ckpt_path ... --predictions.output answers.jsonl
    lightning-tokens score --config reference.yaml --output reference_scores.safetensors
    lightning-tokens generic_labels --config configs/whp_generic_labels.yaml --output generic.safetensors
    lightning-tokens export --config configs/fsdp.yaml --ckpt_path runs/fsdp/checkpoints/last.ckpt --output export/
    lightning-tokens star_score --config configs/star_dss.yaml --guardrail '{class_path: ..., init_args: ...}' --output v.safetensors
    lightning-tokens compare --config configs/compare_smollm2_nupa.yaml --methods none,dft,rho1 --seeds 1,2

Every subcommand takes ``--output_dir DIR``: the run's root, logs and checkpoints together.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

# imported so that YAML can name classes by their short names (TokenLM, DFT, NUPADataModule, ...)
import lightning_tokens.callbacks  # noqa: F401
import lightning_tokens.datamodules  # noqa: F401
import lightning_tokens.modules  # noqa: F401
from lightning_tokens.callbacks.prediction_writer import JSONLPredictionWriter
from lightning_tokens.callbacks.resumable_checkpoint import ResumableCheckpoint
from lightning_tokens.callbacks.safety_shaping import ChunkPrefix, precompute_star_scores
from lightning_tokens.callbacks.unlearning import GenericTargets, build_generic_labels
from lightning_tokens.core.errors import LightningTokensError
from lightning_tokens.core.reference_scores import score_reference
from lightning_tokens.models.guardrails import Guardrail


# ---- one output folder per run -----------------------------------------------------------------------
def apply_output_dir(config: Any) -> None:
    """``output_dir: runs/x`` in a parsed config becomes the Trainer's ``default_root_dir``, the
    ``save_dir`` of every logger that has one and the checkpoint folder ``runs/x/checkpoints`` (the
    ``checkpoint`` section, and any ``ModelCheckpoint`` among the callbacks). It replaces paths the config
    also gives (each replacement is reported), so one option moves a whole run. With no logger
    configured, the run logs to CSV files in ``runs/x/logs/version_<n>/metrics.csv``."""
    output_dir = config.get("output_dir")
    if not output_dir:
        return
    checkpoints = str(Path(output_dir) / "checkpoints")
    _replace(config, "trainer.default_root_dir", output_dir)
    if config.get("checkpoint") is not None:
        _replace(config, "checkpoint.dirpath", checkpoints)
    loggers = config.get("trainer.logger")
    if loggers is None or loggers is True:  # Lightning's default logger: a CSV log in the run's folder
        config["trainer.logger"] = loggers = Namespace(
            class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir=output_dir, name="logs")
        )
    for index, logger in enumerate(loggers if isinstance(loggers, list) else [loggers]):
        if _class_arguments(logger) is not None and "save_dir" in _class_arguments(logger):
            key = f"trainer.logger.{index}.init_args.save_dir" if isinstance(loggers, list) else "trainer.logger.init_args.save_dir"
            _replace(config, key, output_dir, target=logger["init_args"], name="save_dir")
    for index, callback in enumerate(config.get("trainer.callbacks") or []):
        if _is_subclass(callback, "lightning.pytorch.callbacks.ModelCheckpoint"):
            _replace(config, f"trainer.callbacks.{index}.init_args.dirpath", checkpoints, target=callback["init_args"], name="dirpath")


def _replace(config: Any, key: str, value: str, target: Any = None, name: str | None = None) -> None:
    target, name = (config, key) if target is None else (target, name)
    old = target.get(name)
    if old not in (None, "", value):
        rank_zero_info(f"output_dir: {key} {old} -> {value}")
    target[name] = value


def _class_arguments(entry: Any) -> Any:
    """``init_args`` of a ``class_path`` entry of a parsed config (``None`` for ``True``/``False``/``None``)."""
    if entry is None or isinstance(entry, bool) or not hasattr(entry, "get"):
        return None
    return entry.get("init_args")


def _is_subclass(entry: Any, base: str | type | tuple[type, ...]) -> bool:
    """Whether a ``class_path`` entry of a parsed config names a subclass of ``base`` (a class, classes, or
    an import path)."""
    if _class_arguments(entry) is None or not entry.get("class_path"):
        return False
    from jsonargparse.typing import import_object  # type: ignore[attr-defined]

    try:
        return issubclass(import_object(entry["class_path"]), import_object(base) if isinstance(base, str) else base)
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def replace_token_methods(config: Any, methods: list[Any]) -> None:
    """Drop the token methods (``TokenMethod`` / ``BatchTokenMethod`` callbacks) from a parsed config's
    ``trainer.callbacks`` and add ``methods`` (parsed ``class_path`` entries) in their place, before the
    other callbacks; what a ``compare`` run does to its base config."""
    from lightning_tokens.core.method import BatchTokenMethod, TokenMethod

    callbacks = config.get("trainer.callbacks") or []
    others = [entry for entry in callbacks if not _is_subclass(entry, (TokenMethod, BatchTokenMethod))]
    config["trainer.callbacks"] = [*methods, *others]


# ---- the offline steps: a model and a datamodule run outside fit, on the trainer's root device ----------
def attach_to_trainer(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """Connect a model and a datamodule to a trainer outside ``fit``, as the offline subcommands
    (``score``, ``star_score``, ``generic_labels``) need: the datamodule reads the model's tokenizer
    through the trainer, and the work runs on the trainer's root device."""
    trainer.strategy.connect(model)
    datamodule.trainer = trainer
    model.trainer = trainer


def trainer_score(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    ckpt_path: str | None = None,
    trust_checkpoint: bool = False,
) -> dict[int, Tensor]:
    """``Trainer.score``: connect the model (datamodules may read its tokenizer), load a checkpoint's
    weights if given (safely unless ``trust_checkpoint``), and score on the trainer's root device."""
    attach_to_trainer(trainer, model, datamodule)
    if ckpt_path:
        from lightning_tokens.modules.checkpoints import consolidated_state_dict, model_weights

        model.configure_model()
        state: dict[str, Any] = consolidated_state_dict(ckpt_path, trust_checkpoint)
        model.load_state_dict(model_weights(state["state_dict"]))
    return score_reference(model, datamodule, output, device=trainer.strategy.root_device)


def trainer_star_score(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    guardrail: Guardrail,
    chunk_size: int = 5,
    chunk_prefix: ChunkPrefix = "chunk_end",
) -> dict[int, Tensor]:
    """``Trainer.star_score``: STAR values of the datamodule's training data with ``guardrail``.

    The model is only connected (datamodules read its tokenizer; its weights are not loaded); the
    guardrail runs on the trainer's root device.
    """
    attach_to_trainer(trainer, model, datamodule)
    return precompute_star_scores(
        guardrail,
        datamodule,
        output,
        chunk_size,
        getattr(model, "tokenizer", None),
        chunk_prefix=chunk_prefix,
        device=trainer.strategy.root_device,
    )


def trainer_generic_labels(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    reinforced_adapter: str,
    anchors_file: str,
    alpha: float = 5.0,
    targets: Literal["hard", "soft"] = "hard",
    top_k: int = 20,
    seen_penalty: float = 10.0,
) -> dict[int, GenericTargets]:
    """``Trainer.generic_labels``: connect the model (the datamodule reads its tokenizer) and build the
    generic targets on the trainer's root device (see :func:`~lightning_tokens.callbacks.unlearning.build_generic_labels`
    for the arguments)."""
    attach_to_trainer(trainer, model, datamodule)
    return build_generic_labels(
        model, datamodule, output, reinforced_adapter, anchors_file, alpha, targets, top_k, seen_penalty,
        device=trainer.strategy.root_device,
    )


@contextmanager
def _checked_checkpoint(ckpt_path: Any, trust: bool) -> Iterator[None]:
    """Around Lightning's own loading of ``ckpt_path``: a sharded folder's metadata is checked first, and
    torch's refusal of a single file under ``weights_only`` becomes the library's one-line error."""
    from lightning_tokens.modules.checkpoints import check_sharded_metadata, is_sharded_checkpoint, untrusted_checkpoint_error

    if ckpt_path is not None and is_sharded_checkpoint(ckpt_path):  # not for names such as `last`
        check_sharded_metadata(ckpt_path, trust)
    try:
        yield
    except pickle.UnpicklingError as error:
        raise untrusted_checkpoint_error(ckpt_path, error) from None


def _weights_only(weights_only: bool | None, trust: bool) -> bool | None:
    return False if trust else weights_only


class TokensTrainer(pl.Trainer):
    """Lightning's Trainer plus the offline steps as subcommands: ``score`` (per-token reference losses),
    ``star_score`` (STAR-DSS guardrail values), ``generic_labels`` (WHP unlearning targets) and ``export``.

    Every subcommand that reads a checkpoint loads it safely (tensors, containers and allowlisted library
    types only; :mod:`lightning_tokens.modules.checkpoints`) unless ``trust_checkpoint`` is set.
    """

    @override
    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        """Lightning's ``fit``, with safe checkpoint loading.

        Args:
            model: the module to train.
            train_dataloaders: training data (or use ``datamodule``).
            val_dataloaders: validation data.
            datamodule: the datamodule.
            ckpt_path: a checkpoint file or sharded folder to resume from (or ``last``, ``best``, ...).
            weights_only: Lightning's own switch for ``torch.load`` (``None``: torch's safe default).
            trust_checkpoint: load ``ckpt_path`` as it is, without the safe-loading allowlist (a file you trust).
        """
        with _checked_checkpoint(ckpt_path, trust_checkpoint):
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, _weights_only(weights_only, trust_checkpoint))

    @override
    def validate(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | Path | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        weights_only: bool | None = None,
        trust_checkpoint: bool = False,
    ) -> list[Mapping[str, float]]:
        """Lightning's ``validate``; ``trust_checkpoint`` as in :meth:`fit`."""
        with _checked_checkpoint(ckpt_path, trust_checkpoint):
            return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, _weights_only(weights_only, trust_checkpoint))

    @override
    def test(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | Path | None = None,
        verbose: bool = True,
        datamodule: pl.LightningDataModule | None = None,
        weights_only: bool | None = None,
        trust_checkpoint: bool = False,
    ) -> list[Mapping[str, float]]:
        """Lightning's ``test``; ``trust_checkpoint`` as in :meth:`fit`."""
        with _checked_checkpoint(ckpt_path, trust_checkpoint):
            return super().test(model, dataloaders, ckpt_path, verbose, datamodule, _weights_only(weights_only, trust_checkpoint))

    @override
    def predict(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
        trust_checkpoint: bool = False,
    ) -> Any:
        """Lightning's ``predict``; ``trust_checkpoint`` as in :meth:`fit`."""
        with _checked_checkpoint(ckpt_path, trust_checkpoint):
            return super().predict(
                model, dataloaders, datamodule, return_predictions, ckpt_path, _weights_only(weights_only, trust_checkpoint)
            )

    def score(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        output: str = "reference_scores.safetensors",
        ckpt_path: str | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        """Score the datamodule's training examples with ``model`` and write per-token losses to ``output``.

        Args:
            model: the reference model (its config is the ``model`` section).
            datamodule: the training data, exactly as training will see it (same tokenizer and ids).
            output: the safetensors file to write; give it to ``reference.scores_file`` (mode ``offline``).
            ckpt_path: optional checkpoint whose weights the reference takes.
            trust_checkpoint: load ``ckpt_path`` without the safe-loading allowlist (a file you trust).
        """
        trainer_score(self, model, datamodule, output, ckpt_path, trust_checkpoint)

    def star_score(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        guardrail: Guardrail,
        output: str = "star_scores.safetensors",
        chunk_size: int = 5,
        chunk_prefix: ChunkPrefix = "chunk_end",
    ) -> None:
        """STAR-DSS: score every training response's chunk prefixes with a guardrail, write per-token
        P(safe) to ``output`` for ``SafetyShaping(scores_file=...)``.

        Args:
            model: the module whose tokenizer the datamodule uses.
            datamodule: the training data.
            guardrail: a :class:`~lightning_tokens.models.guardrails.Guardrail` (``class_path`` + ``init_args``).
            output: the safetensors file to write.
            chunk_size: tokens per chunk (M).
            chunk_prefix: which prefix scores a chunk (see ``SafetyShaping``).
        """
        trainer_star_score(self, model, datamodule, output, guardrail, chunk_size, chunk_prefix)

    def generic_labels(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        output: str = "generic_labels.safetensors",
        reinforced_adapter: str = "runs/whp/reinforced_adapter",
        anchors_file: str = "data/examples/whp/anchors.json",
        alpha: float = 5.0,
        targets: Literal["hard", "soft"] = "hard",
        top_k: int = 20,
        seen_penalty: float = 10.0,
    ) -> None:
        """Who's Harry Potter step 2: generic targets ``v_base - alpha·ReLU(v_reinforced - v_base)`` for
        every training example, written to ``output`` for ``GenericLabels(targets_file=...)``.

        Args:
            model: the baseline (no LoRA).
            datamodule: the target corpus.
            output: the safetensors file to write.
            reinforced_adapter: the LoRA adapter folder (or full model folder) of the reinforced model.
            anchors_file: JSON dictionary of anchored terms → generic translations.
            alpha: the strength α.
            targets: ``hard`` (argmax labels) or ``soft`` (top-k distributions, hard labels too).
            top_k: kept entries of each soft distribution.
            seen_penalty: how much translations of anchors already seen are lowered.
        """
        trainer_generic_labels(
            self, model, datamodule, output, reinforced_adapter, anchors_file, alpha, targets, top_k, seen_penalty
        )


    def export(
        self,
        model: pl.LightningModule,
        ckpt_path: str,
        output: str = "export",
        format: Literal["hf", "state_dict"] = "hf",
        datamodule: pl.LightningDataModule | None = None,
        trust_checkpoint: bool = False,
    ) -> None:
        """Consolidate a training checkpoint (a ``.ckpt`` file or the folder a sharded FSDP run saves)
        into one artefact, on one process.

        Args:
            model: the module as configured for training (same model, LoRA, reference).
            ckpt_path: checkpoint file or sharded checkpoint folder.
            output: ``hf``: a folder for ``from_pretrained`` (LoRA adapter in peft's format, or the full
                model) with the tokenizer; ``state_dict``: one ``torch.save`` file.
            format: ``hf`` or ``state_dict``.
            datamodule: unused (lets ``export`` read the training config as is).
            trust_checkpoint: load ``ckpt_path`` without the safe-loading allowlist (a file you trust).
        """
        from lightning_tokens.modules.checkpoints import export_checkpoint

        export_checkpoint(model, ckpt_path, output, format, trust_checkpoint)
        rank_zero_info(f"exported {ckpt_path} ({format}) to {output}")


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
        config = self.config[self.subcommand] if self.subcommand else self.config
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


#: Messages of other libraries that every run prints and the library cannot fix at the source; the
#: ``lightning-tokens`` command silences them (``import lightning_tokens`` does not touch warning filters).
#: Warnings: (message regex, category, origin). Log lines: (logger name, message prefix, origin).
KNOWN_THIRD_PARTY_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, "Lightning 2.6's _pytree under torch 2.14"),
]
KNOWN_THIRD_PARTY_LOG_LINES: list[tuple[str, str, str]] = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging", "Lightning's LitLogger advert"),
]


def silence_known_third_party_messages() -> None:
    """Install the filters of :data:`KNOWN_THIRD_PARTY_WARNINGS` and :data:`KNOWN_THIRD_PARTY_LOG_LINES`."""
    import logging
    import warnings

    for message, category, _ in KNOWN_THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix, _ in KNOWN_THIRD_PARTY_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(getattr(f, "prefix", None) == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))


class _DropPrefix:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


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
        else:
            cli(None if args is None else remaining)
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None or debug:
            raise
        print(f"lightning-tokens: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(error: BaseException) -> LightningTokensError | None:
    """The library's user error behind ``error``: itself, or what a wrapper (jsonargparse re-raises errors
    of ``__init__`` as its own) was caused by."""
    seen = 0
    while error is not None and seen < 16:
        if isinstance(error, LightningTokensError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


if __name__ == "__main__":
    main()
