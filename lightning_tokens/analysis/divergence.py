"""Base vs tuned model, token by token ("Sparse but Critical", arXiv 2603.22446, spec §10).

- :func:`trajectory_divergence`: along given sequences (the tuned model's samples), the Jensen–Shannon
  divergence between the two models' next-token distributions at every completion position, their top-k
  overlap, and the base probability of the tuned model's top-1 token.
- :func:`cross_sample`: sample from a *primary* model, but wherever its next-token distribution is more
  than ``epsilon`` (JS) away from an *intermediate* model's, draw that token from the intermediate model.
  Forward (primary = base, intermediate = tuned) asks whether the few divergent tokens suffice for the
  tuned model's accuracy; backward (primary = tuned, intermediate = base) whether they are necessary.
- :func:`divergence_report`: both, over a prompt set, with a reward function's accuracy for base, tuned,
  forward and backward sampling; :meth:`DivergenceReport.write` saves a summary, a per-token table and a plot.

The sampling loop runs both models on the whole sequence at every step (no KV cache): simple and exact,
meant for analysis runs of modest length.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_tokens.analysis.functional import js_divergence, top_k_overlap, truncate_logprobs
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.rewards import reward_columns
from lightning_tokens.rl.rollout import rollout_rows

__all__ = ["DivergenceReport", "cross_sample", "divergence_report", "trajectory_divergence"]


def _next_token_logprobs(model: torch.nn.Module, ids: Tensor, mask: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
    return truncate_logprobs(logits.float() / temperature, top_k, top_p)


@torch.no_grad()
def cross_sample(
    primary: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int,
    intermediate: torch.nn.Module | None = None,
    epsilon: float = 0.05,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample continuations of left-padded prompts, switching to ``intermediate`` where the two disagree.

    At each step, with ``π_p`` and ``π_i`` the (tempered, truncated) next-token distributions,
    ``S_t = 1[JS(π_p ‖ π_i) > epsilon]`` and the token is drawn from ``π_i`` if ``S_t`` else from ``π_p``.
    Without ``intermediate`` this is plain sampling from ``primary``.

    Returns:
        ``(completion_ids, switched, js)``, each ``(B, max_new_tokens)``: the tokens (``pad_token_id`` after a
        row's end-of-sequence token), which were drawn from the intermediate model, and the JS at each step
        (0 without ``intermediate``, and after a row ended).
    """
    if epsilon < 0 or temperature <= 0:
        raise ConfigError(f"epsilon={epsilon} must be >= 0 and temperature={temperature} > 0.")
    ids, mask = prompt_ids, prompt_mask.long()
    rows = ids.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=ids.device)
    tokens, switched, divergences = [], [], []
    for _ in range(max_new_tokens):
        logp = _next_token_logprobs(primary, ids, mask, temperature, top_k, top_p)
        js = torch.zeros(rows, dtype=torch.float64, device=ids.device)
        switch = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        if intermediate is not None:
            logq = _next_token_logprobs(intermediate, ids, mask, temperature, top_k, top_p)
            js = js_divergence(logp, logq)
            switch = js > epsilon
            logp = torch.where(switch.unsqueeze(-1), logq, logp)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        switched.append(switch & ~finished)
        divergences.append(torch.where(finished, torch.zeros_like(js), js))
        ids = torch.cat([ids, token.unsqueeze(-1)], dim=-1)
        mask = torch.cat([mask, (~finished).long().unsqueeze(-1)], dim=-1)
        if eos_token_id is not None:
            finished = finished | (token == eos_token_id)
        if bool(finished.all()):
            break
    pad = max_new_tokens - len(tokens)
    completion = torch.stack(tokens, -1)
    switch_mask, js_values = torch.stack(switched, -1), torch.stack(divergences, -1)
    if pad:
        completion = torch.nn.functional.pad(completion, (0, pad), value=pad_token_id)
        switch_mask = torch.nn.functional.pad(switch_mask, (0, pad), value=False)
        js_values = torch.nn.functional.pad(js_values, (0, pad), value=0.0)
    return completion, switch_mask, js_values


@torch.no_grad()
def trajectory_divergence(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    overlap_k: int = 5,
) -> dict[str, Tensor]:
    """Per-position statistics of the two models on given sequences, indexed like ``labels`` (position
    ``t`` scores the prediction of ``labels[:, t]``; 0 where ``labels`` is -100).

    Returns:
        ``js`` (JS divergence of the tempered, truncated distributions), ``overlap`` (top-``overlap_k``
        overlap), ``tuned_top1_base_prob`` (the base probability of the tuned model's most likely token) and
        ``mask`` (the scored positions), each ``(B, T)``. One row at a time, so ``(T × V)`` at most.
    """
    mask = labels[:, 1:] != -100
    out = {name: torch.zeros(labels.shape, dtype=torch.float64) for name in ("js", "overlap", "tuned_top1_base_prob")}
    for row in range(input_ids.shape[0]):
        ids, att = input_ids[row : row + 1], attention_mask[row : row + 1]
        base_logits = base(input_ids=ids, attention_mask=att, use_cache=False).logits[0, :-1].float() / temperature
        tuned_logits = tuned(input_ids=ids, attention_mask=att, use_cache=False).logits[0, :-1].float() / temperature
        logp, logq = truncate_logprobs(base_logits, top_k, top_p), truncate_logprobs(tuned_logits, top_k, top_p)
        keep = mask[row].cpu()
        out["js"][row, 1:][keep] = js_divergence(logp, logq).cpu()[keep]
        out["overlap"][row, 1:][keep] = top_k_overlap(logp, logq, overlap_k).double().cpu()[keep]
        top1 = logq.argmax(-1, keepdim=True)
        out["tuned_top1_base_prob"][row, 1:][keep] = logp.gather(-1, top1).squeeze(-1).exp().double().cpu()[keep]
    full_mask = torch.zeros(labels.shape, dtype=torch.bool)
    full_mask[:, 1:] = mask.cpu()
    out["mask"] = full_mask
    return out


@dataclass
class DivergenceReport:
    """What :func:`divergence_report` measured.

    Attributes:
        summary: the headline numbers (mean JS, share of near-zero positions, top-k overlap, accuracies,
            switched-token shares of cross-sampling).
        tokens: one dict per scored position of the tuned model's samples (example, position, token, js,
            overlap, tuned_top1_base_prob).
        sequences: the JS along each sampled completion, for the plot.
    """

    summary: dict[str, float] = field(default_factory=dict)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    sequences: list[list[float]] = field(default_factory=list)

    def write(self, folder: str) -> dict[str, str]:
        """Write ``summary.json``, ``tokens.csv`` and ``divergence.png`` to ``folder``; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = {name: os.path.join(folder, name) for name in ("summary.json", "tokens.csv", "divergence.png")}
        with open(paths["summary.json"], "w", encoding="utf-8") as handle:
            json.dump(self.summary, handle, indent=2)
        with open(paths["tokens.csv"], "w", newline="", encoding="utf-8") as handle:
            columns = ["example", "position", "token", "js", "overlap", "tuned_top1_base_prob"]
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.tokens)
        self._plot(paths["divergence.png"])
        return paths

    def _plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (along, hist) = plt.subplots(1, 2, figsize=(10, 3.5))
        for values in self.sequences[:32]:
            along.plot(range(1, len(values) + 1), values, color="tab:blue", alpha=0.25, linewidth=1)
        longest = max((len(v) for v in self.sequences), default=0)
        if longest:
            means = [
                sum(v[i] for v in self.sequences if len(v) > i) / max(1, sum(len(v) > i for v in self.sequences))
                for i in range(longest)
            ]
            along.plot(range(1, longest + 1), means, color="black", linewidth=2, label="mean")
            along.legend()
        along.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
        along.set(xlabel="completion position", ylabel="JS(base ‖ tuned), nats", title="Divergence along samples")
        values = [t["js"] for t in self.tokens]
        hist.hist(values, bins=40, color="tab:blue")
        hist.set(xlabel="JS divergence", ylabel="positions", yscale="log",
                 title=f"{self.summary.get('near_zero_fraction', 0):.0%} of positions near zero")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


RewardFn = Callable[..., Sequence[float]]


def divergence_report(
    base: torch.nn.Module,
    tuned: torch.nn.Module,
    tokenizer: Any,
    batches: Iterable[dict[str, Any]],
    reward: RewardFn,
    max_new_tokens: int = 16,
    epsilon: float = 0.05,
    near_zero: float = 1e-3,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    overlap_k: int = 5,
    seed: int = 0,
) -> DivergenceReport:
    """Base vs tuned on prompt batches (``prompt_input_ids``, ``prompt_attention_mask``, ``prompts`` and the
    reward's columns): divergence along the tuned model's samples, and the reward's mean for base, tuned,
    forward and backward cross-sampling (each from the same seed).

    Args:
        reward: a reward function (TRL's convention: ``reward(completions=..., prompts=..., **columns)``).
        epsilon: the cross-sampling threshold on JS.
        near_zero: positions with JS below it count as unchanged.
    """
    report = DivergenceReport()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(name: str, value: float, count: float = 1.0) -> None:
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0.0) + count

    example = 0
    for index, batch in enumerate(batches):
        prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        columns = reward_columns(batch)
        runs = {"base": (base, None), "tuned": (tuned, None), "forward": (base, tuned), "backward": (tuned, base)}
        for name, (primary, intermediate) in runs.items():
            generator = torch.Generator(device=prompt_ids.device).manual_seed(seed + index)
            completion, switched, _ = cross_sample(
                primary, prompt_ids, prompt_mask, max_new_tokens, eos, pad, intermediate, epsilon, temperature,
                top_k, top_p, generator,
            )
            rows = rollout_rows(prompt_ids, prompt_mask, completion, eos, pad)
            texts = tokenizer.batch_decode(
                [ids[: int(n)] for ids, n in zip(completion, rows.completion_lengths)], skip_special_tokens=True
            )
            scores = [float(s) for s in reward(completions=texts, prompts=list(batch["prompts"]), **columns)]
            add(f"accuracy_{name}", sum(scores), len(scores))
            if intermediate is not None:
                add(f"switched_fraction_{name}", float(switched.sum()), float(rows.completion_lengths.sum()))
                add(f"switched_tokens_{name}", float(switched.sum()), len(scores))
            if name == "tuned":
                stats = trajectory_divergence(base, tuned, rows.input_ids, rows.attention_mask, rows.labels,
                                              temperature, top_k, top_p, overlap_k)
                for row in range(rows.input_ids.shape[0]):
                    positions = stats["mask"][row].nonzero().flatten().tolist()
                    report.sequences.append([float(stats["js"][row, p]) for p in positions])
                    for rank, p in enumerate(positions):
                        report.tokens.append({
                            "example": example + row, "position": rank, "token": int(rows.input_ids[row, p]),
                            "js": float(stats["js"][row, p]), "overlap": float(stats["overlap"][row, p]),
                            "tuned_top1_base_prob": float(stats["tuned_top1_base_prob"][row, p]),
                        })
        example += prompt_ids.shape[0]
    summary = {name: sums[name] / max(counts[name], 1.0) for name in sums}
    values = [t["js"] for t in report.tokens]
    if values:
        summary.update({
            "positions": float(len(values)),
            "mean_js": sum(values) / len(values),
            "near_zero_fraction": sum(v < near_zero for v in values) / len(values),
            "mean_top_k_overlap": sum(t["overlap"] for t in report.tokens) / len(values),
            "tuned_top1_base_prob_below_0.01": sum(t["tuned_top1_base_prob"] < 0.01 for t in report.tokens) / len(values),
        })
    summary.update({"epsilon": epsilon, "near_zero": near_zero, "examples": float(example)})
    report.summary = summary
    return report
