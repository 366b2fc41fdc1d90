"""Number Cookbook task generation and `NUPADataModule` (`lightning_tokens.datamodules.nupa`)."""

import json
import pickle
import re
from decimal import Decimal
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lightning_tokens.datamodules import NUPA_TASKS, NUPACollator, NUPADataModule, generate_nupa_examples
from lightning_tokens.models.tokenizers import build_char_tokenizer, char_vocab

NUM = r"(\d+)"
FLT = r"(\d+\.\d+)"
FRAC = r"(\d+/\d+)"
PATTERNS = {
    "Integer/add": rf"Add two numbers: {NUM} \+ {NUM} = ",
    "Integer/sub": rf"Subtract two numbers: {NUM} - {NUM} = ",
    "Integer/multiply": rf"Multiply two numbers: {NUM} \* {NUM} = ",
    "Integer/max": rf"Get the maximal number: {NUM} and {NUM} = ",
    "Integer/digit_max": (
        r"Compare two numbers digit by digit and return the larger digit at each position, "
        rf"treating any missing digits as 0\. {NUM} and {NUM} = "
    ),
    "Integer/digit_add": (
        r"The task is to add two given numbers digit by digit and return the result modulo 10 "
        rf"\(ignoring carry\), treating any missing digits as 0\. {NUM} digit add {NUM} = "
    ),
    "Integer/get_digit": rf"Get the digit at the given position \(from left to right, starting from 0\)\. {NUM} at position {NUM} = ",
    "Integer/length": rf"The total number of digits of {NUM} = ",
    "Integer/count": rf"Count the number of the given digit in the given number: {NUM} count the occurrence time of digit {NUM} = ",
    "Integer/to_scient": rf"Convert the number to scientific notation: {NUM} = ",
    "Float/add": rf"Add two numbers: {FLT} \+ {FLT} = ",
    "Float/sub": rf"Subtract two numbers: {FLT} - {FLT} = ",
    "Float/max": rf"Get the maximal number: {FLT} and {FLT} = ",
    "Fraction/add": rf"Add two numbers: {FRAC} \+ {FRAC} = ",
}
DOMAIN = {t: t.split("/")[0] for t in PATTERNS} | {
    t: "Integer" for t in ("Integer/get_digit", "Integer/length", "Integer/count")
} | {"Integer/to_scient": "ScientificNotation"}


def fmt_decimal(d: Decimal) -> str:
    """The reference's Float string: at least one decimal, no trailing zeros."""
    s = format(d, "f")
    ip, _, fp = s.partition(".")
    return f"{ip}.{fp.rstrip('0') or '0'}"


def digitwise(a: str, b: str, op) -> str:
    width = max(len(a), len(b))
    return str(int("".join(str(op(int(x), int(y))) for x, y in zip(a.zfill(width), b.zfill(width)))))


def expected_answer(task: str, ops: tuple[str, ...]) -> str:
    if task.startswith("Integer/"):
        name = task.split("/")[1]
        a = int(ops[0])
        if name == "add":
            return str(a + int(ops[1]))
        if name == "sub":
            return str(a - int(ops[1]))
        if name == "multiply":
            return str(a * int(ops[1]))
        if name == "max":
            return str(max(a, int(ops[1])))
        if name == "digit_max":
            return digitwise(ops[0], ops[1], max)
        if name == "digit_add":
            return digitwise(ops[0], ops[1], lambda x, y: (x + y) % 10)
        if name == "get_digit":
            return ops[0][int(ops[1])]
        if name == "length":
            return str(len(ops[0]))
        if name == "count":
            return str(sum(c == ops[1] for c in ops[0]))
        if name == "to_scient":
            if a == 0:
                return "0.0e0"
            exp = len(ops[0]) - 1
            return f"{fmt_decimal(Decimal(a).scaleb(-exp))}e{exp}"
    if task.startswith("Float/"):
        x, y = Decimal(ops[0]), Decimal(ops[1])
        return fmt_decimal({"Float/add": x + y, "Float/sub": x - y, "Float/max": max(x, y)}[task])
    if task == "Fraction/add":
        r = Fraction(ops[0]) + Fraction(ops[1])
        return f"{r.numerator}/{r.denominator}"
    raise AssertionError(task)


def test_task_table_matches_the_brief():
    assert set(NUPA_TASKS) == set(PATTERNS)


@pytest.mark.parametrize("task", sorted(PATTERNS))
def test_every_task_answers_are_correct(task):
    examples = generate_nupa_examples(task, 300, 1, 6, seed=7)
    lengths = set()
    for ex in examples:
        m = re.fullmatch(PATTERNS[task], ex.prompt)
        assert m is not None, ex.prompt
        ops = m.groups()
        assert ex.answer == expected_answer(task, ops), ex
        assert ex.domain == DOMAIN[task] and ex.task == task
        # digit lengths and formats
        first = ops[0]
        if task.startswith("Integer/"):
            lengths.add(len(first))
            assert 1 <= len(first) <= 6 and (first == "0" or not first.startswith("0"))
        if task.startswith("Float/"):
            for op in ops:
                ip, fp = op.split(".")
                assert 1 <= len(fp) <= 6 and fp[-1] != "0" and 1 <= len(ip) <= len(fp) and ip[0] != "0"
            assert re.fullmatch(r"\d+\.(0|\d*[1-9])", ex.answer)
            lengths.add(len(first.split(".")[1]))
        if task == "Fraction/add":
            for op in ops:
                f = Fraction(op)
                assert op == f"{f.numerator}/{f.denominator}"  # operands are reduced
                assert 1 <= len(op.split("/")[1]) <= 6
            lengths.add(len(first.split("/")[1]))
        if task in ("Integer/sub", "Float/sub"):
            assert Decimal(ops[0]) >= Decimal(ops[1])
        if task == "Integer/to_scient":
            assert re.fullmatch(r"[1-9]\.(0|\d*[1-9])e\d+|0\.0e0", ex.answer)
    assert lengths == set(range(1, 7))  # every length in [min, max] is drawn


def test_to_scient_examples():
    from lightning_tokens.datamodules.nupa.tasks import _int_to_scient

    assert [_int_to_scient(v) for v in (1200, 1000, 7, 0, 10, 1234)] == ["1.2e3", "1.0e3", "7.0e0", "0.0e0", "1.0e1", "1.234e3"]


def test_generation_is_deterministic_and_seeded():
    a = generate_nupa_examples("Integer/add", 50, 1, 5, seed=3)
    assert a == generate_nupa_examples("Integer/add", 50, 1, 5, seed=3)
    assert a != generate_nupa_examples("Integer/add", 50, 1, 5, seed=4)
    assert generate_nupa_examples("Integer/add", 0, 1, 5, seed=3) == []


def test_generation_errors_and_type_hint():
    with pytest.raises(ValueError, match="valid tasks"):
        generate_nupa_examples("Integer/truediv", 1, 1, 2, seed=0)
    with pytest.raises(ValueError, match="min_digits"):
        generate_nupa_examples("Integer/add", 1, 3, 2, seed=0)
    ex = generate_nupa_examples("Fraction/add", 1, 1, 2, seed=0, type_hint=True)[0]
    assert ex.prompt.startswith(
        "Directly return the answer as an **irreducible** fraction without any comma separator, like 7/13 . Add two numbers: "
    )
    plain = generate_nupa_examples("Fraction/add", 1, 1, 2, seed=0)[0]
    assert ex.prompt.endswith(plain.prompt) and ex.answer == plain.answer


# --- DataModule ---------------------------------------------------------------------------------------
def make_dm(**kwargs):
    args = dict(tasks="Integer/add", tokenizer="char", num_train=64, num_val=16, num_test=16, batch_size=8, eval_batch_size=8)
    args.update(kwargs)
    dm = NUPADataModule(**args)
    return dm


def test_train_batch_label_masking():
    dm = make_dm(tasks=["Integer/add", "Float/sub"], train_digits=(1, 4))
    dm.setup("fit")
    tok = dm.tokenizer
    assert len(dm._datasets["train"]) == 2 * 64  # num_train is per task
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "example_id"}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == labels.dtype == batch["example_id"].dtype == torch.long
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 8
    ds = dm._datasets["train"]
    for row in range(ids.shape[0]):
        item = ds[int(batch["example_id"][row])]
        n_prompt, n_answer = len(item["prompt_ids"]), len(item["answer_ids"])
        n = n_prompt + n_answer
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
        assert labels[row, :n_prompt].eq(-100).all()  # no loss on the prompt
        assert labels[row, n_prompt:n].equal(ids[row, n_prompt:n])  # answer + eos, unshifted
        assert labels[row, n:].eq(-100).all() and ids[row, n:].eq(tok.pad_token_id).all()  # padding
        assert int(ids[row, n - 1]) == tok.eos_token_id
        assert tok.decode(ids[row, :n_prompt].tolist()) == item["prompt"]
        assert tok.decode(ids[row, n_prompt : n - 1].tolist()) == item["answer"]


def test_eval_batch_has_left_padded_prompts():
    dm = make_dm(tasks=["Integer/add", "Integer/length"])
    dm.setup("validate")
    tok = dm.tokenizer
    batch = next(iter(dm.val_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "example_id", "prompt_input_ids", "prompt_attention_mask",
            "answers", "domains", "prompts", "tasks"} <= set(batch)
    p_ids, p_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    assert p_ids.shape == p_mask.shape and p_ids.shape[0] == len(batch["answers"]) == len(batch["prompts"]) == 8
    assert isinstance(batch["answers"], list) and isinstance(batch["domains"][0], str)
    lengths = p_mask.sum(1)
    assert lengths.min() < p_ids.shape[1]  # mixed prompt lengths, so some padding happened
    width = p_ids.shape[1]
    for row in range(p_ids.shape[0]):
        n = int(lengths[row])
        assert p_mask[row, width - n :].eq(1).all() and p_mask[row, : width - n].eq(0).all()  # left padding
        assert p_ids[row, : width - n].eq(tok.pad_token_id).all()
        assert tok.decode(p_ids[row, width - n :].tolist()) == batch["prompts"][row]
        assert batch["input_ids"][row, :n].equal(p_ids[row, width - n :])  # same prompt tokens as training
        n_full = int(batch["attention_mask"][row].sum())
        assert tok.decode(batch["input_ids"][row, n : n_full - 1].tolist()) == batch["answers"][row]


def test_predict_batches(tmp_path):
    dm = make_dm()
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "prompts"}
    assert batch["prompts"] == [e.prompt for e in dm.examples["test"][:8]]

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Add two numbers: 1 + 2 = "}) + "\n\n" + json.dumps({"prompt": "x = ", "id": 3}) + "\n")
    dm = make_dm(predict_file=str(jsonl))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["prompts"] == ["Add two numbers: 1 + 2 = ", "x = "]
    assert dm.tokenizer.decode(batch["prompt_input_ids"][1, -4:].tolist()) == "x = "
    assert batch["prompt_attention_mask"][1].tolist() == [0] * 21 + [1] * 4

    txt = tmp_path / "prompts.txt"
    txt.write_text("Add two numbers: 1 + 2 = \nGet the maximal number: 3 and 4 = \n")
    dm = make_dm(predict_file=str(txt))
    dm.setup("predict")
    assert next(iter(dm.predict_dataloader()))["prompts"] == ["Add two numbers: 1 + 2 = ", "Get the maximal number: 3 and 4 = "]


def test_decontamination():
    dm = make_dm(tasks=["Integer/add", "Integer/max"], train_digits=(1, 2), test_digits=(1, 2), num_train=3000, num_val=100, num_test=100)
    ex = dm.examples
    for task in ("Integer/add", "Integer/max"):
        train = {e.prompt for e in ex["train"] if e.task == task}
        val = [e.prompt for e in ex["val"] if e.task == task]
        test = [e.prompt for e in ex["test"] if e.task == task]
        assert len(val) == len(test) == 100
        assert len(set(val)) == 100 and len(set(test)) == 100
        assert not set(val) & train and not set(test) & train and not set(test) & set(val)
    # Splits use different seeds: without decontamination, validation and test still differ from training.
    raw = make_dm(decontaminate=False, train_digits=(3, 4), test_digits=(3, 4), num_val=50)
    assert [e.prompt for e in raw.examples["val"]] != [e.prompt for e in raw.examples["train"][:50]]
    assert len(raw.examples["val"]) == 50


def test_decontamination_when_the_space_is_too_small():
    dm = make_dm(train_digits=(1, 1), test_digits=(1, 1), num_train=2000, num_val=10, num_test=10)
    with pytest.warns(UserWarning, match="decontaminate"):
        ex = dm.examples
    assert len(ex["val"]) == 10 and len(ex["test"]) == 10  # filled anyway


def test_examples_are_deterministic_per_seed():
    a, b, c = make_dm(seed=5), make_dm(seed=5), make_dm(seed=6)
    assert a.examples == b.examples
    assert a.examples["train"] != c.examples["train"]


def test_tokenizer_from_the_lightning_module_and_errors():
    dm = make_dm(tokenizer=None)
    with pytest.raises(ValueError, match="tokenizer='char'"):
        dm.setup("fit")
    tok = build_char_tokenizer()
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    dm.setup("fit")
    assert dm.tokenizer is tok
    with pytest.raises(ValueError, match="valid tasks"):
        NUPADataModule(tasks=["Integer/nope"])
    assert NUPADataModule(tasks="all").tasks == list(NUPA_TASKS)


def test_bos_prefix_from_a_tokenizer_that_adds_bos():
    backend = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    dm = make_dm(tokenizer=None)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tok))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert tok.pad_token_id == tok.eos_token_id  # pad fell back to eos
    assert batch["input_ids"][:, 0].eq(1).all()  # bos once, at the start
    assert batch["labels"][:, 0].eq(-100).all()
    first_real = batch["prompt_attention_mask"].argmax(1)
    assert all(int(batch["prompt_input_ids"][i, first_real[i]]) == 1 for i in range(8))


def test_max_length_truncates_prompts_from_the_left():
    dm = make_dm(tasks="Integer/count", max_length=40, train_digits=(3, 3))
    with pytest.warns(UserWarning, match="max_length=40"):
        dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 40
    ds = dm._datasets["train"]
    item = ds[0]
    assert len(item["prompt_ids"]) + len(item["answer_ids"]) == 40
    assert dm.tokenizer.decode(item["prompt_ids"]) == item["prompt"][-len(item["prompt_ids"]) :]


def test_generation_budget_metrics_and_extraction():
    dm = make_dm(test_digits=(3, 3))
    longest = max(len(e.answer) for s in ("val", "test") for e in dm.examples[s])
    assert dm.generation_max_new_tokens == longest + 2  # before setup: characters
    dm.setup("test")
    assert dm.generation_max_new_tokens == longest + 2  # char tokenizer: one token per character
    assert make_dm(max_new_tokens=9).generation_max_new_tokens == 9
    metrics = dm.build_metrics("test/")
    assert sorted(metrics.keys()) == ["test/digit_match", "test/dlength", "test/exact_match"]
    assert dm.extract_answer("Add two numbers: 1 + 2 = 3</s>") == "3"
    assert dm.extract_answer("3.5", domain="Integer") == "3"
    batch = next(iter(dm.test_dataloader()))
    preds = [dm.extract_answer(p + a) for p, a in zip(batch["prompts"], batch["answers"])]
    metrics.update(preds, batch["answers"], batch["domains"])
    assert float(metrics.compute()["test/exact_match"]) == 1.0


def test_collator_is_picklable_and_workers_work():
    collator = NUPACollator(pad_token_id=0, mode="eval")
    assert pickle.loads(pickle.dumps(collator)) == collator
    dm = make_dm(num_workers=1, num_train=16)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == 16
    assert sorted(torch.cat([b["example_id"] for b in batches]).tolist()) == list(range(16))


def test_fit_with_the_modules_tokenizer():
    """In a real Trainer, tokenizer=None picks up `lightning_module.tokenizer` and eval batches reach the module."""
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.tokenizer = build_char_tokenizer()
            self.emb = torch.nn.Embedding(100, 8)
            self.head = torch.nn.Linear(8, 100)
            self.seen_val_keys = set()

        def training_step(self, batch, batch_idx):
            logits = self.head(self.emb(batch["input_ids"]))
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())

        def validation_step(self, batch, batch_idx):
            self.seen_val_keys |= set(batch)
            dm = self.trainer.datamodule
            metrics = dm.build_metrics("val/")
            metrics.update([dm.extract_answer(p) for p in batch["prompts"]], batch["answers"], batch["domains"])
            self.log_dict(metrics.compute(), batch_size=len(batch["answers"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    dm = make_dm(tokenizer=None)
    trainer = L.Trainer(
        accelerator="cpu", fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, datamodule=dm)
    assert dm.tokenizer is model.tokenizer
    assert {"prompt_input_ids", "answers", "domains"} <= model.seen_val_keys
