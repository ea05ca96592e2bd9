"""A lota delta as a PEFT adapter (``lota export-peft``), in PEFT's SHiRA format.

SHiRA (sparse high-rank adapters, ``peft.ShiraConfig``) keeps, per adapted linear layer, a 1-D
``shira_weight`` and the explicit ``[2, N]`` (row, column) ``shira_indices`` of its entries, both
in ``adapter_model.safetensors``; loading takes the indices from the file (the random mask PEFT
builds while creating the layers is replaced), and forward and merge add the entries to the base
weight (``scaling`` 1.0). So any ticket on the weights of linear layers fits, with one constraint:
every adapted layer holds exactly ``r * (in + out)`` entries, with one ``r`` for the whole adapter
(``ShiraConfig`` has no per-layer rank), and at most ``in * out``. Each layer is filled up with
zero-valued entries at positions outside its ticket (``w + 0.0 == w``). Where one dense layer
would set ``r`` for all, it is cheaper to store that layer whole, as PEFT's ``modules_to_save``
(its weight with the delta added, in the base's dtype, which the merge puts in place of the
layer): the export chooses ``r`` and the layers stored whole that make the smallest file
(``shira_plan``).

The values are chosen so that PEFT's arithmetic (``w + value`` in float32, rounded to the base's
dtype) writes what ``lota apply`` writes: the delta's values themselves when they are float32
(bit-exact), otherwise ``applied - w`` per entry (bit-exact on half-precision bases, within two
float32 roundings on a float32 base; the result says which). Embeddings, norms, biases, tied
weights, ``Conv1D`` layers and fused mixture-of-experts tensors (3-D ``mlp.experts.*``
parameters) cannot be held by SHiRA; a delta touching them is refused
(``lota apply`` writes a full model folder instead). See docs/peft.md. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from . import format as fmt
from ._version import __version__
from .delta import SparseDelta, arithmetic_dtype, finite_sum
from .errors import InputError, MismatchError
from .fileio import atomic_dir, atomic_path, save_safetensors, write_json
from .output_checks import writing_folder
from .targets import tied_names

KIND = "peft-export"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
_APPLY = "write a full model folder instead with 'lota apply BASE DELTA --out DIR'"


def file_digest(path: str | Path) -> str:
    """``blake2b:<hex>`` of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "blake2b:" + h.hexdigest()


def adapter_layers(delta: SparseDelta, skeleton: torch.nn.Module, where: str) -> dict[str, str]:
    """``{weight name: module name}`` of the tensors the delta touches; refuses any that is not the
    weight of an ``nn.Linear`` (the only layer SHiRA adapts)."""
    shared = tied_names(skeleton)
    modules = dict(skeleton.named_modules())
    out = {}
    for name, idx in delta.ticket.indices.items():
        if idx.numel() == 0:
            continue
        module_name = name.removesuffix(".weight")
        module = modules.get(module_name) if name.endswith(".weight") else None
        if module is None and len(delta.ticket.shapes[name]) == 3:
            raise InputError(
                f"the delta changes '{name}', a fused mixture-of-experts tensor "
                f"{list(delta.ticket.shapes[name])}; PEFT's SHiRA adapts only linear layers (PEFT "
                "reaches fused expert parameters only through LoRA's target_parameters, which "
                "cannot hold sparse entries exactly)",
                where,
                _APPLY,
            )
        if not isinstance(module, torch.nn.Linear):
            kind = type(module).__name__ if module is not None else "not a layer's weight"
            raise InputError(
                f"the delta changes '{name}' ({kind}); a PEFT adapter can only hold the weights "
                "of linear layers",
                where,
                _APPLY,
            )
        others = [n for n in shared.get(id(module.weight), []) if n != name]
        if others:
            raise InputError(
                f"the delta changes '{name}', which is tied to '{others[0]}'; an adapter on the "
                "linear layer alone would leave the tied tensor unchanged",
                where,
                _APPLY,
            )
        out[name] = module_name
    if not out:
        raise InputError("the delta has no entries", where, "export a delta that changes something")
    return out


# What SHiRA stores per entry: two int32 positions and a float32 value.
SHIRA_ENTRY_BYTES = 12


def shira_plan(
    delta: SparseDelta, names: list[str], itemsize: int, where: str
) -> tuple[int, list[str]]:
    """The adapter's ``r`` and the layers it stores whole, for the smallest file.

    SHiRA gives every adapted layer ``r * (in + out)`` entries of ``SHIRA_ENTRY_BYTES``, at most
    ``in * out``; a layer stored whole costs ``in * out`` weights of ``itemsize`` bytes. For each
    ``r`` some layer needs (``ceil(nnz / (in + out))``), every layer that fits it and is smaller
    in SHiRA stays sparse and the rest are stored whole (where none is smaller, the one that
    costs least beyond its whole layer stays: an adapter needs one SHiRA layer); the smallest
    total wins, and of equal ones the plan with fewer whole layers. A delta none of whose layers
    fits any ``r`` is refused: it is a model's change, for ``lota apply``."""
    shapes = delta.ticket.shapes
    need = {n: max(1, math.ceil(delta.ticket.indices[n].numel() / sum(shapes[n]))) for n in names}
    best = None
    for r in sorted(set(need.values())):
        fits = [n for n in names if need[n] <= r and r * sum(shapes[n]) <= math.prod(shapes[n])]
        sparse = [n for n in fits if _excess(shapes[n], r, itemsize) < 0]
        if not sparse and fits:  # none is smaller in SHiRA, but an adapter needs one
            sparse = [min(fits, key=lambda n: _excess(shapes[n], need[n], itemsize))]
        if not sparse:
            continue
        used = max(need[n] for n in sparse)
        whole = [n for n in names if n not in sparse]
        size = SHIRA_ENTRY_BYTES * used * sum(sum(shapes[n]) for n in sparse)
        size += itemsize * sum(math.prod(shapes[n]) for n in whole)
        if best is None or (size, len(whole)) < best[:2]:
            best = (size, len(whole), used, whole)
    if best is None:
        name = max(names, key=lambda n: need[n] / sum(shapes[n]))
        out_f, in_f = shapes[name]
        raise InputError(
            "too dense for SHiRA, which gives every adapted layer r * (in + out) entries, at "
            f"most in * out: no layer the delta changes fits (e.g. '{name}' [{out_f}, {in_f}] "
            f"would need r = {need[name]}, {need[name] * (in_f + out_f):,} entries, more than "
            f"its {in_f * out_f:,}), and an adapter needs one",
            where,
            _APPLY,
        )
    return best[2], best[3]


def _excess(shape: tuple[int, ...], r: int, itemsize: int) -> int:
    """What a layer's ``r * (in + out)`` SHiRA entries cost beyond the whole layer, in bytes."""
    return SHIRA_ENTRY_BYTES * r * sum(shape) - itemsize * math.prod(shape)


def layer_entries(
    idx: torch.Tensor, values: torch.Tensor, n: int, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat indices, values)`` of ``n`` entries: the ticket's, then zero-valued ones at the first
    positions outside it, sorted by position."""
    extra = n - idx.numel()
    if extra > 0:
        candidates = torch.arange(min(numel, n), dtype=torch.long)
        free = candidates[~torch.isin(candidates, idx)][:extra]
        idx = torch.cat([idx, free])
        values = torch.cat([values, torch.zeros(extra, dtype=values.dtype)])
    order = torch.argsort(idx)
    return idx[order], values[order]


def adapter_values(
    w: torch.Tensor, v: torch.Tensor, name: str, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float32 adapter values, entries as lota apply writes them)`` for base entries ``w`` of
    tensor ``name``; refused, as ``lota apply`` refuses it, where that sum overflows ``w``'s dtype.

    PEFT adds the adapter's float32 values to the base entries and rounds to the base's dtype;
    ``lota apply`` computes ``w + v`` in the values' precision, float32 for float8 values
    (``delta.finite_sum``). Where that is float32 these are the same operation, and the adapter
    holds ``v`` widened exactly. Otherwise the adapter holds ``applied - w``: exact on
    half-precision bases, and within two float32 roundings on a float32 base, where ``applied - w``
    may need more bits than float32 has (``lota apply`` rounds the base entry to the values'
    precision first).
    """
    applied = finite_sum(w, v, w.dtype, name, where)
    if arithmetic_dtype(v.dtype) == torch.float32:
        return v.float(), applied
    return (applied.double() - w.double()).float(), applied


def peft_applied(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What PEFT's SHiRA merge writes: ``w + a`` in float32 (or wider), rounded to ``w``'s dtype."""
    wide = torch.promote_types(w.dtype, a.dtype)
    return (w.to(wide) + a.to(wide)).to(w.dtype)


def _shira_config(r: int, modules: list[str], whole: list[str], base: str) -> dict:
    try:
        from peft import ShiraConfig
    except ImportError:
        raise InputError(
            "the installed PEFT has no SHiRA adapters",
            "peft",
            "upgrade peft to a release with SHiRA (ShiraConfig), or " + _APPLY,
        ) from None
    cfg = ShiraConfig(
        r=r,
        target_modules=modules,
        mask_type="random",  # the mask PEFT draws at load time is replaced by the saved indices
        random_seed=0,
        modules_to_save=whole or None,  # layers stored whole: their weights, delta added
        inference_mode=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
    )
    out = cfg.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def export_peft(
    delta_path: str, base: str, out: str, force: bool = False, allow_mismatch: bool = False
) -> dict:
    """Write ``delta_path`` (made for ``base``) as a PEFT SHiRA adapter folder at ``out`` (locked
    from its check to its swap; it may not be the base or hold an input)."""
    with writing_folder(out, force, inputs=[delta_path, base]):
        return _export_peft(delta_path, base, out, allow_mismatch)


def _export_peft(delta_path: str, base: str, out: str, allow_mismatch: bool) -> dict:
    from .weights import WeightReader

    where = str(delta_path)
    delta = _load_delta(delta_path)
    reader = WeightReader(base, "base model")
    _check_shapes(delta, reader, where)
    layers = adapter_layers(delta, reader.skeleton, where)
    names = sorted(layers)
    itemsize = reader.get(names[0]).element_size()  # what a layer stored whole costs per entry
    r, whole = shira_plan(delta, names, itemsize, where)
    sparse = [layers[n] for n in names if n not in whole]
    config = _shira_config(r, sparse, [layers[n] for n in whole], base)

    base_fp = reader.fingerprint()
    if delta.base_fingerprint != base_fp and not allow_mismatch:
        raise MismatchError(
            f"the delta was made for base {delta.base_fingerprint or '(none)'}, "
            f"this base is {base_fp}",
            where,
            "export it against the model it was trained from, or pass --allow-mismatch",
        )

    entries = sum(int(delta.ticket.indices[n].numel()) for n in names)
    delta_shapes = dict(delta.ticket.shapes)
    tensors, stored, inexact, max_error = _adapter_tensors(
        delta, reader, layers, r, set(whole), where
    )
    metadata = {
        "format": fmt.FORMAT_NAME,
        "kind": KIND,
        "format_version": str(FORMAT_VERSION),
        "base_fingerprint": base_fp,
        "delta_base_fingerprint": delta.base_fingerprint,
        "source_delta": Path(delta_path).name,
        "source_delta_digest": file_digest(delta_path),
        "peft_type": "SHIRA",
        "created_by": f"lota {__version__}",
    }
    with atomic_dir(out) as tmp:
        write_json(tmp / "adapter_config.json", config)
        with atomic_path(tmp / "adapter_model.safetensors") as weights:
            save_safetensors(tensors, weights, metadata)
    return {
        "out": str(out),
        "layers": len(names),
        "entries": entries,
        "stored": stored,
        "r": r,
        "whole_layers": len(whole),
        "whole_entries": sum(math.prod(delta_shapes[n]) for n in whole),
        "base_fingerprint": base_fp,
        "exact": inexact == 0,
        "inexact_entries": inexact,
        "max_error": max_error,
    }


def _load_delta(delta_path: str) -> SparseDelta:
    """The delta to export: a delta (not a ticket) whose values are all finite."""
    where = str(delta_path)
    delta = fmt.load(delta_path)
    if not isinstance(delta, SparseDelta):
        raise InputError(
            "is a ticket, not a delta: it has no values to export",
            where,
            "make a delta with 'lota delta BASE TUNED --ticket FILE'",
        )
    delta.check_finite(where)
    return delta


def _check_shapes(delta: SparseDelta, reader, where: str) -> None:
    """Every tensor of the delta is one of the base's, of the same shape."""
    for name, shape in delta.ticket.shapes.items():
        if name not in reader.shapes:
            raise MismatchError(
                f"the delta has tensor '{name}' that the base does not have",
                where,
                "export the delta against the architecture it was made for",
            )
        if tuple(reader.shapes[name]) != tuple(shape):
            raise MismatchError(
                f"the delta's tensor '{name}' has shape {list(shape)}, the base has "
                f"{list(reader.shapes[name])}",
                where,
                "export the delta against the architecture it was made for",
            )


def _adapter_tensors(
    delta: SparseDelta, reader, layers: dict[str, str], r: int, whole: set[str], where: str
) -> tuple[dict[str, torch.Tensor], int, int, float]:
    """The SHiRA indices and weights of every sparse layer and the weights of every layer stored
    whole (in name order), how many SHiRA entries they store, and how many entries PEFT's merge
    would not reproduce exactly, with the largest error. Each layer is taken out of ``delta`` as
    it is converted."""
    tensors: dict[str, torch.Tensor] = {}
    stored, inexact, max_error = 0, 0, 0.0
    for name in sorted(layers):
        out_f, in_f = delta.ticket.shapes[name]
        # taken out of the delta as converted, so that it and the adapter are not both held whole
        idx, v = delta.ticket.indices.pop(name), delta.values.pop(name)
        key = PEFT_PREFIX + layers[name]
        weight = reader.get(name)
        if name in whole:  # the layer as lota apply writes it, which PEFT's merge puts in place
            flat = weight.reshape(-1).clone()
            flat[idx] = finite_sum(flat[idx], v, flat.dtype, name, where)
            tensors[key + ".weight"] = flat.view(weight.shape)
            if f"{layers[name]}.bias" in reader.shapes:
                tensors[key + ".bias"] = reader.get(f"{layers[name]}.bias").contiguous()
            continue
        w = weight.reshape(-1)[idx]
        a, applied = adapter_values(w, v, name, where)
        got = peft_applied(w, a)
        if not torch.equal(got, applied):
            inexact += int((got != applied).sum())
            max_error = max(max_error, float((got.double() - applied.double()).abs().max()))
        flat, vals = layer_entries(idx, a, r * (in_f + out_f), out_f * in_f)
        tensors[key + ".shira_indices"] = torch.stack([flat // in_f, flat % in_f]).to(torch.int32)
        tensors[key + ".shira_weight"] = vals.to(torch.float32).contiguous()
        stored += flat.numel()
    return tensors, stored, inexact, max_error
