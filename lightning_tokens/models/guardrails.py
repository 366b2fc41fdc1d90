"""Guardrails: models that say how safe a (prompt, partial response) pair is.

A :class:`Guardrail` maps lists of prompts and response prefixes to ``P(safe)`` in ``[0, 1]``, one value
per pair. STAR-DSS (:class:`~lightning_tokens.callbacks.safety_shaping.SafetyShaping`) calls it on the
prefixes of every training response, chunk by chunk. Two implementations wrap Hugging Face models and
load them lazily, on the first :meth:`Guardrail.score`:

- :class:`CausalLMGuardrail`: a generative guard (Llama Guard, Granite Guardian, or any causal LM with
  a prompt template). ``P(safe) = σ(logit_safe − logit_unsafe)``, the logits of its two verdict tokens at
  the position where it would write its verdict (this equals the softmax restricted to the two tokens).
- :class:`SequenceClassifierGuardrail`: any ``AutoModelForSequenceClassification``; ``P(safe)`` is the
  softmax probability of the safe label.

Both are typed for YAML (``guardrail: {class_path: lightning_tokens.models.guardrails.CausalLMGuardrail,
init_args: {model: ..., template: ...}}``). ``model`` is a preset built from config (random weights;
``tokenizer`` required), a packaged model such as ``smollm2-135m-instruct``, a local folder or a hub id,
resolved like :func:`lightning_tokens.models.presets.load_causal_lm`.

Example::

    guard = CausalLMGuardrail("meta-llama/Llama-Guard-3-1B")          # its chat template, verdict "safe"/"unsafe"
    guard.score(["How do I bake bread?"], ["Mix flour, water"])       # tensor([0.99...])
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError

__all__ = ["CausalLMGuardrail", "Guardrail", "SequenceClassifierGuardrail", "render_template"]

_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


def render_template(template: str, prompt: str, response: str) -> str:
    """Replace ``{prompt}`` and ``{response}`` in one pass (braces in the texts are left alone).

    Example:
        >>> render_template("Q: {prompt}\\nA: {response}\\nsafe?", "a {response} b", "c")
        'Q: a {response} b\\nA: c\\nsafe?'
    """
    values = {"prompt": prompt, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class Guardrail:
    """Interface: ``score(prompts, partial_responses) -> P(safe)``, a float32 tensor of shape ``(n,)``.

    Subclass it and implement :meth:`score` for any other safety signal (an API, rules, a cached table).
    :meth:`to` moves the guard's model to a device (a no-op by default).
    """

    def score(self, prompts: list[str], partial_responses: list[str]) -> Tensor:
        """``P(safe)`` of each ``(prompt, partial response)`` pair, float32 on the CPU, in ``[0, 1]``."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Guardrail:
        return self

    @staticmethod
    def _check_pairs(prompts: list[str], partial_responses: list[str]) -> None:
        if len(prompts) != len(partial_responses):
            raise ConfigError(
                f"score() got {len(prompts)} prompts but {len(partial_responses)} responses: give one response per prompt."
            )


class _HFGuardrail(Guardrail):
    """Shared by the two Hugging Face guards: lazy loading, device, dtype, batching."""

    _auto_class: str = ""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        template: str | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        max_length: int = 2048,
    ) -> None:
        from lightning_tokens.models.presets import check_model_source, is_preset

        check_model_source(model)
        if tokenizer is None and is_preset(model):
            raise ConfigError(f"{type(self).__name__}(model={model!r}) is built from config: set `tokenizer` (e.g. 'char').")
        if dtype is not None and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype={dtype!r} is not a torch dtype; use e.g. bfloat16, float16 or float32.")
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) >= 2.")
        if template is not None and "{response}" not in template:
            raise ConfigError("the guardrail template must contain the placeholder {response} (and usually {prompt}).")
        self.model_name = model
        self.tokenizer_name = tokenizer or model
        self.template = template
        self.model_config = model_config
        self.dtype_name = dtype
        self.device = torch.device(device) if device is not None else None
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: torch.nn.Module | None = None
        self._tokenizer = None

    # ---- lazy loading ------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from lightning_tokens.models.tokenizers import resolve_tokenizer

            self._tokenizer = resolve_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module:
        """The guard model, loaded on first access, frozen, in eval mode."""
        if self._model is None:
            model = self._load()
            model.eval().requires_grad_(False)
            if self.device is not None:
                model.to(self.device)
            self._model = model
        return self._model

    def _load(self) -> torch.nn.Module:
        raise NotImplementedError

    def _from_pretrained(self, auto_class: Any) -> torch.nn.Module:
        from lightning_tokens.models.packaged import is_packaged, packaged_model_path

        name = self.model_name
        source = packaged_model_path(name) if is_packaged(name) else os.path.expanduser(name)
        kwargs: dict[str, Any] = dict(self.model_config or {})
        if self.dtype_name:
            kwargs["dtype"] = getattr(torch, self.dtype_name)
        try:
            return auto_class.from_pretrained(source, **kwargs)
        except OSError as err:
            raise ConfigError(
                f"guardrail model {name!r} could not be loaded ({err}). Offline, use a local folder, a packaged "
                "model or a preset built from config."
            ) from err

    def to(self, device: torch.device | str) -> Guardrail:
        device = torch.device(device)
        if self._model is not None and device != self.device:
            self._model.to(device)
        self.device = device
        return self

    def _model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model_name!r})"


class CausalLMGuardrail(_HFGuardrail):
    """A generative guard: ``P(safe) = σ(logit_safe − logit_unsafe)`` at the verdict position.

    The guard reads ``render(prompt, partial response)`` and the logits of its next token; only the two
    verdict tokens matter (``σ(a − b)`` is the softmax over those two). Rendering:

    - ``template`` with ``{prompt}`` and ``{response}`` placeholders, tokenized with the tokenizer's
      special tokens (a bos where it adds one); everything the guard should read before its verdict,
      instructions included, goes in the template;
    - ``template=None``: the tokenizer's chat template on ``[{"role": "user", "content": prompt},
      {"role": "assistant", "content": response}]`` (the user turn alone when the response is empty),
      with ``add_generation_prompt=True`` and ``chat_template_kwargs`` (Granite Guardian's
      ``guardian_config``, ...). This is how Llama Guard 3 is prompted: it answers ``safe`` or
      ``unsafe\\nS<k>`` right after the assistant header.

    ``verdict_prefix`` is appended after rendering (text the guard writes before its verdict token).

    Args:
        model: preset (with ``tokenizer``), packaged name, local folder or hub id of a causal LM.
        template: prompt template with ``{prompt}`` and ``{response}``, or ``None`` for the chat template.
        safe_token: the verdict token meaning safe: a string that must tokenize to one token, or its id.
        unsafe_token: the verdict token meaning unsafe (Granite Guardian: ``safe_token="No"``,
            ``unsafe_token="Yes"``, it answers whether there is a risk).
        tokenizer: tokenizer name (default: the model's).
        chat_template_kwargs: extra keyword arguments of ``apply_chat_template``.
        verdict_prefix: text appended after the rendered prompt.
        model_config: config overrides (presets) or ``from_pretrained`` keyword arguments.
        dtype: weights' dtype (e.g. ``bfloat16``), ``None`` for the checkpoint's default.
        device: where to run (default: where :meth:`to` puts it, else the CPU).
        batch_size: pairs per forward pass.
        max_length: longest rendered input in tokens; longer inputs lose their *start* (the verdict
            position stays at the end).

    Example::

        guard = CausalLMGuardrail("smollm2-135m-instruct", template=STAND_IN_TEMPLATE, safe_token="No", unsafe_token="Yes")
        guard.score(["Hi"], ["Hello!"])
    """

    def __init__(
        self,
        model: str,
        template: str | None = None,
        safe_token: str | int = "safe",
        unsafe_token: str | int = "unsafe",
        tokenizer: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        verdict_prefix: str = "",
        model_config: dict[str, Any] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        max_length: int = 2048,
    ) -> None:
        super().__init__(model, tokenizer, template, model_config, dtype, device, batch_size, max_length)
        if safe_token == unsafe_token:
            raise ConfigError(f"safe_token and unsafe_token are both {safe_token!r}; give two different verdict tokens.")
        self.safe_token = safe_token
        self.unsafe_token = unsafe_token
        self.chat_template_kwargs = chat_template_kwargs
        self.verdict_prefix = verdict_prefix
        self._verdict_ids: tuple[int, int] | None = None

    def _load(self) -> torch.nn.Module:
        from lightning_tokens.models.presets import load_causal_lm

        dtype = getattr(torch, self.dtype_name) if self.dtype_name else None
        return load_causal_lm(self.model_name, vocab_size=len(self.tokenizer), overrides=self.model_config, dtype=dtype)

    @property
    def verdict_ids(self) -> tuple[int, int]:
        """``(safe id, unsafe id)`` in the guard's vocabulary."""
        if self._verdict_ids is None:
            self._verdict_ids = (self._token_id(self.safe_token, "safe_token"), self._token_id(self.unsafe_token, "unsafe_token"))
        return self._verdict_ids

    def _token_id(self, token: str | int, name: str) -> int:
        tok = self.tokenizer
        if isinstance(token, int):
            if not 0 <= token < len(tok):
                raise ConfigError(f"{name}={token} is outside the guard's vocabulary [0, {len(tok)}).")
            return token
        ids = tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = tok.convert_ids_to_tokens(ids)
            raise ConfigError(
                f"{name}={token!r} is {len(ids)} tokens {pieces} for the guard's tokenizer; a verdict must be one "
                "token: give a variant that is (often with a leading space, e.g. ' unsafe') or its id."
            )
        return ids[0]

    def render(self, prompt: str, response: str) -> str:
        """The guard's input text for one pair (before tokenization)."""
        if self.template is not None:
            text = render_template(self.template, prompt, response)
        else:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ConfigError(
                    f"guardrail {self.model_name!r}: the tokenizer has no chat template; give `template` with "
                    "{prompt} and {response} placeholders."
                )
            messages = [{"role": "user", "content": prompt}]
            if response:
                messages.append({"role": "assistant", "content": response})
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **(self.chat_template_kwargs or {})
            )
        return text + self.verdict_prefix

    @torch.no_grad()
    def verdict_logits(self, prompts: list[str], partial_responses: list[str]) -> Tensor:
        """``(n, 2)`` float32 logits of (safe, unsafe) at the verdict position, on the CPU."""
        self._check_pairs(prompts, partial_responses)
        if not prompts:
            return torch.zeros(0, 2)
        model, tok = self.model, self.tokenizer
        safe, unsafe = self.verdict_ids
        device = self._model_device()
        texts = [self.render(p, r) for p, r in zip(prompts, partial_responses)]
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = self._encode(texts[start : start + self.batch_size])
            # left padding: the verdict position is the last column for every row
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, x in enumerate(ids):
                input_ids[row, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                mask[row, width - len(x) :] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}
            try:
                logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
            except TypeError:  # models without logits_to_keep
                logits = model(**inputs, use_cache=False).logits[:, -1]
            out.append(logits[:, [safe, unsafe]].float().cpu())
        return torch.cat(out)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        special = self.template is not None  # a rendered chat template already holds its special tokens
        encoded = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [x[-self.max_length :] for x in encoded]  # keep the end: the verdict is asked there

    def score(self, prompts: list[str], partial_responses: list[str]) -> Tensor:
        logits = self.verdict_logits(prompts, partial_responses)
        return torch.sigmoid(logits[:, 0] - logits[:, 1])


class SequenceClassifierGuardrail(_HFGuardrail):
    """A sequence-classification guard: ``P(safe)`` is the softmax probability of the safe label.

    Input: ``template`` rendered with ``{prompt}`` and ``{response}`` as one text, or, with
    ``template=None``, the (prompt, response) pair as the tokenizer's text pair (what cross-encoder style
    classifiers are trained on).

    Args:
        model: preset (with ``tokenizer``; a ``num_labels=2`` head ``{0: unsafe, 1: safe}`` with random
            weights unless ``model_config`` sets ``id2label``), packaged name, local folder or hub id of a
            sequence classifier.
        safe_label: the safe class: a label name from the model's ``id2label`` (case-insensitive) or an index.
        template: text template, or ``None`` for text pairs.
        tokenizer: tokenizer name (default: the model's).
        model_config, dtype, device, batch_size, max_length: as for :class:`CausalLMGuardrail` (inputs
            longer than ``max_length`` lose their start).

    Example::

        guard = SequenceClassifierGuardrail("my-org/safety-classifier", safe_label="SAFE")
        guard.score(["How do I bake bread?"], ["Mix flour and water."])
    """

    def __init__(
        self,
        model: str,
        safe_label: str | int = "safe",
        template: str | None = None,
        tokenizer: str | None = None,
        model_config: dict[str, Any] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        max_length: int = 512,
    ) -> None:
        super().__init__(model, tokenizer, template, model_config, dtype, device, batch_size, max_length)
        self.safe_label = safe_label
        self._safe_index: int | None = None

    def _load(self) -> torch.nn.Module:
        from transformers import AutoModelForSequenceClassification

        from lightning_tokens.models.presets import build_config, is_preset

        if not is_preset(self.model_name):
            return self._from_pretrained(AutoModelForSequenceClassification)
        overrides = dict(self.model_config or {})
        if "id2label" not in overrides and "num_labels" not in overrides:
            overrides["id2label"] = {0: "unsafe", 1: "safe"}
        overrides.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        config = build_config(self.model_name, len(self.tokenizer), overrides)
        model = AutoModelForSequenceClassification.from_config(config)
        return model.to(getattr(torch, self.dtype_name)) if self.dtype_name else model

    @property
    def safe_index(self) -> int:
        """Index of the safe class in the classifier's output."""
        if self._safe_index is None:
            config = self.model.config
            id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
            num_labels = int(getattr(config, "num_labels", len(id2label)))
            if isinstance(self.safe_label, int):
                if not 0 <= self.safe_label < num_labels:
                    raise ConfigError(f"safe_label={self.safe_label} is not a class index of a {num_labels}-class model.")
                self._safe_index = self.safe_label
            else:
                matches = [i for i, name in id2label.items() if name.lower() == self.safe_label.lower()]
                if len(matches) != 1:
                    raise ConfigError(
                        f"safe_label={self.safe_label!r} is not one of the classifier's labels {id2label}; give the "
                        "safe label's name or index."
                    )
                self._safe_index = matches[0]
        return self._safe_index

    @torch.no_grad()
    def score(self, prompts: list[str], partial_responses: list[str]) -> Tensor:
        self._check_pairs(prompts, partial_responses)
        if not prompts:
            return torch.zeros(0)
        model, tok = self.model, self.tokenizer
        device = self._model_device()
        index = self.safe_index
        side = tok.truncation_side
        tok.truncation_side = "left"  # keep the end of the response
        try:
            out = []
            for start in range(0, len(prompts), self.batch_size):
                p, r = prompts[start : start + self.batch_size], partial_responses[start : start + self.batch_size]
                if self.template is not None:
                    texts = [render_template(self.template, a, b) for a, b in zip(p, r)]
                    enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                else:
                    enc = tok(p, r, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                logits = model(**enc).logits.float()
                out.append(torch.softmax(logits, dim=-1)[:, index].cpu())
        finally:
            tok.truncation_side = side
        return torch.cat(out)

