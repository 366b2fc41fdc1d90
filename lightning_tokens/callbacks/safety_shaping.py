r"""
STAR-DSS: dynamic safety shaping
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

STAR-DSS (Peng, Chen, Chi, Lee, Chau, "Shape it Up! Restoring LLM Safety during Finetuning", arXiv
2505.17196, NeurIPS 2025) lets a guardrail score *prefixes* of every training response, chunk by chunk
(the Safety Trajectory Assessment of Response, STAR), and interpolates each token's loss between the
cross-entropy on the data, where the response is still safe, and a KL pull toward the frozen initial
(aligned) model, where it has turned unsafe:

.. math::

    V_k = V_\mathrm{safe}\big(x, y_{1:\min(kM, T)}\big), \qquad
    \mathcal{L} = \frac{1}{N} \sum_k \sum_{t \in \text{chunk } k}
        \Big[ V_k \, \mathrm{CE}(y_t) + (1 - V_k)\, \lambda_\mathrm{KL}\,
        \mathrm{KL}\big(\pi_\theta(\cdot \mid x, y_{<t}) \,\big\|\, \pi_\mathrm{ref}(\cdot \mid x, y_{<t})\big) \Big]

with chunks of ``M`` response tokens, ``V_safe = σ(logit_safe − logit_unsafe)`` of a generative guard
(or a classifier's ``P(safe)``, :mod:`lightning_tokens.guardrails`) and ``N`` the number of scored tokens.

In the pipeline the method returns ``weights = V`` and ``extra_loss = (1 − V)·λ·KL``, which the
reduction ``Σ (w·nll + extra) / N`` turns into exactly the formula above (weights that travel with the
data multiply both terms; weights of other methods, e.g. DFT, multiply the cross-entropy term only).

Scores come from a file computed once (:func:`precompute_star_scores`, the ``star_score`` command) or
from a guardrail on the fly (the callback scores the batch's decoded prefixes in
``on_train_batch_start``). Either way the per-token values are indexed like ``labels``: the value at a
label position ``t`` is ``V_k`` of the chunk holding the response token ``labels[:, t]``, where the
response tokens of an example are its labelled positions in order (for a chat with several assistant
turns, all of their labelled tokens, counted across turns).

What the guardrail reads is decoded from the training tokens with the policy's tokenizer (so the guard
may use its own): the prompt is the text before the first labelled token and a response prefix the text
from there through the prefix's last response token. With chat data the prompt is therefore the rendered
conversation up to the assistant header, which, special tokens dropped (``skip_special_tokens``), leaves
the role names as plain words ("system ... user ... assistant").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.loss import _data_weights
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.reference import load_reference_scores, lookup_reference_nll
from lightning_tokens.core.stats import IGNORE_INDEX, TokenStats
from lightning_tokens.guardrails import Guardrail
from lightning_tokens.ops.kl import KLDirection, k3_kl, linear_kl
from lightning_tokens.scoring import attach_to_trainer

__all__ = [
    "STAR_VALUES_KEY",
    "SafetyShaping",
    "chunk_prefix_lengths",
    "chunk_weights",
    "load_star_scores",
    "precompute_star_scores",
    "save_star_scores",
    "star_dss_loss",
    "star_dss_terms",
    "star_values_for_batch",
    "trainer_star_score",
]

ChunkPrefix = Literal["chunk_end", "chunk_start"]
KLEstimator = Literal["full", "k3"]
Normalization = Literal["token_mean", "sequence_sum"]

#: The batch key under which the callback places the per-token values ``V`` (``(B, T)``, like ``labels``).
STAR_VALUES_KEY = "star_values"
#: ``format`` metadata of STAR score files.
STAR_FORMAT = "lightning_tokens.star_scores"
# A token whose V is exactly 0 still carries its KL term: its weight is floored here so that the
# pipeline (which drops zero-weight tokens from the loss and from N) keeps it. 1e-30 · CE vanishes next
# to any other term in float32, so the loss is the formula's to the last bit.
_WEIGHT_FLOOR = 1e-30


# ---- the method's arithmetic ---------------------------------------------------------------------------
def chunk_prefix_lengths(response_length: int, chunk_size: int, chunk_prefix: ChunkPrefix = "chunk_end") -> list[int]:
    """Length (in response tokens) of the prefix the guardrail reads for each chunk.

    ``chunk_end`` (the paper's STAR): chunk ``k`` (1-based) is scored on ``y_{1:min(kM, T)}``, the prefix
    ending at the chunk's end. ``chunk_start``: on ``y_{1:(k-1)M}``, the prefix *before* the chunk (a
    causal reading in which a chunk is judged before it is seen; the first chunk gets the empty response).

    Example:
        >>> chunk_prefix_lengths(12, 5), chunk_prefix_lengths(12, 5, "chunk_start")
        ([5, 10, 12], [0, 5, 10])
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if chunk_prefix not in ("chunk_end", "chunk_start"):
        raise ValueError(f"chunk_prefix must be 'chunk_end' or 'chunk_start', got {chunk_prefix!r}.")
    chunks = math.ceil(response_length / chunk_size)
    if chunk_prefix == "chunk_end":
        return [min(k * chunk_size, response_length) for k in range(1, chunks + 1)]
    return [(k - 1) * chunk_size for k in range(1, chunks + 1)]


def chunk_weights(chunk_scores: Tensor, response_length: int, chunk_size: int) -> Tensor:
    """Per-token ``V`` of a response from its chunk scores: token ``j`` (0-based) gets ``chunk_scores[j // M]``.

    Args:
        chunk_scores: ``(..., K)`` scores with ``K = ceil(T / M)``.
        response_length: ``T``, the number of response tokens.
        chunk_size: ``M``.

    Returns:
        ``(..., T)`` tensor of the same dtype.

    Example:
        >>> chunk_weights(torch.tensor([0.95, 0.20, 0.60], dtype=torch.float64), 12, 5).tolist() == [0.95] * 5 + [0.2] * 5 + [0.6] * 2
        True
        >>> chunk_weights(torch.tensor([1.0, 0.5]), 7, 4)
        tensor([1.0000, 1.0000, 1.0000, 1.0000, 0.5000, 0.5000, 0.5000])
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    expected = math.ceil(response_length / chunk_size)
    if chunk_scores.shape[-1] != expected:
        raise ValueError(
            f"a response of {response_length} tokens in chunks of {chunk_size} has {expected} chunks, "
            f"got {chunk_scores.shape[-1]} chunk scores."
        )
    return chunk_scores.repeat_interleave(chunk_size, dim=-1)[..., :response_length]


def star_dss_terms(
    v: Tensor, kl: Tensor, lam: float, data_weights: Tensor | None = None, scale: float | Tensor = 1.0
) -> tuple[Tensor, Tensor]:
    """The pipeline's view of STAR-DSS: ``(weights, extra_loss)`` such that ``weights·CE + extra_loss``
    is ``data_weights · scale · [V·CE + (1 − V)·λ·KL]`` per token.

    ``weights = max(V, 1e-30) · scale`` (detached) and ``extra_loss = data_weights·scale·(1 − V)·λ·KL``
    (differentiable through ``kl``); the data weights are left out of ``weights`` because the pipeline
    multiplies them in itself. The floor keeps a token with ``V = 0`` in the pipeline's kept set (a zero
    weight would drop its KL term too) and changes no float32 sum.

    Example:
        >>> w, extra = star_dss_terms(torch.tensor([1.0, 0.25, 0.0]), torch.tensor([0.3, 0.3, 0.3]), 2.0)
        >>> w, extra
        (tensor([1.0000e+00, 2.5000e-01, 1.0000e-30]), tensor([0.0000, 0.4500, 0.6000]))
    """
    v = v.detach().float()
    extra = (1.0 - v) * lam * kl
    if data_weights is not None:
        extra = extra * data_weights
    weights = v.clamp(min=_WEIGHT_FLOOR)
    return weights * scale, extra * scale


def star_dss_loss(ce: Tensor, kl: Tensor, v: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
    """The STAR-DSS loss, token mean: ``Σ_mask [V·CE + (1 − V)·λ·KL] / |mask|``.

    Args:
        ce: per-token cross-entropy (NLL of the label).
        kl: per-token ``KL(π_θ ‖ π_ref)`` (or any per-token divergence).
        v: per-token STAR value ``V`` in ``[0, 1]`` (see :func:`chunk_weights`).
        lam: ``λ_KL``.
        mask: which tokens count (default: all).

    Example (specs/text_methods.md §4 (f): T=12, M=5, STAR [0.95, 0.20, 0.60], CE ≡ 2, KL ≡ 0.3, λ=1):
        >>> v = chunk_weights(torch.tensor([0.95, 0.20, 0.60], dtype=torch.float64), 12, 5)
        >>> round(float(star_dss_loss(torch.full((12,), 2.0), torch.full((12,), 0.3), v, 1.0)), 6)
        1.284583
    """
    per_token = v * ce + (1.0 - v) * lam * kl
    if mask is None:
        return per_token.mean()
    mask = mask.bool()
    return per_token[mask].sum() / mask.sum().clamp(min=1)


# ---- examples, prefixes and guardrail scores -----------------------------------------------------------
def _batch_examples(batch: dict[str, Any]) -> list[tuple[int, Tensor, Tensor, int | None]]:
    """``(row, columns, positions, example id)`` of every example in a batch, on the CPU.

    Rows hold one example each (``example_id`` + right padding by ``attention_mask``) or several
    (``token_example_ids``, -1 on padding, with ``position_ids`` restarting per example), as
    :mod:`lightning_tokens.datamodules` make them; ``positions`` index the example's own tokens.
    """
    labels = batch["labels"]
    rows, width = labels.shape
    out: list[tuple[int, Tensor, Tensor, int | None]] = []
    token_ids = batch.get("token_example_ids")
    if token_ids is not None:
        token_ids = token_ids.cpu()
        position_ids = batch.get("position_ids")
        position_ids = position_ids.cpu() if position_ids is not None else None
        for row in range(rows):
            for key in token_ids[row].unique().tolist():
                if key < 0:
                    continue
                columns = (token_ids[row] == key).nonzero().squeeze(1)
                positions = position_ids[row, columns] if position_ids is not None else torch.arange(columns.numel())
                out.append((row, columns, positions, int(key)))
        return out
    mask = batch.get("attention_mask")
    ids = batch.get("example_id")
    for row in range(rows):
        length = int(mask[row].sum()) if mask is not None else width
        columns = torch.arange(length)
        out.append((row, columns, columns, None if ids is None else int(ids[row])))
    return out


def _prefix_texts(
    input_ids: Tensor, labels: Tensor, tokenizer: Any, chunk_size: int, chunk_prefix: ChunkPrefix, skip_special_tokens: bool
) -> tuple[str, list[str], Tensor] | None:
    """The prompt text, the response prefix text of every chunk, and the response token indices of one
    example (``None`` if it has no labelled token).

    The prompt is everything before the first labelled token; a prefix runs from the first labelled
    token through the last response token of the prefix (for multi-turn chats it includes the turns in
    between, as the guard would read them).
    """
    response = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    if response.numel() == 0:
        return None
    first = int(response[0])
    ids = input_ids.tolist()
    prompt = tokenizer.decode(ids[:first], skip_special_tokens=skip_special_tokens)
    prefixes = []
    for n in chunk_prefix_lengths(response.numel(), chunk_size, chunk_prefix):
        end = int(response[n - 1]) + 1 if n > 0 else first
        prefixes.append(tokenizer.decode(ids[first:end], skip_special_tokens=skip_special_tokens))
    return prompt, prefixes, response


def _score_examples(
    guardrail: Guardrail,
    examples: Sequence[tuple[Tensor, Tensor]],
    tokenizer: Any,
    chunk_size: int,
    chunk_prefix: ChunkPrefix,
    skip_special_tokens: bool,
) -> list[Tensor]:
    """Per-position ``V`` (float32, NaN where the example has no label) of each ``(input_ids, labels)``,
    with one guardrail call for all their prefixes."""
    prepared = [_prefix_texts(ids, labels, tokenizer, chunk_size, chunk_prefix, skip_special_tokens) for ids, labels in examples]
    prompts = [p[0] for p in prepared if p is not None for _ in p[1]]
    prefixes = [text for p in prepared if p is not None for text in p[1]]
    scores = guardrail.score(prompts, prefixes).detach().float().cpu().reshape(-1)
    if scores.numel() != len(prompts):
        raise ValueError(f"the guardrail returned {scores.numel()} scores for {len(prompts)} (prompt, response) pairs.")
    if not torch.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ValueError("the guardrail returned scores outside [0, 1]; P(safe) must be a probability.")
    out, cursor = [], 0
    for (ids, _), p in zip(examples, prepared):
        values = torch.full((ids.numel(),), math.nan)
        if p is not None:
            count = len(p[1])
            values[p[2]] = chunk_weights(scores[cursor : cursor + count], p[2].numel(), chunk_size)
            cursor += count
        out.append(values)
    return out


def star_values_for_batch(
    guardrail: Guardrail,
    batch: dict[str, Any],
    tokenizer: Any,
    chunk_size: int = 5,
    chunk_prefix: ChunkPrefix = "chunk_end",
    skip_special_tokens: bool = True,
) -> Tensor:
    """``(B, T)`` STAR values of a batch, computed now with ``guardrail`` (NaN where there is no label).

    Example::

        values = star_values_for_batch(guard, batch, model.tokenizer)   # then V = values at label positions
    """
    labels = batch["labels"]
    input_ids = batch["input_ids"].cpu()
    labels_cpu = labels.cpu()
    located = _batch_examples(batch)
    examples = [(input_ids[row, cols], labels_cpu[row, cols]) for row, cols, _, _ in located]
    values = _score_examples(guardrail, examples, tokenizer, chunk_size, chunk_prefix, skip_special_tokens)
    out = torch.full(labels.shape, math.nan)
    for (row, cols, _, _), v in zip(located, values):
        out[row, cols] = v
    return out.to(labels.device)


# ---- score files ----------------------------------------------------------------------------------------
def save_star_scores(path: str, scores: dict[int, Tensor], chunk_size: int, chunk_prefix: ChunkPrefix) -> None:
    """Write per-example per-position ``V`` (float32, NaN at unlabelled positions) keyed by example id,
    in the layout of :func:`~lightning_tokens.core.reference.save_reference_scores`, with the chunking
    recorded in the metadata."""
    from safetensors.torch import save_file

    tensors = {str(int(key)): value.detach().float().cpu().contiguous() for key, value in scores.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metadata = {"format": STAR_FORMAT, "version": "1", "chunk_size": str(chunk_size), "chunk_prefix": chunk_prefix}
    save_file(tensors, path, metadata=metadata)


def load_star_scores(path: str) -> tuple[dict[int, Tensor], dict[str, str]]:
    """``(scores by example id, metadata)`` of a file written by :func:`save_star_scores`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    if metadata.get("format") != STAR_FORMAT:
        raise ValueError(
            f"{path} is not a STAR score file (format {metadata.get('format')!r}): compute one with "
            "`lightning-tokens star_score` (precompute_star_scores)."
        )
    return load_reference_scores(path), metadata


def _iter_examples(data: Any) -> Iterable[list[tuple[int, Tensor, Tensor, Tensor]]]:
    """Groups of ``(example id, positions, input_ids, labels)`` from a datamodule's training batches,
    an iterable of batches, or an iterable of single examples (``example_id``, ``input_ids``, ``labels``)."""
    if isinstance(data, pl.LightningDataModule):
        data = data.train_dataloader()
    pending: list[tuple[int, Tensor, Tensor, Tensor]] = []
    for item in data:
        ids = torch.as_tensor(item["input_ids"])
        if ids.dim() == 2:  # a batch
            if pending:
                yield pending
                pending = []
            labels = torch.as_tensor(item["labels"]).cpu()
            ids = ids.cpu()
            group = []
            for row, cols, positions, key in _batch_examples(item):
                if key is None:
                    raise ValueError("batches need `example_id` or `token_example_ids` to key their STAR scores.")
                group.append((key, positions, ids[row, cols], labels[row, cols]))
            yield group
        else:
            n = ids.numel()
            pending.append((int(item["example_id"]), torch.arange(n), ids.reshape(-1).long(), torch.as_tensor(item["labels"]).reshape(-1).long()))
            if len(pending) >= 64:
                yield pending
                pending = []
    if pending:
        yield pending


@torch.no_grad()
def precompute_star_scores(
    guardrail: Guardrail,
    data: pl.LightningDataModule | Iterable[dict[str, Any]],
    output: str | None,
    chunk_size: int = 5,
    tokenizer: Any = None,
    *,
    chunk_prefix: ChunkPrefix = "chunk_end",
    skip_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> dict[int, Tensor]:
    """STAR values of every training example, keyed by example id, written to ``output`` (safetensors).

    For each example, the response tokens (its labelled positions, in order) are cut into chunks of
    ``chunk_size``; the guardrail scores ``(prompt text, response prefix text)`` once per chunk (the
    texts are decoded with ``tokenizer``, so the guard may use another tokenizer), and every response
    token gets its chunk's score. The stored tensor of an example is indexed like the example's own
    positions (as :func:`~lightning_tokens.scoring.score_reference` stores reference losses), NaN where
    a position has no label, so :class:`SafetyShaping` finds V at the label positions of packed and
    unpacked batches alike and notices when the data changed.

    Args:
        guardrail: the safety scorer.
        data: a datamodule (its training data, exactly as training will see it: same tokenizer, ids,
            truncation), an iterable of batches, or an iterable of examples ``{"example_id", "input_ids",
            "labels"}`` (labels unshifted, -100 where no loss is taken).
        output: the file to write, or ``None`` to only return the scores.
        chunk_size: ``M``, response tokens per chunk (5 in the paper).
        tokenizer: decodes token ids to text (default: the datamodule's ``tokenizer``).
        chunk_prefix: ``chunk_end`` or ``chunk_start`` (see :func:`chunk_prefix_lengths`).
        skip_special_tokens: drop special tokens (chat-template markers, bos/eos) from the decoded texts.
        device: where the guardrail runs.

    Example::

        scores = precompute_star_scores(CausalLMGuardrail("meta-llama/Llama-Guard-3-1B"), datamodule, "star.safetensors")
    """
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        tokenizer = tokenizer if tokenizer is not None else getattr(data, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("precompute_star_scores needs a `tokenizer` to decode the examples into text for the guardrail.")
    chunk_prefix_lengths(0, chunk_size, chunk_prefix)  # validates both
    if device is not None:
        guardrail.to(device)
    scores: dict[int, Tensor] = {}
    for group in _iter_examples(data):
        values = _score_examples(
            guardrail, [(ids, labels) for _, _, ids, labels in group], tokenizer, chunk_size, chunk_prefix, skip_special_tokens
        )
        for (key, positions, _, _), v in zip(group, values):
            stored = torch.full((int(positions.max()) + 1 if positions.numel() else 0,), math.nan)
            stored[positions] = v
            scores[key] = stored
    if output is not None:
        save_star_scores(output, scores, chunk_size, chunk_prefix)
        rank_zero_info(f"STAR scores of {len(scores)} examples written to {output}")
    return scores


def trainer_star_score(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    output: str,
    guardrail: Guardrail,
    chunk_size: int = 5,
    chunk_prefix: ChunkPrefix = "chunk_end",
) -> dict[int, Tensor]:
    """``Trainer.star_score``: STAR values of the datamodule's training data with ``guardrail``.

    The model is only connected (datamodules read its tokenizer; its weights are not loaded); the
    guardrail runs on the trainer's root device.
    """
    attach_to_trainer(trainer, model, datamodule)
    return precompute_star_scores(
        guardrail,
        datamodule,
        output,
        chunk_size,
        getattr(model, "tokenizer", None),
        chunk_prefix=chunk_prefix,
        device=trainer.strategy.root_device,
    )


# ---- the callback -------------------------------------------------------------------------------------
class SafetyShaping(TokenMethod):
    r"""STAR-DSS dynamic safety shaping: cross-entropy where the response is safe, KL to the reference where not.

    Per token (``V`` the STAR value of its chunk, see the module docstring):
    ``loss_t = V·CE_t + (1 − V)·λ·KL(π_θ ‖ π_ref)_t``, token mean over the scored tokens. Returned as
    ``TokenMethodOutput(weights=V, extra_loss=(1 − V)·λ·KL)``.

    Needs a reference: the frozen initial aligned model. With LoRA, ``reference: {mode: adapter_disabled}``
    costs no memory; ``model`` (a separate frozen copy) and ``ema`` work too. The full KL reads the
    reference's hidden states and output head; the ``offline`` mode has per-token losses only, so it
    works with ``kl_estimator="k3"`` alone.

    Scores: ``scores_file`` from :func:`precompute_star_scores` / ``lightning-tokens star_score`` (the
    paper's way: one guardrail pass before training), or ``guardrail`` to score each batch on the fly in
    ``on_train_batch_start`` (⌈T/M⌉ guardrail forwards per example and step). Give exactly one.

    Ambiguities of the method (specs/text_methods.md §4 (b)), each an option:

    - ``kl_estimator``: ``full`` (default), the exact full-vocabulary KL per token, computed chunked
      (:func:`lightning_tokens.ops.linear_kl`); the formula as stated. ``k3``: Schulman's ``r − 1 − log r``
      on the label token (a third-party implementation's choice; cheap, works with offline references,
      but biased because the label is not drawn from π_θ).
    - ``kl_direction``: ``policy_reference`` = ``KL(π_θ ‖ π_ref)`` (default; what both paper summaries
      write) or ``reference_policy`` = ``KL(π_ref ‖ π_θ)``.
    - ``kl_coef`` (λ_KL): 1.0 by default. The paper ablates it (Table 19) but its value was not
      retrievable; 1 makes the per-token loss a plain interpolation between CE and KL, and is the value of
      the spec's numeric check.
    - ``normalization``: ``token_mean`` (default): ``Σ / N`` over the scored tokens, the pipeline's exact
      reduction and the spec's numeric check. ``sequence_sum``: ``Σ / (number of sequences)``, i.e. each
      sequence's summed loss averaged over sequences (the micro-batch's token/sequence ratio is folded
      into the weights: exact for one micro-batch per step, per micro-batch under accumulation).
    - ``chunk_prefix``: ``chunk_end`` (default): chunk ``k`` is scored on the prefix ending at its last
      token, as the spec's formula ``V_safe(x, y_{1:min(kM,T)})`` and one summary state; ``chunk_start``
      scores it on the prefix before it. Applies to on-the-fly scoring; a scores file records its own and
      must agree.
    - ``chunk_size`` ``M``: 5, the paper's value (its precompute timing table).
    - The guardrail's prompt template and verdict tokens: options of
      :class:`~lightning_tokens.guardrails.CausalLMGuardrail` (``template``, ``safe_token``,
      ``unsafe_token``, ``verdict_prefix``).

    Args:
        scores_file: STAR values from :func:`precompute_star_scores`.
        guardrail: a :class:`~lightning_tokens.guardrails.Guardrail` for on-the-fly scoring.
        chunk_size: response tokens per chunk ``M``.
        kl_coef: ``λ_KL``.
        kl_estimator: ``full`` or ``k3``.
        kl_direction: ``policy_reference`` or ``reference_policy``.
        chunk_prefix: ``chunk_end`` or ``chunk_start``.
        normalization: ``token_mean`` or ``sequence_sum``.
        skip_special_tokens: on-the-fly scoring: drop special tokens from the decoded texts.
        kl_chunk_size: tokens per chunk of the full KL (default: about 1 GiB of float32 logits per side).

    Logs ``mean_safety`` (mean V over scored tokens), ``unsafe_fraction`` (V < 0.5) and ``mean_kl``.

    Example::

        model = TokenLM(model="smollm2-135m-instruct", lora=LoRASettings(), reference=ReferenceSettings("adapter_disabled"))
        trainer = L.Trainer(callbacks=[SafetyShaping(scores_file="star.safetensors", kl_coef=1.0)])
        trainer.fit(model, datamodule=SFTDataModule(train_file="data/examples/sft_chat.jsonl"))
    """

    requires_reference = True

    def __init__(
        self,
        scores_file: str | None = None,
        guardrail: Guardrail | None = None,
        chunk_size: int = 5,
        kl_coef: float = 1.0,
        kl_estimator: KLEstimator = "full",
        kl_direction: KLDirection = "policy_reference",
        chunk_prefix: ChunkPrefix = "chunk_end",
        normalization: Normalization = "token_mean",
        skip_special_tokens: bool = True,
        kl_chunk_size: int | None = None,
    ) -> None:
        name = type(self).__name__
        if (scores_file is None) == (guardrail is None):
            raise ValueError(
                f"{name} needs exactly one source of STAR values: `scores_file` (precomputed with "
                "`lightning-tokens star_score`) or `guardrail` (scored on the fly)."
            )
        if chunk_size < 1:
            raise ValueError(f"{name}(chunk_size={chunk_size}): chunk_size must be >= 1.")
        if not (kl_coef >= 0 and math.isfinite(kl_coef)):
            raise ValueError(f"{name}(kl_coef={kl_coef}): kl_coef must be a finite number >= 0.")
        for option, value, allowed in (
            ("kl_estimator", kl_estimator, ("full", "k3")),
            ("kl_direction", kl_direction, ("policy_reference", "reference_policy")),
            ("chunk_prefix", chunk_prefix, ("chunk_end", "chunk_start")),
            ("normalization", normalization, ("token_mean", "sequence_sum")),
        ):
            check_choice(name, option, value, allowed)
        if kl_chunk_size is not None and kl_chunk_size < 1:
            raise ValueError(f"{name}(kl_chunk_size={kl_chunk_size}): must be >= 1.")
        self.scores_file = scores_file
        self.guardrail = guardrail
        self.chunk_size = chunk_size
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.kl_direction = kl_direction
        self.chunk_prefix = chunk_prefix
        self.normalization = normalization
        self.skip_special_tokens = skip_special_tokens
        self.kl_chunk_size = kl_chunk_size
        self._scores: dict[int, Tensor] | None = None

    # ---- setup ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":  # the method acts in training only
            return
        mode = getattr(getattr(getattr(pl_module, "reference", None), "settings", None), "mode", None)
        if self.kl_estimator == "full" and mode == "offline":
            raise ValueError(
                f"{self.name}(kl_estimator='full') needs the reference's hidden states and output head for the "
                "full-vocabulary KL, but reference.mode=offline stores per-token losses only: use "
                "kl_estimator='k3' (the single-token estimator) or reference.mode adapter_disabled (LoRA), "
                "model or ema."
            )
        if self.scores_file is not None and self._scores is None:
            self._load_scores()

    def _load_scores(self) -> None:
        path = self.scores_file
        if not os.path.exists(path):
            raise ValueError(
                f"{self.name}(scores_file={path!r}): no such file; compute it first with `lightning-tokens "
                "star_score --config <config> --guardrail ... --output FILE` (precompute_star_scores)."
            )
        scores, metadata = load_star_scores(path)
        stored = (int(metadata.get("chunk_size", self.chunk_size)), metadata.get("chunk_prefix", self.chunk_prefix))
        if stored != (self.chunk_size, self.chunk_prefix):
            raise ValueError(
                f"{path} was scored with chunk_size={stored[0]}, chunk_prefix={stored[1]!r} but {self.name} is set to "
                f"chunk_size={self.chunk_size}, chunk_prefix={self.chunk_prefix!r}: make them agree or re-score."
            )
        self._scores = scores

    # ---- V per batch ------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict) and "labels" in batch:
            batch[STAR_VALUES_KEY] = self.batch_values(batch, pl_module)

    def batch_values(self, batch: dict[str, Any], pl_module: pl.LightningModule | None = None) -> Tensor:
        """``(B, T)`` STAR values of a batch (NaN where nothing was scored), from the file or the guardrail."""
        if self.guardrail is not None:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(f"{self.name}(guardrail=...) decodes batches with the module's `tokenizer`, which it lacks.")
            device = getattr(pl_module, "device", None)
            if device is not None:
                self.guardrail.to(device)
            return star_values_for_batch(
                self.guardrail, batch, tokenizer, self.chunk_size, self.chunk_prefix, self.skip_special_tokens
            )
        if self._scores is None:
            self._load_scores()
        try:
            return lookup_reference_nll(self._scores, batch, self.scores_file)
        except ValueError as err:
            raise ValueError(
                f"{err} [{self.name}: the STAR scores no longer match the data; re-run `lightning-tokens star_score`]"
            ) from None

    def _values(self, stats: TokenStats, pl_module: pl.LightningModule | None) -> Tensor:
        batch = stats.batch
        values = batch.get(STAR_VALUES_KEY)
        if values is None:
            if "input_ids" not in batch:
                raise ValueError(
                    f"{self.name} needs the batch (with input_ids, labels and example ids) in the token loss: "
                    "pass `batch=` to token_loss."
                )
            values = self.batch_values(batch, pl_module)
        values = values.to(device=stats.mask.device, dtype=torch.float32)
        active = values[stats.mask]
        if torch.isnan(active).any():
            raise ValueError(
                f"{self.name}: {int(torch.isnan(active).sum())} labelled tokens have no STAR value (the scores were "
                "computed on other labels): re-run `lightning-tokens star_score` on this data."
            )
        if (active < 0).any() or (active > 1).any():
            raise ValueError(f"{self.name}: STAR values must lie in [0, 1].")
        return torch.where(stats.mask, values, torch.ones_like(values))

    # ---- KL ------------------------------------------------------------------------------------------
    def _kl(self, stats: TokenStats, needed: Tensor) -> Tensor:
        """``(B, T)`` per-token KL at ``needed`` positions (a subset of ``stats.mask``), 0 elsewhere."""
        reference = stats.reference
        if reference is None:
            raise RuntimeError(
                f"{self.name} got no reference statistics: configure the module's `reference` "
                "(adapter_disabled with LoRA, model or ema)."
            )
        if self.kl_estimator == "k3":
            ref_nll = reference.nll.detach().to(stats.nll.device).float()
            kl = k3_kl(-stats.nll, -ref_nll, self.kl_direction)
            return torch.where(needed, kl, torch.zeros_like(kl))
        ref_hidden = getattr(reference, "hidden", None)
        ref_logits = getattr(reference, "logits", None)
        if ref_hidden is None and ref_logits is None:
            raise ValueError(
                f"{self.name}(kl_estimator='full') needs the reference's hidden states and head; this reference has "
                "per-token losses only (offline): use kl_estimator='k3' or another reference mode."
            )
        selected = needed[stats.mask]  # over the active rows, in stats order
        rows = stats._rows()[selected]
        aligned = stats._aligned_mask()
        if stats.hidden is not None and ref_hidden is not None:
            ref_rows = stats._predictions(ref_hidden)[aligned][selected]
            head, ref_head = stats.head, reference.head
            values = linear_kl(
                rows, head.weight, ref_rows.to(rows.device), ref_head.weight.to(rows.device), head.bias,
                None if ref_head.bias is None else ref_head.bias.to(rows.device),
                chunk_size=self.kl_chunk_size, direction=self.kl_direction,
            )
        elif stats.logits is not None and ref_logits is not None:
            ref_rows = stats._predictions(ref_logits)[aligned][selected].detach()
            log_p = torch.log_softmax(rows.float(), dim=-1)
            log_q = torch.log_softmax(ref_rows.float().to(rows.device), dim=-1)
            if self.kl_direction == "reference_policy":
                values = (log_q.exp() * (log_q - log_p)).sum(-1)
            else:
                values = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:
            raise ValueError(
                f"{self.name}: the current statistics and the reference's must both come from hidden states + head "
                "or both from logits."
            )
        active = torch.zeros(selected.shape, dtype=values.dtype, device=values.device).masked_scatter(selected, values)
        return stats.scatter(active)

    # ---- the method ----------------------------------------------------------------------------------
    def _scale(self, stats: TokenStats) -> float:
        if self.normalization == "token_mean":
            return 1.0
        active = int(stats.mask.sum())
        token_ids = stats.batch.get("token_example_ids")
        if token_ids is not None:
            sequences = int(token_ids.to(stats.mask.device)[stats.mask].unique().numel())
        else:
            sequences = int(stats.mask.any(dim=1).sum())
        return active / max(sequences, 1)

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        mask = stats.mask
        v = self._values(stats, pl_module)
        needed = mask & (v < 1) if self.kl_coef > 0 else torch.zeros_like(mask)
        kl = self._kl(stats, needed) if bool(needed.any()) else torch.zeros_like(v)
        data_weights = _data_weights(stats, stats.batch)
        weights, extra = star_dss_terms(v, kl, self.kl_coef, data_weights, self._scale(stats))
        weights = torch.where(mask, weights, torch.ones_like(weights))
        extra = torch.where(mask, extra, torch.zeros_like(extra))
        logs: dict[str, float | Tensor] = {}
        active = v[mask]
        if active.numel():
            logs["mean_safety"] = active.mean()
            logs["unsafe_fraction"] = (active < 0.5).float().mean()
            logs["mean_kl"] = kl.detach()[mask].mean()
        return TokenMethodOutput(weights=weights, extra_loss=extra, logs=logs)
