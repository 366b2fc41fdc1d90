r"""Attention of every token to a set of key positions (the prompt) at one decoder layer: the shared
attention probe of ssToken and of later methods.

Running the whole model with ``output_attentions=True`` forces eager attention in every layer and keeps
``L · H · T²`` probabilities. The probe instead computes, in a forward pre-hook on the chosen layer (the
last one by default), that layer's queries and keys from the input it receives during the training
forward, and when asked turns them into

.. math::

    a_i = \frac{1}{H} \sum_h \sum_{j \in \mathrm{keys}} \operatorname{softmax}_j\!\Big(
        \frac{q^h_i \cdot k^h_j}{\sqrt{d}} + M_{ij}\Big)

with ``q``, ``k`` from ``input_layernorm(x)`` through ``q_proj``/``k_proj`` (and ``q_norm``/``k_norm``
where the layer has them, as Qwen3), rotary embeddings applied and grouped-query key heads repeated, and
``M`` the causal / padding / packed-sequence mask of the forward (the attention mask the model built, or
``position_ids`` for flash-attention layers given none). Only the ``(B, T)`` result is kept: the sum over
the keys is the attention *output* for the values ``v_j = 1[j ∈ keys]``, so it runs through
``scaled_dot_product_attention`` (fused kernels on a GPU, no ``(H, T, T)`` probabilities), one batch row
and one chunk of queries at a time, in float32.

What the hook computes, and when. The queries and keys are computed inside the pre-hook, under
``no_grad`` and in eval mode (no LoRA / attention dropout), because that is the one moment the layer's
parameters are guaranteed to be usable: under FSDP they are sharded outside the layer's forward. FSDP2
(``fully_shard``, Lightning's ``ModelParallelStrategy``) all-gathers them in a pre-forward hook registered
with ``prepend=True``, so before the probe's hook; FSDP1 (Lightning's ``FSDPStrategy`` with the decoder
layers auto-wrapped) unshards in the wrapper's ``forward``, so :meth:`AttentionProbe.attach` hooks the
module inside the wrapper (and inside activation-checkpoint, ``torch.compile`` and peft
``modules_to_save`` wrappers): the decoder layer itself. The cache holds ``q`` (``B × H × T × d``, the
size of the layer input) and ``k`` (``B × H_kv × T × d``) in the dtype the layer computes them in, and
the mask; :meth:`AttentionProbe.attention_to` does only the attention arithmetic. The recomputation is
deterministic and draws no random numbers: it is the attention of the current weights, not of the
dropout sample the training forward happened to draw. The same split is available as functions:
:func:`attention_queries_keys` (needs the layer's parameters) and :func:`attention_mass_from_qk`
(needs none); :func:`attention_mass` composes them.

Which forward is recorded. Reference and history forwards (``adapter_disabled`` and ``ema`` modes) run
through the same layer *before* the training forward of the step, and under ``torch.no_grad()``. The
probe records only forwards run with gradients enabled (``record_without_grad=False``), and the training
forward is the last one anyway, so at ``compute`` time the cache holds the training forward's queries
and keys. With activation checkpointing the backward re-runs the layer, with gradients enabled, which
records the same input again (and, as FSDP2 unshards for the recomputation, works under it too).

Supported layers: Llama/Mistral/Qwen2/Qwen3-style decoder layers (``input_layernorm`` and ``self_attn``
with ``q_proj``, ``k_proj``, ``head_dim``, ``num_key_value_groups``, ``scaling``, rotary
``position_embeddings`` passed to the layer), with or without LoRA, unsharded or under FSDP1/FSDP2.

Example::

    probe = AttentionProbe()
    probe.attach(causal_lm)                       # forward pre-hook on the last decoder layer
    hidden = causal_lm(**batch)                   # the training forward; the layer's q and k are cached
    to_prompt = probe.attention_to(prompt_key_mask(batch["labels"], batch.get("attention_mask")))
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.stats import IGNORE_INDEX

__all__ = [
    "AttentionProbe",
    "PromptKeys",
    "attention_mass",
    "attention_mass_from_qk",
    "attention_queries_keys",
    "prompt_key_mask",
    "segment_ids_from_positions",
]

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
        raise ConfigError(f"prompt mode {mode!r} must be 'first' or 'unlabelled'.")
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


def _attention_of(layer: torch.nn.Module) -> torch.nn.Module:
    """The layer's ``self_attn``, checked for what the probe reads."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not hasattr(layer, "input_layernorm"):
        raise TypeError(
            f"AttentionProbe supports Llama/Qwen-style decoder layers (input_layernorm, self_attn); "
            f"got {type(layer).__name__}."
        )
    for needed in ("q_proj", "k_proj", "head_dim"):
        if not hasattr(attn, needed):
            raise TypeError(
                f"AttentionProbe supports Llama/Qwen-style attention (q_proj, k_proj, head_dim); "
                f"{type(attn).__name__} has no `{needed}`."
            )
    return attn


def _scaling(attn: torch.nn.Module) -> float:
    return float(getattr(attn, "scaling", attn.head_dim**-0.5))


def _splits_by_positions(attn: torch.nn.Module) -> bool:
    """Whether the layer's kernel, given no mask, keeps packed sequences apart by ``position_ids``: only
    flash-attention kernels do (sdpa / eager attend causally across the whole row)."""
    implementation = str(getattr(getattr(attn, "config", None), "_attn_implementation", "") or "")
    return "flash" in implementation


@torch.no_grad()
def attention_queries_keys(
    layer: torch.nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """The rotary-embedded queries and keys ``layer`` computes from its input: the part of the probe that
    needs the layer's parameters (call it where they are unsharded, e.g. inside the layer's forward).

    The modules run in whatever mode they are in: put the layer in eval mode for a computation without
    dropout (:class:`AttentionProbe` does).

    Args:
        layer: a decoder layer with ``input_layernorm`` and ``self_attn`` (Llama/Qwen style).
        hidden_states: ``(B, T, D)`` the layer's input (before ``input_layernorm``).
        position_embeddings: the ``(cos, sin)`` pair the layer received.

    Returns:
        ``(B, H, T, d)`` queries and ``(B, H_kv, T, d)`` keys (key heads not repeated), in the dtype the
        layer computes them in.
    """
    attn = _attention_of(layer)
    x = layer.input_layernorm(hidden_states)
    q = _projected(attn, x, "q_proj", "q_norm")
    k = _projected(attn, x, "k_proj", "k_norm")
    cos, sin = position_embeddings
    return _apply_rotary(attn, q, k, cos, sin)


@torch.no_grad()
def attention_mass_from_qk(
    queries: Tensor,
    keys: Tensor,
    key_mask: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    scaling: float | None = None,
    split_by_positions: bool = False,
    max_chunk_elements: int = 1 << 25,
) -> Tensor:
    """``(B, T)`` float32: for each query position, the head-averaged attention probability on the keys
    of ``key_mask``, from the layer's queries and keys (no parameters involved).

    Args:
        queries: ``(B, H, T, d)`` rotary-embedded queries (:func:`attention_queries_keys`).
        keys: ``(B, H_kv, T, d)`` rotary-embedded keys, ``H`` a multiple of ``H_kv`` (grouped-query
            attention: each key head serves ``H / H_kv`` consecutive query heads).
        key_mask: ``(B, T)`` bool, the keys whose probabilities are summed.
        attention_mask: the mask the layer received: a 4-D bool (``True`` = attend) or additive float mask
            ``(B or 1, 1, T, T)`` is used as is; ``None`` or a 2-D padding mask (flash attention) means
            causal attention, restricted to non-padded keys and, with ``split_by_positions`` and no mask
            (packed rows), to the query's own sequence as its ``position_ids`` delimit it.
        position_ids: ``(B, T)`` positions (only read with ``split_by_positions`` and no mask).
        scaling: the factor of the scores, ``d ** -0.5`` if ``None``.
        split_by_positions: the layer's kernel separates packed sequences by ``position_ids`` when it
            gets no mask, as flash-attention kernels do.
        max_chunk_elements: bound on the ``heads × queries × keys`` scores of one attention call (what
            the unfused CPU kernel forms at once).
    """
    q, k = queries, keys
    batch, heads, length = q.shape[:3]
    groups = heads // k.shape[1]
    scaling = float(q.shape[-1] ** -0.5 if scaling is None else scaling)
    weights = key_mask.to(device=q.device, dtype=torch.float32)

    mask4d = attention_mask if isinstance(attention_mask, Tensor) and attention_mask.dim() == 4 else None
    padding = attention_mask.bool() if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 else None
    packed_by_positions = mask4d is None and padding is None and split_by_positions
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
    of ``key_mask``, at ``layer`` given its input: :func:`attention_queries_keys` then
    :func:`attention_mass_from_qk`. The layer's parameters must be usable (not sharded).

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
    q, k = attention_queries_keys(layer, hidden_states, position_embeddings)
    attn = layer.self_attn
    return attention_mass_from_qk(
        q, k, key_mask, attention_mask, position_ids, _scaling(attn), _splits_by_positions(attn), max_chunk_elements
    )


# ---- the hook ---------------------------------------------------------------------------------------
# attributes under which wrappers keep the module they wrap: FSDP1, activation checkpointing (and
# offloading), torch.compile
_WRAPPED_MODULE = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _inner_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose forward receives the decoder layer's input with its parameters usable: through
    wrappers down to the layer itself; for a peft ``modules_to_save`` copy of the layer, every adapter's
    copy and the original (whichever runs), the one that runs now first."""
    # `_modules`, not getattr: FSDP1 and peft wrappers forward unknown attributes to what they wrap
    children = module._modules
    for name in _WRAPPED_MODULE:
        if isinstance(children.get(name), torch.nn.Module):
            return _inner_layers(children[name])
    original, copies = children.get("original_module"), children.get("modules_to_save")
    if isinstance(original, torch.nn.Module) and isinstance(copies, torch.nn.ModuleDict):
        active = [] if getattr(module, "disable_adapters", False) else list(getattr(module, "active_adapters", []))
        order = [copies[name] for name in active if name in copies]
        order += [m for m in (original, *copies.values()) if all(m is not o for o in order)]
        return [layer for inner in order for layer in _inner_layers(inner)]
    return [module]


class _EvalMode:
    """Puts the modules the probe runs in eval mode (no LoRA / attention dropout), then restores them."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.modules = [*layer.input_layernorm.modules(), *layer.self_attn.modules()]
        self.modes: list[bool] = []

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.training = False

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.modules, self.modes):
            m.training = mode


@dataclass
class _LayerQK:
    """What the probe keeps of one recorded forward."""

    shape: tuple[int, int]
    queries: Tensor | None  # None: the layer received no rotary `position_embeddings`
    keys: Tensor | None
    attention_mask: Tensor | None
    position_ids: Tensor | None
    scaling: float
    split_by_positions: bool


class AttentionProbe:
    """Computes one decoder layer's queries and keys during forwards and their attention to given keys.

    Args:
        layer_index: which entry of ``causal_lm.get_decoder().layers`` to probe (``-1``: the last layer,
            as the ssToken code).
        record_without_grad: also record forwards run under ``torch.no_grad()`` (reference / history
            forwards). ``False`` (default) keeps the training forward's queries and keys even if a
            reference forward ran after it.
        max_chunk_elements: bound on the ``heads × queries × keys`` probabilities formed at once.

    Attributes:
        layer: the hooked decoder layer (inside any FSDP1 / checkpoint / compile wrapper), ``None`` when
            not attached.
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
        self._handles: list[Any] = []
        self._input: _LayerQK | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, causal_lm: torch.nn.Module) -> None:
        """Register the forward pre-hook on ``causal_lm.get_decoder().layers[layer_index]``, or on the
        decoder layer inside it when that entry is a wrapper (FSDP1, activation checkpointing,
        ``torch.compile``, peft ``modules_to_save``)."""
        self.detach()
        decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise TypeError(
                f"AttentionProbe needs a Hugging Face decoder-only model with `get_decoder().layers`; "
                f"got {type(causal_lm).__name__}."
            )
        inner = _inner_layers(layers[self.layer_index])
        for layer in inner:
            _attention_of(layer)
        self.layer = inner[0]
        self.records = 0
        self._handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in inner]

    def detach(self) -> None:
        """Remove the hook and drop the cached queries and keys."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.layer = None
        self._input = None

    def clear(self) -> None:
        """Drop the cached queries and keys (``(B, H + H_kv, T, d)`` elements)."""
        self._input = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # Runs after FSDP's pre-forward hook (FSDP2: prepended; FSDP1: the unshard happens in the wrapper's
        # forward, around this module): the parameters are unsharded here and only here.
        if not (self.record_without_grad or torch.is_grad_enabled()):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            return
        self._input = None  # not two recordings alive at once
        position_embeddings = kwargs.get("position_embeddings")
        queries = keys = None
        if position_embeddings is not None:
            with torch.no_grad(), _EvalMode(module):
                queries, keys = attention_queries_keys(module, hidden, position_embeddings)
        self._input = _LayerQK(
            shape=(hidden.shape[0], hidden.shape[1]),
            queries=queries,
            keys=keys,
            attention_mask=kwargs.get("attention_mask", args[1] if len(args) > 1 else None),
            position_ids=kwargs.get("position_ids", args[2] if len(args) > 2 else None),
            scaling=_scaling(module.self_attn),
            split_by_positions=_splits_by_positions(module.self_attn),
        )
        self.records += 1

    @torch.no_grad()
    def attention_to(self, key_mask: Tensor) -> Tensor:
        """``(B, T)`` float32 head-averaged attention of each query position to the keys of ``key_mask``,
        from the last recorded forward. Uses no parameters: works while FSDP has them sharded."""
        if self.layer is None:
            raise RuntimeError("AttentionProbe is not attached: call attach(causal_lm) before the forward.")
        cached = self._input
        if cached is None:
            raise RuntimeError(
                "AttentionProbe has no recorded forward: the probed layer has not run with gradients enabled "
                "since the probe was attached."
            )
        if cached.shape != tuple(key_mask.shape):
            raise ConfigError(
                f"the recorded forward had shape {cached.shape} but the key mask has "
                f"{tuple(key_mask.shape)}: the probe must be read after the forward of the same batch."
            )
        if cached.queries is None or cached.keys is None:
            raise TypeError(
                f"{type(self.layer).__name__} received no `position_embeddings`: the probe supports layers that "
                "get rotary (cos, sin) from the model, as Llama/Qwen layers do."
            )
        return attention_mass_from_qk(
            cached.queries,
            cached.keys,
            key_mask,
            cached.attention_mask,
            cached.position_ids,
            cached.scaling,
            cached.split_by_positions,
            self.max_chunk_elements,
        )
