"""KS-Lottery: which token embeddings moved, by a two-sample Kolmogorov-Smirnov test per row.

``ks_rows(a, b)`` computes, for every row ``j``, the two-sided two-sample KS statistic between the
values of ``a[j]`` and ``b[j]`` (vectorized in torch, chunked over rows), equal to
``scipy.stats.ks_2samp(a[j], b[j]).statistic`` bit for bit, ties and unequal lengths included, and
its p-value as scipy computes it (exact or asymptotic, scipy's own functions, evaluated once per
distinct statistic). ``select_tokens`` applies a correction for the ~V simultaneous tests and
returns the selected rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from .datafiles import Fields
from .errors import InputError
from .names import KS_CORRECTIONS as CORRECTIONS
from .names import KS_MODES

MAX_EXACT_N = 10000  # scipy's "auto" mode is exact up to this sample size


def _exact_mode(n1: int, n2: int, mode: str) -> bool:
    if mode not in KS_MODES:
        raise InputError(f"unknown p-value mode '{mode}'", "--mode", "choose auto, exact or asymp")
    g = math.gcd(n1, n2)
    if mode == "auto":
        return max(n1, n2) <= MAX_EXACT_N
    return mode == "exact" and n1 // g < np.iinfo(np.int32).max / (n2 // g)


def ks_statistics(
    a: torch.Tensor,
    b: torch.Tensor,
    mode: str = "auto",
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Two-sided KS statistic per row of ``a`` (R x n1) against ``b`` (R x n2), float64.

    Per row, the empirical CDFs are compared at every value of either sample: ``cx/n1 - cy/n2``
    with ``cx``, ``cy`` the counts of values ``<=`` that value, computed in float64 exactly as
    scipy does. Where scipy computes an exact p-value (``mode``), it reports the statistic as
    ``round(D * lcm) / lcm`` (``lcm`` of the sample sizes); so does this function, so the
    statistic equals scipy's bit for bit. ``device``: where the rows are sorted, a chunk at a
    time (the CPU by default); the result is on the CPU.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError("ks_statistics needs two matrices with the same number of rows")
    rows, n1 = a.shape
    n2 = b.shape[1]
    if _exact_mode(n1, n2, mode):
        if device.type == "cpu":
            return _exact_statistics(a, b, chunk)
        return _exact_statistics_torch(a, b, chunk, device)
    out = torch.empty(rows, dtype=torch.float64)
    for start in range(0, rows, chunk):
        x = a[start : start + chunk].to(device, torch.float64)
        y = b[start : start + chunk].to(device, torch.float64)
        values, order = torch.sort(torch.cat([x, y], 1), dim=1, stable=True)
        from_x = (order < n1).to(torch.int64)
        cx = torch.cumsum(from_x, 1)
        cy = torch.arange(1, n1 + n2 + 1, device=device).expand_as(cx) - cx
        # evaluate only at the last of each run of equal values (right-continuous CDFs)
        last = torch.ones_like(values, dtype=torch.bool)
        last[:, :-1] = values[:, 1:] != values[:, :-1]
        diff = cx.to(torch.float64) / n1 - cy.to(torch.float64) / n2
        diff = torch.where(last, diff, torch.zeros((), dtype=torch.float64))
        d_plus = diff.max(1).values
        d_minus = (-diff.min(1).values).clamp(0, 1)
        out[start : start + chunk] = torch.maximum(d_minus, d_plus).cpu()
    return out


def _exact_statistics(a: torch.Tensor, b: torch.Tensor, chunk: int) -> torch.Tensor:
    """The statistic where scipy reports it as ``h / lcm``: ``h = max |cx*n2 - cy*n1| / g`` is an
    integer found in integer arithmetic, then divided as scipy divides.

    Values of 32 bits or fewer are sorted as 64-bit integers that carry the value's order in the
    high bits and its sample in the lowest bit, so one value-only sort (numpy's vectorized sort,
    several times faster than an argsort) gives both the order and where each value came from.
    """
    rows, n1 = a.shape
    n2 = b.shape[1]
    g = math.gcd(n1, n2)
    wa, wb = n1 // g, n2 // g  # key = cx * wb - cy * wa = (cx/n1 - cy/n2) * lcm
    lcm = wa * n2
    h = np.empty(rows, dtype=np.int64)
    pos = np.arange(1, n1 + n2 + 1, dtype=np.int64) * wb
    narrow = a.dtype != torch.float64 and b.dtype != torch.float64
    for start in range(0, rows, chunk):
        x, y = a[start : start + chunk], b[start : start + chunk]
        if narrow:  # float32 (or narrower, widened exactly): order-preserving integer keys
            c = torch.cat([x.to(torch.float32), y.to(torch.float32)], 1).numpy() + np.float32(0.0)
            bits = c.view(np.int32)  # (+ 0.0 turns -0.0 into 0.0, which compare equal)
            k = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) << 1
            k[:, n1:] |= 1
            k.sort(axis=1)
            from_y = k & 1
            values = k >> 1
        else:
            v, order = torch.sort(torch.cat([x.double(), y.double()], 1), dim=1)
            values, from_y = v.numpy(), (order >= n1).numpy().astype(np.int64)
        cy = np.cumsum(from_y, axis=1)
        key = pos - cy * (wa + wb)  # (pos - cy) * wb - cy * wa
        last = np.ones(key.shape, dtype=np.bool_)  # only the last of each run of equal values
        np.not_equal(values[:, 1:], values[:, :-1], out=last[:, :-1])
        key *= last
        h[start : start + chunk] = np.maximum(key.max(1), -key.min(1))
    return torch.from_numpy(h).to(torch.float64) / lcm


def _exact_statistics_torch(
    a: torch.Tensor, b: torch.Tensor, chunk: int, device: torch.device
) -> torch.Tensor:
    """``_exact_statistics`` in torch on ``device`` (a GPU): the same integer keys and the same
    integer arithmetic, so the same statistic bit for bit."""
    rows, n1 = a.shape
    n2 = b.shape[1]
    g = math.gcd(n1, n2)
    wa, wb = n1 // g, n2 // g
    lcm = wa * n2
    h = torch.empty(rows, dtype=torch.int64)
    pos = torch.arange(1, n1 + n2 + 1, dtype=torch.int64, device=device) * wb
    narrow = a.dtype != torch.float64 and b.dtype != torch.float64
    for start in range(0, rows, chunk):
        x = a[start : start + chunk].to(device)
        y = b[start : start + chunk].to(device)
        if narrow:
            c = torch.cat([x.to(torch.float32), y.to(torch.float32)], 1) + 0.0
            bits = c.view(torch.int32)
            k = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 1
            k[:, n1:] |= 1
            k = torch.sort(k, dim=1).values
            from_y = k & 1
            values = k >> 1
        else:
            values, order = torch.sort(torch.cat([x.double(), y.double()], 1), dim=1)
            from_y = (order >= n1).to(torch.int64)
        cy = torch.cumsum(from_y, dim=1)
        key = pos - cy * (wa + wb)
        last = torch.ones_like(key, dtype=torch.bool)
        last[:, :-1] = values[:, 1:] != values[:, :-1]
        key = key * last
        h[start : start + chunk] = torch.maximum(key.max(1).values, -key.min(1).values).cpu()
    return h.to(torch.float64) / lcm


def ks_pvalues(d: torch.Tensor, n1: int, n2: int, mode: str = "auto") -> torch.Tensor:
    """Two-sided p-values of KS statistics ``d`` for samples of sizes ``n1`` and ``n2``, as
    ``scipy.stats.ks_2samp`` computes them (``mode`` auto, exact or asymp)."""
    from scipy.stats import distributions
    from scipy.stats._stats_py import _attempt_exact_2kssamp

    g = math.gcd(n1, n2)
    mode = "exact" if _exact_mode(n1, n2, mode) else "asymp"
    values = d.numpy()
    unique, inverse = np.unique(values, return_inverse=True)
    probs = np.empty(unique.size)
    m, n = sorted([float(n1), float(n2)], reverse=True)
    en = m * n / (m + n)
    for i, stat in enumerate(unique):
        ok = False
        if mode == "exact":
            ok, _, prob = _attempt_exact_2kssamp(n1, n2, g, float(stat), "two-sided")
        if not ok:
            prob = distributions.kstwo.sf(float(stat), np.round(en))
        probs[i] = min(max(float(prob), 0.0), 1.0)
    return torch.from_numpy(probs[inverse].reshape(values.shape))


@dataclass
class Selection:
    """Rows selected by KS-Lottery and the statistics behind them."""

    token_ids: list[int]
    statistic: torch.Tensor  # D per row
    p_value: torch.Tensor  # per row
    shift: torch.Tensor  # L2 norm of the row's change
    threshold: float  # the p-value bound the selection used (after correction)


def select_tokens(
    before: torch.Tensor,
    after: torch.Tensor,
    alpha: float = 0.05,
    correction: str = "none",
    top: int | None = None,
    mode: str = "auto",
    device: torch.device | str | None = None,
) -> Selection:
    """Rows whose values changed distribution: KS test per row at level ``alpha`` with the
    ``correction`` for multiple testing (none, bonferroni, bh = Benjamini-Hochberg); with ``top``,
    the ``top`` rows of largest statistic instead (ties: lower row first)."""
    if before.shape != after.shape or before.dim() != 2:
        raise InputError(
            f"embeddings of shapes {list(before.shape)} and {list(after.shape)} do not pair up",
            "lota ks",
            "compare a model with a fine-tune of that same model",
        )
    if not 0 < alpha < 1:
        raise InputError(f"alpha {alpha} is outside (0, 1)", "--alpha", "give e.g. 0.05")
    if correction not in CORRECTIONS:
        raise InputError(
            f"unknown correction '{correction}'", "--correction", f"choose {', '.join(CORRECTIONS)}"
        )
    d = ks_statistics(before, after, mode, device=device)
    p = ks_pvalues(d, before.shape[1], after.shape[1], mode)
    shift = torch.cat(
        [
            (after[i : i + 1024].to(torch.float64) - before[i : i + 1024].to(torch.float64)).norm(
                dim=1
            )
            for i in range(0, before.shape[0], 1024)
        ]
    )
    rows = d.numel()
    if top is not None:
        if not 0 <= top <= rows:
            raise InputError(f"--top {top} is outside 0..{rows}", "--top", "give a row count")
        order = torch.sort(-d, stable=True).indices[:top]
        ids = sorted(int(i) for i in order)
        return Selection(ids, d, p, shift, float("nan"))
    if correction == "none":
        bound = alpha
        chosen = p < bound
    elif correction == "bonferroni":
        bound = alpha / rows
        chosen = p < bound
    else:  # Benjamini-Hochberg: the largest i with p_(i) <= i * alpha / m; reject p_(1..i)
        ranked = torch.sort(p, stable=True).values
        ok = ranked <= torch.arange(1, rows + 1, dtype=torch.float64) * alpha / rows
        i = int(ok.nonzero().max()) + 1 if bool(ok.any()) else 0
        bound = float(ranked[i - 1]) if i else 0.0
        chosen = p <= bound if i else torch.zeros(rows, dtype=torch.bool)
    ids = chosen.nonzero().view(-1).tolist()
    return Selection(ids, d, p, shift, float(bound))


# ---------------------------------------------------------------------------- model folders
def input_embedding(reader) -> str:
    """Name of the input embedding matrix of a model (a ``WeightReader``). Where the output head
    is tied to it, a delta on its rows changes the input embedding alone: ``lota apply`` and the
    runs that train it give the head its own copy first (``targets.untie_embeddings``)."""
    model = reader.skeleton
    emb = model.get_input_embeddings()
    return next(n for n, p in model.named_parameters() if p is emb.weight)


def token_counts(
    data: str,
    tokenizer,
    vocab: int,
    max_length: int = 512,
    split: str | None = None,
    fields: Fields | None = None,
) -> torch.Tensor:
    """How often each token id occurs in the tokenized training data (prompts and completions),
    read in one pass (``lota.data.read_data``: any format, ``split`` and ``fields``)."""
    from .data import encoded, read_data

    counts = torch.zeros(vocab, dtype=torch.int64)
    examples = read_data(data, split, fields)
    for _, ex in encoded(examples, tokenizer, max_length, where=data):
        ids = torch.tensor(ex.input_ids, dtype=torch.long)
        counts += torch.bincount(ids[ids < vocab], minlength=vocab)
    return counts


def row_ticket(name: str, shape: tuple[int, int], rows: torch.Tensor, base_fingerprint: str):
    """The ticket holding whole rows ``rows`` (sorted token ids) of a ``(vocab, dim)`` tensor."""
    from .ticket import Ticket

    dim = shape[1]
    idx = (rows[:, None] * dim + torch.arange(dim)).reshape(-1)
    return Ticket({name: tuple(shape)}, {name: idx}, base_fingerprint=base_fingerprint)


def run_ks(
    model: str,
    tuned: str,
    out: str,
    alpha: float = 0.05,
    correction: str = "none",
    top: int | None = None,
    mode: str = "auto",
    data: str | None = None,
    device: str = "auto",
    force: bool = False,
    split: str | None = None,
    fields: Fields | None = None,
) -> dict:
    """``lota ks``: select token rows, write the ticket, the listing and the transfer delta. The
    rows are sorted for their statistic on ``device`` (``lota.dist.resolve_device``). ``out`` is
    locked from its check to its swap, and may not be an input or hold one. ``data`` (any format
    ``lota.data.read_data`` reads, its ``split`` and ``fields``) adds each token's count."""
    from .output_checks import writing_folder

    with writing_folder(out, force, inputs=[model, tuned, data]):
        return _run_ks(model, tuned, out, alpha, correction, top, mode, data, device, split, fields)


def _run_ks(
    model: str,
    tuned: str,
    out: str,
    alpha: float,
    correction: str,
    top: int | None,
    mode: str,
    data: str | None,
    device: str,
    split: str | None = None,
    fields: Fields | None = None,
) -> dict:
    from . import format as fmt
    from .delta import SparseDelta
    from .dist import resolve_device
    from .fileio import atomic_dir, write_json
    from .models import load_tokenizer
    from .task_vectors import with_head_change
    from .weights import WeightReader

    where = resolve_device(device)
    rb, rt = WeightReader(model, "base model"), WeightReader(tuned, "tuned model")
    name = _same_embedding(rb, rt, tuned)
    vocab, dim = rb.shapes[name]
    tokenizer = load_tokenizer(model)
    # bad data fails early
    counts = token_counts(data, tokenizer, vocab, split=split, fields=fields) if data else None
    before, after = rb.get(name), rt.get(name)
    sel = select_tokens(before, after, alpha, correction, top, mode, device=where)
    _check_selected(sel, name, alpha, correction, tuned)
    rows = torch.tensor(sel.token_ids, dtype=torch.long)
    ticket = row_ticket(name, (vocab, dim), rows, rb.fingerprint())
    values = (after.to(torch.float32) - before.to(torch.float32))[rows].reshape(-1)
    transfer = with_head_change(SparseDelta(ticket, {name: values}), rb, rt)  # tied: the head's
    selected = _listing(sel, tokenizer, counts)
    config = {
        "command": "ks",
        "model": model,
        "tuned": tuned,
        "alpha": alpha,
        "correction": correction,
        "top": top,
        "mode": mode,
        "data": data,
        **({"split": split} if split else {}),
        **({"fields": dataclasses.asdict(fields)} if fields and fields != Fields() else {}),
    }
    report = {
        "tensor": name,
        "vocab": vocab,
        "dim": dim,
        "selected_count": len(selected),
        "threshold": sel.threshold,
        "config": config,
        "selected": selected,
    }
    with atomic_dir(out) as tmp:
        fmt.save(ticket, tmp / "ticket.safetensors", config=config)
        fmt.save(transfer, tmp / "transfer.safetensors", config=config)
        write_json(tmp / "tokens.json", report)
        (tmp / "tokens.csv").write_text(_csv(selected, counts is not None), encoding="utf-8")
    return report


def _same_embedding(rb, rt, tuned: str) -> str:
    """The input embedding's name, the same tensor of the same shape in both models."""
    name = input_embedding(rb)
    if input_embedding(rt) != name or rb.shapes[name] != rt.shapes[name]:
        raise InputError(
            "the two models' input embeddings differ in name or shape",
            tuned,
            "compare a model with a fine-tune of that same model",
        )
    return name


def _check_selected(sel: Selection, name: str, alpha: float, correction: str, tuned: str):
    if not sel.token_ids:
        raise InputError(
            f"no token row of {name} passes the test at alpha {alpha} (correction {correction}), "
            "so the ticket would be empty",
            tuned,
            "select rows with a larger --alpha (e.g. 0.5) or a fixed number with --top N",
        )


def _listing(sel: Selection, tokenizer, counts: torch.Tensor | None) -> list[dict]:
    """Every selected row: its token, statistic, p-value and shift (and count in the data)."""
    return [
        {
            "token_id": int(j),
            "token": tokenizer.decode([int(j)]),
            "D": float(sel.statistic[j]),
            "p_value": float(sel.p_value[j]),
            "shift": float(sel.shift[j]),
            **({"count_in_data": int(counts[j])} if counts is not None else {}),
        }
        for j in sel.token_ids
    ]


def _csv(selected: list[dict], counted: bool) -> str:
    """``tokens.csv``: the listing, one row per selected token (tokens quoted)."""
    lines = ["token_id,token,D,p_value,shift" + (",count_in_data" if counted else "")]
    for r in selected:
        token = '"' + r["token"].replace('"', '""') + '"'
        extra = f",{r['count_in_data']}" if counted else ""
        lines.append(f"{r['token_id']},{token},{r['D']!r},{r['p_value']!r},{r['shift']!r}{extra}")
    return "\n".join(lines) + "\n"
