"""``--calibration adafactor``: ``rmsprop``'s steps with Adafactor's factored second moment (one
running mean square per row and one per column of each weight), taken inside the backward pass, so
the calibration holds almost nothing besides the weights; then the top-k of ``|task vector|`` and a
reset."""

from __future__ import annotations

from .base import Calibration, register


def _select(run, k, protected, selector):
    from .dense import dense_calibration

    return dense_calibration(run, k, protected, selector, factored=True)


register(
    Calibration(
        "adafactor",
        "dense RMSprop steps of the targets with a factored second moment (one value per row and "
        "per column), each gradient used and freed inside the backward pass, then the top-k of "
        "|task vector| and a reset",
        "the weights, one running mean square per row and per column and one dense gradient "
        "at a time",
        ("max_grad_norm",),
        _select,
        fsdp_refusal="--calibration adafactor does not run under --fsdp; use --calibration "
        "adamw or drop --fsdp",
        dense_optimizer=lambda cfg: "rmsprop",
    )
)
