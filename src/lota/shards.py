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


# Deltas gathered per collective by ``full_tensors``: 256 MiB of float32, so that gathering a
# large model's deltas never holds more than this much beyond the largest one.
BUCKET_ENTRIES = 1 << 26


def full_tensors(ts: list[torch.Tensor], bucket: int = BUCKET_ENTRIES) -> list[torch.Tensor]:
    """``full_tensor`` of each of ``ts`` (a collective: every rank must call it with the same
    list), with one all-gather per ``bucket`` entries instead of one per tensor. Gathered
    together: 1-D DTensors sharded over dim 0 of one mesh, of one dtype (FSDP2's deltas); any
    other tensor is gathered on its own, as ``full_tensor`` does."""
    from torch.distributed.tensor import DTensor

    out: list[torch.Tensor | None] = [None] * len(ts)
    pending: list[int] = []

    def joinable(i: int) -> bool:
        t, first = ts[i], ts[pending[0]] if pending else ts[i]
        return (
            isinstance(t, DTensor)
            and t.dim() == 1
            and t.device_mesh is first.device_mesh
            and t.dtype == first.dtype
        )

    for i, t in enumerate(ts):
        if not (isinstance(t, DTensor) and joinable(i)):
            out[i] = full_tensor(t)
            continue
        pending.append(i)
        if sum(ts[j].shape[0] for j in pending) >= bucket:
            _gather_rows(ts, pending, out)
            pending = []
    if pending:
        _gather_rows(ts, pending, out)
    return out  # type: ignore[return-value]


def _gather_rows(ts: list[torch.Tensor], which: list[int], out: list) -> None:
    """All-gather the 1-D row-sharded DTensors ``ts[which]`` in one collective: each rank sends
    its slices, each padded to the largest slice of its tensor, back to back."""
    mesh = ts[which[0]].device_mesh
    size = mesh.size()
    chunk = [-(-ts[i].shape[0] // size) for i in which]  # torch.chunk's slice length
    local = [ts[i].to_local() for i in which]
    buf = local[0].new_zeros(sum(chunk))
    at = 0
    for piece, c in zip(local, chunk):
        buf[at : at + piece.shape[0]] = piece
        at += c
    gathered = [torch.empty_like(buf) for _ in range(size)]
    torch.distributed.all_gather(gathered, buf, group=mesh.get_group())
    at = 0
    for i, c in zip(which, chunk):
        rows = ts[i].shape[0]
        parts = []
        for r in range(size):
            start, stop = row_range(rows, r, size)
            parts.append(gathered[r][at : at + stop - start])
        out[i] = torch.cat(parts)
        at += c


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
