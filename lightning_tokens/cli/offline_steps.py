"""The offline steps (``score``, ``star_score``, ``generic_labels``): a model and a datamodule run
outside ``fit``, on the trainer's root device."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
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


def trainer_divergence(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    base: str,
    tuned: str,
    output: str,
    num_prompts: int,
    max_new_tokens: int | None,
    reward: str,
    split: Literal["val", "test"],
    **settings: Any,
) -> dict[str, float]:
    """``Trainer.divergence``: load ``base`` and ``tuned`` frozen (the module's vocabulary and dtype), take
    ``num_prompts`` prompts of the datamodule's ``split``, and write the report to ``output``."""
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_tokens.analysis import divergence_report
    from lightning_tokens.core.errors import ConfigError
    from lightning_tokens.rewards import resolve_reward

    attach_to_trainer(trainer, model, datamodule)
    load = getattr(model, "load_frozen_causal_lm", None)
    if load is None:
        raise ConfigError(f"divergence loads the two models through a TokenLM-like module; got {type(model).__name__}.")
    device = trainer.strategy.root_device
    base_model, tuned_model = load(base).to(device), _load_tuned(load, base, tuned).to(device)
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    if max_new_tokens is None:
        max_new_tokens = getattr(model, "max_new_tokens", None) or getattr(datamodule, "generation_max_new_tokens", 16)
    batches, seen = [], 0
    for batch in loader:
        if "prompt_input_ids" not in batch:
            raise ConfigError(f"the {split} batches have no prompt_input_ids: use a datamodule with generation batches (NUPADataModule).")
        take = min(num_prompts - seen, batch["prompt_input_ids"].shape[0])
        batches.append({k: (v[:take].to(device) if hasattr(v, "to") else v[:take]) for k, v in batch.items()})
        seen += take
        if seen >= num_prompts:
            break
    report = divergence_report(
        base_model, tuned_model, model.tokenizer, batches, resolve_reward(reward)[1], max_new_tokens=int(max_new_tokens), **settings
    )
    paths = report.write(output)
    rank_zero_info(", ".join(f"{k}={v:.4f}" for k, v in report.summary.items()) + f"\nwritten: {', '.join(paths.values())}")
    return report.summary


def load_trained_weights(model: pl.LightningModule, ckpt_path: str, trust_checkpoint: bool = False) -> None:
    """Build ``model`` (``configure_model``) and load a training checkpoint's weights into it strictly (safely
    unless ``trust_checkpoint``), through the module's own ``on_load_checkpoint``: what the module leaves out of
    its checkpoints (a tokenizer's frozen networks) is put back there, so every other key must match."""
    from lightning_tokens.modules.checkpoints import consolidated_state_dict, model_weights

    model.configure_model()
    checkpoint = consolidated_state_dict(ckpt_path, trust_checkpoint)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(model_weights(checkpoint["state_dict"]))


def trainer_extract_codes(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str,
    output: str,
    trust_checkpoint: bool = False,
) -> dict[str, Tensor]:
    """``Trainer.extract_codes``: load the tokenizer's weights (safely unless ``trust_checkpoint``), encode
    the datamodule's training then validation images in order on the trainer's root device, and write
    the codes file and its vocabulary folder."""
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_tokens.core.errors import ConfigError
    from lightning_tokens.datamodules.image_codes import extract_codes, save_codes, write_code_tokenizer

    if not hasattr(model, "encode") or not hasattr(model, "size"):
        raise ConfigError(f"extract_codes needs an image tokenizer model (FlexibleImageTokenizer); got {type(model).__name__}.")
    attach_to_trainer(trainer, model, datamodule)
    load_trained_weights(model, ckpt_path, trust_checkpoint)
    ordered = getattr(datamodule, "ordered_dataloader", None)
    if ordered is not None:
        loaders = [loader for loader in (ordered("train"), ordered("val")) if loader is not None]
    else:
        datamodule.setup("fit")
        loaders = [datamodule.train_dataloader()]
    parts = [extract_codes(model, loader, device=trainer.strategy.root_device) for loader in loaders]
    tensors = {key: torch.cat([part[key] for part in parts]) for key in ("codes", "labels")}
    num_classes = getattr(datamodule, "num_classes", None)
    num_classes = int(tensors["labels"].max()) + 1 if num_classes is None else int(num_classes)
    size = model.size
    save_codes(output, tensors, size.codebook_size, num_classes, size.image_size, str(ckpt_path))
    folder = write_code_tokenizer(output, num_classes, size.codebook_size)
    rank_zero_info(f"codes of {len(tensors['codes'])} images ({size.num_tokens} each) written to {output}; vocabulary: {folder}")
    return tensors


def _load_tuned(load: Any, base: str, tuned: str) -> Any:
    """A full model folder, or a peft adapter folder (what ``export`` writes for a LoRA run) merged into a
    copy of ``base``."""
    import os

    if not os.path.isfile(os.path.join(tuned, "adapter_config.json")):
        return load(tuned)
    from lightning_tokens.modules.lazy_backends import hide_unused_bitsandbytes, import_peft

    with hide_unused_bitsandbytes():
        merged = import_peft().PeftModel.from_pretrained(load(base), tuned).merge_and_unload()
    return merged.eval().requires_grad_(False)


def speech_token_files(output: str, splits: list[str]) -> dict[str, str]:
    """Where ``speech_tokens`` writes each split: ``output`` for ``train``, ``<stem>.<split><suffix>`` beside it
    for the others.

    Example:
        >>> speech_token_files("runs/tokens.jsonl", ["train", "val"])
        {'train': 'runs/tokens.jsonl', 'val': 'runs/tokens.val.jsonl'}
    """
    import os

    stem, suffix = os.path.splitext(output)
    return {split: output if split == "train" else f"{stem}.{split}{suffix or '.jsonl'}" for split in splits}


def trainer_speech_tokens(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str,
    output: str,
    trust_checkpoint: bool = False,
) -> dict[str, str]:
    """``Trainer.speech_tokens``: load a speech tokenizer's weights (safely unless ``trust_checkpoint``), encode
    every utterance of the datamodule's manifests (``train_file``, ``val_file``, ``test_file``) in order on the
    trainer's root device, and write each manifest again with its records' ``speech_tokens`` (audio paths made
    relative to the new file's folder). Returns ``{split: file written}``."""
    import json
    import os

    from lightning.pytorch.utilities import rank_zero_info

    from lightning_tokens.core.errors import ConfigError
    from lightning_tokens.datamodules.speech import load_audio, read_speech_manifest

    files = getattr(datamodule, "files", None)
    if not hasattr(model, "encode") or not isinstance(files, dict):
        raise ConfigError(
            "speech_tokens needs a speech tokenizer model (SpeechTokenizer) and a SpeechDataModule; got "
            f"{type(model).__name__} and {type(datamodule).__name__}."
        )
    attach_to_trainer(trainer, model, datamodule)
    load_trained_weights(model, ckpt_path, trust_checkpoint)
    model.to(trainer.strategy.root_device).eval()
    splits = [split for split in ("train", "val", "test") if files.get(split)]
    targets = speech_token_files(output, splits)
    batch_size = int(getattr(datamodule, "batch_size", 8))
    rate = int(getattr(model, "sample_rate", 16000))
    for split in splits:
        records = read_speech_manifest(files[split])
        folder = os.path.dirname(os.path.abspath(targets[split]))
        os.makedirs(folder, exist_ok=True)
        seconds = tokens = 0
        with open(targets[split], "w", encoding="utf-8") as handle:
            for start in range(0, len(records), batch_size):
                chunk = records[start : start + batch_size]
                waves = [load_audio(record["audio"], rate) for record in chunk]
                lengths = torch.tensor([len(wave) for wave in waves])
                padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(trainer.strategy.root_device)
                with torch.no_grad():
                    codes = model.encode(padded, rate, lengths=lengths.to(padded.device))
                for record, wave, code in zip(chunk, waves, codes):
                    seconds += len(wave) / rate
                    tokens += len(code)
                    row = {key: value for key, value in record.items() if key != "source"}
                    row["audio"] = os.path.relpath(record["audio"], folder)
                    row["speech_tokens"] = code.tolist()
                    handle.write(json.dumps(row) + "\n")
        rank_zero_info(
            f"speech_tokens: {len(records)} utterances ({seconds:.1f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s) "
            f"of {files[split]} written to {targets[split]}"
        )
    return targets
