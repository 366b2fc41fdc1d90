r"""
Steering
^^^^^^^^

Applies GrAInS steering vectors (arXiv 2507.18043, spec §8) at inference: while validation, test or
predict runs, a forward hook on one decoder block of the module's language model replaces the block's
output ``h`` by

.. math::

    h' = (h + 10\,\alpha\,v) \cdot \frac{\lVert h \rVert}{\lVert h + 10\,\alpha\,v \rVert}

at every position and generation step (norms per token by default; ``norm_dim: 1`` is the reference's
sequence-axis norm). The hook is removed when the loop ends, so training never sees it. Build the
vectors with ``lightning-tokens steer`` (:mod:`lightning_tokens.analysis.steering`).
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_tokens.analysis.steering.hook import add_steering_hook, check_norm_dim, decoder_layers, layer_index
from lightning_tokens.analysis.steering.vectors import SteeringVectors
from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.options import check_choice

__all__ = ["Steering"]

Stage = Literal["validate", "test", "predict"]
_STAGES = ("validate", "test", "predict")


class Steering(Callback):
    """Inference-time steering with saved GrAInS vectors.

    Features:
        - Loads ``vectors.pt`` + ``metadata.json`` written by ``lightning-tokens steer`` at ``setup``
          (a missing folder fails there, naming the command that writes it).
        - Hooks decoder block ``layer`` of ``pl_module.causal_lm`` (``TokenLM``, LoRA unwrapped, and any
          module exposing its language model as ``causal_lm``, such as the vision-language module) on
          ``on_{validation,test,predict}_start`` and removes it at the matching ``_end`` (and on
          exceptions), so generation, validation loss and metrics are those of the steered model.
        - ``alpha``, ``layer``, ``mode``, ``method`` default to the values saved with the vectors.

    Args:
        path: folder written by ``lightning-tokens steer`` (its ``--output``).
        alpha: strength ``α`` (``None``: the saved one, GrAInS default 4.0).
        layer: decoder block (negative from the end; ``None``: the saved one).
        mode: ``pos``, ``neg`` or ``both`` (``v_pos − v_neg``); ``None``: the saved one.
        method: ``pca`` or ``mean``; ``None``: the saved one.
        norm_dim: ``-1`` renormalises per token (default), ``1`` over the sequence axis (the reference
            code under its transformers 4.51), ``None`` not at all.
        scale: the constant in ``h + scale·α·v`` (``None``: the saved one, 10).
        stages: where to steer (default all three).

    Example::

        lightning-tokens steer --config configs/grains_smollm2.yaml --output runs/grains
        trainer = L.Trainer(callbacks=[Steering(path="runs/grains", alpha=4.0, layer=-1)])
        trainer.predict(model, datamodule=dm)
    """

    def __init__(
        self,
        path: str = "runs/grains",
        alpha: float | None = None,
        layer: int | None = None,
        mode: Literal["pos", "neg", "both"] | None = None,
        method: Literal["pca", "mean"] | None = None,
        norm_dim: int | None = -1,
        scale: float | None = None,
        stages: list[Stage] | None = None,
    ) -> None:
        super().__init__()
        if mode is not None:
            check_choice("Steering", "mode", mode, ("pos", "neg", "both"))
        if method is not None:
            check_choice("Steering", "method", method, ("pca", "mean"))
        check_norm_dim(norm_dim)
        self.stages = list(_STAGES if stages is None else stages)
        for stage in self.stages:
            check_choice("Steering", "stages", stage, _STAGES)
        self.path = path
        self.alpha, self.layer, self.mode, self.method = alpha, layer, mode, method
        self.norm_dim, self.scale = norm_dim, scale
        self.vectors: SteeringVectors | None = None
        self._handle: RemovableHandle | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.vectors is None:
            self.vectors = SteeringVectors.load(self.path)

    def _resolved(self) -> tuple[int, float, float]:
        assert self.vectors is not None
        saved = self.vectors.settings
        layer = saved.layer if self.layer is None else self.layer
        alpha = saved.alpha if self.alpha is None else self.alpha
        scale = saved.scale if self.scale is None else self.scale
        return layer, alpha, scale

    def attach(self, pl_module: pl.LightningModule) -> None:
        """Register the hook on ``pl_module`` (idempotent)."""
        if self._handle is not None:
            return
        if self.vectors is None:
            self.vectors = SteeringVectors.load(self.path)
        model = getattr(pl_module, "causal_lm", None)
        if model is None:
            raise ConfigError(f"Steering hooks the module's language model (`causal_lm`); {type(pl_module).__name__} has none.")
        layer, alpha, scale = self._resolved()
        blocks = decoder_layers(model)
        index = layer_index(layer, len(blocks))
        built_for = self.vectors.info.get("num_layers")
        if built_for is not None and int(built_for) != len(blocks):
            raise ConfigError(
                f"Steering(path={self.path!r}): the vectors were built for {built_for} decoder layers, the model has {len(blocks)}: "
                "build them with this model (`lightning-tokens steer` with the same model section)."
            )
        vector = self.vectors.vector(index, self.mode, self.method)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        text_config = getattr(getattr(model, "config", None), "text_config", None)
        hidden = getattr(text_config, "hidden_size", hidden)
        if hidden is not None and vector.shape[-1] != hidden:
            raise ConfigError(
                f"Steering(path={self.path!r}): the vectors have size {vector.shape[-1]} but the model's hidden size is {hidden}: "
                "build them with this model (`lightning-tokens steer` with the same model section)."
            )
        self._handle = add_steering_hook(blocks[index], vector.to(torch.float32), alpha, scale, self.norm_dim)

    def detach(self) -> None:
        """Remove the hook, if registered."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def active(self) -> bool:
        """Whether the hook is registered now."""
        return self._handle is not None

    def _start(self, stage: str, pl_module: pl.LightningModule) -> None:
        if stage in self.stages:
            self.attach(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("validate", pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test", pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("predict", pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.detach()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()
