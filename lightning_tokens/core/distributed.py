"""What token methods need from data parallelism: the data-parallel group, a batch gathered from every
rank for selections that are global by definition, and FSDP2 units resharded after a forward on swapped-in
weights.

A selection such as Rho-1's "top k% of the batch" or Q-Tuning's quantile thresholds is defined over a
batch. Under DDP/FSDP each rank holds only its share of the global batch, so a method offers
``ranks="local"`` (the default: each rank selects among its own tokens, no communication) or
``ranks="global"``: the method's inputs are gathered from all data-parallel ranks, the selection runs
on the gathered batch exactly as one process would run it on the global batch, and each rank keeps the
rows that are its own. (The gathered rows are in rank order, not the sampler's interleaved order: a
selection that breaks exact ties by position may break them differently from one process.)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_tokens.core.options import check_choice

__all__ = ["RankScope", "check_rank_scope", "data_parallel_group", "gather_rows", "mean_over_ranks", "reshard_all"]

RankScope = Literal["local", "global"]


def check_rank_scope(owner: str, value: str) -> None:
    """Fail early on an unknown ``ranks`` option, naming the owner and the choices."""
    check_choice(
        owner, "ranks", value, ("local", "global"),
        " (local: each rank selects among its own tokens; global: the selection runs over the batch gathered "
        "from all data-parallel ranks)",
    )


def data_parallel_group(trainer: Any) -> tuple[Any, int, int] | None:
    """``(process group, rank in it, its size)`` of the data-parallel ranks, ``None`` without one.

    The group is the ``data_parallel`` dimension of the device mesh under ``ModelParallelStrategy``
    and the default group under DDP/FSDP.
    """
    if trainer is None or not dist.is_available() or not dist.is_initialized():
        return None
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is not None and "data_parallel" in (mesh.mesh_dim_names or ()):
        sub = mesh["data_parallel"]
        group = sub.get_group()
        return group, sub.get_local_rank(), sub.size()
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size()


def gather_rows(tensors: dict[str, Tensor], trainer: Any) -> tuple[dict[str, Tensor], slice]:
    """Concatenate ``(B, T)`` tensors of every data-parallel rank along the rows, in rank order.

    Ranks may hold different numbers of rows and sequence lengths: shorter rows are right-padded with
    ``False`` / ``0`` (``mask``-like entries must treat padding as unselectable). Returns the gathered
    tensors and the slice of rows that belong to this rank. Without a process group (one process) the
    inputs come back unchanged.

    Example::

        gathered, mine = gather_rows({"score": score, "mask": mask}, trainer)
        keep = select(gathered["score"], gathered["mask"])[mine, : score.shape[1]]
    """
    group_info = data_parallel_group(trainer)
    first = next(iter(tensors.values()))
    rows, length = first.shape[:2]
    if group_info is None or group_info[2] == 1:
        return tensors, slice(0, rows)
    group, rank, size = group_info
    shape = torch.tensor([rows, length], device=first.device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape, group=group)
    max_rows = int(max(s[0] for s in shapes))
    max_length = int(max(s[1] for s in shapes))
    gathered: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # gloo has no bool all_gather
        padded = wire.new_zeros((max_rows, max_length, *tensor.shape[2:]))
        padded[:rows, : tensor.shape[1]] = wire
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        gathered[name] = torch.cat([part[: int(s[0])] for part, s in zip(parts, shapes)]).to(tensor.dtype)
    start = int(sum(int(s[0]) for s in shapes[:rank]))
    return gathered, slice(start, start + rows)


def mean_over_ranks(values: dict[str, float | Tensor], trainer: Any) -> dict[str, float]:
    """Named scalars averaged over the data-parallel ranks (one ``all_gather_object``).

    Ranks may report different names (a statistic of an empty set, e.g. the mean of dropped tokens when
    a rank dropped none): each name is averaged over the ranks that report it. A per-name all-reduce
    (``self.log(..., sync_dist=True)``) would deadlock there, the ranks issuing different numbers of
    collectives. Without a process group the values come back as floats.

    Example::

        logs = mean_over_ranks({"kept_fraction": kept.float().mean()}, trainer)
    """
    local = {name: float(value) for name, value in values.items()}
    group_info = data_parallel_group(trainer)
    if group_info is None or group_info[2] == 1:
        return local
    group, _, size = group_info
    gathered: list[dict[str, float]] = [{} for _ in range(size)]
    dist.all_gather_object(gathered, local, group=group)
    names = sorted(set().union(*gathered))
    return {name: sum(d[name] for d in gathered if name in d) / sum(name in d for d in gathered) for name in names}


def reshard_all(module: torch.nn.Module) -> None:
    """Free the all-gathered parameters of every FSDP2 unit of ``module`` (no-op without FSDP2).

    Needed after a forward that ran on swapped-in parameter values (the EMA history): the root keeps its
    parameters gathered after a forward, and a later forward would reuse the swapped values.
    """
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
