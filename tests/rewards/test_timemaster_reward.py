"""The TimeMaster reward: both ``<class>`` parsers, the extension bonus, the GRPO reward class and the local judge."""

import warnings

import pytest
import torch

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.rewards import Rewards, RewardSpec
from lightning_tokens.rewards.timemaster import (
    GENERIC_PHRASES,
    LocalModelJudge,
    TimeMasterReward,
    extract_tag,
    judge_prompt,
    parse_class_label,
    parse_judge_score,
    penalize_if_generic,
    timemaster_reward,
)

CTU = ["Desktop", "Laptop"]
EMG = ["Healthy", "Myopathy", "Neuropathy"]

# (rule, completion, label, judge reply, expected reward). Provenance: every expected value was computed
# once by running TimeMaster's own verl/utils/reward_score/ctu.py and emg_soft.py compute_score (repo
# langfengQ/TimeMaster, HEAD) in a scratch script, with a stub `openai` module whose GPT-4o answered the
# "judge reply" string (None: never asked). Ours gets a judge returning float(reply) ("abc" raises, as the
# reference's float() did). The rows are 20 hand-written edge cases and 21 drawn from 20,000 random
# completions on which both implementations agreed exactly. ctu.py has no extension bonus: its rows use no judge.
REFERENCE_TABLE = [
    ("ctu", "<think>x</think><class>Laptop</class>", "Laptop", None, 1.0),
    ("ctu", "<class> desktop </class>", "Laptop", None, 0.1),
    ("ctu", "Laptop", "Laptop", None, 0.0),
    ("ctu", "<class>tablet</class><class>Laptop</class>", "Laptop", None, 1.0),
    ("ctu", "<class>Desktop</class><class>Laptop</class>", "Laptop", None, 0.1),
    ("ctu", "<CLASS>\n  LAPTOP\n</CLASS>", " laptop ", None, 1.0),
    ("ctu", "<class>Laptop computer</class>", "Laptop", None, 0.0),
    ("ctu", "<class>Laptop", "Laptop", None, 0.0),
    ("ctu", "<class><class>Laptop</class></class>", "Laptop", None, 1.0),
    ("emg", "<think>r</think><class>Myopathy</class><extension>Order a muscle biopsy.</extension>", "Myopathy", "0.8", 1.4),
    ("emg", "<class>x</class><class>Myopathy</class>", "Myopathy", None, 0.0),
    ("emg", "<class>Healthy<class>Myopathy</class>", "Myopathy", None, 0.0),
    ("emg", "<Class>\n neuropathy \n</Class>", "NEUROPATHY", None, 1.0),
    ("emg", "<class>Healthy</class><extension>Refer to specialist for review.</extension>", "Healthy", "0.9", 1.2),
    ("emg", "<class>Healthy</class><extension>Reassure; no follow-up.</extension>", "Healthy", "abc", 1.0),
    ("emg", "<class>Healthy</class><extension>Reassure; no follow-up.</extension>", "Myopathy", "0.8", 0.1),
    ("emg", "<class>Healthy</class><extension>   </extension>", "Healthy", "0.8", 1.0),
    ("emg", "<class>Healthy</class><extension>Needs FURTHER DIAGNOSTIC TESTS.</extension>", "Healthy", "1.5", 1.2),
    ("emg", "<class>Healthy</class><extension>A</extension><extension>B</extension>", "Healthy", "0.25", 1.125),
    ("emg", "<class>Healthy</class>", "Healthy", None, 1.0),
    ("ctu", "<extension>Refer to specialist now</extension><extension>  </extension><extension>  </extension>", "DESKTOP", None, 0.0),
    ("ctu", "<extension></extension><class>\tdesk<CLASS>\nLap top\n</Class><class>\t</class><extension>  </extension>", " laptop ", None, 0.0),
    ("ctu", "<class> Desktop </class> ", " laptop ", None, 0.1),
    ("ctu", "<extension>Refer to specialist now</extension><class>\tdesk</class><class>desktop</class><class>\nLaptop\ntext", " laptop ", None, 0.1),
    ("ctu", "<class>\tDesktop</class><class></class><extension>Refer to specialist now</extension>", "Desktop", None, 1.0),
    ("ctu", "<CLASS>DESKTOP</Class></class> <class>\tdesk", "DESKTOP", None, 1.0),
    ("emg", "<extension>review CLINICAL HISTORY</extension>", "Healthy", "0.25", 0.0),
    ("emg", "\n<think>x</think><class>LAP TOP</class ><think> reasoning </think>", "HEALTHY", "1", 0.0),
    ("emg", "<extension>nerve conduction study</extension>\n<class>Neuropathy</class>\tLap top</class>", "Myopathy", "abc", 0.1),
    ("emg", "<class> Healthy </class><class>\t<extension>Refer to specialist now</extension> desk </class>", "NEUROPATHY", "abc", 0.1),
    ("emg", "<CLASS> Healthy </Class><think>a<class>b</think>", " healthy\n", "1", 1.0),
    ("emg", "<extension>Refer to specialist now</extension>\n<class>healthy</class>\n", "HEALTHY", "0", 1.0),
    ("emg", "<extension>review CLINICAL HISTORY</extension><CLASS>healthy</Class><class>Lap top<class>\tMyopathy</class>", " healthy\n", "0.25", 1.125),
    ("emg", "<extension>text\tHealthy</class><class>MYOPATHY</class><extension></extension>", "Myopathy", "0.25", 1.125),
    ("emg", "<extension>Refer to specialist now</extension><CLASS>\tHealthy</Class>", " healthy\n", "1", 1.2),
    ("emg", "<think>x</think><class> Healthy </class><extension>Refer to specialist now</extension>text", " healthy\n", "1", 1.2),
    ("emg", "<extension>Order a biopsy.</extension></class></class><class>neuropathy</class>", "Neuropathy", "0.8", 1.4),
    ("emg", "<class>\nNeuropathy\n</class><think>x</think><extension>Order a biopsy.</extension>\ntext", "NEUROPATHY", "0.9", 1.45),
    ("emg", "<class> Healthy </class><extension>nerve conduction study</extension>", " healthy\n", "0.9", 1.45),
    ("emg", "<class>Healthy</class><think>a<class>b</think><extension>nerve conduction study</extension>healthy", "HEALTHY", "1", 1.5),
    ("emg", "<extension>Order a biopsy.</extension><CLASS>\tHealthy</Class>", "Healthy", "1", 1.5),
]


def reply_judge(reply):
    return None if reply is None else (lambda extension, prediction, reasoning: float(reply))


@pytest.mark.parametrize("rule, completion, label, reply, expected", REFERENCE_TABLE)
def test_matches_the_reference_implementation(rule, completion, label, reply, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "abc" judge fails with a warning
        reward = timemaster_reward(completion, label, CTU if rule == "ctu" else EMG, reply_judge(reply), rule)
    assert reward == expected


def test_required_checks():
    assert timemaster_reward("<think>x</think><class>Laptop</class>", "Laptop", CTU) == 1.0
    assert timemaster_reward("<class> desktop </class>", "Laptop", CTU) == 0.1
    assert timemaster_reward("Laptop", "Laptop", CTU) == 0.0
    completion = "<think>Polyphasic units.</think><class>Myopathy</class><extension>Order a muscle biopsy.</extension>"
    assert timemaster_reward(completion, "Myopathy", EMG, lambda *_: 0.8, rule="emg") == pytest.approx(1.4)


def test_several_class_tags_differ_between_rules():
    completion = "<class>not sure</class> ... <class>Laptop</class>"
    assert parse_class_label(completion, CTU, "ctu") == "Laptop"
    assert parse_class_label(completion, CTU, "emg") is None
    assert timemaster_reward(completion, "Laptop", CTU, rule="ctu") == 1.0
    assert timemaster_reward(completion, "Laptop", CTU, rule="emg") == 0.0
    # Both rules take the first tag when it holds a label, even if a later one is right.
    for rule in ("ctu", "emg"):
        assert timemaster_reward("<class>Desktop</class><class>Laptop</class>", "Laptop", CTU, rule=rule) == 0.1


@pytest.mark.parametrize("rule", ["ctu", "emg"])
def test_whitespace_case_and_newlines(rule):
    assert parse_class_label("<CLASS>\n\t lApToP \n</class>", CTU, rule) == "Laptop"
    assert timemaster_reward("<Class>\nlaptop\n</Class>", "  LAPTOP\n", CTU, rule=rule) == 1.0
    assert parse_class_label("<class>Lap\ntop</class>", CTU, rule) is None
    assert parse_class_label("<class>Laptop", CTU, rule) is None


@pytest.mark.parametrize("rule", ["ctu", "emg"])
def test_labels_with_regex_metacharacters(rule):
    labels = ["Oct-Mar (winter)", "Apr-Sep (summer)", "a.b+"]
    assert parse_class_label("<class> oct-mar (WINTER) </class>", labels, rule) == "Oct-Mar (winter)"
    assert parse_class_label("<class>Oct-Mar winter</class>", labels, rule) is None
    assert parse_class_label("<class>axbb</class>", labels, rule) is None
    assert timemaster_reward("<class>a.b+</class>", "a.b+", labels, rule=rule) == 1.0
    assert timemaster_reward("<class>Apr-Sep (summer)</class>", "Oct-Mar (winter)", labels, rule=rule) == 0.1


def test_label_outside_the_set_and_bad_configuration():
    with pytest.raises(DataError, match=r"'Tablet'.*\['Desktop', 'Laptop'\]"):
        timemaster_reward("<class>Laptop</class>", "Tablet", CTU)
    with pytest.raises(ConfigError, match="allowed_labels is empty"):
        timemaster_reward("<class>Laptop</class>", "Laptop", [])
    with pytest.raises(ConfigError, match="blank"):
        parse_class_label("<class>Laptop</class>", ["Laptop", " "])
    with pytest.raises(ConfigError, match="rule='ecg'"):
        timemaster_reward("<class>Laptop</class>", "Laptop", CTU, rule="ecg")


def test_single_label_without_answer_scores_zero():
    assert timemaster_reward("no tag", "Laptop", ["Laptop"]) == 0.0


EXTENSION = "<think>Short polyphasic units.</think>\n<class> Myopathy </class>\n<extension> Order a muscle biopsy. </extension>"


def test_judge_receives_extension_prediction_and_reasoning():
    calls = []

    def judge(extension, prediction, reasoning):
        calls.append((extension, prediction, reasoning))
        return 0.5

    for rule in ("ctu", "emg"):
        assert timemaster_reward(EXTENSION, "myopathy", EMG, judge, rule=rule) == 1.25
    assert calls == [("Order a muscle biopsy.", "Myopathy", "Short polyphasic units.")] * 2


def test_generic_extension_is_capped():
    completion = "<class>Healthy</class><extension>Please refer to specialist.</extension>"
    assert timemaster_reward(completion, "Healthy", EMG, lambda *_: 0.9, rule="emg") == pytest.approx(0.9 + 0.1 + 0.5 * 0.4)
    assert timemaster_reward(completion, "Healthy", EMG, lambda *_: 0.3, rule="emg") == pytest.approx(1.15)
    # A custom phrase list replaces the default one.
    assert timemaster_reward(completion, "Healthy", EMG, lambda *_: 0.9, rule="emg", generic_phrases=[r"biopsy"]) == pytest.approx(1.45)
    assert penalize_if_generic("Check CLINICAL HISTORY", 0.7) == 0.4
    assert penalize_if_generic("further tests", 0.7) == 0.4 and penalize_if_generic("further diagnostic tests", 0.7) == 0.4
    assert penalize_if_generic("further exams", 0.7) == 0.7
    assert len(GENERIC_PHRASES) == 5


def test_no_bonus_without_judge_on_failure_or_for_a_wrong_answer():
    assert timemaster_reward(EXTENSION, "Myopathy", EMG) == 1.0

    def broken(*_):
        raise RuntimeError("judge offline")

    with pytest.warns(UserWarning, match="judge offline"):
        assert timemaster_reward(EXTENSION, "Myopathy", EMG, broken) == 1.0

    def must_not_run(*_):
        raise AssertionError("the judge runs only for correct answers")

    assert timemaster_reward(EXTENSION, "Healthy", EMG, must_not_run) == 0.1
    assert timemaster_reward(EXTENSION.replace("Myopathy", "tumour"), "Myopathy", EMG, must_not_run) == 0.0
    assert timemaster_reward("<class>Myopathy</class><extension> \n </extension>", "Myopathy", EMG, must_not_run) == 1.0


def test_judge_score_outside_unit_interval_raises_unless_capped():
    with pytest.raises(ValueError, match="1.7"):
        timemaster_reward(EXTENSION, "Myopathy", EMG, lambda *_: 1.7)
    with pytest.raises(ValueError, match="nan"):
        timemaster_reward(EXTENSION, "Myopathy", EMG, lambda *_: float("nan"))
    generic = EXTENSION.replace("Order a muscle biopsy.", "Confirm the diagnosis.")
    assert timemaster_reward(generic, "Myopathy", EMG, lambda *_: 1.7) == pytest.approx(1.2)  # as the reference: cap first


def test_extract_tag():
    assert extract_tag("<think>\n a \n</think><think>b</think>", "think") == "a"
    assert extract_tag("<EXTENSION>x\ny</extension>", "extension") == "x\ny"
    assert extract_tag("<class>a<class>b</class>", "class") == "a<class>b"
    assert extract_tag("<class>open", "class") == ""


def stub_judge(extension, prediction, reasoning):
    return 0.8 if "biopsy" in extension else 0.2


class ConstantJudge:
    def __init__(self, score):
        self.score = score

    def __call__(self, extension, prediction, reasoning):
        return self.score


def test_reward_class_through_reward_specs():
    completions = [EXTENSION, "<class>Healthy</class><extension>Rest.</extension>", "<class>Neuropathy</class>", "Myopathy"]
    columns = {"answers": ["Myopathy", "Healthy", "Myopathy", "Myopathy"], "allowed_labels": [EMG] * 4}
    rewards = Rewards([
        RewardSpec("lightning_tokens.rewards.timemaster.TimeMasterReward", name="timemaster",
                   kwargs={"extension_judge": "tests.rewards.test_timemaster_reward.stub_judge", "rule": "emg"}),
        RewardSpec("lightning_tokens.rewards.timemaster.TimeMasterReward", name="constant",
                   kwargs={"extension_judge": "tests.rewards.test_timemaster_reward.ConstantJudge", "judge_kwargs": {"score": 1.0}}),
    ])
    result = rewards(completions, ["p"] * 4, columns)
    torch.testing.assert_close(result.per_function["timemaster"], torch.tensor([1.4, 1.1, 0.1, 0.0]))
    torch.testing.assert_close(result.per_function["constant"], torch.tensor([1.5, 1.5, 0.1, 0.0]))
    assert TimeMasterReward().__name__ == "timemaster"


def test_reward_class_errors():
    reward = TimeMasterReward()
    with pytest.raises(ConfigError, match=r"\['allowed_labels'\].*TimeSeriesDataModule provides `answers`"):
        reward(["<class>Laptop</class>"], answers=["Laptop"])
    with pytest.raises(DataError, match="one list of labels per completion"):
        reward(["<class>Laptop</class>"], answers=["Laptop"], allowed_labels=["Laptop"])
    with pytest.raises(DataError, match="`answers` has 2 entries for 1 completions"):
        reward(["<class>Laptop</class>"], answers=["Laptop"] * 2, allowed_labels=[CTU])
    with pytest.raises(ConfigError, match="takes no judge_kwargs"):
        TimeMasterReward("tests.rewards.test_timemaster_reward.stub_judge", judge_kwargs={"x": 1})
    with pytest.raises(ConfigError, match="do not fit"):
        TimeMasterReward("tests.rewards.test_timemaster_reward.ConstantJudge", judge_kwargs={"wrong": 1})
    with pytest.raises(ConfigError, match="extension_judge"):
        TimeMasterReward("tests.rewards.no_such_module.judge")
    with pytest.raises(ConfigError, match="not a regular expression"):
        TimeMasterReward(generic_phrases=["(unclosed"])
    with pytest.raises(ConfigError, match="rule"):
        TimeMasterReward(rule="ECG")


def test_judge_prompt_is_the_reference_wording():
    expected = (
        "You are a clinical evaluation assistant. The following is a model-generated diagnostic reasoning, prediction, "
        "and clinical recommendation (called 'extension').\n\nReasoning: R\nPrediction: P\n"
        "Extension (clinical recommendation): E\n\nEvaluate the clinical recommendation (extension) based on the "
        "following four dimensions. For each, assign a score between 0.0 and 1.0. After scoring, return ONLY the "
        "**average score** as a single float (e.g., 0.625).\n\nScoring dimensions:\n"
        "1. Specificity – Is the recommendation tailored to the case, or is it generic advice?\n"
        "2. Appropriateness – Is it clinically sound and aligned with the predicted condition?\n"
        "3. Relevance – Does it logically follow from the reasoning and prediction?\n"
        "4. Depth – Does it show clinical judgment and insight?\n\n"
        "Return only the average score as a float between 0.0 and 1.0."
    )
    assert judge_prompt("E", "P", "R") == expected


def test_parse_judge_score():
    assert parse_judge_score("0.625") == 0.625
    assert parse_judge_score("Average: .75 (out of 1)") == 0.75
    assert parse_judge_score("-0.5") == -0.5
    assert parse_judge_score("n/a") is None


@pytest.fixture(scope="module")
def tiny_judge_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_tokens.models.tokenizers import build_char_tokenizer

    folder = tmp_path_factory.mktemp("judge")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_model_judge_scores_in_unit_interval(tiny_judge_folder):
    judge = LocalModelJudge(str(tiny_judge_folder), max_new_tokens=4)
    assert judge.model is None  # loads lazily
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights rarely write a number
        score = judge("Order a muscle biopsy.", "Myopathy", "Short polyphasic units.")
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert judge.model_input("Order a muscle biopsy.", "Myopathy", "R") == judge_prompt("Order a muscle biopsy.", "Myopathy", "R")
    judge.tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<assistant>"
    text = judge.model_input("Order a muscle biopsy.", "Myopathy", "R")
    assert text.startswith("<user>You are a clinical") and "Extension (clinical recommendation): Order a muscle biopsy." in text
    assert text.endswith("</user><assistant>")


def test_local_model_judge_answers(monkeypatch, tiny_judge_folder):
    judge = LocalModelJudge(str(tiny_judge_folder))
    judge._load()
    for answer, expected in [(" 0.75", 0.75), ("3", 0.0), ("none", 0.0)]:
        monkeypatch.setattr(judge.tokenizer, "decode", lambda *_, _a=answer, **__: _a)
        if expected:
            assert judge("E", "P", "R") == expected
        else:
            with pytest.warns(UserWarning, match="no score in"):
                assert judge("E", "P", "R") == 0.0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalModelJudge(str(tiny_judge_folder / "missing"))("E", "P", "R")
