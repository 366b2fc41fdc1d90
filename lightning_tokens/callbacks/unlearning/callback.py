"""The WHP Lightning callbacks: train on the generic targets (:class:`GenericLabels`, step 3) and save the trained
model or adapter when ``fit`` ends (:class:`SavePretrained`, step 1)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_tokens.callbacks.unlearning.functional import soft_target_loss
from lightning_tokens.callbacks.unlearning.targets_file import (
    GenericTargets,
    load_generic_targets,
    lookup_generic_targets,
)
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import IGNORE_INDEX, TokenStats

__all__ = ["GenericLabels", "SavePretrained"]

TargetMode = Literal["hard", "soft"]
_IDS, _PROBS = "generic_topk_ids", "generic_topk_probs"


class GenericLabels(TokenMethod):
    """WHP unlearning: train on the generic targets built from a reinforced model and anchored terms.

    Reads the file of ``lightning-tokens generic_labels``
    (:func:`~lightning_tokens.callbacks.unlearning.build_generic_labels`) and, before each training forward,
    looks up every token's target by ``example_id`` / packed ``token_example_ids`` + ``position_ids`` (the
    tokens must be the ones the targets were built on):

    - ``mode="hard"`` (pre-forward): ``batch["labels"]`` becomes the generic labels, -100 where the file
      has none (repeated anchored terms, tokens inside a term, tokens without a label in the data). Any
      module honours it; the loss is the cross-entropy to the new labels.
    - ``mode="soft"`` (post-forward): the labels are set the same way (the generic argmax, so composed
      methods such as DFT see the generic label), and the per-token loss is replaced by
      :func:`soft_target_loss` on ``stats.logprobs(topk_ids)``: log-probabilities of the k stored ids
      only, never the full ``tokens × vocab`` logits.

    Validation and test losses stay the plain NLL of the *original* text (callbacks act in training
    only), so ``val/loss`` on the corpus measures forgetting.

    Ambiguities, with the choices made:
        - hard or soft targets: the paper's Sec. 3 says it takes "the token with maximal logit" as the
          generic *prediction label*, so ``mode="hard"`` is the default; ``soft`` (a secondary note's
          reading, a distillation to the full generic distribution) is the option.
        - soft targets truncated to top-k (the file keeps ``top_k`` ids per token): renormalised over the
          k ids by default (``renormalize=True``), the usual top-k distillation; with ``False`` the
          missing mass is simply not trained.

    Args:
        targets_file: the safetensors file of the generic-labels step (checked at setup, so a config
            naming a file still to be built parses).
        mode: ``hard`` (generic argmax labels) or ``soft`` (cross-entropy to the top-k generic
            distribution; the file must have been built with ``targets=soft``).
        renormalize: ``soft``: renormalise the top-k probabilities to sum to 1.

    Logs ``target_fraction`` (labelled tokens that keep a target) and ``changed_fraction`` (targets that
    differ from the text's token).

    Example::

        model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings())
        trainer = L.Trainer(max_steps=150, callbacks=[GenericLabels("runs/whp/generic_labels.safetensors")])
        trainer.fit(model, datamodule=SFTDataModule(train_file="data/examples/whp/corpus.jsonl"))
    """

    language_model_only: ClassVar[bool] = True  # its generic labels index the language model's tokens

    def __init__(self, targets_file: str, mode: TargetMode = "hard", renormalize: bool = True) -> None:
        check_choice("GenericLabels", "mode", mode, ("hard", "soft"))
        self.targets_file = targets_file
        self.mode = mode
        self.renormalize = renormalize
        self._targets: dict[int, GenericTargets] | None = None
        self._logs: dict[str, torch.Tensor] = {}

    def _load(self) -> dict[int, GenericTargets]:
        if self._targets is None:
            targets, metadata = load_generic_targets(self.targets_file)
            if self.mode == "soft" and metadata.get("targets") != "soft":
                raise ConfigError(
                    f"GenericLabels(mode='soft') needs soft targets but {self.targets_file!r} holds "
                    f"{metadata.get('targets')!r} targets: rebuild it with targets=soft, or use mode='hard'."
                )
            self._targets = targets
        return self._targets

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._load()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        original = batch["labels"]
        labels, ids, probs = lookup_generic_targets(self._load(), batch, soft=self.mode == "soft", source=self.targets_file)
        scored = original != IGNORE_INDEX
        scored[:, 0] = False
        has = labels != IGNORE_INDEX
        self._logs = {
            "target_fraction": has.sum().float() / scored.sum().clamp(min=1),
            "changed_fraction": (has & (labels != original)).sum().float() / has.sum().clamp(min=1),
        }
        batch["labels"] = labels
        if self.mode == "soft":
            batch[_IDS], batch[_PROBS] = ids, probs

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        logs = dict(self._logs)
        if self.mode == "hard":
            return TokenMethodOutput(logs=logs)
        ids, probs = stats.batch.get(_IDS), stats.batch.get(_PROBS)
        if ids is None or probs is None:
            raise RuntimeError("GenericLabels(mode='soft') found no soft targets in the batch (on_train_batch_start did not run).")
        loss = soft_target_loss(stats.logprobs(ids.to(stats.labels.device)), probs.to(stats.labels.device), self.renormalize)
        loss = torch.where(stats.mask, loss, torch.zeros_like(loss))
        return TokenMethodOutput(loss=loss, logs=logs)


class SavePretrained(pl.Callback):
    """Save the trained model in Hugging Face format when ``fit`` ends: with LoRA, the adapter alone
    (peft's format), else the full model; with the tokenizer (``TokenLM.save_pretrained``).

    Step 1 of WHP unlearning writes the reinforced adapter with it; the generic-labels step reads it.

    Args:
        dirpath: the folder to write.

    Example::

        trainer = L.Trainer(callbacks=[SavePretrained("runs/whp/reinforced_adapter")])
        trainer.fit(TokenLM(model="smollm2-135m-instruct", lora=LoRASettings()), datamodule=...)
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = dirpath

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(pl_module)

    @rank_zero_only
    def _save(self, pl_module: pl.LightningModule) -> None:
        save = getattr(pl_module, "save_pretrained", None)
        if save is None:
            raise TypeError(f"SavePretrained needs a module with save_pretrained(path) (TokenLM), got {type(pl_module).__name__}.")
        os.makedirs(self.dirpath, exist_ok=True)
        save(self.dirpath)
