"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``TokenLM`` under Lightning's ``ModelParallelStrategy``.

The wrapping unit is the decoder layer, for the trained model and for a frozen reference model alike;
the LightningModule itself is the root unit. Making the module (not the Hugging Face model) the root
matters: every forward of ``TokenLM`` (training, reference, history) runs through ``TokenLM.forward``,
which all-gathers the root's parameters (embeddings, final norm, output heads). The root is not
resharded after its forward, so the fused token loss reads the output head's full weight after the
forward, and the root's post-backward reduce-scatters its gradient like any other.

Frozen modules (a reference model, a vision tower) are sharded with the same policy and run under ``no_grad``.
A vision-language model adds units: the vision tower's repeated blocks (:func:`vision_blocks`) and the
connector's resampler layers (:func:`resampler_blocks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_tokens.core.distributed import reshard_all
from lightning_tokens.core.errors import ConfigError

__all__ = [
    "decoder_layers",
    "gathered_root",
    "resampler_blocks",
    "reshard_all",
    "shard_decoder_layers",
    "shard_modules",
    "shard_root",
    "sharding_mesh",
    "vision_blocks",
]


def sharding_mesh(module: Any) -> Any | None:
    """The data-parallel device mesh to shard over, ``None`` when the strategy does not ask for sharding.

    ``ModelParallelStrategy`` puts its mesh on the LightningModule before ``configure_model``.
    """
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            f"ModelParallelStrategy(tensor_parallel_size={mesh['tensor_parallel'].size()}): TokenLM shards with FSDP2 "
            "only; set tensor_parallel_size=1 (and data_parallel_size to the number of processes)."
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def decoder_layers(causal_lm: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a Hugging Face decoder-only model (also under peft)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"cannot find the decoder layers of {type(base).__name__} (`get_decoder().layers`) to shard.")
    return layers


def shard_decoder_layers(causal_lm: torch.nn.Module, mesh: Any, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` every decoder layer of ``causal_lm`` over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(causal_lm):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)


#: Attribute names of a vision tower's repeated blocks (timm ViTs and Qwen2-VL ``blocks``, timm CNNs
#: ``stages``, CLIP / SigLIP encoders ``layers``), searched in module order.
_BLOCK_NAMES = ("blocks", "stages", "layers")


def _has_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def vision_blocks(encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a vision tower, the FSDP2 units of its parameters (the rest joins the root).

    ``encoder`` is a :class:`~lightning_tokens.models.vision.VisionEncoder` (its ``backbone`` is searched) or a
    Hugging Face vision tower. The blocks are the children of the first ``blocks`` / ``stages`` / ``layers``
    container in module order (a timm ViT's ``blocks``, Qwen2-VL's ``visual.blocks``, SigLIP's
    ``encoder.layers``), or of the backbone itself when it is a ``Sequential`` (MobileNetV2's ``features``).
    Blocks without parameters are skipped; an unknown layout gives ``[]`` (the whole tower in the root unit,
    correct but not sharded block by block).

    Example:
        >>> from lightning_tokens.models.vision import build_vision_encoder
        >>> encoder = build_vision_encoder("vit_tiny_patch16_224", pretrained=False, image_size=32,
        ...                                overrides={"patch_size": 8, "depth": 2})
        >>> len(vision_blocks(encoder))
        2
    """
    backbone = getattr(encoder, "backbone", encoder)
    if isinstance(backbone, torch.nn.Sequential):
        return [block for block in backbone if _has_parameters(block)]
    for name, module in backbone.named_modules():
        if name.rsplit(".", 1)[-1] in _BLOCK_NAMES and isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            return [block for block in module if _has_parameters(block)]
    return []


def resampler_blocks(resampler: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention and feed-forward modules of a
    :class:`~lightning_tokens.layers.resampler.PerceiverResampler`: the modules its forward calls (its
    ``layers`` entries are plain ``ModuleList`` pairs that are never called, so they cannot be FSDP2 units).

    Example:
        >>> from lightning_tokens.layers.resampler import PerceiverResampler
        >>> len(resampler_blocks(PerceiverResampler(dim=8, depth=2, heads=2, dim_head=4, num_latents=3)))
        4
    """
    return [module for pair in resampler.layers for module in pair]


def shard_modules(modules: list[torch.nn.Module], mesh: Any, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` each of ``modules`` over ``mesh`` (units below the root, e.g. :func:`vision_blocks`)."""
    from torch.distributed.fsdp import fully_shard

    for module in modules:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)


def shard_root(module: torch.nn.Module, mesh: Any) -> None:
    """``fully_shard`` the root: every parameter not in a decoder-layer unit (embeddings, norms, heads)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mesh=mesh)


@contextmanager
def gathered_root(module: torch.nn.Module) -> Iterator[None]:
    """Keep the root unit's parameters gathered for calls that bypass ``module.forward`` (generation
    through the Hugging Face model); the decoder layers gather their own in their forwards."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
