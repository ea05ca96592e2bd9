"""``lota eval``: greedy generation and scoring against the reference completions (and, with
metric ``choice``, multiple choice by log-likelihood: ``lota.choice``).

Metrics are registered functions ``(prediction, reference) -> float in [0, 1]``. The default,
``answer``, compares final answers: the text after the last ``####`` if there is one, otherwise the
last non-empty line, with whitespace, a trailing period and thousands separators ignored and
numbers compared by value.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from . import choice
from .data import Example, Fields, model_positions, pad_id, prompt_ids, read_data
from .dist import resolve_device
from .errors import InputError
from .input_files import first_repeat
from .models import check_special_tokens, device_of, load_model, load_tokenizer
from .names import METRICS as METRIC_NAMES

METRICS: dict[str, Callable[[str, str], float]] = {}


def metric(name: str):
    """Register ``fn(generated, expected) -> score`` under ``name``, one of ``names.METRICS``
    (the list ``--metric`` offers; its other name, ``choice``, scores no generations)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric '{name}' is not listed in lota.names.METRICS")
    if name == choice.METRIC:
        raise ValueError(f"metric '{name}' is lota.choice's, which scores no generations")

    def wrap(fn):
        METRICS[name] = fn
        return fn

    return wrap


def final_answer(text: str) -> str:
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    ans = lines[-1] if lines else ""
    ans = ans.rstrip(".").strip()
    if re.fullmatch(r"[-+]?[\d,]*\.?\d+", ans):
        ans = ans.replace(",", "")
        try:
            value = float(ans)
            ans = str(int(value)) if value.is_integer() else repr(value)
        except ValueError:
            pass
    return ans


def _norm(text: str) -> str:
    return " ".join(text.split())


@metric("answer")
def _answer(pred: str, ref: str) -> float:
    return float(final_answer(pred) == final_answer(ref))


@metric("exact")
def _exact(pred: str, ref: str) -> float:
    return float(_norm(pred) == _norm(ref))


@metric("contains")
def _contains(pred: str, ref: str) -> float:
    return float(_norm(ref) in _norm(pred))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int,
    batch_size: int = 16,
    show_progress: bool = True,
    ended: list[bool] | None = None,
) -> list[str]:
    """Greedy completions, batched with left padding; stops at EOS. With ``ended``, appends for
    each completion whether it stopped at EOS (rather than at ``max_new_tokens``)."""
    model.eval()
    device = device_of(model)
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    outs: list[str] = []
    bar = tqdm(
        total=len(examples),
        desc="eval",
        unit="ex",
        disable=not show_progress,
        leave=False,
        file=sys.stderr,
    )
    for i in range(0, len(examples), batch_size):
        chunk = [prompt_ids(e, tokenizer) for e in examples[i : i + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, c in enumerate(chunk):
            ids[j, width - len(c) :] = torch.tensor(c, dtype=torch.long)
            mask[j, width - len(c) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        for row in gen[:, width:].cpu():
            outs.append(tokenizer.decode(row, skip_special_tokens=True))
            if ended is not None:
                ended.append(eos is not None and bool((row == eos).any()))
        bar.update(len(chunk))
    bar.close()
    return outs


def score(predictions: list[str], examples: list[Example], metric_name: str = "answer") -> dict:
    fn = METRICS[metric_name]
    per = [
        {"line": e.line, "reference": e.completion, "prediction": p, "score": fn(p, e.completion)}
        for p, e in zip(predictions, examples)
    ]
    return {
        "metric": metric_name,
        "n": len(per),
        "score": sum(r["score"] for r in per) / max(1, len(per)),
        "examples": per,
    }


def evaluate_model(
    model,
    tokenizer,
    examples: list[Example],
    metric_name: str = "answer",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict:
    if metric_name == choice.METRIC:
        raise InputError(
            "metric 'choice' scores options by log-likelihood, not generations",
            "evaluate_model",
            "use lota.choice.evaluate_choices on lota.choice.read_choices data",
        )
    if metric_name not in METRICS:
        raise InputError(
            f"unknown metric '{metric_name}'",
            "--metric",
            f"choose one of {', '.join(sorted(METRICS))}",
        )
    preds = generate(model, tokenizer, examples, max_new_tokens, batch_size, show_progress)
    return score(preds, examples, metric_name)


def _check_prompts(model, tokenizer, examples, max_new_tokens: int) -> None:
    """Refuse a prompt of no tokens (generation needs one to start from), and a prompt that, with
    the tokens to generate, runs past the model's positions: past them a model with learned
    positions fails and a rotary one generates from positions it was never trained on."""
    positions = model_positions(model.config)
    if positions is not None and max_new_tokens >= positions:
        raise InputError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
            f"{positions} positions",
            "--max-new-tokens",
            f"use --max-new-tokens {positions // 4} or less",
        )
    for e in examples:
        n = len(prompt_ids(e, tokenizer))
        if n == 0:
            raise InputError(
                "the prompt is empty (no tokens), and generation needs at least one to start from",
                e.where,
                "give every example scored by 'lota eval' a prompt",
            )
        if positions is not None and n + max_new_tokens > positions:
            raise InputError(
                f"the prompt of {n} tokens plus --max-new-tokens {max_new_tokens} is more than "
                f"the model's {positions} positions",
                e.where,
                f"shorten the prompt or use --max-new-tokens {max(1, positions - n)} or less",
            )


def evaluate(
    model_path: str,
    data_path: str,
    metric_name: str = "answer",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    limit: int | None = None,
    show_progress: bool = True,
    deltas: list[str] | None = None,
    each: bool = False,
    allow_mismatch: bool = False,
    allow_overlap: bool = False,
    device: str = "auto",
    split: str | None = None,
    fields: Fields | None = None,
) -> dict:
    """Score ``model_path`` on ``data_path`` on ``device`` (``lota.dist.resolve_device``): by
    greedy generation, or with metric ``choice`` by the log-likelihood of each option
    (``lota.choice``). With ``deltas``, the deltas are switched into the loaded base in place
    (``DeltaBank``), no model folder is written: all of them together, or with ``each`` one after
    another on the same loaded base, giving ``{"results": [...]}``. ``data_path`` is any format
    ``lota.data.read_data`` reads (``split``: of a folder or Hub dataset with several, default
    ``test``; ``fields``: the names of the fields); with ``limit``, only the first ``limit`` rows
    are read."""
    _check_numbers(metric_name, max_new_tokens, batch_size, limit)
    deltas = _checked_deltas(deltas, each)
    where = resolve_device(device)
    by_choice = metric_name == choice.METRIC
    if by_choice:
        examples = choice.read_choices(data_path, split, fields, limit=limit)
    else:
        examples = read_data(data_path, split, fields, "test", limit, scoring=True)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=where).to(where)
    check_special_tokens(tokenizer, model, model_path, need_eos=False)
    if by_choice:
        encoded = choice.encode(examples, tokenizer, model_positions(model.config))
    else:
        _check_prompts(model, tokenizer, examples, max_new_tokens)
    bank = _delta_bank(model, deltas, each, allow_mismatch, allow_overlap) if deltas else None

    def run(active: list[str]) -> dict:
        if by_choice:
            r = choice.evaluate_choices(
                model, tokenizer, examples, batch_size, show_progress, encoded
            )
        else:
            r = evaluate_model(
                model, tokenizer, examples, metric_name, max_new_tokens, batch_size, show_progress
            )
        r["model"], r["data"], r["deltas"] = model_path, data_path, active
        return r

    if not each:
        return run(deltas)
    results = []
    for d in deltas:
        with bank.using(d):
            results.append(run([d]))
    return {"model": model_path, "data": data_path, "metric": metric_name, "results": results}


def _check_numbers(metric_name: str, max_new_tokens: int, batch_size: int, limit: int | None):
    if metric_name not in METRIC_NAMES:
        raise InputError(
            f"unknown metric '{metric_name}'",
            "--metric",
            f"choose one of {', '.join(sorted(METRIC_NAMES))}",
        )
    if max_new_tokens < 1 or batch_size < 1 or (limit is not None and limit < 1):
        raise InputError(
            "--max-new-tokens, --batch-size and --limit must be >= 1",
            "lota eval",
            "fix the numbers",
        )


def _checked_deltas(deltas: list[str] | None, each: bool) -> list[str]:
    """The deltas to switch in, each given once (``each`` needs at least one)."""
    deltas = [str(d) for d in deltas or []]
    if each and not deltas:
        raise InputError("--each needs deltas to score", "--each", "add --delta FILE (repeatable)")
    repeat = first_repeat(deltas)  # by identity: a link or another spelling is the same file
    if len(set(deltas)) != len(deltas) or repeat:
        given = f" ('{repeat[1]}' is '{repeat[0]}')" if repeat and repeat[0] != repeat[1] else ""
        raise InputError(
            f"a delta is given twice{given}, so it would be added twice",
            "--delta",
            "give each file once",
        )
    return deltas


def _delta_bank(model, deltas: list[str], each: bool, allow_mismatch: bool, allow_overlap: bool):
    """The deltas switched into the loaded ``model`` in place: every file checked before anything
    is scored; all of them active unless ``each`` activates them one at a time. Deltas on an input
    embedding tied to the output head untie it first (one more vocabulary x hidden matrix), so the
    scores are those of the folder ``lota apply`` writes."""
    from .format import Reader
    from .hotswap import DeltaBank
    from .targets import untie_embeddings

    names = set()
    for d in deltas:
        with Reader(d) as r:
            names.update(n for n in r.names if r.nnz(n))
    # as lota apply: a delta on a tied input embedding leaves the output head, given its own copy
    untie_embeddings(model, names)
    bank = DeltaBank(model, allow_overlap=allow_overlap)
    for d in deltas:  # every file is checked before anything is scored
        bank.add(d, d, allow_mismatch=allow_mismatch)
    if not each:
        bank.activate(*deltas)
    return bank
