"""PEFT LoRA adapters as lota deltas (``lota import-lora``).

A LoRA adapter holds, per adapted linear layer, ``A`` (r x in) and ``B`` (out x r); its change to
the weight is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA, per-layer ``rank_pattern`` / ``alpha_pattern`` honoured). The import writes that dense
change as a lota delta for the base, so it can be inspected, merged, applied, or sparsified on the
spot (``--sparsity``: the exact global top-k of its magnitude, as ``lota mask`` would select).
Only safetensors adapter files are read.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from .delta import SparseDelta
from .errors import InputError, MismatchError
from .fileio import check_folder_files
from .ticket import Ticket


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.search(rf"(^|\.){key}$", module) or re.fullmatch(key, module):
            return value
    return default


def lora_deltas(adapter: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``{weight name: dense float32 change}`` of a PEFT LoRA adapter folder."""
    from safetensors import safe_open

    folder = Path(adapter)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir() or not cfg_path.exists():
        raise InputError(
            "not a PEFT adapter folder (no adapter_config.json)",
            adapter,
            "pass the folder written by PEFT's save_pretrained",
        )
    if not weights_path.exists():
        raise InputError(
            "the adapter has no adapter_model.safetensors",
            adapter,
            "save the adapter with safe_serialization=True (lota reads no pickles)",
        )
    check_folder_files(folder, "adapter")  # a FIFO would block the open below
    try:
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise InputError(
                f"peft_type {cfg.get('peft_type')} is not LORA", adapter, "pass a LoRA adapter"
            )
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"unreadable adapter_config.json ({type(e).__name__}: {e})",
            adapter,
            "pass the folder written by PEFT's save_pretrained",
        ) from None
    out = {}
    with safe_open(str(weights_path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if ".lora_A." not in key:
                continue
            prefix, _, _ = key.partition(".lora_A.")
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in keys:
                raise InputError(
                    f"'{key}' has no matching lora_B", adapter, "the adapter is incomplete"
                )
            module = prefix.removeprefix("base_model.model.")
            name = module + ".weight"
            if name not in shapes:
                raise MismatchError(
                    f"the adapter changes '{name}', which the base does not have",
                    adapter,
                    "import the adapter against the base it was trained on",
                )
            a = f.get_tensor(key).to(torch.float32)
            b = f.get_tensor(b_key).to(torch.float32)
            rank = int(_pattern_value(cfg.get("rank_pattern"), module, r))
            lalpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha))
            scale = lalpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
            change = (b @ a) * scale
            if cfg.get("fan_in_fan_out"):
                change = change.T
            if tuple(change.shape) != tuple(shapes[name]):
                raise MismatchError(
                    f"the adapter's change to '{name}' has shape {list(change.shape)}, the base has "
                    f"{list(shapes[name])}",
                    adapter,
                    "import the adapter against the base it was trained on",
                )
            out[name] = change
    if not out:
        raise InputError(
            "the adapter holds no lora_A / lora_B pairs", adapter, "pass a LoRA adapter"
        )
    return out


def import_lora(adapter: str, base: str, sparsity: str | None = None) -> SparseDelta:
    """The adapter's change as a delta for ``base`` (dense, or its top-k at ``sparsity``)."""
    from . import selection
    from .models import WeightReader

    reader = WeightReader(base, "base model")
    changes = lora_deltas(adapter, reader.shapes)
    shapes = {n: tuple(c.shape) for n, c in sorted(changes.items())}
    if sparsity is None:
        indices = {n: torch.arange(math.prod(s)) for n, s in shapes.items()}
    else:
        k = selection.ticket_size(sparsity, sum(math.prod(s) for s in shapes.values()))
        ticket = selection.select("magnitude", shapes, k, delta_fn=lambda n: changes[n])
        indices = ticket.indices
    values = {n: changes[n].reshape(-1)[indices[n]].contiguous() for n in shapes}
    ticket = Ticket(shapes=shapes, indices=indices, base_fingerprint=reader.fingerprint())
    return SparseDelta(ticket, values)
