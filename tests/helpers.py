"""Small models and data shared by tests."""

from __future__ import annotations

import socket

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_tokens.core import TokenLossMixin

VOCAB = 17


class PlainLM(pl.LightningModule):
    """A LightningModule not written for this library: embedding, GRU, linear head, mean CE."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, lr: float = 0.1, adam: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.rnn = torch.nn.GRU(dim, dim, batch_first=True)
        self.head = torch.nn.Linear(dim, vocab)
        self.lr = lr
        self.adam = adam

    def hidden(self, input_ids):
        return self.rnn(self.embed(input_ids))[0]

    def training_step(self, batch, batch_idx):
        logits = self.head(self.hidden(batch["input_ids"]))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam if self.adam else torch.optim.SGD
        return optimizer(self.parameters(), lr=self.lr)


class MixinLM(TokenLossMixin, PlainLM):
    """PlainLM after adding the mixin and changing one line."""

    def training_step(self, batch, batch_idx):
        logits = self.head(self.hidden(batch["input_ids"]))
        return self.token_loss(batch["labels"], logits=logits, batch=batch)


class FusedLM(TokenLossMixin, PlainLM):
    """The mixin on the fused path: hidden states + output head."""

    def training_step(self, batch, batch_idx):
        return self.token_loss(batch["labels"], hidden=self.hidden(batch["input_ids"]), head=self.head, batch=batch)


class ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_collate(items):
    """Right-pad token lists to the longest: input_ids with 0, labels with -100."""
    length = max(len(x["input_ids"]) for x in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x["input_ids"])
        ids[i, :n] = torch.tensor(x["input_ids"])
        labels[i, :n] = torch.tensor(x["labels"])
    return {"input_ids": ids, "labels": labels}


def make_examples(lengths, seed=0, prompt=2):
    """Examples of the given lengths; the first ``prompt`` tokens carry no label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def loader(examples, batch_size):
    return DataLoader(ListDataset(examples), batch_size=batch_size, collate_fn=pad_collate, shuffle=False)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def fit_sharded(model, items, collate, strategy: str, global_batch: int, steps: int, callbacks=()) -> dict:
    """A worker's fit: ``steps`` steps of ``global_batch`` items, one process (``single``) or two under DDP
    (``ddp``, launched by torchrun), rank ``r`` of ``w`` taking items ``r, r + w, ...`` of each global batch
    (``DistributedSampler`` without shuffling); returns the final state dict on the CPU."""
    import os

    from torch.utils.data import DistributedSampler

    world = 1 if strategy == "single" else 2
    fitter = trainer(
        devices=world, strategy="ddp" if world > 1 else "auto", max_steps=steps, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=list(callbacks),
    )
    sampler = DistributedSampler(items, num_replicas=world, rank=int(os.environ.get("RANK", "0")), shuffle=False)
    fitter.fit(model, DataLoader(items, batch_size=global_batch // world, sampler=sampler, collate_fn=collate))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def single_and_ddp(worker: str, out: str, name: str) -> tuple:
    """Run a :func:`worker_main` worker in one process and in two under DDP; its two saved results."""
    import os

    launch_worker(worker, ["--strategy", "single", "--out", out], distributed=False)
    launch_worker(worker, ["--strategy", "ddp", "--out", out], distributed=True)
    return tuple(torch.load(os.path.join(out, f"{name}_{s}.pt"), weights_only=False) for s in ("single", "ddp"))


def worker_main(fit, name: str) -> None:
    """The command line of a multi-process test worker: ``--strategy single|ddp --out DIR``; one thread per
    process; rank 0 saves ``fit(strategy)`` to ``DIR/<name>_<strategy>.pt``."""
    import argparse
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=["single", "ddp"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = fit(args.strategy)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, os.path.join(args.out, f"{name}_{args.strategy}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port free on the loopback interface now (for process-group rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_worker(worker: str, args: list[str], distributed: bool, attempt: int = 0) -> None:
    """Run a test worker script in one process, or in two CPU processes under torchrun (as users launch jobs),
    with one thread each; raise with the tails of its output when it fails."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, worker]
    if distributed:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and distributed and attempt == 0:
        # the free port may be taken between choosing it and the rendezvous binding it: one more try
        return launch_worker(worker, args, distributed, attempt=1)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} run failed (rc {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
