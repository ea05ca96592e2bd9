"""On-disk format of tickets and sparse deltas (see docs/format.md).

A lota file is a plain safetensors file. Per eligible tensor ``P`` it holds the trainable set in
the smallest of three encodings (``P::mask`` packed bits, ``P::gaps`` gap-coded indices in the
narrowest unsigned integer type, or nothing when the ticket is empty or full) and, for deltas,
``P::values``. The safetensors metadata carries ``format = "lota"``, ``kind``, ``format_version``,
``base_fingerprint`` and a JSON ``header`` (shapes, encodings, counts, per-tensor checksums and the
resolved config). Invariant: ``load(save(x))`` gives back the same indices and bit-identical values.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .delta import SparseDelta
from .errors import FormatError, InputError
from .fileio import atomic_path, tensor_digest
from .ticket import Ticket

FORMAT_NAME = "lota"
FORMAT_VERSION = 1
_SEP = "::"
_GAP_DTYPES = [
    (torch.uint8, 0xFF),
    (torch.uint16, 0xFFFF),
    (torch.uint32, 0xFFFFFFFF),
    (torch.int64, 2**63 - 1),
]
_VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- index encodings
def encode_indices(idx: torch.Tensor, numel: int) -> tuple[str, torch.Tensor | None]:
    """Choose the smallest encoding of sorted unique flat indices in ``[0, numel)``."""
    nnz = int(idx.numel())
    if nnz == 0:
        return "empty", None
    if nnz == numel:
        return "full", None
    prev = torch.cat([idx.new_tensor([-1]), idx[:-1]])
    gaps = idx - prev - 1  # >= 0 because indices are strictly increasing
    max_gap = int(gaps.max())
    gap_dtype = next(dt for dt, hi in _GAP_DTYPES if max_gap <= hi)
    gap_bytes = nnz * torch.empty(0, dtype=gap_dtype).element_size()
    mask_bytes = (numel + 7) // 8
    if mask_bytes < gap_bytes:
        mask = torch.zeros(mask_bytes * 8, dtype=torch.bool)
        mask[idx] = True
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        packed = (mask.view(-1, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)
        return "bitmask", packed
    return "gaps", gaps.to(gap_dtype)


def decode_indices(encoding: str, data: torch.Tensor | None, numel: int, nnz: int) -> torch.Tensor:
    if encoding == "empty":
        return torch.zeros(0, dtype=torch.long)
    if encoding == "full":
        return torch.arange(numel, dtype=torch.long)
    if encoding == "bitmask":
        if data.dtype != torch.uint8 or data.numel() != (numel + 7) // 8:
            raise ValueError("bitmask has the wrong size or type")
        bits = (data.view(-1, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        idx = bits.view(-1).nonzero().view(-1)
        if idx.numel() and int(idx[-1]) >= numel:
            raise ValueError("bitmask marks entries past the end of the tensor")
        return idx
    if encoding == "gaps":
        if data.dim() != 1 or data.numel() != nnz or data.dtype not in [d for d, _ in _GAP_DTYPES]:
            raise ValueError("gap list has the wrong size or type")
        gaps = data.to(torch.long)
        if gaps.numel() and (int(gaps.min()) < 0 or int(gaps.max()) >= numel):
            raise ValueError("gap list has a negative or oversized gap")
        idx = torch.cumsum(gaps + 1, 0) - 1
        if idx.numel() and int(idx[-1]) >= numel:
            raise ValueError("gap list points past the end of the tensor")
        return idx
    raise ValueError(f"unknown index encoding '{encoding}'")


# ---------------------------------------------------------------------------- save
def save(
    obj: Ticket | SparseDelta,
    path: str | os.PathLike,
    config: dict | None = None,
    values_dtype: str | torch.dtype | None = None,
) -> int:
    """Write a ticket or delta atomically; returns the file size in bytes."""
    is_delta = isinstance(obj, SparseDelta)
    ticket = obj.ticket if is_delta else obj
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name in ticket.names:
        if _SEP in name:
            raise InputError(
                f"parameter name '{name}' contains '{_SEP}'", fix="rename the parameter"
            )
        numel = ticket.tensor_numel(name)
        idx = ticket.indices[name]
        encoding, data = encode_indices(idx, numel)
        entry = {"shape": list(ticket.shapes[name]), "nnz": int(idx.numel()), "encoding": encoding}
        if data is not None:
            tensors[f"{name}{_SEP}{_index_key(encoding)}"] = data.contiguous()
        if is_delta:
            v = obj.values[name]
            if values_dtype is not None:
                v = v.to(
                    _VALUE_DTYPES[values_dtype] if isinstance(values_dtype, str) else values_dtype
                )
            if v.numel():
                tensors[f"{name}{_SEP}values"] = v.contiguous()
            entry["values_dtype"] = str(v.dtype).removeprefix("torch.")
        entries[name] = entry
    header = {
        "tensors": entries,
        "numel": ticket.numel,
        "nnz": ticket.nnz,
        "checksums": {k: tensor_digest(t) for k, t in tensors.items()},
        "config": config if config is not None else obj.meta.get("config", {}),
        "created_by": f"lota {__version__}",
    }
    metadata = {
        "format": FORMAT_NAME,
        "kind": obj.kind,
        "format_version": str(FORMAT_VERSION),
        "base_fingerprint": ticket.base_fingerprint,
        "header": json.dumps(header, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path).stat().st_size


def _index_key(encoding: str) -> str:
    return {"bitmask": "mask", "gaps": "gaps"}[encoding]


# ---------------------------------------------------------------------------- load
def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return ``(metadata, header)`` after checking the file is a lota file of a known version."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", str(path), "check the path")
    if path.is_dir():
        raise InputError("is a folder, not a lota file", str(path), "pass a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except PermissionError:
        raise InputError(
            "cannot read the file (permission denied)", str(path), "fix its permissions"
        ) from None
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise FormatError(
            f"not a readable safetensors file ({_short(e)})",
            str(path),
            "the file is truncated or corrupted; recreate it",
        ) from None
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(
            "not a lota file (no 'format: lota' in its metadata)",
            str(path),
            "pass a ticket or delta written by lota",
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise FormatError(
            "format_version is missing or not a number", str(path), "recreate the file"
        ) from None
    if version < 1:
        raise FormatError(
            f"format version {version} does not exist", str(path), "recreate the file"
        )
    if version > FORMAT_VERSION:
        raise FormatError(
            f"format version {version} is newer than this lota reads ({FORMAT_VERSION})",
            str(path),
            "upgrade lota",
        )
    if meta.get("kind") not in ("ticket", "delta"):
        raise FormatError(
            f"unknown kind '{meta.get('kind')}'", str(path), "pass a ticket or delta file"
        )
    try:
        header = json.loads(meta.get("header", ""))
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
            raise ValueError
    except ValueError:
        raise FormatError(
            "the header is missing or is not valid JSON", str(path), "recreate the file"
        ) from None
    return meta, header


def load(path: str | os.PathLike, verify: bool = True) -> Ticket | SparseDelta:
    """Read a ticket or delta; every inconsistency raises ``FormatError`` naming the file."""
    meta, header = read_header(path)
    where = str(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shapes, indices, values = {}, {}, {}
            checksums = header.get("checksums", {})
            for name, e in header["tensors"].items():
                shape = tuple(int(d) for d in e["shape"])
                if any(d < 0 for d in shape):
                    raise ValueError(f"tensor '{name}' has a negative dimension")
                numel, nnz = math.prod(shape), int(e["nnz"])
                if not 0 <= nnz <= numel:
                    raise ValueError(f"tensor '{name}' claims {nnz} entries of {numel}")
                data = None
                if e["encoding"] in ("bitmask", "gaps"):
                    key = f"{name}{_SEP}{_index_key(e['encoding'])}"
                    data = _get(f, key, keys, checksums, verify)
                idx = decode_indices(e["encoding"], data, numel, nnz)
                if idx.numel() != nnz:
                    raise ValueError(
                        f"tensor '{name}' decodes to {idx.numel()} entries, header says {nnz}"
                    )
                shapes[name], indices[name] = shape, idx
                if meta["kind"] == "delta":
                    vkey = f"{name}{_SEP}values"
                    if nnz:
                        v = _get(f, vkey, keys, checksums, verify)
                        if v.dim() != 1 or v.numel() != nnz or not v.is_floating_point():
                            raise ValueError(f"values of '{name}' have the wrong size or type")
                    else:
                        v = torch.zeros(
                            0, dtype=_VALUE_DTYPES.get(e.get("values_dtype"), torch.float32)
                        )
                    values[name] = v
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, OverflowError) as e:
        raise FormatError(
            f"inconsistent content ({_short(e)})", where, "the file is corrupted; recreate it"
        ) from None
    except Exception as e:
        raise FormatError(
            f"unreadable content ({_short(e)})", where, "the file is corrupted; recreate it"
        ) from None
    ticket = Ticket(
        shapes=shapes,
        indices=indices,
        base_fingerprint=meta.get("base_fingerprint", ""),
        meta={"config": header.get("config", {}), "path": where},
    )
    if meta["kind"] == "ticket":
        return ticket
    return SparseDelta(
        ticket=ticket, values=values, meta={"config": header.get("config", {}), "path": where}
    )


def _get(f, key: str, keys: set, checksums: dict, verify: bool) -> torch.Tensor:
    if key not in keys:
        raise ValueError(f"tensor '{key}' is missing")
    t = f.get_tensor(key)
    if verify and key in checksums and tensor_digest(t) != checksums[key]:
        raise ValueError(f"checksum of '{key}' does not match")
    if verify and key not in checksums:
        raise ValueError(f"no checksum recorded for '{key}'")
    return t


def _short(e: Exception) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:200]


def describe(path: str | os.PathLike) -> dict:
    """What ``lota inspect --json`` prints for one file."""
    obj = load(path)
    meta, header = read_header(path)
    per_tensor = {
        name: {
            "shape": list(obj.shapes[name]),
            "nnz": int(obj.indices[name].numel()),
            "numel": math.prod(obj.shapes[name]),
            "encoding": header["tensors"][name]["encoding"],
        }
        for name in obj.names
    }
    info = {
        "path": str(path),
        "kind": meta["kind"],
        "format_version": int(meta["format_version"]),
        "numel": obj.numel,
        "nnz": obj.nnz,
        "density": obj.density,
        "base_fingerprint": meta.get("base_fingerprint", ""),
        "file_bytes": Path(path).stat().st_size,
        "bits_per_entry": 8 * Path(path).stat().st_size / obj.numel if obj.numel else None,
        "tensors": per_tensor,
        "created_by": header.get("created_by", ""),
        "config": header.get("config", {}),
    }
    if meta["kind"] == "delta":
        dtypes = {str(v.dtype).removeprefix("torch.") for v in obj.values.values() if v.numel()}
        info["values_dtype"] = sorted(dtypes)
        norms = [float(v.float().norm()) ** 2 for v in obj.values.values()]
        info["l2_norm"] = math.sqrt(sum(norms))
    return info
