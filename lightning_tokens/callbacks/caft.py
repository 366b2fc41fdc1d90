r"""
Concept-Aware Fine-Tuning
^^^^^^^^^^^^^^^^^^^^^^^^^

CAFT (arXiv 2506.07833, spec §8) adds ``n - 1`` auxiliary heads to a causal LM during fine-tuning. Head
``i`` (``i = 1 .. n-1``) is one decoder layer (a copy of the trunk's last decoder layer's architecture, built
from the model's config) or a zero-initialised residual block ``x + SiLU(Wx)``; it reads the trunk's final
hidden state at position ``t`` and predicts token ``t + 1 + i`` through the LM's **own** output head (shared).
The objective is

.. math::

    \mathcal{L} = \mathcal{L}_0 + \sum_{i=1}^{n-1} \mathcal{L}_i \cdot \mathrm{decay}^i \cdot \mathrm{coef}
    \cdot \mathrm{sched}(s),

each :math:`\mathcal{L}_i` the token-mean cross-entropy of head ``i`` over its labelled targets, and the
schedules those of the reference (``michaelchen-lab/caft-llm@d10c79e``, ``caft/core.py::add_caft_loss``):
``constant`` 1, ``linear`` s/S, ``sine`` sin(s/S·π/2), ``rsine`` sin((S−s)/S·π/2) (1 → 0, the default),
``sine_<r>`` sin(s/(rS)·π/2) until s = rS then 1. Head pre-training (``pretrain_heads=True``, the reference's
``caft_only_heads``) freezes the trunk, drops :math:`\mathcal{L}_0`, feeds the heads the input of the last
decoder layer (``hidden_states[-2]``) and initialises them from ``layers[-2]`` (as the reference does).
Inference uses the trunk only: the heads live beside the language model, never inside it.

Each head's loss goes through the fused ops (:func:`lightning_tokens.ops.linear_cross_entropy`), one head at a
time, on its labelled rows only: at most one head's chunk of ``(tokens × vocab)`` logits exists at a time.

Ours, written from the reference's description (``caft/core.py`` ``AuxiliaryHead``, ``ResBlock``,
``add_auxiliary_heads``, ``add_caft_loss``; ``scripts/train.py`` and ``scripts/train_aux_heads.py`` defaults).
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from lightning_tokens import ops
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import TokenStats

__all__ = ["CAFT", "CAFTHeads", "ResidualHead", "caft_loss", "caft_schedule"]

HeadArch = Literal["transformer", "linear"]
HeadReduction = Literal["head", "main"]
ATTRIBUTE = "caft_heads"  # where the heads live on the LightningModule (so its optimizer and state_dict see them)
_SINE_R = re.compile(r"^sine_(\d*\.?\d+)$")


# ---------------------------------------------------------------------------------------------- pure functions
def caft_schedule(step: int, total_steps: int, schedule: str = "rsine") -> float:
    """The auxiliary heads' schedule factor at optimizer step ``step`` of ``total_steps``.

    ``constant`` 1; ``linear`` s/S; ``sine`` sin(s/S·π/2); ``rsine`` sin((S−s)/S·π/2); ``sine_<r>``
    sin(s/(rS)·π/2) while s/S < r, then 1. As in the reference, ``S = 0`` at step 0 gives 1.

    Example:
        >>> round(caft_schedule(50, 100, "rsine"), 6)
        0.707107
        >>> caft_schedule(100, 100, "rsine"), caft_schedule(10, 100, "sine_0.2")
        (0.0, 0.7071067811865475)
    """
    _check_schedule(schedule)
    if total_steps == 0 and step == 0:
        return 1.0
    if total_steps <= 0:
        raise ConfigError(f"caft_schedule: total_steps={total_steps} must be > 0 (set trainer.max_steps or max_epochs).")
    fraction = step / total_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return fraction
    if schedule == "sine":
        return math.sin(fraction * math.pi / 2)
    if schedule == "rsine":
        return math.sin((total_steps - step) / total_steps * math.pi / 2)
    ratio = float(_SINE_R.match(schedule).group(1))  # type: ignore[union-attr]
    return math.sin(fraction / ratio * math.pi / 2) if fraction < ratio else 1.0


def caft_loss(
    losses: Sequence[float] | Tensor,
    step: int,
    total_steps: int,
    coef: float = 0.01,
    decay: float = 0.8,
    schedule: str = "rsine",
    heads_only: bool = False,
) -> Tensor:
    """CAFT's total loss from the per-head token-mean losses ``[L0, L1, ..., L_{n-1}]``.

    ``L = L0 + Σ_{i≥1} Li · decay^i · coef · sched(step)``; ``heads_only`` (head pre-training) drops ``L0``.

    Example:
        >>> round(caft_loss([2.0, 3.0, 3.5, 4.0, 4.5], 0, 100).item(), 6)
        2.085312
        >>> round(caft_loss([2.0, 3.0, 3.5, 4.0, 4.5], 50, 100).item(), 6)
        2.060325
    """
    values = losses if isinstance(losses, Tensor) else torch.tensor(list(losses), dtype=torch.float64)
    factor = coef * caft_schedule(step, total_steps, schedule)
    scales = torch.tensor([decay**i * factor for i in range(values.shape[0])], dtype=values.dtype, device=values.device)
    scales[0] = 0.0 if heads_only else 1.0
    return (values * scales).sum()


def _check_schedule(schedule: str) -> None:
    if schedule in ("constant", "linear", "sine", "rsine"):
        return
    match = _SINE_R.match(schedule)
    if match is None or not 0 < float(match.group(1)) <= 1:
        raise ConfigError(
            f"CAFT(schedule={schedule!r}): schedule must be one of 'constant', 'linear', 'sine', 'rsine' or "
            "'sine_<r>' with 0 < r <= 1 (e.g. sine_0.1: warm up over the first 10% of the steps)."
        )


# ---------------------------------------------------------------------------------------------- heads
class ResidualHead(nn.Module):
    """The reference's ``ResBlock``: ``x + SiLU(W x + b)``, ``W`` zero-initialised (an identity at start;
    the bias keeps ``nn.Linear``'s default initialisation, as in the reference)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return x + self.act(self.linear(x))


class CAFTHeads(nn.Module):
    """``n - 1`` auxiliary heads; head ``i`` (0-based index ``i - 1``) predicts token ``t + 1 + i``.

    Args:
        heads: one ``ModuleList`` per head of decoder layers or :class:`ResidualHead` blocks, applied in
            sequence (``layers_per_head`` of them).
        arch: ``transformer`` (decoder layers: they need rotary embeddings and a causal mask) or ``linear``.
    """

    def __init__(self, heads: list[nn.ModuleList], arch: str) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.arch = arch

    def __len__(self) -> int:
        return len(self.heads)

    def forward_head(self, index: int, hidden: Tensor, position_embeddings: Any = None, attention_mask: Tensor | None = None,
                     position_ids: Tensor | None = None) -> Tensor:
        x = hidden
        for layer in self.heads[index]:
            if self.arch == "linear":
                x = layer(x)
            else:
                out = layer(x, attention_mask=attention_mask, position_ids=position_ids,
                            position_embeddings=position_embeddings, use_cache=False)
                x = out[0] if isinstance(out, tuple) else out
        return x


def _decoder_of(pl_module: pl.LightningModule) -> nn.Module:
    causal_lm = getattr(pl_module, "causal_lm", None)
    if causal_lm is None or not hasattr(causal_lm, "get_decoder"):
        raise ConfigError(
            f"CAFT needs a module with a Hugging Face causal LM as `causal_lm` (TokenLM or a subclass); "
            f"{type(pl_module).__name__} has none."
        )
    return causal_lm.get_decoder()


def _plain_state(layer: nn.Module) -> dict[str, Tensor]:
    """A decoder layer's weights without LoRA: peft's ``base_layer`` keys renamed, adapter weights dropped."""
    state = {}
    for key, value in layer.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def causal_mask(attention_mask: Tensor | None, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An additive ``(B, 1, T, T)`` causal mask that also hides padded keys (a query always sees itself, so no
    row is empty)."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = allowed.expand(batch, 1, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------- the method
class CAFT(TokenMethod):
    """Concept-Aware Fine-Tuning (arXiv 2506.07833): auxiliary multi-token heads whose losses are added to the
    next-token loss with small, decaying weights; the output head is shared; inference uses the trunk only.

    ``L = L0 + Σ_{i=1}^{n-1} Li · decay^i · coef · sched(step)``, each ``Li`` the token mean over head ``i``'s
    labelled targets (``labels[:, t + 1 + i]`` read off the hidden state at ``t``).

    Features:
        - The heads are built when the module builds its model (the callback's ``setup`` wraps the module's
          ``configure_model``), attached as ``pl_module.caft_heads``: the module's optimizer trains them, its
          checkpoints save them (exact resume), DDP/FSDP wrap them. ``save_heads`` / ``heads_path`` move them
          on their own.
        - Enters the pipeline as ``extra_loss``: head ``i``'s per-token losses placed at their target positions,
          scaled by ``N / N_i`` (``N`` the micro-batch's labelled tokens, ``N_i`` head ``i``'s), so the token-mean
          reduction ``Σ(w·nll + extra)/N`` gives exactly ``L0 + Σ c_i Li`` (``head_reduction="head"``, the
          reference); ``"main"`` divides every head by ``N`` (no rescaling; ``N_i ≤ N``).
        - ``pretrain_heads``: the reference's head pre-training (frozen trunk, no ``L0``, heads fed the last
          decoder layer's input and initialised from ``layers[init_layer]``; its script uses ``coef=1``,
          ``decay=0.8``, ``schedule=constant``).

    Args:
        num_heads: auxiliary heads ``n - 1`` (the reference: 4).
        layers_per_head: decoder layers per head (1).
        head_arch: ``transformer`` (decoder layers of the trunk's architecture) or ``linear`` (zero-init
            residual block).
        coef: ``heads_coef`` (0.01).
        decay: weight ``decay^i`` of head ``i`` (0.8).
        schedule: ``constant``, ``linear``, ``sine``, ``rsine`` (default) or ``sine_<r>``.
        total_steps: ``S`` of the schedule; ``None`` uses ``trainer.max_steps`` or the estimated stepping batches.
        pretrain_heads: head pre-training mode (see above).
        init_layer: trunk layer the heads copy in pre-training (the reference: ``-2``; ``None``: no copy). Ignored
            by ``linear`` heads and when ``heads_path`` is given.
        init_from_trunk: copy ``layers[init_layer]`` into the heads in fine-tuning too (the reference does not:
            fresh heads, or pre-trained ones from ``heads_path``).
        final_norm: apply the trunk's final norm to a head's output before the output head (the reference does
            not: ``False``).
        head_reduction: ``head`` (each head's own token mean, the reference) or ``main``.
        heads_path: a file written by :meth:`save_heads` to load the heads from.
        save_heads_to: write the heads there (:meth:`save_heads`) at the end of ``fit`` (e.g. after head
            pre-training, for a later run's ``heads_path``).

    Example::

        caft = CAFT(num_heads=4, coef=0.01, decay=0.8, schedule="rsine")
        trainer = L.Trainer(max_steps=100, callbacks=[caft])
        trainer.fit(TokenLM(model="tiny-llama", tokenizer="char"), datamodule=dm); caft.save_heads("heads.pt")
    """

    language_model_only: ClassVar[bool] = True  # its heads read the language model's hidden states

    def __init__(
        self,
        num_heads: int = 4,
        layers_per_head: int = 1,
        head_arch: HeadArch = "transformer",
        coef: float = 0.01,
        decay: float = 0.8,
        schedule: str = "rsine",
        total_steps: int | None = None,
        pretrain_heads: bool = False,
        init_layer: int | None = -2,
        init_from_trunk: bool = False,
        final_norm: bool = False,
        head_reduction: HeadReduction = "head",
        heads_path: str | None = None,
        save_heads_to: str | None = None,
    ) -> None:
        if num_heads < 1 or layers_per_head < 1:
            raise ConfigError(f"CAFT(num_heads={num_heads}, layers_per_head={layers_per_head}): both must be >= 1.")
        check_choice("CAFT", "head_arch", head_arch, ("transformer", "linear"))
        check_choice("CAFT", "head_reduction", head_reduction, ("head", "main"))
        _check_schedule(schedule)
        if coef < 0 or decay < 0:
            raise ConfigError(f"CAFT(coef={coef}, decay={decay}): both must be >= 0.")
        if total_steps is not None and total_steps < 1:
            raise ConfigError(f"CAFT(total_steps={total_steps}) must be >= 1, or null to follow the trainer.")
        self.num_heads, self.layers_per_head, self.head_arch = num_heads, layers_per_head, head_arch
        self.coef, self.decay, self.schedule, self.total_steps = coef, decay, schedule, total_steps
        self.pretrain_heads, self.init_layer, self.init_from_trunk = pretrain_heads, init_layer, init_from_trunk
        self.final_norm, self.head_reduction, self.heads_path = final_norm, head_reduction, heads_path
        self.save_heads_to = save_heads_to
        self._module: pl.LightningModule | None = None
        self._hook: Any = None
        self._captured: Tensor | None = None

    # ---- building the heads ----------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from lightning_tokens.modules.grpo import GRPO

        if isinstance(pl_module, GRPO):
            raise ConfigError(
                "CAFT does not apply to GRPO: its heads learn the labelled continuation of supervised data, while "
                "GRPO's per-token loss is a policy-gradient surrogate on sampled rollouts. Use CAFT with TokenLM "
                "(or a subclass such as VisionLanguageLM)."
            )
        if not hasattr(type(pl_module), "causal_lm") and getattr(pl_module, "causal_lm", None) is None:
            _decoder_of(pl_module)  # raises, naming what is missing
        self._module = pl_module
        if getattr(pl_module, "model", None) is not None or not is_overridden("configure_model", pl_module):
            self.attach(pl_module)
            return
        # the model is built later, in configure_model (under the strategy's init contexts): attach right
        # after it, still before checkpoint restore, strategy wrapping (DDP/FSDP) and configure_optimizers
        if getattr(pl_module.configure_model, "_caft_wrapped", False):
            return
        original: Callable[[], None] = pl_module.configure_model

        def configure_model() -> None:
            original()
            self.attach(pl_module)

        configure_model._caft_wrapped = True  # type: ignore[attr-defined]
        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    def attach(self, pl_module: pl.LightningModule) -> CAFTHeads:
        """Build the heads (or reuse those already attached), attach them as ``pl_module.caft_heads``, load
        ``heads_path``, and in pre-training freeze everything else and hook the last decoder layer's input."""
        heads = getattr(pl_module, ATTRIBUTE, None)
        if heads is None:
            heads = self.build_heads(pl_module)
            pl_module.add_module(ATTRIBUTE, heads)
            if self.heads_path is not None:
                self.load_heads(self.heads_path, pl_module)
        if self.pretrain_heads:
            for name, param in pl_module.named_parameters():
                if not name.startswith(ATTRIBUTE + "."):
                    param.requires_grad_(False)
            if self._hook is None:
                last = _decoder_of(pl_module).layers[-1]
                self._hook = last.register_forward_pre_hook(self._capture, with_kwargs=True)
        return heads

    def build_heads(self, pl_module: pl.LightningModule) -> CAFTHeads:
        """Fresh heads for ``pl_module``'s language model, on its last decoder layer's device and dtype."""
        decoder = _decoder_of(pl_module)
        layers = decoder.layers
        last = layers[-1]
        copies = self.head_arch == "transformer" and self.heads_path is None and (self.pretrain_heads or self.init_from_trunk)
        if copies and self.init_layer is not None and not -len(layers) <= self.init_layer < len(layers):
            raise ConfigError(
                f"CAFT(init_layer={self.init_layer}): the model has {len(layers)} decoder layers; choose an index in "
                f"[{-len(layers)}, {len(layers) - 1}] (the reference copies layers[-2]) or null for fresh heads."
            )
        reference = next(last.parameters())
        config = copy.deepcopy(pl_module.causal_lm.config)
        if self.head_arch == "transformer":
            if getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
                config._attn_implementation = "sdpa"  # the heads get an explicit 4-D mask
            copy_from = None
            if copies and self.init_layer is not None:
                copy_from = _plain_state(layers[self.init_layer])
            heads = []
            for _ in range(self.num_heads):
                blocks = nn.ModuleList()
                for _ in range(self.layers_per_head):
                    block = type(last)(config, len(layers))
                    if copy_from is not None:
                        block.load_state_dict(copy_from)
                    blocks.append(block)
                heads.append(blocks)
        else:
            size = _decoder_of(pl_module).get_input_embeddings().weight.shape[-1]
            heads = [nn.ModuleList(ResidualHead(size) for _ in range(self.layers_per_head)) for _ in range(self.num_heads)]
        dtype = reference.dtype if reference.is_floating_point() else None
        return CAFTHeads(heads, self.head_arch).to(device=reference.device, dtype=dtype).train()

    def save_heads(self, path: str, pl_module: pl.LightningModule | None = None) -> None:
        """Save the heads' weights alone (``torch.save`` of their state dict) with the settings that shape them."""
        heads = self._heads(pl_module)
        torch.save({"state_dict": heads.state_dict(), "num_heads": self.num_heads, "head_arch": self.head_arch,
                    "layers_per_head": self.layers_per_head}, path)

    def load_heads(self, path: str, pl_module: pl.LightningModule | None = None) -> None:
        """Load heads written by :meth:`save_heads` (shapes must match: same trunk config and settings)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("num_heads", "head_arch", "layers_per_head"):
            if saved.get(key) != getattr(self, key):
                raise ConfigError(
                    f"CAFT(heads_path={path!r}): the file has {key}={saved.get(key)!r} but this CAFT has "
                    f"{key}={getattr(self, key)!r}; set {key} to match the saved heads."
                )
        self._heads(pl_module).load_state_dict(saved["state_dict"])

    def _heads(self, pl_module: pl.LightningModule | None) -> CAFTHeads:
        module = pl_module if pl_module is not None else self._module
        heads = None if module is None else getattr(module, ATTRIBUTE, None)
        if heads is None:
            raise RuntimeError("CAFT: no heads yet; they are built when the trainer sets the module up (fit).")
        return heads

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._module is not None and self._module.training:
            self._captured = args[0] if args else kwargs["hidden_states"]

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_heads_to is not None and trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(self.save_heads_to)), exist_ok=True)
            self.save_heads(self.save_heads_to, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None

    # ---- the loss --------------------------------------------------------------------------------
    def _step(self, pl_module: pl.LightningModule) -> tuple[int, int]:
        trainer = pl_module._trainer
        if trainer is None:
            return 0, self.total_steps or 0
        total = self.total_steps
        if total is None:
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        return trainer.global_step, total

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        if stats.hidden is None or stats.head is None:
            raise ConfigError("CAFT needs hidden states and the output head (the fused path); the module passed logits.")
        heads = self._heads(pl_module)
        step, total = self._step(pl_module)
        schedule = caft_schedule(step, total, self.schedule)
        factor = self.coef * schedule
        hidden = stats.hidden
        if self.pretrain_heads:
            if self._captured is None:
                raise RuntimeError("CAFT(pretrain_heads=True) saw no input of the last decoder layer in this step.")
            hidden, self._captured = self._captured.detach(), None
        batch, length = stats.labels.shape
        extra_args: dict[str, Any] = {}
        if self.head_arch == "transformer":
            decoder = _decoder_of(pl_module)
            position_ids = stats.batch.get("position_ids")
            if position_ids is None:
                position_ids = torch.arange(length, device=hidden.device).unsqueeze(0).expand(batch, -1)
            extra_args = {
                "position_embeddings": decoder.rotary_emb(hidden, position_ids),
                "position_ids": position_ids,
                "attention_mask": causal_mask(stats.batch.get("attention_mask"), batch, length, hidden.dtype, hidden.device),
            }
        norm = _decoder_of(pl_module).norm if self.final_norm else None
        shift = 1 if stats.shift_labels else 0
        active = stats.mask
        count = active.sum()
        # float32 (float64 for float64 hidden states, as the fused ops return)
        extra = torch.zeros(batch, length, dtype=torch.promote_types(torch.float32, hidden.dtype), device=hidden.device)
        logs: dict[str, float | Tensor] = {"schedule": schedule}
        for index in range(len(heads)):
            offset = index + 1 + shift  # label position s is predicted by this head from hidden position s - offset
            if offset >= length:
                break
            targets_mask = active[:, offset:]
            count_i = targets_mask.sum()
            out = heads.forward_head(index, hidden, **extra_args)
            if norm is not None:
                out = norm(out)
            rows = out[:, : length - offset][targets_mask]
            targets = stats.labels[:, offset:][targets_mask]
            nll = ops.linear_cross_entropy(rows, stats.head.weight, targets, stats.head.bias, stats.ignore_index,
                                           backend=stats.backend)
            weight = self.decay ** (index + 1) * factor
            if self.head_reduction == "head":
                scale = (count.float() / count_i.clamp(min=1).float()).to(nll.dtype)
            else:
                scale = torch.ones((), dtype=nll.dtype, device=nll.device)
            rows_b, rows_p = targets_mask.nonzero(as_tuple=True)
            extra = extra.index_put((rows_b, rows_p + offset), (nll * weight * scale).to(extra.dtype), accumulate=True)
            logs[f"head{index + 1}_loss"] = nll.detach().sum() / count_i.clamp(min=1)
        if self.pretrain_heads:  # no next-token term: the trunk is frozen, only the heads learn
            return TokenMethodOutput(loss=torch.zeros_like(extra), extra_loss=extra, logs=logs)
        return TokenMethodOutput(extra_loss=extra, logs=logs)
