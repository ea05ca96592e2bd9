"""Atomic file output and fingerprints of base weights.

Invariant: no lota output ever appears under its final name half-written. Files go to a temporary
name in the same folder, are flushed to disk and then renamed; folders are built beside their
final place and renamed into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    _ensure_dir(parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        _fsync(tmp_path)
        fault(f"save:{path.name}")
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``.

    An existing folder at ``path`` is moved aside first and only deleted after the new one is in
    place, so an interruption never leaves neither.
    """
    path = Path(path)
    _ensure_dir(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault(f"save:{path.name}")
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fault(point: str) -> None:
    """Test hook: ``LOTA_FAULT=point`` kills the process with SIGKILL when ``point`` is reached.

    Points are ``calibration:N`` / ``train:N`` (after step N), ``save:NAME`` (a file or folder
    fully written under its temporary name, not yet renamed) and ``checkpoint-save``.
    """
    if os.environ.get("LOTA_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def check_new_folder(path: str | os.PathLike, force: bool, option: str = "--out") -> None:
    """Refuse an output folder that already holds something (or is a file) unless ``force``."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(
            "output exists", str(path), f"choose a new {option}, or pass --force to replace it"
        )


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _ensure_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"cannot create the output folder ({e.strerror})",
            str(folder),
            "choose a writable output location",
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files and folders a killed lota process left behind in ``folder``."""
    for p in Path(folder).glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in Path(folder).glob(".*.old"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def tensor_digest(t: torch.Tensor) -> str:
    """A short content hash of one tensor exactly as stored (dtype, shape and bytes)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint(
    named_tensors: Iterable[tuple[str, torch.Tensor | str | Callable[[], torch.Tensor]]],
) -> str:
    """Fingerprint of a set of base weights: names, shapes and values.

    Each tensor is hashed on its own (``weight_digest``) and the digests are combined in name
    order, so tensors can be hashed in any order, as they stream past, or in parallel. The same
    weights always give the same string, in whichever floating-point precision they were loaded
    (values are hashed widened to fp32). An item may be a tensor, a callable that reads it, or
    its ``weight_digest`` already computed.
    """
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        digest = t if isinstance(t, str) else weight_digest(t() if callable(t) else t)
        h.update(f"{name}|{digest}\n".encode())
    return "blake2b:" + h.hexdigest()


def weight_digest(t: torch.Tensor) -> str:
    """Digest of one weight's shape and values (fp16/bf16 widened to fp32 exactly)."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()
    t = t.contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{'float' if t.is_floating_point() else t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # hashlib releases the GIL here
    return h.hexdigest()
