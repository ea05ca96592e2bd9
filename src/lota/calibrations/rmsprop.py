"""``--calibration rmsprop``: the official LoTA calibration's update (RMSprop, no momentum, no weight
decay, each tensor's gradient clipped on its own to ``--max-grad-norm``), taken inside the backward
pass, then the top-k of ``|task vector|`` and a reset."""

from __future__ import annotations

from .base import Calibration, register


def _select(run, k, protected, selector):
    from .dense import dense_calibration

    return dense_calibration(run, k, protected, selector, factored=False)


register(
    Calibration(
        "rmsprop",
        "dense RMSprop steps of the targets (the official calibration: no momentum, gradients "
        "clipped per tensor), each gradient used and freed inside the backward pass, then the "
        "top-k of |task vector| and a reset",
        "the weights, one running mean square per entry and one dense gradient at a time",
        ("max_grad_norm",),
        _select,
        fsdp_refusal="--calibration rmsprop does not run under --fsdp; use --calibration adamw "
        "or drop --fsdp",
        dense_optimizer=lambda cfg: "rmsprop",
    )
)
