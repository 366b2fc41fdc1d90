"""TimeMaster's prompts and answer format, for any label set.

The reference (``create_data/multimodal_data_processing/ctu.py``) writes ``problem + "\\n" + instruction``: the
task description ending in the list of classes, then the instruction to reason in ``<think> </think>`` and give
ONE label in ``<class> </class>``. Its ``<image>`` marker is left out here: the model's processor places the
image. The optional ``<extension>`` part (the paper's EMG variant asks for a domain recommendation) is added
with ``extension=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["answer_text", "instruction", "numeric_series_text", "task_prompt"]


def _quoted_choices(labels: Sequence[str]) -> str:
    quoted = [f'"{label}"' for label in labels]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def instruction(labels: Sequence[str], extension: bool = False) -> str:
    """The reference's instruction with these labels (and, with ``extension``, a request for ``<extension>``).

    Example:
        >>> print(instruction(["Desktop", "Laptop"]), end="")
        You MUST first perform step-by-step reasoning for your prediction. This reasoning MUST be enclosed within <think> </think> tags.
        After completing your reasoning, you must select ONE most appropriate label and enclose it within <class> </class> tags:
        "Desktop" or "Laptop".
    """
    text = (
        "You MUST first perform step-by-step reasoning for your prediction. "
        "This reasoning MUST be enclosed within <think> </think> tags.\n"
        "After completing your reasoning, you must select ONE most appropriate label and enclose it within "
        "<class> </class> tags:\n"
        f"{_quoted_choices(labels)}.\n"
    )
    if extension:
        text += (
            "Finally, give a specific recommendation for the domain expert that follows from your reasoning and "
            "prediction, enclosed within <extension> </extension> tags.\n"
        )
    return text


def task_prompt(description: str, labels: Sequence[str], class_descriptions: dict[str, str] | None = None,
                extension: bool = False, series_text: str | None = None) -> str:
    """The whole prompt: the description, the classes (with their meanings when known), the series as numbers
    when given (the numeric-input ablation), then :func:`instruction`.

    Example:
        >>> print(task_prompt("You are analyzing a signal.", ["Up", "Down"], {"Up": "It rises."}).splitlines()[:4])
        ['You are analyzing a signal.', '', 'Your task is to classify the time series into one of the following 2 classes:', '- Up: It rises.']
    """
    descriptions = class_descriptions or {}
    lines = [f"- {label}: {descriptions[label]}" if descriptions.get(label) else f"- {label}" for label in labels]
    problem = (
        f"{description.strip()}\n\nYour task is to classify the time series into one of the following "
        f"{len(labels)} classes:\n" + "\n".join(lines)
    )
    if series_text is not None:
        problem += f"\n\nThe time series:\n{series_text}"
    problem += "\nPlease choose the label that best matches the full signal."
    return problem + "\n" + instruction(labels, extension)


def numeric_series_text(values: np.ndarray, channel_names: Sequence[str] | None = None, number_format: str = "{:.3g}") -> str:
    """A ``(C, T)`` series written as numbers: one comma-separated line per channel (named when multivariate).

    Example:
        >>> numeric_series_text(np.array([[1.0, 2.5, -0.125]]))
        '1, 2.5, -0.125'
        >>> print(numeric_series_text(np.array([[1.0, 2.0], [3.0, 4.0]]), ["x", "y"]))
        x: 1, 2
        y: 3, 4
    """
    rows = [", ".join(number_format.format(v) for v in channel) for channel in values]
    if len(rows) == 1:
        return rows[0]
    names = list(channel_names) if channel_names else [f"channel {i}" for i in range(len(rows))]
    return "\n".join(f"{name}: {row}" for name, row in zip(names, rows))


def answer_text(label: str, reasoning: str | None) -> str:
    """The SFT target: ``<think>reasoning</think><class>label</class>`` (no ``<think>`` part without reasoning).

    Example:
        >>> answer_text("Gun", "The hand dips before the peak.")
        '<think>The hand dips before the peak.</think><class>Gun</class>'
    """
    think = f"<think>{reasoning}</think>" if reasoning else ""
    return f"{think}<class>{label}</class>"
