"""``--calibration sgd``: dense training of the targets with plain SGD (no momentum, no weight
decay, so no optimizer state), then the top-k of ``|task vector|`` and a reset."""

from __future__ import annotations

from .base import Calibration, register


def _select(run, k, protected, selector):
    from .dense import dense_calibration

    return dense_calibration(run, k, protected, selector, optimizer="sgd")


register(
    Calibration(
        "sgd",
        "dense training of the targets with plain SGD (no momentum, no weight decay), then "
        "the top-k of |task vector| and a reset",
        "the weights and their gradients (no optimizer state)",
        ("max_grad_norm",),
        _select,
        # its tickets often leave a tensor without entries, which the sharded sparse phase
        # cannot train
        fsdp_refusal="--calibration sgd does not run under --fsdp; use --calibration adamw "
        "or drop --fsdp",
        dense_optimizer=lambda cfg: "sgd",
    )
)
