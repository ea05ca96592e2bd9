"""``--calibration fisher``: each calibration batch's squared gradient added into one score buffer
per target (a diagonal Fisher score, ``--fisher-dtype``), then the exact top-k of the scores.

Invariant: no weight changes; the targets end frozen.
"""

from __future__ import annotations

from .base import Calibration, one_of, register

DTYPES = ("float32", "bfloat16")  # of the score buffer (--fisher-dtype)


def _select(run, k, protected, selector):
    """The ticket of the largest summed squared gradients over the calibration batches."""
    from ..fileio import fault
    from ..phases import train_only
    from ..targets import named_weights
    from ..train import heap_growth_limited
    from . import scoring

    train_only(run.model, run.targets)
    weights = named_weights(run.model)
    params = {n: weights[n] for n in run.targets}
    # one gradient alive at a time, each handed back to the system when freed (as in the sparse
    # phase), so the process holds the weights, the score buffers and activations
    with heap_growth_limited(run.world.device):
        # no weight changes, so the checkpoints hold the score buffers alone
        steps = run.cfg.calibration_steps
        scores = scoring.squared_gradients(run, "calibration", params, steps, held={})
        ticket = scoring.select_top(run, scores.__getitem__, k, protected, selector)
    fault("extraction")
    del scores
    for p in params.values():
        p.requires_grad_(False)
    return ticket


register(
    Calibration(
        "fisher",
        "the squared gradients of the calibration batches summed per entry (diagonal "
        "Fisher); no weight changes",
        "the weights, their gradients and one score buffer (--fisher-dtype)",
        ("fisher_dtype",),
        _select,
        fsdp_refusal="--calibration fisher does not run under --fsdp; use --calibration adamw "
        "or drop --fsdp",
        recorded=("fisher_dtype",),
        errors=lambda cfg: one_of(cfg, "fisher_dtype", DTYPES),
    )
)
