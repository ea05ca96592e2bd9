"""The training loop shared by every phase: calibration, sparse training, FFT and LoRA.

It trains whatever parameters it is given, so what is frozen is decided by the caller (``prepare``
for tickets). Metrics go to a JSONL file as they happen; a non-finite loss stops the run.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import events
from .checkpoint import load_optimizer_state
from .dist import World
from .errors import InputError, TrainingError
from .fileio import fault, write_text
from .names import OPTIMIZERS
from .precision import Precision


@dataclass
class TrainSettings:
    lr: float
    steps: int
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0


def make_optimizer(params: list[nn.Parameter], s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=s.lr, weight_decay=s.weight_decay, **adamw_implementation(params)
        )
    if (
        s.optimizer == "rmsprop"
    ):  # the official LoTA setting: no momentum, no weight decay by default
        return torch.optim.RMSprop(
            params, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum
        )
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum)
    raise InputError(
        f"unknown optimizer '{s.optimizer}'",
        "--optimizer",
        f"choose one of {', '.join(OPTIMIZERS)}",
    )


M_MMAP_THRESHOLD = -3
# Where glibc's own adaptive mmap threshold settles on a 64-bit host (its ceiling, 32 MiB): what
# ``heap_growth_limited`` leaves behind, as glibc cannot be told to adapt again once it was set.
ADAPTIVE_MMAP_CEILING = 32 << 20


def _on_cuda(p: torch.Tensor) -> bool:
    return p.device.type == "cuda"


def adamw_implementation(params: list[nn.Parameter]) -> dict:
    """AdamW's implementation for ``params``: ``fused`` (one kernel per step, the step counters
    on the device, no host sync under a loss scaler) when every parameter is a floating-point CUDA
    tensor; ``foreach`` where some are on a GPU; on the CPU torch's own loop, one parameter at a
    time (``foreach`` would hold a temporary of every parameter at once: 4 more bytes per trained
    entry at the peak). The loop and ``foreach`` give the same bits; ``fused`` rounds otherwise."""
    on_cuda = [_on_cuda(p) for p in params]
    if params and all(on_cuda) and all(p.is_floating_point() for p in params):
        return {"fused": True}
    if any(on_cuda):
        return {"foreach": True}
    return {}


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more from mmap and hand them back when freed.

    The sparse phase allocates a transient dense gradient per weight, one layer at a time. glibc's
    adaptive threshold would soon serve those from the heap, which then fragments and grows by
    tens of MB per step; a fixed threshold keeps the process at its true working set, at the cost
    of page faults on each such allocation. A no-op where glibc is not the allocator. The setting
    is process-wide: a phase uses ``heap_growth_limited``, which undoes it.
    """
    libc = _glibc()
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) if libc is not None else False


@contextlib.contextmanager
def heap_growth_limited(device: torch.device | str, threshold: int = 1 << 20):
    """``limit_heap_growth`` for the phase inside the block, where it computes on the CPU (on a
    GPU the dense gradients are the device's, the host allocates little); afterwards large
    allocations are served as glibc's adaptive threshold would settle (``ADAPTIVE_MMAP_CEILING``),
    so the rest of the process (another run, in the lab) does not pay the phase's page faults."""
    limited = torch.device(device).type == "cpu" and limit_heap_growth(threshold)
    try:
        yield limited
    finally:
        if limited:
            limit_heap_growth(ADAPTIVE_MMAP_CEILING)


def _glibc():
    """glibc's allocator controls (``mallopt``, ``malloc_trim``), or None where glibc is not the
    C library."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory(device: torch.device | None = None) -> None:
    """Hand memory freed by an earlier phase back to the system (glibc's ``malloc_trim``; on a GPU,
    the caching allocator's unused blocks), so the next phase starts from its true working set."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux), so a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB, or None where the
    kernel does not provide it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """This process's resident memory now, in MiB (Linux), or None where it cannot be read."""
    return _status_mb("VmRSS")


def current_peak_rss_mb() -> float:
    """Peak resident memory since the last ``reset_peak_rss`` (or process start), in MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class MetricsLog:
    """Appends one JSON object per line; ``None`` path keeps records in memory only.

    ``keep`` lines of an existing file are kept (a resumed run continues the log of its
    checkpoint); anything after them, logged after that checkpoint, is dropped. With
    ``tensorboard`` (a folder), every numeric field also goes to TensorBoard as ``FIELD/PHASE``,
    its step being the record's line number (so a resumed run purges what came after ``keep``).
    """

    def __init__(
        self, path: str | Path | None, keep: int = 0, tensorboard: str | Path | None = None
    ):
        self.writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError(
                    "--report-to tensorboard needs the tensorboard package",
                    "--report-to",
                    "pip install tensorboard",
                ) from None
            self.writer = SummaryWriter(log_dir=str(tensorboard), purge_step=keep + 1)
        self.path = Path(path) if path else None
        self.records: list[dict] = []
        if self.path is not None:
            lines = (
                self.path.read_text(encoding="utf-8").splitlines()[:keep]
                if keep and self.path.exists()
                else []
            )
            self.records = [json.loads(x) for x in lines]
            write_text(self.path, "".join(x + "\n" for x in lines))

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("phase", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{key}/{record['phase']}", value, len(self.records))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def micro_batches(batch: dict[str, torch.Tensor], world: World, accum: int) -> list[dict]:
    """This rank's ``accum`` micro-batches of a global batch split into ``world.size * accum``
    equal parts (rank r takes parts ``r*accum .. r*accum + accum - 1``)."""
    parts = world.size * accum
    size = batch["input_ids"].shape[0] // parts
    first = world.rank * accum
    return [
        {
            k: v[(first + a) * size : (first + a + 1) * size].to(world.device)
            for k, v in batch.items()
        }
        for a in range(accum)
    ]


def train(
    model: nn.Module,
    params: list[nn.Parameter],
    data: Iterator[dict],
    s: TrainSettings,
    phase: str,
    log: MetricsLog,
    show_progress: bool = True,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    world: World | None = None,
    grad_accum: int = 1,
    sharded: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    precision: Precision | None = None,
    scaler_state: dict | None = None,
) -> list[float]:
    """Run optimizer steps ``start_step + 1 .. s.steps`` on ``params``; returns their losses.

    ``optimizer_state`` (from a checkpoint) is restored first; ``on_step(step, optimizer)`` runs
    after every step, which is where checkpoints are written. Each step averages the gradients of
    ``grad_accum`` micro-batches per process; with several processes the model is wrapped in
    ``DistributedDataParallel`` for the phase, unless it is ``sharded`` (FSDP2) already.
    ``optimizer``: one built over ``params`` already, instead of the one ``s`` names.
    ``precision``: autocast and loss scaling (``lota.precision``); ``scaler_state`` restores the
    loss scale of a checkpoint. Peak GPU memory and real (non-pad) tokens per second are logged.
    """
    world = world or World()
    precision = precision or Precision(world.device.type)
    precision.load_state(scaler_state)
    opt = _phase_optimizer(params, s, optimizer, optimizer_state)
    model.train()
    forward = _distributed(model, world, sharded)
    # training never reads a KV cache: building one would only cost memory
    no_cache = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
    losses = []
    bar = _progress_bar(phase, start_step, s.steps, show_progress and world.main)
    events.emit("phase_start", phase, start_step)
    _reset_peak_memory(world)
    start = time.perf_counter()
    tokens = 0
    for step in bar:
        t_step = time.perf_counter()
        batch = next(data)
        try:
            totals = _accumulate(forward, model, batch, precision, grad_accum, no_cache, world)
            loss_sum, token_sum, completion_sum = world.sum_(totals).tolist()
            mean_loss = loss_sum / (world.size * grad_accum)
            _check_finite(mean_loss, step, phase)
            if s.max_grad_norm:
                precision.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            stepped = precision.step(opt)
            opt.zero_grad(set_to_none=True)
        except (torch.OutOfMemoryError, MemoryError):
            raise TrainingError(
                f"out of memory at step {step + 1} of {phase}",
                fix="lower --batch-size or --max-length, or add --gradient-checkpointing "
                "(or use a smaller --dtype)",
            ) from None
        tokens += int(token_sum)
        elapsed = time.perf_counter() - start
        losses.append(mean_loss)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        record = _step_record(
            phase, step, losses[-1], s.lr, completion_sum, tokens, elapsed, t_step, world
        )
        _add_precision(record, precision, stepped)
        log.write(record)
        if on_step is not None:
            on_step(step + 1, opt)
        events.emit("step_end", phase, step + 1, metrics=record)
        fault(f"{phase}:{step + 1}")
    bar.close()
    events.emit("phase_end", phase, s.steps)
    model.eval()
    return losses


def _phase_optimizer(
    params: list[nn.Parameter],
    s: TrainSettings,
    optimizer: torch.optim.Optimizer | None,
    optimizer_state: dict | None,
) -> torch.optim.Optimizer:
    """The phase's optimizer (the one given, or the one ``s`` names), its checkpointed state
    restored; no parameters to train is refused."""
    if not params:
        raise InputError(
            "nothing to train: no trainable parameters", fix="check --targets and the ticket"
        )
    opt = optimizer if optimizer is not None else make_optimizer(params, s)
    if optimizer_state:
        load_optimizer_state(opt, optimizer_state)
    return opt


def _distributed(model: nn.Module, world: World, sharded: bool) -> nn.Module:
    """What the phase calls forward: with several processes (and no FSDP2 sharding) the model
    wrapped in ``DistributedDataParallel``, else the model itself."""
    if not world.distributed or sharded:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # every rank built the same model from the same files: no initial broadcast is needed,
    # and buffers (the ticket's positions and base values) never change
    return DistributedDataParallel(
        model, device_ids=_device_ids(world), init_sync=False, broadcast_buffers=False
    )


def _progress_bar(phase: str, start_step: int, steps: int, show: bool):
    return tqdm(
        range(start_step, steps),
        desc=phase,
        unit="step",
        disable=not show,
        leave=False,
        file=sys.stderr,
        initial=start_step,
        total=steps,
    )


def _reset_peak_memory(world: World) -> None:
    """Restart the peak counters (resident memory; on a GPU, its allocator's), so the phase's
    own peaks are logged."""
    reset_peak_rss()
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)


def _accumulate(
    forward: nn.Module,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    precision: Precision,
    grad_accum: int,
    no_cache: dict,
    world: World,
) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches, gradients accumulating (synchronized
    across ranks on the last only); returns the sums of loss, tokens and completion tokens."""
    # summed over micro-batches, then ranks: loss, tokens, completion tokens; on the
    # device, read once per step (a read per micro-batch would wait for each)
    totals = torch.zeros(3, dtype=torch.float64, device=world.device)
    micro = micro_batches(batch, world, grad_accum)
    for a, mb in enumerate(micro):
        last = a == len(micro) - 1
        with contextlib.nullcontext() if last or forward is model else forward.no_sync():
            with precision.autocast():
                loss = forward(**mb, **no_cache).loss
            precision.backward(loss / grad_accum)
        totals += torch.stack(
            [
                loss.detach().double(),
                mb["attention_mask"].sum().double(),
                (mb["labels"] != -100).sum().double(),
            ]
        )
    return totals


def _check_finite(mean_loss: float, step: int, phase: str) -> None:
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"the loss became {mean_loss} at step {step + 1} of {phase}",
            fix="lower --lr (or --calibration-lr) or enable gradient clipping; "
            "the last checkpoint is kept",
        )


def _step_record(
    phase: str,
    step: int,
    loss: float,
    lr: float,
    completion_sum: float,
    tokens: int,
    elapsed: float,
    t_step: float,
    world: World,
) -> dict:
    """The metrics line of one step: loss, throughput, time and peak memory."""
    record = {
        "phase": phase,
        "step": step + 1,
        "loss": loss,
        "lr": lr,
        "completion_tokens": int(completion_sum),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else math.nan,
        "step_s": round(time.perf_counter() - t_step, 6),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "phase_peak_rss_mb": round(current_peak_rss_mb(), 1),
        "elapsed_s": round(elapsed, 3),
    }
    if world.device.type == "cuda":
        record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(world.device) / 2**20, 1)
    return record


def _add_precision(record: dict, precision: Precision, stepped: bool) -> None:
    """Under a loss scaler: the scale, and whether the step was skipped (an overflow)."""
    if precision.scaler is not None:
        record["loss_scale"] = precision.scale
        record["skipped"] = not stepped


def _device_ids(world: World) -> list[int] | None:
    return [world.device.index] if world.device.type == "cuda" else None
