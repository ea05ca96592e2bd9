"""Tickets read from the files a user names: ``--ticket`` and ``--protect`` of ``lota adapt``,
``--protect`` of ``lota mask`` and ``lota delta``.

Each file is a ticket or a delta file (``lota.format``), checked against the model's tensors as it
loads, so an error names the file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ticket import Ticket


def load_tickets(paths: list[str], shapes: dict[str, tuple[int, ...]]) -> list[Ticket]:
    """The tickets of ticket or delta files, each checked against ``shapes`` (the model's
    tensors) as it loads, so an error names the file."""
    from . import format as fmt

    return [fmt.load(p, shapes=shapes).ticket for p in paths]


def protected_ticket(
    paths: list[str],
    shapes: dict[str, tuple[int, ...]],
    model_shapes: dict[str, tuple[int, ...]] | None = None,
) -> Ticket | None:
    """The union of the tickets to protect (``--protect``) over ``shapes`` (the targets); None
    without any. Each file is checked against ``model_shapes`` (every tensor of the model;
    default ``shapes``): its entries outside the targets are frozen anyway."""
    if not paths:
        return None
    from .ticket import Ticket

    return Ticket.union(load_tickets(paths, model_shapes or shapes), shapes)
