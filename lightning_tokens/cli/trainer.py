"""``TokensTrainer``: Lightning's Trainer with safe checkpoint loading and the offline steps as methods
(so that LightningCLI makes them subcommands)."""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_tokens.analysis.steering.vectors import GrainsSettings
from lightning_tokens.callbacks.safety_shaping import ChunkPrefix
from lightning_tokens.cli.offline_steps import trainer_divergence, trainer_generic_labels, trainer_score, trainer_star_score
from lightning_tokens.models.guardrails import Guardrail


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

    def divergence(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        base: str,
        tuned: str,
        output: str = "divergence",
        num_prompts: int = 64,
        max_new_tokens: int | None = None,
        reward: str = "lightning_tokens.rewards.nupa_exact_match",
        split: Literal["val", "test"] = "test",
        epsilon: float = 0.05,
        near_zero: float = 1e-3,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        overlap_k: int = 5,
        seed: int = 0,
    ) -> None:
        """Where a tuned model differs from its base, token by token ("Sparse but Critical", arXiv 2603.22446):
        JS divergence along the tuned model's samples, top-k overlap, and cross-sampling accuracy. Writes
        ``summary.json``, ``tokens.csv`` and ``divergence.png`` to ``output``.

        Args:
            model: the module whose tokenizer (and vocabulary, dtype) the two models use.
            datamodule: prompts (generation batches) and the reward's columns.
            base: the base model (local folder, hub id, preset, packaged name).
            tuned: the tuned model (e.g. a folder written by ``export``).
            output: the folder to write.
            num_prompts: prompts taken from ``split``.
            max_new_tokens: completion length (default: the module's or the datamodule's).
            reward: import path of the reward function that scores accuracy.
            split: ``val`` or ``test``.
            epsilon: cross-sampling threshold on JS (nats).
            near_zero: positions with JS below it count as unchanged.
            temperature: sampling temperature (the distributions compared are tempered too).
            top_k: top-k truncation of both distributions (0: none).
            top_p: top-p truncation (1: none).
            overlap_k: k of the top-k overlap.
            seed: sampling seed (every run of a batch starts from the same one).
        """
        trainer_divergence(
            self, model, datamodule, base, tuned, output, num_prompts, max_new_tokens, reward, split,
            epsilon=epsilon, near_zero=near_zero, temperature=temperature, top_k=top_k, top_p=top_p,
            overlap_k=overlap_k, seed=seed,
        )

    def steer(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        pairs_file: str = "data/grains/steer.jsonl",
        output: str = "runs/grains",
        eval_file: str | None = None,
        num_pairs: int | None = None,
        layers: list[int] | None = None,
        grains: GrainsSettings | None = None,
    ) -> None:
        """GrAInS (arXiv 2507.18043): steering vectors from contrastive integrated gradients over
        (prompt, preferred, dispreferred) pairs, one per decoder layer, saved to ``output``
        (``vectors.pt``, ``metadata.json``, ``report.json``) for the ``Steering`` callback.

        Args:
            model: the module whose language model (and tokenizer) is steered.
            datamodule: unused (lets ``steer`` read a training config as is).
            pairs_file: JSONL of ``{"prompt", "preferred", "dispreferred"}`` records.
            output: the folder to write.
            eval_file: held-out pairs of the same format: their preference margins (last answer token)
                and accuracy without and with steering go to ``report.json``.
            num_pairs: use the first ``num_pairs`` pairs only (GrAInS: 50).
            layers: decoder blocks to keep vectors for (default: all).
            grains: the method's settings (top_k, steps, target, layer, alpha, mode, method, norm_dim...).
        """
        from lightning_tokens.analysis.steering.command import trainer_steer

        trainer_steer(self, model, pairs_file, output, eval_file, num_pairs, layers, grains)

    def saliency(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        output: str = "saliency",
        base: str | None = None,
        tuned: str | None = None,
        split: Literal["train", "val"] = "train",
        num_examples: int = 8,
        ckpt_path: str | None = None,
        trust_checkpoint: bool = False,
        threshold: float = 1.1,
        width: int = 96,
    ) -> None:
        """Token saliency map (FaGeL, arXiv 2412.20297): per response token, ``log p(y_t | positive context) -
        log p(y_t | negative context)`` under one model (a ContrastiveDataModule's paired records), or, with
        ``tuned``, ``log p_tuned(y_t) - log p_base(y_t)``. Writes ``saliency.png``, ``saliency.html`` (values on
        hover), ``saliency.json``, ``saliency_tokens.csv`` and ``summary.json`` to ``output``.

        Args:
            model: the module (its tokenizer; its weights score the contexts unless ``base`` or ``tuned`` is set).
            datamodule: the records (ContrastiveDataModule, file order; any datamodule with ``tuned``).
            output: the folder to write.
            base: the model before fine-tuning (local folder, hub id, preset, packaged name).
            tuned: the fine-tuned model (a folder ``export`` wrote: full model or LoRA adapter).
            split: ``train`` or ``val``.
            num_examples: records shown.
            ckpt_path: a training checkpoint whose weights the module takes (contexts mode).
            trust_checkpoint: load ``ckpt_path`` without the safe-loading allowlist (a file you trust).
            threshold: CUT's ``λ``: tokens with ``p(neg) / p(pos) > λ`` are marked flagged on hover.
            width: characters per line of the PNG.
        """
        from lightning_tokens.analysis.saliency import saliency_command

        saliency_command(self, model, datamodule, output, base, tuned, split, num_examples, ckpt_path, trust_checkpoint, threshold, width)

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

    def extract_codes(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        ckpt_path: str,
        output: str = "codes.safetensors",
        trust_checkpoint: bool = False,
    ) -> None:
        """Encode every training and validation image with a trained image tokenizer and write the full-length
        codes and class ids to ``output`` (and the code vocabulary to ``<output stem>.tokenizer/``), for
        ``ImageCodesDataModule``.

        Args:
            model: the image tokenizer as configured for training (``FlexibleImageTokenizer``).
            datamodule: its images (``ImageDataModule``: classes of ``digits``, −1 for other sources).
            ckpt_path: the tokenizer's checkpoint.
            output: the safetensors file to write.
            trust_checkpoint: load ``ckpt_path`` without the safe-loading allowlist (a file you trust).
        """
        from lightning_tokens.cli.offline_steps import trainer_extract_codes

        trainer_extract_codes(self, model, datamodule, ckpt_path, output, trust_checkpoint)

    def speech_tokens(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule,
        ckpt_path: str,
        output: str = "speech_tokens.jsonl",
        trust_checkpoint: bool = False,
    ) -> dict[str, str]:
        """Tokenize every utterance of a speech dataset with a trained speech tokenizer: each manifest is written
        again with the records' ``speech_tokens`` (25 per second), for ``DualSpeechLM``.

        Args:
            model: the speech tokenizer as configured for training (``SpeechTokenizer``).
            datamodule: its data (``SpeechDataModule``: ``train_file``, ``val_file``, ``test_file``).
            ckpt_path: the tokenizer's checkpoint.
            output: the training manifest to write; the others go beside it as ``<stem>.val.jsonl`` and
                ``<stem>.test.jsonl``.
            trust_checkpoint: load ``ckpt_path`` without the safe-loading allowlist (a file you trust).
        """
        from lightning_tokens.cli.offline_steps import trainer_speech_tokens

        return trainer_speech_tokens(self, model, datamodule, ckpt_path, output, trust_checkpoint)
