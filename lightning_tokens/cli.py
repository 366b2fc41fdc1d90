"""The ``lightning-tokens`` command: Lightning's CLI over every module and datamodule of the library.

    lightning-tokens fit --config configs/quickstart.yaml
    lightning-tokens validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    lightning-tokens predict --config configs/quickstart.yaml --ckpt_path ... --predictions.output answers.jsonl
    lightning-tokens score --config reference.yaml --output reference_scores.safetensors
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

# imported so that YAML can name classes by their short names (TokenLM, DFT, NUPADataModule, ...)
import lightning_tokens.callbacks  # noqa: F401
import lightning_tokens.datamodules  # noqa: F401
import lightning_tokens.modules  # noqa: F401
from lightning_tokens.callbacks.prediction_writer import JSONLPredictionWriter


class TokensTrainer(pl.Trainer):
    """Lightning's Trainer plus ``score``: offline per-token reference losses (a CLI subcommand)."""

    def score(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        output: str = "reference_scores.safetensors",
        ckpt_path: str | None = None,
    ) -> None:
        """Score the datamodule's training examples with ``model`` and write per-token losses to ``output``.

        Args:
            model: the reference model (its config is the ``model`` section).
            datamodule: the training data, exactly as training will see it (same tokenizer and ids).
            output: the safetensors file to write; give it to ``reference.scores_file`` (mode ``offline``).
            ckpt_path: optional checkpoint whose weights the reference takes.
        """
        from lightning_tokens.scoring import trainer_score

        trainer_score(self, model, datamodule, output, ckpt_path)


class TokensCLI(LightningCLI):
    """LightningCLI with a ``score`` subcommand and the prediction writer as ``--predictions.output``."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "score": {"model", "datamodule"}}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(JSONLPredictionWriter, "predictions")


def cli(args: list[str] | None = None, run: bool = True) -> TokensCLI:
    """Build (and by default run) the CLI; ``args`` as on the command line, ``None`` reads ``sys.argv``."""
    return TokensCLI(
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


def main() -> None:
    """Console-script entry point (its return value would become the exit status)."""
    cli()


if __name__ == "__main__":
    main()
