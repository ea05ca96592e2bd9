"""Index codecs: how a ticket's sorted flat indices of one tensor are stored (see docs/format.md).

Four encodings besides ``empty`` and ``full`` (which store nothing): ``bitmask`` packed bits,
``gaps`` gap-coded indices in the narrowest unsigned integer type, and ``rice`` Golomb-Rice coded
gaps (a quotient and a remainder stream). ``encode_indices`` picks the smallest by stored bytes.
Invariant: ``decode_indices`` gives back exactly the indices encoded, and refuses with
``ValueError`` any data that no sorted unique indices in ``[0, numel)`` encode to.

``write_index_blob`` / ``read_index_blob`` are the one place where an encoding's data becomes
the named tensors and header fields of a file, and back: a ticket's indices and the positions of
a split delta's float32 values are both stored through them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .ticket import MAX_TENSOR_NUMEL

_GAP_DTYPES = [
    (torch.uint8, 0xFF),
    (torch.uint16, 0xFFFF),
    (torch.uint32, 0xFFFFFFFF),
    (torch.int64, 2**63 - 1),
]
RICE_MAX_R = 40
# What "rice" adds to the file beside its data, over a one-tensor encoding: the second tensor's
# safetensors entry, its checksum and "rice_r" in the header, measured as 136 bytes plus twice
# the parameter name's length (within 8 bytes of header padding). Rice is chosen only when it
# saves more than that, so small tensors keep v1 encodings and their files stay v1.
RICE_OVERHEAD_BYTES = 136


def rice_overhead(name: str = "") -> int:
    """Header bytes the second tensor of ``rice`` costs for parameter ``name``."""
    return RICE_OVERHEAD_BYTES + 2 * len(json.dumps(name)) - 4


_SIMPLICITY = ("bitmask", "gaps", "rice")  # tie-break order
ENCODINGS = frozenset({"empty", "full", *_SIMPLICITY})


@dataclass(frozen=True)
class RiceCode:
    """A Golomb-Rice gap code: unary quotients ``q``, ``r``-bit remainders ``rem`` (uint8 bytes)."""

    q: torch.Tensor
    rem: torch.Tensor
    r: int

    @property
    def nbytes(self) -> int:
        return int(self.q.numel() + self.rem.numel())


# The stored tensors of each encoding, named by what follows the key prefix of what they code
# (``P::`` for a tensor's indices, ``P::fix_`` for a split tensor's float32 value positions).
BLOB_KEYS = {"empty": (), "full": (), "bitmask": ("mask",), "gaps": ("gaps",)}
BLOB_KEYS["rice"] = ("rice_q", "rice_r")


def stored_bytes(data: torch.Tensor | RiceCode | None) -> int:
    """Bytes of tensor data that ``encode_indices``' ``data`` stores."""
    if data is None:
        return 0
    if isinstance(data, RiceCode):
        return data.nbytes
    return data.numel() * data.element_size()


def write_index_blob(
    tensors: dict[str, torch.Tensor], prefix: str, encoding: str, data
) -> dict[str, object]:
    """Put ``encode_indices``' ``(encoding, data)`` into a file's ``tensors`` under ``prefix``;
    returns the header fields that go with them: ``encoding``, and ``rice_r`` for Rice."""
    fields: dict[str, object] = {"encoding": encoding}
    if isinstance(data, RiceCode):
        fields["rice_r"] = data.r
        parts = (data.q, data.rem)
    else:
        parts = () if data is None else (data,)
    for suffix, t in zip(BLOB_KEYS[encoding], parts, strict=True):
        tensors[prefix + suffix] = t.contiguous()
    return fields


def read_index_blob(
    get: Callable[[str], torch.Tensor], prefix: str, fields: dict, numel: int, nnz: int, what: str
) -> torch.Tensor:
    """The inverse of ``write_index_blob``: the sorted indices that ``fields`` (``encoding``,
    ``rice_r``) and the tensors ``get(prefix + suffix)`` returns code, ``nnz`` of ``numel``.
    A decoding error is raised as ``ValueError`` naming ``what`` was coded."""
    encoding = fields["encoding"]
    parts = [get(prefix + suffix) for suffix in BLOB_KEYS[encoding]]
    data = RiceCode(*parts, r=fields.get("rice_r")) if encoding == "rice" else None
    if encoding != "rice" and parts:
        data = parts[0]
    try:
        return decode_indices(encoding, data, numel, nnz)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def gaps_of(idx: torch.Tensor) -> np.ndarray:
    """``g[j] = idx[j] - idx[j-1] - 1`` with ``idx[-1] = -1`` (int64, >= 0 for a valid ticket)."""
    a = idx.detach().cpu().to(torch.long).contiguous().numpy()
    g = np.empty_like(a)
    if a.size:
        g[0] = a[0]
        np.subtract(a[1:], a[:-1], out=g[1:])
        g[1:] -= 1
    return g


def _rice_bytes(nnz: int, sum_q: int, r: int) -> int:
    return (nnz + sum_q + 7) // 8 + (nnz * r + 7) // 8


def rice_parameter(gaps: np.ndarray) -> tuple[int, int]:
    """``(r, bytes)``: the Rice parameter in ``0..RICE_MAX_R`` giving the fewest bytes (ties: the
    smallest ``r``), and that size. The size in bits, ``nnz * (1 + r) + sum(g >> r)``, is convex
    in ``r``, so a walk from an estimate finds the minimum in a few passes over the gaps."""
    nnz = int(gaps.size)
    if nnz == 0:
        return 0, 0
    sums: dict[int, int] = {}

    def bits(r: int) -> int:
        if r not in sums:
            sums[r] = int(np.right_shift(gaps, r).sum())
        return nnz * (1 + r) + sums[r]

    mean = float(gaps.mean())
    r = min(RICE_MAX_R, max(0, int(math.log2(mean * math.log(2) + 1)) if mean > 0 else 0))
    while r > 0 and bits(r - 1) <= bits(r):
        r -= 1
    while r < RICE_MAX_R and bits(r + 1) < bits(r):
        r += 1
    # Byte rounding can move the optimum by less than 2 bytes: look at every r within 16 bits of
    # the best (convexity means nothing further out can win).
    lo = hi = r
    while lo > 0 and bits(lo - 1) < bits(r) + 16:
        lo -= 1
    while hi < RICE_MAX_R and bits(hi + 1) < bits(r) + 16:
        hi += 1
    best = min(range(lo, hi + 1), key=lambda k: (_rice_bytes(nnz, sums[k], k), k))
    return best, _rice_bytes(nnz, sums[best], best)


def index_sizes(idx: torch.Tensor, numel: int) -> dict[str, int]:
    """Bytes of stored data of each encoding that can hold ``idx`` (not for empty/full tickets).

    ``"rice_r"`` is the Rice parameter behind ``"rice"``.
    """
    return _sizes(gaps_of(idx), numel)


def _sizes(g: np.ndarray, numel: int) -> dict[str, int]:
    max_gap = int(g.max())
    width = next(torch.empty(0, dtype=dt).element_size() for dt, hi in _GAP_DTYPES if max_gap <= hi)
    r, rice = rice_parameter(g)
    return {"bitmask": (numel + 7) // 8, "gaps": g.size * width, "rice": rice, "rice_r": r}


def encode_indices(
    idx: torch.Tensor, numel: int, encoding: str | None = None, name: str = ""
) -> tuple[str, torch.Tensor | RiceCode | None]:
    """Encode sorted unique flat indices in ``[0, numel)`` of parameter ``name``.

    The encoding is chosen per tensor unless given: ``empty`` / ``full`` when they apply, else
    the smallest of ``bitmask``, ``gaps`` and ``rice`` by stored bytes, where ``rice`` also pays
    ``rice_overhead(name)`` for its second tensor; ties go to the simpler encoding (bitmask, then
    gaps, then rice).
    """
    nnz = int(idx.numel())
    if encoding is None and nnz == 0:
        return "empty", None
    if encoding is None and nnz == numel:
        return "full", None
    if encoding == "empty" and nnz == 0:
        return "empty", None
    if encoding == "full" and nnz == numel:
        return "full", None
    if nnz == 0 or encoding not in (None, *_SIMPLICITY):
        raise ValueError(f"cannot encode {nnz} of {numel} entries as '{encoding}'")
    if encoding == "bitmask":
        return "bitmask", _bitmask(idx, numel)
    g = gaps_of(idx)
    r = None
    if encoding is None:
        sizes = _sizes(g, numel)
        cost = {e: sizes[e] for e in _SIMPLICITY}
        cost["rice"] += rice_overhead(name)
        encoding = min(_SIMPLICITY, key=lambda e: (cost[e], _SIMPLICITY.index(e)))
        r = sizes["rice_r"]
    if encoding == "bitmask":
        return "bitmask", _bitmask(idx, numel)
    if encoding == "gaps":
        max_gap = int(g.max())
        gap_dtype = next(dt for dt, hi in _GAP_DTYPES if max_gap <= hi)
        return "gaps", torch.from_numpy(g).to(gap_dtype)
    if r is None:
        r, _ = rice_parameter(g)
    return "rice", rice_encode(g, r)


def _bitmask(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Bit ``i % 8`` (least significant first) of byte ``i // 8`` set for each index ``i``."""
    mask = np.zeros(((numel + 7) // 8) * 8, dtype=np.uint8)
    mask[idx.detach().cpu().numpy()] = 1
    return torch.from_numpy(np.packbits(mask, bitorder="little"))


def rice_encode(gaps: np.ndarray, r: int) -> RiceCode:
    """Golomb-Rice code of non-negative int64 gaps with parameter ``r`` (see docs/format.md)."""
    if not 0 <= r <= RICE_MAX_R:
        raise ValueError(f"rice parameter {r} is outside 0..{RICE_MAX_R}")
    nnz = int(gaps.size)
    # Quotient stream: q one-bits then a zero-bit per entry; the last byte is padded with ones.
    # The zero of entry j sits at bit (q[0] + 1) + ... + (q[j] + 1) - 1.
    ends = np.right_shift(gaps, r)
    ends += 1
    np.cumsum(ends, out=ends)
    ends -= 1
    nbits = int(ends[-1]) + 1 if nnz else 0
    bits = np.ones(((nbits + 7) // 8) * 8, dtype=np.uint8)
    bits[ends] = 0
    q_bytes = np.packbits(bits, bitorder="little")
    rem = np.bitwise_and(gaps, (1 << r) - 1)
    return RiceCode(q=torch.from_numpy(q_bytes), rem=torch.from_numpy(_pack_fields(rem, r)), r=r)


def _pack_fields(values: np.ndarray, r: int) -> np.ndarray:
    """Values of ``r`` bits each, LSB first: bit k of value j is stream bit ``j*r + k``."""
    n = int(values.size)
    nbytes = (n * r + 7) // 8
    if r == 0 or n == 0:
        return np.zeros(nbytes, dtype=np.uint8)
    groups = (n + 7) // 8  # 8 values fill exactly r bytes
    v = np.zeros(groups * 8, dtype=np.int64)
    v[:n] = values
    v = np.ascontiguousarray(v.reshape(groups, 8).T)  # v[k] = value k of every group
    out = np.zeros((r, groups), dtype=np.uint8)  # out[b] = byte b of every group
    for k in range(8):
        start, shift = divmod(k * r, 8)
        w = v[k]
        w <<= shift
        for t in range((shift + r + 7) // 8):
            out[start + t] |= (w >> (8 * t)).astype(np.uint8)
    return np.ascontiguousarray(out.T).reshape(-1)[:nbytes]


def _unpack_fields(data: np.ndarray, r: int, n: int) -> np.ndarray:
    """Inverse of ``_pack_fields`` (int64 values); ``data`` must hold ``ceil(n*r/8)`` bytes."""
    if r == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    groups = (n + 7) // 8
    buf = np.zeros(groups * r, dtype=np.uint8)
    buf[: data.size] = data
    buf = buf.reshape(groups, r)
    out = np.empty((8, groups), dtype=np.int64)  # value k of every group, contiguous
    for k in range(8):
        start, shift = divmod(k * r, 8)
        w = out[k]
        np.copyto(w, buf[:, start])
        for t in range(1, (shift + r + 7) // 8):
            w |= buf[:, start + t].astype(np.int64) << (8 * t)
        w >>= shift
        w &= (1 << r) - 1
    return out.T.reshape(-1)[:n]


def rice_decode(
    q_bytes: torch.Tensor, rem_bytes: torch.Tensor, r: int, numel: int, nnz: int
) -> torch.Tensor:
    """Indices from a Rice code; raises ``ValueError`` on anything inconsistent."""
    if type(r) is not int or not 0 <= r <= RICE_MAX_R:
        raise ValueError(f"rice parameter {r!r} is not an integer in 0..{RICE_MAX_R}")
    for what, t in (("quotient", q_bytes), ("remainder", rem_bytes)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(f"rice {what} stream is not a 1-D uint8 tensor")
    if rem_bytes.numel() != (nnz * r + 7) // 8:
        raise ValueError(
            f"rice remainder stream has {rem_bytes.numel()} bytes, "
            f"{nnz} entries of {r} bits need {(nnz * r + 7) // 8}"
        )
    qb = q_bytes.contiguous().numpy()
    # One zero bit ends each entry's quotient; the padding after the last one is one bits.
    ends = np.flatnonzero(np.unpackbits(qb, bitorder="little") == 0)
    if ends.size != nnz:
        raise ValueError(f"rice quotient stream has {ends.size} terminators, header says {nnz}")
    if nnz == 0:
        if qb.size:
            raise ValueError("rice quotient stream holds bits but no entry")
        return torch.zeros(0, dtype=torch.long)
    if int(ends[-1]) // 8 != qb.size - 1:
        raise ValueError("rice quotient stream has bytes after its last terminator")
    rb = rem_bytes.contiguous().numpy()
    used = nnz * r
    if used % 8 and int(rb[-1]) >> (used % 8):
        raise ValueError("rice remainder stream has non-zero padding bits")
    rem = _unpack_fields(rb, r, nnz)
    # idx[j] = (sum of q[:j+1] << r) + sum of rem[:j+1] + j, where sum of q[:j+1] = ends[j] - j.
    # The last index, computed exactly first, bounds every other one (they increase), so the
    # arithmetic below gives exact results even where an intermediate step wraps modulo 2**64.
    mask = (1 << r) - 1
    if nnz * mask >= 2**63 and float(rem.sum(dtype=np.float64)) >= numel:
        raise ValueError("rice code points past the end of the tensor")
    last = ((int(ends[-1]) - (nnz - 1)) << r) + int(rem.sum()) + nnz - 1
    if last >= numel:
        raise ValueError("rice code points past the end of the tensor")
    if r == 0:
        return torch.from_numpy(ends)
    # idx[j] = (ends[j] << r) - cumsum(mask - rem)[j] + mask, in place, in unsigned arithmetic
    # (well defined modulo 2**64, and the true results are known to fit)
    u, c = ends.view(np.uint64), rem.view(np.uint64)
    c ^= np.uint64(mask)
    np.cumsum(c, out=c)
    np.left_shift(u, np.uint64(r), out=u)
    u -= c
    u += np.uint64(mask)
    return torch.from_numpy(ends)


def decode_indices(
    encoding: str, data: torch.Tensor | RiceCode | None, numel: int, nnz: int
) -> torch.Tensor:
    """Sorted int64 indices of ``nnz`` entries in ``[0, numel)`` from ``encoding``'s ``data``;
    raises ``ValueError`` on anything inconsistent."""
    if encoding == "rice":
        if not isinstance(data, RiceCode):
            raise ValueError("rice data is missing")
        return rice_decode(data.q, data.rem, data.r, numel, nnz)
    if encoding == "empty":
        return torch.zeros(0, dtype=torch.long)
    if encoding == "full":
        return torch.arange(numel, dtype=torch.long)
    if encoding == "bitmask":
        if data.dtype != torch.uint8 or data.numel() != (numel + 7) // 8:
            raise ValueError("bitmask has the wrong size or type")
        bits = np.unpackbits(data.contiguous().numpy(), bitorder="little").view(np.bool_)
        idx = torch.from_numpy(np.flatnonzero(bits))
        if idx.numel() and int(idx[-1]) >= numel:
            raise ValueError("bitmask marks entries past the end of the tensor")
        return idx
    if encoding == "gaps":
        if data.dim() != 1 or data.numel() != nnz or data.dtype not in [d for d, _ in _GAP_DTYPES]:
            raise ValueError("gap list has the wrong size or type")
        if numel > MAX_TENSOR_NUMEL:
            raise ValueError(f"a tensor of {numel} entries cannot have int64 indices")
        gaps = data.to(torch.long)
        if gaps.numel() and (int(gaps.min()) < 0 or int(gaps.max()) >= numel):
            raise ValueError("gap list has a negative or oversized gap")
        # Each step adds gap + 1 in [1, 2**63 - 1], so the running sum wraps past 2**63 exactly
        # where it stops increasing: checking the increase detects every int64 overflow.
        ends = torch.cumsum(gaps + 1, 0)
        if ends.numel() > 1 and not bool((ends[1:] > ends[:-1]).all()):
            raise ValueError("gap list overflows int64: its positions run past any tensor")
        if ends.numel() and int(ends[-1]) > numel:
            raise ValueError("gap list points past the end of the tensor")
        return ends.sub_(1)
    raise ValueError(f"unknown index encoding '{encoding}'")
