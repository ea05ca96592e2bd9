"""Sparse task vectors: a ticket plus one value per trainable entry.

``SparseDelta`` is ``m ⊙ δ``: applied to base weights ``w0`` it gives ``w0 + m ⊙ δ``. Invariant:
``values[name]`` is 1-D and aligned with ``ticket.indices[name]``. Applying writes only the
ticket's entries, with the same arithmetic the sparse training uses, so a trained model and
``base + delta`` are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError
from .ticket import Ticket, TicketError


@dataclass
class SparseDelta:
    ticket: Ticket
    values: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    kind = "delta"

    def __post_init__(self):
        self.validate(ticket=False)  # the ticket checked itself when it was built

    def validate(self, ticket: bool = True) -> None:
        """Check the ticket's invariant (unless ``ticket`` is False) and that every tensor has one
        floating-point value per entry; ``TicketError`` names the first tensor that does not."""
        if ticket:
            self.ticket.validate()
        fix = "give each tensor a 1-D floating-point tensor with one value per ticket entry"
        for name, idx in self.ticket.indices.items():
            v = self.values.get(name)
            if not isinstance(v, torch.Tensor):
                raise TicketError(f"values for '{name}' are missing", fix=fix)
            if v.dim() != 1 or v.numel() != idx.numel():
                raise TicketError(
                    f"values for '{name}' have shape {list(v.shape)}, its ticket has "
                    f"{idx.numel()} entries",
                    fix=fix,
                )
            if not v.is_floating_point():
                raise TicketError(f"values for '{name}' are {v.dtype}, not floating point", fix=fix)

    # Ticket-like accessors so code can take either kind of file.
    @property
    def shapes(self):
        return self.ticket.shapes

    @property
    def indices(self):
        return self.ticket.indices

    @property
    def names(self):
        return self.ticket.names

    @property
    def numel(self) -> int:
        return self.ticket.numel

    @property
    def nnz(self) -> int:
        return self.ticket.nnz

    @property
    def density(self) -> float:
        return self.ticket.density

    @property
    def base_fingerprint(self) -> str:
        return self.ticket.base_fingerprint

    def dense_masks(self) -> dict[str, torch.Tensor]:
        return self.ticket.dense_masks()

    def to_dense(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{name: dense tensor of the parameter's shape}`` with zeros outside the ticket."""
        out = {}
        for name, idx in self.ticket.indices.items():
            v = self.values[name]
            d = torch.zeros(self.ticket.tensor_numel(name), dtype=dtype or v.dtype)
            d[idx] = v.to(d.dtype)
            out[name] = d.view(self.ticket.shapes[name])
        return out

    def check_finite(self, where: str = "delta") -> None:
        for name, v in self.values.items():
            if v.numel() and not bool(torch.isfinite(v).all()):
                raise InputError(
                    f"tensor '{name}' holds non-finite values (NaN or inf)",
                    where,
                    "recreate the delta from a run that did not diverge",
                )

    def summary(self) -> str:
        return self.ticket.summary()


def write_entries_(
    param: torch.Tensor, idx: torch.Tensor, base_vals: torch.Tensor, values: torch.Tensor
) -> None:
    """Set ``param.flat[idx] = base_vals + values`` in place, computed in the values' precision.

    This one formula is shared by sparse training and by ``apply`` so that both give the same bits.
    """
    flat = param.data.view(-1)
    dev = flat.device  # a model on a GPU, with the delta read from a file on the CPU
    vals = base_vals.to(device=dev, dtype=values.dtype) + values.to(dev)
    # index_put_ takes int32 positions as they are (index_copy_ would want a new int64 copy)
    flat.index_put_((idx.to(dev),), vals.to(param.dtype))


@torch.no_grad()
def apply_delta_(params: dict[str, torch.Tensor], delta: SparseDelta, scale: float = 1.0) -> None:
    """Add ``scale * delta`` to ``params`` (``{name: tensor}``) in place, touching only its entries."""
    for name, idx in delta.ticket.indices.items():
        if name not in params:
            raise InputError(
                f"delta has tensor '{name}' that the model does not have",
                fix="apply the delta to the architecture it was made for",
            )
        p = params[name]
        if tuple(p.shape) != delta.ticket.shapes[name]:
            raise InputError(
                f"delta tensor '{name}' has shape {list(delta.ticket.shapes[name])}, the model has {list(p.shape)}",
                fix="apply the delta to the architecture it was made for",
            )
        if idx.numel() == 0:
            continue
        v = delta.values[name]
        if scale != 1.0:
            v = v * scale
        write_entries_(p, idx, p.data.view(-1)[idx.to(p.device)], v)


def delta_from_weights(
    ticket: Ticket,
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
) -> SparseDelta:
    """Values ``tuned - base`` at the ticket's entries (of a tensor in the ticket entirely: the
    whole tensors, with no gather through its indices)."""
    values = {}
    for name, idx in ticket.indices.items():
        b, t = base[name].reshape(-1), tuned[name].reshape(-1)
        if idx.numel() != ticket.tensor_numel(name):
            b, t = b[idx.to(b.device)], t[idx.to(t.device)]
        values[name] = (t.to("cpu", torch.float32) - b.to("cpu", torch.float32)).to(dtype)
    return SparseDelta(ticket=ticket, values=values)
