"""On-disk format of tickets and sparse deltas (see docs/format.md).

A lota file is a plain safetensors file. Per eligible tensor ``P`` it holds the trainable set in
the smallest of four index encodings (``P::mask`` packed bits, ``P::gaps`` gap-coded indices in
the narrowest unsigned integer type, ``P::rice_q`` + ``P::rice_r`` Golomb-Rice coded gaps, or
nothing when the ticket is empty or full; the codecs are in ``lota.codecs``) and, for deltas,
``P::values``, optionally split (``values_dtype="auto"``) into 16-bit values plus the float32
values of the entries that 16 bits do not hold exactly (``P::fix_values`` at positions coded like
the indices, ``P::fix_*``). A file is stamped with the oldest format version its content needs
(``content_version``): 3 with split values, else 2 with ``rice``, else 1. The safetensors
metadata carries ``format = "lota"``, ``kind``, ``format_version``,
``base_fingerprint`` and a JSON ``header`` (shapes, encodings, counts, per-tensor checksums and the
resolved config). Invariant: ``load(save(x))`` gives back the same indices and bit-identical values.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ._version import __version__
from .codecs import ENCODINGS, RiceCode, decode_indices, encode_indices
from .delta import SparseDelta
from .errors import FormatError, InputError, MismatchError
from .fileio import atomic_path, check_input_file, save_safetensors, tensor_digest
from .names import VALUE_DTYPES
from .ticket import MAX_TENSOR_NUMEL, Ticket

FORMAT_NAME = "lota"
# The newest format version this lota reads. A file is written as the oldest version its content
# needs (``content_version``), so that older readers can still open what they can read.
FORMAT_VERSION = 3
_V2_ENCODINGS = frozenset({"rice"})
_SEP = "::"
_VALUE_DTYPES = {name: getattr(torch, name) for name in VALUE_DTYPES}  # --values-dtype
# Every dtype a delta's values are stored in and read back as: those ``--values-dtype`` names,
# float64, and the two float8 formats (``apply`` and every other consumer computes with float8
# values in float32, ``delta.arithmetic_dtype``).
VALUES_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (*_VALUE_DTYPES.values(), torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
}
_INDEX_KEYS = {"bitmask": ("mask",), "gaps": ("gaps",), "rice": ("rice_q", "rice_r")}
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# What a split adds to the file beside its data: up to three more safetensors entries and their
# checksums, and the "fix" object in the header, about 150 bytes each plus twice the name's length.
SPLIT_OVERHEAD_BYTES = 450

# Limits on what a file's header may ask of the reader, all checked before anything is decoded.
# A header holds about 200 characters per tensor plus the resolved config, so 16 Mi characters
# is a model of some 80,000 tensors; lota itself nests JSON about 4 levels deep (plus the config).
MAX_HEADER_CHARS = 16 * 2**20
MAX_HEADER_DEPTH = 64
# Every encoding but "full" stores its entries, so what a tensor's indices cost in memory is
# bounded by the file's own bytes: at most 64 bytes of int64 indices per byte of bitmask (8
# entries), 8 per byte of gaps, 64 per byte of Rice quotients, and for deltas a value (2 bytes or
# more) per entry. A ticket's "full" tensor costs no bytes, so nothing in the file vouches for its
# size: without the model's shapes, ``load`` materialises at most this many such entries in all
# (2 GiB of indices). A genuine larger ticket loads with ``load(path, shapes=...)``.
MAX_UNBACKED_ENTRIES = 2**28
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


# ---------------------------------------------------------------------------- save
def save(
    obj: Ticket | SparseDelta,
    path: str | os.PathLike,
    config: dict | None = None,
    values_dtype: str | torch.dtype | None = None,
) -> int:
    """Write a ticket or delta atomically; returns the file size in bytes.

    The object is validated again first (``TicketError`` names the tensor), so a ticket or delta
    changed after it was built can never be written as a file that reads back differently; a
    delta's values must be finite, also in the ``values_dtype`` they are stored in (float16 ends
    at 65504).
    """
    is_delta = isinstance(obj, SparseDelta)
    if not isinstance(obj, (Ticket, SparseDelta)):
        raise InputError(
            f"cannot save a {type(obj).__name__}", fix="pass a lota Ticket or SparseDelta"
        )
    obj.validate()
    if is_delta:
        obj.check_finite(str(path))
    ticket = obj.ticket
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name in ticket.names:
        if _SEP in name:
            raise InputError(
                f"parameter name '{name}' contains '{_SEP}'", fix="rename the parameter"
            )
        numel = ticket.tensor_numel(name)
        idx = ticket.indices[name]
        encoding, data = encode_indices(idx, numel, name=name)
        entry = {"shape": list(ticket.shapes[name]), "nnz": int(idx.numel()), "encoding": encoding}
        if isinstance(data, RiceCode):
            entry["rice_r"] = data.r
            tensors[f"{name}{_SEP}rice_q"] = data.q.contiguous()
            tensors[f"{name}{_SEP}rice_r"] = data.rem.contiguous()
        elif data is not None:
            tensors[f"{name}{_SEP}{_INDEX_KEYS[encoding][0]}"] = data.contiguous()
        if is_delta:
            v = obj.values[name]
            if values_dtype == "auto":
                v = _split_values(name, v, tensors, entry)
            elif values_dtype is not None:
                v = _rounded(name, v, _value_dtype(values_dtype), str(path))
            if v.dtype not in VALUES_DTYPES.values():
                raise InputError(
                    f"values of tensor '{name}' are {v.dtype}, which lota files do not store",
                    fix=f"convert them to one of {', '.join(VALUES_DTYPES)}",
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
        "format_version": str(max(map(content_version, entries.values()), default=1)),
        "base_fingerprint": ticket.base_fingerprint,
        "header": json.dumps(header, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)
    return Path(path).stat().st_size


def content_version(entry: dict) -> int:
    """The format version one tensor's header entry needs: 3 when its values are split (``fix``),
    2 when its indices are Rice coded, else 1. The writer stamps a file with the largest over its
    tensors and the reader refuses a tensor that needs more than its file says: one rule, so a
    file lota writes is always one it reads."""
    if "fix" in entry:
        return 3
    return 2 if entry["encoding"] in _V2_ENCODINGS else 1


def _value_dtype(values_dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(values_dtype, torch.dtype):
        if values_dtype not in VALUES_DTYPES.values():
            raise InputError(
                f"values dtype {values_dtype} is not one lota files store",
                fix=f"use auto or one of {', '.join(VALUES_DTYPES)}",
            )
        return values_dtype
    if values_dtype not in _VALUE_DTYPES:
        raise InputError(
            f"unknown values dtype '{values_dtype}'",
            fix=f"use auto or one of {', '.join(_VALUE_DTYPES)}",
        )
    return _VALUE_DTYPES[values_dtype]


def _rounded(
    name: str, v: torch.Tensor, dtype: torch.dtype, where: str | None = None
) -> torch.Tensor:
    """``v`` in ``dtype``, refused where a finite value lies beyond the dtype's range: casting
    would make it inf, or (float8_e4m3fn) the largest float8 number, not a rounding of it."""
    top = torch.finfo(dtype).max
    if not v.numel() or top >= torch.finfo(v.dtype).max:
        return v.to(dtype)
    wide = v.double()
    big = wide.isfinite() & (wide.abs() > top)
    if bool(big.any()):
        kind = str(dtype).removeprefix("torch.")
        raise InputError(
            f"values of tensor '{name}' overflow {kind}, the values dtype asked for: they go up "
            f"to {float(wide[big].abs().max()):.6g}, beyond the largest {kind} number ({top:.6g})",
            where,
            "store the values as float32 or bfloat16 (--values-dtype)",
        )
    return v.to(dtype)


def _split_values(name: str, v: torch.Tensor, tensors: dict, entry: dict) -> torch.Tensor:
    """``values_dtype="auto"`` for one tensor: the values to store as ``P::values``.

    Float32 values are stored in bfloat16 or float16 where that is smaller, with the float32
    values of the entries that 16 bits do not hold bit for bit kept beside them (``P::fix_*``,
    recorded in ``entry["fix"]``), so the file reads back exactly the values it was given. Values
    already in 16 bits, or in another dtype, are stored as they are.
    """
    nnz = v.numel()
    if v.dtype != torch.float32 or not nnz:
        return v
    bits = v.view(torch.int32)
    best, best_size = None, 4 * nnz
    for dt in _HALF_DTYPES:
        half = v.to(dt)
        off = torch.nonzero(half.float().view(torch.int32) != bits).view(-1)
        if off.numel() == 0:
            return half  # every value is exactly a 16-bit number: nothing to fix
        if off.numel() == nnz:
            continue
        encoding, data = encode_indices(off, nnz, name=name)
        size = 2 * nnz + 4 * off.numel() + _stored_bytes(data) + SPLIT_OVERHEAD_BYTES
        size += 2 * len(name)
        if size < best_size:
            best, best_size = (half, off, encoding, data), size
    if best is None:
        return v
    half, off, encoding, data = best
    fix = {"nnz": int(off.numel()), "encoding": encoding}
    if isinstance(data, RiceCode):
        fix["rice_r"] = data.r
        tensors[f"{name}{_SEP}fix_rice_q"] = data.q.contiguous()
        tensors[f"{name}{_SEP}fix_rice_r"] = data.rem.contiguous()
    else:
        tensors[f"{name}{_SEP}fix_{_INDEX_KEYS[encoding][0]}"] = data.contiguous()
    tensors[f"{name}{_SEP}fix_values"] = v[off].contiguous()
    entry["fix"] = fix
    return half


def _stored_bytes(data) -> int:
    if isinstance(data, RiceCode):
        return data.q.numel() + data.rem.numel()
    return data.numel() * data.element_size()


# ---------------------------------------------------------------------------- load
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
    version_text = meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", version_text):
        raise FormatError(
            "format_version is missing or not a number", str(path), "recreate the file"
        )
    version = int(version_text)
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
    header = _parse_header(meta.get("header", ""), str(path))
    try:
        _check_header(header)
    except ValueError as e:
        raise FormatError(
            f"inconsistent header ({_short(e)})", str(path), "the file is corrupted; recreate it"
        ) from None
    return meta, header


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
    if fix.get("encoding") not in _INDEX_KEYS:
        raise ValueError(f"tensor '{name}' has fix encoding {fix.get('encoding')!r}")
    if "rice_r" in fix and not _is_int(fix["rice_r"]):
        raise ValueError(f"tensor '{name}' has fix rice parameter {fix['rice_r']!r}")


class Reader:
    """A lota file opened for reading one tensor at a time (``with Reader(path) as r: ...``).

    ``kind``, ``base_fingerprint``, ``shapes`` and ``config`` come from the header; ``read(name)``
    returns that tensor's sorted int64 indices and, for deltas, its values, verified like ``load``.
    Every inconsistency raises ``FormatError`` naming the file. With ``shapes`` (the model's
    tensors), every tensor of the file must be one of them with the same shape, checked from the
    header before any data is read; a "full" tensor's size is then vouched for by the model.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        verify: bool = True,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ):
        self.meta, self.header = read_header(path)
        self.where, self.verify = str(path), verify
        self.kind = self.meta["kind"]
        self.base_fingerprint = self.meta.get("base_fingerprint", "")
        self.config = self.header.get("config", {})
        self._version = int(self.meta["format_version"])
        self._checksums = self.header.get("checksums", {})
        self.shapes = {n: tuple(e["shape"]) for n, e in self.header["tensors"].items()}
        if shapes is not None:
            self._check_shapes(shapes)
        self._vouched = shapes is not None
        with self._errors():
            self._file = safe_open(str(path), framework="pt")
            self._keys = set(self._file.keys())

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for name, shape in self.shapes.items():
            if name not in shapes:
                raise MismatchError(
                    f"tensor '{name}' is not a tensor of the model",
                    self.where,
                    "use a file made for this architecture",
                )
            if tuple(shapes[name]) != shape:
                raise MismatchError(
                    f"tensor '{name}' has shape {list(shape)}, the model has {list(shapes[name])}",
                    self.where,
                    "use a file made for this architecture",
                )

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def unbacked_entries(self) -> int:
        """Entries of a ticket's "full" tensors: what loading materialises with no byte of the
        file behind it (a delta's "full" tensors carry their values, so they count as backed)."""
        if self.kind != "ticket":
            return 0
        return sum(
            math.prod(self.shapes[n])
            for n, e in self.header["tensors"].items()
            if e["encoding"] == "full"
        )

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file = None

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError, RuntimeError, OverflowError) as e:
            raise FormatError(
                f"inconsistent content ({_short(e)})",
                self.where,
                "the file is corrupted; recreate it",
            ) from None
        except Exception as e:
            raise FormatError(
                f"unreadable content ({_short(e)})",
                self.where,
                "the file is corrupted; recreate it",
            ) from None

    def nnz(self, name: str) -> int:
        return self.header["tensors"][name]["nnz"]

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(indices, values)`` of tensor ``name``; ``values`` is None for a ticket."""
        with self._errors():
            idx, v = self._read(name, materialise=True)
            return idx, v

    def check(self, name: str) -> torch.Tensor | None:
        """Verify tensor ``name`` as ``read`` does, without materialising the indices of a "full"
        tensor (nothing is stored for them); returns the values of a delta's tensor."""
        with self._errors():
            return self._read(name, materialise=False)[1]

    def _too_many_unbacked(self, n: int) -> FormatError:
        return FormatError(
            f"the header declares {n:,} entries of 'full' tensors that no data in the file "
            f"backs, more than the {MAX_UNBACKED_ENTRIES:,} lota loads without the model",
            self.where,
            "recreate the file; a genuine one loads with lota.load(path, shapes=<model shapes>)",
        )

    def _read(
        self, name: str, materialise: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        f, keys, checksums, verify = self._file, self._keys, self._checksums, self.verify
        e = self.header["tensors"][name]
        numel, nnz, encoding = math.prod(self.shapes[name]), e["nnz"], e["encoding"]
        if content_version(e) > self._version:
            what = "split values" if "fix" in e else f"encoding '{encoding}'"
            raise ValueError(
                f"tensor '{name}' uses {what}, which needs format version {content_version(e)}"
            )
        # A delta's values come first: their count, checked against the header, bounds what the
        # indices may cost before any index is decoded.
        v = None
        if self.kind == "delta" and nnz:
            v = _get(f, f"{name}{_SEP}values", keys, checksums, verify)
            if v.dim() != 1 or v.numel() != nnz or not v.is_floating_point():
                raise ValueError(f"values of '{name}' have the wrong size or type")
            _check_values_dtype(name, e, v.dtype)
        elif self.kind == "delta":
            v = torch.zeros(0, dtype=VALUES_DTYPES.get(e.get("values_dtype"), torch.float32))
        if v is not None and "fix" in e:
            v = self._fixed(name, e["fix"], v)
        if encoding == "full" and not materialise:
            return None, v
        if encoding == "full" and self.kind == "ticket" and not self._vouched:
            if numel > MAX_UNBACKED_ENTRIES:
                raise self._too_many_unbacked(numel)
        data = None
        if encoding == "rice":
            data = RiceCode(
                q=_get(f, f"{name}{_SEP}rice_q", keys, checksums, verify),
                rem=_get(f, f"{name}{_SEP}rice_r", keys, checksums, verify),
                r=e.get("rice_r"),
            )
        elif encoding in _INDEX_KEYS:
            key = f"{name}{_SEP}{_INDEX_KEYS[encoding][0]}"
            data = _get(f, key, keys, checksums, verify)
        try:
            idx = decode_indices(encoding, data, numel, nnz)
        except ValueError as err:
            raise ValueError(f"tensor '{name}': {err}") from None
        if idx.numel() != nnz:
            raise ValueError(f"tensor '{name}' decodes to {idx.numel()} entries, header says {nnz}")
        return idx, v

    def _fixed(self, name: str, fix: dict, v: torch.Tensor) -> torch.Tensor:
        """The float32 values of a split tensor: its 16-bit values, widened exactly, with the
        stored float32 values written at their positions."""
        dtype = str(v.dtype).removeprefix("torch.")
        if v.dtype not in _HALF_DTYPES or dtype != self.header["tensors"][name]["values_dtype"]:
            raise ValueError(f"split values of '{name}' are {dtype}, not the 16-bit dtype it says")
        f, keys, checksums, verify = self._file, self._keys, self._checksums, self.verify
        prefix = f"{name}{_SEP}fix_"
        exact = _get(f, prefix + "values", keys, checksums, verify)
        if exact.dtype != torch.float32 or exact.dim() != 1 or exact.numel() != fix["nnz"]:
            raise ValueError(f"fixed values of '{name}' have the wrong size or type")
        if fix["encoding"] == "rice":
            data = RiceCode(
                q=_get(f, prefix + "rice_q", keys, checksums, verify),
                rem=_get(f, prefix + "rice_r", keys, checksums, verify),
                r=fix.get("rice_r"),
            )
        else:
            data = _get(f, prefix + _INDEX_KEYS[fix["encoding"]][0], keys, checksums, verify)
        try:
            pos = decode_indices(fix["encoding"], data, v.numel(), fix["nnz"])
        except ValueError as err:
            raise ValueError(f"fixed values of '{name}': {err}") from None
        if pos.numel() != fix["nnz"]:
            raise ValueError(f"fixed values of '{name}' decode to {pos.numel()} positions")
        out = v.float()
        out[pos] = exact
        return out


def load(
    path: str | os.PathLike,
    verify: bool = True,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> Ticket | SparseDelta:
    """Read a ticket or delta; every inconsistency raises ``FormatError`` naming the file.

    ``shapes`` (the model's ``{name: shape}``) makes the file's tensors match the model's before
    anything is read, and lifts the bound on "full" tensors (see ``MAX_UNBACKED_ENTRIES``).
    """
    with Reader(path, verify, shapes) as r:
        if not r._vouched and r.unbacked_entries() > MAX_UNBACKED_ENTRIES:
            raise r._too_many_unbacked(r.unbacked_entries())
        indices, values = {}, {}
        for name in r.names:
            indices[name], v = r.read(name)
            if v is not None:
                values[name] = v
        meta = {"config": r.config, "path": r.where}
        with r._errors():  # the invariant is checked again as the objects are built
            ticket = Ticket(
                shapes=dict(r.shapes),
                indices=indices,
                base_fingerprint=r.base_fingerprint,
                meta=meta,
            )
            if r.kind == "ticket":
                return ticket
            return SparseDelta(ticket=ticket, values=values, meta=dict(meta))


def _check_values_dtype(name: str, entry: dict, dtype: torch.dtype) -> None:
    """A tensor's stored values are in a dtype lota reads, the one its header entry names."""
    stored = str(dtype).removeprefix("torch.")
    if stored not in VALUES_DTYPES:
        raise ValueError(f"values of '{name}' are {stored}, not one of {', '.join(VALUES_DTYPES)}")
    if entry.get("values_dtype", stored) != stored:
        raise ValueError(
            f"values of '{name}' are {stored}, the header says {entry['values_dtype']}"
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


def _stored_dtypes(entry: dict, v: torch.Tensor) -> list[str]:
    """The dtypes a delta tensor's values are stored in: one, or a 16-bit one plus float32 (the
    reader checked a split tensor's ``values_dtype`` against its stored values)."""
    if "fix" in entry:
        return [entry["values_dtype"], "float32"]
    return [str(v.dtype).removeprefix("torch.")]


def describe(path: str | os.PathLike) -> dict:
    """What ``lota inspect --json`` prints for one file.

    Every tensor is verified as ``load`` verifies it, one tensor at a time, and the counts come
    from the verified header, so no "full" tensor is materialised: describing a file costs
    memory bounded by its largest stored tensor, whatever sizes its header declares.
    """
    with Reader(path) as r:
        per_tensor, sq_norms, dtypes = {}, [], set()
        for name in r.names:
            v = r.check(name)
            e = r.header["tensors"][name]
            per_tensor[name] = {
                "shape": list(r.shapes[name]),
                "nnz": e["nnz"],
                "numel": math.prod(r.shapes[name]),
                "encoding": e["encoding"],
            }
            if v is not None:
                sq_norms.append(float(v.float().norm()) ** 2)
                stored = _stored_dtypes(e, v) if v.numel() else []
                dtypes.update(stored)
                per_tensor[name]["values_dtype"] = "+".join(stored) or e.get("values_dtype")
                per_tensor[name]["float32_fixes"] = e.get("fix", {}).get("nnz", 0)
        meta, header = r.meta, r.header
    numel, nnz = header["numel"], header["nnz"]
    size = Path(path).stat().st_size
    info = {
        "path": str(path),
        "kind": meta["kind"],
        "format_version": int(meta["format_version"]),
        "numel": numel,
        "nnz": nnz,
        "density": nnz / numel if numel else 0.0,
        "base_fingerprint": meta.get("base_fingerprint", ""),
        "file_bytes": size,
        "bits_per_entry": 8 * size / numel if numel else None,
        "tensors": per_tensor,
        "created_by": header.get("created_by", ""),
        "config": header.get("config", {}),
    }
    if meta["kind"] == "delta":
        info["values_dtype"] = sorted(dtypes)
        info["l2_norm"] = math.sqrt(sum(sq_norms))
    return info
