"""One process of the GRPO data-parallel test, launched like tests/distributed_worker.py:

    python -m torch.distributed.run --nproc_per_node 2 tests/grpo_worker.py --strategy ddp --out DIR

Each prompt's group is sampled with a seed of its own (``PerPromptGRPO``), so a prompt gets the same
completions whichever rank holds it: two processes with two prompts each must then follow one process
with the four prompts (loss of every step, final weights), for the token-mean and a sequence-mean
aggregation. Rank 0 writes ``DIR/<strategy>_<agg>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_tokens import GRPO, RewardSpec  # noqa: E402
from lightning_tokens.modules import OptimizerSettings  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
PROMPTS = ["Get the maximal number: 12 and 7 = ", "Add: 3 + 95 = ", "Max of 4 and 40 = ", "Sum 1 + 1 = ", "7 and 8 = ",
           "Get the maximal number: 300 and 2 = ", "1 + 2 = ", "99 = "]
GLOBAL_BATCH, STEPS = 4, 4


class PerPromptGRPO(GRPO):
    """Samples each prompt's group on its own, seeded from the prompt and the rollout count."""

    def configure_model(self) -> None:
        if self.model is None:
            torch.manual_seed(1234)  # every process builds the same initial weights
        super().configure_model()

    @torch.no_grad()
    def sample(self, batch):
        g = self.num_generations
        tok, model = self.tokenizer, self.causal_lm
        prompt_ids = batch["prompt_input_ids"].repeat_interleave(g, 0)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(g, 0)
        completions = []
        model.eval()
        for i, text in enumerate(batch["prompts"]):
            with torch.random.fork_rng():
                torch.manual_seed(zlib.crc32(text.encode()) + 7919 * self.rollouts_done)
                rows = slice(i * g, (i + 1) * g)
                out = model.generate(
                    input_ids=prompt_ids[rows], attention_mask=prompt_mask[rows], do_sample=True, top_k=0,
                    max_new_tokens=self.max_completion_length, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                )
            completions.append(out[:, prompt_ids.shape[1]:])
        model.train()
        width = max(c.shape[1] for c in completions)
        completions = [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tok.pad_token_id) for c in completions]
        return prompt_ids, prompt_mask, torch.cat(completions)


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def collate_for(tokenizer):
    def collate(texts):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        width = max(len(i) for i in ids)
        pad = tokenizer.pad_token_id
        prompt = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        return {"prompt_input_ids": prompt, "prompt_attention_mask": mask, "prompts": list(texts)}
    return collate


def fit(strategy: str, agg: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    world = 1 if strategy == "single" else 2
    model = PerPromptGRPO(
        model="tiny-llama", tokenizer="char", model_config=TINY, loss_backend="torch", num_generations=4,
        max_completion_length=5, loss_agg=agg, rewards=[RewardSpec("tests.modules.test_grpo.digit_share")],
        optimizer=OptimizerSettings(lr=1e-3, warmup=0, min_lr_ratio=1.0), entropy_coef=0.01,
    )
    record = Record()
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[record], default_root_dir=os.environ.get("GRPO_OUT", "."),
    )
    sampler = DistributedSampler(PROMPTS, num_replicas=world, rank=int(os.environ.get("RANK", "0")), shuffle=False)
    loader = DataLoader(PROMPTS, batch_size=GLOBAL_BATCH // world, sampler=sampler, collate_fn=collate_for(model.tokenizer))
    trainer.fit(model, loader)
    weights = {k: v.detach().clone() for k, v in model.causal_lm.state_dict().items()}
    return record.losses, weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["GRPO_OUT"] = args.out
    for agg in ("token-mean", "seq-mean-token-mean"):
        result = fit(args.strategy, agg)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(result, os.path.join(args.out, f"{args.strategy}_{agg}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
