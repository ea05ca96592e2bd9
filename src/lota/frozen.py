"""The frozen check that ends every sparse ``lota adapt`` run: every entry outside the ticket, and
every protected entry, is bit-identical to the starting model.

The check compares where the weights are (a GPU's never come over to the host); a sharded model is
checked by each rank on its own rows.
"""

from __future__ import annotations

import torch

from . import dist
from .errors import LotaError
from .phases import Run
from .targets import named_weights
from .ticket import Ticket


def verify(run: Run, ticket: Ticket, protected: Ticket | None, info: dict) -> None:
    """Check the run's trained model against its starting weights; record it in ``info``."""
    if run.sharded:  # each rank checks its own rows of every weight
        info["frozen_verified"] = verify_frozen_shards(
            run.model, run.w0, ticket, protected, run.world
        )
        return
    weights = named_weights(run.model)
    info["frozen_verified"] = verify_frozen(weights, run.w0, ticket, protected)
    info["frozen_verified_ranks"] = run.world.size


def verify_frozen(weights, w0, ticket: Ticket, protected: Ticket | None) -> bool:
    """Every entry outside the ticket (and every protected entry) equals the start, bit for bit.

    Compared where the weights are (a GPU's never come over to the host): each starting tensor
    goes to the weight's device, takes the ticket's entries of the trained weight, and must then
    equal it bit for bit."""
    for n, idx in ticket.indices.items():
        now = weights[n].detach().reshape(-1)
        start = w0[n].to(device=now.device, dtype=now.dtype, copy=True).reshape(-1)
        if protected is not None and n in protected.indices:
            p = protected.indices[n].to(now.device)
            if not same_bits(now[p], start[p]):
                raise LotaError(
                    f"protected entries of '{n}' changed", fix="report this as a lota bug"
                )
        idx = idx.to(now.device)
        start[idx] = now[idx]
        if not same_bits(now, start):
            raise LotaError(
                f"entries outside the ticket of '{n}' changed", fix="report this as a lota bug"
            )
    return True


def verify_frozen_shards(model, w0, ticket: Ticket, protected, world: dist.World) -> bool:
    """``verify_frozen`` on this rank's rows of each sharded weight; true only if every rank's
    rows check out (a failure on any rank fails the run on all)."""
    from .sparse_model import parametrized_modules

    failed = None
    for name, module, attr, _ in parametrized_modules(model):
        local, start = dist.local_rows(module.parametrizations[attr].original)
        stop = start + local.shape[0]
        shard = dist.Shard(world, {name: local.numel()}, {name: start * local[0].numel()})
        rows = rows_of(ticket, name, shard, local.shape)
        prot = None
        if protected is not None and name in protected.indices:
            prot = rows_of(protected, name, shard, local.shape)
        try:
            verify_frozen({name: local}, {name: w0[name][start:stop]}, rows, prot)
        except LotaError as e:
            failed = e
    if world.any(failed is not None):
        raise failed or LotaError(
            "frozen entries changed on another process", fix="report this as a lota bug"
        )
    return True


def rows_of(t: Ticket, name: str, shard: dist.Shard, shape) -> Ticket:
    """Tensor ``name`` of ticket ``t`` restricted to a shard's rows, in local positions."""
    return Ticket(
        shapes={name: tuple(shape)}, indices={name: shard.local_indices(name, t.indices[name])}
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )
