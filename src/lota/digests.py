"""Digests of tensors: a file's checksums, and the fingerprint of a model's base weights.

``tensor_digest`` hashes a tensor exactly as stored (a file's checksums). ``fingerprint`` names a
set of base weights by their names, shapes and values, whatever precision they were loaded in:
each weight is hashed on its own (``weight_digest``, 16-bit floats widened to float32) and the
digests are combined in name order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable

import torch

from . import events


def tensor_digest(t: torch.Tensor) -> str:
    """A short content hash of one tensor exactly as stored (dtype, shape and bytes)."""
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# Threads that hash the tensors of one fingerprint: the host's cores, up to 4.
HASH_THREADS = min(4, os.cpu_count() or 1)


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
    items = sorted(named_tensors, key=lambda kv: kv[0])

    def digest(t) -> str:
        return t if isinstance(t, str) else weight_digest(t() if callable(t) else t)

    # hashing releases the GIL: several tensors at once, each read or widened only when its
    # turn comes (at most ``workers`` of them alive), combined in name order as before
    workers = min(HASH_THREADS, len(items)) or 1
    if workers == 1:
        digests = [digest(t) for _, t in items]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers, thread_name_prefix="lota-fingerprint") as pool:
            digests = list(pool.map(digest, [t for _, t in items]))
    h = hashlib.blake2b(digest_size=16)
    for (name, _), d in zip(items, digests):
        h.update(f"{name}|{d}\n".encode())
    return "blake2b:" + h.hexdigest()


def weight_digest(t: torch.Tensor) -> str:
    """Digest of one weight's shape and values (fp16/bf16 widened to fp32 exactly)."""
    events.emit("weight_hashed", numel=t.numel())
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()
    t = t.contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{'float' if t.is_floating_point() else t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # hashlib releases the GIL here
    return h.hexdigest()
