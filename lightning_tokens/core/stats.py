"""Per-token statistics of one forward pass, computed lazily and cached.

Alignment is decided here and nowhere else: every statistic is a ``(B, T)`` tensor indexed like the
``labels`` it scores. With ``shift_labels=True`` (the Hugging Face convention, labels are a copy of the
inputs) position ``t`` holds the prediction of ``labels[:, t]`` made from positions ``< t``, read off the
hidden state at ``t - 1``; column 0 is never scored. With ``shift_labels=False`` the caller's labels
are already next-token targets and position ``t`` is read off the hidden state at ``t``.

Only *active* positions reach the output head: positions whose label is not ``ignore_index`` and whose
pre-forward weight (``batch["token_weights"]``) is not zero. Every statistic is 0 elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tokens import ops
from lightning_tokens.core.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class OutputHead:
    """The output projection ``logits = hidden @ weight.T + bias`` that scores the vocabulary."""

    weight: Tensor
    bias: Tensor | None = None

    @classmethod
    def from_module(cls, head: torch.nn.Module | Tensor) -> OutputHead:
        """Build from an ``nn.Linear``-like module (anything with ``weight`` and optional ``bias``) or a
        weight tensor of shape ``(V, D)``."""
        if isinstance(head, Tensor):
            return cls(head)
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"`head` must be a (V, D) weight tensor or a module with a `weight`, got {type(head).__name__}."
            )
        return cls(weight, getattr(head, "bias", None))


def tempered(hidden: Tensor, head: OutputHead, temperature: float) -> tuple[Tensor, OutputHead]:
    """``hidden`` and ``head`` whose logits are ``(hidden @ W.T + b) / temperature``: the hidden states and the
    bias are divided, the weight is shared. Temperature 1 returns both unchanged.

    Example:
        >>> h, head = tempered(torch.ones(1, 2), OutputHead(torch.eye(2), torch.ones(2)), 2.0)
        >>> (h @ head.weight.T + head.bias).tolist()
        [[1.0, 1.0]]
    """
    if temperature == 1.0:
        return hidden, head
    bias = None if head.bias is None else head.bias / temperature
    return hidden / temperature, OutputHead(head.weight, bias)


@dataclass
class TokenStats:
    """Lazily computed per-token statistics of the current model on one batch.

    Build it from final hidden states and the output head (the fused path, never materialising
    ``(tokens × vocab)`` logits) or from logits that a module already has.

    Args:
        labels: ``(B, T)`` label ids, ``ignore_index`` where no loss is taken.
        hidden: ``(B, T, D)`` final hidden states (before the output head).
        head: the output head, required with ``hidden``.
        logits: ``(B, T, V)`` logits, an alternative to ``hidden`` + ``head``.
        batch: the batch dict, for methods that read extra fields (``example_id``, ``token_weights``...).
        shift_labels: whether ``hidden[:, t]`` predicts ``labels[:, t + 1]`` (see module docstring).
        ignore_index: label value that takes no loss.
        with_entropy: compute entropy in the same pass as the NLL (set when a method declares it needs it).
        backend: fused-op backend, ``"auto"``, ``"torch"`` or ``"liger"`` (see :mod:`lightning_tokens.ops`).

    Extension points for the methods that come next, kept as plain attributes:
        ``reference``: the statistics of a reference or history model on the same batch (a ``TokenStats``
        set by a reference provider before methods run); ``extras``: anything a provider or a method
        wants to share with later methods in the same step (attention probes, extra heads' outputs).

    Example::

        stats = TokenStats(labels, hidden=h, head=OutputHead(lm_head.weight))
        stats.nll        # (B, T) float32, differentiable
        stats.entropy    # (B, T), computed on first access, cached
    """

    labels: Tensor
    hidden: Tensor | None = None
    head: OutputHead | None = None
    logits: Tensor | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    shift_labels: bool = True
    ignore_index: int = IGNORE_INDEX
    with_entropy: bool = False
    backend: str = "auto"
    reference: Any = None  # TokenStats, or ReferenceStats (nll only) for offline scores
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.hidden is None) == (self.logits is None):
            raise ConfigError("TokenStats needs exactly one of `hidden` (with `head`) or `logits`.")
        if self.hidden is not None and self.head is None:
            raise ConfigError("TokenStats was given `hidden` without `head`: pass the output head too.")
        source = self.hidden if self.hidden is not None else self.logits
        if source.shape[:2] != self.labels.shape:
            raise ConfigError(
                f"labels have shape {tuple(self.labels.shape)} but the model output has {tuple(source.shape[:2])} "
                "positions: labels must have the shape of input_ids, (batch, sequence)."
            )
        self._cache: dict[str, Tensor] = {}
        self.mask = self._active_mask()
        self._targets = self._aligned(self.labels)[self._aligned_mask()]

    # ---- alignment -----------------------------------------------------------------------------
    def _aligned(self, x: Tensor) -> Tensor:
        """Targets side of the (prediction, target) pairs."""
        return x[:, 1:] if self.shift_labels else x

    def _predictions(self, x: Tensor) -> Tensor:
        """Prediction side of the pairs."""
        return x[:, :-1] if self.shift_labels else x

    def _active_mask(self) -> Tensor:
        mask = self.labels != self.ignore_index
        weights = self.batch.get("token_weights")
        if weights is not None:
            mask = mask & (weights != 0)
        if self.shift_labels:
            mask = mask.clone()
            mask[:, 0] = False
        return mask

    def _aligned_mask(self) -> Tensor:
        return self._aligned(self.mask)

    def _rows(self) -> Tensor:
        source = self.hidden if self.hidden is not None else self.logits
        return self._predictions(source)[self._aligned_mask()]

    def scatter(self, values: Tensor) -> Tensor:
        """Place per-active-token ``values`` (N, ...) into a zero ``(B, T, ...)`` tensor at their positions."""
        shape = tuple(self.labels.shape) + tuple(values.shape[1:])
        out = values.new_zeros(shape)
        index = self.mask.nonzero(as_tuple=True)
        return out.index_put(index, values)

    # ---- statistics ----------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return int(self._targets.numel())

    @property
    def nll(self) -> Tensor:
        """``(B, T)`` negative log-likelihood of each label, differentiable, 0 where inactive."""
        if "nll" not in self._cache:
            if self.with_entropy:
                self._compute_nll_entropy()
            else:
                self._cache["nll"] = self.scatter(self._nll_rows())
        return self._cache["nll"]

    @property
    def entropy(self) -> Tensor:
        """``(B, T)`` entropy of the predictive distribution at each active position."""
        if "entropy" not in self._cache:
            if "nll" not in self._cache:
                self._compute_nll_entropy()
            else:
                self._cache["entropy"] = self.scatter(self._entropy_rows())
        return self._cache["entropy"]

    @property
    def probs(self) -> Tensor:
        """``(B, T)`` detached probability of each label (0 where inactive)."""
        if "probs" not in self._cache:
            self._cache["probs"] = torch.exp(-self.nll.detach()) * self.mask
        return self._cache["probs"]

    def logprobs(self, tokens: Tensor) -> Tensor:
        """Log-probabilities of other token ids at the active positions.

        Args:
            tokens: ``(B, T)`` or ``(B, T, K)`` token ids, indexed like ``labels``.

        Returns:
            float32 tensor shaped like ``tokens``, 0 at inactive positions.
        """
        selected = tokens[self.mask]
        rows = self._rows()
        if self.hidden is not None:
            values = ops.linear_logprobs(rows, self.head.weight, selected, self.head.bias, backend=self.backend)
        else:
            log_probs = F.log_softmax(rows.float(), dim=-1)
            gather_index = selected if selected.dim() == 2 else selected.unsqueeze(-1)
            values = log_probs.gather(-1, gather_index)
            values = values if selected.dim() == 2 else values.squeeze(-1)
        return self.scatter(values)

    def _nll_rows(self) -> Tensor:
        rows = self._rows()
        if self.hidden is not None:
            return ops.linear_cross_entropy(
                rows, self.head.weight, self._targets, self.head.bias, self.ignore_index, backend=self.backend
            )
        return F.cross_entropy(rows.float(), self._targets, reduction="none")

    def _entropy_rows(self) -> Tensor:
        rows = self._rows()
        if self.hidden is not None:
            return ops.linear_entropy(rows, self.head.weight, self.head.bias, backend=self.backend)
        log_probs = F.log_softmax(rows.float(), dim=-1)
        return -(log_probs.exp() * log_probs).sum(-1)

    def _compute_nll_entropy(self) -> None:
        rows = self._rows()
        if self.hidden is not None:
            nll, entropy = ops.linear_nll_entropy(
                rows, self.head.weight, self._targets, self.head.bias, self.ignore_index, backend=self.backend
            )
        else:
            log_probs = F.log_softmax(rows.float(), dim=-1)
            nll = -log_probs.gather(-1, self._targets.unsqueeze(-1)).squeeze(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
        self._cache["nll"] = self.scatter(nll)
        self._cache["entropy"] = self.scatter(entropy)
