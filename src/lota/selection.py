"""Exact global top-k selection of tickets, streamed tensor by tensor.

Selectors score every eligible entry; the ticket is the ``k`` entries of highest score over all
tensors together (one global threshold), ties broken by the lower global position. The global
position orders tensors by name, then entries by flat index, so the same scores always give the
same ticket however they are read.

The threshold is found by a two-pass radix select over order-preserving 32-bit keys of the float32
scores (a 65,536-bin histogram of the high 16 bits, then of the low 16 bits inside the chosen bin)
and a third pass collects the entries. Only one tensor's scores are held at a time, so selection
needs memory for the largest tensor, not for the model: nothing is ever concatenated.

Registered selectors: ``magnitude`` (largest |Δ|, LoTA), ``bottomk`` (smallest |Δ|) and ``random``.
``k = floor((1 - sparsity) * numel)`` is computed in exact decimal arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch

from .errors import InputError
from .ticket import Ticket

ScoreFn = Callable[[str], torch.Tensor]  # name -> scores (any shape, float), same values each call

_BINS = 1 << 16


def parse_sparsity(value: str | float) -> Fraction:
    """Sparsity as an exact fraction in [0, 1); ``"0.9"`` is exactly 9/10."""
    try:
        frac = Fraction(Decimal(str(value)))
    except (InvalidOperation, ValueError, OverflowError):
        raise InputError(
            f"sparsity '{value}' is not a number",
            "--sparsity",
            "give a fraction of frozen entries in [0, 1), e.g. 0.9",
        ) from None
    if not 0 <= frac < 1:
        raise InputError(
            f"sparsity {value} is outside [0, 1)",
            "--sparsity",
            "give a fraction of frozen entries in [0, 1), e.g. 0.9 keeps 10 % trainable",
        )
    return frac


def ticket_size(sparsity: str | float | Fraction, numel: int) -> int:
    """``floor((1 - sparsity) * numel)`` in exact arithmetic."""
    frac = sparsity if isinstance(sparsity, Fraction) else parse_sparsity(sparsity)
    return math.floor((1 - frac) * numel)


def _keys(scores: torch.Tensor, name: str) -> torch.Tensor:
    """Map float scores to int64 keys in [0, 2^32) whose order is the scores' order."""
    s = scores.detach().reshape(-1).to(torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise InputError(
            f"scores of tensor '{name}' hold NaN or inf",
            fix="the tuned weights are not finite; use a run that did not diverge",
        )
    s = s + 0.0  # -0.0 -> +0.0 so that both zeros tie
    bits = s.view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), (1 << 31) - 1 - (bits & 0x7FFFFFFF))


def _allowed(name: str, numel: int, exclude: Ticket | None) -> torch.Tensor | None:
    if exclude is None or name not in exclude.indices or exclude.indices[name].numel() == 0:
        return None
    keep = torch.ones(numel, dtype=torch.bool)
    keep[exclude.indices[name]] = False
    return keep


def _find_bin(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """Highest bin b with count(bins > b) < need <= count(bins >= b); returns (b, count above b)."""
    from_top = torch.cumsum(hist.flip(0), 0)  # from_top[j] = count of bins >= (_BINS - 1 - j)
    j = int(torch.searchsorted(from_top, torch.tensor([need], dtype=from_top.dtype)).item())
    b = _BINS - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0
    return b, above


def select_top_k(
    names: Sequence[str],
    shapes: dict[str, tuple[int, ...]],
    score_fn: ScoreFn,
    k: int,
    exclude: Ticket | None = None,
    progress=None,
) -> dict[str, torch.Tensor]:
    """Indices of the ``k`` highest-scoring allowed entries over all ``names`` (sorted by name)."""
    order = sorted(names)
    numels = {n: math.prod(shapes[n]) for n in order}
    available = sum(numels.values()) - (
        sum(int(exclude.indices[n].numel()) for n in order if n in exclude.indices)
        if exclude
        else 0
    )
    if k < 0 or k > available:
        raise InputError(
            f"cannot select {k:,} entries: only {available:,} are eligible and not protected",
            fix="raise --sparsity or protect fewer tickets",
        )
    empty = {n: torch.zeros(0, dtype=torch.long) for n in order}
    if k == 0:
        return empty

    def keys_of(n):
        key = _keys(score_fn(n), n)
        if key.numel() != numels[n]:
            raise InputError(f"scores of '{n}' have {key.numel()} entries, expected {numels[n]}")
        return key, _allowed(n, numels[n], exclude)

    def tick():
        if progress is not None:
            progress.update(1)

    # Pass 1: histogram of the high 16 bits.
    hist = torch.zeros(_BINS, dtype=torch.int64)
    for n in order:
        key, keep = keys_of(n)
        hi = key >> 16
        hist += torch.bincount(hi if keep is None else hi[keep], minlength=_BINS)
        tick()
    hi_bin, above_hi = _find_bin(hist, k)
    # Pass 2: histogram of the low 16 bits inside the chosen high bin.
    hist.zero_()
    for n in order:
        key, keep = keys_of(n)
        sel = (key >> 16) == hi_bin
        if keep is not None:
            sel &= keep
        hist += torch.bincount(key[sel] & 0xFFFF, minlength=_BINS)
        tick()
    lo_bin, above_lo = _find_bin(hist, k - above_hi)
    tau = (hi_bin << 16) | lo_bin
    ties_needed = k - above_hi - above_lo
    # Pass 3: everything above tau, then the first ties in global order.
    out = {}
    for n in order:
        key, keep = keys_of(n)
        gt, eq = key > tau, key == tau
        if keep is not None:
            gt &= keep
            eq &= keep
        eq_idx = eq.nonzero().view(-1)[:ties_needed]
        ties_needed -= int(eq_idx.numel())
        idx = torch.cat([gt.nonzero().view(-1), eq_idx])
        out[n] = torch.sort(idx).values
        tick()
    assert ties_needed == 0 and sum(int(v.numel()) for v in out.values()) == k
    return out


# ---------------------------------------------------------------------------- registered selectors
SELECTORS: dict[str, Callable] = {}


def selector(name: str):
    """Register ``fn(delta_fn, names, shapes, seed) -> score_fn`` under ``name``."""

    def wrap(fn):
        SELECTORS[name] = fn
        return fn

    return wrap


@selector("magnitude")
def _magnitude(delta_fn: ScoreFn, names, shapes, seed: int) -> ScoreFn:
    return lambda n: delta_fn(n).abs()


@selector("bottomk")
def _bottomk(delta_fn: ScoreFn, names, shapes, seed: int) -> ScoreFn:
    return lambda n: -delta_fn(n).abs()


@selector("random")
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
    base_fingerprint: str = "",
    progress=None,
) -> Ticket:
    """Build a ticket of exactly ``k`` entries over ``shapes`` with a registered selector."""
    if method not in SELECTORS:
        raise InputError(
            f"unknown selector '{method}'", fix=f"choose one of {', '.join(sorted(SELECTORS))}"
        )
    names = sorted(shapes)
    score_fn = SELECTORS[method](delta_fn, names, shapes, seed)
    indices = select_top_k(names, shapes, score_fn, k, exclude=exclude, progress=progress)
    return Ticket(
        shapes={n: shapes[n] for n in names}, indices=indices, base_fingerprint=base_fingerprint
    )
