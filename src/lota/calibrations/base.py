"""The calibration registry: what a ``--calibration`` declares, and the table of them.

Invariant: importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..ticket import Ticket


@dataclass(frozen=True)
class Calibration:
    """How a calibrating source (``lota``, ``bottomk``) scores the target entries before
    selecting its ticket (``--calibration``).

    ``memory``: what it holds besides activations, in words. ``settings``: the ``AdaptConfig``
    fields it reads besides the calibration steps and rate. ``select(run, k, protected,
    selector)``: runs the calibration on the run (``lota.phases.Run``), returns the exact top-k
    ticket of its scores (disjoint from ``protected``) and leaves the targets at their starting
    weights, frozen. ``check(targets)``: refuses targets it cannot calibrate, before anything is
    written. ``fsdp_refusal``: why it cannot run under ``--fsdp``, if it cannot. ``recorded``:
    the settings the run's summary records beside the calibration's name. ``dense_optimizer``:
    for a calibration that trains whole weights, the optimizer it trains them with (``cfg`` ->
    name), which the precision checks read. ``errors``: the problems of the values of its own
    settings in ``cfg`` (checked whichever calibration is chosen).
    """

    name: str
    help: str
    memory: str
    settings: tuple[str, ...]
    select: Callable[[Any, int, Any, str], Ticket]
    check: Callable[[dict], None] | None = None
    fsdp_refusal: str | None = None
    recorded: tuple[str, ...] = ()
    dense_optimizer: Callable[[Any], str] | None = None
    errors: Callable[[Any], list[str]] | None = None


CALIBRATIONS: dict[str, Calibration] = {}
DEFAULT = "adamw"


def register(calibration: Calibration) -> Calibration:
    """Add ``calibration`` to the table, after the others."""
    if calibration.name in CALIBRATIONS:
        raise ValueError(f"calibration '{calibration.name}' is registered twice")
    CALIBRATIONS[calibration.name] = calibration
    return calibration


def names() -> tuple[str, ...]:
    return tuple(CALIBRATIONS)


def one_of(cfg, name: str, allowed: tuple[str, ...]) -> list[str]:
    """The error of setting ``name`` of ``cfg`` if its value is not one of ``allowed``."""
    value = getattr(cfg, name)
    if value in allowed:
        return []
    return [f"--{name.replace('_', '-')} '{value}' is not one of {', '.join(allowed)}"]
