"""Task vectors between model folders: tickets (``lota mask``), sparse deltas (``lota delta``) and
applying deltas to a base (``lota apply``).

``mask`` and ``delta`` read both models tensor by tensor from their safetensors files, so they
never hold a whole model in memory. ``apply`` checks each delta's base fingerprint against the
base (or against the model as built so far, for a chain trained one after another) and refuses a
mismatch unless told otherwise.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from . import format as fmt
from . import selection
from .delta import SparseDelta, apply_delta_
from .errors import InputError, MismatchError
from .fileio import check_new_folder
from .models import (
    WeightReader,
    load_model,
    load_tokenizer,
    model_fingerprint,
    named_weights,
    save_model,
)
from .ticket import Ticket
from .train import limit_heap_growth


def _readers(base: str, tuned: str, targets: str | None):
    rb, rt = WeightReader(base, "base model"), WeightReader(tuned, "tuned model")
    shapes = rb.targets(targets)
    other = rt.targets(targets)
    if shapes != other:
        diff = sorted(set(shapes.items()) ^ set(other.items()))[:1]
        raise MismatchError(
            f"base and tuned models differ in their target tensors (first: {diff[0][0]})",
            tuned,
            "compare a model with a fine-tune of that same model",
        )
    return rb, rt, shapes


def _protected(paths: list[str], shapes) -> Ticket | None:
    if not paths:
        return None
    tickets = []
    for p in paths:
        obj = fmt.load(p)
        t = obj.ticket if isinstance(obj, SparseDelta) else obj
        Ticket(
            shapes=shapes, indices={n: torch.zeros(0, dtype=torch.long) for n in shapes}
        ).check_compatible(t, f"protect file {p}")
        tickets.append(t)
    return Ticket.union(tickets, shapes)


def difference_fn(tuned_get, base_get, shapes: dict[str, tuple[int, ...]]):
    """A ``delta_fn`` for selection: ``tuned_get(name) - base_get(name)`` in float32, in one
    buffer reused by every call (fewer page faults). It is marked ``fresh``: selectors may
    overwrite what it returns, which is valid until the next call."""
    buffer = torch.empty(max((math.prod(s) for s in shapes.values()), default=0))

    def delta_fn(name):
        d = buffer[: math.prod(shapes[name])].view(shapes[name])
        d.copy_(tuned_get(name))
        return d.sub_(base_get(name))  # the base is widened to float32 as it is subtracted

    delta_fn.fresh = True
    return delta_fn


def require_trainable(sparsity: str | float, numel: int) -> int:
    """``k`` for ``sparsity`` of ``numel`` target entries, refusing a sparsity so close to 1 that
    ``k`` is 0 (a ticket that trains nothing); the fix names the largest sparsity that keeps one
    entry, ``1 - 1/numel``, rounded down to a decimal a user can type."""
    k = selection.ticket_size(sparsity, numel)
    if k == 0 and numel > 0:
        digits = len(str(numel)) + 2  # close enough to 1 - 1/numel to keep exactly one entry
        kept = (numel - 1) * 10**digits // numel  # rounded down, so k stays >= 1
        largest = f"0.{kept:0{digits}d}".rstrip("0").rstrip(".") if kept else "0"
        raise InputError(
            f"sparsity {sparsity} leaves 0 of {numel:,} target entries trainable",
            "--sparsity",
            f"use at most {largest} (1 entry), or a lower sparsity",
        )
    return k


def make_ticket(
    base: str,
    tuned: str,
    sparsity: str | float = "0.9",
    targets: str | None = None,
    protect: list[str] | None = None,
    method: str = "magnitude",
    seed: int = 0,
    show_progress: bool = True,
) -> Ticket:
    """The exact global top-k of ``|tuned - base|`` (or another registered selector)."""
    limit_heap_growth()  # per-tensor temporaries must not fragment the heap the ticket grows in
    rb, rt, shapes = _readers(base, tuned, targets)
    k = require_trainable(sparsity, sum(math.prod(s) for s in shapes.values()))
    excluded = _protected(protect or [], shapes)
    delta_fn = difference_fn(rt.get, rb.get, shapes)
    rb.hash_while_reading()  # the base's fingerprint is computed as pass 1 streams its tensors
    with tqdm(
        total=2 * len(shapes), desc="select", unit="tensor", disable=not show_progress, leave=False
    ) as bar:
        ticket = selection.select(
            method, shapes, k, delta_fn=delta_fn, exclude=excluded, seed=seed, progress=bar
        )
    ticket.base_fingerprint = rb.fingerprint()
    return ticket


def make_delta(
    base: str,
    tuned: str,
    ticket: Ticket | None = None,
    sparsity: str | float | None = None,
    targets: str | None = None,
    protect: list[str] | None = None,
    values_dtype=torch.float32,
    show_progress: bool = True,
) -> SparseDelta:
    """``tuned - base`` at a ticket's entries; with ``sparsity`` instead, the ticket is extracted first."""
    if (ticket is None) == (sparsity is None):
        raise InputError(
            "give either a ticket or a sparsity", "lota delta", "pass --ticket FILE or --sparsity S"
        )
    rb, rt, shapes = _readers(base, tuned, targets)
    if ticket is None:
        ticket = make_ticket(base, tuned, sparsity, targets, protect, show_progress=show_progress)
    else:
        probe = Ticket(shapes=shapes, indices={n: torch.zeros(0, dtype=torch.long) for n in shapes})
        probe.check_compatible(ticket, "ticket")
        ticket = Ticket(
            shapes=dict(ticket.shapes),
            indices=dict(ticket.indices),
            base_fingerprint=rb.fingerprint(),
        )
    values = {}
    for name, idx in tqdm(
        ticket.indices.items(), desc="delta", unit="tensor", disable=not show_progress, leave=False
    ):
        b = rb.get(name).reshape(-1)[idx].to(torch.float32)
        t = rt.get(name).reshape(-1)[idx].to(torch.float32)
        values[name] = (t - b).to(values_dtype)
    delta = SparseDelta(ticket=ticket, values=values)
    delta.check_finite(tuned)
    return delta


def _label(p) -> str:
    return p.meta.get("path", "merged delta") if isinstance(p, SparseDelta) else str(p)


def apply_deltas(
    base: str,
    delta_paths: list,
    out: str,
    allow_mismatch: bool = False,
    scales: list[float] | None = None,
    force: bool = False,
) -> dict:
    """Write ``base + Σ scale_i · delta_i`` as a loadable model folder (deltas as paths or objects)."""
    check_new_folder(out, force)
    if scales is not None and len(scales) != len(delta_paths):
        raise InputError(
            f"{len(scales)} scales for {len(delta_paths)} deltas",
            "--scales",
            "give one scale per delta",
        )
    deltas = []
    delta_paths = [p if isinstance(p, SparseDelta) else str(p) for p in delta_paths]
    for p in delta_paths:
        obj = p if isinstance(p, SparseDelta) else fmt.load(p)
        if not isinstance(obj, SparseDelta):
            raise InputError(
                "is a ticket, not a delta: it has no values to apply",
                p,
                "make a delta with 'lota delta BASE TUNED --ticket FILE'",
            )
        obj.check_finite(_label(p))
        deltas.append(obj)
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    weights = named_weights(model)
    base_fp = model_fingerprint(model)
    current = base_fp
    for i, (p, d) in enumerate(zip(delta_paths, deltas)):
        if d.base_fingerprint not in (base_fp, current) and not allow_mismatch:
            raise MismatchError(
                f"the delta was made for base {d.base_fingerprint or '(none)'}, "
                f"this base is {base_fp}",
                _label(p),
                "apply it to the model it was trained from, or pass --allow-mismatch",
            )
        try:
            apply_delta_(weights, d, scale=1.0 if scales is None else scales[i])
        except InputError as e:
            raise InputError(e.what, _label(p), e.fix) from None
        if i + 1 < len(deltas):
            current = model_fingerprint(model)
    save_model(
        model,
        tokenizer,
        out,
        extra={"base_fingerprint": base_fp, "deltas": [_label(p) for p in delta_paths]},
    )
    return {
        "out": out,
        "deltas": len(deltas),
        "entries": sum(d.nnz for d in deltas),
        "base_fingerprint": base_fp,
    }
