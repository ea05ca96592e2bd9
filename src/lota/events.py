"""What a running lota does, as events a caller can observe without changing lota.

``subscribe(fn)`` calls ``fn(event)`` for every event lota emits in this process until the
returned ``Subscription`` is closed (``sub.close()``, or ``with subscribe(fn): ...``). An
``Event`` has a ``kind``, the ``phase`` and ``step`` it belongs to where it has them, and
``data``:

- ``model_loaded``: ``lota adapt`` has loaded the run's model (``data["model"]``);
- ``phase_start``: a training phase (``calibration``, ``train``) is about to run its steps,
  ``step`` the one it starts after (0, or a resumed checkpoint's); lota restarts the process's
  peak-memory mark right after this event, so it ends the previous phase's memory segment;
- ``step_end``: an optimizer step is done and its checkpoint (if any) written; ``data["metrics"]``
  is the line logged to ``metrics.jsonl``;
- ``phase_end``: the phase's last step is done;
- ``checkpoint_start`` / ``checkpoint_saved``: a checkpoint write begins and, on the process that
  writes it, has ended (``data["what"]``: ``state`` or ``ticket``; ``data["path"]``: its file);
- ``weight_hashed``: one weight was hashed for a fingerprint (``data["numel"]``); it can be
  emitted from lota's hashing threads.

With no subscriber an event costs one check of an empty tuple. A subscriber that raises an
``Exception`` never stops or changes a run: the exception is reported as a ``RuntimeWarning`` and
that subscriber is unsubscribed. ``KeyboardInterrupt`` and ``SystemExit`` propagate as they
would from anywhere in the run (a stopped ``lota adapt`` resumes from its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

KINDS = (
    "model_loaded",
    "phase_start",
    "step_end",
    "phase_end",
    "checkpoint_start",
    "checkpoint_saved",
    "weight_hashed",
)


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str
    phase: str | None = None
    step: int | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Subscriber = Callable[[Event], None]

_subscribers: tuple[Subscriber, ...] = ()  # replaced whole, so emitting needs no lock
_lock = threading.Lock()


class Subscription:
    """The handle ``subscribe`` returns: ``close()`` (or leaving a ``with`` block) unsubscribes."""

    def __init__(self, fn: Subscriber):
        self.fn = fn

    def close(self) -> None:
        _remove(self.fn)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def subscribe(fn: Subscriber) -> Subscription:
    """Call ``fn(event)`` for every event from now on, in the order the events happen."""
    global _subscribers
    if not callable(fn):
        raise TypeError(f"a subscriber must be callable, got {fn!r}")
    with _lock:
        _subscribers = (*_subscribers, fn)
    return Subscription(fn)


def _remove(fn: Subscriber) -> None:
    global _subscribers
    with _lock:
        subs = list(_subscribers)
        if fn in subs:
            subs.remove(fn)
        _subscribers = tuple(subs)


def emit(kind: str, phase: str | None = None, step: int | None = None, **data: Any) -> None:
    """Tell every subscriber that ``kind`` happened (lota's own modules call this)."""
    subs = _subscribers
    if not subs:
        return
    event = Event(kind, phase, step, MappingProxyType(data))
    for fn in subs:
        try:
            fn(event)
        except Exception as e:  # an observer never decides the run's outcome
            _remove(fn)
            warnings.warn(
                f"lota.events: subscriber {fn!r} raised {e!r} on {kind}; it is unsubscribed",
                RuntimeWarning,
                stacklevel=2,
            )
