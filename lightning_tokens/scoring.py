"""Offline reference scoring: per-token losses of a model on a datamodule's training data, once.

``lightning-tokens score --config reference.yaml --output scores.safetensors`` runs this with the
config's model as the reference; training then uses ``reference: {mode: offline, scores_file: ...}``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_tokens.core.reference import save_reference_scores
from lightning_tokens.core.stats import TokenStats


@torch.no_grad()
def score_reference(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    device: torch.device | str = "cpu",
) -> dict[int, Tensor]:
    """Per-token NLL of ``model`` on every training example, keyed by example id, written to ``output``.

    The model must offer ``hidden_states(batch)`` and ``output_head()`` (``TokenLM`` does). Each stored
    tensor is indexed like the example's own label positions (0 where a position has no label), which
    is how :func:`~lightning_tokens.core.reference.lookup_reference_nll` reads it back, packed or not.

    Example::

        scores = score_reference(TokenLM(model="smollm2-135m-instruct"), SFTDataModule(...), "ref.safetensors")
    """
    model.configure_model()
    model.to(device).eval()
    datamodule.setup("fit")
    scores: dict[int, Tensor] = {}
    packed: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for batch in datamodule.train_dataloader():
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        hidden = model.hidden_states(batch)
        head = model.output_head()
        nll = TokenStats(batch["labels"], hidden=hidden, head=head, backend=getattr(model, "token_loss_backend", "auto")).nll.cpu()
        token_ids = batch.get("token_example_ids")
        if token_ids is not None and "example_id" not in batch:
            ids, positions = token_ids.cpu(), batch["position_ids"].cpu()
            for key in ids.unique().tolist():
                if key >= 0:
                    where = ids == key
                    packed.setdefault(int(key), []).append((positions[where], nll[where]))
            continue
        lengths = batch["attention_mask"].sum(-1).cpu() if batch.get("attention_mask") is not None else None
        for row, key in enumerate(batch["example_id"].cpu().tolist()):
            length = int(lengths[row]) if lengths is not None else nll.shape[1]
            scores[int(key)] = nll[row, :length].clone()
    for key, parts in packed.items():
        size = max(int(pos.max()) for pos, _ in parts) + 1
        values = torch.zeros(size)
        for pos, vals in parts:
            values[pos] = vals
        scores[key] = values
    save_reference_scores(output, scores)
    rank_zero_info(f"reference scores of {len(scores)} examples written to {output}")
    return scores


def attach_to_trainer(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """Connect a model and a datamodule to a trainer outside ``fit``, as the offline subcommands
    (``score``, ``star_score``, ``generic_labels``) need: the datamodule reads the model's tokenizer
    through the trainer, and the work runs on the trainer's root device."""
    trainer.strategy.connect(model)
    datamodule.trainer = trainer
    model.trainer = trainer


def trainer_score(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule, output: str, ckpt_path: str | None = None) -> dict[int, Tensor]:
    """``Trainer.score``: connect the model (datamodules may read its tokenizer), load a checkpoint's
    weights if given, and score on the trainer's root device."""
    attach_to_trainer(trainer, model, datamodule)
    if ckpt_path:
        from lightning_tokens.modules.checkpoints import consolidated_state_dict, model_weights

        model.configure_model()
        state: dict[str, Any] = consolidated_state_dict(ckpt_path)
        model.load_state_dict(model_weights(state["state_dict"]))
    return score_reference(model, datamodule, output, device=trainer.strategy.root_device)
