"""The official LoTA code's masks: ``torch.save`` dicts ``{parameter name: bool tensor}`` in which
True marks a frozen (pruned) entry. ``lota import-mask`` turns one into a ticket, reading it with
``torch.load(weights_only=True)`` (plain tensors only: no code in the file can run) and checking
every mask (dense, holding all the entries its shape declares, and with ``--base`` of the model's
shape) before any of them is expanded; ``lota export-mask`` writes a ticket in that format for the
official training code.

Export is the one place lota writes a pickle-based file, because that is the format the official
code reads; it is written atomically like every other output.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import FormatError, InputError, MismatchError
from .fileio import atomic_path
from .input_files import check_input_file
from .ticket import Ticket


def import_official(path: str, base: str | None = None) -> Ticket:
    """The ticket (trainable = False in the mask) of an official mask file."""
    p = Path(path)
    if not p.exists():
        raise InputError("file not found", path, "check the path")
    if p.is_dir():
        raise InputError(
            "is a folder, not a mask file", path, "pass the .pt file saved by the official code"
        )
    check_input_file(p, "mask file")
    masks = _load_masks(p, path)
    for name, m in masks.items():
        _check_entry(name, m, path)
    fingerprint = ""
    if base is not None:  # every shape checked against the model before any mask is expanded
        fingerprint = _check_base_shapes(masks, base, path)
    shapes, indices = {}, {}
    for name, m in masks.items():
        if m.dtype != torch.bool:
            if bool(((m != 0) & (m != 1)).any()):
                raise FormatError(
                    f"mask of '{name}' holds values other than 0 and 1",
                    path,
                    "pass an official mask file (True or 1 = frozen)",
                )
            m = m != 0
        shapes[name] = tuple(m.shape)
        trainable = ~m.reshape(-1)
        indices[name] = torch.from_numpy(np.flatnonzero(trainable.numpy()))
    return Ticket(shapes=shapes, indices=indices, base_fingerprint=fingerprint)


def _load_masks(p: Path, path: str) -> dict:
    """The file's dict of masks, read with ``weights_only`` (plain tensors only)."""
    try:
        masks = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        at = text.find("WeightsUnpickler error:")
        rest = [x.strip() for x in text[at + 23 :].splitlines() if x.strip()] if at >= 0 else []
        detail = rest[0][:120] if rest else "unsupported content"
        raise FormatError(
            f"refused: weights_only loading found something other than plain tensors ({detail})",
            path,
            "import only mask files saved by the official LoTA code (a dict of tensors)",
        ) from None
    except Exception as e:
        raise FormatError(
            f"not a readable torch.save file ({type(e).__name__})",
            path,
            "pass the .pt mask file saved by the official LoTA code",
        ) from None
    if not isinstance(masks, dict) or not masks:
        raise FormatError(
            "expected a dict of parameter name -> mask tensor", path, "pass an official mask file"
        )
    return masks


def _check_base_shapes(masks: dict, base: str, path: str) -> str:
    """Every mask has the shape of the base's parameter of its name; returns the base's
    fingerprint."""
    from .weights import WeightReader

    reader = WeightReader(base, "base model")
    for name, m in masks.items():
        have = reader.shapes.get(name)
        if have != tuple(m.shape):
            raise MismatchError(
                f"mask '{name}' has shape {list(m.shape)}, the base "
                + ("has no such parameter" if have is None else f"has {list(have)}"),
                path,
                "import masks made for this base model",
            )
    return reader.fingerprint()


_MASK_DTYPES = {torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
_MASK_DTYPES |= {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def _check_entry(name, m, path: str) -> None:
    """A mask entry as the official code saves it: a name, and a dense tensor in memory that
    holds every one of its entries. A strided view declares a shape from a few stored values
    (a 1.4 KB file can describe 3.6e9 entries), so its size is checked before it is expanded."""
    if not isinstance(name, str) or not isinstance(m, torch.Tensor):
        raise FormatError(
            f"entry {repr(name)[:80]} is not a parameter name with a mask tensor",
            path,
            "pass an official mask file",
        )
    problem = None
    if m.layout != torch.strided:
        problem = f"is a {str(m.layout).removeprefix('torch.')} tensor, not a dense one"
    elif m.device.type != "cpu":
        problem = f"is on the {m.device.type} device, so it holds no values"
    elif m.dtype not in _MASK_DTYPES:
        problem = f"holds {str(m.dtype).removeprefix('torch.')}, not bool, integer or float values"
    elif m.numel() > m.untyped_storage().nbytes() // m.element_size():
        problem = (
            f"has shape {list(m.shape)} ({m.numel():,} entries) but stores only "
            f"{m.untyped_storage().nbytes() // m.element_size():,} values (a view, not a mask)"
        )
    if problem:
        raise FormatError(
            f"mask of '{name[:200]}' {problem}",
            path,
            "pass the official code's masks as dense tensors (torch.save of bool masks)",
        )


def export_official(ticket: Ticket, path: str | os.PathLike) -> int:
    """Write ``{name: bool mask, True = frozen}`` with ``torch.save``; returns the file size."""
    masks = {name: ~m for name, m in ticket.dense_masks().items()}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        # through a Python file, so that a failed write (a full disk) surfaces as its OSError
        torch.save(masks, f)
    return Path(path).stat().st_size
