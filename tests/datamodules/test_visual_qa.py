"""Visual QA data (`lightning_tokens.datamodules.visual_qa`) and its task-routed metrics
(`lightning_tokens.metrics.visual_qa`)."""

import json
import pickle
import re
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.datamodules.visual_qa import (
    COLORS,
    VisualQACollator,
    VisualQADataError,
    VisualQADataModule,
    VisualQADataset,
    generate_benchmark_split,
    read_visual_qa_file,
)
from lightning_tokens.datamodules.visual_qa.benchmark import load_digits_data

ndimage = pytest.importorskip("scipy.ndimage")


# -- a fake processor: one token per character -----------------------------------------------------------
class CharProcessor:
    """The VisionTextProcessor contract with characters as tokens (pad 0, eos 1); records its calls."""

    pad, eos = 0, 1

    def __init__(self) -> None:
        self.calls = []

    @staticmethod
    def encode(text):
        return [2 + (ord(c) % 250) for c in text]

    @staticmethod
    def _pad(rows, value, side):
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if row:
                if side == "right":
                    out[i, : len(row)] = torch.tensor(row)
                else:
                    out[i, width - len(row) :] = torch.tensor(row)
        return out

    def __call__(self, images, questions, answers=None, chat=False):
        self.calls.append({"images": images, "questions": questions, "answers": answers, "chat": chat})
        prompts = [self.encode(("<user>" if chat else "") + q) for q in questions]
        pixels = torch.stack([torch.from_numpy(np.array(im.resize((8, 8)))).permute(2, 0, 1).float() / 255 for im in images])
        out = {
            "prompt_input_ids": self._pad(prompts, self.pad, "left"),
            "prompt_attention_mask": self._pad([[1] * len(p) for p in prompts], 0, "left"),
            "pixel_values": pixels,
        }
        if answers is not None:
            full = [p + self.encode(a) + [self.eos] for p, a in zip(prompts, answers)]
            labels = [[-100] * len(p) + self.encode(a) + [self.eos] for p, a in zip(prompts, answers)]
            out |= {
                "input_ids": self._pad(full, self.pad, "right"),
                "attention_mask": self._pad([[1] * len(f) for f in full], 0, "right"),
                "labels": self._pad(labels, -100, "right"),
            }
        return out


# -- reading shapes back from the pixels -----------------------------------------------------------------
def components(image):
    """``(kind, colour)`` of every connected non-white region, the kind read from how much of its bounding box
    it fills (square 1.0, circle ~0.78, triangle ~0.5)."""
    pixels = np.asarray(image)
    labels, n = ndimage.label((pixels != 255).any(-1))
    found = []
    for index, box in enumerate(ndimage.find_objects(labels), 1):
        region = labels[box] == index
        fill = region.sum() / region.size
        kind = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
        colours = {tuple(c) for c in pixels[box][region]}
        assert len(colours) == 1, "a shape is painted in exactly one colour"
        [rgb] = colours
        [name] = [k for k, v in COLORS.items() if v == rgb]
        found.append((kind, name))
    return found


# -- the generated benchmark -----------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["counting", "mci", "digits"])
def test_generation_is_deterministic_per_seed_split_and_task(task):
    a = generate_benchmark_split(task, "test", 12, seed=5)
    assert a == generate_benchmark_split(task, "test", 12, seed=5)
    assert a != generate_benchmark_split(task, "test", 12, seed=6)
    if task != "digits":  # digits splits are cut from one pool; the other tasks draw a stream per split
        assert a != generate_benchmark_split(task, "val", 12, seed=5)


def test_datamodule_splits_do_not_depend_on_other_tasks_or_construction():
    one = VisualQADataModule(tasks=["counting"], num_train=6, num_val=4, num_test=4, seed=3)
    both = VisualQADataModule(tasks=["mci", "counting"], num_train=6, num_val=4, num_test=4, seed=3)
    for split in ("train", "val", "test"):
        counting = [e for e in both.split_examples(split) if e.domain == "counting"]
        assert one.split_examples(split) == counting
    seeded = VisualQADataModule(tasks=["counting"], num_train=6, num_val=4, num_test=4, seed=4)
    assert seeded.split_examples("test") != one.split_examples("test")


def test_seed_none_follows_seed_everything():
    L.seed_everything(21, verbose=False)
    a = VisualQADataModule(tasks="mci", num_test=6).split_examples("test")
    assert a == VisualQADataModule(tasks="mci", num_test=6, seed=21).split_examples("test")


@pytest.mark.parametrize("n", [0, 1, 7, 40])
def test_mci_is_exactly_balanced(n):
    answers = [e.answer for e in generate_benchmark_split("mci", "train", n, seed=0)]
    assert answers.count("Yes.") == n - n // 2
    assert answers.count("No.") == n // 2


def test_mci_answers_match_the_pixels():
    near = 0
    for e in generate_benchmark_split("mci", "val", 60, seed=2):
        colour, kind = re.fullmatch(r"Does an? (\w+) (\w+) exist in the image\?", e.question).groups()
        found = components(e.image.render())
        assert len(found) == e.num_objects == len(e.image.shapes)
        assert sorted(found) == sorted((s.kind, s.color) for s in e.image.shapes)
        assert ((kind, colour) in found) == (e.answer == "Yes.")
        if e.answer == "No.":
            near += any(k == kind or c == colour for k, c in found)
    assert near > 20  # "No." questions mostly ask about a colour or kind that is in the image


def test_counting_images_hold_the_stated_number_of_shapes():
    examples = generate_benchmark_split("counting", "test", 80, seed=1)
    assert {e.count for e in examples} == set(range(1, 7))
    for e in examples:
        kind = re.fullmatch(r"How many (\w+)s are there in the image\?", e.question).group(1)
        found = components(e.image.render())
        assert len(found) == e.num_objects  # no two shapes touch
        assert sum(k == kind for k, _ in found) == e.count == int(e.answer)
        assert len(found) > e.count or all(k == kind for k, _ in found)


def test_counting_size_options_and_too_small_images():
    big = generate_benchmark_split("counting", "train", 30, seed=0, image_size=96, max_count=9, max_distractors=6)
    assert max(e.count for e in big) <= 9 and big[0].image.render().size == (96, 96)
    for e in big[:10]:
        assert len(components(e.image.render())) == e.num_objects
    with pytest.raises(ConfigError, match="image_size=32 is too small"):
        generate_benchmark_split("counting", "train", 2, seed=0, image_size=32)


def test_digits_are_the_sklearn_images_and_splits_are_disjoint():
    images, labels = load_digits_data()
    dm = VisualQADataModule(tasks="digits", num_train=300, num_val=50, num_test=60, image_size=16, seed=0)
    indices = {}
    for split in ("train", "val", "test"):
        examples = dm.split_examples(split)
        indices[split] = [e.image.index for e in examples]
        assert len(set(indices[split])) == len(examples)
        for e in examples[:20]:
            pixels = np.asarray(e.image.render())[::2, ::2, 0]  # 16 px -> back to 8x8
            ink = np.frombuffer(images[e.image.index], dtype=np.uint8).reshape(8, 8)
            assert np.array_equal(pixels, 255 - ink.astype(int) * 255 // 16)
            assert e.answer == str(labels[e.image.index]) and e.question == "Which digit is this?"
    assert not set(indices["train"]) & set(indices["val"])
    assert not set(indices["train"]) & set(indices["test"])
    assert not set(indices["val"]) & set(indices["test"])


def test_digits_training_repeats_its_pool_and_held_out_sets_must_fit():
    with pytest.warns(UserWarning, match="training repeats them"):
        dm = VisualQADataModule(tasks="digits", num_train=1800, num_val=800, num_test=900, seed=0)
        train = [e.image.index for e in dm.split_examples("train")]
    held_out = {e.image.index for split in ("val", "test") for e in dm.split_examples(split)}
    assert len(train) == 1800 and len(set(train)) == 97 and not set(train) & held_out
    with pytest.raises(ConfigError, match="num_val=1000 \\+ num_test=900"):
        VisualQADataModule(tasks="digits", num_val=1000, num_test=900).split_examples("test")


# -- user files ------------------------------------------------------------------------------------------
def _image(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 12), colour).save(path)
    return path


def test_jsonl_csv_and_json_records_with_relative_paths(tmp_path):
    folder = tmp_path / "data"
    _image(folder / "imgs" / "a.png", "red")
    absolute = _image(tmp_path / "elsewhere" / "b.png", "blue")
    rows = [
        {"image": "imgs/a.png", "question": "How many balls?", "answer": 3, "domain": "counting"},
        {"image": str(absolute), "question": "What colour?", "answer": "blue"},
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "train.csv").write_text(
        f'image,question,answer,domain\nimgs/a.png,"How many\nballs?",3,counting\n{absolute},What colour?,blue,\n'
    )
    for name in ("train.jsonl", "train.json", "train.csv"):
        examples = read_visual_qa_file(str(folder / name))
        assert [e.answer for e in examples] == ["3", "blue"]
        assert [e.domain for e in examples] == ["counting", "vqa"]
        assert [e.count for e in examples] == [3, None]
        assert examples[0].image.render().getpixel((0, 0)) == (255, 0, 0)
        assert examples[1].image.render().getpixel((0, 0)) == (0, 0, 255)
    assert read_visual_qa_file(str(folder / "train.csv"))[1].location.endswith("train.csv, line 4")  # after a 2-line cell


def test_configurable_field_names_and_prediction_files_without_answers(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"img": "x.png", "q": "Is it red?", "task": "mci"}) + "\n")
    [example] = read_visual_qa_file(
        str(tmp_path / "q.jsonl"), image_field="img", question_field="q", domain_field="task", require_answer=False
    )
    assert example.answer is None and example.domain == "mci"


BAD_RECORDS = [
    # (file name, content, line, field, message)
    ("d.jsonl", '{"image": "ok.png", "question": "Q?", "answer": "1"}\n{"image": "nope.png", "question": "Q?", "answer": "1"}\n',
     2, "image", "does not exist"),
    ("d.jsonl", '{"image": "broken.png", "question": "Q?", "answer": "1"}\n', 1, "image", "cannot read image"),
    ("d.jsonl", '{"image": "ok.png", "question": "Q?", "answer": "  "}\n', 1, "answer", "empty answer"),
    ("d.jsonl", '\n{"image": "ok.png", "answer": "1"}\n', 2, "question", "missing"),
    ("d.jsonl", '{"image": ["ok.png"], "question": "Q?", "answer": "1"}\n', 1, "image", "expected text"),
    ("d.csv", "image,question,answer\nok.png,Q?,1\nok.png,Q?,\n", 3, "answer", "empty answer"),
    ("d.csv", "image,question\nok.png,Q?\n", 2, "answer", "missing"),
    ("d.csv", "image,question,answer\nmissing.png,Q?,1\n", 2, "image", "does not exist"),
]


@pytest.mark.parametrize(("name", "content", "line", "field", "message"), BAD_RECORDS)
def test_bad_records_name_file_line_and_field(tmp_path, name, content, line, field, message):
    _image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("not a png")
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(VisualQADataError) as info:
        read_visual_qa_file(str(path))
    text = str(info.value)
    assert f"{path}, line {line}, field '{field}'" in text and message in text
    assert isinstance(info.value, DataError)


def test_file_level_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"\n')
    with pytest.raises(VisualQADataError, match=r"bad.jsonl, line 1: invalid JSON"):
        read_visual_qa_file(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(VisualQADataError, match=r"index 0: expected an object"):
        read_visual_qa_file(str(tmp_path / "list.jsonl"))
    (tmp_path / "empty.csv").write_text("image,question,answer\n")
    with pytest.raises(VisualQADataError, match="holds no records"):
        read_visual_qa_file(str(tmp_path / "empty.csv"), option="val_file")
    with pytest.raises(MissingFileError, match="train_file .* does not exist"):
        VisualQADataModule(train_file=str(tmp_path / "none.jsonl")).setup("fit")
    with pytest.raises(ConfigError, match="from the extension '.txt'"):
        read_visual_qa_file(str(tmp_path / "data.txt"))
    # a broken image found at batch time (check_images=False) still names the record
    _image(tmp_path / "gone.png")
    (tmp_path / "late.jsonl").write_text(json.dumps({"image": "gone.png", "question": "Q?", "answer": "1"}) + "\n")
    [example] = read_visual_qa_file(str(tmp_path / "late.jsonl"), check_images=False)
    (tmp_path / "gone.png").write_text("truncated")
    with pytest.raises(VisualQADataError, match=r"late.jsonl, line 1, field 'image': cannot read image"):
        example.image.render()


# -- the datamodule: processor, batches, hooks -----------------------------------------------------------
def test_collate_calls_the_processor_and_adds_the_lists():
    processor = CharProcessor()
    dm = VisualQADataModule(
        tasks=["counting", "digits"], processor=processor, template="chat", prompt_format="{question} Answer briefly.",
        num_train=3, num_val=2, num_test=2, batch_size=6, eval_batch_size=4, seed=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    [call] = processor.calls
    examples = dm.split_examples("val")
    assert call["chat"] is True and call["answers"] == [e.answer for e in examples]
    assert call["questions"] == [e.question + " Answer briefly." for e in examples]
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in call["images"])
    for key in ("input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask", "pixel_values"):
        assert isinstance(batch[key], torch.Tensor)
    assert batch["prompts"] == call["questions"]
    assert batch["questions"] == [e.question for e in examples]
    assert batch["answers"] == [e.answer for e in examples]
    assert batch["domains"] == ["counting", "counting", "digits", "digits"]
    assert batch["counts"].tolist() == [int(examples[0].answer), int(examples[1].answer), -1, -1]
    assert batch["num_objects"][:2].tolist() == [e.num_objects for e in examples[:2]] and batch["num_objects"][2] == -1
    assert batch["example_id"].tolist() == [0, 1, 2, 3]
    # labels cover the answer and eos only
    first = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert first == CharProcessor.encode(examples[0].answer) + [CharProcessor.eos]

    train = next(iter(dm.train_dataloader()))
    assert sorted(train["domains"]) == ["counting"] * 3 + ["digits"] * 3 and "input_ids" in train


def test_processor_comes_from_the_lightning_module_and_its_errors():
    dm = VisualQADataModule(tasks="mci", num_train=2, num_val=2, num_test=2, seed=0)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="no trainer is attached"):
        dm.train_dataloader()
    processor = CharProcessor()
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(processor=processor))
    next(iter(dm.train_dataloader()))
    assert processor.calls[0]["chat"] is False
    dm.processor = None
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace())
    with pytest.raises(ConfigError, match="SimpleNamespace has no `processor`"):
        dm.val_dataloader()

    def partial(images, questions, answers=None, chat=False):
        return {"input_ids": torch.zeros(len(images), 2, dtype=torch.long)}

    collate = VisualQACollator(partial, "eval")
    items = [VisualQADataset(dm.split_examples("val"))[0]]
    with pytest.raises(ConfigError, match="returned no attention_mask, labels, prompt_input_ids, prompt_attention_mask"):
        collate(items)


def test_dataset_and_collator_pickle_for_worker_processes():
    dm = VisualQADataModule(tasks=["counting", "digits"], processor=CharProcessor(), num_val=2, seed=0)
    loader = dm.val_dataloader()
    dataset, collate = pickle.loads(pickle.dumps((loader.dataset, loader.collate_fn)))
    batch = collate([dataset[0], dataset[3]])
    assert batch["domains"] == ["counting", "digits"] and batch["input_ids"].shape[0] == 2


def test_predict_from_the_test_split_and_from_a_file(tmp_path):
    processor = CharProcessor()
    dm = VisualQADataModule(tasks="counting", processor=processor, num_test=3, eval_batch_size=8, seed=0)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert processor.calls[-1]["answers"] is None
    assert "input_ids" not in batch and "labels" not in batch and "prompt_input_ids" in batch
    assert batch["prompts"] == [e.question for e in dm.split_examples("test")]
    assert batch["answers"] == [e.answer for e in dm.split_examples("test")]  # known here, so passed along

    _image(tmp_path / "a.png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "a.png", "question": "How many?"}) + "\n")
    dm = VisualQADataModule(predict_file=str(tmp_path / "p.jsonl"), processor=processor)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["prompts"] == ["How many?"] and "answers" not in batch and batch["domains"] == ["vqa"]


def test_sources_per_split(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?", "answer": "A long answer"}) + "\n")
    only_train = VisualQADataModule(train_file=str(tmp_path / "t.jsonl"), processor=CharProcessor())
    only_train.setup("fit")
    assert only_train.tasks == [] and only_train.val_dataloader() == []  # no benchmark mixed in
    with pytest.raises(ConfigError, match="has no test data: set test_file, or tasks"):
        only_train.setup("test")
    mixed = VisualQADataModule(tasks=["mci"], train_file=str(tmp_path / "t.jsonl"), num_val=2, num_test=2)
    mixed.setup("fit")
    assert [e.domain for e in mixed.split_examples("train")] == ["vqa"]
    assert [e.domain for e in mixed.split_examples("val")] == ["mci", "mci"]
    assert VisualQADataModule().tasks == ["counting", "mci", "digits"]
    assert VisualQADataModule(tasks="all").tasks == ["counting", "mci", "digits"]


def test_generation_budget():
    assert VisualQADataModule(tasks="mci").generation_max_new_tokens == 8
    assert VisualQADataModule(tasks="mci", max_new_tokens=3).generation_max_new_tokens == 3


def test_generation_budget_from_answer_files(tmp_path):
    _image(tmp_path / "a.png")
    answer = "a rather long answer of many characters"
    (tmp_path / "v.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?", "answer": answer}) + "\n")
    dm = VisualQADataModule(val_file=str(tmp_path / "v.jsonl"))
    assert dm.generation_max_new_tokens == len(answer) + 2
    processor = CharProcessor()
    processor.tokenizer = lambda texts, add_special_tokens: {"input_ids": [t.split() for t in texts]}
    dm = VisualQADataModule(val_file=str(tmp_path / "v.jsonl"), processor=processor)
    assert dm.generation_max_new_tokens == 7 + 2  # 7 words


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["counting", "colours"]}, "unknown task 'colours'"),
        ({"template": "chatml"}, "template must be one of 'plain', 'chat'"),
        ({"prompt_format": "Answer:"}, "must contain '{question}'"),
        ({"prompt_format": "{question} {answer}"}, "not a format string"),
        ({"num_train": -1}, "num_train must be >= 0"),
        ({"processor": "qwen"}, "must be callable"),
        ({"tasks": "mci", "image_size": 24}, "image_size=24 is too small for 6 shapes"),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        VisualQADataModule(**kwargs)


# -- metrics ---------------------------------------------------------------------------------------------
def test_extract_answer_is_gvtbench_postprocess():
    pytest.importorskip("lightning_tokens.metrics.gvtbench")
    dm = VisualQADataModule(tasks="counting")
    assert dm.extract_answer(" 3 circles. And more.\n") == "3 circles."
    assert dm.extract_answer("Yes", domain="mci") == "Yes."


def test_metrics_route_examples_by_domain():
    pytest.importorskip("lightning_tokens.metrics.gvtbench")
    dm = VisualQADataModule(tasks=["counting", "mci", "digits"])
    metrics = dm.build_metrics("val/")
    assert sorted(metrics.keys(keep_base=False)) == [
        "val/counting/accuracy", "val/counting/mae", "val/counting/rmse", "val/digits/accuracy", "val/mci/accuracy",
    ]
    preds = [dm.extract_answer(t) for t in ["3", "two dogs", "I do not know", "Yes", "7", "", "0"]]
    targets = ["3", "4", "No.", "No.", "7", "0", "0"]
    domains = ["counting", "counting", "mci", "mci", "digits", "digits", "digits"]
    metrics.update(preds, targets, domains)
    values = {k: round(float(v), 4) for k, v in metrics.compute().items()}
    assert values == {
        "val/counting/accuracy": 0.5, "val/counting/mae": 1.0, "val/counting/rmse": round(2 ** 0.5, 4),
        "val/mci/accuracy": 0.5, "val/digits/accuracy": round(2 / 3, 4),  # "" is not a 0
    }
    with pytest.raises(ConfigError, match="got examples of 'vqa'"):
        metrics.update(["a."], ["a"], ["vqa"])
    metrics.reset()
    metrics.update(["1."], ["1"], ["counting"])
    after = metrics.compute()
    assert float(after["val/counting/accuracy"]) == 1.0 and torch.isnan(after["val/mci/accuracy"])


def test_metrics_of_user_file_domains(tmp_path):
    pytest.importorskip("lightning_tokens.metrics.gvtbench")
    _image(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": "Q?", "answer": "2", "domain": "counting"},
            {"image": "a.png", "question": "What?", "answer": "A cat"}]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = VisualQADataModule(val_file=str(tmp_path / "v.jsonl"), test_file=str(tmp_path / "v.jsonl"))
    metrics = dm.build_metrics("test/")
    assert sorted(metrics.keys(keep_base=False)) == [
        "test/counting/accuracy", "test/counting/mae", "test/counting/rmse", "test/vqa/exact_match",
    ]
    metrics.update(["2.", "a cat."], ["2", "A cat"], ["counting", "vqa"])
    assert float(metrics.compute()["test/vqa/exact_match"]) == 1.0


class _LoggingModule(L.LightningModule):
    """Validates by 'generating' the right answers for counting and 'No.' for everything else."""

    def __init__(self):
        super().__init__()
        self.processor = CharProcessor()
        self.layer = torch.nn.Linear(1, 1)
        self.val_metrics = None

    def setup(self, stage):
        self.val_metrics = self.trainer.datamodule.build_metrics("val/")

    def validation_step(self, batch, batch_idx):
        texts = [a if d == "counting" else "No, it is not." for a, d in zip(batch["answers"], batch["domains"])]
        answers = [self.trainer.datamodule.extract_answer(t) for t in texts]
        self.val_metrics.update(answers, batch["answers"], batch["domains"])
        self.log_dict(self.val_metrics, batch_size=len(answers))


def test_metrics_log_per_task_through_lightning():
    pytest.importorskip("lightning_tokens.metrics.gvtbench")
    dm = VisualQADataModule(tasks=["counting", "mci"], num_val=6, eval_batch_size=4, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(_LoggingModule(), datamodule=dm, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged == {"val/counting/accuracy": 1.0, "val/counting/mae": 0.0, "val/counting/rmse": 0.0,
                      "val/mci/accuracy": 0.5}
