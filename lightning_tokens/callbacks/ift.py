r"""
Intuitive Fine-Tuning
^^^^^^^^^^^^^^^^^^^^^

IFT (Hua et al., "Intuitive Fine-Tuning: Towards Simplifying Alignment into a Single Process",
arXiv 2405.11870; spec §7) is SFT with two changes, both read from the authors' code
(``TsinghuaC3I/Intuitive-Fine-Tuning@03adb93``, ``src/trainers.py``: the ``ift`` branch of
``get_batch_metrics``, ``get_cumsum_weight``, ``update_lambda``):

1. **Temporal residual connection.** A first, gradient-free pass gives the model's greedy prediction
   :math:`\hat y_t = \arg\max_v \pi_\theta(v \mid x_{<t})` of every response token; the training pass then
   runs on mixed input embeddings

   .. math:: \tilde e_t = (1 - \lambda)\,E(x_t) + \lambda\,E(\hat y_t)

   at the response positions (``labels[:, t] != -100``), :math:`E(x_t)` elsewhere. :math:`\hat y_t` is the
   prediction *for* position ``t`` made at ``t - 1`` (the reference's ``cat(input_ids[:, :1],
   argmax(logits)[:, :-1])``), so the model sees a blend of the true token and the one it would have
   produced itself.
2. **Relation propagation.** With :math:`\ell_t = -\log p_t` the per-token loss of the training pass and
   ``n`` the sequence's response-token count, each token is weighted by the discounted sum of the losses
   that follow it, normalised per sequence to mean 1 (``propagation_side="left"``, ``norm="L1"``):

   .. math:: w_t = \frac{n\,c_t}{\sum_k c_k}, \qquad c_t = \sum_{k \ge t} \gamma^{k-t}\,\frac{\ell_k}{n}

   The weights are **not detached** (as in the reference): the gradient flows through them too.

With :math:`\gamma = 0` and :math:`\lambda = 0` the loss is exactly SFT's. The first pass costs one extra
forward without gradient (about 1.33× SFT's FLOPs); the greedy tokens are taken through the output head one
chunk of positions at a time, never materialising ``(tokens × vocab)`` logits beyond a chunk.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.core.method import TokenMethod, TokenMethodOutput
from lightning_tokens.core.options import check_choice
from lightning_tokens.core.stats import IGNORE_INDEX, OutputHead, TokenStats
from lightning_tokens.ops import default_chunk_size

__all__ = ["IntuitiveFineTuning", "discounted_cumsum", "greedy_next_tokens", "ift_lambda", "ift_weights"]

Side = Literal["left", "right"]
Norm = Literal["L1", "L2", "softmax", "log"]
Propagation = Literal["loss", "logps", "mask"]

#: The batch key of the embedding mix (TokenLM's contract; see ``lightning_tokens.modules.causal_lm``).
EMBEDDING_MIX = "embedding_mix"
#: What the reference writes at masked positions before ``1 / x`` on the right side.
_RIGHT_SIDE_FILL = 1e6


def discounted_cumsum(x: Tensor, gamma: float, reverse: bool = False, block: int = 128) -> Tensor:
    r"""Discounted cumulative sum along the last axis, differentiable.

    ``reverse=False``: :math:`y_t = \sum_{k \le t} \gamma^{t-k} x_k` (``torch_discounted_cumsum``'s
    ``discounted_cumsum_left``); ``reverse=True``: :math:`y_t = \sum_{k \ge t} \gamma^{k-t} x_k` (its
    ``discounted_cumsum_right``, the RL return). Blocks of ``block`` positions are one triangular matmul each,
    the blocks chained by a carry, so the cost is ``O(T · block)`` and no power of ``1/γ`` ever appears.

    Example:
        >>> discounted_cumsum(torch.ones(1, 3), 0.5, reverse=True).tolist()
        [[1.75, 1.5, 1.0]]
    """
    if reverse:
        return discounted_cumsum(x.flip(-1), gamma, reverse=False, block=block).flip(-1)
    length = x.shape[-1]
    size = max(1, min(block, length))
    index = torch.arange(size, device=x.device)
    lag = index[:, None] - index[None, :]  # t - k
    decay = torch.where(lag >= 0, torch.full((), gamma, dtype=x.dtype, device=x.device) ** lag.clamp(min=0), 0)
    carry_decay = torch.full((), gamma, dtype=x.dtype, device=x.device) ** (index + 1)
    out, carry = [], None
    for start in range(0, length, size):
        chunk = x[..., start : start + size]
        width = chunk.shape[-1]
        y = chunk @ decay[:width, :width].T
        if carry is not None:
            y = y + carry_decay[:width] * carry
        out.append(y)
        carry = y[..., -1:]
    return torch.cat(out, dim=-1) if out else x.clone()


def ift_weights(
    logps: Tensor,
    mask: Tensor,
    gamma: float = 0.95,
    side: Side = "left",
    norm: Norm = "L1",
    propagation: Propagation = "loss",
) -> Tensor:
    r"""IFT's relation-propagation weights, the reference's ``get_cumsum_weight``.

    ``side="left"`` (the default, the paper's): :math:`c_t = \sum_{k \ge t} \gamma^{k-t} a_k` with
    :math:`a_k = -\log p_k / n` (``propagation="loss"``; ``"logps"``: :math:`-\log p_k`; ``"mask"``: 1), then
    ``norm`` (``L1``: :math:`c`, ``L2``: :math:`c^2`, ``softmax``: :math:`\mathrm{softmax}(c)` over the row,
    ``log``: :math:`\log(c + 1)`). ``side="right"``: :math:`c_t = \sum_{k \le t} \gamma^{t-k} a_k`, with the
    reference's quirks: masked positions are set to ``1e6``, then **one** constant, the smallest non-zero entry
    of the whole batch, is added to every entry (so the weights of a sequence depend on the other sequences),
    then ``L1``: :math:`1/c`, ``L2``: :math:`1/c^2`, ``softmax``: :math:`\mathrm{softmax}(1/c)`, ``log``:
    :math:`1/\log(c + 1)`. Both sides end alike: 0 off the mask, rescaled per row to mean 1 over its ``n``
    tokens. Differentiable in ``logps`` (the minimum of the right side included, as in the reference).

    Departures from the reference, all off the loss: masked positions get 0 with ``gamma = 0`` (the reference
    returns ones everywhere, unnormalised; its masked log-probabilities are 0, so the loss is the same), and a
    row without tokens gets zeros (the reference divides 0 by 0).

    Args:
        logps: ``(B, L)`` log-probabilities of the labels (0 or anything off the mask).
        mask: ``(B, L)`` bool, the scored tokens.
        gamma: the discount ``γ`` in ``[0, 1]``; 0 gives weight 1 to every token (SFT).
        side: ``left`` (future losses weigh on each token) or ``right`` (the reference's alternative).
        norm: ``L1``, ``L2``, ``softmax`` or ``log``.
        propagation: the summed quantity: ``loss`` (``-log p / n``, the reference's default), ``logps``
            (``-log p``) or ``mask`` (1 per token).

    Returns:
        ``(B, L)`` weights in ``logps``' dtype (at least float32), mean 1 over each row's tokens.

    Example:
        >>> nll = torch.tensor([[1.84235, 1.72065, 1.38629]])
        >>> w = ift_weights(-nll, torch.ones(1, 3, dtype=torch.bool), gamma=0.95)
        >>> [round(v, 5) for v in w[0].tolist()], round((w * nll).mean().item(), 5)
        ([1.54985, 0.99572, 0.45442], 1.73288)
    """
    check_choice("ift_weights", "side", side, ("left", "right"))
    check_choice("ift_weights", "norm", norm, ("L1", "L2", "softmax", "log"))
    check_choice("ift_weights", "propagation", propagation, ("loss", "logps", "mask"))
    if not 0.0 <= gamma <= 1.0:
        raise ConfigError(f"ift_weights(gamma={gamma}): gamma must lie in [0, 1] (0: plain SFT; the paper: 0.95).")
    if logps.shape != mask.shape or logps.dim() != 2:
        raise ConfigError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must both be (batch, length).")
    dtype = torch.promote_types(logps.dtype, torch.float32)
    mask = mask.bool()
    if gamma == 0:
        return mask.to(dtype)
    logps = logps.to(dtype)
    count = mask.sum(-1, keepdim=True).to(dtype)
    zero = logps.new_zeros(())
    if propagation == "mask":
        item = mask.to(dtype)
    elif propagation == "loss":
        item = -logps / count.clamp(min=1)
    else:
        item = -logps
    item = torch.where(mask, item, zero)
    if side == "left":
        cumsum = torch.where(mask, discounted_cumsum(item, gamma, reverse=True), zero)
        if norm == "L2":
            cumsum = cumsum**2
        elif norm == "softmax":
            cumsum = torch.softmax(cumsum, dim=-1)
        elif norm == "log":
            cumsum = torch.log(cumsum + 1)
        weights = cumsum
    else:
        cumsum = torch.where(mask, discounted_cumsum(item, gamma, reverse=False), zero + _RIGHT_SIDE_FILL)
        nonzero = cumsum[cumsum != 0]
        cumsum = cumsum + (nonzero.min() if nonzero.numel() else zero)  # one constant for the whole batch
        if norm == "L1":
            weights = 1 / cumsum
        elif norm == "L2":
            weights = 1 / cumsum**2
        elif norm == "softmax":
            weights = torch.softmax(1 / cumsum, dim=-1)
        else:
            weights = 1 / torch.log(cumsum + 1)
    weights = torch.where(mask, weights, zero)
    total = weights.sum(-1, keepdim=True)
    scale = torch.where(total != 0, count / torch.where(total != 0, total, zero + 1), zero)
    return weights * scale


def ift_lambda(
    step: int,
    min_lambda: float = 0.2,
    max_lambda: float = 0.2,
    lambda_schedule: Literal["static", "linear"] | None = None,
    lambda_warmup_steps: int = 150,
    lambda_disturb: Literal["normal"] | None = None,
    disturb_std: float = 0.5,
    seed: int = 0,
) -> float:
    r"""The mixing weight :math:`\lambda` at optimizer step ``step`` (the reference's ``update_lambda``).

    ``static`` (``None``): ``max_lambda``. ``linear``: ``min + (max - min)·min(step / warmup, 1)``. With
    ``lambda_disturb="normal"``: :math:`\lambda \mathrel{+}= \varepsilon_s \cdot \mathrm{std} \cdot \lambda`,
    :math:`\varepsilon_s \sim \mathcal N(0, 1)` drawn from a generator seeded with ``seed + step`` (the
    reference pre-draws one value per step from the global RNG), then clamped to ``[0, 1]``. A pure function
    of the step, so a resumed run gets the uninterrupted run's values.

    Example:
        >>> ift_lambda(50, 0.0, 0.4, "linear", lambda_warmup_steps=100)
        0.2
    """
    if lambda_schedule == "linear":
        ramp = step / max(1, lambda_warmup_steps) if step < lambda_warmup_steps else 1.0
        value = min_lambda + (max_lambda - min_lambda) * ramp
    else:
        value = max_lambda
    if lambda_disturb == "normal":
        noise = torch.randn((), generator=torch.Generator().manual_seed(seed + step), dtype=torch.float64).item()
        value += noise * disturb_std * value
    return min(max(value, 0.0), 1.0)


@torch.no_grad()
def greedy_next_tokens(
    rows: Tensor, head: OutputHead, targets: Tensor | None = None, chunk_size: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """Argmax of ``rows @ head.weight.T + bias`` per row, one chunk of rows at a time.

    Args:
        rows: ``(N, D)`` hidden states.
        head: the output head.
        targets: optional ``(N,)`` ids whose NLL under the same logits comes back too.
        chunk_size: rows per chunk (default: about 1 GiB of float32 logits, :func:`~lightning_tokens.ops.default_chunk_size`).

    Returns:
        ``(N,)`` predicted ids, and ``(N,)`` float32 NLLs of ``targets`` (or ``None``).

    Example:
        >>> greedy_next_tokens(torch.eye(3), OutputHead(torch.eye(3).flip(0)))[0].tolist()
        [2, 1, 0]
    """
    size = chunk_size or default_chunk_size(head.weight.shape[0])
    predictions, nlls = [], []
    for start in range(0, rows.shape[0], size):
        logits = F.linear(rows[start : start + size], head.weight, head.bias).float()
        predictions.append(logits.argmax(-1))
        if targets is not None:
            chunk_targets = targets[start : start + size].unsqueeze(-1)
            nlls.append(logits.logsumexp(-1) - logits.gather(-1, chunk_targets).squeeze(-1))
    empty = rows.new_zeros(0, dtype=torch.long)
    ids = torch.cat(predictions) if predictions else empty
    nll = None if targets is None else (torch.cat(nlls) if nlls else rows.new_zeros(0, dtype=torch.float32))
    return ids, nll


class IntuitiveFineTuning(TokenMethod):
    """Intuitive Fine-Tuning: greedy-prediction embedding mixing before the forward, relation-propagation
    weights after it.

    Before the forward (``on_train_batch_start``) a no-grad pass of the module gives the greedy prediction of
    every response token; the method writes ``batch["embedding_mix"] = {"tokens": ŷ, "weight": λ}`` on the
    response positions (``labels != -100``, position 0 excepted), which ``TokenLM.hidden_states`` (and the
    modules built on it) turn into ``(1 − λ)·E(x) + λ·E(ŷ)`` input embeddings. After the forward it returns
    :func:`ift_weights` of the NLL as per-token weights, with their gradient unless ``detach_weights``.
    Pre-forward methods listed after this one see the mix; list them before it if they drop labels that
    should not be mixed. Reference-based methods score the same mixed inputs (see ``TokenLM.hidden_states``).

    Args:
        gamma: the discount ``γ`` of relation propagation (the paper: 0.95; 0: no propagation).
        min_lambda: ``λ`` at step 0 of the ``linear`` schedule.
        max_lambda: ``λ`` (``static``) or its value after the warm-up (``linear``); the paper: 0.2.
        lambda_schedule: ``None``/``static`` (constant ``max_lambda``) or ``linear`` (warm-up from
            ``min_lambda`` over ``lambda_warmup_steps`` optimizer steps).
        lambda_warmup_steps: the reference reads its learning-rate ``warmup_steps`` setting here (150).
        lambda_disturb: ``None`` or ``normal``: ``λ += N(0, 1)·disturb_std·λ`` per optimizer step, clamped to [0, 1].
        disturb_std: the disturbance's relative standard deviation (the reference: 0.5).
        propagation_type: ``loss`` (``-log p / n``, the reference's), ``logps`` or ``mask``.
        propagation_side: ``left`` (a token weighs the losses after it, the paper's) or ``right``.
        propagation_norm: ``L1`` (the reference's), ``L2``, ``softmax`` or ``log``.
        detach_weights: stop the gradient through the weights (the reference keeps it: ``False``).
        reduction: ``token`` (the library's token mean over the accumulation window; ``γ = λ = 0`` is then
            exactly TokenLM's SFT) or ``sequence`` (the reference's mean over sequences of per-sequence means,
            exact within a micro-batch: each row's weights are scaled by ``N / (B · n_b)``).
        chunk_size: positions per chunk of logits in the greedy pass (default: about 1 GiB of float32 logits).
        seed: base seed of the ``normal`` disturbance (step ``s`` draws from ``seed + s``).

    Example::

        from lightning_tokens.callbacks.ift import IntuitiveFineTuning
        trainer = L.Trainer(callbacks=[IntuitiveFineTuning(gamma=0.95, max_lambda=0.2, min_lambda=0.2)])
        trainer.fit(TokenLM(model="smollm2-135m-instruct"), datamodule=SFTDataModule(train_file="chat.jsonl"))
    """

    def __init__(
        self,
        gamma: float = 0.95,
        min_lambda: float = 0.2,
        max_lambda: float = 0.2,
        lambda_schedule: Literal["static", "linear"] | None = None,
        lambda_warmup_steps: int = 150,
        lambda_disturb: Literal["normal"] | None = None,
        disturb_std: float = 0.5,
        propagation_type: Propagation = "loss",
        propagation_side: Side = "left",
        propagation_norm: Norm = "L1",
        detach_weights: bool = False,
        reduction: Literal["token", "sequence"] = "token",
        chunk_size: int | None = None,
        seed: int = 0,
    ) -> None:
        owner = type(self).__name__
        check_choice(owner, "lambda_schedule", lambda_schedule, (None, "static", "linear"))
        check_choice(owner, "lambda_disturb", lambda_disturb, (None, "normal"))
        check_choice(owner, "reduction", reduction, ("token", "sequence"))
        check_choice(owner, "propagation_type", propagation_type, ("loss", "logps", "mask"))
        check_choice(owner, "propagation_side", propagation_side, ("left", "right"))
        check_choice(owner, "propagation_norm", propagation_norm, ("L1", "L2", "softmax", "log"))
        if not 0.0 <= gamma <= 1.0:
            raise ConfigError(f"{owner}(gamma={gamma}): gamma must lie in [0, 1] (the paper: 0.95; 0: no propagation).")
        for name, value in (("min_lambda", min_lambda), ("max_lambda", max_lambda)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{owner}({name}={value}): {name} must lie in [0, 1] (the paper: 0.2).")
        if lambda_warmup_steps < 0:
            raise ConfigError(f"{owner}(lambda_warmup_steps={lambda_warmup_steps}): must be >= 0.")
        if not disturb_std >= 0:
            raise ConfigError(f"{owner}(disturb_std={disturb_std}): must be >= 0 (the reference: 0.5).")
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"{owner}(chunk_size={chunk_size}): must be >= 1, or null for the default.")
        self.gamma, self.min_lambda, self.max_lambda = gamma, min_lambda, max_lambda
        self.lambda_schedule, self.lambda_warmup_steps = lambda_schedule, lambda_warmup_steps
        self.lambda_disturb, self.disturb_std, self.seed = lambda_disturb, disturb_std, seed
        self.propagation_type, self.propagation_side, self.propagation_norm = propagation_type, propagation_side, propagation_norm
        self.detach_weights, self.reduction, self.chunk_size = detach_weights, reduction, chunk_size
        self._logs: dict[str, float | Tensor] = {}

    def lambda_at(self, step: int) -> float:
        """``λ`` at optimizer step ``step`` (:func:`ift_lambda` with this method's settings)."""
        return ift_lambda(step, self.min_lambda, self.max_lambda, self.lambda_schedule, self.lambda_warmup_steps,
                          self.lambda_disturb, self.disturb_std, self.seed)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if hasattr(pl_module, "rollout"):
            raise ConfigError(
                f"{self.name} mixes the data batch's input embeddings before the forward, but "
                f"{type(pl_module).__name__} trains on rollouts generated in the step: use it with TokenLM (SFT data)."
            )
        missing = [name for name in ("hidden_states", "output_head") if not callable(getattr(pl_module, name, None))]
        if missing:
            raise ConfigError(
                f"{self.name} needs the module's {' and '.join(missing)} (its greedy first pass) and a forward that "
                f"honours batch['{EMBEDDING_MIX}']: {type(pl_module).__name__} has neither; use lightning_tokens.TokenLM "
                "or a module built on it."
            )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        lam = self.lambda_at(trainer.global_step)
        self._logs = {"lambda": lam}
        batch.pop(EMBEDDING_MIX, None)
        if lam == 0.0:  # the mix would be E(x) exactly: skip the first pass
            return
        input_ids, labels = batch["input_ids"], batch["labels"]
        mixed = labels != IGNORE_INDEX
        mixed[:, 0] = False  # ŷ_t comes from position t - 1
        predicting = mixed[:, 1:]
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            hidden = pl_module.hidden_states(batch)  # type: ignore[operator]
            rows = hidden[:, :-1][predicting]
            greedy, nll = greedy_next_tokens(rows, pl_module.output_head(), labels[:, 1:][predicting], self.chunk_size)  # type: ignore[operator]
        tokens = input_ids.clone()
        tokens[mixed] = greedy.to(tokens.dtype)
        weight = mixed.to(torch.float32) * lam
        batch[EMBEDDING_MIX] = {"tokens": tokens, "weight": weight}
        count = max(int(greedy.numel()), 1)
        self._logs["greedy_match"] = (greedy == labels[mixed]).sum().float() / count
        self._logs["clean_nll"] = nll.sum() / count if nll is not None else 0.0

    @override
    def compute(self, stats: TokenStats, pl_module: pl.LightningModule) -> TokenMethodOutput:
        logps = -stats.nll
        if self.detach_weights:
            logps = logps.detach()
        weights = ift_weights(logps, stats.mask, self.gamma, self.propagation_side, self.propagation_norm, self.propagation_type)
        if self.reduction == "sequence":
            counts = stats.mask.sum(-1, keepdim=True).to(weights.dtype)
            rows = (counts > 0).sum().clamp(min=1)
            weights = weights * (counts.sum() / (rows * counts.clamp(min=1)))
        logs = dict(self._logs)
        active = weights.detach()[stats.mask]
        if active.numel():
            logs["max_weight"] = active.max()
        return TokenMethodOutput(weights=weights, logs=logs)
