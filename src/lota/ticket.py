"""Tickets: the set of trainable entries of a model, per parameter tensor.

A ticket maps each eligible parameter name to its shape and the sorted, unique flat indices of its
trainable entries. Eligible tensors with no trainable entry are still listed (with no indices), so
``numel`` counts every eligible entry and density is well defined. Invariant: indices are int64,
strictly increasing and inside ``[0, numel(shape))``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from .errors import MismatchError


@dataclass
class Ticket:
    """Trainable entries: ``indices[name]`` holds flat positions in a tensor of ``shapes[name]``."""

    shapes: dict[str, tuple[int, ...]]
    indices: dict[str, torch.Tensor]
    base_fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    kind = "ticket"

    def __post_init__(self):
        self.shapes = {n: tuple(int(d) for d in s) for n, s in self.shapes.items()}
        missing = set(self.shapes) ^ set(self.indices)
        if missing:
            raise ValueError(f"shapes and indices disagree on names: {sorted(missing)[:3]}")

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

    def ticket(self) -> Ticket:
        return self

    # -- set algebra (names and shapes must agree) -----------------------------------------------
    def check_compatible(self, other: Ticket, what: str = "ticket") -> None:
        for name, shape in other.shapes.items():
            if name not in self.shapes:
                raise MismatchError(
                    f"{what} has tensor '{name}' that the model's targets do not have",
                    fix="use a file made for this architecture and the same --targets",
                )
            if self.shapes[name] != shape:
                raise MismatchError(
                    f"{what} tensor '{name}' has shape {list(shape)}, the model has {list(self.shapes[name])}",
                    fix="use a file made for this architecture",
                )

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


def from_masks(masks: dict[str, torch.Tensor], base_fingerprint: str = "") -> Ticket:
    """Build a ticket from ``{name: bool tensor}`` (True = trainable)."""
    shapes = {n: tuple(m.shape) for n, m in masks.items()}
    indices = {n: m.reshape(-1).nonzero().view(-1) for n, m in masks.items()}
    return Ticket(shapes=shapes, indices=indices, base_fingerprint=base_fingerprint)
