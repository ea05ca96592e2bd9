"""The output folder of a ``lota adapt`` run: its lock, resuming an interrupted run, recognising
a finished one, and writing the run's outputs.

A run refused for bad input leaves nothing behind; any other failure (a kill, a full disk,
divergence) keeps what the same command resumes from. Every file is written atomically.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import dist
from . import format as fmt
from .adapt_config import AdaptConfig
from .checkpoint import DIRNAME, Checkpointer, config_hash
from .errors import InputError, LotaError
from .fileio import (
    LOCKNAME,
    FolderLock,
    atomic_dir,
    create_folder,
    fault,
    remove_folders,
    remove_stale_temporaries,
    save_safetensors,
    write_json,
    write_text,
)
from .models import save_model
from .targets import untied_record

# What a run writes into --out. A folder holding only these (and lota's temporaries of them) and
# marked by a run of the same settings is that run, interrupted, and the same command takes it up.
RUN_FILES = (
    DIRNAME,
    "metrics.jsonl",
    "config.yaml",
    "delta.safetensors",
    "summary.json",
    "model",
    "adapter",
    "tensorboard",
    LOCKNAME,
)


def foreign_files(out: Path) -> list[str]:
    def own(name: str) -> bool:
        # temporaries, and the lock of a folder swap (``atomic_dir``) a kill left behind
        temporary = name.startswith(".") and name.endswith((".tmp", ".old", ".new", ".lock"))
        return name in RUN_FILES or (
            temporary and any(name.startswith(f".{f}.") for f in RUN_FILES)
        )

    return sorted(p.name for p in out.iterdir() if not own(p.name))


def checkpointer(cfg: AdaptConfig, out: Path, world: dist.World) -> tuple[Checkpointer, bool]:
    """Decide between a fresh start and resuming; refuse to clobber anything else in ``out``.
    Every rank decides the same, once the main process holds the folder's lock; only the main
    process writes."""
    ckpt = Checkpointer(out, asdict(cfg), cfg.checkpoint_every, writer=world.main)
    if ckpt.dir.exists() and world.main:  # an interrupted run: its half-written temporaries
        remove_stale_temporaries(out)
        remove_stale_temporaries(ckpt.dir)
    if ckpt.dir.exists() and cfg.restart:
        return ckpt, False  # the interrupted run's files are replaced
    if ckpt.exists():
        if not ckpt.matches():
            raise InputError(
                "the output folder holds a checkpoint of a run with other settings",
                str(out),
                "rerun the same command to resume it, or pass --restart to discard it",
            )
        return ckpt, True
    if ckpt.dir.exists() and not cfg.force:  # a run killed before its first checkpoint
        if ckpt.started_hash() not in (None, ckpt.hash):
            raise InputError(
                "the output folder holds a run with other settings, stopped before its first "
                "checkpoint",
                str(out),
                "rerun that run's command, or pass --restart to discard it",
            )
        foreign = foreign_files(out)
        if foreign:
            raise InputError(
                f"output folder holds files lota did not write ({', '.join(foreign[:3])})",
                str(out),
                "choose a new --out, or pass --force to replace lota's files in it",
            )
        return ckpt, False  # lota's own, with nothing to resume: it starts again
    if ckpt.dir.exists():
        return ckpt, False
    if cfg.resume:
        raise InputError(
            "there is no checkpoint to resume", str(out), "run without --resume to start"
        )
    if any(p.name != LOCKNAME for p in out.iterdir()) and not cfg.force:
        raise InputError(
            "output folder exists and is not empty",
            str(out),
            "choose a new --out, or pass --force to replace lota's files in it",
        )
    return ckpt, False


@dataclass
class Hold:
    """The main process's hold on ``--out`` while a run writes there: the folder's lock, the
    folders this run created, and whether it has begun writing. A run refused for bad input
    leaves nothing behind; any other failure (a kill, a full disk, divergence) keeps what the
    same command resumes from."""

    out: Path
    lock: FolderLock | None = None
    created: list[Path] = field(default_factory=list)
    started: bool = False

    @classmethod
    def take(cls, out: Path, world: dist.World) -> Hold:
        """Lock ``out`` (creating it if needed) before anything there is read or written. Only
        the main process locks: the ranks of one run share its folder, and its lock."""
        hold, error = cls(out), None
        if world.main:
            try:
                hold.created = create_folder(out)
                hold.lock = FolderLock(out, follow_link=True).acquire()
            except LotaError as e:
                error = e
                remove_folders(hold.created)
        if world.any(error is not None):
            raise error or InputError(
                "the main process could not lock the output folder", str(out), "see its message"
            )
        fault("locked")
        return hold

    def close(self, error: BaseException | None) -> None:
        if self.lock is None:
            return
        bad_input = isinstance(error, InputError)
        if bad_input and self.started and not self.created:
            shutil.rmtree(self.out / DIRNAME, ignore_errors=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.lock.release()
        if error is not None and self.created and (bad_input or not self.started):
            remove_folders(self.created)


def finished(cfg: AdaptConfig, out: Path) -> dict | None:
    """The summary of a run of these settings that already finished in ``out``, or None.

    A run killed after its last write (or simply run twice) is complete: the same command then
    reports it and changes nothing, as resuming it would end with the same bits."""
    if cfg.force or cfg.restart or (out / DIRNAME).exists():
        return None
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        written = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    outputs = [out / "delta.safetensors"] + ([out / "model"] if cfg.save_model else [])
    if (
        not isinstance(written, dict)
        or not isinstance(summary, dict)
        or summary.get("kind") != "summary"
        or config_hash(written) != config_hash(asdict(cfg))
        or not all(p.exists() for p in outputs)
        or foreign_files(out)
    ):
        return None
    return {k: v for k, v in summary.items() if k not in ("format", "kind", "format_version")}


def save_adapter(adapter: dict, folder: Path, base_fp: str) -> int:
    """Write the adapter as a PEFT adapter folder (loadable with ``PeftModel.from_pretrained``)
    atomically; returns the size of its weights file."""
    with atomic_dir(folder) as tmp:
        save_safetensors(
            adapter["tensors"],
            tmp / "adapter_model.safetensors",
            metadata={
                "format": "pt",  # what PEFT reads; the rest says what it is to lota
                "lota_kind": "lora-adapter",
                "lota_format_version": "1",
                "base_fingerprint": base_fp,
            },
        )
        adapter["config"].save_pretrained(str(tmp))
    return (folder / "adapter_model.safetensors").stat().st_size


def write_outputs(
    cfg: AdaptConfig, out: Path, delta, values_dtype: str, adapter, model, tokenizer, info: dict
) -> None:
    """Write the run's delta, its values in ``values_dtype`` (its file records the resolved
    settings), the LoRA adapter if one was trained, ``config.yaml`` and, with ``--save-model``,
    the trained model folder; their sizes go into ``info``. The summary is written last, by
    ``write_summary``."""
    resolved = asdict(cfg)
    base_fp = info["base_fingerprint"]
    info["delta_bytes"] = fmt.save(
        delta, out / "delta.safetensors", config=resolved, values_dtype=values_dtype
    )
    fault("after-delta")
    if adapter is not None:
        info["adapter_bytes"] = save_adapter(adapter, out / "adapter", base_fp)
    write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    if cfg.save_model:
        save_model(
            model,
            tokenizer,
            out / "model",
            extra={
                "kind": "model",
                "format": "lota",
                "format_version": 1,
                "base_fingerprint": base_fp,
                "method": cfg.method,
                "delta": "../delta.safetensors",
                **untied_record(model),
            },
        )


def write_summary(out: Path, info: dict) -> None:
    """``summary.json``: the run's summary, the last file a run writes."""
    write_json(
        out / "summary.json", {"format": "lota", "kind": "summary", "format_version": 1, **info}
    )
