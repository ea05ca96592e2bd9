"""Crash-safe checkpoints of ``lota adapt``, so a killed run continues where it stopped.

A checkpoint is one safetensors file, ``OUT/.lota-checkpoint/state.safetensors``, written
atomically: the phase and step, the trainable tensors by name, the optimizer state, the loss scale
of float16 training, the torch RNG states (CPU, and the current GPU's) and how many batches the data stream has served; the ticket of the sparse phase sits beside
it as a lota ticket file, and ``run.json`` marks the folder as a run of these settings from its
very first write, so a run killed before its first checkpoint is still recognised as lota's own and
simply starts again. Invariant: resuming from a checkpoint and running to the end gives the
same bits as a run that was never interrupted (on the same machine, same seed), because every
input of the remaining steps is restored exactly. Nothing is pickled: optimizer state is split
into tensors (safetensors) and plain values (JSON).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from . import events
from . import format as fmt
from .digests import tensor_digest
from .errors import FormatError
from .fileio import atomic_path, fault, save_safetensors, write_json
from .ticket import Ticket

DIRNAME = ".lota-checkpoint"
VERSION = 1
# Settings that do not change the result; a checkpoint is resumable whatever their values.
NEUTRAL = (
    "progress",
    "force",
    "resume",
    "restart",
    "checkpoint_every",
    "report_to",
    "dist_timeout",
)
# Settings added after runs were written, at the values that read data as before: they leave a
# run's hash what it was, so a run interrupted under an earlier lota still resumes.
ADDED = {
    "split": None,
    "prompt_field": "prompt",
    "completion_field": "completion",
    "messages_field": "messages",
    "text_field": "text",
}


def config_hash(config: dict) -> str:
    relevant = {
        k: v
        for k, v in sorted(config.items())
        if k not in NEUTRAL and not (k in ADDED and v == ADDED[k])
    }
    return hashlib.blake2b(
        json.dumps(relevant, sort_keys=True, default=str).encode(), digest_size=12
    ).hexdigest()


class Checkpointer:
    def __init__(self, out: Path, config: dict, every: int, writer: bool = True):
        self.dir = Path(out) / DIRNAME
        self.hash = config_hash(config)
        self.every = every
        self.base_fingerprint = ""
        self.writer = writer  # with several processes only the main one writes

    @property
    def state_path(self) -> Path:
        return self.dir / "state.safetensors"

    @property
    def ticket_path(self) -> Path:
        return self.dir / "ticket.safetensors"

    @property
    def started_path(self) -> Path:
        return self.dir / "run.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def mark_started(self) -> None:
        """Mark the folder as holding a run of these settings, before anything else is written."""
        if not self.writer:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(
            self.started_path,
            {"format": "lota", "kind": "run", "format_version": 1, "config_hash": self.hash},
        )

    def started_hash(self) -> str | None:
        """The settings hash of the run that marked this folder; None without a readable mark."""
        try:
            return json.loads(self.started_path.read_text(encoding="utf-8"))["config_hash"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def matches(self) -> bool:
        try:
            with safe_open(str(self.state_path), framework="pt") as f:
                return (f.metadata() or {}).get("config_hash") == self.hash
        except Exception:
            return False

    def clear(self) -> None:
        if not self.writer:
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------------
    def save_ticket(self, ticket: Ticket) -> None:
        events.emit("checkpoint_start", what="ticket", path=self.ticket_path)
        if not self.writer:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fmt.save(ticket, self.ticket_path, config={"checkpoint_config_hash": self.hash})
        events.emit("checkpoint_saved", what="ticket", path=self.ticket_path)

    def save(
        self,
        phase: str,
        step: int,
        params: dict[str, torch.Tensor],
        optimizer,
        batches: int,
        metric_lines: int,
        scaler: dict | None = None,
    ) -> None:
        events.emit("checkpoint_start", phase, step, what="state", path=self.state_path)
        # Sharded (FSDP2) tensors are gathered first, by every rank in the same order.
        tensors = {f"param/{n}": _whole(p) for n, p in params.items()}
        scalars: dict = {}
        if optimizer is not None:
            for i, state in optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"opt/{i}/{key}"] = _whole(value)
                    else:
                        scalars[f"{i}/{key}"] = value
        if not self.writer:
            return
        tensors["rng/torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()  # dropout on the GPU draws from it
        scalars_json = json.dumps(scalars)
        checksums = json.dumps({k: tensor_digest(t) for k, t in tensors.items()})
        meta = {
            "format": "lota",
            "kind": "checkpoint",
            "format_version": str(VERSION),
            "config_hash": self.hash,
            "base_fingerprint": self.base_fingerprint,
            "phase": phase,
            "step": str(step),
            "batches": str(batches),
            "metric_lines": str(metric_lines),
            "optimizer_scalars": scalars_json,
            "loss_scaler": json.dumps(scaler),
            "checksums": checksums,
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.state_path) as tmp:
            save_safetensors(tensors, tmp, meta)
            fault("checkpoint-save")
        events.emit("checkpoint_saved", phase, step, what="state", path=self.state_path)

    def maybe_save(self, phase: str, step: int, last_step: int | None, **kw) -> None:
        """Save every ``every`` steps and at ``last_step`` (None: only every ``every`` steps)."""
        if step == last_step or (self.every > 0 and step % self.every == 0):
            self.save(phase, step, **kw)

    # -- reading ---------------------------------------------------------------------------------
    def load(self, shapes: dict | None = None) -> dict:
        try:
            with safe_open(str(self.state_path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            sums = json.loads(meta["checksums"])
            if set(sums) != set(tensors) or any(
                tensor_digest(t) != sums[k] for k, t in tensors.items()
            ):
                raise ValueError("checksums do not match")
            state = {
                "base_fingerprint": meta["base_fingerprint"],
                "phase": meta["phase"],
                "step": int(meta["step"]),
                "batches": int(meta["batches"]),
                "metric_lines": int(meta["metric_lines"]),
                "params": {
                    k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")
                },
                "rng": tensors["rng/torch"],
                "cuda_rng": tensors.get("rng/cuda"),
                "optimizer": _optimizer_state(tensors, json.loads(meta["optimizer_scalars"])),
                "scaler": json.loads(meta.get("loss_scaler", "null")),
            }
        except (KeyError, ValueError, OSError, RuntimeError) as e:
            raise FormatError(
                f"the checkpoint is unreadable ({e})",
                str(self.state_path),
                "delete the folder to start over, or pass --restart",
            ) from None
        ticket = self.ticket_path
        state["ticket"] = fmt.load(ticket, shapes=shapes) if ticket.exists() else None
        return state


def _whole(t: torch.Tensor) -> torch.Tensor:
    from .shards import full_tensor

    return full_tensor(t.detach()).contiguous().cpu()


def _optimizer_state(tensors: dict, scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, key = k.split("/", 2)
            state.setdefault(int(i), {})[key] = v
    for k, v in scalars.items():
        i, key = k.split("/", 1)
        state.setdefault(int(i), {})[key] = v
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore per-parameter state into an optimizer built with the same settings (each saved
    tensor of a parameter's shape is laid out like that parameter, sharded or not)."""
    from .shards import shard_like

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {
        i: {
            key: shard_like(v, params[i])
            if isinstance(v, torch.Tensor) and v.shape == params[i].shape and v.dim() > 0
            else v
            for key, v in entry.items()
        }
        for i, entry in state.items()
    }
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
