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
            require_finite(
                v,
                f"tensor '{name}' holds non-finite values (NaN or inf)",
                where,
                "recreate the delta from a run that did not diverge",
            )

    def summary(self) -> str:
        return self.ticket.summary()


def require_finite(values: torch.Tensor, what: str, where: str | None, fix: str) -> None:
    """Refuse ``values`` holding NaN or inf: ``InputError(what, where, fix)``.

    Every value lota computes on its way to an output (merged, applied, scaled, cast for saving)
    passes this one check before it is written, so finite inputs never leave a NaN or inf behind.
    """
    if values.numel() and not bool(torch.isfinite(values.to(arithmetic_dtype(values.dtype))).all()):
        raise InputError(what, where, fix)


def arithmetic_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision ``base + value`` is computed in for values of ``dtype``: the values' own,
    except float32 for 8-bit (float8) values. torch has no float8 arithmetic, and rounding the
    base entries to 8 bits would change them far more than the delta does; float8 widens to
    float32 exactly, so this is the sum ``merge`` computes for the same values."""
    return torch.float32 if dtype.itemsize < 2 else dtype


def added_entries(
    base_vals: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``base_vals + values`` computed in ``arithmetic_dtype`` of the values, cast to ``dtype``.

    This one formula is shared by sparse training, ``apply``, ``merge --out-model``, ``export-peft``
    and the hot-swap bank, so that all of them give the same bits."""
    wide = arithmetic_dtype(values.dtype)
    return (base_vals.to(wide) + values.to(wide)).to(dtype)


OVERFLOW_FIX = "add it to a float32 or bfloat16 copy of the base, or scale the delta down"


def finite_sum(
    base_vals: torch.Tensor,
    values: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    where: str | None = None,
    fix: str = OVERFLOW_FIX,
) -> torch.Tensor:
    """``added_entries``, refused if the sum is not finite in ``dtype``: a finite delta can still
    overflow a half-precision weight (float16 ends at 65504)."""
    new = added_entries(base_vals, values, dtype)
    require_finite(
        new,
        f"adding the delta to tensor '{name}' overflows its {str(dtype).removeprefix('torch.')}: "
        "the result would hold inf or NaN",
        where,
        fix,
    )
    return new


def write_entries_(
    param: torch.Tensor, idx: torch.Tensor, base_vals: torch.Tensor, values: torch.Tensor
) -> None:
    """Set ``param.flat[idx] = base_vals + values`` in place (``added_entries``), unchecked: the
    training step's write, where a non-finite loss is caught instead."""
    flat = param.data.view(-1)
    dev = flat.device  # a model on a GPU, with the delta read from a file on the CPU
    # index_put_ takes int32 positions as they are (index_copy_ would want a new int64 copy)
    flat.index_put_((idx.to(dev),), added_entries(base_vals.to(dev), values.to(dev), param.dtype))


@torch.no_grad()
def apply_delta_(params: dict[str, torch.Tensor], delta: SparseDelta, scale: float = 1.0) -> None:
    """Add ``scale * delta`` to ``params`` (``{name: tensor}``) in place, touching only its entries.

    Each tensor's sum is checked finite before it is written (``finite_sum``); a refusal puts the
    tensors already written back, so ``params`` are changed wholly or not at all."""
    fix = "apply the delta to the architecture it was made for"
    done = []  # (flat weight, indices, replaced values), to put back on a refusal
    try:
        for name, idx in delta.ticket.indices.items():
            if name not in params:
                raise InputError(f"delta has tensor '{name}' that the model does not have", fix=fix)
            p = params[name]
            if tuple(p.shape) != delta.ticket.shapes[name]:
                raise InputError(
                    f"delta tensor '{name}' has shape {list(delta.ticket.shapes[name])}, the "
                    f"model has {list(p.shape)}",
                    fix=fix,
                )
            if idx.numel() == 0:
                continue
            v = delta.values[name]
            if scale != 1.0:
                v = v.to(arithmetic_dtype(v.dtype)) * scale
            flat = p.data.view(-1)
            i = idx.to(flat.device)
            old = flat.index_select(0, i)
            flat.index_copy_(0, i, finite_sum(old, v.to(flat.device), p.dtype, name))
            done.append((flat, i, old))
    except BaseException:
        for flat, i, old in reversed(done):
            flat.index_copy_(0, i, old)
        raise


@torch.no_grad()
def saved_change(
    delta: SparseDelta,
    base,
    dtype: torch.dtype,
    saved: dict[str, torch.Tensor] | None = None,
) -> SparseDelta:
    """The change a model saved in ``dtype`` holds at the delta's entries: ``saved - base``,
    computed in float32. ``base``: the weights the delta was trained from (``{name: tensor}`` or
    a ``WeightReader``), taken in ``dtype``; ``saved``: the model's weights after training, or
    None for ``base + delta`` in ``dtype`` as ``apply`` and sparse training write it.

    On 16-bit weights ``base + change`` (``added_entries``) is the saved weight bit for bit: the
    difference of two 16-bit numbers is exact in float32 unless one is below 2^-16 of the other;
    where the base is the smaller, the float32 sum still rounds to the saved weight, and a weight
    that shrank that far is not rebuilt by any float32 value (``base + delta`` never makes one:
    its small results lie on the base's float32 grid; dense training can, rounding its masters).
    Most changes are 16-bit numbers, which ``format.save(..., values_dtype="auto")`` stores in 16
    bits."""
    values = {}
    for name, idx in delta.indices.items():
        b = _entries(base[name], idx).to(dtype)
        if saved is None:
            t = added_entries(b, delta.values[name].to("cpu"), dtype)
        else:
            t = _entries(saved[name], idx).to(dtype)
        values[name] = t.float() - b.float()
    return SparseDelta(ticket=delta.ticket, values=values, meta=dict(delta.meta))


def _entries(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A weight's entries at ``idx`` on the CPU (all of it, with no gather, for a whole tensor)."""
    flat = weight.detach().reshape(-1)
    if idx.numel() != flat.numel():
        flat = flat[idx.to(flat.device)]
    return flat.cpu()


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
