"""Row shards: how FSDP2's ``Shard(0)`` lays a tensor's rows over the ranks of a run.

Rank ``r`` of ``n`` holds rows ``row_range(rows, r, n)`` of every sharded tensor (as
``torch.chunk`` splits them), so a tensor's entries in row-major order are the concatenation of
the ranks' slices. The functions also take plain (unsharded) tensors, as the whole tensor.
"""

from __future__ import annotations

import torch


def span(indices: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """``(a, b)`` such that ``indices[a:b]`` are the sorted ``indices`` in ``[lo, hi)``."""
    bounds = torch.tensor([lo, hi], dtype=indices.dtype, device=indices.device)
    a, b = torch.searchsorted(indices, bounds).tolist()
    return a, b


def row_range(rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a dim-0 shard, as FSDP2's ``Shard(0)`` splits them (torch.chunk)."""
    per = -(-rows // size)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(local tensor, first row)`` of a parameter: its FSDP2 shard, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        mesh = t.device_mesh
        start, stop = row_range(t.shape[0], mesh.get_local_rank(), mesh.size())
        local = t.to_local()
        assert local.shape[0] == stop - start, "unexpected FSDP2 shard layout"
        return local, start
    return t, 0


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call it), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's rows as a DTensor when ``like`` is one (every
    rank must hold the same ``full``), else ``full`` itself."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return full
    mesh = like.device_mesh
    start, stop = row_range(like.shape[0], mesh.get_local_rank(), mesh.size())
    local = full[start:stop].to(device=like.to_local().device, dtype=like.dtype).clone()
    return DTensor.from_local(
        local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )
