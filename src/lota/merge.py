"""Merging sparse task vectors (``lota merge``), natively sparse and one tensor at a time.

Inputs are lota deltas, or fine-tuned model folders whose dense delta against ``--base`` is taken
on the fly. For each tensor, the inputs' entries are aligned on the union of their supports: a
``(n_inputs, union)`` matrix of values (zero where an input has no entry) and a matching
``present`` mask. A registered merge method turns that into one value per union entry; the result
is ``lambda`` times it. Memory is the inputs' sparse size of one tensor plus that matrix, never a
dense model per input.

Methods live in ``merge_methods`` (``@merge_method(name)``); this module aligns the inputs, runs
the method and checks what it returns. Every merged tensor is checked finite in float32 (weights,
lambda and DARE's rescaling can overflow it) and a merge whose every value is 0 is refused, before
anything is written.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import format as fmt
from .delta import SparseDelta, finite_sum, require_finite
from .errors import InputError, MismatchError
from .merge_methods import METHODS, USES, Overlap, TensorInputs
from .selection import parse_fraction
from .settings import MergeSettings, check_factors, fallbacks
from .ticket import Ticket


# ---------------------------------------------------------------------------- inputs
class _DeltaInput:
    """A lota delta file, read one tensor at a time."""

    def __init__(self, path: str):
        self.path = path
        self.reader = fmt.Reader(path)
        if self.reader.kind != "delta":
            raise InputError(
                "is a ticket, not a delta: it has no values to merge",
                path,
                "make a delta with 'lota delta BASE TUNED --ticket FILE'",
            )
        self.shapes = dict(self.reader.shapes)
        self.base_fingerprint = self.reader.base_fingerprint

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        idx, v = self.reader.read(name)
        v = v.to(torch.float32)
        require_finite(
            v,
            f"tensor '{name}' holds NaN or inf values",
            self.path,
            "merge deltas of runs that did not diverge",
        )
        return idx, v


class _ModelInput:
    """A fine-tuned model folder: its dense delta against the base, taken tensor by tensor."""

    def __init__(self, path: str, base, targets: str | None):
        from .weights import WeightReader

        self.path = path
        self.model = WeightReader(path, "model to merge")
        self.base = base
        self.shapes = self.model.targets(targets)
        self.base_fingerprint = ""  # checked against the base by the caller

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.model.get(name).to(torch.float32).sub_(self.base.get(name)).reshape(-1)
        return torch.arange(d.numel()), d


DEFAULTS = fallbacks(MergeSettings)  # {"density": "0.2", ...}: what a None fraction stands for


def _resolve(s: MergeSettings, n: int) -> tuple[dict, torch.Tensor]:
    if s.method not in METHODS:
        raise InputError(
            f"unknown merge method '{s.method}'",
            "--method",
            f"choose one of {', '.join(sorted(METHODS))}",
        )
    unused = sorted(s.given - USES[s.method])
    if unused:
        raise InputError(
            f"method '{s.method}' does not use --{unused[0]}",
            "--method",
            f"drop --{unused[0]}, or choose a method that uses it",
        )
    weights = s.weights if s.weights is not None else [1.0] * n
    if len(weights) != n:
        raise InputError(
            f"{len(weights)} weights for {n} inputs", "--weights", "give one weight per input"
        )
    check_factors(weights, "weight", "--weights", "give finite weights, e.g. --weights 1,-0.5")
    check_factors([s.lam], "lambda", "--lambda", "give a finite lambda, e.g. --lambda 0.5")
    settings = {}
    for key in ("density", "gamma"):
        value = getattr(s, key)
        settings[key] = parse_fraction(DEFAULTS[key] if value is None else value, key, f"--{key}")
    settings["drop"] = parse_fraction(
        DEFAULTS["drop"] if s.drop is None else s.drop, "drop", "--drop", upper_open=True
    )
    settings["epsilon"] = parse_fraction(
        DEFAULTS["epsilon"] if s.epsilon is None else s.epsilon, "epsilon", "--epsilon"
    )
    if s.method == "della" and not (
        0 <= settings["drop"] - settings["epsilon"] and settings["drop"] + settings["epsilon"] < 1
    ):
        raise InputError(
            f"drop {float(settings['drop'])} ± epsilon {float(settings['epsilon'])} leaves [0, 1)",
            "--epsilon",
            "lower --epsilon so that drop - epsilon >= 0 and drop + epsilon < 1",
        )
    _refuse_empty_by_options(s.method, settings)
    return settings, torch.tensor(weights, dtype=torch.float32)


_EMPTY = "the merged delta would be empty"


def _refuse_empty_by_options(method: str, settings: dict) -> None:
    """Settings that keep no entry of any input, whatever the inputs hold."""
    if method in ("ties", "breadcrumbs") and settings["density"] == 0:
        raise InputError(
            f"density 0 keeps no entry of any tensor, so {_EMPTY}",
            "--density",
            "give a density above 0, e.g. --density 0.2",
        )
    if method == "breadcrumbs" and settings["gamma"] == 1:
        raise InputError(
            f"gamma 1 drops every entry as an outlier, so {_EMPTY}",
            "--gamma",
            "give a gamma below 1, e.g. --gamma 0.01",
        )


# what to change when a merge's result is empty, or overflows float32, by method
_EMPTY_FIX = {
    "ties": "raise --density",
    "breadcrumbs": "lower --gamma (it first drops each input's largest entries, that fraction of "
    "the tensor: at or above a sparse input's density, all of them) or raise --density",
    "dare-linear": "lower --drop",
    "dare-ties": "lower --drop",
    "della": "lower --drop",
}


def _refuse_empty(method: str) -> InputError:
    return InputError(
        f"every merged value is 0, so {_EMPTY}",
        f"--method {method}",
        _EMPTY_FIX.get(method, "check --weights and that the inputs do not cancel out"),
    )


def _overflow_fix(method: str) -> str:
    scaling = [f"--{o}" for o in ("lambda", "weights", "drop") if o in USES[method]]
    return (f"lower {' or '.join(scaling)}, or " if scaling else "") + "merge smaller deltas"


def _open_inputs(paths: list[str], base: str | None, targets: str | None):
    """Open every input; returns ``(inputs, base_fingerprint)`` after checking they agree."""
    from .weights import WeightReader

    if len(paths) < 2:
        raise InputError("merge needs at least two inputs", "lota merge", "give two or more deltas")
    base_reader = WeightReader(base, "base model") if base else None
    inputs = []
    for p in paths:
        if Path(p).is_dir():
            if base_reader is None:
                raise InputError(
                    "is a model folder: its delta needs the base it was fine-tuned from",
                    p,
                    "pass --base BASE",
                )
            inputs.append(_ModelInput(p, base_reader, targets))
        else:
            inputs.append(_DeltaInput(p))
    deltas = [i for i in inputs if isinstance(i, _DeltaInput)]
    base_fp = base_reader.fingerprint() if base_reader else ""
    want = base_fp or (deltas[0].base_fingerprint if deltas else "")  # else: the first delta's
    for i in inputs:
        if isinstance(i, _DeltaInput) and i.base_fingerprint != want:
            other = "the base" if base_fp else f"'{deltas[0].path}'"
            raise MismatchError(
                f"the delta was made for base {i.base_fingerprint or '(none)'}, {other} is {want}",
                i.path,
                "merge deltas of the same base model",
            )
    shapes: dict[str, tuple[int, ...]] = {}
    for i in inputs:
        for name, shape in i.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise MismatchError(
                    f"tensor '{name}' has shape {list(shape)}, another input has {list(shapes[name])}",
                    i.path,
                    "merge deltas of the same architecture",
                )
    return inputs, dict(sorted(shapes.items())), want


def merge_tensors(
    paths: list[str],
    settings: MergeSettings,
    base: str | None = None,
    targets: str | None = None,
    show_progress: bool = True,
):
    """``(shapes, base_fingerprint, iterator)``: the iterator yields ``(name, union positions,
    merged values)`` one tensor at a time, so a caller can write or apply each and let it go."""
    inputs, shapes, base_fp = _open_inputs(paths, base, targets)
    opts, weights = _resolve(settings, len(inputs))
    fn = METHODS[settings.method]

    def tensors():
        changed = False
        for name in tqdm(
            shapes, desc="merge", unit="tensor", disable=not show_progress, leave=False
        ):
            union, merged = _merge_one(
                name, shapes[name], inputs, paths, fn, opts, weights, settings
            )
            changed = changed or bool(merged.count_nonzero())
            yield name, union, merged
        if not changed:  # raised before the caller writes what it was given
            raise _refuse_empty(settings.method)

    return shapes, base_fp, tensors()


def _union(indices: list[torch.Tensor], numel: int) -> torch.Tensor | None:
    """Sorted union of sorted index lists; None when it is every entry of the tensor."""
    if any(i.numel() == numel for i in indices):
        return None
    if len(indices) == 1:
        return indices[0]
    mask = np.zeros(numel, dtype=np.bool_)  # one byte per entry: cheaper than sorting the union
    for i in indices:
        mask[i.numpy()] = True
    return torch.from_numpy(np.flatnonzero(mask))


def _merge_one(name, shape, inputs, paths, fn, opts, weights, settings):
    numel = math.prod(shape)
    parts = [i.read(name) if name in i.shapes else None for i in inputs]
    union = _union([p[0] for p in parts if p is not None], numel)
    full = union is None
    if full:
        union = torch.arange(numel)
    vals = torch.zeros(len(inputs), union.numel(), dtype=torch.float32)
    present = torch.zeros(len(inputs), union.numel(), dtype=torch.bool)
    for j, p in enumerate(parts):
        if p is None or p[0].numel() == 0:
            continue
        if p[0].numel() == union.numel():  # the input holds every entry of the union
            vals[j], present[j] = p[1], True
            continue
        at = p[0] if full else torch.from_numpy(np.searchsorted(union.numpy(), p[0].numpy()))
        vals[j, at] = p[1]
        present[j, at] = True
    del parts
    inp = TensorInputs(name, numel, union, vals, present, weights, opts, settings.seed)
    try:
        merged = fn(inp)
    except Overlap as e:
        who = " and ".join(paths[w] for w in e.which[:2])
        raise InputError(
            f"{e.count} entries of tensor '{name}' are held by more than one input ({who})",
            "--method stack",
            "stack only disjoint tickets (LoTTO), or choose another method",
        ) from None
    if settings.lam != 1.0:
        merged = merged * settings.lam
    merged = merged.to(torch.float32).contiguous()
    require_finite(
        merged,
        f"merged tensor '{name}' overflows float32: it would hold inf or NaN",
        f"--method {settings.method}",
        _overflow_fix(settings.method),
    )
    return union, merged


def merge(
    paths: list[str],
    settings: MergeSettings,
    base: str | None = None,
    targets: str | None = None,
    show_progress: bool = True,
) -> SparseDelta:
    """Merge deltas (and model folders, with ``base``) into one sparse delta on the union support."""
    shapes, base_fp, tensors = merge_tensors(paths, settings, base, targets, show_progress)
    indices, values = {}, {}
    for name, union, merged in tensors:
        indices[name], values[name] = union, merged
    ticket = Ticket(shapes=shapes, indices=indices, base_fingerprint=base_fp)
    return SparseDelta(ticket=ticket, values=values)


def merge_into_model(
    paths: list[str],
    settings: MergeSettings,
    base: str,
    out: str,
    targets: str | None = None,
    show_progress: bool = True,
    force: bool = False,
) -> dict:
    """Write ``base + merged delta`` as a model folder, adding each merged tensor as it is made
    (the merged delta is never held whole). ``out`` is locked from its check to its swap, and may
    not be the base or hold an input."""
    from .output_checks import writing_folder

    with writing_folder(out, force, "--out-model", inputs=[*paths, base]):
        return _merge_into_model(paths, settings, base, out, targets, show_progress)


def _merge_into_model(
    paths: list[str],
    settings: MergeSettings,
    base: str,
    out: str,
    targets: str | None,
    show_progress: bool,
) -> dict:
    from .models import load_model, load_tokenizer, save_model
    from .targets import named_weights, untie_embeddings, untied_record

    shapes, base_fp, tensors = merge_tensors(paths, settings, base, targets, show_progress)
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    # as lota apply: a merge on a tied input embedding leaves the output head, given its own copy
    untied = untie_embeddings(model, shapes)
    weights = named_weights(model)
    entries = 0
    with torch.no_grad():
        for name, union, merged in tensors:
            if name not in weights or tuple(weights[name].shape) != shapes[name]:
                raise MismatchError(
                    f"tensor '{name}' of the merge does not fit the base",
                    base,
                    "merge deltas made for this base",
                )
            flat = weights[name].data.view(-1)
            fix = "write it onto a float32 or bfloat16 copy of the base, or lower --lambda"
            flat.index_copy_(0, union, finite_sum(flat[union], merged, flat.dtype, name, base, fix))
            entries += int(union.numel())
    save_model(
        model,
        tokenizer,
        out,
        extra={
            "base_fingerprint": base_fp,
            "merged": [str(p) for p in paths],
            **untied_record(untied),
        },
    )
    return {"out": out, "entries": entries, "base_fingerprint": base_fp, **untied_record(untied)}


# ---------------------------------------------------------------------------- overlap report
def overlap(paths: list[str]) -> dict:
    """Pairwise shared entries (and, for deltas, sign conflicts) of lota files, tensor by tensor,
    and the share of each file's entries the other holds (its recall)."""
    readers = [fmt.Reader(p) for p in paths]
    pairs = {}
    for a in range(len(paths)):
        for b in range(a + 1, len(paths)):
            shared = conflicts = 0
            for name in readers[a].names:
                if name not in readers[b].shapes:
                    continue
                ia, va = readers[a].read(name)
                ib, vb = readers[b].read(name)
                common, pa, pb = np.intersect1d(
                    ia.numpy(), ib.numpy(), assume_unique=True, return_indices=True
                )
                shared += int(common.size)
                if va is not None and vb is not None and common.size:
                    sa = torch.sign(va[torch.from_numpy(pa)].float())
                    sb = torch.sign(vb[torch.from_numpy(pb)].float())
                    conflicts += int((sa * sb < 0).sum())
            na = sum(readers[a].nnz(n) for n in readers[a].names)
            nb = sum(readers[b].nnz(n) for n in readers[b].names)
            both_deltas = readers[a].kind == readers[b].kind == "delta"
            pairs[f"{paths[a]} | {paths[b]}"] = {
                "a": paths[a],
                "b": paths[b],
                "nnz_a": na,
                "nnz_b": nb,
                "shared": shared,
                "shared_of_smaller": shared / max(1, min(na, nb)),
                "a_held_by_b": shared / na if na else None,
                "b_held_by_a": shared / nb if nb else None,
                "sign_conflicts": conflicts if both_deltas else None,
            }
    return {"files": paths, "pairs": list(pairs.values())}
