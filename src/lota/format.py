"""On-disk format of tickets and sparse deltas (see docs/format.md): ``save``, ``load``,
``Reader`` and ``describe``, the entry point for every other module.

A lota file is a plain safetensors file. Per eligible tensor ``P`` it holds the trainable set in
the smallest of four index encodings (``P::mask`` packed bits, ``P::gaps`` gap-coded indices in
the narrowest unsigned integer type, ``P::rice_q`` + ``P::rice_r`` Golomb-Rice coded gaps, or
nothing when the ticket is empty or full; the codecs, and the one writer/reader pair that stores
them, are in ``lota.codecs``) and, for deltas, ``P::values``, optionally split
(``values_dtype="auto"``) into 16-bit values plus the float32 values of the entries that 16 bits
do not hold exactly (``P::fix_values`` at positions coded like the indices, ``P::fix_*``). The
metadata, header and format versions are ``lota.container``'s. Invariant: ``load(save(x))``
gives back the same indices and bit-identical values.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .codecs import decode_indices, encode_indices, read_index_blob, stored_bytes, write_index_blob
from .container import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_HEADER_CHARS,
    MAX_HEADER_DEPTH,
    SEP,
    checked_tensor,
    content_version,
    error_line,
    file_metadata,
    json_nesting,
    read_header,
)
from .delta import SparseDelta
from .errors import FormatError, InputError, MismatchError
from .fileio import atomic_path, save_safetensors
from .names import VALUE_DTYPES
from .ticket import Ticket

# What other modules use of the format, including the container's and codecs' names they reach
# through here.
__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_CHARS",
    "MAX_HEADER_DEPTH",
    "MAX_UNBACKED_ENTRIES",
    "SPLIT_OVERHEAD_BYTES",
    "VALUES_DTYPES",
    "Reader",
    "SparseDelta",
    "Ticket",
    "content_version",
    "decode_indices",
    "describe",
    "encode_indices",
    "json_nesting",
    "load",
    "read_header",
    "save",
]

_VALUE_DTYPES = {name: getattr(torch, name) for name in VALUE_DTYPES}  # --values-dtype
# Every dtype a delta's values are stored in and read back as: those ``--values-dtype`` names,
# float64, and the two float8 formats (``apply`` and every other consumer computes with float8
# values in float32, ``delta.arithmetic_dtype``).
VALUES_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (*_VALUE_DTYPES.values(), torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
}
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# What a split adds to the file beside its data: up to three more safetensors entries and their
# checksums, and the "fix" object in the header, about 150 bytes each plus twice the name's length.
SPLIT_OVERHEAD_BYTES = 450

# Every encoding but "full" stores its entries, so what a tensor's indices cost in memory is
# bounded by the file's own bytes: at most 64 bytes of int64 indices per byte of bitmask (8
# entries), 8 per byte of gaps, 64 per byte of Rice quotients, and for deltas a value (2 bytes or
# more) per entry. A ticket's "full" tensor costs no bytes, so nothing in the file vouches for its
# size: without the model's shapes, ``load`` materialises at most this many such entries in all
# (2 GiB of indices). A genuine larger ticket loads with ``load(path, shapes=...)``.
MAX_UNBACKED_ENTRIES = 2**28


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
    if not isinstance(obj, (Ticket, SparseDelta)):
        raise InputError(
            f"cannot save a {type(obj).__name__}", fix="pass a lota Ticket or SparseDelta"
        )
    obj.validate()
    if isinstance(obj, SparseDelta):
        obj.check_finite(str(path))
    tensors: dict[str, torch.Tensor] = {}
    entries = {
        name: _store_tensor(obj, name, tensors, values_dtype, str(path))
        for name in obj.ticket.names
    }
    config = config if config is not None else obj.meta.get("config", {})
    metadata = file_metadata(obj.kind, obj.ticket, entries, tensors, config)
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata)
    return Path(path).stat().st_size


def _store_tensor(
    obj: Ticket | SparseDelta, name: str, tensors: dict, values_dtype, where: str
) -> dict:
    """Put tensor ``name``'s indices, and a delta's values, into ``tensors``; returns its header
    entry."""
    if SEP in name:
        raise InputError(f"parameter name '{name}' contains '{SEP}'", fix="rename the parameter")
    ticket = obj.ticket
    idx = ticket.indices[name]
    encoding, data = encode_indices(idx, ticket.tensor_numel(name), name=name)
    entry = {"shape": list(ticket.shapes[name]), "nnz": int(idx.numel())}
    entry.update(write_index_blob(tensors, f"{name}{SEP}", encoding, data))
    if isinstance(obj, SparseDelta):
        _store_values(name, obj.values[name], tensors, entry, values_dtype, where)
    return entry


def _store_values(
    name: str, v: torch.Tensor, tensors: dict, entry: dict, values_dtype, where: str
) -> None:
    """Put a delta tensor's values into ``tensors`` in ``values_dtype`` (as they are when None,
    split when "auto") and name their dtype in its header ``entry``."""
    if values_dtype == "auto":
        v = _split_values(name, v, tensors, entry)
    elif values_dtype is not None:
        v = _rounded(name, v, _value_dtype(values_dtype), where)
    if v.dtype not in VALUES_DTYPES.values():
        raise InputError(
            f"values of tensor '{name}' are {v.dtype}, which lota files do not store",
            fix=f"convert them to one of {', '.join(VALUES_DTYPES)}",
        )
    if v.numel():
        tensors[f"{name}{SEP}values"] = v.contiguous()
    entry["values_dtype"] = str(v.dtype).removeprefix("torch.")


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
        size = 2 * nnz + 4 * off.numel() + stored_bytes(data) + SPLIT_OVERHEAD_BYTES
        size += 2 * len(name)
        if size < best_size:
            best, best_size = (half, off, encoding, data), size
    if best is None:
        return v
    half, off, encoding, data = best
    fix = {"nnz": int(off.numel())}
    fix.update(write_index_blob(tensors, f"{name}{SEP}fix_", encoding, data))
    tensors[f"{name}{SEP}fix_values"] = v[off].contiguous()
    entry["fix"] = fix
    return half


# ---------------------------------------------------------------------------- load
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
                f"inconsistent content ({error_line(e)})",
                self.where,
                "the file is corrupted; recreate it",
            ) from None
        except Exception as e:
            raise FormatError(
                f"unreadable content ({error_line(e)})",
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

    def load(self) -> Ticket | SparseDelta:
        """Every tensor read and verified, built into the ticket or delta the file holds."""
        if not self._vouched and self.unbacked_entries() > MAX_UNBACKED_ENTRIES:
            raise self._too_many_unbacked(self.unbacked_entries())
        indices, values = {}, {}
        for name in self.names:
            indices[name], v = self.read(name)
            if v is not None:
                values[name] = v
        meta = {"config": self.config, "path": self.where}
        with self._errors():  # the invariant is checked again as the objects are built
            ticket = Ticket(
                shapes=dict(self.shapes),
                indices=indices,
                base_fingerprint=self.base_fingerprint,
                meta=meta,
            )
            if self.kind == "ticket":
                return ticket
            return SparseDelta(ticket=ticket, values=values, meta=dict(meta))

    def _tensor(self, key: str) -> torch.Tensor:
        return checked_tensor(self._file, key, self._keys, self._checksums, self.verify)

    def _read(
        self, name: str, materialise: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        e = self.header["tensors"][name]
        numel, nnz, encoding = math.prod(self.shapes[name]), e["nnz"], e["encoding"]
        if content_version(e) > self._version:
            what = "split values" if "fix" in e else f"encoding '{encoding}'"
            raise ValueError(
                f"tensor '{name}' uses {what}, which needs format version {content_version(e)}"
            )
        # A delta's values come first: their count, checked against the header, bounds what the
        # indices may cost before any index is decoded.
        v = self._values(name, e) if self.kind == "delta" else None
        if encoding == "full" and not materialise:
            return None, v
        if encoding == "full" and self.kind == "ticket" and not self._vouched:
            if numel > MAX_UNBACKED_ENTRIES:
                raise self._too_many_unbacked(numel)
        idx = read_index_blob(self._tensor, f"{name}{SEP}", e, numel, nnz, f"tensor '{name}'")
        if idx.numel() != nnz:
            raise ValueError(f"tensor '{name}' decodes to {idx.numel()} entries, header says {nnz}")
        return idx, v

    def _values(self, name: str, e: dict) -> torch.Tensor:
        """A delta tensor's values, as stored, or widened to float32 with their fixes when split."""
        if e["nnz"]:
            v = self._tensor(f"{name}{SEP}values")
            if v.dim() != 1 or v.numel() != e["nnz"] or not v.is_floating_point():
                raise ValueError(f"values of '{name}' have the wrong size or type")
            _check_values_dtype(name, e, v.dtype)
        else:
            v = torch.zeros(0, dtype=VALUES_DTYPES.get(e.get("values_dtype"), torch.float32))
        return self._fixed(name, e, v) if "fix" in e else v

    def _fixed(self, name: str, e: dict, v: torch.Tensor) -> torch.Tensor:
        """The float32 values of a split tensor: its 16-bit values, widened exactly, with the
        stored float32 values written at their positions."""
        dtype, fix = str(v.dtype).removeprefix("torch."), e["fix"]
        if v.dtype not in _HALF_DTYPES or dtype != e["values_dtype"]:
            raise ValueError(f"split values of '{name}' are {dtype}, not the 16-bit dtype it says")
        exact = self._tensor(f"{name}{SEP}fix_values")
        if exact.dtype != torch.float32 or exact.dim() != 1 or exact.numel() != fix["nnz"]:
            raise ValueError(f"fixed values of '{name}' have the wrong size or type")
        what = f"fixed values of '{name}'"
        pos = read_index_blob(self._tensor, f"{name}{SEP}fix_", fix, v.numel(), fix["nnz"], what)
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
        return r.load()


def _check_values_dtype(name: str, entry: dict, dtype: torch.dtype) -> None:
    """A tensor's stored values are in a dtype lota reads, the one its header entry names."""
    stored = str(dtype).removeprefix("torch.")
    if stored not in VALUES_DTYPES:
        raise ValueError(f"values of '{name}' are {stored}, not one of {', '.join(VALUES_DTYPES)}")
    if entry.get("values_dtype", stored) != stored:
        raise ValueError(
            f"values of '{name}' are {stored}, the header says {entry['values_dtype']}"
        )


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
