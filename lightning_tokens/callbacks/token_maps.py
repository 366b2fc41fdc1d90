"""What the token methods chose, token by token: :class:`TokenMapLogger` renders, every N optimizer steps, a few
fixed examples with each token coloured by the weight it ends up with in the loss (kept, dropped, weighted),
each method's own weight / mask / loss on hover, as PNG + HTML in the run folder and as an image to the logger.

How the per-method values are obtained: the logger re-scores its fixed examples through the same pipeline as
a training step (pre-forward methods' ``token_weights``, the reference provider, the module's
``hidden_states`` and output head, then :func:`~lightning_tokens.core.loss.run_token_methods` with
``log=False``, whose ``outcome.outputs`` keeps each method's output), without gradients reaching the
optimizer, in eval mode, with the random state and the methods' ``state_dict`` restored afterwards. Batch-level
selections (Rho-1's ``scope: batch``, Q-Tuning's sample split) are therefore computed among the fixed examples
themselves.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_tokens.analysis.token_maps import ColorScale, TokenMap, render_image, write_token_maps
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.loss import data_weights, run_token_methods
from lightning_tokens.core.method import BatchTokenMethod, TokenMethod, multiply_token_weights, token_methods
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import TokenStats

__all__ = ["TokenMapLogger", "TokenTrace", "trace_token_methods"]

Source = Literal["train_batch", "val_batch"]


class TokenTrace:
    """The pipeline's decisions on one batch.

    Attributes:
        batch: the batch as the methods saw it (after the pre-forward methods' weights).
        stats: the :class:`~lightning_tokens.core.stats.TokenStats` (``mask``: labelled, active positions).
        data_weights: ``(B, T)`` weights that came with the data (before any method).
        final_weights: ``(B, T)`` the weight each token ends up with (0 where dropped or inactive).
        keep: ``(B, T)`` kept in the loss.
        per_method: method name → ``{"weight" | "kept" | "loss" | "extra" | <extras key>: (B, T) tensor}``.
    """

    def __init__(self, batch: dict[str, Any], stats: TokenStats, data: Tensor, final: Tensor, keep: Tensor,
                 per_method: dict[str, dict[str, Tensor]]) -> None:
        self.batch, self.stats, self.data_weights = batch, stats, data
        self.final_weights, self.keep, self.per_method = final, keep, per_method


def trace_token_methods(pl_module: pl.LightningModule, batch: dict[str, Any], trainer: pl.Trainer) -> TokenTrace:
    """Run ``batch`` through the token-loss pipeline of ``pl_module`` and ``trainer``'s methods as a training step
    would, without logging, and return every method's decision (see :class:`TokenTrace`).

    The module needs ``hidden_states(batch)`` and ``output_head()`` (TokenLM and the modules built on it).
    """
    batch = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in batch.items()}
    raw = batch.get("token_weights")
    per_method: dict[str, dict[str, Tensor]] = {}
    for callback in trainer.callbacks:
        if isinstance(callback, BatchTokenMethod):
            weights = callback.token_weights(batch, pl_module)
            if weights is not None:
                per_method[callback.name] = {"weight": weights.detach().float()}
                multiply_token_weights(batch, weights)
    methods = token_methods(trainer)
    reference = None
    provider = getattr(pl_module, "reference", None)
    if provider is not None and any(m.requires_reference for m in methods):
        reference = provider.stats(batch, pl_module)
    hidden = pl_module.hidden_states(batch)
    stats = TokenStats(
        batch["labels"], hidden=hidden, head=pl_module.output_head(), batch=batch,
        with_entropy=any(m.needs_entropy for m in methods), backend=getattr(pl_module, "token_loss_backend", "auto"),
        reference=reference,
    )
    outcome = run_token_methods(stats, methods, pl_module, data_weights(stats, batch), log=False)
    keep = outcome.keep & (outcome.weights != 0)
    final = torch.where(keep, outcome.weights, torch.zeros_like(outcome.weights)).detach()
    for name, out in outcome.outputs.items():
        values: dict[str, Tensor] = {}
        for key, tensor in (("weight", out.weights), ("kept", out.mask), ("loss", out.loss), ("extra", out.extra_loss)):
            if tensor is not None:
                values[key] = tensor.detach().float()
        per_method.setdefault(name, {}).update(values)
    for name, extras in stats.extras.items():
        if isinstance(extras, dict):
            for key, tensor in extras.items():
                if isinstance(tensor, Tensor) and tensor.shape == stats.labels.shape:
                    per_method.setdefault(name, {})[key] = tensor.detach().float()
    data = torch.ones_like(final) if raw is None else raw.detach().float()
    sample = batch.get("sample_weights")
    if sample is not None:
        data = data * sample.float().unsqueeze(1)
    return TokenTrace(batch, stats, data, final, keep, per_method)


def _rows(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The first ``count`` rows of every per-row field (tensors and lists with the batch's first dimension), on the CPU."""
    n = batch["labels"].shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
            out[key] = value[:count].detach().cpu().clone()
        elif isinstance(value, list) and len(value) == n:
            out[key] = list(value[:count])
    return out


class TokenMapLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, a heat map of what the token methods chose on a few fixed examples.

    Each token is coloured by its final weight in the loss (data weights × every method's weight, 0 where a method
    dropped it; dropped tokens struck through; prompt and padding uncoloured). The HTML page shows, on hover,
    the token's NLL and probability, the data weight, and every method's weight, keep mask, replaced loss or extra
    term, plus the per-token values methods share in ``stats.extras`` (CUT's ratio and flags). Files go to
    ``<run folder>/token_maps/step_<N>.{png,html,json}`` (the run folder: ``folder``, else ``trainer.log_dir``,
    else ``default_root_dir``); the image goes to every logger that takes images (TensorBoard's
    ``experiment.add_image``; ``log_image`` of W&B, Neptune and others).

    The examples are the first ``num_examples`` rows of the first training batch (``source="train_batch"``,
    taken before any pre-forward method weighted it: the logger moves itself to the front of
    ``trainer.callbacks`` at setup) or of the first validation batch (``val_batch``). They are kept in the
    checkpoint, so a resumed run keeps showing the same examples.

    Args:
        every_n_steps: render every this many optimizer steps.
        num_examples: examples shown.
        source: ``train_batch`` or ``val_batch``.
        first_step: also render after the first optimizer step.
        folder: the folder the ``token_maps`` folder goes in (``None``: the run's log folder).
        width: characters per line of the PNG.
        max_tokens: tokens shown per example (the first ones).
        log_to_logger: send the PNG to the loggers.

    Example::

        trainer = L.Trainer(callbacks=[ExcessLossSelection(ratio=0.6), TokenMapLogger(every_n_steps=50)])
        trainer.fit(TokenLM(model="smollm2-135m-instruct", lora=LoRASettings()), datamodule=SFTDataModule(...))
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        num_examples: int = 4,
        source: Source = "train_batch",
        first_step: bool = True,
        folder: str | None = None,
        width: int = 96,
        max_tokens: int = 512,
        log_to_logger: bool = True,
    ) -> None:
        check_choice("TokenMapLogger", "source", source, ("train_batch", "val_batch"))
        for name, value in (("every_n_steps", every_n_steps), ("num_examples", num_examples), ("width", width), ("max_tokens", max_tokens)):
            if value < 1:
                raise ConfigError(f"TokenMapLogger({name}={value}): must be >= 1.")
        self.every_n_steps, self.num_examples, self.source, self.first_step = every_n_steps, num_examples, source, first_step
        self.folder, self.width, self.max_tokens, self.log_to_logger = folder, width, max_tokens, log_to_logger
        self.examples: dict[str, Any] | None = None
        self._last_step = -1
        self.written: list[dict[str, str]] = []

    # ---- set-up -------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if hasattr(pl_module, "rollout"):
            raise ConfigError(
                f"TokenMapLogger renders labelled training examples; {type(pl_module).__name__} trains on its own rollouts, "
                "whose tokens change every step: use it with TokenLM-like modules."
            )
        if not (callable(getattr(pl_module, "hidden_states", None)) and callable(getattr(pl_module, "output_head", None))):
            raise ConfigError(
                f"TokenMapLogger re-scores its examples through the module's `hidden_states(batch)` and `output_head()`; "
                f"{type(pl_module).__name__} has none: use TokenLM (or add both methods)."
            )
        # first in line, so the training batch is seen before pre-forward methods weight it (safe inside
        # Lightning's loop over the callbacks: the ones before this one shift by one place, the rest keep theirs)
        callbacks = trainer.callbacks
        if callbacks and callbacks[0] is not self:
            callbacks.remove(self)
            callbacks.insert(0, self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.examples is not None or self.source != "val_batch":
            return
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None else None
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        for item in loaders:
            if item is None:
                continue
            for batch in item:
                self.examples = _rows(batch, self.num_examples)
                return
        raise ConfigError("TokenMapLogger(source='val_batch') found no validation batch: use source='train_batch'.")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.examples is None and self.source == "train_batch":
            if not isinstance(batch, dict) or "labels" not in batch:
                raise ConfigError("TokenMapLogger needs dict batches with `labels` (input_ids, labels, attention_mask...).")
            self.examples = _rows(batch, self.num_examples)

    # ---- rendering ------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or self.examples is None:
            return  # gradient accumulation: one map per optimizer step
        if not (step % self.every_n_steps == 0 or (self.first_step and step == 1)):
            return
        self._last_step = step
        self.render(trainer, pl_module, step)

    def trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TokenTrace:
        """Re-score the fixed examples (eval mode, random state and the methods' state restored afterwards)."""
        assert self.examples is not None
        device = pl_module.device
        batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.examples.items()}
        modes = {m: m.training for m in pl_module.modules()}
        methods = [cb for cb in trainer.callbacks if isinstance(cb, (TokenMethod, BatchTokenMethod))]
        states = {id(cb): copy.deepcopy(cb.state_dict()) for cb in methods}
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                pl_module.eval()
                return trace_token_methods(pl_module, batch, trainer)
        finally:
            for module, mode in modes.items():
                module.training = mode
            for cb in methods:
                if states.get(id(cb)):
                    cb.load_state_dict(states[id(cb)])

    def token_maps(self, trace: TokenTrace, tokenizer: Any = None) -> list[TokenMap]:
        """One :class:`~lightning_tokens.analysis.token_maps.TokenMap` per example of ``trace``."""
        batch, stats = trace.batch, trace.stats
        ids = batch["input_ids"].cpu()
        mask = batch.get("attention_mask")
        labelled = (stats.labels != stats.ignore_index).cpu()
        if stats.shift_labels:
            labelled[:, 0] = False
        scored = stats.mask.cpu()
        nll = stats.nll.detach().float().cpu()
        final, keep, data = trace.final_weights.cpu(), trace.keep.cpu(), trace.data_weights.cpu()
        per_method = {name: {k: v.cpu() for k, v in values.items()} for name, values in trace.per_method.items()}
        maps = []
        for row in range(ids.shape[0]):
            visible = torch.ones(ids.shape[1], dtype=torch.bool) if mask is None else mask[row].cpu().bool()
            positions = visible.nonzero().flatten().tolist()[: self.max_tokens]
            tokens = [tokenizer.decode([int(ids[row, t])]) if tokenizer is not None else f"<{int(ids[row, t])}>" for t in positions]
            values, details, dropped = [], [], []
            for t in positions:
                if not labelled[row, t]:
                    values.append(float("nan"))
                    dropped.append(False)
                    details.append({"status": "not scored (no label)"})
                    continue
                weight = float(final[row, t])
                kept = bool(keep[row, t])
                status = "dropped" if not kept else ("kept" if math.isclose(weight, 1.0, abs_tol=1e-6) else "weighted")
                item: dict[str, Any] = {"status": status}
                if scored[row, t]:
                    item["nll"] = float(nll[row, t])
                    item["p"] = math.exp(-float(nll[row, t]))
                item["data weight"] = float(data[row, t])
                for name, tensors in per_method.items():
                    for key, tensor in tensors.items():
                        item[f"{name}.{key}"] = float(tensor[row, t])
                values.append(weight)
                dropped.append(not kept)
                details.append(item)
            maps.append(TokenMap(tokens, values, details=details, dropped=dropped, title=f"example {row}"))
        return maps

    def run_folder(self, trainer: pl.Trainer) -> str:
        root = self.folder or trainer.log_dir or trainer.default_root_dir
        return os.path.join(root, "token_maps")

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, str] | None:
        """Trace the fixed examples on every rank (methods may communicate), write and log on global rank 0."""
        trace = self.trace(trainer, pl_module)
        if not trainer.is_global_zero:
            return None
        maps = self.token_maps(trace, getattr(pl_module, "tokenizer", None))
        names = ", ".join(trace.per_method) or "no token method"
        high = max([1.0] + [v for m in maps for v in m.values if math.isfinite(v)])
        scale = ColorScale(cmap="YlGnBu", vmin=0.0, vmax=high, label="final token weight")
        title = f"Token weights at step {step} ({names})"
        paths = write_token_maps(maps, self.run_folder(trainer), f"step_{step:06d}", scale, title=title, width=self.width)
        self.written.append(paths)
        if self.log_to_logger and trainer.loggers:
            image = render_image(maps, scale, width=self.width)
            for logger in trainer.loggers:
                _log_image(logger, "token_maps", image, step)
        return paths

    # ---- state ------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.examples is None:
            return {}
        return {"examples": {k: v for k, v in self.examples.items() if isinstance(v, Tensor)}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("examples"):
            self.examples = dict(state_dict["examples"])


def _log_image(logger: Any, tag: str, image: Any, step: int) -> bool:
    """Send an ``(H, W, 3)`` uint8 image to ``logger``: its ``log_image`` (W&B, Neptune, ...) or its experiment's
    ``add_image`` (TensorBoard's ``SummaryWriter``). Returns whether the logger took it."""
    log_image = getattr(logger, "log_image", None)
    if callable(log_image):
        log_image(key=tag, images=[image], step=step)
        return True
    add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
    if callable(add_image):
        add_image(tag, image, global_step=step, dataformats="HWC")
        return True
    return False
