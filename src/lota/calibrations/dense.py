"""The calibrations that train the targets (``adamw``, ``sgd``, ``rmsprop``, ``adafactor``): dense
steps, the ticket from the change, and a reset of the targets to the starting weights.

The starting weights are read back from disk (``Run.w0``) for the change and the reset, so a
calibration holds no copy of them; ``rmsprop`` and ``adafactor`` also take each gradient inside the
backward pass (``lota.calibrations.inbackward``), so no more than one dense gradient is alive."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from .. import dist, selection
from ..fileio import fault
from ..phases import Run, masters, shard, train_only
from ..precision import restore_dtype_
from ..targets import named_weights
from ..ticket import Ticket
from ..train import heap_growth_limited
from .inbackward import NormalizedSteps, one_backward_per_step


def dense_calibration(
    run: Run,
    k: int,
    protected: Ticket | None,
    selector: str,
    optimizer: str | None = None,
    factored: bool | None = None,
) -> Ticket:
    """Train the targets densely for the calibration steps (with ``optimizer`` without momentum
    or weight decay, else the run's ``--optimizer``; with ``factored`` not None, RMSprop taking
    each gradient in the backward pass, its second moment factored or not), select the ticket of
    ``k`` entries from the change with ``selector``, and reset the targets to the starting
    weights."""
    cfg, targets, w0 = run.cfg, run.targets, run.w0
    train_only(run.model, targets)
    if cfg.fsdp:
        shard(run)
    weights = named_weights(run.model)
    params = {n: weights[n] for n in targets}
    stored = masters(run, params)
    lr = cfg.calibration_rate
    settings = cfg.settings(lr, cfg.calibration_steps)
    if optimizer is not None:
        settings = dataclasses.replace(
            settings, optimizer=optimizer, momentum=0.0, weight_decay=0.0
        )
    stepper = None
    if factored is not None:
        settings = dataclasses.replace(settings, optimizer="rmsprop", max_grad_norm=None)
        stepper = NormalizedSteps(
            list(params.values()),
            lr,
            max_norm=cfg.max_grad_norm,
            factored=factored,
            in_backward=one_backward_per_step(run),
        )
    # a gradient freed in the backward pass goes back to the system, as in the sparse phase
    limited = (
        heap_growth_limited(run.world.device) if stepper is not None else contextlib.nullcontext()
    )
    try:
        with limited:
            run.phase(
                "calibration",
                params,
                lr,
                cfg.calibration_steps,
                settings=settings,
                optimizer=stepper,
                masters=bool(stored),
                selects=True,
            )
    finally:
        if stepper is not None:
            stepper.close()
            stepper.state.clear()
    with torch.no_grad():
        if run.sharded:
            ticket = _select_sharded(run, selector, weights, k, protected)
        else:
            ticket = selection.select(
                selector,
                targets,
                k,
                delta_fn=lambda n: (
                    weights[n].detach().float() - w0[n].to(weights[n].device).float()
                ),
                exclude=protected,
                seed=cfg.seed,
            )
        fault("extraction")
        restore_dtype_(params, stored)
        for n, p in params.items():
            p.requires_grad_(False)
            if not run.sharded:
                p.copy_(w0[n])  # reset: the sparse phase starts from the original weights
    return ticket


def _select_sharded(run: Run, selector: str, weights, k: int, protected) -> Ticket:
    """The global top-k from each rank's rows of the calibrated weights (no tensor is gathered);
    then every rank receives the whole ticket (its indices only), which ``prepare`` needs."""
    local, first = {}, {}
    for n in run.targets:
        local[n], first[n] = dist.local_rows(weights[n])
    row = {n: math.prod(s[1:]) for n, s in run.targets.items()}
    rows = dist.Shard(
        run.world,
        numels={n: local[n].numel() for n in run.targets},
        offsets={n: first[n] * row[n] for n in run.targets},
    )

    def delta_fn(n):
        w0_rows = run.w0[n][first[n] : first[n] + local[n].shape[0]]
        return local[n].detach().float() - w0_rows.to(local[n].device).float()

    mine = selection.select(
        selector,
        run.targets,
        k,
        delta_fn=delta_fn,
        exclude=protected,
        seed=run.cfg.seed,
        shard=rows,
    )
    indices = {
        n: torch.cat(run.world.gather_varlen(mine.indices[n].to(run.world.device))).cpu()
        for n in sorted(run.targets)
    }
    return Ticket(shapes=dict(run.targets), indices=indices)
