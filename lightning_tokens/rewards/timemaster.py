"""The TimeMaster reward (Zhang et al., 2025): a classification answer in ``<class>`` tags, scored for
accuracy and format, plus an optional bonus for the clinical recommendation in ``<extension>`` tags.

``R = 0.9 * acc + 0.1 * fmt (+ 0.5 * s)``, so ``R_max = 1.5``:

* ``fmt`` is 1 when a label of ``allowed_labels`` could be parsed from ``<class>`` tags, ``acc`` is 1 when
  that label equals the ground truth (case-insensitive, stripped).
* Two parsers, as in the TimeMaster repository (``github.com/langfengQ/TimeMaster``):

  - ``rule="ctu"`` (``verl/utils/reward_score/ctu.py``, ``extract_prediction``): the first match of
    ``<class>\\s*(label1|label2|...)\\s*</class>`` (case-insensitive); a ``<class>`` tag holding
    something else is skipped, so the first tag holding a valid label wins.
  - ``rule="emg"`` (``verl/utils/reward_score/emg_soft.py``, ``acc_reward_emg``): the content of the
    first ``<class>...</class>`` tag only, stripped and lowercased, must equal a label.

* The extension bonus (``emg_soft.py``, ``compute_score``), under either rule: only for a correct,
  well-formed answer with a non-empty ``<extension>`` and a judge, ``s = judge(extension, prediction,
  reasoning)`` (the first ``<extension>``, ``<class>`` and ``<think>`` contents), capped at 0.4 when the
  extension matches one of :data:`GENERIC_PHRASES` (:func:`penalize_if_generic`).

Deviations from the reference, all on inputs where it has no useful answer:

* A ground truth outside ``allowed_labels`` raises :class:`DataError` (the reference prints and
  returns 0.0, hiding a data bug); empty ``allowed_labels`` or a blank label raise :class:`ConfigError`.
  With a single allowed label and no parsed answer the reference's ``ctu.py`` raises ``StopIteration``;
  here the reward is 0.0.
* A judge score outside ``[0, 1]`` (after the generic cap) raises :class:`ConfigError` (a
  ``ValueError``): the reference re-asks a sampled GPT-4o until it answers in range, which a
  deterministic local judge never would. A judge that raises (or returns something that is not a number)
  gives ``s = 0.0`` with a warning, as in the reference.
* :class:`LocalModelJudge` replaces the GPT-4o client with a local causal LM decoding greedily; it
  asks with the reference's prompt (:func:`judge_prompt`) and answers 0.0 (with a warning) when its
  output holds no number in ``[0, 1]``.

Example:
    >>> timemaster_reward("<think>x</think><class>Laptop</class>", "Laptop", ["Desktop", "Laptop"])
    1.0
    >>> timemaster_reward("<class> desktop </class>", "Laptop", ["Desktop", "Laptop"])
    0.1
    >>> timemaster_reward("Laptop", "Laptop", ["Desktop", "Laptop"])
    0.0
    >>> completion = "<think>Polyphasic units.</think><class>Myopathy</class><extension>Order a muscle biopsy.</extension>"
    >>> timemaster_reward(completion, "Myopathy", ["Healthy", "Myopathy", "Neuropathy"],
    ...                   extension_judge=lambda extension, prediction, reasoning: 0.8, rule="emg")
    1.4
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.core.imports import import_object

__all__ = [
    "GENERIC_PHRASES",
    "ExtensionJudge",
    "LocalModelJudge",
    "TimeMasterReward",
    "extract_tag",
    "judge_prompt",
    "parse_class_label",
    "parse_judge_score",
    "penalize_if_generic",
    "timemaster_reward",
]

ExtensionJudge = Callable[[str, str, str], float]
"""``judge(extension, prediction, reasoning) -> score`` in ``[0, 1]``."""

GENERIC_PHRASES: tuple[str, ...] = (
    r"further (diagnostic )?tests",
    r"clinical history",
    r"physical examination",
    r"refer to specialist",
    r"confirm the diagnosis",
)
"""Regular expressions (searched in the lowercased extension) that mark a generic recommendation."""

RULES = ("ctu", "emg")
GENERIC_CAP = 0.4


def extract_tag(text: str, tag: str) -> str:
    """The stripped content of the first ``<tag>...</tag>`` (case-insensitive, across lines), "" when absent.

    Example:
        >>> extract_tag("<think> a\\nb </think><THINK>c</THINK>", "think")
        'a\\nb'
        >>> extract_tag("no tags", "class")
        ''
    """
    match = re.search(rf"<{re.escape(tag)}>\s*(.*?)\s*</{re.escape(tag)}>", text, re.IGNORECASE | re.DOTALL)
    return match.group(1).strip() if match else ""


def penalize_if_generic(extension: str, score: float, generic_phrases: Sequence[str] = GENERIC_PHRASES) -> float:
    """``score`` capped at 0.4 when one of ``generic_phrases`` occurs in the lowercased ``extension``.

    Example:
        >>> penalize_if_generic("Please refer to specialist.", 0.9)
        0.4
        >>> penalize_if_generic("Order a muscle biopsy.", 0.9)
        0.9
    """
    lowered = extension.lower()
    if any(re.search(pattern, lowered) for pattern in generic_phrases):
        return min(score, GENERIC_CAP)
    return score


def parse_class_label(completion: str, allowed_labels: Sequence[str], rule: str = "ctu") -> str | None:
    """The label (spelled as in ``allowed_labels``) the completion answers in ``<class>`` tags, or None.

    Args:
        completion: the generated text.
        allowed_labels: the task's labels.
        rule: ``"ctu"`` (the first ``<class>`` tag holding a label) or ``"emg"`` (the first ``<class>`` tag,
            which must hold a label), see the module docstring.

    Raises:
        ConfigError: an unknown rule, no labels or a blank label.

    Example:
        >>> parse_class_label("<class>x</class><class> LAPTOP </class>", ["Desktop", "Laptop"])
        'Laptop'
        >>> parse_class_label("<class>x</class><class> LAPTOP </class>", ["Desktop", "Laptop"], rule="emg") is None
        True
    """
    labels = _check_labels(allowed_labels)
    if _check_rule(rule) == "ctu":
        match = _ctu_regex(labels).search(completion)
        if match is None:
            return None
        found = match.group(1)
        # IGNORECASE matched one of the alternatives: find which (a plain .lower() misses Unicode folds).
        return next(label for label in labels if re.fullmatch(re.escape(label.strip()), found, re.IGNORECASE))
    answer = extract_tag(completion, "class").lower()
    return next((label for label in labels if _norm(label) == answer), None)


def timemaster_reward(
    completion: str,
    label: str,
    allowed_labels: Sequence[str],
    extension_judge: ExtensionJudge | None = None,
    rule: Literal["ctu", "emg"] = "ctu",
    generic_phrases: Sequence[str] = GENERIC_PHRASES,
) -> float:
    """TimeMaster's reward of one completion: ``0.9 * acc + 0.1 * fmt``, plus ``0.5 * s`` for the extension.

    Args:
        completion: the generated text, ``<think>...</think><class>...</class>[<extension>...</extension>]``.
        label: the ground-truth label.
        allowed_labels: the task's labels.
        extension_judge: ``judge(extension, prediction, reasoning) -> [0, 1]``; None gives no extension bonus.
        rule: the ``<class>`` parser, ``"ctu"`` or ``"emg"`` (module docstring).
        generic_phrases: regular expressions that cap the extension score at 0.4.

    Returns:
        The reward, in ``[0, 1.5]``.

    Raises:
        ConfigError: bad ``rule`` / ``allowed_labels``, or a judge score outside ``[0, 1]``.
        DataError: ``label`` is not one of ``allowed_labels``.

    Example:
        >>> timemaster_reward("<think>x</think><class>Laptop</class>", "Laptop", ["Desktop", "Laptop"])
        1.0
        >>> timemaster_reward("<class> desktop </class>", "Laptop", ["Desktop", "Laptop"])
        0.1
        >>> timemaster_reward("Laptop", "Laptop", ["Desktop", "Laptop"])
        0.0
        >>> timemaster_reward("<class>Healthy</class><extension>Repeat the EMG in 6 months.</extension>", "Healthy",
        ...                   ["Healthy", "Myopathy", "Neuropathy"], extension_judge=lambda *_: 0.8, rule="emg")
        1.4
    """
    labels = _check_labels(allowed_labels)
    truth = _norm(label)
    if truth not in {_norm(name) for name in labels}:
        raise DataError(
            f"ground-truth label {label!r} is not one of allowed_labels {list(labels)}: fix the dataset's "
            "label or its list of allowed labels."
        )
    predicted = parse_class_label(completion, labels, rule)
    fmt = 1.0 if predicted is not None else 0.0
    acc = 1.0 if predicted is not None and _norm(predicted) == truth else 0.0
    reward = 0.9 * acc + 0.1 * fmt
    if acc == 1.0 and fmt == 1.0 and extension_judge is not None:
        extension = extract_tag(completion, "extension")
        if extension:
            prediction, reasoning = extract_tag(completion, "class"), extract_tag(completion, "think")
            reward += 0.5 * _extension_score(extension_judge, extension, prediction, reasoning, generic_phrases)
    return reward


class TimeMasterReward:
    """:func:`timemaster_reward` as a GRPO reward function (one float per completion).

    It reads the batch columns ``answers`` (the ground-truth labels) and ``allowed_labels`` (one list of
    labels per completion), which ``TimeSeriesDataModule`` provides. Name it ``timemaster`` in the
    :class:`RewardSpec` (``name: timemaster``) so its logs read ``train/rewards/timemaster/...``.

    Args:
        extension_judge: import path of a judge function ``(extension, prediction, reasoning) -> [0, 1]``,
            or of a class instantiated with ``judge_kwargs`` (e.g.
            ``"lightning_tokens.rewards.timemaster.LocalModelJudge"``); None gives no extension bonus.
        judge_kwargs: keyword arguments of the judge class.
        rule: the ``<class>`` parser, ``"ctu"`` or ``"emg"``.
        generic_phrases: regular expressions that cap the extension score at 0.4; None for
            :data:`GENERIC_PHRASES`.

    Example:
        >>> reward = TimeMasterReward()
        >>> reward(["<class>Laptop</class>", "<class>Desktop</class>", "Laptop"], answers=["Laptop"] * 3,
        ...        allowed_labels=[["Desktop", "Laptop"]] * 3)
        [1.0, 0.1, 0.0]
    """

    def __init__(
        self,
        extension_judge: str | None = None,
        judge_kwargs: dict[str, Any] | None = None,
        rule: str = "ctu",
        generic_phrases: list[str] | None = None,
    ) -> None:
        self.rule = _check_rule(rule)
        self.generic_phrases = tuple(GENERIC_PHRASES if generic_phrases is None else generic_phrases)
        for pattern in self.generic_phrases:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ConfigError(f"TimeMasterReward: generic_phrases entry {pattern!r} is not a regular expression ({error}).") from None
        self.extension_judge = _build_judge(extension_judge, judge_kwargs)
        self.__name__ = "timemaster"

    def __call__(
        self,
        completions: Sequence[str],
        prompts: Sequence[str] | None = None,
        answers: Sequence[str] | None = None,
        allowed_labels: Sequence[Sequence[str]] | None = None,
        **_: Any,
    ) -> list[float]:
        missing = [name for name, value in (("answers", answers), ("allowed_labels", allowed_labels)) if value is None]
        if missing:
            raise ConfigError(
                f"TimeMasterReward needs the batch columns {missing}: TimeSeriesDataModule provides `answers` (the "
                "ground-truth labels) and `allowed_labels` (each example's label list)."
            )
        for name, column in (("answers", answers), ("allowed_labels", allowed_labels)):
            if len(column) != len(completions):
                raise DataError(f"TimeMasterReward: batch column `{name}` has {len(column)} entries for {len(completions)} completions.")
        rewards = []
        for completion, label, labels in zip(completions, answers, allowed_labels):
            if isinstance(labels, str):
                raise DataError(
                    f"TimeMasterReward: allowed_labels must hold one list of labels per completion, got the string {labels!r}."
                )
            rewards.append(timemaster_reward(completion, label, labels, self.extension_judge, self.rule, self.generic_phrases))
        return rewards


def judge_prompt(extension: str, prediction: str, reasoning: str) -> str:
    """The reference's request to the judge (TimeMaster's ``score_extension_with_qwen``): rate the extension
    on specificity, appropriateness, relevance and depth, and answer with the average as one float.

    Example:
        >>> "Extension (clinical recommendation): Order a biopsy." in judge_prompt("Order a biopsy.", "Myopathy", "...")
        True
    """
    dimensions = [
        "Specificity – Is the recommendation tailored to the case, or is it generic advice?",
        "Appropriateness – Is it clinically sound and aligned with the predicted condition?",
        "Relevance – Does it logically follow from the reasoning and prediction?",
        "Depth – Does it show clinical judgment and insight?",
    ]
    numbered = "\n".join(f"{i}. {text}" for i, text in enumerate(dimensions, start=1))
    return (
        "You are a clinical evaluation assistant. The following is a model-generated diagnostic reasoning, "
        "prediction, and clinical recommendation (called 'extension').\n\n"
        f"Reasoning: {reasoning}\nPrediction: {prediction}\nExtension (clinical recommendation): {extension}\n\n"
        "Evaluate the clinical recommendation (extension) based on the following four dimensions. For each, "
        "assign a score between 0.0 and 1.0. After scoring, return ONLY the **average score** as a single "
        "float (e.g., 0.625).\n\n"
        f"Scoring dimensions:\n{numbered}\n\n"
        "Return only the average score as a float between 0.0 and 1.0."
    )


def parse_judge_score(text: str) -> float | None:
    """The first number written in ``text`` (``"0.75"``, ``"Score: .5"``), or None when there is none.

    Example:
        >>> parse_judge_score(" 0.625\\n"), parse_judge_score("about .5 or 0.7"), parse_judge_score("good")
        (0.625, 0.5, None)
    """
    match = re.search(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", text)
    return float(match.group(0)) if match else None


class LocalModelJudge:
    """An extension judge run by a local Hugging Face causal LM instead of the reference's GPT-4o.

    The model and tokenizer load on the first call, from a local folder only (no downloads). The request
    is :func:`judge_prompt`, inside the tokenizer's chat template when it has one; the answer is decoded
    greedily and its first number is the score. No number, or one outside ``[0, 1]``, gives 0.0 with a
    warning (the reference re-asks; greedy decoding would answer the same).

    Args:
        model: a local folder holding the model and its tokenizer (``save_pretrained``).
        max_new_tokens: the most tokens the answer may have.
        device: where the model runs (``"cpu"``, ``"cuda"``...).

    Example:
        >>> judge = LocalModelJudge("/models/qwen2.5-7b-instruct", device="cuda")  # doctest: +SKIP
        >>> judge("Order a muscle biopsy.", "Myopathy", "Short polyphasic units.")  # doctest: +SKIP
        0.75
    """

    def __init__(self, model: str, max_new_tokens: int = 8, device: str = "cpu") -> None:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"LocalModelJudge: max_new_tokens={max_new_tokens!r} must be a positive integer.")
        self.model_path = os.path.expanduser(str(model))
        self.max_new_tokens = max_new_tokens
        self.device = device
        self.model: Any = None
        self.tokenizer: Any = None

    def model_input(self, extension: str, prediction: str, reasoning: str) -> str:
        """The text the model reads: :func:`judge_prompt`, in the chat template when the tokenizer has one."""
        self._load()
        prompt = judge_prompt(extension, prediction, reasoning)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return prompt

    def __call__(self, extension: str, prediction: str, reasoning: str) -> float:
        import torch

        text = self.model_input(extension, prediction, reasoning)
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        # A chat template writes its own special tokens (bos...); a plain prompt gets the tokenizer's.
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=not templated).to(self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        answer = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        score = parse_judge_score(answer)
        if score is None or not 0.0 <= score <= 1.0:
            warnings.warn(f"LocalModelJudge: the answer {answer!r} holds no score in [0, 1]; scoring 0.0.", stacklevel=2)
            return 0.0
        return score

    def _load(self) -> None:
        if self.model is not None:
            return
        if not os.path.isdir(self.model_path):
            raise MissingFileError(
                f"LocalModelJudge: model folder {self.model_path!r} does not exist: save the judge model and its "
                "tokenizer there with save_pretrained."
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, local_files_only=True).to(self.device).eval()


def _norm(label: str) -> str:
    return label.strip().lower()


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ConfigError(f"TimeMaster reward: rule={rule!r} must be one of {list(RULES)}.")
    return rule


def _check_labels(allowed_labels: Sequence[str]) -> tuple[str, ...]:
    labels = tuple(allowed_labels)
    if not labels:
        raise ConfigError("TimeMaster reward: allowed_labels is empty: give the task's class labels, e.g. ['Desktop', 'Laptop'].")
    blank = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if blank:
        raise ConfigError(f"TimeMaster reward: allowed_labels {list(labels)} holds blank or non-string labels {blank}.")
    return labels


@functools.lru_cache(maxsize=256)
def _ctu_regex(labels: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(label.strip()) for label in labels)
    return re.compile(rf"<class>\s*({alternatives})\s*</class>", re.IGNORECASE)


def _extension_score(
    judge: ExtensionJudge, extension: str, prediction: str, reasoning: str, generic_phrases: Sequence[str]
) -> float:
    try:
        raw = float(judge(extension, prediction, reasoning))
    except Exception as error:  # the reference scores a failed judgement 0.0 and trains on
        warnings.warn(f"TimeMaster extension judge failed ({type(error).__name__}: {error}); extension score 0.0.", stacklevel=3)
        return 0.0
    score = penalize_if_generic(extension, raw, generic_phrases)
    if not 0.0 <= score <= 1.0:  # NaN fails too
        raise ConfigError(
            f"TimeMaster extension judge returned {raw!r} (after the generic-phrase cap: {score!r}), outside [0, 1]: "
            "the judge must return a score between 0.0 and 1.0."
        )
    return score


def _build_judge(path: str | None, kwargs: dict[str, Any] | None) -> ExtensionJudge | None:
    if path is None:
        if kwargs:
            raise ConfigError(f"TimeMasterReward: judge_kwargs {sorted(kwargs)} given without extension_judge: set both or neither.")
        return None
    try:
        target = import_object(path)
    except ConfigError as error:
        raise ConfigError(f"TimeMasterReward extension_judge: {error}") from None
    if inspect.isclass(target):
        try:
            target = target(**(kwargs or {}))
        except TypeError as error:
            raise ConfigError(f"TimeMasterReward: judge_kwargs {kwargs} do not fit {path}: {error}") from None
    elif kwargs:
        raise ConfigError(f"TimeMasterReward: extension_judge {path} is a function, so it takes no judge_kwargs (got {sorted(kwargs)}).")
    if not callable(target):
        raise ConfigError(f"TimeMasterReward: extension_judge {path} is not callable.")
    return target
