"""Every ``--calibration`` of ``lota adapt``: how a calibrating ticket source (``--method lota``,
``bottomk``) scores the target entries before it selects its ticket.

Each calibration is one module here that registers itself (``base.register``) with its name,
help, memory needs, the settings it reads, its refusals and the function that selects the ticket;
``MODULES`` lists them in ``--calibration`` order. Importing this package loads neither torch nor
transformers (the command line lists the names): each module imports what it needs when it runs.
"""

from __future__ import annotations

import importlib

from .base import CALIBRATIONS, DEFAULT, Calibration, names, register

MODULES = (
    "adamw",
    "sgd",
    "rmsprop",
    "adafactor",
    "fisher",
    "lora",
)  # each registers itself when imported
for _module in MODULES:
    importlib.import_module(f".{_module}", __name__)

__all__ = ["CALIBRATIONS", "DEFAULT", "MODULES", "Calibration", "names", "register"]
