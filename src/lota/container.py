"""The container of a lota file (see docs/format.md): its safetensors metadata, its JSON header
and the format versions.

The metadata carries ``format = "lota"``, ``kind``, ``format_version``, ``base_fingerprint`` and
the ``header`` (shapes, encodings, counts, per-tensor checksums and the resolved config). A file
is stamped with the oldest format version its content needs (``content_version``), and
``read_header`` refuses, before anything is decoded, a file whose metadata or header is not
exactly what lota writes. Tensors are stored as ``P::<part>`` (``SEP``) and read back through
``checked_tensor``, which verifies each against its recorded checksum.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ._version import __version__
from .codecs import ENCODINGS
from .digests import tensor_digest
from .errors import FormatError, InputError
from .input_files import check_input_file
from .ticket import MAX_TENSOR_NUMEL, Ticket

FORMAT_NAME = "lota"
# The newest format version this lota reads. A file is written as the oldest version its content
# needs (``content_version``), so that older readers can still open what they can read.
FORMAT_VERSION = 3
_V2_ENCODINGS = frozenset({"rice"})
# Between a parameter's name and the part of it a stored tensor holds: ``P::values``, ``P::mask``.
SEP = "::"
# The encodings of a split tensor's float32 value positions (never "empty" or "full").
_FIX_ENCODINGS = {"bitmask", "gaps", "rice"}

# Limits on what a file's header may ask of the reader, all checked before anything is decoded.
# A header holds about 200 characters per tensor plus the resolved config, so 16 Mi characters
# is a model of some 80,000 tensors; lota itself nests JSON about 4 levels deep (plus the config).
MAX_HEADER_CHARS = 16 * 2**20
MAX_HEADER_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def content_version(entry: dict) -> int:
    """The format version one tensor's header entry needs: 3 when its values are split (``fix``),
    2 when its indices are Rice coded, else 1. The writer stamps a file with the largest over its
    tensors and the reader refuses a tensor that needs more than its file says: one rule, so a
    file lota writes is always one it reads."""
    if "fix" in entry:
        return 3
    return 2 if entry["encoding"] in _V2_ENCODINGS else 1


def file_metadata(
    kind: str, ticket: Ticket, entries: dict[str, dict], tensors: dict, config: dict
) -> dict[str, str]:
    """The safetensors metadata of a file of ``kind`` holding ``ticket``'s ``tensors``, described
    by header ``entries``: the header with the totals, checksums and ``config``, stamped with the
    format version its content needs."""
    header = {
        "tensors": entries,
        "numel": ticket.numel,
        "nnz": ticket.nnz,
        "checksums": {k: tensor_digest(t) for k, t in tensors.items()},
        "config": config,
        "created_by": f"lota {__version__}",
    }
    return {
        "format": FORMAT_NAME,
        "kind": kind,
        "format_version": str(max(map(content_version, entries.values()), default=1)),
        "base_fingerprint": ticket.base_fingerprint,
        "header": json.dumps(header, sort_keys=True),
    }


def read_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return ``(metadata, header)`` after checking the file is a lota file of a known version
    whose header has exactly the fields, types and totals lota writes."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", str(path), "check the path")
    if path.is_dir():
        raise InputError("is a folder, not a lota file", str(path), "pass a .safetensors file")
    check_input_file(path, "lota file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except PermissionError:
        raise InputError(
            "cannot read the file (permission denied)", str(path), "fix its permissions"
        ) from None
    except Exception as e:  # safetensors raises its own error types for truncated / garbled files
        raise FormatError(
            f"not a readable safetensors file ({error_line(e)})",
            str(path),
            "the file is truncated or corrupted; recreate it",
        ) from None
    _check_metadata(meta, str(path))
    header = _parse_header(meta.get("header", ""), str(path))
    try:
        _check_header(header)
    except ValueError as e:
        raise FormatError(
            f"inconsistent header ({error_line(e)})",
            str(path),
            "the file is corrupted; recreate it",
        ) from None
    return meta, header


def _check_metadata(meta: dict, where: str) -> None:
    """``format`` is lota, ``format_version`` one this lota reads, ``kind`` ticket or delta."""
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(
            "not a lota file (no 'format: lota' in its metadata)",
            where,
            "pass a ticket or delta written by lota",
        )
    version_text = meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", version_text):
        raise FormatError("format_version is missing or not a number", where, "recreate the file")
    version = int(version_text)
    if version < 1:
        raise FormatError(f"format version {version} does not exist", where, "recreate the file")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"format version {version} is newer than this lota reads ({FORMAT_VERSION})",
            where,
            "upgrade lota",
        )
    if meta.get("kind") not in ("ticket", "delta"):
        raise FormatError(
            f"unknown kind '{meta.get('kind')}'", where, "pass a ticket or delta file"
        )


def _parse_header(text: str, where: str) -> dict:
    """The header's JSON, refused before parsing when it is too large or nested too deeply (so no
    RecursionError or huge parse can come out of a hostile file)."""
    if len(text) > MAX_HEADER_CHARS:
        raise FormatError(
            f"the header has {len(text):,} characters, more than {MAX_HEADER_CHARS:,}",
            where,
            "the file is corrupted; recreate it",
        )
    if json_nesting(text) > MAX_HEADER_DEPTH:
        raise FormatError(
            f"the header is nested more than {MAX_HEADER_DEPTH} levels deep",
            where,
            "the file is corrupted; recreate it",
        )
    try:
        header = json.loads(text)
        if not isinstance(header, dict) or not isinstance(header.get("tensors"), dict):
            raise ValueError
    except (ValueError, RecursionError):
        raise FormatError(
            "the header is missing or is not valid JSON", where, "recreate the file"
        ) from None
    return header


def json_nesting(text: str) -> int:
    """Deepest bracket nesting of JSON ``text``, brackets inside strings not counted (an upper
    bound for malformed text, which the parser refuses anyway). Read before parsing, so that a
    hostile text can never exhaust the parser's recursion (headers here, data lines in ``data``)."""
    bare = _JSON_STRING.sub("", text).encode("utf-8", "surrogatepass")
    a = np.frombuffer(bare, dtype=np.uint8)
    step = np.zeros(a.size, dtype=np.int32)
    step[(a == ord("{")) | (a == ord("["))] = 1
    step[(a == ord("}")) | (a == ord("]"))] = -1
    return int(np.cumsum(step).max(initial=0))


def _is_int(x) -> bool:
    return type(x) is int  # JSON true / false load as bool, a subclass of int


def _check_header(header: dict) -> None:
    """Raise ``ValueError`` unless every field has the type lota writes and the totals add up:
    shapes are lists of non-negative ints, counts are ints, encodings are known strings, and the
    top-level ``numel`` / ``nnz`` are the sums of the tensors'. Nothing is rounded or coerced."""
    numel_total = nnz_total = 0
    for name, e in header["tensors"].items():
        if not isinstance(e, dict):
            raise ValueError(f"the entry of tensor '{name}' is not an object")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ValueError(f"tensor '{name}' has shape {shape!r}, not non-negative integers")
        numel, nnz = math.prod(shape), e.get("nnz")
        if numel > MAX_TENSOR_NUMEL:
            raise ValueError(f"tensor '{name}' has {numel} entries, too many for int64 indices")
        if not _is_int(nnz) or not 0 <= nnz <= numel:
            raise ValueError(f"tensor '{name}' claims {nnz!r} entries of {numel}")
        encoding = e.get("encoding")
        if not isinstance(encoding, str) or encoding not in ENCODINGS:
            raise ValueError(f"tensor '{name}' has unknown index encoding {encoding!r}")
        if (encoding == "empty" and nnz != 0) or (encoding == "full" and nnz != numel):
            raise ValueError(f"tensor '{name}' is '{encoding}' but claims {nnz} of {numel}")
        if "rice_r" in e and not _is_int(e["rice_r"]):
            raise ValueError(f"tensor '{name}' has rice parameter {e['rice_r']!r}")
        if "values_dtype" in e and not isinstance(e["values_dtype"], str):
            raise ValueError(f"tensor '{name}' has values_dtype {e['values_dtype']!r}")
        if "fix" in e:
            _check_fix(name, e["fix"], nnz)
        numel_total, nnz_total = numel_total + numel, nnz_total + nnz
    for key, total in (("numel", numel_total), ("nnz", nnz_total)):
        if not _is_int(header.get(key)) or header[key] != total:
            raise ValueError(f"'{key}' is {header.get(key)!r}, its tensors add up to {total}")
    checksums = header.get("checksums", {})
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise ValueError("'checksums' is not an object of strings")
    if not isinstance(header.get("config", {}), dict):
        raise ValueError("'config' is not an object")
    if not isinstance(header.get("created_by", ""), str):
        raise ValueError("'created_by' is not a string")


def _check_fix(name: str, fix, nnz: int) -> None:
    """A split tensor's ``fix`` object: how many of its ``nnz`` values are float32, and how their
    positions among the values are coded (never "empty" or "full": those are not split)."""
    if not isinstance(fix, dict) or not _is_int(fix.get("nnz")) or not 0 < fix["nnz"] < nnz:
        raise ValueError(f"tensor '{name}' has a fix entry {fix!r} for {nnz} values")
    encoding = fix.get("encoding")
    if not isinstance(encoding, str) or encoding not in _FIX_ENCODINGS:
        raise ValueError(f"tensor '{name}' has fix encoding {encoding!r}")
    if "rice_r" in fix and not _is_int(fix["rice_r"]):
        raise ValueError(f"tensor '{name}' has fix rice parameter {fix['rice_r']!r}")


def checked_tensor(f, key: str, keys: set, checksums: dict, verify: bool) -> torch.Tensor:
    """Tensor ``key`` of the open safetensors file ``f`` (whose tensor names are ``keys``), checked
    against its recorded checksum when ``verify``; raises ``ValueError`` when it is missing or
    does not match."""
    if key not in keys:
        raise ValueError(f"tensor '{key}' is missing")
    t = f.get_tensor(key)
    if verify and key in checksums and tensor_digest(t) != checksums[key]:
        raise ValueError(f"checksum of '{key}' does not match")
    if verify and key not in checksums:
        raise ValueError(f"no checksum recorded for '{key}'")
    return t


def error_line(e: Exception) -> str:
    """The first line of an error's message (at most 200 characters), to quote in a refusal."""
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s[:200]
