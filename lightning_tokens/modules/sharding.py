"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``TokenLM`` under Lightning's ``ModelParallelStrategy``.

The wrapping unit is the decoder layer, for the trained model and for a frozen reference model alike;
the LightningModule itself is the root unit. Making the module (not the Hugging Face model) the root
matters: every forward of ``TokenLM`` (training, reference, history) runs through ``TokenLM.forward``,
which all-gathers the root's parameters (embeddings, final norm, output heads). The root is not
resharded after its forward, so the fused token loss reads the output head's full weight after the
forward, and the root's post-backward reduce-scatters its gradient like any other.

Frozen modules (a reference model) are sharded with the same policy and run under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_tokens.core.distributed import reshard_all
from lightning_tokens.core.errors import ConfigError

__all__ = ["decoder_layers", "gathered_root", "reshard_all", "shard_decoder_layers", "shard_root", "sharding_mesh"]


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
