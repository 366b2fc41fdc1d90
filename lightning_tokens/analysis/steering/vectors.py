r"""GrAInS steering vectors (arXiv 2507.18043): from attributions to one direction per decoder layer.

For each example (prompt, preferred r⁺, dispreferred r⁻) and each selection ``pos`` / ``neg``:

1. contrastive token attributions (:func:`~lightning_tokens.analysis.steering.attribution.contrastive_token_attributions`);
2. the top-``k`` tokens of each sequence by the selection are replaced by the pad token;
3. the last token's hidden state after every decoder block is taken for ``r⁺``, ``r⁻``, ``r⁺`` ablated and
   ``r⁻`` ablated, and the differences ``h(r⁺) − h(r⁺_abl)``, ``h(r⁻) − h(r⁻_abl)`` kept.

Over all examples (``2N`` differences per layer) the direction is the first principal component of the
differences (centred, as ``sklearn.decomposition.PCA``) or their mean; a principal component's sign is
arbitrary, so it is oriented to ``mean(diffs)·v > 0`` (``orientation="svd_flip"`` reproduces sklearn's
rule instead: the largest-magnitude coordinate positive). The ``both`` mode steers with
``v_pos − v_neg``.

Reference: ``duykhuongnguyen/GrAInS@8ad78db`` ``src/token_ablation.py`` (``run_token_ablation_contrastive``),
``src/utils/model.py`` (``get_all_layer_hidden_states``: ``output_hidden_states`` index ``layer + 1``),
``src/utils/steering.py`` (``compute_steering_vector``), ``src/steering_mc.py`` (``both`` = pos − neg).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_tokens.analysis.steering.attribution import (
    Attribution,
    EmbedsForward,
    QuadratureMethod,
    Selection,
    Target,
    ablate,
    contrastive_token_attributions,
    target_log_prob,
    top_token_indices,
)
from lightning_tokens.analysis.steering.hook import SCALE, layer_index
from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.core.options import check_choice

__all__ = [
    "GrainsSettings",
    "SteeringExample",
    "SteeringVectors",
    "build_steering_vectors",
    "causal_lm_forward",
    "example_diffs",
    "last_token_hidden_states",
    "module_forward",
    "preference_margins",
    "spliced_forward",
    "steering_direction",
    "vision_example",
]

Mode = Literal["pos", "neg", "both"]
VectorMethod = Literal["pca", "mean"]
Orientation = Literal["mean", "svd_flip"]
HiddenSource = Literal["output_hidden_states", "block_output"]
Positions = Literal["all", "prompt"]

VECTORS_FILE = "vectors.pt"
METADATA_FILE = "metadata.json"


@dataclass
class GrainsSettings:
    """How GrAInS builds and applies its vectors (defaults: the paper / reference unless noted).

    Attributes:
        top_k: tokens ablated per sequence (10).
        selections: which token sets to ablate: ``pos`` (most positive attributions) and ``neg`` (most
            negative); ``both`` needs the two.
        attribution: ``integrated_gradients`` or ``gradient_x_input`` (the reference's "vanilla").
        steps: IG steps (20).
        ig_method: IG quadrature, captum's default ``gausslegendre`` (the reference's call).
        ig_batch_size: IG steps per forward (``None``: all 20 at once).
        target: ``last`` = log p(last answer token | prefix) (the paper, our default) or ``repeat``
            (the reference code: the logits after the last token, scoring that token again).
        positions: tokens that may be ablated: ``all`` (the reference, prompt and answer) or ``prompt``.
        hidden_source: ``output_hidden_states`` (the reference: entry ``layer + 1``, which for the last
            layer is after the final norm) or ``block_output`` (the decoder block's own output, where the
            hook steers, for every layer).
        orientation: sign of a principal component: ``mean`` (``mean(diffs)·v > 0``) or ``svd_flip``
            (sklearn's, the reference's implicit choice).
        ablation_token_id: the replacement token (``None``: the tokenizer's pad, else unk, else eos; the
            reference sets pad = eos for Llama).
        template: prompt template (the reference's ``"Q: {prompt}\\nA:"``).
        separator: between prompt and answer (``" "``).
        layer: default decoder block to steer (negative from the end; the reference: the last).
        alpha: default strength (4.0).
        mode: default vector: ``pos``, ``neg`` or ``both`` (``v_pos − v_neg``).
        method: default direction: ``pca`` (the reference's default) or ``mean``.
        norm_dim: renormalisation axis: ``-1`` per token (default), ``1`` the reference's sequence axis,
            ``None`` none.
        scale: the constant in ``h + scale·α·v`` (10).
    """

    top_k: int = 10
    selections: list[Selection] = field(default_factory=lambda: ["pos", "neg"])
    attribution: Attribution = "integrated_gradients"
    steps: int = 20
    ig_method: QuadratureMethod = "gausslegendre"
    ig_batch_size: int | None = None
    target: Target = "last"
    positions: Positions = "all"
    hidden_source: HiddenSource = "output_hidden_states"
    orientation: Orientation = "mean"
    ablation_token_id: int | None = None
    template: str = "Q: {prompt}\nA:"
    separator: str = " "
    layer: int = -1
    alpha: float = 4.0
    mode: Mode = "both"
    method: VectorMethod = "pca"
    norm_dim: int | None = -1
    scale: float = SCALE

    def validate(self) -> None:
        owner = "GrainsSettings"
        if self.top_k < 1:
            raise ConfigError(f"{owner}(top_k={self.top_k}): top_k must be >= 1 (GrAInS: 10).")
        for s in self.selections:
            check_choice(owner, "selections", s, ("pos", "neg", "abs"))
        if self.mode == "both" and not {"pos", "neg"} <= set(self.selections):
            raise ConfigError(f"{owner}(mode='both') needs selections [pos, neg]; got {self.selections}.")
        if self.mode in ("pos", "neg") and self.mode not in self.selections:
            raise ConfigError(f"{owner}(mode={self.mode!r}) needs {self.mode!r} in selections; got {self.selections}.")
        check_choice(owner, "attribution", self.attribution, ("integrated_gradients", "gradient_x_input"))
        check_choice(owner, "target", self.target, ("last", "repeat"))
        check_choice(owner, "positions", self.positions, ("all", "prompt"))
        check_choice(owner, "hidden_source", self.hidden_source, ("output_hidden_states", "block_output"))
        check_choice(owner, "orientation", self.orientation, ("mean", "svd_flip"))
        check_choice(owner, "mode", self.mode, ("pos", "neg", "both"))
        check_choice(owner, "method", self.method, ("pca", "mean"))
        if self.norm_dim not in (-1, 1, None):
            raise ConfigError(f"{owner}(norm_dim={self.norm_dim}): norm_dim must be -1 (per token), 1 (the reference) or null.")
        if self.steps < 1:
            raise ConfigError(f"{owner}(steps={self.steps}): steps must be >= 1 (GrAInS: 20).")


@dataclass
class SteeringExample:
    """One (prompt, r⁺, r⁻) example, tokenized.

    Attributes:
        pos_ids: ``(1, T⁺)`` ids of prompt + separator + preferred answer.
        neg_ids: ``(1, T⁻)`` ids of prompt + separator + dispreferred answer.
        prompt_length: tokens of the prompt (for ``positions="prompt"``); ``None``: not known.
        pos_extra, neg_extra: further inputs of ``forward_fn`` with a batch of 1 (``pixel_values``,
            ``image_grid_thw``, ``attention_mask``...): they pass through unchanged.
        pos_fixed, neg_fixed: ``(T±,)`` bool positions never interpolated nor ablated (image placeholders).
    """

    pos_ids: Tensor
    neg_ids: Tensor
    prompt_length: int | None = None
    pos_extra: dict[str, Any] = field(default_factory=dict)
    neg_extra: dict[str, Any] = field(default_factory=dict)
    pos_fixed: Tensor | None = None
    neg_fixed: Tensor | None = None

    @classmethod
    def from_text(cls, tokenizer: Any, prompt: str, preferred: str, dispreferred: str, template: str = "Q: {prompt}\nA:", separator: str = " ") -> SteeringExample:
        """Tokenize as the reference: ``tokenizer(template.format(prompt=...) + separator + answer)``."""
        text = template.format(prompt=prompt)
        pos = tokenizer(text + separator + preferred)["input_ids"]
        neg = tokenizer(text + separator + dispreferred)["input_ids"]
        prompt_ids = tokenizer(text)["input_ids"]
        shared = 0
        for a, b in zip(prompt_ids, pos):  # the prompt's tokens that survive joining with the answer
            if a != b:
                break
            shared += 1
        return cls(torch.tensor([pos]), torch.tensor([neg]), prompt_length=shared)

    def to(self, device: torch.device | str) -> SteeringExample:
        """A copy with every tensor (ids, extras) on ``device``."""
        move = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        return SteeringExample(
            move(self.pos_ids), move(self.neg_ids), self.prompt_length,
            {k: move(v) for k, v in self.pos_extra.items()}, {k: move(v) for k, v in self.neg_extra.items()},
            self.pos_fixed, self.neg_fixed,
        )


def causal_lm_forward(model: nn.Module) -> EmbedsForward:
    """The :data:`EmbedsForward` of a Hugging Face causal LM: ``model(inputs_embeds=..., use_cache=False)``
    (``input_ids`` is not passed: the embeddings carry the text)."""

    def forward(inputs_embeds: Tensor, input_ids: Tensor | None = None, output_hidden_states: bool = False, logits_to_keep: int = 0, **extra: Any) -> Any:
        return model(inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep, use_cache=False, **extra)

    return forward


def spliced_forward(module: nn.Module) -> EmbedsForward:
    """The :data:`EmbedsForward` of a GVT-composition vision-language module
    (:class:`~lightning_tokens.modules.vision_language.VisionLanguageLM` with a causal LM): its visual tokens
    of ``pixel_values`` replace the embeddings at the placeholders of ``input_ids``, then the causal LM runs
    on the embeddings. Unlike the reference's VLM path (``model(inputs_embeds=...)`` without the image),
    the image takes part in every forward."""
    from lightning_tokens.modules.visual_inputs import splice_visual_tokens

    lm = module.causal_lm

    def forward(inputs_embeds: Tensor, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                output_hidden_states: bool = False, logits_to_keep: int = 0, **extra: Any) -> Any:
        if pixel_values is not None:
            visual = module.visual_tokens(pixel_values).to(inputs_embeds.dtype)
            inputs_embeds = splice_visual_tokens(inputs_embeds, input_ids, module.processor.placeholder_id, visual)
        return lm(inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep, use_cache=False, **extra)

    return forward


def _is_spliced_vlm(module: nn.Module) -> bool:
    return callable(getattr(module, "visual_tokens", None)) and not getattr(module, "is_hf_vision_language_model", True)


def module_forward(module: nn.Module) -> tuple[EmbedsForward, nn.Module, nn.Module]:
    """``(forward_fn, input embedding, model whose decoder layers are steered)`` of a LightningModule.

    In order: the module's own ``forward_embeds`` if it has one; :func:`spliced_forward` for a
    GVT-composition vision-language module; otherwise its ``causal_lm`` (``TokenLM``; a Hugging Face
    vision-language model, which takes ``pixel_values`` and finds its image tokens in the embeddings, as
    long as the placeholder positions stay fixed), or the module itself if it is a Hugging Face model.
    """
    model = getattr(module, "causal_lm", module)
    own = getattr(module, "forward_embeds", None)
    if callable(own):
        forward_fn = own
    elif _is_spliced_vlm(module):
        forward_fn = spliced_forward(module)
    else:
        forward_fn = causal_lm_forward(model)
    embed = model.get_input_embeddings()
    return forward_fn, embed, model


def vision_example(module: nn.Module, image: Any, question: str, preferred: str, dispreferred: str, separator: str = "") -> SteeringExample:
    """A :class:`SteeringExample` with an image, built by a vision-language module's ``processor``
    (``VisionLanguageLM``): each sequence is the processor's prompt + answer without the closing eos, the
    image inputs (``pixel_values``, ``image_grid_thw``...) ride along as extras, and the image placeholder
    positions are fixed (never interpolated nor ablated).

    Example:
        >>> ex = vision_example(vlm, Image.open("cat.png"), "What animal is this?", "a cat", "a dog")  # doctest: +SKIP
        >>> vectors = build_steering_vectors(*module_forward(vlm)[:2], [ex], vlm.tokenizer.pad_token_id)  # doctest: +SKIP
    """
    processor = module.processor
    placeholder = getattr(processor, "placeholder_id", None)
    if placeholder is None:
        config = getattr(getattr(module, "causal_lm", None), "config", None)
        placeholder = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    rows = []
    for answer in (preferred, dispreferred):
        batch = processor([image], [question], [separator + answer])
        labelled = (batch["labels"][0] != -100).nonzero().flatten()
        end = int(labelled[-1]) + 1
        if getattr(processor.tokenizer, "eos_token_id", None) is not None and int(batch["input_ids"][0, end - 1]) == processor.tokenizer.eos_token_id:
            end -= 1  # the answer's last token, not the closing eos
        ids = batch["input_ids"][:, :end]
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels") and not k.startswith("prompt_")}
        if "mm_token_type_ids" in extra:
            extra["mm_token_type_ids"] = extra["mm_token_type_ids"][:, :end]
        rope = getattr(getattr(getattr(module, "causal_lm", None), "model", None), "get_rope_index", None)
        if callable(rope) and "mm_token_type_ids" in extra:
            # M-RoPE (Qwen2-VL) positions come from the ids, which a forward on embeddings lacks: fix them here
            # (ablation never moves an image token, so they hold for the ablated sequences too)
            keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw")
            extra["position_ids"] = rope(ids, **{k: extra[k] for k in keys if k in extra})[0]
        fixed = ids[0] == placeholder if placeholder is not None else torch.zeros(end, dtype=torch.bool)
        rows.append((ids, extra, fixed, int(labelled[0])))
    (pos_ids, pos_extra, pos_fixed, prompt_length), (neg_ids, neg_extra, neg_fixed, _) = rows
    return SteeringExample(pos_ids, neg_ids, prompt_length, pos_extra, neg_extra, pos_fixed, neg_fixed)


def last_token_hidden_states(
    forward_fn: EmbedsForward,
    embed: nn.Module,
    ids: Tensor,
    extra: Mapping[str, Any] | None = None,
    hidden_source: HiddenSource = "output_hidden_states",
    layers: Sequence[nn.Module] | None = None,
) -> Tensor:
    """``(num_layers, D)`` hidden state of the last token after every decoder block.

    ``output_hidden_states``: entries ``1..L`` of the model's ``hidden_states`` (the reference; the last
    entry is after the final norm in Hugging Face models). ``block_output``: forward hooks on ``layers``.
    """
    with torch.no_grad():
        embeds = embed(ids)
        if hidden_source == "output_hidden_states":
            out = forward_fn(inputs_embeds=embeds, input_ids=ids, output_hidden_states=True, logits_to_keep=1, **(extra or {}))
            return torch.stack([h[0, -1] for h in out.hidden_states[1:]]).float()
        if layers is None:
            raise ConfigError("hidden_source='block_output' needs the model's decoder layers.")
        captured: list[Tensor] = []

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output if isinstance(output, Tensor) else output[0]
            captured.append(hidden[0, -1].float())

        handles = [layer.register_forward_hook(grab) for layer in layers]
        try:
            forward_fn(inputs_embeds=embeds, input_ids=ids, logits_to_keep=1, **(extra or {}))
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(captured)


def _ablation_token(tokenizer: Any, override: int | None) -> int:
    if override is not None:
        return int(override)
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("the tokenizer has no pad, unk or eos token: set ablation_token_id.")


def example_diffs(
    forward_fn: EmbedsForward,
    embed: nn.Module,
    example: SteeringExample,
    ablation_token_id: int,
    settings: GrainsSettings,
    layers: Sequence[nn.Module] | None = None,
) -> dict[str, Tensor]:
    """For one example, per selection: ``(2, num_layers, D)`` = ``[h(r⁺) − h(r⁺_abl), h(r⁻) − h(r⁻_abl)]``.
    Also returns the attribution scores (``scores_pos``, ``scores_neg``) and the ablated positions."""
    pos_ids, neg_ids = example.pos_ids, example.neg_ids
    with torch.no_grad():
        pos_embeds, neg_embeds = embed(pos_ids), embed(neg_ids)
    s_pos, s_neg = contrastive_token_attributions(
        forward_fn, pos_embeds, neg_embeds, pos_ids, neg_ids, example.pos_extra, example.neg_extra,
        example.pos_fixed, example.neg_fixed, settings.attribution, settings.target, settings.steps,
        settings.ig_method, settings.ig_batch_size,
    )
    hidden = lambda ids, extra: last_token_hidden_states(forward_fn, embed, ids, extra, settings.hidden_source, layers)  # noqa: E731
    h_pos, h_neg = hidden(pos_ids, example.pos_extra), hidden(neg_ids, example.neg_extra)
    out: dict[str, Tensor] = {"scores_pos": s_pos.cpu(), "scores_neg": s_neg.cpu()}
    for selection in settings.selections:
        rows = []
        for ids, scores, fixed, extra, h in (
            (pos_ids, s_pos, example.pos_fixed, example.pos_extra, h_pos),
            (neg_ids, s_neg, example.neg_fixed, example.neg_extra, h_neg),
        ):
            eligible = _eligible(ids.shape[1], fixed, example.prompt_length, settings.positions).to(scores.device)
            chosen = top_token_indices(scores, settings.top_k, selection, eligible)
            out[f"positions_{selection}_{'pos' if ids is pos_ids else 'neg'}"] = chosen.cpu()
            rows.append(h - hidden(ablate(ids, chosen, ablation_token_id), extra))
        out[selection] = torch.stack(rows).cpu()
    return out


def _eligible(length: int, fixed: Tensor | None, prompt_length: int | None, positions: str) -> Tensor:
    eligible = torch.ones(length, dtype=torch.bool) if fixed is None else ~fixed.bool().cpu()
    if positions == "prompt":
        if prompt_length is None:
            raise ConfigError("positions='prompt' needs each example's prompt_length.")
        eligible[prompt_length:] = False
    return eligible


def steering_direction(diffs: Tensor, method: VectorMethod = "pca", orientation: Orientation = "mean") -> Tensor:
    """The steering direction of ``(..., N, D)`` differences, in float64: the first principal component
    (unit norm, of the centred rows, as ``sklearn.decomposition.PCA(1)``) or the mean.

    Args:
        diffs: differences, rows on the second-to-last axis (a leading axis batches layers).
        method: ``pca`` or ``mean``.
        orientation: ``mean`` orients the component to ``mean(diffs)·v > 0``; ``svd_flip`` makes its
            largest-magnitude coordinate positive (sklearn ≥ 1.5's rule for PCA).

    Example:
        >>> d = torch.tensor([[1.0, 0.1], [3.0, -0.1], [2.0, 0.0]])
        >>> steering_direction(d, "pca").round(decimals=4).tolist(), steering_direction(d, "mean").tolist()
        ([0.995, -0.0995], [2.0, 0.0])
    """
    check_choice("steering_direction", "method", method, ("pca", "mean"))
    check_choice("steering_direction", "orientation", orientation, ("mean", "svd_flip"))
    x = diffs.double()
    mean = x.mean(-2)
    if method == "mean":
        return mean
    _, _, vh = torch.linalg.svd(x - mean.unsqueeze(-2), full_matrices=False)
    v = vh[..., 0, :]
    if orientation == "mean":
        sign = torch.sign((mean * v).sum(-1, keepdim=True))
    else:
        sign = torch.sign(v.gather(-1, v.abs().argmax(-1, keepdim=True)))
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


@dataclass
class SteeringVectors:
    """Saved GrAInS directions: ``directions["pos/pca"]`` etc., each ``(len(layers), D)`` float32, and
    the settings they were built with (whose ``layer``, ``alpha``, ``mode``, ``method``, ``norm_dim`` are the
    defaults for applying them).

    Files: ``<folder>/vectors.pt`` (``torch.save`` of the tensors: ``torch.load(weights_only=True)`` reads
    it) and ``<folder>/metadata.json``.
    """

    directions: dict[str, Tensor]
    layers: list[int]
    settings: GrainsSettings = field(default_factory=GrainsSettings)
    info: dict[str, Any] = field(default_factory=dict)

    def vector(self, layer: int | None = None, mode: Mode | None = None, method: VectorMethod | None = None) -> Tensor:
        """``(D,)`` direction for decoder block ``layer`` (negative from the end of the model's
        ``num_layers`` in ``info``); ``both`` = ``v_pos − v_neg``."""
        layer = self.settings.layer if layer is None else layer
        mode, method = mode or self.settings.mode, method or self.settings.method
        check_choice("SteeringVectors.vector", "mode", mode, ("pos", "neg", "both"))
        check_choice("SteeringVectors.vector", "method", method, ("pca", "mean"))
        index = layer_index(layer, int(self.info.get("num_layers", max(self.layers) + 1)))
        if index not in self.layers:
            raise ConfigError(f"layer={layer}: the vectors were built for layers {self.layers}; rebuild with that layer or pick one of them.")
        row = self.layers.index(index)
        parts = ("pos", "neg") if mode == "both" else (mode,)
        missing = [f"{p}/{method}" for p in parts if f"{p}/{method}" not in self.directions]
        if missing:
            raise ConfigError(f"mode={mode!r}, method={method!r} needs {missing}, not in the saved vectors ({sorted(self.directions)}).")
        vectors = [self.directions[f"{p}/{method}"][row] for p in parts]
        return vectors[0] - vectors[1] if mode == "both" else vectors[0]

    def save(self, folder: str) -> dict[str, str]:
        os.makedirs(folder, exist_ok=True)
        paths = {"vectors": os.path.join(folder, VECTORS_FILE), "metadata": os.path.join(folder, METADATA_FILE)}
        torch.save({k: v.detach().float().cpu().contiguous() for k, v in self.directions.items()}, paths["vectors"])
        meta = {"method": "GrAInS", "paper": "arXiv 2507.18043", "layers": self.layers, "settings": asdict(self.settings), **self.info}
        with open(paths["metadata"], "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        return paths

    @classmethod
    def load(cls, folder: str) -> SteeringVectors:
        paths = [os.path.join(folder, VECTORS_FILE), os.path.join(folder, METADATA_FILE)]
        for path in paths:
            if not os.path.isfile(path):
                raise MissingFileError(f"{path} does not exist: build the vectors with `lightning-tokens steer --output {folder}`.")
        directions = torch.load(paths[0], map_location="cpu", weights_only=True)
        with open(paths[1], encoding="utf-8") as handle:
            meta = json.load(handle)
        try:
            settings = GrainsSettings(**meta.pop("settings"))
            layers = [int(x) for x in meta.pop("layers")]
        except (KeyError, TypeError) as error:
            raise DataError(f"{paths[1]}: not a GrAInS metadata file ({error}).") from None
        for key in ("method", "paper"):
            meta.pop(key, None)
        return cls(directions=directions, layers=layers, settings=settings, info=meta)


def build_steering_vectors(
    forward_fn: EmbedsForward,
    embed: nn.Module,
    examples: Sequence[SteeringExample],
    ablation_token_id: int,
    settings: GrainsSettings | None = None,
    layers: Sequence[int] | None = None,
    decoder: Sequence[nn.Module] | None = None,
    keep_diffs: bool = False,
) -> SteeringVectors:
    """GrAInS vectors from examples: diffs per selection, then per layer a PCA direction and a mean.

    Args:
        forward_fn: the model on embeddings (:data:`~lightning_tokens.analysis.steering.attribution.EmbedsForward`).
        embed: its input embedding.
        examples: tokenized examples (:class:`SteeringExample`).
        ablation_token_id: the replacement token (GrAInS: pad).
        settings: :class:`GrainsSettings`.
        layers: decoder blocks to keep (``None``: all); negative indices count from the end.
        decoder: the decoder layers (needed for ``hidden_source="block_output"``).
        keep_diffs: also keep the raw differences (``info["diffs"]``, not saved).

    Example:
        >>> forward_fn, embed, lm = module_forward(token_lm)   # doctest: +SKIP
        >>> ex = [SteeringExample.from_text(tok, "2 + 2 =", "4", "5")]  # doctest: +SKIP
        >>> build_steering_vectors(forward_fn, embed, ex, tok.pad_token_id).vector(layer=-1)  # doctest: +SKIP
    """
    settings = settings or GrainsSettings()
    settings.validate()
    if not examples:
        raise ConfigError("build_steering_vectors needs at least one example.")
    per_selection: dict[str, list[Tensor]] = {s: [] for s in settings.selections}
    for example in examples:
        diffs = example_diffs(forward_fn, embed, example, ablation_token_id, settings, decoder)
        for s in settings.selections:
            per_selection[s].append(diffs[s])
    stacked = {s: torch.cat(v).transpose(0, 1) for s, v in per_selection.items()}  # (L, 2N, D)
    num_layers = next(iter(stacked.values())).shape[0]
    keep = list(range(num_layers)) if layers is None else sorted({layer_index(int(x), num_layers) for x in layers})
    directions = {}
    for s, d in stacked.items():
        d = d[keep]
        for method in ("pca", "mean"):
            directions[f"{s}/{method}"] = steering_direction(d, method, settings.orientation).float()
    info: dict[str, Any] = {"num_layers": num_layers, "num_examples": len(examples), "hidden_size": int(next(iter(stacked.values())).shape[-1])}
    result = SteeringVectors(directions, keep, settings, info)
    if keep_diffs:
        result.info["diffs"] = {s: d[keep] for s, d in stacked.items()}
    return result


@torch.no_grad()
def preference_margins(
    forward_fn: EmbedsForward, embed: nn.Module, examples: Sequence[SteeringExample], target: Target = "last"
) -> Tensor:
    """``(N,)`` margins ``log p(last token of r⁺) − log p(last token of r⁻)`` (as GrAInS's multiple-choice
    scoring, with ``target`` as in :func:`~lightning_tokens.analysis.steering.attribution.target_log_prob`);
    accuracy is ``(margins > 0).float().mean()``. Run it inside :func:`~lightning_tokens.analysis.steering.steering`
    to score the steered model."""
    margins = []
    for ex in examples:
        pos = target_log_prob(forward_fn, embed(ex.pos_ids), ex.pos_ids, ex.pos_extra, target)
        neg = target_log_prob(forward_fn, embed(ex.neg_ids), ex.neg_ids, ex.neg_extra, target)
        margins.append((pos - neg)[0].double().cpu())
    return torch.stack(margins) if margins else torch.zeros(0, dtype=torch.float64)

