"""Fused token ops that never materialise the ``(tokens, vocab)`` logits.

Example:
    >>> import torch
    >>> from lightning_tokens.ops import linear_cross_entropy, linear_entropy
    >>> h, w = torch.randn(4, 16, requires_grad=True), torch.randn(100, 16, requires_grad=True)
    >>> nll = linear_cross_entropy(h, w, torch.tensor([1, 2, -100, 3]))
    >>> nll.sum().backward()
"""

from lightning_tokens.ops.chunked import default_chunk_size
from lightning_tokens.ops.dispatch import (
    BACKENDS,
    linear_cross_entropy,
    linear_entropy,
    linear_logprobs,
    linear_nll_entropy,
    resolve_backend,
)
from lightning_tokens.ops.kl import linear_kl
from lightning_tokens.ops.liger import is_liger_available

__all__ = [
    "BACKENDS",
    "default_chunk_size",
    "is_liger_available",
    "linear_cross_entropy",
    "linear_entropy",
    "linear_kl",
    "linear_logprobs",
    "linear_nll_entropy",
    "resolve_backend",
]
