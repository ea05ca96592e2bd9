"""What a ``lota adapt`` method trains, as phases of the run: every target entry (``dense``), a PEFT
LoRA adapter merged at the end (``lora``), or only a ticket's entries (``sparse``).

Each trainer returns the run's delta: the exact change of the targets (dense, LoRA: every entry;
sparse: the ticket's entries). The sparse trainer starts from the ticket its source built
(``ticket``), which is what the checkpoint holds from then on.
"""

from __future__ import annotations

from . import dist, phases, sources
from .delta import SparseDelta, delta_from_weights
from .phases import Run, masters, shard, train_only
from .precision import restore_dtype_
from .sparse_model import delta_parameters, extract_delta, prepare, unprepare
from .targets import named_weights
from .ticket import Ticket
from .train import heap_growth_limited, release_freed_memory


def train_dense(run: Run, steps: int) -> SparseDelta:
    """Train every target entry (``fft``) or a LoRA adapter on the targets (``lora``); the delta
    holds every target entry."""
    cfg, targets = run.cfg, run.targets
    if run.dense:
        train_only(run.model, targets)
        if cfg.fsdp:
            shard(run)
        weights = named_weights(run.model)
        params = {n: weights[n] for n in targets}
        stored = masters(run, params)
        run.phase("train", params, cfg.lr, steps, masters=bool(stored))
        for p in params.values():
            p.requires_grad_(False)
        model = run.model
    else:
        model, stored, params = _train_lora(run, steps), {}, {}
        run.model = model
    full = Ticket.every(targets)  # no index per entry: the file stores the "full" encoding
    weights = named_weights(model)
    # the exact change of the float32 masters; then the model holds its weights' dtype again
    delta = delta_from_weights(full, run.w0, {n: dist.full_tensor(weights[n]) for n in targets})
    restore_dtype_(params, stored)
    return delta


def _train_lora(run: Run, steps: int):
    peft_model = phases.lora_model(run)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    run.phase("train", params, run.cfg.lr, steps, model=peft_model)
    run.adapter = _adapter(peft_model)
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


def _adapter(peft_model) -> dict:
    """The trained LoRA adapter as PEFT saves it (tensors by PEFT's keys, its config), and its
    own size: r x (in + out) parameters per adapted layer."""
    from peft import get_peft_model_state_dict

    tensors = {
        k: dist.full_tensor(v.detach()).cpu().clone()
        for k, v in get_peft_model_state_dict(peft_model).items()
    }
    config = peft_model.peft_config["default"]
    return {
        "tensors": tensors,
        "config": config,
        "parameters": sum(t.numel() for t in tensors.values()),
        "layers": len({k.rsplit(".lora_", 1)[0] for k in tensors}),
    }


def ticket_of(ctx: sources.Context) -> Ticket:
    """The ticket from its source (saved as the checkpoint), or from the checkpoint of a run
    interrupted in its sparse phase."""
    run = ctx.run
    if run.resumed_phase == "train":
        return run.state["ticket"]  # extracted before the interruption
    ticket = ctx.source.build(ctx)
    run.ckpt.save_ticket(ticket)
    return ticket


def train_sparse(ctx: sources.Context, box: list[Ticket], steps: int) -> SparseDelta:
    """Train only the entries of the ticket in ``box``, which it empties (the prepared model is
    then the ticket's only holder); the delta holds them. A sharded model stays prepared, for
    each rank's frozen check of its rows."""
    run, ticket = ctx.run, box.pop()
    ctx.info["ticket_nnz"] = ticket.nnz
    if run.sharded:  # calibration sharded the model; the sparse phase starts from a fresh copy
        run.model = phases.load_run_model(run.cfg, run.world)
        run.sharded = False
    model = run.model  # a calibration may have handed back another module (LoRA's, unloaded)
    prepare(model, ticket)
    if run.cfg.fsdp:
        shard(run)
    # The prepared model holds the ticket now; dropping the other copies keeps the sparse phase at
    # O(k) memory beyond the model (the int64 ticket would be a third of it).
    del ticket
    ctx.given.clear()
    if run.state is not None:
        run.state["ticket"] = None
    release_freed_memory(run.world.device)  # what the calibration freed
    with heap_growth_limited(run.world.device):
        run.phase("train", delta_parameters(model), run.cfg.lr, steps)
    delta = extract_delta(model)
    if run.sharded:
        return delta
    unprepare(model)
    if ctx.source.finish is not None:
        delta = ctx.source.finish(ctx, delta, model)
    return delta
