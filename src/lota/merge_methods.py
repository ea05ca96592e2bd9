"""The merge methods of ``lota merge``: what turns one tensor's aligned inputs into merged values.

A method is a function registered with ``@merge_method(name, uses=...)``: it receives a
``TensorInputs`` (the inputs' values on the union of their supports, a matching ``present``
mask, the weights and the settings it uses) and returns one value per union entry. Randomness
(DARE, DELLA) is drawn per input and tensor from a generator seeded by ``(seed, input number,
tensor name)``, over the input's own entries in position order, so a result depends only on the
seed and the inputs. The building blocks (top-k by magnitude, TIES' sign election, random keep)
are shared by the methods.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from .names import MERGE_METHODS


# ---------------------------------------------------------------------------- per-tensor inputs
@dataclass
class TensorInputs:
    """One tensor's inputs, aligned on the union of their supports."""

    name: str
    numel: int
    index: torch.Tensor  # (m,) int64, sorted union positions
    values: torch.Tensor  # (n, m) float32, zero where an input has no entry
    present: torch.Tensor  # (n, m) bool
    weights: torch.Tensor  # (n,) float32
    settings: dict = field(default_factory=dict)
    seed: int = 0

    def generator(self, i: int) -> torch.Generator:
        digest = hashlib.blake2b(f"{self.seed}|{i}|{self.name}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def keep_count(self, fraction: Fraction) -> int:
        """``floor(fraction * numel)``, exactly."""
        return math.floor(fraction * self.numel)


MergeFn = Callable[[TensorInputs], torch.Tensor]
METHODS: dict[str, MergeFn] = {}
# the settings each method reads (anything else given on the command line is refused)
USES: dict[str, set[str]] = {}


def merge_method(name: str, uses: tuple[str, ...] = ()):
    """Register ``fn(TensorInputs) -> merged values`` under ``name``, one of
    ``names.MERGE_METHODS`` (the list ``--method`` offers)."""
    if name not in MERGE_METHODS:
        raise ValueError(f"merge method '{name}' is not listed in lota.names.MERGE_METHODS")

    def wrap(fn: MergeFn) -> MergeFn:
        METHODS[name] = fn
        USES[name] = set(uses)
        return fn

    return wrap


# ---------------------------------------------------------------------------- building blocks
def top_by_magnitude(values: torch.Tensor, present: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` present entries of largest |value| (ties: lower position first)."""
    keep = torch.zeros_like(present)
    if k <= 0:
        return keep
    cand = present.nonzero().view(-1)
    if k >= cand.numel():
        keep[cand] = True
        return keep
    mag = values[cand].abs()
    threshold = torch.kthvalue(mag, cand.numel() - k + 1).values  # the k-th largest magnitude
    above = mag > threshold
    ties = (mag == threshold).nonzero().view(-1)[: k - int(above.sum())]  # lowest positions
    keep[cand[above]] = True
    keep[cand[ties]] = True
    return keep


def sign_elected_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' merge: elect each entry's sign by the sum of the (unweighted) values, then average
    the weighted values that agree with it (zeros never agree)."""
    majority = torch.where(values.sum(0) >= 0, 1.0, -1.0)
    agree = values.sign() == majority
    total = (values * weights[:, None] * agree).sum(0)
    return total / agree.sum(0).clamp(min=1)


def random_keep(inp: TensorInputs, keep_prob: torch.Tensor | float) -> torch.Tensor:
    """Bernoulli mask over each input's present entries, drawn in position order."""
    mask = torch.zeros_like(inp.present)
    for i in range(inp.values.shape[0]):
        where = inp.present[i].nonzero().view(-1)
        p = keep_prob if isinstance(keep_prob, float) else keep_prob[i, where]
        draws = torch.rand(where.numel(), generator=inp.generator(i))
        mask[i, where[draws < p]] = True
    return mask


# ---------------------------------------------------------------------------- methods
@merge_method("add")
def _add(inp: TensorInputs) -> torch.Tensor:
    """Plain sum of the deltas (what LoTA recommends for dissimilar tasks)."""
    return inp.values.sum(0)


@merge_method("task-arithmetic", uses=("weights", "lambda"))
def _task_arithmetic(inp: TensorInputs) -> torch.Tensor:
    return (inp.values * inp.weights[:, None]).sum(0)


@merge_method("ties", uses=("weights", "lambda", "density"))
def _ties(inp: TensorInputs) -> torch.Tensor:
    """Trim each delta to its top ``density`` fraction of the tensor's entries by magnitude, elect
    signs, average the agreeing entries."""
    k = inp.keep_count(inp.settings["density"])
    trimmed = torch.stack([v * top_by_magnitude(v, p, k) for v, p in zip(inp.values, inp.present)])
    return sign_elected_mean(trimmed, inp.weights)


def _dare_values(inp: TensorInputs) -> torch.Tensor:
    keep = 1.0 - float(inp.settings["drop"])
    return inp.values * random_keep(inp, keep) / keep


@merge_method("dare-linear", uses=("weights", "lambda", "drop", "seed"))
def _dare_linear(inp: TensorInputs) -> torch.Tensor:
    """Drop each entry with probability ``drop``, rescale the rest by ``1 / (1 - drop)``, sum."""
    return (_dare_values(inp) * inp.weights[:, None]).sum(0)


@merge_method("dare-ties", uses=("weights", "lambda", "drop", "seed"))
def _dare_ties(inp: TensorInputs) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES' sign election and mean."""
    return sign_elected_mean(_dare_values(inp), inp.weights)


@merge_method("breadcrumbs", uses=("weights", "lambda", "density", "gamma"))
def _breadcrumbs(inp: TensorInputs) -> torch.Tensor:
    """Model Breadcrumbs: per delta and tensor, discard the largest ``gamma`` fraction of entries
    by magnitude (outliers) and keep the next ``density`` fraction; weighted sum."""
    top = inp.keep_count(inp.settings["gamma"])
    k = inp.keep_count(inp.settings["density"])
    kept = []
    for v, p in zip(inp.values, inp.present):
        outliers = top_by_magnitude(v, p, top)
        kept.append(v * top_by_magnitude(v, p & ~outliers, k))
    return (torch.stack(kept) * inp.weights[:, None]).sum(0)


@merge_method("della", uses=("weights", "lambda", "drop", "epsilon", "seed"))
def _della(inp: TensorInputs) -> torch.Tensor:
    """DELLA (MagPrune): drop probabilities spread linearly over ``drop ± epsilon`` by magnitude
    rank within each delta's entries (smallest magnitude, highest drop), rescale each kept entry by
    ``1 / (1 - p)``, then TIES' sign election and mean."""
    drop, eps = float(inp.settings["drop"]), float(inp.settings["epsilon"])
    keep_prob = torch.zeros_like(inp.values)
    for i, (v, p) in enumerate(zip(inp.values, inp.present)):
        where = p.nonzero().view(-1)
        n = where.numel()
        if n == 0:
            continue
        order = torch.sort(v[where].abs(), stable=True).indices  # ascending magnitude
        ranks = torch.empty(n, dtype=torch.float32)
        ranks[order] = torch.arange(n, dtype=torch.float32)
        spread = ranks / (n - 1) if n > 1 else torch.full((1,), 0.5)
        keep_prob[i, where] = 1.0 - ((drop + eps) - 2 * eps * spread)
    mask = random_keep(inp, keep_prob)
    scaled = torch.where(mask, inp.values / keep_prob.clamp(min=1e-12), 0.0)
    return sign_elected_mean(scaled, inp.weights)


@merge_method("stack", uses=("weights", "lambda"))
def _stack(inp: TensorInputs) -> torch.Tensor:
    """Disjoint tickets stacked: refuses any entry held by two inputs, else the weighted sum."""
    shared = inp.present.sum(0) > 1
    if bool(shared.any()):
        raise Overlap(inp.name, int(shared.sum()), inp.present[:, shared].any(1))
    return (inp.values * inp.weights[:, None]).sum(0)


class Overlap(Exception):
    """Entries of tensor ``name`` that more than one input holds, which ``stack`` refuses."""

    def __init__(self, name: str, count: int, which: torch.Tensor):
        self.name, self.count, self.which = name, count, which.nonzero().view(-1).tolist()
