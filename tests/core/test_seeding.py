"""One seed for a run: ``seed_everything`` reaches the datamodules' data generation and shuffling unless
they are given a ``seed`` of their own."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from lightning_tokens.core.seeding import DEFAULT_SEED, global_seed
from lightning_tokens.datamodules import NUPADataModule, SFTDataModule


@pytest.fixture(autouse=True)
def _no_global_seed(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def _nupa(**kwargs) -> NUPADataModule:
    return NUPADataModule(tasks="Integer/add", tokenizer="char", num_train=32, num_val=4, num_test=8, batch_size=8, **kwargs)


def _train_prompts(dm: NUPADataModule) -> list[str]:
    dm.setup("fit")
    return [example.prompt for example in dm._examples["train"]]


def _first_batch_ids(dm: NUPADataModule) -> list[int]:
    return next(iter(dm.train_dataloader()))["example_id"].tolist()


def test_without_seed_everything_the_default_seed_is_used():
    assert global_seed() == DEFAULT_SEED
    assert _nupa().seed == DEFAULT_SEED


def test_seed_everything_seeds_nupa_generation_and_shuffling():
    pl.seed_everything(5, verbose=False)
    five = _nupa()
    assert five.seed == 5
    prompts_five, order_five = _train_prompts(five), _first_batch_ids(five)
    pl.seed_everything(6, verbose=False)
    six = _nupa()
    assert _train_prompts(six) != prompts_five
    pl.seed_everything(5, verbose=False)
    again = _nupa()
    assert _train_prompts(again) == prompts_five and _first_batch_ids(again) == order_five


def test_an_explicit_seed_wins_over_seed_everything():
    pl.seed_everything(5, verbose=False)
    explicit = _nupa(seed=7)
    assert explicit.seed == 7
    pl.seed_everything(99, verbose=False)
    assert _train_prompts(_nupa(seed=7)) == _train_prompts(explicit)


def test_the_seed_is_read_when_used_not_when_built():
    dm = _nupa()
    pl.seed_everything(11, verbose=False)
    assert dm.seed == 11


def test_seed_everything_seeds_the_sft_hold_out(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(40)))

    def held_out(seed_everything: int, **kwargs) -> list[str]:
        pl.seed_everything(seed_everything, verbose=False)
        dm = SFTDataModule(train_file=str(path), tokenizer="char", val_fraction=0.25, **kwargs)
        return [p.location for p in dm._split_records()["val"]]

    assert held_out(1) == held_out(1)
    assert held_out(1) != held_out(2)
    assert held_out(1, seed=3) == held_out(2, seed=3)
