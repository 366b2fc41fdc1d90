r"""Attention of every token to a set of key positions (the prompt) at one decoder layer, recomputed on
demand from that layer's cached input: the shared attention probe of ssToken and of later methods.

Running the whole model with ``output_attentions=True`` forces eager attention in every layer and keeps
``L · H · T²`` probabilities. The probe instead records, with a forward pre-hook, what the chosen layer
(the last one by default) received during the training forward (its input hidden states and keyword
arguments: ``position_embeddings``, the attention mask the model built, ``position_ids``), and when asked
re-runs only that layer's query/key projections under ``no_grad``:

.. math::

    a_i = \frac{1}{H} \sum_h \sum_{j \in \mathrm{keys}} \operatorname{softmax}_j\!\Big(
        \frac{q^h_i \cdot k^h_j}{\sqrt{d}} + M_{ij}\Big)

with ``q``, ``k`` from ``input_layernorm(x)`` through ``q_proj``/``k_proj`` (and ``q_norm``/``k_norm``
where the layer has them, as Qwen3), rotary embeddings applied and grouped-query key heads repeated, and
``M`` the causal / padding / packed-sequence mask of the forward. Only the ``(B, T)`` result is kept: the
sum over the keys is the attention *output* for the values ``v_j = 1[j ∈ keys]``, so it runs through
``scaled_dot_product_attention`` (fused kernels on a GPU, no ``(H, T, T)`` probabilities), one batch row
and one chunk of queries at a time, in float32.

Which forward is recorded. Reference and history forwards (``adapter_disabled`` and ``ema`` modes) run
through the same layer *before* the training forward of the step, and under ``torch.no_grad()``. The
probe records only forwards run with gradients enabled (``record_without_grad=False``), and the training
forward is the last one anyway, so at ``compute`` time the cache holds the training forward's input.
The recomputation runs the projections in eval mode (no LoRA / attention dropout), so it is
deterministic and draws no random numbers: it is the attention of the current weights, not of the
dropout sample the training forward happened to draw.

Supported layers: Llama/Mistral/Qwen2/Qwen3-style decoder layers (``input_layernorm`` and ``self_attn``
with ``q_proj``, ``k_proj``, ``head_dim``, ``num_key_value_groups``, ``scaling``, rotary
``position_embeddings`` passed to the layer), with or without LoRA. Not supported: layers whose
parameters are sharded at call time (FSDP): the probe calls the projections outside the layer's forward.

Example::

    probe = AttentionProbe()
    probe.attach(causal_lm)                       # forward pre-hook on the last decoder layer
    hidden = causal_lm(**batch)                   # the training forward; the layer input is cached
    to_prompt = probe.attention_to(prompt_key_mask(batch["labels"], batch.get("attention_mask")))
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tokens.core.stats import IGNORE_INDEX

__all__ = ["AttentionProbe", "PromptKeys", "attention_mass", "prompt_key_mask", "segment_ids_from_positions"]

PromptKeys = Literal["first", "unlabelled"]


# ---- which keys are "the prompt" --------------------------------------------------------------------
def segment_ids_from_positions(position_ids: Tensor) -> Tensor:
    """``(B, T)`` segment index of each token of packed rows: a new segment wherever the position id
    does not increase by one (the rule transformers uses to detect packed sequences)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def prompt_key_mask(
    labels: Tensor,
    attention_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    mode: PromptKeys = "first",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """``(B, T)`` bool mask of the key positions counted as the prompt.

    Args:
        labels: ``(B, T)`` labels (a copy of the inputs, ``ignore_index`` where no loss is taken).
        attention_mask: ``(B, T)`` padding mask; padded positions are never prompt keys.
        segment_ids: ``(B, T)`` example index of each token in packed rows (``token_example_ids``, or
            :func:`segment_ids_from_positions`); each example has its own prompt.
        mode: ``first``: the unlabelled positions before the first labelled token of the row (of each
            packed example), i.e. the single prompt of a single-turn example, as the ssToken code's
            ``prompt_len``; ``unlabelled``: every unlabelled position (multi-turn chats: all earlier
            user/system turns count, causality keeps later ones out).
        ignore_index: label value of positions without a loss.

    Example:
        >>> prompt_key_mask(torch.tensor([[-100, -100, 5, 6, -100, 7]]))
        tensor([[ True,  True, False, False, False, False]])
    """
    if mode not in ("first", "unlabelled"):
        raise ValueError(f"prompt mode {mode!r} must be 'first' or 'unlabelled'.")
    labelled = labels != ignore_index
    valid = torch.ones_like(labelled) if attention_mask is None else attention_mask.bool()
    if mode == "unlabelled":
        return ~labelled & valid
    count = labelled.long().cumsum(-1) - labelled.long()  # labelled tokens strictly before t in the row
    if segment_ids is not None:
        starts = torch.ones_like(labelled)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        index = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
        start_of = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
        count = count - count.gather(-1, start_of)  # ... strictly before t in t's own segment
    return (count == 0) & ~labelled & valid


# ---- the arithmetic ---------------------------------------------------------------------------------
def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(attn: torch.nn.Module, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The model's own ``apply_rotary_pos_emb`` when its modeling module has one, else the standard one."""
    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn(q, k, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _projected(attn: torch.nn.Module, x: Tensor, proj: str, norm: str) -> Tensor:
    """``(B, heads, T, head_dim)`` projection, with the per-head norm of Qwen3-style layers."""
    head_dim = attn.head_dim
    out = getattr(attn, proj)(x).view(*x.shape[:-1], -1, head_dim)
    if getattr(attn, norm, None) is not None:
        out = getattr(attn, norm)(out)
    return out.transpose(1, 2)


def _segments(position_ids: Tensor | None, batch: int, length: int) -> Tensor | None:
    if position_ids is None:
        return None
    position_ids = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    segments = segment_ids_from_positions(position_ids)
    return None if bool((segments == segments[:, :1]).all()) else segments


@torch.no_grad()
def attention_mass(
    layer: torch.nn.Module,
    hidden_states: Tensor,
    key_mask: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    max_chunk_elements: int = 1 << 25,
) -> Tensor:
    """``(B, T)`` float32: for each query position, the head-averaged attention probability on the keys
    of ``key_mask``, at ``layer`` given its input.

    Args:
        layer: a decoder layer with ``input_layernorm`` and ``self_attn`` (Llama/Qwen style).
        hidden_states: ``(B, T, D)`` the layer's input (before ``input_layernorm``).
        key_mask: ``(B, T)`` bool, the keys whose probabilities are summed.
        position_embeddings: the ``(cos, sin)`` pair the layer received.
        attention_mask: the mask the layer received: a 4-D bool (``True`` = attend) or additive float mask
            ``(B or 1, 1, T, T)`` is used as is; ``None`` or a 2-D padding mask (flash attention) means
            causal attention, restricted to non-padded keys and, for flash-attention layers given no mask
            (packed rows), to the query's own sequence as its ``position_ids`` delimit it.
        position_ids: ``(B, T)`` positions (only read for flash-attention layers without a mask).
        max_chunk_elements: bound on the ``heads × queries × keys`` scores of one attention call (what
            the unfused CPU kernel forms at once).
    """
    attn = layer.self_attn
    for needed in ("q_proj", "k_proj", "head_dim"):
        if not hasattr(attn, needed):
            raise TypeError(
                f"AttentionProbe supports Llama/Qwen-style attention (q_proj, k_proj, head_dim); "
                f"{type(attn).__name__} has no `{needed}`."
            )
    batch, length = hidden_states.shape[:2]
    x = layer.input_layernorm(hidden_states)
    q = _projected(attn, x, "q_proj", "q_norm")
    k = _projected(attn, x, "k_proj", "k_norm")
    cos, sin = position_embeddings
    q, k = _apply_rotary(attn, q, k, cos, sin)
    heads = q.shape[1]
    groups = heads // k.shape[1]
    scaling = float(getattr(attn, "scaling", attn.head_dim**-0.5))
    weights = key_mask.to(device=q.device, dtype=torch.float32)

    mask4d = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4 else None
    padding = attention_mask.bool() if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
    # without a mask, only flash-attention kernels split packed rows by position_ids (sdpa/eager: plain causal)
    implementation = str(getattr(getattr(attn, "config", None), "_attn_implementation", "") or "")
    packed_by_positions = mask4d is None and padding is None and "flash" in implementation
    segments = _segments(position_ids, batch, length) if packed_by_positions else None
    positions = torch.arange(length, device=q.device)

    out = torch.zeros(batch, length, dtype=torch.float32, device=q.device)
    chunk = max(1, min(length, max_chunk_elements // max(1, heads * length)))
    # float32 throughout, also under autocast (the forward may have run in bf16-mixed)
    with torch.autocast(device_type=q.device.type, enabled=False):
        for b in range(batch):
            # one row at a time, key heads repeated for grouped-query attention. The attention mass on the
            # keys is the attention output for values v_j = [key_mask_j, 0, ...]: fused attention kernels
            # compute it without forming the (heads, T, T) probabilities.
            q_row = q[b : b + 1].float()
            k_row = k[b : b + 1].float()
            k_row = k_row.repeat_interleave(groups, dim=1) if groups > 1 else k_row
            v_row = torch.zeros_like(q_row)
            v_row[..., 0] = weights[b]
            for start in range(0, length, chunk):
                stop = min(start + chunk, length)
                if mask4d is not None:
                    mask = mask4d[b if mask4d.shape[0] > 1 else 0, 0, start:stop].to(q.device)
                    mask = mask if mask.dtype == torch.bool else mask.float()
                else:
                    mask = positions[None, :] <= positions[start:stop, None]
                    if padding is not None:
                        mask = mask & padding[b].to(q.device)[None, :]
                    if segments is not None:
                        seg = segments[b].to(q.device)
                        mask = mask & (seg[None, :] == seg[start:stop, None])
                mass = F.scaled_dot_product_attention(
                    q_row[:, :, start:stop], k_row, v_row, attn_mask=mask[None, None], scale=scaling
                )
                # a query with no visible key (left padding) gets 0, not NaN
                out[b, start:stop] = mass[0, :, :, 0].nan_to_num(0.0).mean(0)
    return out


# ---- the hook ---------------------------------------------------------------------------------------
@dataclass
class _LayerInput:
    hidden_states: Tensor
    position_embeddings: tuple[Tensor, Tensor] | None
    attention_mask: Tensor | None
    position_ids: Tensor | None


class AttentionProbe:
    """Caches one decoder layer's input during forwards and recomputes its attention to given keys.

    Args:
        layer_index: which entry of ``causal_lm.get_decoder().layers`` to probe (``-1``: the last layer,
            as the ssToken code).
        record_without_grad: also record forwards run under ``torch.no_grad()`` (reference / history
            forwards). ``False`` (default) keeps the training forward's input even if a reference forward
            ran after it.
        max_chunk_elements: bound on the ``heads × queries × keys`` probabilities formed at once.

    Attributes:
        records: number of forwards recorded since :meth:`attach` (for diagnostics and tests).

    Example::

        probe = AttentionProbe()
        probe.attach(causal_lm)
        ...                                             # a forward with gradients enabled
        to_prompt = probe.attention_to(key_mask)        # (B, T) float32
        probe.detach()
    """

    def __init__(self, layer_index: int = -1, record_without_grad: bool = False, max_chunk_elements: int = 1 << 25) -> None:
        self.layer_index = layer_index
        self.record_without_grad = record_without_grad
        self.max_chunk_elements = max_chunk_elements
        self.layer: torch.nn.Module | None = None
        self.records = 0
        self._handle: Any = None
        self._input: _LayerInput | None = None

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self, causal_lm: torch.nn.Module) -> None:
        """Register the forward pre-hook on ``causal_lm.get_decoder().layers[layer_index]``."""
        self.detach()
        decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise TypeError(
                f"AttentionProbe needs a Hugging Face decoder-only model with `get_decoder().layers`; "
                f"got {type(causal_lm).__name__}."
            )
        layer = layers[self.layer_index]
        if not hasattr(layer, "input_layernorm") or not hasattr(layer, "self_attn"):
            raise TypeError(
                f"AttentionProbe supports Llama/Qwen-style decoder layers (input_layernorm, self_attn); "
                f"got {type(layer).__name__}."
            )
        self.layer = layer
        self.records = 0
        self._handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hook and drop the cached input."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self.layer = None
        self._input = None

    def clear(self) -> None:
        """Drop the cached input (it holds ``(B, T, D)`` hidden states)."""
        self._input = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not (self.record_without_grad or torch.is_grad_enabled()):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return
        self._input = _LayerInput(
            hidden_states=hidden.detach(),
            position_embeddings=kwargs.get("position_embeddings"),
            attention_mask=kwargs.get("attention_mask", args[1] if len(args) > 1 else None),
            position_ids=kwargs.get("position_ids", args[2] if len(args) > 2 else None),
        )
        self.records += 1

    @torch.no_grad()
    def attention_to(self, key_mask: Tensor) -> Tensor:
        """``(B, T)`` float32 head-averaged attention of each query position to the keys of ``key_mask``,
        from the last recorded forward."""
        if self.layer is None:
            raise RuntimeError("AttentionProbe is not attached: call attach(causal_lm) before the forward.")
        cached = self._input
        if cached is None:
            raise RuntimeError(
                "AttentionProbe has no recorded forward: the probed layer has not run with gradients enabled "
                "since the probe was attached."
            )
        if tuple(cached.hidden_states.shape[:2]) != tuple(key_mask.shape):
            raise ValueError(
                f"the recorded forward had shape {tuple(cached.hidden_states.shape[:2])} but the key mask has "
                f"{tuple(key_mask.shape)}: the probe must be read after the forward of the same batch."
            )
        if cached.position_embeddings is None:
            raise TypeError(
                f"{type(self.layer).__name__} received no `position_embeddings`: the probe supports layers that "
                "get rotary (cos, sin) from the model, as Llama/Qwen layers do."
            )
        modules = [*self.layer.input_layernorm.modules(), *self.layer.self_attn.modules()]
        modes = [m.training for m in modules]
        for m in modules:  # deterministic: no LoRA / attention dropout in the recomputation
            m.training = False
        try:
            return attention_mass(
                self.layer,
                cached.hidden_states,
                key_mask,
                cached.position_embeddings,
                cached.attention_mask,
                cached.position_ids,
                self.max_chunk_elements,
            )
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
