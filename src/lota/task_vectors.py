"""``lota mask``, ``lota delta`` and ``lota apply``: task vectors between model folders.

``mask`` extracts a ticket from the task vector ``tuned - base``, ``delta`` writes that task vector
at a ticket's entries, and ``apply`` adds deltas to a base.

``mask`` and ``delta`` read both models tensor by tensor from their safetensors files, so they
never hold a whole model in memory. ``apply`` checks each delta's base fingerprint against the
base (or against the model as built so far, for a chain trained one after another) and refuses a
mismatch unless told otherwise.

Tied embeddings: a delta entry of a tied input embedding changes the input embedding alone.
``apply`` first gives the output head its own copy (bit-identical to the base's embedding) and
writes an untied folder (``tie_word_embeddings`` false, an ``lm_head.weight`` of its own); a change
of the head itself is an entry of the head's name (``with_head_change``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from tqdm.auto import tqdm

from . import format as fmt
from . import selection
from .delta import SparseDelta, apply_delta_
from .errors import InputError, MismatchError
from .models import load_model, load_tokenizer, save_model
from .output_checks import writing_folder
from .selection import Sparsity, numel_of, require_trainable
from .settings import check_factors
from .targets import (
    named_weights,
    tied_embedding,
    untie_embeddings,
    untied_record,
    writes_untied,
)
from .ticket import Ticket, check_against
from .ticketfiles import protected_ticket
from .train import heap_growth_limited
from .weights import WeightReader, model_fingerprint


def model_pair(base: str, tuned: str, targets: str | None):
    """Readers of a base and a model fine-tuned from it, and the shapes of their ``targets``
    (refused where the two differ in them)."""
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


def make_ticket(
    base: str,
    tuned: str,
    sparsity: str | float | Fraction | Sparsity = "0.9",
    targets: str | None = None,
    protect: list[str] | None = None,
    method: str = "magnitude",
    seed: int = 0,
    show_progress: bool = True,
) -> Ticket:
    """The exact global top-k of ``|tuned - base|`` (or another registered selector)."""
    rb, rt, shapes = model_pair(base, tuned, targets)
    k = require_trainable(sparsity, numel_of(shapes))
    excluded = protected_ticket(protect or [], shapes, rb.shapes)
    # per-tensor temporaries (read on the host) must not fragment the heap the ticket grows in
    with heap_growth_limited("cpu"):
        return select_difference(rb, rt.get, shapes, k, method, excluded, seed, show_progress)


def select_difference(
    base: WeightReader,
    tuned_get: Callable[[str], torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    k: int,
    method: str = "magnitude",
    exclude: Ticket | None = None,
    seed: int = 0,
    show_progress: bool = False,
    base_fingerprint: str | None = None,
) -> Ticket:
    """The ticket of ``k`` entries of the task vector ``tuned_get(name) - base``, read one tensor
    at a time, recording the base's fingerprint (hashed as the base streams, unless given)."""
    delta_fn = difference_fn(tuned_get, base.get, shapes)
    if base_fingerprint is None:
        base.hash_while_reading()  # the fingerprint is computed as pass 1 streams the base
    with tqdm(
        total=2 * len(shapes), desc="select", unit="tensor", disable=not show_progress, leave=False
    ) as bar:
        return selection.select(
            method,
            shapes,
            k,
            delta_fn=delta_fn,
            exclude=exclude,
            seed=seed,
            base_fingerprint=base.fingerprint if base_fingerprint is None else base_fingerprint,
            progress=bar,
        )


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
    """``tuned - base`` at a ticket's entries; with ``sparsity`` instead, the ticket is extracted first.

    The difference is computed in float32 and kept in ``values_dtype``; ``"auto"`` keeps float32,
    which ``format.save(..., values_dtype="auto")`` then stores in 16 bits wherever that is exact.
    """
    if values_dtype == "auto":
        values_dtype = torch.float32
    if (ticket is None) == (sparsity is None):
        raise InputError(
            "give either a ticket or a sparsity", "lota delta", "pass --ticket FILE or --sparsity S"
        )
    rb, rt, shapes = model_pair(base, tuned, targets)
    if ticket is None:
        ticket = make_ticket(base, tuned, sparsity, targets, protect, show_progress=show_progress)
    else:
        check_against(shapes, ticket, "ticket")
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
    delta = with_head_change(SparseDelta(ticket=ticket, values=values), rb, rt)
    delta.check_finite(tuned)
    return delta


def with_head_change(delta: SparseDelta, rb: WeightReader, rt: WeightReader) -> SparseDelta:
    """``delta`` (``tuned - base``) with, on a base whose output head is tied to the input
    embedding, the head's change at the delta's entries of that embedding, where the tuned model's
    head changed there: a tied tuned model's head is its embedding, an untied one's its own
    weight. ``lota apply`` gives a tied base's head its own copy before adding a delta, so a change
    of the embedding alone leaves the head; this entry carries the head's, and the tuned model
    comes back. A head left as the base's embedding (``lota adapt`` keeps it frozen) adds none."""
    pair = tied_embedding(rb.skeleton)
    if pair is None or pair[0] not in delta.indices:
        return delta
    emb, head = pair
    if head in rt.shapes:
        tuned_head = rt.get(head)
    elif tied_embedding(rt.skeleton) == pair:
        tuned_head = rt.get(emb)
    else:
        return delta
    idx = delta.indices[emb]
    change = tuned_head.reshape(-1)[idx].to(torch.float32) - rb.get(emb).reshape(-1)[idx].float()
    if not bool(change.any()):
        return delta
    t = delta.ticket
    ticket = Ticket(
        shapes={**t.shapes, head: t.shapes[emb]},
        indices={**t.indices, head: idx.clone()},
        base_fingerprint=t.base_fingerprint,
    )
    values = {**delta.values, head: change.to(delta.values[emb].dtype)}
    return SparseDelta(ticket=ticket, values=values, meta=dict(delta.meta))


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
    """Write ``base + Σ scale_i · delta_i`` as a loadable model folder (deltas as paths or objects).
    ``out`` is locked from its check to its swap, and may not be the base or hold an input."""
    paths = [p for p in delta_paths if not isinstance(p, SparseDelta)]
    with writing_folder(out, force, inputs=[base, *paths]):
        return _apply_deltas(base, delta_paths, out, allow_mismatch, scales)


def _apply_deltas(
    base: str, delta_paths: list, out: str, allow_mismatch: bool, scales: list[float] | None
) -> dict:
    if scales is not None and len(scales) != len(delta_paths):
        raise InputError(
            f"{len(scales)} scales for {len(delta_paths)} deltas",
            "--scales",
            "give one scale per delta",
        )
    check_factors(scales or [], "scale", "--scales", "give finite numbers, e.g. --scales 1,0.5")
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
    # a delta on a tied embedding changes the input embedding alone: the head gets its own copy
    changed = [[n for n, i in d.indices.items() if i.numel()] for d in deltas]
    untied = untie_embeddings(model, {n for names in changed for n in names})
    weights = named_weights(model)
    base_fp = model_fingerprint(model)
    current, written = base_fp, False
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
        written = written or writes_untied(model, changed[i])
        if i + 1 < len(deltas):
            current = model_fingerprint(model, written)
    extra = {"base_fingerprint": base_fp, "deltas": [_label(p) for p in delta_paths]}
    save_model(model, tokenizer, out, extra={**extra, **untied_record(untied)})
    return {
        "out": out,
        "deltas": len(deltas),
        "entries": sum(d.nnz for d in deltas),
        "base_fingerprint": base_fp,
        **untied_record(untied),
    }
