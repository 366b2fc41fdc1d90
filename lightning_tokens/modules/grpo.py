"""``GRPO``: group-relative policy optimisation inside Lightning, on the token-loss pipeline.

Each training step: the prompts of the batch are rolled out ``num_generations`` times with Hugging Face
generation (KV cache, sampling, no grad, eval mode, a seed per rollout), the reward functions score the
completions, the rewards become group-relative advantages (:func:`~lightning_tokens.rl.group_advantages`),
and the policy is updated with the clipped surrogate (:func:`~lightning_tokens.rl.policy_loss_per_token`),
an optional KL to the reference (the module's ``reference`` provider: ``adapter_disabled`` under LoRA needs
no second model) and an optional entropy bonus. Log-probabilities come from the fused ops (no
``(tokens × vocab)`` logits). The post-forward token methods of ``trainer.callbacks`` run on the rollout's
statistics: their weights multiply the advantages, their masks drop tokens, their extra terms add up.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.distributed import mean_over_ranks
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.loss import data_weights, run_token_methods
from lightning_tokens.core.method import BatchTokenMethod, TokenMethod, token_methods
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.reduction import _replicas, global_sum
from lightning_tokens.core.reference import ReferenceSettings
from lightning_tokens.core.seeding import global_seed
from lightning_tokens.core.stats import OutputHead, TokenStats
from lightning_tokens.core.stats import tempered as tempered_head
from lightning_tokens.modules.causal_lm import TokenLM
from lightning_tokens.modules.rollout_engines import RolloutEngine, VLLMEngine, policy_weights
from lightning_tokens.modules.sharding import gathered_root
from lightning_tokens.rewards import Rewards, RewardSpec, reward_columns
from lightning_tokens.rl.advantages import group_advantages
from lightning_tokens.rl.losses import (
    AGG_MODES,
    KL_KINDS,
    TRL_LOSS_TYPES,
    aggregate,
    kl_penalty,
    masked_mean,
    policy_loss_per_token,
)
from lightning_tokens.rl.rollout import rollout_rows, unpadded

# checkpoints store the reward specs in hparams; allow them under torch.load(weights_only=True)
torch.serialization.add_safe_globals([RewardSpec])

__all__ = ["GRPO", "Rollout"]

_PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask", "prompts")
_TOKEN_MEAN = ("token-mean", "dapo")


@dataclass
class Rollout:
    """One rollout batch: the training rows, what the rewards said, and (``num_iterations > 1``) the
    log-probabilities of the policy that sampled it."""

    batch: dict[str, Tensor]
    advantages: Tensor
    rewards: Tensor
    per_function: dict[str, Tensor]
    completions: list[str]
    prompts: list[str]
    completion_lengths: Tensor
    truncated: Tensor
    old_logp: Tensor | None = None
    uses_left: int = 1
    reference_rewards: Tensor | None = None  # GRAO: the reward of each prompt's reference answer
    samples: list[dict[str, Any]] = field(default_factory=list)

    def to(self, device: torch.device) -> Rollout:
        self.batch = {k: v.to(device) for k, v in self.batch.items()}
        self.advantages = self.advantages.to(device)
        if self.old_logp is not None:
            self.old_logp = self.old_logp.to(device)
        return self


class GRPO(TokenLM):
    """Group-relative policy optimisation of a causal LM with verifiable rewards (``TokenLM`` + rollouts).

    Everything ``TokenLM`` takes (presets, local or hub models, LoRA, 4-bit ``quantization``, reference
    modes, FSDP2, validation with generated answers) applies. Training batches must carry prompts:
    ``prompt_input_ids`` (left-padded), ``prompt_attention_mask``, ``prompts`` (text), plus any list
    columns the rewards read (``NUPADataModule(train_format="prompts")`` gives ``answers``, ``domains``...).
    Under data parallelism every rank rolls out its own prompts, so a group never spans two ranks.

    Args:
        rewards: the reward functions (:class:`~lightning_tokens.rewards.RewardSpec`: import path, weight,
            ``init_args``), called TRL's way: ``fn(completions=..., prompts=..., **columns)``.
        num_generations: completions per prompt (the group size ``G``; TRL's default 8, TimeMaster's 5).
        max_completion_length: the generation limit in tokens.
        temperature: sampling temperature; log-probabilities are those of the tempered policy, as in TRL
            and verl.
        top_p: nucleus sampling (1.0: off).
        top_k: top-k sampling (``None`` or 0: off; Hugging Face's own default of 50 is not used, so the
            samples come from the policy whose log-probabilities are trained).
        beta: weight of the KL to the reference (0: no reference forward; TRL's default). Needs
            ``reference`` (``adapter_disabled`` with LoRA, ``model``, ``ema``).
        kl_kind: the KL estimator (:data:`~lightning_tokens.rl.KL_KINDS`; ``low_var_kl`` = k3, TRL's and
            verl's).
        clip_low: ``ε_low`` of the ratio clip.
        clip_high: ``ε_high`` (above ``clip_low``: DAPO's clip-higher).
        dual_clip: verl's dual-clip constant for negative advantages (``None``: off).
        entropy_coef: weight of the entropy bonus (verl's ``entropy_coeff``; 0: off).
        loss_agg: how per-token losses reduce (:func:`~lightning_tokens.rl.aggregate`): ``token-mean``
            (default; here the exact token mean over the accumulation window and all ranks, TRL's
            ``dapo``), ``seq-mean-token-mean`` (TRL's ``grpo``), ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm`` (Dr. GRPO, with ``max_completion_length`` as the constant), or
            TRL's names ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``.
        scale_rewards: divide by the group's standard deviation (``False``: Dr. GRPO's advantages).
        advantage_eps: ``eps`` of the advantage's denominator (verl's 1e-6; TRL uses 1e-4).
        num_iterations: optimizer steps per rollout (``μ``). With ``μ > 1`` the sampling policy's
            log-probabilities are computed once after generation, and the rollout is reused for the next
            ``μ − 1`` steps: the prompt batches that arrive during those steps are not rolled out.
        rollout_seed: base seed of the rollouts; ``None`` takes ``seed_everything``'s. Rollout ``k`` on rank
            ``r`` is seeded from ``(rollout_seed, k, r)``, so a resumed run samples what the uninterrupted
            one would have.
        log_completions: how many completions per rollout go to ``completions.jsonl`` in the logger's
            folder (prompt, completion, rewards, advantage), on rank 0; 0 turns it off.
        generation_backend: ``hf`` (the policy module generates) or ``vllm`` (vLLM in this process on the
            same GPU, TRL's colocate mode; CUDA and ``pip install vllm``): the policy's weights, LoRA merged, are
            synced into it after every optimizer step.
        vllm: ``vllm.LLM`` settings for ``generation_backend=vllm`` (``gpu_memory_utilization``, ``max_model_len``...).
        **kwargs: :class:`~lightning_tokens.TokenLM`'s arguments (``model``, ``tokenizer``, ``lora``,
            ``quantization``, ``optimizer``, ``reference``...).

    Example::

        model = GRPO(model="runs/quickstart/export", rewards=[RewardSpec("lightning_tokens.rewards.nupa_exact_match")],
                     num_generations=8, max_completion_length=8)
        trainer = L.Trainer(max_steps=50)
        trainer.fit(model, datamodule=NUPADataModule(tasks="Integer/max", train_format="prompts"))
    """

    def __init__(
        self,
        rewards: list[RewardSpec] | None = None,
        num_generations: int = 8,
        max_completion_length: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        beta: float = 0.0,
        kl_kind: str = "low_var_kl",
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        entropy_coef: float = 0.0,
        loss_agg: str = "token-mean",
        scale_rewards: bool = True,
        advantage_eps: float = 1e-6,
        num_iterations: int = 1,
        rollout_seed: int | None = None,
        log_completions: int = 4,
        generation_backend: Literal["hf", "vllm"] = "hf",
        vllm: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_choice("GRPO", "generation_backend", generation_backend, ("hf", "vllm"))
        reference: ReferenceSettings | None = kwargs.get("reference")
        _check_positive_int("num_generations", num_generations, minimum=2, why="a group of one has no relative advantage")
        _check_positive_int("max_completion_length", max_completion_length)
        _check_positive_int("num_iterations", num_iterations)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value} must be > 0.")
        if top_p > 1:
            raise ConfigError(f"top_p={top_p} must be in (0, 1]; 1.0 turns nucleus sampling off.")
        if top_k is not None and top_k < 0:
            raise ConfigError(f"top_k={top_k} must be >= 0 (0 or None: off).")
        for name, value in (("beta", beta), ("entropy_coef", entropy_coef), ("advantage_eps", advantage_eps)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value} must be a finite number >= 0.")
        check_choice("GRPO", "kl_kind", kl_kind, KL_KINDS + tuple(kind + "+" for kind in KL_KINDS))
        check_choice("GRPO", "loss_agg", loss_agg, AGG_MODES + tuple(TRL_LOSS_TYPES))
        if beta > 0 and reference is None:
            raise ConfigError(
                f"beta={beta} weighs a KL to the reference, but no `reference` is configured: set reference: "
                "{mode: adapter_disabled} (with LoRA) or {mode: model, model: <name>}, or beta: 0."
            )
        if beta > 0 and reference is not None and reference.mode == "offline":
            raise ConfigError(
                "reference.mode=offline scores a fixed data set, but GRPO's rollouts are new every step: use "
                "adapter_disabled, model or ema."
            )
        self.reward_specs = list(rewards) if rewards else []
        self.rewards = Rewards(self.reward_specs) if rewards else None
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.beta, self.kl_kind = beta, kl_kind
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.entropy_coef = entropy_coef
        self.loss_agg = loss_agg
        self.scale_rewards, self.advantage_eps = scale_rewards, advantage_eps
        self.num_iterations = num_iterations
        self.rollout_seed = rollout_seed
        self.log_completions = log_completions
        self.generation_backend = generation_backend
        self.vllm_settings = dict(vllm or {})
        self.rollout_engine: RolloutEngine | None = None
        self._engine_stale = True
        self.rollouts_done = 0
        self._rollout: Rollout | None = None

    # ---- set-up ----------------------------------------------------------------------------------
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        if self.rewards is None:
            raise ConfigError("GRPO needs `rewards`: list at least one reward function, e.g. "
                              "[{function: lightning_tokens.rewards.nupa_exact_match}].")
        pre_forward = [cb.name for cb in self.trainer.callbacks if isinstance(cb, BatchTokenMethod)]
        if pre_forward:
            raise ConfigError(
                f"{pre_forward} weigh the data batch before the forward, but GRPO trains on rollouts generated "
                "in the step: use post-forward token methods (TokenMethod) with GRPO."
            )
        if self.rollout_seed is None:
            self.rollout_seed = global_seed()

    def build_rollout_engine(self) -> RolloutEngine:
        """The external generator of ``generation_backend`` (override to plug in another engine)."""
        return VLLMEngine(self.model_name, **self.vllm_settings)

    # ---- rollouts --------------------------------------------------------------------------------
    def _rollout_seed(self) -> int:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return (int(self.rollout_seed or 0) * 1_000_003 + self.rollouts_done * 7919 + rank * 104_729) % (2**63 - 1)

    @torch.no_grad()
    def sample(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``num_generations`` sampled continuations of every prompt of ``batch``.

        Returns ``(prompt_ids, prompt_mask, completion_ids)``, each with ``num_generations`` consecutive
        rows per prompt. The seed is that of the next rollout; the global RNG state is left as it was.
        """
        _check_prompt_batch(batch)
        repeated = self.repeat_prompts(batch, self.num_generations)
        prompt_ids, prompt_mask = repeated["prompt_input_ids"], repeated["prompt_attention_mask"]
        if self.rollout_engine is not None:
            return prompt_ids, prompt_mask, self._sample_with_engine(batch, prompt_ids)
        model = self.causal_lm
        was_training = model.training
        devices = [prompt_ids.device] if prompt_ids.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._rollout_seed())
            model.eval()
            try:
                completion_ids = self.generate_ids(
                    repeated,
                    do_sample=True,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    top_k=self.top_k or 0,
                    max_new_tokens=self.max_completion_length,
                    use_cache=True,
                )
            finally:
                model.train(was_training)
        return prompt_ids, prompt_mask, completion_ids

    def _sample_with_engine(self, batch: dict[str, Any], like: Tensor) -> Tensor:
        engine = self.rollout_engine
        assert engine is not None
        if self._engine_stale:  # the policy changed since the engine last saw it
            with gathered_root(self):
                engine.load_weights(policy_weights(self.model))
            self._engine_stale = False
        prompts = unpadded(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        base = self._rollout_seed()
        completions = engine.generate(
            prompts, self.num_generations, self.max_completion_length, self.temperature, self.top_p, self.top_k or 0,
            seeds=[base + i for i in range(len(prompts))],
        )
        if len(completions) != len(prompts) * self.num_generations:
            raise RuntimeError(f"the rollout engine returned {len(completions)} completions for {len(prompts)} prompts x {self.num_generations}.")
        width = max(1, min(self.max_completion_length, max(len(c) for c in completions)))
        out = torch.full((len(completions), width), self.tokenizer.pad_token_id, dtype=like.dtype, device=like.device)
        for row, ids in enumerate(completions):
            ids = ids[: self.max_completion_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=like.dtype)
        return out

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._engine_stale = True

    def rollout(self, batch: dict[str, Any]) -> Rollout:
        """Sample, score and turn rewards into advantages for one prompt batch."""
        prompt_ids, prompt_mask, completion_ids = self.sample(batch)
        tok = self.tokenizer
        rows = rollout_rows(prompt_ids, prompt_mask, completion_ids, tok.eos_token_id, tok.pad_token_id)
        completions = tok.batch_decode(
            [ids[: int(n)] for ids, n in zip(completion_ids, rows.completion_lengths)], skip_special_tokens=True
        )
        g = self.num_generations
        prompts = [p for p in batch["prompts"] for _ in range(g)]
        columns = reward_columns(batch, repeat=g)
        assert self.rewards is not None
        result = self.rewards(completions, prompts, columns)
        groups = torch.arange(len(batch["prompts"])).repeat_interleave(g)
        advantages = group_advantages(result.total, groups, eps=self.advantage_eps, norm_by_std=self.scale_rewards)
        self.rollouts_done += 1
        training_batch = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask, "labels": rows.labels}
        training_batch.update(self.rollout_inputs(batch, g, rows.input_ids, prompt_mask))
        rollout = Rollout(
            batch=training_batch, advantages=advantages.float(), rewards=result.total, per_function=result.per_function,
            completions=completions, prompts=prompts, completion_lengths=rows.completion_lengths,
            truncated=rows.truncated, uses_left=self.num_iterations,
        )
        rollout.samples = [
            {"step": self.global_step, "prompt": prompts[i], "completion": completions[i],
             "reward": float(result.total[i]), "advantage": float(advantages[i]),
             **{name: float(v[i]) for name, v in result.per_function.items()}}
            for i in range(min(self.log_completions, len(completions)))
        ]
        if self.num_iterations > 1:  # the sampling policy's log-probabilities, before the first update
            with torch.no_grad():
                rollout.old_logp = -self._stats(rollout.batch, with_entropy=False).nll.detach()
        return rollout

    def _next_rollout(self, batch: dict[str, Any]) -> Rollout:
        if self._rollout is None or self._rollout.uses_left <= 0:
            self._rollout = self.rollout(batch)
            self._write_samples(self._rollout.samples)
        rollout = self._rollout
        rollout.uses_left -= 1
        return rollout.to(self.device)

    # ---- loss ------------------------------------------------------------------------------------
    def _stats(
        self, batch: dict[str, Tensor], with_entropy: bool, causal_lm: torch.nn.Module | None = None, tempered: bool = True
    ) -> TokenStats:
        hidden = self.hidden_states(batch, causal_lm=causal_lm)
        lm = self.causal_lm if causal_lm is None else causal_lm
        head = OutputHead.from_module(lm.get_output_embeddings())
        if tempered:
            hidden, head = tempered_head(hidden, head, self.temperature)
        return TokenStats(
            batch["labels"], hidden=hidden, head=head, batch=batch, with_entropy=with_entropy,
            backend=self.token_loss_backend,
        )

    def _reference_logp(self, batch: dict[str, Tensor]) -> Tensor:
        assert self.reference is not None
        return -self.reference.stats(batch, self, temperature=self.temperature).nll.detach()

    def objective(self, rollout: Rollout, methods: Sequence[TokenMethod] = ()) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The per-token GRPO objective of a rollout under the current policy, before reduction.

        ``ℓ_t = clipped surrogate(ratio_t, A·w_t) + β·KL_t − entropy_coef·H_t + extra_t``, with ``w`` and
        ``extra`` from the token ``methods`` (run on this forward's statistics) and ``ratio_t = 1`` in
        value when the rollout is used once (its gradient is ``∇ log π``). Methods find the sampling
        policy's log-probabilities in ``stats.batch["old_logp"]``.

        Returns:
            ``(per_token, keep, logs)``: ``(B, T)`` losses (0 where not kept), the kept tokens, and detached
            statistics (clip fraction, ``ppo_kl``, KL to the reference, entropy).
        """
        rb = dict(rollout.batch)  # methods read stats.batch["old_logp"], set below
        ref_logp = self._reference_logp(rb) if self.beta > 0 else None  # before the forward: EMA swaps weights
        stats = self._stats(rb, with_entropy=self.entropy_coef > 0 or any(m.needs_entropy for m in methods))
        logp = -stats.nll
        old_logp = rollout.old_logp if rollout.old_logp is not None else logp.detach()
        rb["old_logp"] = old_logp
        outcome = run_token_methods(stats, list(methods), self, data_weights(stats, rb))
        if outcome.loss is not None:
            raise ConfigError(
                f"{outcome.replaced_by} replaces the per-token loss, but under GRPO the per-token loss is the "
                "policy surrogate: use methods that weight, select or add terms."
            )
        keep = outcome.keep & (outcome.weights != 0)
        advantages = rollout.advantages.unsqueeze(-1) * outcome.weights
        per_token, pg = policy_loss_per_token(logp, old_logp, advantages, keep, self.clip_low, self.clip_high, self.dual_clip)
        logs: dict[str, Tensor] = {"train/clip_fraction": pg.pg_clipfrac, "train/ppo_kl": pg.ppo_kl}
        if ref_logp is not None:
            kl = kl_penalty(logp, ref_logp, self.kl_kind)
            per_token = per_token + self.beta * kl
            logs["train/kl"] = masked_mean(kl.detach(), keep)
        if stats.with_entropy:
            entropy = stats.entropy
            logs["train/entropy"] = masked_mean(entropy.detach(), keep)
            if self.entropy_coef > 0:
                per_token = per_token - self.entropy_coef * entropy
        if outcome.extra_loss is not None:
            per_token = per_token + outcome.extra_loss
        return torch.where(keep, per_token, torch.zeros_like(per_token)), keep, logs

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        rollout = self._next_rollout(batch)
        per_token, keep, logs = self.objective(rollout, token_methods(self.trainer))
        loss, mean_loss = self._reduce(per_token, keep)
        self._log_rollout(rollout, dict(logs), mean_loss, keep)
        self._log_throughput(rollout.batch)
        return loss

    def _reduce(self, per_token: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """The loss to backpropagate and its value as a token or sequence mean, for the logs."""
        trainer = self.trainer
        if self.loss_agg in _TOKEN_MEAN:  # exact over the accumulation window and the ranks
            kept = keep.sum()
            total_kept, total_loss = global_sum(torch.stack([kept.float(), per_token.detach().sum().float()]), trainer)
            divisor = self._token_normalizer.divisor(kept, trainer, global_count=total_kept)
            return per_token.sum() / divisor, total_loss / total_kept.clamp(min=1)
        num_seqs = None
        if self.loss_agg.startswith("seq-mean") and not self.loss_agg.endswith("-norm"):
            sequences = global_sum((keep.sum(-1) > 0).sum().float(), trainer)
            num_seqs = sequences.clamp(min=1) / _replicas(trainer)
        loss = aggregate(per_token, keep, self.loss_agg, self.max_completion_length, num_seqs=num_seqs)
        # data parallelism averages the ranks' gradients, so the objective is the mean of the ranks' values
        return loss, global_sum(loss.detach(), trainer) / _replicas(trainer)

    # ---- logging ---------------------------------------------------------------------------------
    def _log_rollout(self, rollout: Rollout, logs: dict[str, Any], mean_loss: Tensor, keep: Tensor) -> None:
        rewards = rollout.rewards
        logs.update({
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "train/advantage_mean": rollout.advantages.mean(),
            "train/advantage_std": rollout.advantages.std() if rollout.advantages.numel() > 1 else torch.zeros(()),
            "train/completion_length": rollout.completion_lengths.float().mean(),
            "train/completion_length_max": rollout.completion_lengths.max().float(),
            "train/truncated_fraction": rollout.truncated.float().mean(),
            "train/kept_fraction": keep.float().sum() / rollout.batch["labels"].ne(-100).sum().clamp(min=1),
        })
        for name, values in rollout.per_function.items():
            logs[f"train/rewards/{name}/mean"] = values.mean()
            logs[f"train/rewards/{name}/std"] = values.std() if values.numel() > 1 else torch.zeros(())
        if self.trainer.world_size > 1:
            logs = mean_over_ranks(logs, self.trainer)
        for key, value in logs.items():
            self.log(key, value, on_step=True, on_epoch=False)
        self.log("train/loss", mean_loss, prog_bar=True, batch_size=rollout.batch["labels"].shape[0])

    @override
    def on_fit_start(self) -> None:
        super().on_fit_start()
        # on every rank: Trainer.log_dir broadcasts rank 0's folder, a collective the rank-0-only writer cannot call
        self._samples_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.generation_backend != "hf" and self.rollout_engine is None:  # after configure_model
            self.rollout_engine = self.build_rollout_engine()

    @rank_zero_only
    def _write_samples(self, samples: list[dict[str, Any]]) -> None:
        folder = getattr(self, "_samples_dir", None)
        if not samples or folder is None:
            return
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "completions.jsonl"), "a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps(sample, ensure_ascii=False) + "\n")

    # ---- checkpoints -----------------------------------------------------------------------------
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state: dict[str, Any] = {"rollouts_done": self.rollouts_done, "rollout_seed": self.rollout_seed}
        if self._rollout is not None and self._rollout.uses_left > 0:  # mid-way through a reused rollout
            r = self._rollout
            state["rollout"] = {
                "batch": {k: v.cpu() for k, v in r.batch.items()}, "advantages": r.advantages.cpu(),
                "rewards": r.rewards, "per_function": r.per_function, "completions": r.completions,
                "prompts": r.prompts, "completion_lengths": r.completion_lengths, "truncated": r.truncated,
                "old_logp": None if r.old_logp is None else r.old_logp.cpu(), "uses_left": r.uses_left,
            }
        checkpoint["grpo"] = state

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("grpo")
        if state is None:
            return
        self.rollouts_done = int(state["rollouts_done"])
        self.rollout_seed = state["rollout_seed"]
        saved = state.get("rollout")
        self._rollout = Rollout(**saved) if saved is not None else None


def _check_positive_int(name: str, value: int, minimum: int = 1, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}" + (f" ({why})." if why else "."))


def _check_prompt_batch(batch: dict[str, Any]) -> None:
    missing = [key for key in _PROMPT_KEYS if key not in batch]
    if missing:
        raise ConfigError(
            f"GRPO rolls out prompts, but the training batch has no {missing} (its keys: {sorted(batch)}): use "
            "NUPADataModule(train_format='prompts'), or a datamodule whose batches carry left-padded "
            "prompt_input_ids, prompt_attention_mask and the prompts' text."
        )
    n = batch["prompt_input_ids"].shape[0]
    if len(batch["prompts"]) != n:
        raise ConfigError(f"the batch has {n} prompt_input_ids rows but {len(batch['prompts'])} prompts.")

