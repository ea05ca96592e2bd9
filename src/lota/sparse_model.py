"""The sparse-trainable model: ``prepare(model, ticket)`` and back.

Each targeted weight ``W`` keeps its storage and stays frozen; a parametrization adds a trainable
vector ``delta`` of the ticket's size. The forward pass sees the live weight ``W``, in which the
ticket entries hold ``w0 + delta`` (rewritten in place after the optimizer changes ``delta``),
and the backward pass gathers only the ticket's entries of the weight gradient into ``delta.grad``.
So the only trainable parameters are the ``delta`` vectors (optimizer state is O(k)), no second
dense copy of any weight exists, and entries outside the ticket are never written: they stay
bit-identical under any optimizer, weight decay or momentum.

The live weight is rewritten lazily, at the first forward after ``delta`` changed. A change is
seen by ``delta``'s version counter (any in-place autograd-visible write, ``load_state_dict``)
or by a step of any ``torch.optim`` optimizer: fused optimizers (the Trainer's default
``adamw_torch_fused``) write parameters without bumping their version counter.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

from .delta import SparseDelta, write_entries_
from .errors import InputError
from .shards import full_tensor, full_tensors, local_rows, span
from .ticket import Ticket

_optimizer_steps = 0
_step_hook = None
_prepared: list[weakref.ref] = []  # every live parametrization, in the order they were made


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1
    _sync_sharded()


def _sync_sharded() -> None:
    """Write ``base + delta`` into each sharded weight's local rows (every rank, same order).

    A weight is sharded when FSDP2 made it a DTensor (seen here, after a step, when FSDP2 has
    resharded) or when ``mark_sharded`` said so."""
    alive = [p for p in (ref() for ref in _prepared) if p is not None]
    _prepared[:] = [weakref.ref(p) for p in alive]
    for p in alive:
        if not p.sharded and _is_dtensor(p.original()):
            p.sharded = True
    _sync_shards([p for p in alive if p.sharded])


def _sync_shards(params: list[SparseDeltaParametrization]) -> None:
    """``sync_shard_`` of every parametrization in ``params``, their deltas gathered together:
    one collective per step (per ``full_tensors`` bucket) instead of one per weight."""
    deltas = full_tensors([p.delta.detach() for p in params])
    for p, delta in zip(params, deltas):
        p.sync_shard_(delta)


def _is_dtensor(t) -> bool:
    if t is None or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _watch_optimizer_steps() -> None:
    """Count every optimizer step in this process (a global post-step hook, registered once)."""
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_count_step)


class _SparseTie(torch.autograd.Function):
    """Identity on the live weight whose gradient flows to the ticket's entries only."""

    @staticmethod
    def forward(ctx, weight, delta, owner):
        ctx.owner = owner
        ctx.delta_dtype = delta.dtype
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return (
            None,
            grad.reshape(-1).index_select(0, ctx.owner.positions()).to(ctx.delta_dtype),
            None,
        )


class SparseDeltaParametrization(nn.Module):
    """Parametrization holding one tensor's ticket (its positions), ``base_values`` and ``delta``.

    Positions are flat indices, sorted, int32 (int64 for a tensor of 2^31 entries or more), kept on
    the weight's device once: the backward pass and the writes after each step use them as they
    are, so a step builds no index and never waits for the device.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        index: torch.Tensor,
        values: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        index = index.to(device=weight.device, dtype=torch.long)
        self.shape = tuple(weight.shape)
        # kept on the weight's device in the narrowest type that holds every position: each
        # backward gathers through it and each step writes through it, with no conversion
        small = weight.numel() < 2**31
        self.register_buffer("flat_index", index.to(torch.int32 if small else torch.long))
        self.register_buffer("base_values", weight.detach().reshape(-1)[index])
        del index
        init = torch.zeros(self.base_values.numel(), dtype=dtype, device=weight.device)
        if values is not None:
            init.copy_(values.to(device=weight.device, dtype=dtype))
        self.delta = nn.Parameter(init)
        self._synced: tuple[int, int, int] | None = None
        self._span: tuple[int, int, int, int] | None = None  # sharded: (start, stop, a, b)
        self._plist: weakref.ref | None = None  # the owning ParametrizationList, once registered
        self.sharded = False  # FSDP2: the ticket's entries are kept in sync on the shards
        if values is not None:
            self.sync_(weight)
        else:
            self._synced = self._state()

    def _state(self) -> tuple[int, int, int]:
        return (id(self.delta), self.delta._version, _optimizer_steps)

    def positions(self) -> torch.Tensor:
        """Flat indices of the ticket's entries, sorted (int32, or int64 for a huge tensor)."""
        return self.flat_index

    @torch.no_grad()
    def sync_(self, weight: torch.Tensor) -> None:
        """Write ``base_values + delta`` into the ticket entries of the live weight."""
        if self.delta.numel():
            write_entries_(weight, self.positions(), self.base_values, self.delta.detach())
        self._synced = self._state()

    def local_span(self) -> tuple[torch.Tensor, int, int, int]:
        """FSDP2: ``(local rows, first row, a, b)``: this rank's rows of the weight and the range
        ``[a, b)`` of the ticket's entries that fall in them (found once: the layout is fixed)."""
        local, start = local_rows(self.original())
        stop = start + local.shape[0]
        if self._span is None or self._span[:2] != (start, stop):
            row = math.prod(self.shape[1:])
            self._span = (start, stop, *span(self.positions(), start * row, stop * row))
        return local, start, self._span[2], self._span[3]

    @torch.no_grad()
    def sync_shard_(self, delta: torch.Tensor | None = None) -> None:
        """FSDP2: the sharded weight itself holds ``base + delta`` in this rank's rows, so that
        every all-gather (forward and backward) sees the trained values. ``delta``: the whole
        delta, gathered already (``_sync_shards`` gathers every weight's in one collective)."""
        local, start, a, b = self.local_span()
        if delta is None:
            delta = full_tensor(self.delta.detach())
        if b > a:
            row = math.prod(self.shape[1:])
            pos = self.positions()[a:b] - start * row
            write_entries_(local, pos, self.base_values[a:b], delta[a:b])

    def original(self) -> torch.Tensor | None:
        """The weight this parametrizes (its stored, possibly sharded, parameter)."""
        plist = self._plist() if self._plist is not None else None
        return plist.original if plist is not None else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.sharded and self._synced != self._state():
            self.sync_(weight)
        return _SparseTie.apply(weight, self.delta, self)


def mark_sharded(model: nn.Module) -> None:
    """Declare a prepared model FSDP2-sharded: its weights are kept in sync on their shards after
    every optimizer step (see ``sync_shard_``) instead of being rewritten in each forward. FSDP2
    weights are also recognised by themselves at the first optimizer step; declaring them keeps
    the forward passes before it from writing into gathered copies."""
    for _, _, _, p in parametrized_modules(model):
        p.sharded = True


def sync_shards_(model: nn.Module) -> None:
    """Rewrite the ticket's entries of a sharded model's weights from ``delta`` now (after the
    deltas were set other than by an optimizer step, e.g. restored from a checkpoint)."""
    _sync_shards([p for _, _, _, p in parametrized_modules(model) if p.sharded])


def module_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding parameter ``name`` of ``model``, and the parameter's attribute name."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def prepare(
    model: nn.Module, ticket: Ticket | SparseDelta, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Make ``model`` train only the ticket's entries; returns the same model, modified in place.

    Every parameter is frozen; each ticket tensor gets a trainable ``delta`` of its ticket's size
    (initialised from the delta's values when a ``SparseDelta`` is given). Use any training loop,
    then ``extract_delta(model)`` for the sparse task vector or ``unprepare(model)`` for a plain
    model with the trained weights.
    """
    values = ticket.values if isinstance(ticket, SparseDelta) else None
    params = dict(model.named_parameters())
    for name, shape in ticket.shapes.items():
        if name not in params:
            raise InputError(
                f"ticket tensor '{name}' is not a parameter of the model",
                fix="use a ticket made for this architecture",
            )
        if tuple(params[name].shape) != shape:
            raise InputError(
                f"ticket tensor '{name}' has shape {list(shape)}, the model has "
                f"{list(params[name].shape)}",
                fix="use a ticket made for this architecture",
            )
    _watch_optimizer_steps()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, idx in ticket.indices.items():
        module, attr = module_and_attr(model, name)
        weight = getattr(module, attr)
        par = SparseDeltaParametrization(
            weight, idx, None if values is None else values[name], dtype
        )
        parametrize.register_parametrization(module, attr, par, unsafe=True)
        par._plist = weakref.ref(module.parametrizations[attr])
        _prepared.append(weakref.ref(par))
    return model


def parametrized_modules(model: nn.Module):
    """``(name, module, attr, parametrization)`` of every ticket tensor ``prepare`` put on ``model``."""
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, SparseDeltaParametrization):
                        name = f"{module_name}.{attr}" if module_name else attr
                        yield name, module, attr, p


def is_prepared(model: nn.Module) -> bool:
    return any(True for _ in parametrized_modules(model))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p.delta for _, _, _, p in parametrized_modules(model)]


def delta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{tensor name: its trainable delta}`` for a prepared model."""
    return {name: p.delta for name, _, _, p in parametrized_modules(model)}


@torch.no_grad()
def extract_delta(model: nn.Module, base_fingerprint: str = "") -> SparseDelta:
    """The sparse task vector trained so far (exact ``delta`` values, not a difference of weights).

    On an FSDP2-sharded model this is a collective: every rank must call it."""
    shapes, indices, values = {}, {}, {}
    for name, module, attr, p in parametrized_modules(model):
        shapes[name] = tuple(module.parametrizations[attr].original.shape)
        indices[name] = p.positions().cpu().long()
        values[name] = full_tensor(p.delta.detach()).cpu().clone()
    ticket = Ticket(shapes=shapes, indices=indices, base_fingerprint=base_fingerprint)
    return SparseDelta(ticket=ticket, values=values)


@torch.no_grad()
def unprepare(model: nn.Module) -> nn.Module:
    """Remove lota's parametrizations, leaving plain weights that hold ``w0 + delta``."""
    for _, module, attr, p in list(parametrized_modules(model)):
        original = module.parametrizations[attr].original
        p.sync_(original)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
    return model
