"""``--calibration adamw`` (the default): dense training of the targets with ``--optimizer``, then
the top-k of ``|task vector|`` and a reset to the starting weights."""

from __future__ import annotations

from .base import Calibration, register


def _select(run, k, protected, selector):
    from .dense import dense_calibration

    return dense_calibration(run, k, protected, selector)


register(
    Calibration(
        "adamw",
        "dense training of the targets with --optimizer (AdamW by default), then the top-k "
        "of |task vector| and a reset",
        "the weights, their gradients and the optimizer's state (two buffers for AdamW)",
        ("optimizer", "weight_decay", "momentum", "max_grad_norm"),
        _select,
        dense_optimizer=lambda cfg: cfg.optimizer,
    )
)
