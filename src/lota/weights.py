"""A model folder's weights read lazily, one parameter at a time, and fingerprints of models.

``WeightReader`` reads a checked folder's parameters by their in-memory names from its (sharded)
safetensors files, never building the model; the folder's fingerprint can be hashed as the
tensors stream past. ``differing_weight`` compares a loaded model with a folder where the model
is, so that a model holding the folder's weights shares its fingerprint without hashing it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .digests import fingerprint, weight_digest
from .errors import InputError
from .model_folder import checked_headers, resolve_model_path
from .targets import named_weights, resolve_targets, untied_copy


def model_fingerprint(model: nn.Module, untied_written: bool = False) -> str:
    """The fingerprint of the model's weights. An output head lota untied from the input
    embedding (``targets.untie_embeddings``) counts, while it still equals the embedding, as the
    tie it replaced: the model keeps its tied base's fingerprint, so deltas made for the tied base
    folder fit it. With ``untied_written`` (a delta on that embedding was added: the model is the
    untied folder ``lota apply`` writes) the head counts, as it does in that folder."""
    copy = untied_copy(model, untied_written)
    return fingerprint((n, w) for n, w in named_weights(model).items() if n != copy)


def differing_weight(model: nn.Module, reader: WeightReader) -> str | None:
    """The first parameter of ``model`` (by name) whose name, shape or values differ from the
    folder ``reader`` reads, or None when the model holds the folder's weights exactly: then the
    two have one fingerprint, and the folder's (``reader.fingerprint()``, hashed from the host's
    copy as it is read, see ``hash_while_reading``) is the model's without hashing it again. Values
    are compared as fingerprints see them (16-bit floats widened to float32, bit for bit), on the
    parameter's device: a GPU's weights never come over to the host."""
    live = named_weights(model)
    names = sorted(set(live) | set(reader.shapes))
    for name in names:
        if name not in live or name not in reader.shapes:
            return name
        p = live[name].detach()
        if tuple(p.shape) != reader.shapes[name] or not _same_values(p, reader.get(name)):
            return name
    return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit as ``weight_digest`` hashes them (floats widened to float32)."""

    def widened(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        return t.contiguous().reshape(-1)

    a, b = widened(a), widened(b.to(a.device))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        kind = torch.int64 if a.dtype == torch.float64 else torch.int32
        a, b = a.view(kind), b.view(kind)
    return torch.equal(a, b)


class WeightReader:
    """Read a model folder's parameters one at a time, by their in-memory names, from the
    (sharded) safetensors files transformers would load, after their headers were checked against
    the config. A parameter stored under another key, or fused from several (experts), is read
    through transformers' own conversion (``KeyMap``)."""

    def __init__(self, path: str, what: str = "model"):
        self.folder = resolve_model_path(path, what)
        self.skeleton, self.where, self.keymap = checked_headers(self.folder)
        self.shapes = {n: tuple(p.shape) for n, p in named_weights(self.skeleton).items()}
        self._digests: dict = {}  # name -> hex digest, or a future of one
        self._pool = None

    def get(self, name: str) -> torch.Tensor:
        t = self._read(name)
        if self._pool is not None and name not in self._digests:
            self._bound_pending()
            self._digests[name] = self._pool.submit(weight_digest, t)
        return t

    __getitem__ = get

    def _read(self, name: str) -> torch.Tensor:
        """One parameter from the files (``get`` without hashing it in the background: what
        ``fingerprint``'s own threads read, so they never touch ``_digests``)."""
        from safetensors import safe_open

        if not self.keymap.sources(name):
            raise InputError(
                f"tensor '{name}' is not in the weight files",
                str(self.folder),
                "the weights do not match the config's architecture",
            )

        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}  # each file opened once for a fused parameter's keys

            def read_key(key: str) -> torch.Tensor:
                f = self.where[key]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                return handles[f].get_tensor(key)

            return self.keymap.read(name, read_key)

    def hash_while_reading(self) -> None:
        """Hash each tensor the first time it is read, in a background thread, so that
        ``fingerprint`` costs no extra pass over the files (hashing runs beside the caller's work)."""
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lota-hash")

    def _bound_pending(self, most: int = 4) -> None:
        pending = [f for f in self._digests.values() if not isinstance(f, str) and not f.done()]
        for f in pending[: max(0, len(pending) - most + 1)]:
            f.result()  # tensors wait in the queue; keep only a few of them alive at once

    def targets(self, pattern: str | None = None) -> dict[str, tuple[int, ...]]:
        return resolve_targets(self.skeleton, pattern)

    def fingerprint(self) -> str:
        items = []
        for n in self.shapes:
            d = self._digests.get(n)
            if d is None:
                items.append((n, lambda n=n: self._read(n)))
            else:
                items.append((n, d if isinstance(d, str) else d.result()))
        return fingerprint(items)
