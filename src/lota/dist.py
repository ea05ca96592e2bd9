"""Several processes, one run: ``lota adapt`` under ``torchrun`` or ``accelerate launch``.

The launcher starts the processes and sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; lota joins the
process group through accelerate's ``PartialState`` (gloo on CPU, NCCL on GPUs) and uses PyTorch's
own data parallelism: ``DistributedDataParallel`` (every rank holds the whole model) or FSDP2
``fully_shard`` (each rank holds a slice of rows of every weight).

Data order does not depend on the number of processes: every optimizer step consumes one global
batch of ``--batch-size`` examples, split into ``world size x --grad-accum`` equal micro-batches;
rank ``r`` trains micro-batches ``r*A .. r*A+A-1``. A single process with ``--grad-accum 2`` and
two processes with ``--grad-accum 1`` see the same micro-batches and average the same gradients.

Sharded selection (``select_top_k(..., shard=...)``) finds the global top-k over per-rank row
slices without gathering any tensor: the radix-select histograms are summed across ranks, and
ties at the threshold go to the lowest global positions (tensor name, then rank, then index),
exactly as in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

# The row layout of sharded tensors is part of this module's API too.
from .shards import full_tensor, local_rows, row_range, shard_like, span  # noqa: F401
from .sparse_model import mark_sharded


@dataclass
class World:
    """The processes of a run; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks, in place; returns ``t``. (Collectives run on the process's
        device, as NCCL needs: CPU tensors make the round trip.)"""
        if self.distributed:
            buf = t.to(self.device)
            torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[size, *t.shape]``: every rank's ``t``, in rank order, on ``t``'s device."""
        if not self.distributed:
            return t.unsqueeze(0)
        buf = t.to(self.device).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.size)]
        torch.distributed.all_gather(out, buf)
        return torch.stack(out).to(t.device)

    def gather_varlen(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's 1-D ``t`` (lengths may differ), in rank order."""
        if not self.distributed:
            return [t]
        n = self.gather(torch.tensor([t.numel()], dtype=torch.long, device=t.device))[:, 0]
        width = int(n.max())
        padded = torch.zeros(width, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        return [row[: int(k)] for row, k in zip(self.gather(padded), n)]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.long, device=self.device)
        return bool(self.sum_(t).item())


_WORLD: World | None = None


def accelerate_plugin() -> str | None:
    """What an ``accelerate launch`` config asked for: ``"fsdp2"``, ``"fsdp1"``, ``"deepspeed"``
    or None (read from the environment accelerate sets for the processes it starts)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    return None


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's world, joining the process group on first use when launched."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    _WORLD = World(
        rank=state.process_index,
        size=state.num_processes,
        local_rank=state.local_process_index,
        device=state.device,
    )
    return _WORLD


# ------------------------------------------------------------------------------------ row shards
@dataclass
class Shard:
    """This rank's slice of each tensor, for sharded selection.

    ``numels[name]`` entries of the tensor live on this rank, starting at global flat position
    ``offsets[name]``; a rank's slice follows the previous rank's (rows split in rank order).
    """

    world: World
    numels: dict[str, int]
    offsets: dict[str, int]

    def local_indices(self, name: str, indices: torch.Tensor) -> torch.Tensor:
        """The entries of sorted global ``indices`` that fall in this rank's slice, made local."""
        lo = self.offsets[name]
        a, b = span(indices, lo, lo + self.numels[name])
        return indices[a:b] - lo


def shard_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the whole model (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    mark_sharded(model)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the largest ``ModuleList`` in the model."""
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best):
            best = list(m)
    return best
