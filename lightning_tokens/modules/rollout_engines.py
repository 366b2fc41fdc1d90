"""Rollout engines outside the policy module: vLLM in the training process (TRL's "colocate" mode), and the
weight sync that keeps such an engine equal to the policy after every optimizer step.

``GRPO(generation_backend="hf")`` (the default) samples with the policy module itself and needs none of
this. With ``generation_backend="vllm"`` an engine holds its own copy of the weights, so after each
optimizer step :func:`policy_weights` streams the policy's current weights into it, under their Hugging Face
checkpoint names: LoRA adapters are merged into their base layers for the copy (the engine serves the plain
architecture) and unmerged afterwards; sharded (FSDP2) parameters are gathered one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_tokens.core.errors import ConfigError

__all__ = ["RolloutEngine", "VLLMEngine", "policy_weights"]


class RolloutEngine(Protocol):
    """What GRPO needs from an external generator."""

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
        top_k: int, seeds: Sequence[int],
    ) -> list[list[int]]:
        """``n`` completions (token ids, the end-of-sequence token included when sampled) of each prompt,
        grouped by prompt: ``len(prompts) * n`` lists. ``seeds[i]`` seeds prompt ``i``'s group."""
        ...

    def load_weights(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Replace the engine's weights by these (Hugging Face names of the plain model)."""
        ...


def policy_weights(causal_lm: torch.nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under the names of its plain Hugging Face checkpoint, for an engine's
    ``load_weights``: a peft model's adapters are merged into the yielded base weights (and unmerged once the
    iteration ends); DTensor shards are gathered into full tensors one parameter at a time. Each tensor is a
    copy, made when it is reached, so an engine that streams them holds one extra parameter at a time.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> [name for name, _ in policy_weights(torch.nn.Sequential(lin))]
        ['0.weight', '0.bias']
    """
    merge = getattr(causal_lm, "merge_adapter", None)
    if merge is not None:  # a peft model
        causal_lm.merge_adapter()
    try:
        for name, tensor in causal_lm.state_dict().items():
            if merge is not None:
                name = _plain_name(name)
                if name is None:
                    continue
            full = getattr(tensor, "full_tensor", None)
            # a copy: merged weights revert in place when the adapters are unmerged, and a consumer may keep them
            yield name, (full() if full is not None else tensor.clone()).detach()
    finally:
        if merge is not None:
            causal_lm.unmerge_adapter()


def _plain_name(name: str) -> str | None:
    """A peft state-dict name → the plain model's, ``None`` for the adapters' own tensors."""
    if ".lora_" in name:
        return None
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


class VLLMEngine:
    """vLLM in the training process, on the training GPU (TRL's colocate mode).

    Args:
        model: the folder or hub id vLLM loads the architecture (and first weights) from: the policy's
            ``model`` (for LoRA runs, the base model; the merged weights are synced before every rollout).
        gpu_memory_utilization: the share of GPU memory vLLM may take (the rest is the trainer's).
        dtype: vLLM's dtype (``auto``: the checkpoint's).
        max_model_len: longest prompt + completion.
        **kwargs: further ``vllm.LLM`` arguments.

    Works with the vLLM/torch pairings vLLM publishes (a vLLM wheel is built against one torch). Not yet run
    on a GPU here: the CPU tests cover the sync (:func:`policy_weights`) with a stand-in engine. The weights
    go in through the in-process model's ``load_weights``, TRL's colocate route, which needs
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``.
    """

    def __init__(self, model: str, gpu_memory_utilization: float = 0.3, dtype: str = "auto", max_model_len: int | None = None, **kwargs: Any) -> None:
        if not torch.cuda.is_available():
            raise ConfigError("generation_backend=vllm needs a CUDA GPU; on this machine use generation_backend=hf.")
        try:
            import vllm
        except ImportError:
            raise ConfigError("generation_backend=vllm needs vLLM: `pip install vllm` (a build matching your torch).") from None
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, max_model_len=max_model_len,
            tensor_parallel_size=1, enable_prefix_caching=True, **kwargs,
        )

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float, top_p: float,
        top_k: int, seeds: Sequence[int],
    ) -> list[list[int]]:
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        params = [
            self._vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                      max_tokens=max_new_tokens, seed=int(seed) % (2**31))
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [list(choice.token_ids) for output in outputs for choice in output.outputs]

    def load_weights(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None) or getattr(executor, "driver_worker", None)
        runner = getattr(worker, "model_runner", None)
        model = getattr(runner, "model", None)
        if model is None:
            raise RuntimeError(
                "this vLLM version runs its model outside this process (no llm_engine.model_executor.driver_worker."
                "model_runner.model): set VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does."
            )
        model.load_weights(weights)
