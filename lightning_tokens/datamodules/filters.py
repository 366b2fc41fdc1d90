r"""Data-level filters: choose which SFT records to train on, before tokenization.

A :class:`RecordFilter` looks at the raw records of a data file (the JSON objects, ``{prompt,
response}``, ``{messages}`` or ``{text}``) and keeps some of them. :class:`~lightning_tokens.datamodules.
SFTDataModule` applies its ``filters`` in order to the **training** records (after the ``val_fraction``
hold-out, so validation stays the same with and without filters); each filter sees the survivors of
the previous one. From YAML::

    data:
      class_path: lightning_tokens.SFTDataModule
      init_args:
        train_file: data/examples/long_cot.jsonl
        filters:
          - class_path: lightning_tokens.datamodules.filters.BranchingDensityFilter
            init_args: {max_density: 0.3}

Two filters from ``shared/specs/text_methods.md``:

- :class:`InstructMiningFilter` (Cao et al., "InstructMining", arXiv 2307.06290, §13): a linear rule
  predicts the log evaluation loss a model fine-tuned on the data would reach from data-quality
  indicators; records with the lowest predicted loss are kept. Both published rules are built in
  (:data:`INSTRUCT_MINING_RULES`); indicators are pluggable :class:`Indicator` objects.
- :class:`BranchingDensityFilter` (arXiv 2604.01702, §12): drop long chain-of-thought traces whose
  share of "branching" steps (``wait``, ``alternatively``, ...) is high.

Pure functions hold the arithmetic: :func:`instruct_mining_score`, :func:`branching_density`,
:func:`split_steps`, :func:`knn_distances`, :func:`select_lowest`.
"""

from __future__ import annotations

import importlib
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "BRANCHING_KEYWORDS",
    "INSTRUCT_MINING_RULES",
    "STEP_PATTERN",
    "BranchingDensityFilter",
    "CallableIndicator",
    "Indicator",
    "InstructMiningFilter",
    "KNNDistance",
    "Length",
    "Perplexity",
    "RecordField",
    "RecordFilter",
    "branching_density",
    "hashed_ngram_embedder",
    "import_object",
    "instruct_mining_score",
    "knn_distances",
    "record_texts",
    "select_lowest",
    "split_steps",
]

Record = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def record_texts(record: Record) -> tuple[str, str]:
    """``(instruction, response)`` of a raw SFT record.

    - ``{prompt, response}``: the prompt and the response;
    - ``{messages}``: the contents of the non-assistant messages, and of the assistant messages, each
      joined with ``"\\n"`` (a single-turn chat gives its user message and its answer);
    - ``{text}``: ``""`` and the text.

    Example:
        >>> record_texts({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
        ('2+2?', '4')
    """
    if "messages" in record and isinstance(record["messages"], list):
        messages = [m for m in record["messages"] if isinstance(m, Mapping)]
        instruction = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "assistant")
        response = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "assistant")
        return instruction, response
    if "prompt" in record or "response" in record:
        return str(record.get("prompt") or ""), str(record.get("response") or "")
    return "", str(record.get("text") or "")


def import_object(path: str) -> Any:
    """The object an import path names: ``"package.module.name"`` or ``"package.module:name"``.

    Example:
        >>> import_object("math.sqrt")(9.0)
        3.0
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"expected an import path such as 'my_package.module.function', got {path!r}.")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not an import path: write 'my_package.module.function' (or 'module:function').")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} of {path!r}: {err}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path!r}: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def select_lowest(scores: Sequence[float] | np.ndarray, keep_fraction: float | None = None, max_score: float | None = None) -> np.ndarray:
    """Keep mask of the records with the lowest scores.

    With ``keep_fraction``: the ``ceil(keep_fraction · n)`` lowest scores (ties: the earlier record
    first; NaN scores last). Otherwise with ``max_score``: every score ``<= max_score`` (NaN never).

    Example:
        >>> select_lowest([0.3, 0.1, 0.2, 0.1], keep_fraction=0.5).tolist()
        [False, True, False, True]
        >>> select_lowest([0.3, 0.1, 0.2], max_score=0.2).tolist()
        [False, True, True]
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if keep_fraction is not None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction={keep_fraction} must lie in (0, 1].")
        count = math.ceil(keep_fraction * len(values) - 1e-9)
        keyed = np.where(np.isnan(values), np.inf, values)
        order = np.argsort(keyed, kind="stable")
        keep = np.zeros(len(values), dtype=bool)
        keep[order[:count]] = True
        return keep
    if max_score is None:
        raise ValueError("give keep_fraction or a threshold.")
    return np.nan_to_num(values, nan=np.inf) <= max_score


# ----------------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------------
class RecordFilter:
    """Base class of data filters: ``keep(records, tokenizer) -> bool mask``.

    Score-based filters implement :meth:`scores` (lower is better) and set :attr:`keep_fraction` or a
    threshold; :meth:`keep` stores the scores of its last call in :attr:`last_scores`. A filter must be
    deterministic: every rank of a distributed run applies it on its own and must keep the same
    records.
    """

    keep_fraction: float | None = None
    last_scores: np.ndarray | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def scores(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        """``(n,)`` float64 scores, lower is better."""
        raise NotImplementedError

    def threshold(self) -> float | None:
        """The score a record may have at most (used when ``keep_fraction`` is ``None``)."""
        return None

    def keep(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        """``(n,)`` bool: which of ``records`` to keep. ``tokenizer`` is the datamodule's."""
        scores = np.asarray(self.scores(records, tokenizer), dtype=np.float64).reshape(-1)
        if len(scores) != len(records):
            raise ValueError(f"{self.name} gave {len(scores)} scores for {len(records)} records.")
        self.last_scores = scores
        return select_lowest(scores, self.keep_fraction, self.threshold())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "last_scores")
        return f"{self.name}({args})"


def _check_selection(owner: str, keep_fraction: float | None, threshold_name: str, threshold: float | None) -> None:
    if keep_fraction is not None and not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"{owner}(keep_fraction={keep_fraction}): keep_fraction must lie in (0, 1].")
    if keep_fraction is None and threshold is None:
        raise ValueError(f"{owner}: set keep_fraction (keep the best part) or {threshold_name} (a threshold).")


# ---- indicators ------------------------------------------------------------------------------------
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
            raise ValueError(f"Length(of={of!r}): of must be 'response' or 'instruction'.")
        if unit not in ("tokens", "words", "chars"):
            raise ValueError(f"Length(unit={unit!r}): unit must be 'tokens', 'words' or 'chars'.")
        self.of = of
        self.unit = unit

    def __call__(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        texts = [record_texts(r)[1 if self.of == "response" else 0] for r in records]
        if self.unit == "chars":
            return np.array([len(t) for t in texts], dtype=np.float64)
        if self.unit == "words":
            return np.array([len(t.split()) for t in texts], dtype=np.float64)
        if tokenizer is None:
            raise ValueError("Length(unit='tokens') needs the tokenizer: use it through SFTDataModule, or pass one.")
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
                raise ValueError(f"record {i} (id {record.get('id', i)!r}) has no field {self.field!r} for RecordField.")
            try:
                values.append(float(record[self.field]))
            except (TypeError, ValueError):
                raise ValueError(f"record {i} (id {record.get('id', i)!r}): field {self.field!r} is not a number: {record[self.field]!r}.") from None
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
            raise ValueError(f"CallableIndicator(inputs={inputs!r}): inputs must be 'texts' or 'records'.")
        self.function = function
        self.batched = batched
        self.inputs = inputs
        self.kwargs = dict(kwargs or {})
        self._fn: Callable[..., Any] | None = None

    def _callable(self) -> Callable[..., Any]:
        if self._fn is None:
            fn = import_object(self.function)
            if not callable(fn):
                raise ValueError(f"CallableIndicator: {self.function!r} is not callable.")
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
            raise ValueError(f"{self.function} returned {len(out)} values for {len(records)} records.")
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
        raise ValueError(f"embeddings must be (n, d), got shape {tuple(x.shape)}.")
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"the {k}-th nearest neighbour needs at least {k + 1} records, got {n}.")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric={metric!r} must be 'euclidean' or 'cosine'.")
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
            raise ValueError(f"KNNDistance(k={k}): k must be >= 1.")
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"KNNDistance(metric={metric!r}): metric must be 'euclidean' or 'cosine'.")
        if text not in ("both", "response", "instruction"):
            raise ValueError(f"KNNDistance(text={text!r}): text must be 'both', 'response' or 'instruction'.")
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
            raise ValueError(f"Perplexity: batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
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
                    raise ValueError(
                        f"Perplexity: record {begin + r} has no response token to score (empty response, or "
                        f"max_length={self.max_length} cuts it off)."
                    )
                out[begin + r] = math.exp(float(means[r]))
        del lm
        return out


# ---- InstructMining --------------------------------------------------------------------------------
#: The two published InstructMining rules: ``(intercept, {indicator: coefficient})``; the rule predicts
#: ``log L`` (evaluation loss after fine-tuning), lower is better. ``v1`` is the early arXiv version's,
#: ``v3`` the later one's (R² = 0.522). Indicators: ``reward`` (reward-model score), ``length``
#: (response length), ``knn6`` (embedding distance to the 6th nearest neighbour),
#: ``understandability`` / ``naturalness`` / ``coherence`` (UniEval).
INSTRUCT_MINING_RULES: dict[str, tuple[float, dict[str, float]]] = {
    "v1": (1.0694, {"reward": -0.1498, "length": 8.257e-5, "knn6": -0.9350}),
    "v3": (0.0274, {"reward": -0.0078, "understandability": 0.4421, "naturalness": -0.3212, "coherence": -0.1520}),
}


def instruct_mining_score(
    indicators: Mapping[str, Any],
    version: Literal["v1", "v3", "custom"] = "v3",
    coefficients: Mapping[str, float] | None = None,
    intercept: float | None = None,
) -> Any:
    """InstructMining's predicted log evaluation loss ``intercept + Σ_i c_i · x_i`` (lower is better).

    Args:
        indicators: indicator name → value (a float, a numpy array or a tensor; arrays broadcast).
        version: ``v1`` (``1.0694 − 0.1498·reward + 8.257e-5·length − 0.9350·knn6``), ``v3``
            (``0.0274 − 0.0078·reward + 0.4421·understandability − 0.3212·naturalness −
            0.1520·coherence``) or ``custom`` (give ``coefficients`` and ``intercept``).
        coefficients: the custom rule's coefficients.
        intercept: the custom rule's intercept (default 0).

    Example:
        >>> round(instruct_mining_score({"reward": 2, "length": 300, "knn6": 0.9}, "v1"), 6)
        -0.046929
        >>> round(instruct_mining_score({"reward": 2, "understandability": .9, "naturalness": .8, "coherence": .85}), 5)
        0.02353
    """
    if version == "custom":
        if not coefficients:
            raise ValueError("version='custom' needs coefficients (indicator name -> coefficient).")
        bias, coefs = (0.0 if intercept is None else float(intercept)), dict(coefficients)
    elif version in INSTRUCT_MINING_RULES:
        if coefficients is not None or intercept is not None:
            raise ValueError(f"version={version!r} has its published coefficients; use version='custom' to give your own.")
        bias, coefs = INSTRUCT_MINING_RULES[version]
    else:
        raise ValueError(f"version={version!r} must be 'v1', 'v3' or 'custom'.")
    missing = [name for name in coefs if name not in indicators]
    if missing:
        raise ValueError(f"the {version} rule needs the indicators {', '.join(missing)}.")
    score: Any = bias
    for name, coef in coefs.items():
        score = score + coef * indicators[name]
    return score


class InstructMiningFilter(RecordFilter):
    """InstructMining: keep the records whose indicators predict the lowest fine-tuned evaluation loss.

    Paper: Cao et al., "Instruction Mining: Instruction Data Selection for Tuning Large Language Models"
    (arXiv 2307.06290). A linear rule, fitted on many fine-tuning runs, predicts ``log L`` from
    data-quality indicators (:func:`instruct_mining_score`); records are ranked by it and the best kept.

    Indicators are :class:`Indicator` objects by name (the rule's names): :class:`Length` (``length``,
    on by default), :class:`KNNDistance` (``knn6``, with your embedder's import path),
    :class:`Perplexity` (a reference LM through the fused ops; for custom rules),
    :class:`CallableIndicator` (a reward model, a UniEval dimension: your function's import path) or
    :class:`RecordField` (scores precomputed into the data).

    Ambiguities (``shared/specs/text_methods.md`` §13):
        - *Two published rules* (the early arXiv ``v1`` and the later ``v3``): ``version`` chooses;
          default ``v3``, the later (final) version. ``custom`` fits your own rule.
        - *Subset size*: the paper picks it with BlendSearch over fine-tuning runs (not done here);
          give ``keep_fraction`` (the best part) or ``max_score`` (a threshold on the predicted log loss).
        - *Length unit* and *kNN metric*: options of :class:`Length` (tokens) and :class:`KNNDistance`
          (euclidean).

    Args:
        indicators: indicator name → :class:`Indicator`; merged over the default ``{"length": Length()}``.
        version: ``v1``, ``v3`` or ``custom``.
        coefficients: the ``custom`` rule's coefficients by indicator name.
        intercept: the ``custom`` rule's intercept.
        keep_fraction: keep this fraction of the records with the lowest predicted loss.
        max_score: otherwise keep the records whose predicted log loss is at most this.

    Example::

        InstructMiningFilter(version="v1", keep_fraction=0.3, indicators={
            "reward": CallableIndicator("my_rm.score"), "knn6": KNNDistance("my_embedder.embed", k=6)})
        dm = SFTDataModule(train_file="train.jsonl", filters=[...])   # the filter above
    """

    def __init__(
        self,
        indicators: dict[str, Indicator] | None = None,
        version: Literal["v1", "v3", "custom"] = "v3",
        coefficients: dict[str, float] | None = None,
        intercept: float = 0.0,
        keep_fraction: float | None = None,
        max_score: float | None = None,
    ) -> None:
        _check_selection("InstructMiningFilter", keep_fraction, "max_score", max_score)
        if version not in ("v1", "v3", "custom"):
            raise ValueError(f"InstructMiningFilter(version={version!r}): version must be 'v1', 'v3' or 'custom'.")
        if version == "custom" and not coefficients:
            raise ValueError("InstructMiningFilter(version='custom') needs coefficients (indicator name -> coefficient).")
        if version != "custom" and coefficients:
            raise ValueError(f"InstructMiningFilter(version={version!r}) has its published coefficients; use version='custom'.")
        merged: dict[str, Indicator] = {"length": Length(), **(indicators or {})}
        for key, value in merged.items():
            if not isinstance(value, Indicator):
                raise TypeError(f"InstructMiningFilter: indicator {key!r} must be an Indicator, got {type(value).__name__}.")
        needed = list(coefficients) if version == "custom" else list(INSTRUCT_MINING_RULES[version][1])
        missing = [name for name in needed if name not in merged]
        if missing:
            raise ValueError(
                f"InstructMiningFilter(version={version!r}) needs the indicators {', '.join(missing)}: give each as "
                "an Indicator, e.g. reward: CallableIndicator('my_package.reward') or RecordField('reward'), "
                "knn6: KNNDistance('my_package.embed', k=6)."
            )
        self.indicators = {name: merged[name] for name in needed}
        self.version = version
        self.coefficients = dict(coefficients) if coefficients else None
        self.intercept = float(intercept)
        self.keep_fraction = keep_fraction
        self.max_score = max_score
        self.last_indicators: dict[str, np.ndarray] = {}

    def threshold(self) -> float | None:
        return self.max_score

    def scores(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        values = {name: np.asarray(ind(records, tokenizer), dtype=np.float64) for name, ind in self.indicators.items()}
        self.last_indicators = values
        if self.version == "custom":
            return np.asarray(instruct_mining_score(values, "custom", self.coefficients, self.intercept), dtype=np.float64)
        return np.asarray(instruct_mining_score(values, self.version), dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"InstructMiningFilter(version={self.version!r}, indicators={self.indicators!r}, coefficients={self.coefficients!r}, "
            f"intercept={self.intercept!r}, keep_fraction={self.keep_fraction!r}, max_score={self.max_score!r})"
        )


# ---- long-CoT branching density ----------------------------------------------------------------------
#: Branching keywords of the third-party implementation of the paper's "Proxy 2" (regexes, matched
#: case-insensitively at word boundaries); the paper's own list was not retrieved.
BRANCHING_KEYWORDS: tuple[str, ...] = (
    "perhaps",
    "another approach",
    "alternatively",
    "let me try",
    "wait",
    "let me reconsider",
    r"maybe (?:i|we) should",
    "on second thought",
    "what if",
)
#: Steps end at ``.``, ``!``, ``?`` or a newline.
STEP_PATTERN = r"[.!?\n]"


def split_steps(text: str, step_pattern: str = STEP_PATTERN, min_step_chars: int = 1) -> list[str]:
    """Reasoning steps: ``text`` split on ``step_pattern``, stripped, keeping steps of at least
    ``min_step_chars`` characters.

    Example:
        >>> split_steps("Let x=2. Wait, maybe we should use y. Alternatively set z. So answer 4.")
        ['Let x=2', 'Wait, maybe we should use y', 'Alternatively set z', 'So answer 4']
    """
    steps = (s.strip() for s in re.split(step_pattern, text))
    return [s for s in steps if s and len(s) >= min_step_chars]


def _keyword_regex(keywords: Sequence[str]) -> re.Pattern[str]:
    if not keywords:
        raise ValueError("the branching keyword list is empty.")
    return re.compile(r"\b(?:" + "|".join(f"(?:{k})" for k in keywords) + r")\b", re.IGNORECASE)


def branching_density(
    text: str,
    keywords: Sequence[str] = BRANCHING_KEYWORDS,
    step_pattern: str = STEP_PATTERN,
    min_step_chars: int = 1,
) -> float:
    """Share of reasoning steps that contain a branching keyword (0 for a text without steps).

    Example (``shared/specs/text_methods.md`` §12 (f): 4 steps, 2 branching):
        >>> branching_density("Let x=2. Wait, maybe we should use y. Alternatively set z. So answer 4.")
        0.5
    """
    steps = split_steps(text, step_pattern, min_step_chars)
    if not steps:
        return 0.0
    regex = _keyword_regex(keywords)
    return sum(1 for s in steps if regex.search(s)) / len(steps)


def _thinking(text: str, tags: Sequence[str] | None) -> str:
    if not tags:
        return text
    open_tag, close_tag = tags
    start = text.find(open_tag)
    if start < 0:
        return text
    start += len(open_tag)
    end = text.find(close_tag, start)
    return text[start:] if end < 0 else text[start:end]


class BranchingDensityFilter(RecordFilter):
    """Drop long chain-of-thought traces that branch too often.

    Paper: "On the Role of Reasoning Patterns in the Generalization Discrepancy of Long CoT SFT"
    (arXiv 2604.01702): students inherit the redundant exploration of branch-heavy traces (DeepSeek-R1's
    many "Propose" steps); training on the subset without frequently-branching trajectories generalises
    better (+5.1% AIME25 in the paper). "Proxy 2" is the share of reasoning steps containing a
    branching keyword (:func:`branching_density`), computed on the response's ``<think>`` part when it
    has one (otherwise on the whole response).

    Ambiguities (``shared/specs/text_methods.md`` §12; the paper's list, segmentation, threshold and kept
    fraction were not retrieved):
        - *Keywords*: ``keywords`` (regexes); default :data:`BRANCHING_KEYWORDS`, the third-party list.
        - *Step segmentation*: ``step_pattern`` (default ``[.!?\\n]``) and ``min_step_chars``. Default 1
          (every non-empty step), which gives the spec's check (4 steps, density 0.5); the third-party
          code keeps steps longer than 10 characters (``min_step_chars: 11``; the same trace then has 3
          steps, density 2/3, filtered too).
        - *Threshold or fraction*: ``max_density`` (default 0.3: the third-party "> 0.30 is high"), or
          ``keep_fraction`` (the least-branching part), which takes precedence when set.

    Args:
        max_density: keep records whose density is at most this.
        keep_fraction: instead, keep this fraction of the records with the lowest density.
        keywords: branching keyword regexes, matched case-insensitively at word boundaries.
        step_pattern: regex that ends a step.
        min_step_chars: shortest step counted (after stripping).
        think_tags: ``[open, close]`` tags of the reasoning part; ``null`` scores the whole response.

    Example::

        filters = [BranchingDensityFilter(max_density=0.3)]
        dm = SFTDataModule(train_file="data/examples/long_cot.jsonl", filters=filters)
    """

    def __init__(
        self,
        max_density: float | None = 0.3,
        keep_fraction: float | None = None,
        keywords: list[str] | None = None,
        step_pattern: str = STEP_PATTERN,
        min_step_chars: int = 1,
        think_tags: tuple[str, str] | None = ("<think>", "</think>"),
    ) -> None:
        _check_selection("BranchingDensityFilter", keep_fraction, "max_density", max_density)
        if min_step_chars < 1:
            raise ValueError(f"BranchingDensityFilter(min_step_chars={min_step_chars}): must be >= 1.")
        self.keywords = list(keywords) if keywords is not None else list(BRANCHING_KEYWORDS)
        _keyword_regex(self.keywords)  # fail early on a bad regex
        re.compile(step_pattern)
        if think_tags is not None and len(think_tags) != 2:
            raise ValueError(f"BranchingDensityFilter(think_tags={think_tags!r}): give [open, close] or null.")
        self.max_density = max_density
        self.keep_fraction = keep_fraction
        self.step_pattern = step_pattern
        self.min_step_chars = min_step_chars
        self.think_tags = tuple(think_tags) if think_tags is not None else None

    def threshold(self) -> float | None:
        return self.max_density

    def scores(self, records: Sequence[Record], tokenizer: Any = None) -> np.ndarray:
        return np.array(
            [
                branching_density(_thinking(record_texts(r)[1], self.think_tags), self.keywords, self.step_pattern, self.min_step_chars)
                for r in records
            ],
            dtype=np.float64,
        )
