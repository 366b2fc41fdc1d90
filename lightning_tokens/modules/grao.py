"""``GRAO``: "Learning to Align, Aligning to Learn" (arXiv 2508.07750, Eq. 3; spec §11) as a LightningModule.

Each query's ``G`` samples and its reference answer ``y`` (a column of the batch) are scored by the reward
functions; the objective :func:`~lightning_tokens.rl.grao_objective` mixes exploration (advantage-weighted
mean log-likelihood of the samples), imitation of ``y`` and an alignment regulariser. One forward scores
the samples and the reference answers together, through the fused ops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import token_methods
from lightning_tokens.modules.grpo import GRPO, Rollout
from lightning_tokens.rewards import reward_columns
from lightning_tokens.rl.grao import grao_objective, sequence_log_likelihood
from lightning_tokens.rl.rollout import rollout_rows

__all__ = ["GRAO"]


class GRAO(GRPO):
    """GRPO's rollouts and rewards with GRAO's objective (no KL term, no ratio: one update per rollout).

    ``J = (1/G) Σ_i [Â_{o_i}·J_exp(o_i) + β·Â_y·J_imit(y) + λ·Â_{o_i}·(J_exp(o_i) − J_imit(y))]``, with
    ``J_exp``, ``J_imit`` the mean log-likelihoods (untempered: the policy itself) and ``Â`` the rewards
    standardised within ``(o_1..o_G, y)``. Everything else (model, LoRA, rewards, sampling, logging) is
    :class:`~lightning_tokens.GRPO`'s; the paper's sampling temperature is 0.7.

    Args:
        imitation_weight: ``β`` (paper: 0.5).
        alignment_weight: ``λ`` (paper: 0.6).
        reference_column: the batch column holding each prompt's reference answer (text); the end-of-sequence
            token is appended, so the model learns to stop after it.
        reference_in_group: whether ``y`` joins the statistics of the samples' advantages (the paper is
            ambiguous; ``True`` reproduces the spec's check).
        unbiased_std: N − 1 instead of the population standard deviation (the spec's check: population).
        **kwargs: :class:`~lightning_tokens.GRPO`'s arguments (``beta`` and ``num_iterations`` must stay 0 and 1).

    Example::

        model = GRAO(model="smollm2-135m-instruct", rewards=[RewardSpec("lightning_tokens.rewards.nupa_exact_match")],
                     temperature=0.7, imitation_weight=0.5, alignment_weight=0.6)
    """

    def __init__(
        self,
        imitation_weight: float = 0.5,
        alignment_weight: float = 0.6,
        reference_column: str = "answers",
        reference_in_group: bool = True,
        unbiased_std: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("beta", 0.0) or kwargs.get("num_iterations", 1) != 1:
            raise ConfigError("GRAO has no KL term and no importance ratio: leave beta at 0 and num_iterations at 1.")
        super().__init__(**kwargs)
        self.imitation_weight = imitation_weight
        self.alignment_weight = alignment_weight
        self.reference_column = reference_column
        self.reference_in_group = reference_in_group
        self.unbiased_std = unbiased_std

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and token_methods(self.trainer):
            raise ConfigError("GRAO's objective is sequence-level: token methods (TokenMethod callbacks) do not apply to it.")

    @override
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """GRPO's rollout, plus one row per prompt: the prompt followed by its reference answer."""
        if self.reference_column not in batch:
            raise ConfigError(
                f"GRAO imitates a reference answer per prompt, but the batch has no {self.reference_column!r} column "
                f"(its keys: {sorted(batch)}): set reference_column."
            )
        rollout = super().rollout(batch)
        tok = self.tokenizer
        answers = [str(a) for a in batch[self.reference_column]]
        assert self.rewards is not None
        rollout.reference_rewards = self.rewards(answers, list(batch["prompts"]), reward_columns(batch)).total
        # the reference answers (eos appended) are completions of their prompts, joined the same way
        answer_ids = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers]
        width = max(len(a) for a in answer_ids)
        padded = torch.tensor([a + [tok.pad_token_id] * (width - len(a)) for a in answer_ids])
        prompt_ids, prompt_mask = batch["prompt_input_ids"].cpu(), batch["prompt_attention_mask"].cpu()
        reference = rollout_rows(prompt_ids, prompt_mask, padded, tok.eos_token_id, tok.pad_token_id)
        fill = {"input_ids": tok.pad_token_id, "attention_mask": 0, "labels": -100}
        samples = rollout.batch
        width = max(samples["input_ids"].shape[1], reference.input_ids.shape[1])
        rollout.batch = {
            name: torch.cat([F.pad(rows.cpu(), (0, width - rows.shape[1]), value=fill[name]) for rows in (samples[name], getattr(reference, name))])
            for name in fill
        }
        return rollout

    def grao_loss(self, rollout: Rollout) -> tuple[Tensor, dict[str, Tensor]]:
        """``−J`` of a rollout under the current policy, and its parts for the logs."""
        stats = self._stats(rollout.batch, with_entropy=False, tempered=False)
        likelihood = sequence_log_likelihood(-stats.nll, stats.mask)
        queries = rollout.reference_rewards.shape[0]
        g = self.num_generations
        out = grao_objective(
            rollout.rewards.view(queries, g).to(likelihood.device), rollout.reference_rewards.to(likelihood.device),
            likelihood[: queries * g].view(queries, g), likelihood[queries * g :],
            beta=self.imitation_weight, lam=self.alignment_weight, reference_in_group=self.reference_in_group,
            unbiased=self.unbiased_std,
        )
        logs = {"train/grao/exploration": out.exploration.detach(), "train/grao/imitation": out.imitation.detach(),
                "train/grao/alignment": out.alignment.detach(), "train/grao/reference_reward": rollout.reference_rewards.mean()}
        return out.loss, logs

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rollout = self._next_rollout(batch)
        loss, logs = self.grao_loss(rollout)
        self._log_rollout(rollout, dict(logs), loss.detach(), rollout.batch["labels"].ne(-100))
        self._log_throughput(rollout.batch)
        return loss
