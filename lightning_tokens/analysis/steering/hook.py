r"""The GrAInS steering hook: add a direction to a decoder block's output and restore its norm.

.. math::

    \tilde h = h + s\,\alpha\,v, \qquad h' = \tilde h \cdot \frac{\lVert h \rVert}{\lVert \tilde h \rVert + 10^{-8}}

with ``s = 10`` (the reference's constant) and the norms taken over ``norm_dim``: ``-1`` (the hidden
dimension, per token: the paper's "preserve the representation's scale", our default) or ``1``.

On a ``(B, T, D)`` output, ``norm_dim=1`` is the **sequence** axis: that is what the reference computes
(``duykhuongnguyen/GrAInS@8ad78db`` ``src/utils/steering.py::add_steering_hook``, ``orig.norm(dim=1)`` on
``output[0]``, which under its pinned transformers 4.51.3 is the ``(B, T, D)`` hidden states of a decoder
layer's output tuple). Under transformers ≥ 5, whose decoder layers return the tensor itself,
the same reference line would take ``output[0]`` = the first row ``(T, D)`` and norm per token; the option
keeps the 4.51 behaviour reproducible. With a KV cache each generation step sees ``T = 1``, where the
sequence-axis norm becomes ``|h_d| / |h̃_d|`` per coordinate.

Spec check (``h = [[3, 4], [0, 1]]`` as one sequence of two tokens, ``v = [1, 0]``, ``α = 4``): per token
``[[4.9785, 0.4631], [0.9997, 0.0250]]``, sequence axis ``[[2.1966, 4.0], [2.0433, 1.0]]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_tokens.core.errors import ConfigError

__all__ = ["add_steering_hook", "decoder_layers", "steer_hidden", "steering"]

#: The reference's constant factor in ``h + 10·α·v``.
SCALE = 10.0


def check_norm_dim(norm_dim: int | None) -> None:
    if norm_dim not in (-1, 1, None):
        raise ConfigError(
            f"norm_dim={norm_dim!r} must be -1 (per token, the default), 1 (the reference's sequence axis) "
            "or None (no renormalisation)."
        )


def steer_hidden(hidden: Tensor, vector: Tensor, alpha: float, scale: float = SCALE, norm_dim: int | None = -1, eps: float = 1e-8) -> Tensor:
    r"""``h' = (h + s·α·v) · ‖h‖ / (‖h + s·α·v‖ + eps)``, norms over ``norm_dim`` (``None``: no rescaling).

    Args:
        hidden: ``(B, T, D)`` decoder block output.
        vector: ``(D,)`` steering direction ``v``.
        alpha: strength ``α`` (GrAInS default 4.0).
        scale: the constant ``s`` (10 in the reference).
        norm_dim: ``-1`` per token (default), ``1`` the reference's sequence axis, ``None`` none.
        eps: added to the steered norm, as the reference.

    Example:
        >>> import torch
        >>> h = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]], dtype=torch.float64)
        >>> steer_hidden(h, torch.tensor([1.0, 0.0]), 4.0).squeeze(0).round(decimals=4).tolist()
        [[4.9785, 0.4631], [0.9997, 0.025]]
    """
    check_norm_dim(norm_dim)
    steered = hidden + (scale * alpha) * vector.to(hidden.device, hidden.dtype)
    if norm_dim is None:
        return steered
    ratio = hidden.norm(dim=norm_dim, keepdim=True) / (steered.norm(dim=norm_dim, keepdim=True) + eps)
    return steered * ratio


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (or of the language model inside a vision-language
    model): ``get_decoder().layers``, else the first of ``model.layers``, ``model.model.layers``,
    ``transformer.h``, ``language_model.layers``, ``language_model.model.layers`` (a peft wrapper is unwrapped)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    candidates: list[Any] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            candidates.append(getattr(get_decoder(), "layers", None))
        except (AttributeError, NotImplementedError, TypeError):
            pass
    for path in ("layers", "model.layers", "transformer.h", "language_model.layers", "language_model.model.layers", "model.language_model.layers"):
        node: Any = model
        for part in path.split("."):
            node = getattr(node, part, None)
        candidates.append(node)
    for found in candidates:
        if isinstance(found, nn.ModuleList) and len(found):
            return found
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}: steering needs a model with get_decoder().layers.")


def layer_index(layer: int, num_layers: int) -> int:
    """``layer`` (negative counts from the end) as an index in ``[0, num_layers)``, or a ConfigError."""
    if not -num_layers <= layer < num_layers:
        raise ConfigError(f"layer={layer} is out of range for a model with {num_layers} decoder layers: use 0..{num_layers - 1} or -1.")
    return layer % num_layers


def add_steering_hook(
    block: nn.Module, vector: Tensor, alpha: float, scale: float = SCALE, norm_dim: int | None = -1
) -> RemovableHandle:
    """Register :func:`steer_hidden` as a forward hook on ``block`` (a decoder layer); it applies at every
    position and every generation step. Works whether the block returns its hidden states or a tuple
    starting with them. Returns the handle (``handle.remove()`` undoes it)."""
    check_norm_dim(norm_dim)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return steer_hidden(output, vector, alpha, scale, norm_dim)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (steer_hidden(output[0], vector, alpha, scale, norm_dim),) + tuple(output[1:])
        raise TypeError(f"steering hook: unexpected output of {type(module).__name__}: {type(output).__name__}.")

    return block.register_forward_hook(hook)


@contextmanager
def steering(
    model: nn.Module, layer: int, vector: Tensor, alpha: float, scale: float = SCALE, norm_dim: int | None = -1
) -> Iterator[RemovableHandle]:
    """Steer decoder block ``layer`` of ``model`` inside the ``with`` block.

    Example:
        >>> with steering(causal_lm, layer=-1, vector=v, alpha=4.0):  # doctest: +SKIP
        ...     out = causal_lm.generate(**inputs)
    """
    layers = decoder_layers(model)
    block = layers[layer_index(layer, len(layers))]
    handle = add_steering_hook(block, vector, alpha, scale, norm_dim)
    try:
        yield handle
    finally:
        handle.remove()
