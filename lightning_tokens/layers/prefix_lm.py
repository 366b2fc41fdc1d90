"""Prefix-LM attention and the acoustic-token decoder of DualSpeechLM ("AcousticGPT").

DualSpeechLM (``DualSpeechLM/src/model/modeling_phi3.py`` and ``causal_att.py`` in lavendery/UUG) renders
speech by a small GPT that reads the LLM's last hidden states as a *prefix* and predicts single-codebook
codec ids (WavTokenizer, 4096 codes at 40 Hz) after it:

* the LLM hidden states pass through an :class:`Adapter` (Linear → ReLU → Linear) to the GPT width, and
  an optional speaker vector, projected by a bias-free Linear, is prepended as one more prefix position;
* the prefix sees itself bidirectionally, the targets are causal and see the whole prefix
  (:func:`prefix_lm_mask`), and padded condition positions are hidden as keys;
* the vocabulary is the codebook plus four specials (:class:`AcousticVocabulary`): ``pad`` (ignored in
  the loss), ``special_decoder`` (the placeholder target of items without speech output), ``start`` and
  ``end``; the token embedding and the output head share one weight.

Only ``hidden`` comes out of :meth:`AcousticGPT.forward`; the caller takes the loss through the library's
token loss with :attr:`AcousticGPT.head`, on labels already aligned with the inputs
(``shift_labels=False``), as :meth:`AcousticVocabulary.build_targets` builds them.

Example:
    >>> vocab = AcousticVocabulary(codebook_size=16)
    >>> model = AcousticGPT(vocab.size, condition_dim=8, n_embd=32, n_layer=1, n_head=2)
    >>> input_ids, labels = vocab.build_targets([torch.tensor([3, 4, 5]), torch.tensor([7])])
    >>> condition = torch.randn(2, 6, 8)
    >>> model(condition, torch.ones(2, 6, dtype=torch.bool), input_ids).shape
    torch.Size([2, 4, 32])
    >>> labels[1].tolist()  # [start] 7 [end] pad → next tokens, pad ignored
    [7, 19, -100, -100]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_tokens.core.errors import ConfigError, DataError
from lightning_tokens.core.stats import IGNORE_INDEX

__all__ = ["AcousticGPT", "AcousticVocabulary", "Adapter", "prefix_lm_mask"]

_KVCache = list[tuple[Tensor, Tensor]]


# ---- the mask ------------------------------------------------------------------------------------------
def prefix_lm_mask(target_mask: Tensor, prefix_lm: bool = True) -> Tensor:
    """Boolean ``(B, L, L)`` attention mask (``True``: row may attend to column) from target positions.

    Each row of ``target_mask`` must hold one contiguous run of ``True`` (the targets) after a prefix
    and before padding. Row ``i`` may attend to column ``j`` when ``j <= i`` (causal), or when ``j`` lies
    in the prefix and ``prefix_lm`` is set (the prefix is bidirectional and every row sees all of it);
    columns after the last target are never visible. Padding rows (after the last target) therefore see
    the prefix and all targets: they are never all-``False``, so ``scaled_dot_product_attention`` stays
    finite, and nothing reads them. This equals DualSpeechLM's ``attention_mask`` on every row.

    Args:
        target_mask: ``(B, L)`` bool, ``True`` at target positions.
        prefix_lm: let every row see the whole prefix (``False``: the prefix is causal too).

    Returns:
        ``(B, L, L)`` bool tensor on ``target_mask``'s device.

    Raises:
        DataError: a row without targets, or with more than one run of targets.

    Example:
        >>> mask = prefix_lm_mask(torch.tensor([[False, False, True, True, True]]))
        >>> mask[0].int().tolist()
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    """
    if target_mask.dim() != 2 or target_mask.dtype != torch.bool:
        raise DataError(
            f"target_mask must be a (batch, length) bool tensor, got dtype {target_mask.dtype} and shape "
            f"{tuple(target_mask.shape)}: pass e.g. labels != -100."
        )
    start, end = _target_bounds(target_mask)
    count = target_mask.sum(dim=1)
    bad = (count == 0) | (end - start + 1 != count)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        what = "has no target position" if int(count[row]) == 0 else "has more than one run of target positions"
        raise DataError(
            f"target_mask row {row} {what}: each row needs exactly one contiguous run of True "
            "(prefix, then targets, then padding)."
        )
    return _mask_from_bounds(start, end, target_mask.shape[1], prefix_lm)


def _target_bounds(target_mask: Tensor) -> tuple[Tensor, Tensor]:
    length = target_mask.shape[1]
    axis = torch.arange(length, device=target_mask.device)
    start = torch.where(target_mask, axis, length).min(dim=1).values
    end = torch.where(target_mask, axis, -1).max(dim=1).values
    return start, end


def _mask_from_bounds(start: Tensor, end: Tensor, length: int, prefix_lm: bool) -> Tensor:
    axis = torch.arange(length, device=start.device)
    rows, cols = axis.view(1, length, 1), axis.view(1, 1, length)
    mask = cols <= rows
    if prefix_lm:
        mask = mask | (cols < start.view(-1, 1, 1))
    return mask & (cols <= end.view(-1, 1, 1))


# ---- vocabulary and targets ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AcousticVocabulary:
    """The codec codebook followed by DualSpeechLM's four special ids.

    ``pad = codebook_size`` (ignored in the loss), ``special_decoder = +1`` (the target of items with no
    speech output), ``start = +2``, ``end = +3``; WavTokenizer's 4096 codes give 4096–4099.

    Args:
        codebook_size: number of codec codes (ids ``0 … codebook_size - 1``).

    Example:
        >>> vocab = AcousticVocabulary(4096)
        >>> vocab.pad, vocab.special_decoder, vocab.start, vocab.end, vocab.size
        (4096, 4097, 4098, 4099, 4100)
    """

    codebook_size: int

    def __post_init__(self) -> None:
        if self.codebook_size < 1:
            raise ConfigError(f"codebook_size={self.codebook_size} must be >= 1: pass the codec's codebook size.")

    @property
    def pad(self) -> int:
        return self.codebook_size

    @property
    def special_decoder(self) -> int:
        return self.codebook_size + 1

    @property
    def start(self) -> int:
        return self.codebook_size + 2

    @property
    def end(self) -> int:
        return self.codebook_size + 3

    @property
    def size(self) -> int:
        """Embedding / head rows: codebook plus the four specials."""
        return self.codebook_size + 4

    def wrap(self, codes: Tensor | None) -> Tensor:
        """``[start] codes [end]``; ``None`` (no speech output) gives ``[start, special_decoder, end]``."""
        body = torch.tensor([self.special_decoder]) if codes is None else codes.long().cpu()
        return torch.cat([torch.tensor([self.start]), body, torch.tensor([self.end])])

    def build_targets(self, codes_list: Sequence[Tensor | None]) -> tuple[Tensor, Tensor]:
        """Decoder inputs and aligned labels for a batch of code sequences.

        Each item becomes ``[start] codes [end]``, right-padded with ``pad``; ``input_ids`` drops the last
        column and ``labels`` the first (``labels[:, t]`` is the token predicted at ``t``), with ``-100``
        wherever the next token is ``pad``.

        Args:
            codes_list: one 1-D tensor of codec ids per item (``None``: an item without speech).

        Returns:
            ``(input_ids, labels)``, both ``(B, max_len + 1)`` long.

        Raises:
            DataError: an item that is not 1-D or holds ids outside ``[0, codebook_size)``.

        Example:
            >>> AcousticVocabulary(4).build_targets([torch.tensor([1, 2])])[0].tolist()
            [[6, 1, 2]]
        """
        if len(codes_list) == 0:
            raise DataError("build_targets got an empty batch: pass at least one code sequence.")
        for index, codes in enumerate(codes_list):
            self._check_codes(index, codes)
        sequences = [self.wrap(codes) for codes in codes_list]
        padded = nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=self.pad)
        input_ids, labels = padded[:, :-1].clone(), padded[:, 1:].clone()
        labels[labels == self.pad] = IGNORE_INDEX
        return input_ids, labels

    def _check_codes(self, index: int, codes: Tensor | None) -> None:
        if codes is None:
            return
        if codes.dim() != 1:
            raise DataError(f"codes_list[{index}] has shape {tuple(codes.shape)}: pass one 1-D tensor of ids per item.")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise DataError(
                f"codes_list[{index}] holds ids in [{int(codes.min())}, {int(codes.max())}], outside the codebook "
                f"[0, {self.codebook_size}): check the codec's codebook_size."
            )


# ---- the network ---------------------------------------------------------------------------------------
class Adapter(nn.Module):
    """``Linear(in, hidden) → ReLU → Linear(hidden, out)``: DualSpeechLM's ``llama_decoder_proj``.

    Args:
        in_features: input width (the LLM hidden size).
        out_features: output width (the acoustic GPT width).
        hidden: inner width (default ``in_features``, as in the reference).

    Example:
        >>> Adapter(8, 4)(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 4])
    """

    def __init__(self, in_features: int, out_features: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = in_features if hidden is None else hidden
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class _SelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        batch, length, width = x.shape
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), dropout_p=dropout)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(batch, length, width))), (k, v)


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` with a tanh-GELU MLP."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = _SelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(
        self, x: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attended, present = self.attn(self.ln_1(x), mask, past)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), present


class AcousticGPT(nn.Module):
    """A prefix-conditioned GPT over codec ids: DualSpeechLM's acoustic decoder (its ``AnyGPT``).

    The prefix is ``[speaker?] + Adapter(condition)`` with learned prefix positions; the targets are token
    plus learned position embeddings. Attention follows :func:`prefix_lm_mask` over ``[prefix, targets]``
    with padded condition positions hidden as keys; those positions still see themselves, so every row
    has a key and SDPA stays finite. The reference sizes are ``n_embd=1024, n_layer=6, n_head=8,
    block_size=2048, speaker_dim=512`` over WavTokenizer's 4096 codes (``vocab_size=4100``).

    Args:
        vocab_size: codebook size + 4 specials (:class:`AcousticVocabulary` layout).
        condition_dim: width of the conditioning hidden states (the LLM hidden size).
        n_embd: model width.
        n_layer: transformer blocks.
        n_head: attention heads (must divide ``n_embd``).
        block_size: most prefix positions, and most target positions.
        dropout: dropout on target embeddings, attention and residual branches.
        speaker_dim: width of a per-utterance speaker vector prepended as one prefix position (``None``:
            no speaker).
        pad_id: the id never sampled and ignored in the loss (default: the vocabulary's ``pad``).

    Example:
        >>> model = AcousticGPT(20, condition_dim=8, n_embd=16, n_layer=1, n_head=2, speaker_dim=4)
        >>> codes = model.generate(torch.randn(1, 5, 8), None, max_new_tokens=6, speaker=torch.randn(1, 4))
        >>> len(codes[0]) <= 6 and bool((codes[0] < 16).all())
        True
    """

    def __init__(
        self,
        vocab_size: int,
        condition_dim: int,
        n_embd: int = 256,
        n_layer: int = 2,
        n_head: int = 4,
        block_size: int = 2048,
        dropout: float = 0.0,
        speaker_dim: int | None = None,
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        if vocab_size < 5:
            raise ConfigError(f"vocab_size={vocab_size} must be codebook_size + 4 (pad, special, start, end) >= 5.")
        if n_embd % n_head:
            raise ConfigError(f"n_embd={n_embd} must be divisible by n_head={n_head}: e.g. n_head: 4 with n_embd: 256.")
        self.vocabulary = AcousticVocabulary(vocab_size - 4)
        self.pad_id = self.vocabulary.pad if pad_id is None else pad_id
        if not 0 <= self.pad_id < vocab_size or self.pad_id in (self.vocabulary.start, self.vocabulary.end):
            raise ConfigError(f"pad_id={pad_id} must lie in [0, {vocab_size}) and differ from start and end; omit it.")
        self.block_size = block_size
        self.speaker_dim = speaker_dim
        self.condition_proj = Adapter(condition_dim, n_embd)
        self.speaker_proj = None if speaker_dim is None else nn.Linear(speaker_dim, n_embd, bias=False)
        self.pos_condition = nn.Embedding(block_size, n_embd)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(_init_weights)
        for name, parameter in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * n_layer))
        self.wte.weight = self.head.weight

    def output_head(self) -> nn.Linear:
        """The output projection (tied with the token embedding), for ``token_loss(head=...)``."""
        return self.head

    # ---- training forward ----
    def forward(
        self, condition: Tensor, condition_mask: Tensor | None, input_ids: Tensor, speaker: Tensor | None = None
    ) -> Tensor:
        """Hidden states of the target positions.

        Args:
            condition: ``(B, C, condition_dim)`` LLM hidden states.
            condition_mask: ``(B, C)`` bool/0-1, ``True`` at real condition positions (``None``: all real).
            input_ids: ``(B, T)`` decoder inputs (``build_targets``' first output).
            speaker: ``(B, speaker_dim)`` speaker vectors, required iff ``speaker_dim`` was set.

        Returns:
            ``(B, T, n_embd)``, final-LayerNorm-ed; logits are ``hidden @ head.weight.T``.
        """
        prefix, keep = self._prefix(condition, condition_mask, speaker)
        length = input_ids.shape[1]
        if not 1 <= length <= self.block_size:
            raise DataError(f"input_ids has {length} positions: need 1 … block_size={self.block_size}.")
        x = torch.cat([prefix, self._embed(input_ids, 0)], dim=1)
        mask = self._full_mask(keep, length)
        for block in self.blocks:
            x, _ = block(x, mask)
        return self.ln_f(x[:, prefix.shape[1] :])

    def _prefix(
        self, condition: Tensor, condition_mask: Tensor | None, speaker: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        if condition.dim() != 3:
            raise DataError(f"condition must be (batch, length, condition_dim), got shape {tuple(condition.shape)}.")
        batch, length = condition.shape[:2]
        keep = torch.ones(batch, length, dtype=torch.bool, device=condition.device)
        if condition_mask is not None:
            if tuple(condition_mask.shape) != (batch, length):
                raise DataError(
                    f"condition_mask has shape {tuple(condition_mask.shape)}, expected {(batch, length)} like condition."
                )
            keep = condition_mask.bool()
        prefix = self.condition_proj(condition)
        if (speaker is None) != (self.speaker_proj is None):
            raise ConfigError(
                f"speaker_dim={self.speaker_dim} but speaker was {'not ' if speaker is None else ''}given: pass "
                "speaker=(batch, speaker_dim) vectors exactly when the model was built with speaker_dim."
            )
        if self.speaker_proj is not None:
            prefix = torch.cat([self.speaker_proj(speaker).unsqueeze(1), prefix], dim=1)
            keep = torch.cat([keep.new_ones(batch, 1), keep], dim=1)
        if prefix.shape[1] > self.block_size:
            raise DataError(f"the prefix has {prefix.shape[1]} positions, more than block_size={self.block_size}.")
        positions = torch.arange(prefix.shape[1], device=prefix.device)
        return prefix + self.pos_condition(positions), keep

    def _embed(self, input_ids: Tensor, offset: int) -> Tensor:
        positions = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(positions))

    def _full_mask(self, keep: Tensor, targets: int) -> Tensor:
        """Prefix-LM mask over ``[prefix, targets]``, padded prefix keys hidden, the diagonal always kept."""
        batch, prefix = keep.shape
        total = prefix + targets
        start = torch.full((batch,), prefix, device=keep.device)
        mask = _mask_from_bounds(start, torch.full_like(start, total - 1), total, prefix_lm=True)
        keys = torch.cat([keep, keep.new_ones(batch, targets)], dim=1)
        eye = torch.eye(total, dtype=torch.bool, device=keep.device)
        return (mask & keys.unsqueeze(1)) | eye

    # ---- generation ----
    @torch.no_grad()
    def generate(
        self,
        condition: Tensor,
        condition_mask: Tensor | None,
        max_new_tokens: int,
        top_p: float | None = 0.5,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        speaker: Tensor | None = None,
    ) -> list[Tensor]:
        """Sample codec ids after ``[start]`` until ``end`` (reference: top-p 0.5, at most 1200 tokens).

        Only codebook ids and ``end`` can be drawn (``pad`` and the other specials are masked out). A
        key/value cache makes each step cost one position.

        Args:
            condition: ``(B, C, condition_dim)`` LLM hidden states.
            condition_mask: ``(B, C)``, ``True`` at real positions (``None``: all real).
            max_new_tokens: most tokens drawn per item, ``end`` included (at most ``block_size``).
            top_p: nucleus mass kept (``None`` or ``1.0``: no filtering).
            temperature: softmax temperature; ``0`` takes the argmax.
            generator: random generator for the draws.
            speaker: ``(B, speaker_dim)`` speaker vectors when the model has ``speaker_dim``.

        Returns:
            One 1-D long tensor of codebook ids per item, ``end`` excluded.
        """
        self._check_sampling(max_new_tokens, top_p, temperature)
        prefix, keep = self._prefix(condition, condition_mask, speaker)
        batch = prefix.shape[0]
        tokens = torch.full((batch, 1), self.vocabulary.start, dtype=torch.long, device=prefix.device)
        x = torch.cat([prefix, self._embed(tokens, 0)], dim=1)
        hidden, cache = self._run(x, self._full_mask(keep, 1), None)
        keys = torch.cat([keep, keep.new_ones(batch, 1)], dim=1)
        drawn, finished = [], torch.zeros(batch, dtype=torch.bool, device=prefix.device)
        for step in range(max_new_tokens):
            logits = self.ln_f(hidden[:, -1]) @ self.head.weight.T
            token = self._sample(logits.float(), top_p, temperature, generator)
            token = torch.where(finished, self.vocabulary.end, token)
            drawn.append(token)
            finished |= token == self.vocabulary.end
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            keys = torch.cat([keys, keys.new_ones(batch, 1)], dim=1)
            hidden, cache = self._run(self._embed(token[:, None], step + 1), keys.unsqueeze(1), cache)
        return _until_end(torch.stack(drawn, dim=1), self.vocabulary.end)

    def _run(self, x: Tensor, mask: Tensor, cache: _KVCache | None) -> tuple[Tensor, _KVCache]:
        present = []
        for index, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if cache is None else cache[index])
            present.append(kv)
        return x, present

    def _sample(
        self, logits: Tensor, top_p: float | None, temperature: float, generator: torch.Generator | None
    ) -> Tensor:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[: self.vocabulary.codebook_size] = True
        allowed[self.vocabulary.end] = True
        allowed[self.pad_id] = False
        logits = logits.masked_fill(~allowed, float("-inf"))
        if temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_p is not None and top_p < 1.0:
            logits = _top_p_filter(logits, top_p)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    def _check_sampling(self, max_new_tokens: int, top_p: float | None, temperature: float) -> None:
        if not 1 <= max_new_tokens <= self.block_size:
            raise ConfigError(f"max_new_tokens={max_new_tokens} must lie in 1 … block_size={self.block_size}.")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p={top_p} must lie in (0, 1]: the reference uses 0.5.")
        if temperature < 0:
            raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy).")


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the most likely ids whose mass reaches ``top_p`` (the one crossing it included)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _until_end(drawn: Tensor, end: int) -> list[Tensor]:
    out = []
    for row in drawn:
        stops = (row == end).nonzero()
        out.append(row[: int(stops[0, 0])] if len(stops) else row)
    return out


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
