"""``lightning-tokens steer``: GrAInS vectors from a JSONL of (prompt, preferred, dispreferred), saved to a
folder, with the preference margins of held-out pairs with and without steering."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_tokens.analysis.steering.hook import decoder_layers, layer_index, steering
from lightning_tokens.analysis.steering.vectors import (
    GrainsSettings,
    SteeringExample,
    SteeringVectors,
    _ablation_token,
    build_steering_vectors,
    module_forward,
    preference_margins,
)
from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError

__all__ = ["read_pairs", "steer_and_evaluate", "trainer_steer"]

FIELDS = ("prompt", "preferred", "dispreferred")


def read_pairs(path: str, limit: int | None = None) -> list[dict[str, str]]:
    """Records ``{"prompt", "preferred", "dispreferred"}`` (strings) of a JSONL file; errors name the line and field."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{path} does not exist: give a JSONL of {{prompt, preferred, dispreferred}} records.")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error.msg}).") from None
            for name in FIELDS:
                if not isinstance(record.get(name), str) or not record[name].strip():
                    raise DataError(f"{path}:{number}: field {name!r} must be a non-empty string.")
            records.append({name: record[name].strip() for name in FIELDS})
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"{path}: no records.")
    return records


def _summary(margins: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((margins > 0).double().mean()), "mean_margin": float(margins.mean())}


def steer_and_evaluate(
    module: torch.nn.Module,
    tokenizer: Any,
    pairs: list[dict[str, str]],
    settings: GrainsSettings,
    eval_pairs: list[dict[str, str]] | None = None,
    layers: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[SteeringVectors, dict[str, Any]]:
    """Build the vectors on ``pairs`` and score ``eval_pairs`` (margins of the last answer token, as
    GrAInS's multiple-choice scoring) without and with steering at ``settings.layer`` / ``alpha`` / ``mode``."""
    forward_fn, embed, lm = module_forward(module)
    was_training = lm.training
    lm.eval()
    encode = lambda r: SteeringExample.from_text(tokenizer, r["prompt"], r["preferred"], r["dispreferred"], settings.template, settings.separator).to(device)  # noqa: E731
    start = time.perf_counter()
    try:
        blocks = decoder_layers(lm)
        if eval_pairs and layers is not None:  # fail before the build, not after it
            keep = {layer_index(int(x), len(blocks)) for x in layers}
            if layer_index(settings.layer, len(blocks)) not in keep:
                raise ConfigError(f"grains.layer={settings.layer} (the layer evaluated) is not among layers={layers}: add it or change it.")
        vectors = build_steering_vectors(
            forward_fn, embed, [encode(r) for r in pairs], _ablation_token(tokenizer, settings.ablation_token_id),
            settings, layers, blocks,
        )
        report: dict[str, Any] = {"build_seconds": round(time.perf_counter() - start, 2), "num_pairs": len(pairs)}
        if eval_pairs:
            examples = [encode(r) for r in eval_pairs]
            base = preference_margins(forward_fn, embed, examples, settings.target)
            v = vectors.vector()
            with steering(lm, settings.layer, v, settings.alpha, settings.scale, settings.norm_dim):
                steered = preference_margins(forward_fn, embed, examples, settings.target)
            report.update(
                {"num_eval_pairs": len(examples), "base": _summary(base), "steered": _summary(steered),
                 "margins_base": base.tolist(), "margins_steered": steered.tolist()}
            )
    finally:
        lm.train(was_training)
    vectors.info.update({k: v for k, v in report.items() if k in ("base", "steered")})
    return vectors, report


def trainer_steer(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    pairs_file: str,
    output: str,
    eval_file: str | None = None,
    num_pairs: int | None = None,
    layers: list[int] | None = None,
    settings: GrainsSettings | None = None,
) -> dict[str, Any]:
    """``Trainer.steer``: build the module's model on the trainer's root device, the vectors from
    ``pairs_file``, write ``vectors.pt``, ``metadata.json`` and ``report.json`` to ``output``."""
    from lightning.pytorch.utilities import rank_zero_info

    settings = settings or GrainsSettings()
    settings.validate()
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(f"steer tokenizes the pairs with the module's tokenizer; {type(model).__name__} has none.")
    trainer.strategy.connect(model)
    model.trainer = trainer
    model.configure_model()
    device = trainer.strategy.root_device
    model.to(device)
    pairs = read_pairs(pairs_file, num_pairs)
    eval_pairs = read_pairs(eval_file) if eval_file else None
    vectors, report = steer_and_evaluate(model, tokenizer, pairs, settings, eval_pairs, layers, device)
    vectors.info["model"] = str(getattr(model, "model_name", type(model).__name__))
    vectors.info["pairs_file"] = pairs_file
    paths = vectors.save(output)
    paths["report"] = os.path.join(output, "report.json")
    with open(paths["report"], "w", encoding="utf-8") as handle:
        json.dump({"settings": asdict(settings), **report}, handle, indent=2)
    lines = [f"GrAInS vectors for layers {vectors.layers[0]}..{vectors.layers[-1]} from {len(pairs)} pairs ({report['build_seconds']} s)"]
    if "base" in report:
        lines.append(
            f"held-out ({report['num_eval_pairs']}): accuracy {report['base']['accuracy']:.3f} -> {report['steered']['accuracy']:.3f}, "
            f"mean margin {report['base']['mean_margin']:.4f} -> {report['steered']['mean_margin']:.4f} "
            f"(layer {settings.layer}, alpha {settings.alpha}, mode {settings.mode}, {settings.method})"
        )
    rank_zero_info("\n".join(lines) + f"\nwritten: {', '.join(paths.values())}")
    return report
