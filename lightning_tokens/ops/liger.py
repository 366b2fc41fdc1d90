"""Liger-Kernel backend for the fused linear cross-entropy (CUDA only).

Liger-Kernel (``pip install 'lightning-tokens[cuda]'``, i.e. ``liger-kernel>=0.8.2``) ships a
Triton fused linear cross-entropy whose ``reduction="none"`` mode returns per-token losses
with correct gradients for an arbitrary per-token ``grad_output`` (fixed in 0.8.2; earlier
versions scaled the already-summed weight gradient). It is imported lazily, on first use,
and never at package import.

Coded against ``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``::

    liger_fused_linear_cross_entropy(input, weight, target, bias=None, ce_weight=None,
        ignore_index=-100, lse_square_scale=0.0, label_smoothing=0.0, reduction="mean",
        softcap=None, return_z_loss=False, accum_dtype=None, use_token_scaling=False,
        return_token_accuracy=False, return_predicted_tokens=False)

(0.8.5 adds a trailing ``chunk_mem_const=1``, unused here). All arguments after ``target``
are passed by keyword.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "LIGER_INSTALL_HINT",
    "LIGER_MIN_VERSION",
    "is_liger_available",
    "liger_linear_cross_entropy",
    "liger_unavailable_reason",
]

LIGER_MIN_VERSION = "0.8.2"
LIGER_INSTALL_HINT = "pip install 'lightning-tokens[cuda]'  (installs liger-kernel>=0.8.2)"


@functools.cache
def _load_liger() -> tuple[Callable | None, str | None]:
    """Import Liger's functional FLCE once; return ``(fn, None)`` or ``(None, reason)``."""
    from importlib import metadata

    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return None, "liger-kernel is not installed"
    try:
        from packaging.version import Version

        too_old = Version(version) < Version(LIGER_MIN_VERSION)
    except Exception:  # noqa: BLE001 - unparsable version string: let the import decide
        too_old = False
    if too_old:
        return None, (
            f"liger-kernel {version} is installed but >= {LIGER_MIN_VERSION} is required "
            "(older versions give wrong weight gradients with reduction='none')"
        )
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as err:  # noqa: BLE001 - ImportError, or triton failing to initialise
        return None, f"liger-kernel {version} failed to import: {err!r}"
    return liger_fused_linear_cross_entropy, None


def liger_unavailable_reason() -> str | None:
    """Why the Liger backend cannot be used, or ``None`` if it can (ignoring the tensors' device)."""
    return _load_liger()[1]


def is_liger_available() -> bool:
    """Whether ``liger-kernel>=0.8.2`` is installed and importable.

    Example:
        >>> isinstance(is_liger_available(), bool)
        True
    """
    return _load_liger()[0] is not None


def liger_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Per-token NLL through Liger's fused linear cross-entropy (flat inputs, CUDA tensors).

    Args:
        hidden: ``(N, D)`` hidden states, ``N > 0``.
        weight: ``(V, D)`` output projection.
        labels: ``(N,)`` target ids; ``ignore_index`` marks ignored rows.
        bias: ``(V,)`` bias or ``None``.
        ignore_index: Label value whose rows get loss 0 and no gradient.

    Returns:
        ``(N,)`` float32 per-token negative log-likelihood, 0 at ignored rows.

    Raises:
        RuntimeError: If Liger is not available.

    Example:
        >>> nll = liger_linear_cross_entropy(h.cuda(), w.cuda(), y.cuda())  # doctest: +SKIP
    """
    fn, reason = _load_liger()
    if fn is None:
        raise RuntimeError(f"Liger backend unavailable: {reason}. Install it with: {LIGER_INSTALL_HINT}")
    loss = fn(
        hidden.contiguous(),
        weight,
        labels.contiguous().long(),
        bias=bias,
        ignore_index=ignore_index,
        reduction="none",
        # fp32 weight/bias-gradient accumulation across chunks (a no-op for fp32 weights),
        # like the torch backend; with None Liger would accumulate in bf16 for bf16 weights.
        accum_dtype=torch.float32,
    )
    return loss.float()
