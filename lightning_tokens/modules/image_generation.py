"""Class-conditional generation over a 1D image tokenizer's codes (ReTok §AR generation, LlamaGen ``c2i``).

- :func:`generate_codes`: KV-cached sampling restricted to the code tokens, with classifier-free guidance
  (cond and uncond rows in one batch) on the reference's ``step`` schedule.
- :func:`load_image_tokenizer`: a ``FlexibleImageTokenizer`` from its training checkpoint, for decoding
  (teacher and perceptual networks left out).
- :class:`ImageCodeGenerator`: a :class:`~lightning_tokens.modules.causal_lm.TokenLM` whose ``predict``
  samples every class and writes a PNG grid (rows = classes, columns = samples).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_tokens.core.errors import ConfigError
from lightning_tokens.datamodules.image_codes import CodeVocabulary
from lightning_tokens.modules.causal_lm import TokenLM

__all__ = ["CfgSchedule", "ImageCodeGenerator", "cfg_scale_at", "generate_codes", "guided_logits", "load_image_tokenizer"]

CfgSchedule = Literal["step", "constant"]
_FROZEN_PREFIXES = ("teacher.", "perceptual.", "semantic_head.")
_SAMPLING_OPTIONS = (
    "image_tokenizer_ckpt", "samples_per_class", "num_tokens", "cfg_scale", "cfg_schedule", "step_ratio", "temperature",
    "top_k", "sample_seed", "grid_file", "trust_checkpoint",
)


def cfg_scale_at(step: int, num_tokens: int, cfg_scale: float, schedule: CfgSchedule = "step", step_ratio: float = 0.18) -> float:
    """The guidance scale for the code at position ``step`` (0-based) of ``num_tokens``: ``constant`` is
    ``cfg_scale`` throughout; ``step`` is 1.0 (no guidance) while ``step / num_tokens < step_ratio``, then
    ``cfg_scale``.

    Example:
        >>> [cfg_scale_at(t, 32, 1.5) for t in (0, 5, 6, 31)]
        [1.0, 1.0, 1.5, 1.5]
    """
    if schedule == "constant":
        return float(cfg_scale)
    if schedule != "step":
        raise ConfigError(f"cfg_schedule={schedule!r}: use 'step' (the reference's) or 'constant'.")
    return 1.0 if step / num_tokens < step_ratio else float(cfg_scale)


def guided_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: ``uncond + scale · (cond − uncond)`` (``cond`` itself at scale 1).

    Example:
        >>> guided_logits(torch.tensor([2.0]), torch.tensor([1.0]), 3.0)
        tensor([4.])
    """
    return cond if scale == 1.0 else uncond + scale * (cond - uncond)


def _sample(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_codes(
    causal_lm: torch.nn.Module,
    class_ids: Tensor,
    num_tokens: int,
    code_offset: int,
    codebook_size: int,
    null_class_id: int,
    cfg_scale: float = 1.5,
    cfg_schedule: CfgSchedule = "step",
    step_ratio: float = 0.18,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``num_tokens`` codes per class token with a KV cache, only among the code tokens.

    With guidance (``cfg_scale != 1``) the batch holds the conditional rows and as many ``<class_null>``
    rows; at each position the logits are ``uncond + s · (cond − uncond)`` with ``s`` from
    :func:`cfg_scale_at`, and the sampled code is fed to both rows.

    Args:
        causal_lm: a Hugging Face causal LM (``logits``, ``past_key_values``) over a code vocabulary.
        class_ids: ``(B,)`` token ids of the class tokens (``<class_null>`` for unconditional samples).
        num_tokens: k, the codes to generate.
        code_offset: token id of ``<code_0>``.
        codebook_size: number of codes.
        null_class_id: token id of ``<class_null>``.
        cfg_scale: guidance scale after the schedule's switch (1.0: no guidance, no uncond rows).
        cfg_schedule: ``step`` (1.0 before ``step_ratio`` of the sequence, ``cfg_scale`` after) or ``constant``.
        step_ratio: where ``step`` switches guidance on.
        temperature: softmax temperature (≤ 0: greedy).
        top_k: sample among the k most likely codes (0: all).
        generator: the RNG of the draws.

    Returns:
        ``(B, num_tokens)`` codes in ``[0, codebook_size)``.

    Example::

        vocab = CodeVocabulary.from_tokenizer(model.tokenizer)
        codes = generate_codes(model.causal_lm, vocab.class_token_ids(torch.arange(10)), 32,
                               vocab.code_offset, vocab.codebook_size, vocab.null_class_id)
    """
    if num_tokens < 1:
        raise ConfigError(f"generate_codes(num_tokens={num_tokens}): must be >= 1.")
    device = next(causal_lm.parameters()).device
    class_ids = class_ids.long().to(device)
    batch = class_ids.shape[0]
    guided = cfg_scale != 1.0
    tokens = torch.cat([class_ids, torch.full_like(class_ids, null_class_id)]) if guided else class_ids
    past, codes = None, []
    inputs = tokens[:, None]
    for step in range(num_tokens):
        output = causal_lm(input_ids=inputs, past_key_values=past, use_cache=True)
        past = output.past_key_values
        logits = output.logits[:, -1, code_offset : code_offset + codebook_size]
        if guided:
            cond, uncond = logits[:batch], logits[batch:]
            logits = guided_logits(cond, uncond, cfg_scale_at(step, num_tokens, cfg_scale, cfg_schedule, step_ratio))
        code = _sample(logits, temperature, top_k, generator)
        codes.append(code)
        inputs = (code + code_offset).repeat(2 if guided else 1)[:, None]
    return torch.stack(codes, dim=1)


def load_image_tokenizer(ckpt_path: str, trust_checkpoint: bool = False) -> Any:
    """A ``FlexibleImageTokenizer`` rebuilt from its training checkpoint's hyper-parameters and weights, in
    eval mode, without the frozen teacher and perceptual networks (decoding does not use them).

    Example::

        tokenizer = load_image_tokenizer("runs/retok_quickstart/checkpoints/last.ckpt")
        images = tokenizer.decode(codes)
    """
    from lightning_tokens.modules.checkpoints import consolidated_state_dict, model_weights
    from lightning_tokens.modules.image_tokenizer import FlexibleImageTokenizer

    if not ckpt_path or not Path(ckpt_path).exists():
        raise ConfigError(f"image tokenizer checkpoint {ckpt_path!r} does not exist (tokenizer_ckpt / the codes file's metadata).")
    state = consolidated_state_dict(ckpt_path, trust_checkpoint)
    accepted = set(inspect.signature(FlexibleImageTokenizer.__init__).parameters) - {"self", "optimizer"}
    settings = {k: v for k, v in dict(state.get("hyper_parameters") or {}).items() if k in accepted}
    settings.update(semantic_teacher=None, perceptual_weight=0.0)
    tokenizer = FlexibleImageTokenizer(**settings)
    weights = {k: v for k, v in model_weights(state["state_dict"]).items() if not k.startswith(_FROZEN_PREFIXES)}
    tokenizer.load_state_dict(weights)
    return tokenizer.eval().requires_grad_(False)


class ImageCodeGenerator(TokenLM):
    """A :class:`TokenLM` over an image-code vocabulary (``ImageCodesDataModule``) that, in ``predict``,
    samples ``samples_per_class`` images per class with :func:`generate_codes`, decodes them with the image
    tokenizer and writes a PNG grid (rows = classes, columns = samples). Training is TokenLM's.

    Args:
        image_tokenizer_ckpt: the image tokenizer's checkpoint (default: the codes file's ``tokenizer_ckpt``).
        samples_per_class: columns of the grid.
        num_tokens: codes per sample, k ≤ N (default: the datamodule's ``max_tokens``).
        cfg_scale, cfg_schedule, step_ratio, temperature, top_k: as :func:`generate_codes`.
        sample_seed: seed of the sampling RNG.
        grid_file: the PNG to write (default ``<default_root_dir>/samples_grid.png``).
        trust_checkpoint: load ``image_tokenizer_ckpt`` without the safe-loading allowlist.
        **kwargs: :class:`TokenLM`'s arguments (``model``, ``tokenizer`` = the ``<codes>.tokenizer`` folder...).

    Example::

        model = ImageCodeGenerator(model="tiny-llama", tokenizer="runs/retok_codes.tokenizer")
        pl.Trainer().predict(model, datamodule=ImageCodesDataModule("runs/retok_codes.safetensors"), ckpt_path=...)
    """

    def __init__(
        self,
        image_tokenizer_ckpt: str | None = None,
        samples_per_class: int = 8,
        num_tokens: int | None = None,
        cfg_scale: float = 1.5,
        cfg_schedule: CfgSchedule = "step",
        step_ratio: float = 0.18,
        temperature: float = 1.0,
        top_k: int = 0,
        sample_seed: int = 0,
        grid_file: str | None = None,
        trust_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # sampling options are not part of the trained model: kept out of the checkpoint's hyper-parameters,
        # so that `predict --ckpt_path ...` honours the values given at prediction time
        for name in _SAMPLING_OPTIONS:
            self.hparams.pop(name, None)
            self._hparams_initial.pop(name, None)
        if samples_per_class < 1:
            raise ConfigError(f"ImageCodeGenerator(samples_per_class={samples_per_class}): must be >= 1.")
        if cfg_schedule not in ("step", "constant"):
            raise ConfigError(f"ImageCodeGenerator(cfg_schedule={cfg_schedule!r}): use 'step' or 'constant'.")
        self.image_tokenizer_ckpt, self.samples_per_class, self.num_tokens = image_tokenizer_ckpt, samples_per_class, num_tokens
        self.sampling = dict(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, step_ratio=step_ratio, temperature=temperature, top_k=top_k)
        self.sample_seed, self.grid_file, self.trust_checkpoint = sample_seed, grid_file, trust_checkpoint
        self._image_tokenizer: Any = None
        self._rows: list[Tensor] = []
        self._generator: torch.Generator | None = None

    def image_tokenizer(self) -> Any:
        """The decoding tokenizer (loaded once, on this module's device)."""
        if self._image_tokenizer is None:
            path = self.image_tokenizer_ckpt or getattr(getattr(self._datamodule(), "data", None), "tokenizer_ckpt", None)
            if not path:
                raise ConfigError("ImageCodeGenerator: set image_tokenizer_ckpt (the codes file names no tokenizer checkpoint).")
            self._image_tokenizer = load_image_tokenizer(path, self.trust_checkpoint).to(self.device)
        return self._image_tokenizer

    def _datamodule(self) -> Any:
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def sample_codes(self, classes: Tensor) -> Tensor:
        """``(len(classes) · samples_per_class, k)`` codes, class-major (−1: unconditional)."""
        vocab = CodeVocabulary.from_tokenizer(self.tokenizer)
        k = self.num_tokens or getattr(self._datamodule(), "max_tokens", None) or self.image_tokenizer().num_tokens
        if self._generator is None:
            self._generator = torch.Generator(self.device).manual_seed(self.sample_seed)
        class_ids = vocab.class_token_ids(classes.to(self.device).repeat_interleave(self.samples_per_class))
        return generate_codes(
            self.causal_lm, class_ids, int(k), vocab.code_offset, vocab.codebook_size, vocab.null_class_id,
            generator=self._generator, **self.sampling,
        )

    @override
    def on_predict_epoch_start(self) -> None:
        self._rows, self._generator = [], None

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        classes = batch["classes"]
        codes = self.sample_codes(classes)
        self._rows.append(self.image_tokenizer().decode(codes).cpu())
        labels = classes.repeat_interleave(self.samples_per_class).tolist()
        return [{"class": int(c), "codes": row.tolist()} for c, row in zip(labels, codes.cpu())]

    @override
    def on_predict_epoch_end(self) -> None:
        if not self._rows or self.trainer.global_rank != 0:
            return
        from torchvision.utils import make_grid, save_image

        path = Path(self.grid_file or Path(self.trainer.default_root_dir) / "samples_grid.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(torch.cat(self._rows), nrow=self.samples_per_class, padding=1, pad_value=1.0), path)
        rank_zero_info(f"sample grid (rows = classes, columns = samples): {path}")
