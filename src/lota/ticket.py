"""Tickets: the set of trainable entries of a model, per parameter tensor.

A ticket maps each eligible parameter name to its shape and the sorted, unique flat indices of its
trainable entries. Eligible tensors with no trainable entry are still listed (with no indices), so
``numel`` counts every eligible entry and density is well defined. Invariant: indices are int64,
strictly increasing and inside ``[0, numel(shape))``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .errors import InputError, MismatchError

# Indices are int64, so no tensor may hold more entries than an int64 can number.
MAX_TENSOR_NUMEL = 2**63 - 1


class TicketError(InputError, ValueError):
    """A ticket or delta built in code breaks its invariant. It is an ``InputError`` so the CLI
    prints it as one line, and a ``ValueError`` because that is what construction raised before."""


@dataclass
class Ticket:
    """Trainable entries: ``indices[name]`` holds flat positions in a tensor of ``shapes[name]``."""

    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, torch.Tensor]
    base_fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    kind = "ticket"

    def __post_init__(self):
        self.shapes = {n: check_shape(n, s) for n, s in self.shapes.items()}
        missing = set(self.shapes) ^ set(self.indices)
        if missing:
            raise TicketError(
                f"shapes and indices disagree on names: {sorted(missing)[:3]}",
                fix="give every tensor both a shape and its indices",
            )
        self.indices = {n: _as_indices(n, i) for n, i in self.indices.items()}
        self.validate()

    def validate(self) -> None:
        """Check the invariant (int64, 1-D, strictly increasing, inside the tensor) on every
        tensor; ``TicketError`` names the first that breaks it. Vectorised, O(nnz): a few
        passes over the indices, so tickets of millions of entries check in milliseconds."""
        if set(self.shapes) != set(self.indices):
            raise TicketError("shapes and indices disagree on names", fix="give every tensor both")
        for name, idx in self.indices.items():
            check_indices(name, idx, self.tensor_numel(name))

    @classmethod
    def every(cls, shapes: dict[str, tuple[int, ...]], base_fingerprint: str = "") -> Ticket:
        """The ticket of every entry of ``shapes`` (a dense delta's: full fine-tuning, LoRA
        merged). Its indices are views of one ``arange`` of the largest tensor, 8 bytes per entry
        of that tensor instead of per entry of them all; a file stores none of them (``full``)."""
        shapes = {n: check_shape(n, s) for n, s in shapes.items()}
        numels = {n: math.prod(s) for n, s in shapes.items()}
        shared = torch.arange(max(numels.values(), default=0))
        indices = {n: shared[:numel] for n, numel in numels.items()}
        return cls(shapes=shapes, indices=indices, base_fingerprint=base_fingerprint)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def tensor_numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    @property
    def numel(self) -> int:
        """Eligible entries over all listed tensors."""
        return sum(self.tensor_numel(n) for n in self.shapes)

    @property
    def nnz(self) -> int:
        return sum(int(i.numel()) for i in self.indices.values())

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.indices.items())

    # -- views -----------------------------------------------------------------------------------
    def dense_masks(self) -> dict[str, torch.Tensor]:
        """``{name: bool tensor of the parameter's shape}``, True where trainable."""
        out = {}
        for name, idx in self.indices.items():
            m = torch.zeros(self.tensor_numel(name), dtype=torch.bool)
            m[idx] = True
            out[name] = m.view(self.shapes[name])
        return out

    @property
    def ticket(self) -> Ticket:
        """The ticket itself, so ``obj.ticket`` is the ticket of a ``Ticket`` and of a ``SparseDelta``."""
        return self

    # -- set algebra (names and shapes must agree) -----------------------------------------------
    def overlap(self, other: Ticket) -> int:
        """Number of entries in both tickets."""
        n = 0
        for name, idx in self.indices.items():
            if name in other.indices and idx.numel() and other.indices[name].numel():
                n += int(torch.isin(idx, other.indices[name], assume_unique=True).sum())
        return n

    @classmethod
    def union(cls, tickets: Iterable[Ticket], shapes: dict[str, tuple[int, ...]]) -> Ticket:
        """Union of tickets over the tensors in ``shapes`` (tickets may cover a subset)."""
        parts: dict[str, list[torch.Tensor]] = {n: [] for n in shapes}
        for t in tickets:
            for name, idx in t.indices.items():
                if name in parts:
                    parts[name].append(idx)
        indices = {
            n: torch.unique(torch.cat(p)) if p else torch.zeros(0, dtype=torch.long)
            for n, p in parts.items()
        }
        return cls(shapes=dict(shapes), indices=indices)

    def complement(self) -> Ticket:
        """Every eligible entry not in this ticket."""
        indices = {}
        for name, idx in self.indices.items():
            keep = torch.ones(self.tensor_numel(name), dtype=torch.bool)
            keep[idx] = False
            indices[name] = keep.nonzero().view(-1)
        return Ticket(shapes=dict(self.shapes), indices=indices)

    def summary(self) -> str:
        return f"{self.nnz:,} of {self.numel:,} entries ({100 * self.density:.3g} %) in {len(self.shapes)} tensors"


def check_against(shapes: dict[str, tuple[int, ...]], other: Ticket, what: str = "ticket") -> None:
    """Raise ``MismatchError`` unless every tensor of ``other`` is one of ``shapes`` (the model's
    targets) with the same shape; ``what`` names ``other`` in the message."""
    for name, shape in other.shapes.items():
        if name not in shapes:
            raise MismatchError(
                f"{what} has tensor '{name}' that the model's targets do not have",
                fix="use a file made for this architecture and the same --targets",
            )
        if tuple(shapes[name]) != shape:
            raise MismatchError(
                f"{what} tensor '{name}' has shape {list(shape)}, the model has {list(shapes[name])}",
                fix="use a file made for this architecture",
            )


def check_shape(name: str, shape) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints; floats, strings and bools are refused rather
    than rounded, and the entry count must fit int64 indices."""
    fix = "give the shape as non-negative integers, e.g. (4096, 4096)"
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
        raise TicketError(
            f"tensor '{name}' has shape {shape!r}, not a sequence of integers", fix=fix
        )
    dims = []
    for d in shape:
        if isinstance(d, bool) or (isinstance(d, torch.Tensor) and d.dim()):
            raise TicketError(
                f"tensor '{name}' has a dimension {d!r} that is not an integer", fix=fix
            )
        try:
            d = operator.index(d)
        except TypeError:
            raise TicketError(
                f"tensor '{name}' has a dimension {d!r} that is not an integer", fix=fix
            ) from None
        if d < 0:
            raise TicketError(f"tensor '{name}' has a negative dimension {d}", fix=fix)
        dims.append(d)
    if math.prod(dims) > MAX_TENSOR_NUMEL:
        raise TicketError(
            f"tensor '{name}' has {math.prod(dims):,} entries, more than int64 indices can number",
            fix=fix,
        )
    return tuple(dims)


def _as_indices(name: str, idx) -> torch.Tensor:
    """int64 tensor of ``idx``; other integer tensors and integer sequences are converted."""
    if not isinstance(idx, torch.Tensor):
        try:
            idx = torch.as_tensor(idx)
        except (TypeError, ValueError, RuntimeError):
            raise TicketError(
                f"indices of '{name}' are not a tensor of integers",
                fix="pass a 1-D int64 tensor of flat positions",
            ) from None
        if idx.numel() == 0:  # an empty list becomes float32
            idx = idx.to(torch.long)
    # Only other integer types are converted: a float or bool tensor is a mistake to report
    # (a bool tensor is a mask, not positions).
    is_integer = not (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool)
    if idx.dtype != torch.long and is_integer:
        idx = idx.to(torch.long)
    return idx


def check_indices(name: str, idx: torch.Tensor, numel: int) -> None:
    """Raise ``TicketError`` unless ``idx`` is int64, 1-D, strictly increasing, in ``[0, numel)``."""
    fix = "pass sorted unique flat positions inside the tensor (torch.unique sorts and dedupes)"
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long:
        what = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TicketError(f"indices of '{name}' are {what}, not int64", fix=fix)
    if idx.dim() != 1:
        raise TicketError(f"indices of '{name}' have {idx.dim()} dimensions, not 1", fix=fix)
    if idx.numel() == 0:
        return
    if int(idx[0]) < 0:
        raise TicketError(f"indices of '{name}' include a negative position {int(idx[0])}", fix=fix)
    if int(idx[-1]) >= numel:
        raise TicketError(
            f"indices of '{name}' reach position {int(idx[-1])}, the tensor has {numel} entries",
            fix=fix,
        )
    # With the first and last in range, strict increase also puts every other index in range.
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise TicketError(f"indices of '{name}' are not strictly increasing", fix=fix)
