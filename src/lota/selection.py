"""Exact global top-k selection of tickets, streamed tensor by tensor.

Selectors score every eligible entry; the ticket is the ``k`` entries of highest score over all
tensors together (one global threshold), ties broken by the lower global position. The global
position orders tensors by name, then entries by flat index, so the same scores always give the
same ticket however they are read.

The threshold is found by a radix select over order-preserving 32-bit keys of the float32 scores:
a 65,536-bin histogram of the high 16 bits, then the low 16 bits of the entries in the chosen bin
(see ``select_top_k``). Only one tensor's scores are held at a time, so selection needs memory for
the largest tensor and the ticket itself, not for the model: nothing is ever concatenated.

Registered selectors: ``magnitude`` (largest |Δ|, LoTA), ``bottomk`` (smallest |Δ|) and ``random``;
a selector is one ``@selector`` registration. A sparsity is parsed once (``Sparsity``) and
``k = floor((1 - sparsity) * numel)`` is computed from it in exact decimal arithmetic.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import numpy as np
import torch

from .errors import InputError
from .names import SELECTORS as SELECTOR_NAMES
from .ticket import Ticket

ScoreFn = Callable[[str], torch.Tensor]  # name -> scores (any shape, float), same values each call

_BINS = 1 << 16
_LITTLE_ENDIAN = sys.byteorder == "little"
_NUMPY_ON_HOST = True  # host masks go through numpy; False: torch's own path, as on a GPU


def parse_fraction(
    value,
    what: str,
    option: str,
    upper_open: bool = False,
    number_fix: str = "give a number",
    range_fix: str | None = None,
) -> Fraction:
    """``value`` as an exact fraction (``"0.9"`` is exactly 9/10) in [0, 1], or [0, 1) with
    ``upper_open``; anything else is an ``InputError`` naming ``what`` and ``option``."""
    bounds = "[0, 1)" if upper_open else "[0, 1]"
    try:
        frac = Fraction(Decimal(str(value)))
    except (InvalidOperation, ValueError, OverflowError):
        raise InputError(f"{what} '{value}' is not a number", option, number_fix) from None
    if not (0 <= frac < 1 if upper_open else 0 <= frac <= 1):
        raise InputError(
            f"{what} {value} is outside {bounds}", option, range_fix or f"give a value in {bounds}"
        )
    return frac


def parse_sparsity(value: str | float) -> Fraction:
    """Sparsity as an exact fraction in [0, 1); ``"0.9"`` is exactly 9/10."""
    return parse_fraction(
        value,
        "sparsity",
        "--sparsity",
        upper_open=True,
        number_fix="give a fraction of frozen entries in [0, 1), e.g. 0.9",
        range_fix="give a fraction of frozen entries in [0, 1), e.g. 0.9 keeps 10 % trainable",
    )


@dataclass(frozen=True)
class Sparsity:
    """A sparsity parsed once: the exact fraction of frozen entries, and the text it was given as
    (what messages and metadata show)."""

    text: str
    fraction: Fraction

    @classmethod
    def of(cls, value: str | float | Fraction | Sparsity) -> Sparsity:
        """``value`` parsed (an ``InputError`` if it is not in [0, 1)); a ``Fraction`` is taken as is."""
        if isinstance(value, Sparsity):
            return value
        return cls(str(value), value if isinstance(value, Fraction) else parse_sparsity(value))

    def size(self, numel: int) -> int:
        """``floor((1 - sparsity) * numel)``: the ticket's exact ``k`` over ``numel`` entries."""
        return math.floor((1 - self.fraction) * numel)

    def __str__(self) -> str:
        return self.text


def ticket_size(sparsity: str | float | Fraction | Sparsity, numel: int) -> int:
    """``floor((1 - sparsity) * numel)`` in exact arithmetic."""
    return Sparsity.of(sparsity).size(numel)


def require_trainable(sparsity: str | float | Fraction | Sparsity, numel: int) -> int:
    """``k`` for ``sparsity`` of ``numel`` target entries, refusing a sparsity so close to 1 that
    ``k`` is 0 (a ticket that trains nothing); the fix names the largest sparsity that keeps one
    entry, ``1 - 1/numel``, rounded down to a decimal a user can type."""
    sparsity = Sparsity.of(sparsity)
    k = sparsity.size(numel)
    if k == 0 and numel > 0:
        digits = len(str(numel)) + 2  # close enough to 1 - 1/numel to keep exactly one entry
        kept = (numel - 1) * 10**digits // numel  # rounded down, so k stays >= 1
        largest = f"0.{kept:0{digits}d}".rstrip("0").rstrip(".") if kept else "0"
        raise InputError(
            f"sparsity {sparsity} leaves 0 of {numel:,} target entries trainable",
            "--sparsity",
            f"use at most {largest} (1 entry), or a lower sparsity",
        )
    return k


def numel_of(shapes: dict[str, tuple[int, ...]]) -> int:
    """Entries over all tensors of ``shapes``."""
    return sum(math.prod(s) for s in shapes.values())


def _keys(scores: torch.Tensor, name: str, nonnegative: bool) -> torch.Tensor:
    """Integer keys in [0, 2^32) whose order is the scores' order.

    Non-negative float32 scores order like their bit patterns, so their keys are the int32 bits
    themselves (no copy); a negative or non-finite score shows up as a key at or above
    0x7F800000 (checked from the histogram). Other scores are mapped to int64 keys.
    """
    s = scores.detach().reshape(-1)
    if s.dtype != torch.float32:
        s = s.to(torch.float32)
    if nonnegative:  # (|x| and uniform draws are never -0.0, which would read as negative here)
        return s.view(torch.int32)
    if not bool(torch.isfinite(s).all()):
        raise InputError(
            f"scores of tensor '{name}' hold NaN or inf",
            fix="the tuned weights are not finite; use a run that did not diverge",
        )
    bits = (s + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def _high(key: torch.Tensor) -> torch.Tensor:
    """The high 16 bits of each key. For int32 keys on a little-endian machine this is a strided
    int16 view (no arithmetic): equal to ``key >> 16`` for keys of non-negative scores, and
    negative for a negative score, which ``bincount`` then refuses."""
    if key.dtype == torch.int32 and _LITTLE_ENDIAN:
        return key.view(torch.int16)[1::2]
    return (key >> 16) & 0xFFFF


def _allowed(
    name: str, numel: int, exclude: Ticket | None, device: torch.device
) -> torch.Tensor | None:
    if exclude is None or name not in exclude.indices or exclude.indices[name].numel() == 0:
        return None
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    keep[exclude.indices[name].to(device)] = False
    return keep


def _find_bin(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """Highest bin b with count(bins > b) < need <= count(bins >= b); returns (b, count above b)."""
    from_top = torch.cumsum(hist.flip(0), 0)  # from_top[j] = count of bins >= (_BINS - 1 - j)
    j = int(torch.searchsorted(from_top, torch.tensor([need], dtype=from_top.dtype)).item())
    b = _BINS - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0
    return b, above


def _positions(mask: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Sorted int64 positions (on the host) of the set entries of a 1-D bool ``mask`` (and
    ``keep``): found where the mask is, so only the positions cross to the host."""
    if keep is not None:
        mask &= keep
    if mask.device.type != "cpu" or not _NUMPY_ON_HOST:
        return torch.nonzero(mask).view(-1).cpu()
    return torch.from_numpy(np.flatnonzero(mask.numpy()))  # several times faster than nonzero()


def _host_counts(counts: torch.Tensor) -> torch.Tensor:
    return counts.cpu()  # a histogram (512 KiB) is all that crosses to the host per tensor


def select_top_k(
    names: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    score_fn: ScoreFn,
    k: int,
    exclude: Ticket | None = None,
    progress=None,
    nonnegative: bool = False,
    candidate_budget: int = 1 << 24,
    shard=None,
) -> dict[str, torch.Tensor]:
    """Indices of the ``k`` highest-scoring allowed entries over all ``names`` (sorted by name).

    Two passes over the scores: a histogram of the keys' high 16 bits fixes the bin that holds the
    k-th score; the second pass keeps every entry above that bin and collects the bin's entries
    (position and low 16 bits), among which the exact threshold and the tie-break are settled in
    memory. Should the bin hold more than ``candidate_budget`` entries (e.g. millions of exact
    zeros), the low bits get a histogram pass of their own and a third pass collects the entries.
    ``nonnegative`` declares every score >= 0 (as for |Δ|), which allows 32-bit keys.

    With ``shard`` (a ``lota.dist.Shard``), ``score_fn`` gives this rank's slice of each tensor;
    the histograms are summed over the ranks and this rank gets the ticket's entries in its slice
    (global positions), the same entries one process would select from the whole tensors.
    """
    order = sorted(names)
    world = shard.world if shard is not None else None
    numels = {n: shard.numels[n] if shard else math.prod(shapes[n]) for n in order}
    if exclude is not None and shard is not None:
        exclude = _local_exclude(exclude, shard, order, numels)
    _check_eligible(k, _available(order, numels, exclude, world))
    if k == 0:
        return {n: torch.zeros(0, dtype=torch.long) for n in order}

    def keys_of(n):
        # keys, masks and histograms stay where the scores are (a GPU's scores never come over
        # whole): only each tensor's histogram and its selected positions cross to the host
        key = _keys(score_fn(n), n, nonnegative)
        if key.numel() != numels[n]:
            raise InputError(f"scores of '{n}' have {key.numel()} entries, expected {numels[n]}")
        return key, _allowed(n, numels[n], exclude, key.device)

    def tick():
        if progress is not None:
            progress.update(1)

    hist = _high_histogram(order, keys_of, nonnegative, tick, world)
    hi_bin, above_hi = _find_bin(hist, k)
    if int(hist[hi_bin]) > candidate_budget:
        out = _three_pass_finish(order, keys_of, hi_bin, above_hi, k, tick, world)
    else:
        out = _two_pass_finish(order, keys_of, hi_bin, above_hi, k, tick, world)
    return _globalize(out, shard, k)


def _local_exclude(exclude: Ticket, shard, order: list[str], numels: dict[str, int]) -> Ticket:
    """The protected entries that fall in this rank's slices, at their local positions."""
    return Ticket(
        shapes={n: (numels[n],) for n in order},
        indices={
            n: shard.local_indices(n, exclude.indices[n]) for n in order if n in exclude.indices
        },
    )


def _available(order: list[str], numels: dict[str, int], exclude: Ticket | None, world) -> int:
    """How many entries are eligible and not protected (over all ranks)."""
    available = sum(numels.values()) - (
        sum(int(exclude.indices[n].numel()) for n in order if n in exclude.indices)
        if exclude
        else 0
    )
    if world is not None:
        available = int(world.sum_(torch.tensor([available], dtype=torch.long)).item())
    return available


def _check_eligible(k: int, available: int) -> None:
    if k < 0 or k > available:
        raise InputError(
            f"cannot select {k:,} entries: only {available:,} are eligible and not protected",
            fix="raise --sparsity or protect fewer tickets",
        )


def _high_histogram(order, keys_of, nonnegative: bool, tick, world=None) -> torch.Tensor:
    """Pass 1: the histogram of the keys' high 16 bits (summed over the ranks); scores that are
    not finite, or negative under ``nonnegative``, are refused."""
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for n in order:
        key, keep = keys_of(n)
        hi = _high(key)
        bad = InputError(
            f"scores of tensor '{n}' hold NaN, inf or negative values",
            fix="the tuned weights are not finite; use a run that did not diverge",
        )
        try:
            counts = _host_counts(torch.bincount(hi if keep is None else hi[keep], minlength=_BINS))
        except RuntimeError:  # a negative high half: a negative score under ``nonnegative``
            raise bad from None
        if nonnegative and int(counts[0x7F80:].sum()):
            raise bad
        hist += counts
        tick()
    if world is not None:
        world.sum_(hist)
    return hist


def _two_pass_finish(
    order, keys_of, hi_bin: int, above_hi: int, k: int, tick, world=None
) -> dict[str, torch.Tensor]:
    """Pass 2: everything above the bin, and the bin's entries as candidates, among which the
    exact threshold and the tie-break are settled in memory."""
    chosen, cand_pos, cand_lo = {}, {}, {}
    for n in order:
        key, keep = keys_of(n)
        hi = _high(key)
        chosen[n] = _positions(hi > hi_bin, keep)
        cand_pos[n] = _positions(hi == hi_bin, keep)
        cand_lo[n] = (key[cand_pos[n].to(key.device)] & 0xFFFF).to(torch.int64).cpu()
        tick()
    lo_hist = torch.bincount(torch.cat(list(cand_lo.values())), minlength=_BINS)
    if world is not None:
        world.sum_(lo_hist)
    lo_bin, above_lo = _find_bin(lo_hist, k - above_hi)
    ties = {n: cand_pos[n][cand_lo[n] == lo_bin] for n in order}
    quota = _tie_quota(
        order, {n: int(t.numel()) for n, t in ties.items()}, k - above_hi - above_lo, world
    )
    out = {}
    for n in order:  # ties go to the lowest global positions: tensors in name order, then index
        above = cand_pos[n][cand_lo[n] > lo_bin]
        out[n] = _merge(chosen.pop(n), torch.cat([above, ties[n][: quota[n]]]))
    return out


def _tie_quota(order, counts: dict[str, int], need: int, world) -> dict[str, int]:
    """How many of its tied entries each tensor (of this rank) contributes, so that the ``need``
    ties taken are those of lowest global position: tensors in name order, and within a tensor
    the ranks in order (rank r's slice precedes rank r+1's)."""
    local = torch.tensor([counts[n] for n in order], dtype=torch.long)
    table = world.gather(local) if world is not None else local.unsqueeze(0)  # [ranks, tensors]
    me = world.rank if world is not None else 0
    quota = {}
    for j, n in enumerate(order):
        for r in range(table.shape[0]):
            take = min(need, int(table[r, j]))
            need -= take
            if r == me:
                quota[n] = take
    assert need == 0, "tie-break ran out of tied entries"
    return quota


def _globalize(out: dict[str, torch.Tensor], shard, k: int) -> dict[str, torch.Tensor]:
    """Check the ticket's size (over all ranks) and turn a shard's positions into global ones."""
    mine = sum(int(v.numel()) for v in out.values())
    if shard is None:
        assert mine == k
        return out
    total = int(shard.world.sum_(torch.tensor([mine], dtype=torch.long)).item())
    assert total == k, f"sharded selection found {total} entries, not {k}"
    return {n: v + shard.offsets[n] for n, v in out.items()}


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of sorted, disjoint int64 positions ``a`` and ``b`` (``b`` need not be sorted)."""
    if b.numel() == 0:
        return a
    b = torch.sort(b).values.numpy()
    return torch.from_numpy(np.insert(a.numpy(), np.searchsorted(a.numpy(), b), b))


def _three_pass_finish(
    order, keys_of, hi_bin: int, above_hi: int, k: int, tick, world=None
) -> dict[str, torch.Tensor]:
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for n in order:
        key, keep = keys_of(n)
        sel = _high(key) == hi_bin
        if keep is not None:
            sel &= keep
        hist += _host_counts(torch.bincount((key[sel] & 0xFFFF).to(torch.int64), minlength=_BINS))
        tick()
    if world is not None:
        world.sum_(hist)
    lo_bin, above_lo = _find_bin(hist, k - above_hi)
    ties_needed = k - above_hi - above_lo
    quota = None
    if world is not None:  # an extra pass: the tie quota needs every rank's counts up front
        counts = {}
        for n in order:
            key, keep = keys_of(n)
            eq = (_high(key) == hi_bin) & ((key & 0xFFFF) == lo_bin)
            counts[n] = int((eq if keep is None else eq & keep).sum())
        quota = _tie_quota(order, counts, ties_needed, world)
    out = {}
    for n in order:
        key, keep = keys_of(n)
        hi = _high(key)
        lo = key & 0xFFFF
        eq = _positions((hi == hi_bin) & (lo == lo_bin), keep)
        eq = eq[: quota[n] if quota is not None else ties_needed]
        ties_needed -= int(eq.numel())
        gt = _positions((hi > hi_bin) | ((hi == hi_bin) & (lo > lo_bin)), keep)
        out[n] = torch.sort(torch.cat([gt, eq])).values
        tick()
    return out


# ---------------------------------------------------------------------------- registered selectors
@dataclass(frozen=True)
class Selector:
    """A registered selector. ``make(delta_fn, names, shapes, seed)`` gives its score function;
    ``nonnegative``: its scores are never negative (which allows 32-bit keys); ``whole``: it
    scores whole tensors whatever it is given, so a shard takes its slice of those scores."""

    name: str
    make: Callable
    nonnegative: bool = False
    whole: bool = False


SELECTORS: dict[str, Selector] = {}


def selector(name: str, nonnegative: bool = False, whole: bool = False):
    """Register ``fn(delta_fn, names, shapes, seed) -> score_fn`` under ``name``, one of
    ``names.SELECTORS`` (the list ``--selector`` offers)."""
    if name not in SELECTOR_NAMES:
        raise ValueError(f"selector '{name}' is not listed in lota.names.SELECTORS")

    def wrap(fn):
        SELECTORS[name] = Selector(name, fn, nonnegative, whole)
        return fn

    return wrap


@selector("magnitude", nonnegative=True)
def _magnitude(delta_fn: ScoreFn, names, shapes, seed: int) -> ScoreFn:
    if getattr(delta_fn, "fresh", False):  # it returns a new tensor each call: take |.| in place
        return lambda n: delta_fn(n).abs_()
    return lambda n: delta_fn(n).abs()


@selector("bottomk")
def _bottomk(delta_fn: ScoreFn, names, shapes, seed: int) -> ScoreFn:
    return lambda n: -delta_fn(n).abs()


@selector("random", nonnegative=True, whole=True)
def _random(delta_fn: ScoreFn | None, names, shapes, seed: int) -> ScoreFn:
    position = {n: i for i, n in enumerate(sorted(names))}

    def score(n):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + position[n])
        return torch.rand(math.prod(shapes[n]), generator=g)

    return score


def select(
    method: str,
    shapes: dict[str, tuple[int, ...]],
    k: int,
    delta_fn: ScoreFn | None = None,
    exclude: Ticket | None = None,
    seed: int = 0,
    base_fingerprint: str | Callable[[], str] = "",
    progress=None,
    shard=None,
) -> Ticket:
    """Build a ticket of exactly ``k`` entries over ``shapes`` with a registered selector: the one
    path by which lota turns scores into a ticket (``lota mask``, ``lota adapt`` in one process or
    sharded, ``CalibrationCallback``).

    ``delta_fn(name)`` gives a tensor's task vector; it is called twice per tensor (once per
    pass), so that nothing larger than one tensor is held. A ``delta_fn`` with the attribute
    ``fresh = True`` promises a new tensor on every call, which selectors may then overwrite.
    ``exclude`` holds the protected entries, never selected. ``base_fingerprint`` may be a
    function, called once the scores are read (for a fingerprint hashed while they stream).
    With ``shard``, ``delta_fn`` gives this rank's slice and the returned ticket holds this
    rank's entries (see ``select_top_k``).
    """
    if method not in SELECTORS:
        raise InputError(
            f"unknown selector '{method}'", fix=f"choose one of {', '.join(sorted(SELECTORS))}"
        )
    chosen = SELECTORS[method]
    names = sorted(shapes)
    score_fn = chosen.make(delta_fn, names, shapes, seed)
    if shard is not None and chosen.whole:  # scores of the whole tensor, sliced
        whole = score_fn

        def score_fn(n):
            return whole(n)[shard.offsets[n] : shard.offsets[n] + shard.numels[n]]

    indices = select_top_k(
        names,
        shapes,
        score_fn,
        k,
        exclude=exclude,
        progress=progress,
        nonnegative=chosen.nonnegative,
        shard=shard,
    )
    if callable(base_fingerprint):
        base_fingerprint = base_fingerprint()
    return Ticket(
        shapes={n: shapes[n] for n in names}, indices=indices, base_fingerprint=base_fingerprint
    )
