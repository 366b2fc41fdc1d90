"""The offline steps (``score``, ``star_score``, ``generic_labels``): a model and a datamodule run
outside ``fit``, on the trainer's root device."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from torch import Tensor

from lightning_tokens.callbacks.safety_shaping import ChunkPrefix, precompute_star_scores
from lightning_tokens.callbacks.unlearning import GenericTargets, build_generic_labels
from lightning_tokens.core.reference_scores import score_reference
from lightning_tokens.models.guardrails import Guardrail


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
