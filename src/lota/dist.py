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

import contextlib
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import InputError

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

    def check_same_weights(self, fingerprint: str, where: str) -> None:
        """Refuse, on every rank at once, a run whose ranks loaded different weights (each
        rank's fingerprint of what it loaded, gathered)."""
        if not self.distributed:
            return
        mine = torch.tensor(list(bytes.fromhex(fingerprint.split(":")[-1])), dtype=torch.long)
        table = self.gather(mine.to(self.device)).cpu()
        other = [r for r in range(self.size) if not torch.equal(table[r], table[0])]
        if other:
            ranks = ", ".join(map(str, other))
            raise InputError(
                f"process(es) {ranks} loaded other weights than process 0 (their fingerprints "
                "differ)",
                where,
                "give every process the same model folder (a shared filesystem, or identical "
                "copies)",
            )

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


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str = "auto", option: str = "--device") -> torch.device:
    """The device ``spec`` names for this process: ``auto`` is CUDA when torch sees a GPU, else the
    CPU; ``cuda`` is ``cuda:0`` in one process and ``cuda:LOCAL_RANK`` under a launcher; ``cuda:N``
    (one process only) is that GPU. A GPU that is not there is refused in one line."""
    text = (spec or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise InputError(
            f"'{spec}' is not a device", option, f"give {DEVICE_CHOICES} (e.g. cuda:1)"
        )
    if not torch.cuda.is_available():
        build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
        raise InputError(
            f"{spec} was asked for but torch sees no CUDA GPU{build}",
            option,
            "use --device cpu (or auto), or install the CUDA build of torch first",
        )
    count = torch.cuda.device_count()
    if m.group(1) is not None:
        index = int(m.group(1))
        if launched():
            raise InputError(
                f"{spec}: under a launcher each process takes the GPU of its LOCAL_RANK",
                option,
                "pass --device cuda (or auto); choose the GPUs with CUDA_VISIBLE_DEVICES",
            )
        if index >= count:
            raise InputError(
                f"{spec}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}",
                option,
                f"choose an index below {count}, or check CUDA_VISIBLE_DEVICES",
            )
        return torch.device("cuda", index)
    index = int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0
    if index >= count:
        raise InputError(
            f"process with LOCAL_RANK {index} has no GPU of its own (torch sees {count})",
            option,
            f"start at most {count} processes per node, or pass --device cpu",
        )
    return torch.device("cuda", index)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """Deterministic kernels inside the block (``--deterministic``), as before it afterwards.

    cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it first runs on a device: it is set here,
    before lota touches CUDA (a value the user set is kept). On the CPU lota's results are
    bit-for-bit reproducible either way; on a GPU, atomics in backward kernels and cuBLAS's
    split reductions otherwise vary from run to run."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# Minutes a process waits in a collective before the run fails: the main process alone writes
# checkpoints, the delta and the model (a 8B model's are tens of GB) while the others wait.
DEFAULT_TIMEOUT_MINUTES = 120.0


def world(device: str | None = None, timeout_minutes: float | None = None) -> World:
    """This process's world, joining the process group on first use when launched.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see ``resolve_device``) chooses where this
    process computes; None keeps the world's device (``auto`` on first use). Under a launcher the
    device is fixed when the process group is joined, and so is ``timeout_minutes`` (how long a
    collective waits; default ``DEFAULT_TIMEOUT_MINUTES``)."""
    global _WORLD
    if _WORLD is not None and (device is None or _WORLD.distributed):
        return _WORLD
    where = resolve_device(device or "auto")
    if where.type == "cuda":
        torch.cuda.set_device(where)  # its RNG and default allocations are this process's
    if not launched():
        _WORLD = World(device=where)
        return _WORLD
    from datetime import timedelta

    from accelerate import PartialState

    minutes = timeout_minutes or DEFAULT_TIMEOUT_MINUTES
    state = PartialState(cpu=where.type == "cpu", timeout=timedelta(minutes=minutes))
    _WORLD = World(
        rank=state.process_index,
        size=state.num_processes,
        local_rank=state.local_process_index,
        device=where,
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
