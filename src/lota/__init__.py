"""lota: lottery-ticket sparse adaptation of Hugging Face causal language models.

The artifacts are the API: a ticket (the set of trainable entries) and a sparse delta (a ticket
plus values), both plain safetensors files. ``load`` reads either; ``prepare`` makes any model
train only a ticket's entries in any training loop.
"""

__version__ = "0.1.0"

from .delta import SparseDelta, apply_delta_  # noqa: E402
from .errors import FormatError, InputError, LotaError, MismatchError, TrainingError  # noqa: E402
from .format import load, save  # noqa: E402
from .selection import select, ticket_size  # noqa: E402
from .sparse_model import extract_delta, prepare, trainable_parameters, unprepare  # noqa: E402
from .ticket import Ticket  # noqa: E402

_LAZY = {
    "AdaptConfig": ("adapt", "AdaptConfig"),
    "adapt": ("adapt", "adapt"),
    "make_ticket": ("vectors", "make_ticket"),
    "make_delta": ("vectors", "make_delta"),
    "apply_deltas": ("vectors", "apply_deltas"),
    "merge_deltas": ("merge", "merge"),
    "MergeSettings": ("merge", "MergeSettings"),
    "merge_method": ("merge", "merge_method"),
    "evaluate": ("evaluate", "evaluate"),
    "resolve_targets": ("models", "resolve_targets"),
    "model_fingerprint": ("models", "model_fingerprint"),
    "CalibrationCallback": ("callbacks", "CalibrationCallback"),
    "DeltaBank": ("hotswap", "DeltaBank"),
}


def __getattr__(name):  # heavy modules (transformers, peft) load on first use
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'lota' has no attribute '{name}'")


__all__ = [
    "SparseDelta",
    "Ticket",
    "load",
    "save",
    "select",
    "ticket_size",
    "prepare",
    "extract_delta",
    "unprepare",
    "trainable_parameters",
    "apply_delta_",
    "LotaError",
    "InputError",
    "FormatError",
    "MismatchError",
    "TrainingError",
    *_LAZY,
]
