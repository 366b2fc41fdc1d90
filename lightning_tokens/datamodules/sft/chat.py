"""Chat conversations: rendering ``messages`` with a chat template (or :data:`FALLBACK_CHAT_TEMPLATE`) and
finding the characters that each assistant turn adds to the rendering, which carry the labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from lightning_tokens.datamodules.sft.fields import _string, _weight_spans
from lightning_tokens.datamodules.sft.records import _error

__all__ = ["FALLBACK_CHAT_TEMPLATE"]

#: The chat template used when the tokenizer has none (and no ``chat_template`` argument is given),
#: written in Jinja for reference; :meth:`_ChatTemplate.render` renders it in Python with the same output.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _plain_messages(messages: Any, location: str) -> list[dict[str, str]]:
    """``[{role, content}]`` checked (assistant contents must not be empty), other keys dropped."""
    if not isinstance(messages, list) or not messages:
        raise _error(location, "messages", "expected a non-empty list of {role, content} objects.")
    plain: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _error(location, f"messages[{i}]", "expected an object with 'role' and 'content'.")
        role = _string(message, "role", location, prefix=f"messages[{i}].", empty_ok=False)
        assistant = role == "assistant"
        content = _string(message, "content", location, prefix=f"messages[{i}].", empty_ok=not assistant)
        if "weight_spans" in message and not assistant:
            raise _error(location, f"messages[{i}].weight_spans", "only assistant messages carry labels and weights.")
        plain.append({"role": role, "content": content})
    return plain


@dataclass
class _ChatTemplate:
    """How conversations are rendered: with ``chat_template`` (the data module's argument) when given, else with
    the tokenizer's chat template, else as :data:`FALLBACK_CHAT_TEMPLATE` does."""

    tokenizer: PreTrainedTokenizerBase | None
    chat_template: str | None

    @property
    def uses_template(self) -> bool:
        return self.chat_template is not None or getattr(self.tokenizer, "chat_template", None) is not None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text: the chat template's, or the fallback ``<|role|>\\ncontent\\n``."""
        if not self.uses_template:
            text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
            return text + ("<|assistant|>\n" if add_generation_prompt else "")
        assert self.tokenizer is not None
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def try_render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
        if not messages:
            return "" if not add_generation_prompt else None
        try:
            return self.render(messages, add_generation_prompt)
        except Exception:  # templates may refuse a prefix (e.g. one ending with a system message)
            return None

    def parse_messages(
        self, data: dict[str, Any], location: str
    ) -> tuple[str, list[tuple[int, int]], list[tuple[int, int, float]], bool]:
        """A ``messages`` record as ``(rendered text, labelled character spans of its assistant turns, their
        weight spans in the rendered text, whether the last message is an assistant's)``."""
        messages = data.get("messages")
        plain = _plain_messages(messages, location)
        if not any(m["role"] == "assistant" for m in plain):
            raise _error(location, "messages", "has no assistant message; there would be nothing to learn.")
        try:
            full = self.render(plain, add_generation_prompt=False)
        except Exception as err:
            raise _error(location, "messages", f"the chat template failed: {type(err).__name__}: {err}") from None
        labelled: list[tuple[int, int]] = []
        weight_spans: list[tuple[int, int, float]] = []
        cursor = 0
        for i, message in enumerate(plain):
            if message["role"] != "assistant":
                continue
            content = message["content"]
            start, end, content_start = self.assistant_span(plain, i, full, cursor)
            if start is None:
                found = full.find(content, cursor)
                if found < 0:
                    raise _error(
                        location, f"messages[{i}].content",
                        "the chat template does not reproduce this assistant content verbatim; its labels cannot be placed.",
                    )
                start, end, content_start = found, found + len(content), found
            labelled.append((start, end))
            cursor = end
            if "weight_spans" in messages[i]:
                name = f"messages[{i}].weight_spans"
                spans = _weight_spans(messages[i]["weight_spans"], len(content), location, name, "message content")
                if content_start is None:
                    raise _error(location, name, "the chat template does not reproduce the content verbatim; spans cannot be placed.")
                weight_spans.extend((content_start + s, content_start + e, w) for s, e, w in spans)
        return full, labelled, weight_spans, plain[-1]["role"] == "assistant"

    def assistant_span(
        self, messages: list[dict[str, str]], i: int, full: str, cursor: int
    ) -> tuple[int | None, int | None, int | None]:
        """``(start, end, content start)`` of the characters assistant turn ``i`` adds after its header, when
        the template renders prefixes consistently; ``(None, None, None)`` otherwise."""
        upto = self.try_render(messages[: i + 1], add_generation_prompt=False)
        if upto is None or not full.startswith(upto):
            return None, None, None
        content = messages[i]["content"]
        before = self.try_render(messages[:i], add_generation_prompt=False)
        header_end = self.try_render(messages[:i], add_generation_prompt=True)
        if (
            header_end is not None
            and before is not None
            and header_end.startswith(before)
            and len(before) < len(header_end)  # the template does add a generation prompt
            and upto.startswith(header_end)
            and cursor <= len(header_end) < len(upto)
        ):
            found = upto.find(content, len(header_end))
            return len(header_end), len(upto), (found if found >= 0 else None)
        # no usable generation prompt: the turn starts where its content does
        if before is None or not upto.startswith(before):
            return None, None, None
        found = upto.find(content, max(len(before), cursor))
        if found < 0:
            return None, None, None
        return found, len(upto), found
