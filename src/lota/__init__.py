"""lota: lottery-ticket sparse adaptation of Hugging Face causal language models.

The artifacts are the API: a ticket (the set of trainable entries) and a sparse delta (a ticket
plus values), both plain safetensors files. ``load`` reads either; ``prepare`` makes any model
train only a ticket's entries in any training loop.
"""

from ._version import __version__ as __version__

# Every public name loads on first use, so ``import lota`` (and the CLI's ``--help``) imports
# neither torch nor transformers: {name: (module, attribute)}.
_LAZY = {
    "SparseDelta": ("delta", "SparseDelta"),
    "Ticket": ("ticket", "Ticket"),
    "load": ("format", "load"),
    "save": ("format", "save"),
    "select": ("selection", "select"),
    "ticket_size": ("selection", "ticket_size"),
    "prepare": ("sparse_model", "prepare"),
    "extract_delta": ("sparse_model", "extract_delta"),
    "unprepare": ("sparse_model", "unprepare"),
    "trainable_parameters": ("sparse_model", "trainable_parameters"),
    "apply_delta_": ("delta", "apply_delta_"),
    "LotaError": ("errors", "LotaError"),
    "InputError": ("errors", "InputError"),
    "FormatError": ("errors", "FormatError"),
    "MismatchError": ("errors", "MismatchError"),
    "TrainingError": ("errors", "TrainingError"),
    "AdaptConfig": ("adapt_config", "AdaptConfig"),
    "adapt": ("adapt", "adapt"),
    "make_ticket": ("task_vectors", "make_ticket"),
    "make_delta": ("task_vectors", "make_delta"),
    "apply_deltas": ("task_vectors", "apply_deltas"),
    "merge_deltas": ("merge", "merge"),
    "MergeSettings": ("merge", "MergeSettings"),
    "merge_method": ("merge_methods", "merge_method"),
    "evaluate": ("evaluate", "evaluate"),
    "resolve_targets": ("targets", "resolve_targets"),
    "untie_embeddings": ("targets", "untie_embeddings"),
    "model_fingerprint": ("weights", "model_fingerprint"),
    "CalibrationCallback": ("callbacks", "CalibrationCallback"),
    "DeltaBank": ("hotswap", "DeltaBank"),
}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in _submodules():  # ``lota.format`` and the like, after a bare ``import lota``
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lota' has no attribute '{name}'")


def __dir__():
    return sorted({*globals(), *__all__})


def _submodules() -> set[str]:
    import pkgutil

    return {m.name for m in pkgutil.iter_modules(__path__)}


__all__ = list(_LAZY)
