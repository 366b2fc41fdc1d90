"""Data-quality indicators (one number per SFT record) for score-based filters: lengths, record fields, user
callables, kNN embedding distances and a reference LM's perplexity."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.imports import import_object
from lightning_tokens.datamodules.filters.base import Record, record_texts

__all__ = [
    "CallableIndicator",
    "Indicator",
    "KNNDistance",
    "Length",
    "Perplexity",
    "RecordField",
    "hashed_ngram_embedder",
    "knn_distances",
]


class Indicator:
    """One data-quality indicator: a number per record (``__call__(records, tokenizer) -> (n,)``)."""

    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Length(Indicator):
    """Length of the response (InstructMining's ``Len``, "output length") or of the instruction.

    Args:
        of: ``response`` or ``instruction`` (see :func:`record_texts`).
        unit: ``tokens`` of the datamodule's tokenizer (default; the paper's unit is not stated, tokens
            are what a model sees), ``words`` (whitespace-separated) or ``chars``.

    Example:
        >>> Length(unit="words")([{"prompt": "Hi", "response": "a b c"}]).tolist()
        [3.0]
    """

    def __init__(self, of: Literal["response", "instruction"] = "response", unit: Literal["tokens", "words", "chars"] = "tokens") -> None:
        if of not in ("response", "instruction"):
            raise ConfigError(f"Length(of={of!r}): of must be 'response' or 'instruction'.")
        if unit not in ("tokens", "words", "chars"):
            raise ConfigError(f"Length(unit={unit!r}): unit must be 'tokens', 'words' or 'chars'.")
        self.of = of
        self.unit = unit

    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        texts = [record_texts(r)[1 if self.of == "response" else 0] for r in records]
        if self.unit == "chars":
            return np.array([len(t) for t in texts], dtype=np.float64)
        if self.unit == "words":
            return np.array([len(t.split()) for t in texts], dtype=np.float64)
        if tokenizer is None:
            raise ConfigError("Length(unit='tokens') needs the tokenizer: use it through SFTDataModule, or pass one.")
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return np.array([len(x) for x in ids], dtype=np.float64)


class RecordField(Indicator):
    """A number stored in each record (precomputed offline: a reward-model score, UniEval scores...).

    Example:
        >>> RecordField("reward")([{"text": "a", "reward": 2}, {"text": "b", "reward": "0.5"}]).tolist()
        [2.0, 0.5]
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        values = []
        for i, record in enumerate(records):
            if self.field not in record:
                raise ConfigError(f"record {i} (id {record.get('id', i)!r}) has no field {self.field!r} for RecordField.")
            try:
                values.append(float(record[self.field]))
            except (TypeError, ValueError):
                raise ConfigError(f"record {i} (id {record.get('id', i)!r}): field {self.field!r} is not a number: {record[self.field]!r}.") from None
        return np.array(values, dtype=np.float64)


class CallableIndicator(Indicator):
    """A user function as an indicator, given by import path (a reward model, a UniEval dimension...).

    Args:
        function: import path, e.g. ``my_package.scoring.reward``.
        batched: ``True``: ``function(instructions, responses) -> sequence of n floats``; ``False``:
            ``function(instruction, response) -> float`` per record.
        inputs: ``texts`` passes ``(instruction, response)`` strings (:func:`record_texts`); ``records``
            passes the raw record dicts instead (one list, or one record per call).
        kwargs: extra keyword arguments for every call.

    Example:
        >>> CallableIndicator("builtins.len", batched=False, inputs="records")([{"text": "a"}, {"text": "a", "id": 1}]).tolist()
        [1.0, 2.0]
    """

    def __init__(
        self,
        function: str,
        batched: bool = True,
        inputs: Literal["texts", "records"] = "texts",
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        if inputs not in ("texts", "records"):
            raise ConfigError(f"CallableIndicator(inputs={inputs!r}): inputs must be 'texts' or 'records'.")
        self.function = function
        self.batched = batched
        self.inputs = inputs
        self.kwargs = dict(kwargs or {})
        self._fn: Callable[..., Any] | None = None

    def _callable(self) -> Callable[..., Any]:
        if self._fn is None:
            fn = import_object(self.function)
            if not callable(fn):
                raise ConfigError(f"CallableIndicator: {self.function!r} is not callable.")
            self._fn = fn
        return self._fn

    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        fn = self._callable()
        if self.inputs == "records":
            values = fn(list(records), **self.kwargs) if self.batched else [fn(r, **self.kwargs) for r in records]
        else:
            pairs = [record_texts(r) for r in records]
            if self.batched:
                values = fn([p[0] for p in pairs], [p[1] for p in pairs], **self.kwargs)
            else:
                values = [fn(p[0], p[1], **self.kwargs) for p in pairs]
        out = np.asarray([float(v) for v in values], dtype=np.float64)
        if len(out) != len(records):
            raise ConfigError(f"{self.function} returned {len(out)} values for {len(records)} records.")
        return out


def hashed_ngram_embedder(texts: Sequence[str], n: int = 3, dim: int = 512) -> np.ndarray:
    """A cheap offline text embedding: counts of hashed character ``n``-grams (CRC-32), L2-normalised.

    A lexical stand-in for the sentence embedder of the paper (SentenceBERT), for offline runs and
    tests; give your own embedder's import path to :class:`KNNDistance` for real use.

    Example:
        >>> e = hashed_ngram_embedder(["abcd", "abcd", "wxyz"])
        >>> e.shape, round(float(e[0] @ e[1]), 6), round(float(e[0] @ e[2]), 6)
        ((3, 512), 1.0, 0.0)
    """
    out = np.zeros((len(texts), dim), dtype=np.float64)
    for row, text in enumerate(texts):
        padded = f"\x02{text}\x03"
        for k in range(max(1, len(padded) - n + 1)):
            out[row, zlib.crc32(padded[k : k + n].encode("utf-8")) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


def knn_distances(embeddings: np.ndarray | torch.Tensor, k: int = 6, metric: Literal["euclidean", "cosine"] = "euclidean", chunk: int = 1024) -> np.ndarray:
    """Distance of each row to its ``k``-th nearest *other* row (InstructMining's ``KNN-k``).

    Args:
        embeddings: ``(n, d)``.
        k: which neighbour (1 = the nearest), ``1 <= k <= n - 1``.
        metric: ``euclidean`` or ``cosine`` (``1 - cos``).
        chunk: rows compared at a time (memory ``chunk × n``).

    Example:
        >>> knn_distances(np.array([[0.0], [1.0], [3.0]]), k=1).tolist()
        [1.0, 1.0, 2.0]
    """
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float64) if not isinstance(embeddings, torch.Tensor) else embeddings).double()
    if x.dim() != 2:
        raise ConfigError(f"embeddings must be (n, d), got shape {tuple(x.shape)}.")
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ConfigError(f"the {k}-th nearest neighbour needs at least {k + 1} records, got {n}.")
    if metric not in ("euclidean", "cosine"):
        raise ConfigError(f"metric={metric!r} must be 'euclidean' or 'cosine'.")
    if metric == "cosine":
        x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    out = torch.empty(n, dtype=torch.float64)
    for begin in range(0, n, chunk):
        rows = x[begin : begin + chunk]
        if metric == "euclidean":
            dist = torch.cdist(rows, x)
        else:
            dist = (1.0 - rows @ x.T).clamp(min=0.0)
        index = torch.arange(begin, begin + rows.shape[0])
        dist[torch.arange(rows.shape[0]), index] = math.inf  # not its own neighbour
        out[begin : begin + rows.shape[0]] = dist.kthvalue(k, dim=1).values
    return out.numpy()


class KNNDistance(Indicator):
    """Embedding distance to the ``k``-th nearest other record (InstructMining's ``Knn_6`` with ``k=6``).

    Neighbours are searched among the records being filtered.

    Args:
        embedder: import path of ``embed(texts: list[str]) -> (n, d) array`` (e.g. a SentenceBERT
            wrapper of yours); default: :func:`hashed_ngram_embedder`, an offline lexical stand-in.
        k: the neighbour (6 in the paper's rule).
        metric: ``euclidean`` (default) or ``cosine`` distance; the paper does not say.
        text: what is embedded: ``both`` (instruction and response, joined by a newline; default),
            ``response`` or ``instruction``.
    """

    def __init__(
        self,
        embedder: str = "lightning_tokens.datamodules.filters.hashed_ngram_embedder",
        k: int = 6,
        metric: Literal["euclidean", "cosine"] = "euclidean",
        text: Literal["both", "response", "instruction"] = "both",
    ) -> None:
        if k < 1:
            raise ConfigError(f"KNNDistance(k={k}): k must be >= 1.")
        if metric not in ("euclidean", "cosine"):
            raise ConfigError(f"KNNDistance(metric={metric!r}): metric must be 'euclidean' or 'cosine'.")
        if text not in ("both", "response", "instruction"):
            raise ConfigError(f"KNNDistance(text={text!r}): text must be 'both', 'response' or 'instruction'.")
        self.embedder = embedder
        self.k = k
        self.metric = metric
        self.text = text

    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        pairs = [record_texts(r) for r in records]
        texts = [
            f"{p[0]}\n{p[1]}" if self.text == "both" else (p[1] if self.text == "response" else p[0]) for p in pairs
        ]
        embeddings = import_object(self.embedder)(texts)
        if isinstance(embeddings, torch.Tensor):
            embeddings = embeddings.detach().cpu().double().numpy()
        return knn_distances(np.asarray(embeddings, dtype=np.float64), self.k, self.metric)


class Perplexity(Indicator):
    """A reference causal LM's perplexity of each response given its instruction.

    ``exp(mean NLL of the response tokens)``, the instruction in context (the prompt is not scored),
    computed with the library's fused ops (:func:`lightning_tokens.ops.linear_cross_entropy`) from the
    model's final hidden states, never materialising ``(tokens × vocab)`` logits. The model is a
    :class:`~lightning_tokens.TokenLM` (a preset, a packaged model such as ``smollm2-135m-instruct``, a
    local folder or a hub id), loaded when the filter runs and released afterwards.

    Args:
        model: the scoring model.
        tokenizer: its tokenizer (default: the model's; required for presets, e.g. ``char``).
        model_config: preset overrides or ``from_pretrained`` keyword arguments.
        batch_size: records per forward pass.
        max_length: tokens per record; longer ones are cut at the end (the response tail is not scored).
        condition_on_instruction: put the instruction before the response (``False``: the response alone).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: seed of the random weights of a preset model (so every rank scores with the same weights).
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        tokenizer: str | None = None,
        model_config: dict[str, Any] | None = None,
        batch_size: int = 8,
        max_length: int = 1024,
        condition_on_instruction: bool = True,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"Perplexity: batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.batch_size = batch_size
        self.max_length = max_length
        self.condition_on_instruction = condition_on_instruction
        self.device = device
        self.seed = seed

    def load(self) -> Any:
        """The scoring :class:`~lightning_tokens.TokenLM`, built and in eval mode (on the CPU)."""
        from lightning_tokens.modules.causal_lm import TokenLM

        lm = TokenLM(model=self.model, tokenizer=self.tokenizer, model_config=self.model_config, generate_in_validation=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            lm.configure_model()
        return lm.eval()

    def encode(self, records: Sequence[Record], tokenizer: Any) -> list[tuple[list[int], int]]:
        """Token ids of each record and the index of its first response token."""
        from lightning_tokens.models.tokenizers import bos_prefix

        bos = bos_prefix(tokenizer)
        out = []
        for record in records:
            instruction, response = record_texts(record)
            head = list(bos) + (tokenizer(instruction, add_special_tokens=False)["input_ids"] if self.condition_on_instruction and instruction else [])
            ids = head + tokenizer(response, add_special_tokens=False)["input_ids"]
            out.append((ids[: self.max_length], len(head)))
        return out

    @torch.no_grad()
    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        from lightning_tokens.ops import linear_cross_entropy

        lm = self.load()
        device = torch.device("cuda" if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()) else "cpu")
        lm.to(device)
        tok = lm.tokenizer
        encoded = self.encode(records, tok)
        head = lm.output_head()
        out = np.full(len(records), np.nan, dtype=np.float64)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        for begin in range(0, len(encoded), self.batch_size):
            part = encoded[begin : begin + self.batch_size]
            width = max(len(ids) for ids, _ in part)
            input_ids = torch.full((len(part), width), pad, dtype=torch.long)
            labels = torch.full((len(part), width), -100, dtype=torch.long)
            attention = torch.zeros((len(part), width), dtype=torch.long)
            for r, (ids, start) in enumerate(part):
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[r, : len(ids)] = 1
                first = max(start, 1)  # the first token is never predicted
                labels[r, first : len(ids)] = input_ids[r, first : len(ids)]
            batch = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
            hidden = lm.hidden_states(batch)
            targets = labels[:, 1:].to(device)
            nll = linear_cross_entropy(hidden[:, :-1], head.weight, targets, head.bias).double().cpu()
            valid = (targets != -100).cpu()
            counts = valid.sum(1)
            means = (nll * valid).sum(1) / counts.clamp(min=1)
            for r in range(len(part)):
                if counts[r] == 0:
                    raise ConfigError(
                        f"Perplexity: record {begin + r} has no response token to score (empty response, or "
                        f"max_length={self.max_length} cuts it off)."
                    )
                out[begin + r] = math.exp(float(means[r]))
        del lm
        return out

