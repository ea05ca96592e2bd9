"""``lota eval --metric choice``: multiple choice scored by the log-likelihood of each option.

Each example is a prompt (or a conversation) with its options and the index of the right one. The
model's pick is the option whose tokens are most likely after the prompt's: one forward pass per
option, no generation, as lm-evaluation-harness scores ARC, BoolQ and the like. ``acc`` picks the
highest summed log-likelihood, ``acc_norm`` the highest per character of the option (its leading
whitespace, the separator from the prompt, not counted: lm-eval's ``acc_norm``).

The tokens are those ``lota adapt`` trains on: the prompt's (a conversation's through the chat
template, with the assistant's turn opened) followed by the option's, tokenized on its own as a
completion is. Invariant: an option's log-likelihood does not depend on the batch it is computed
in (right padding, masked, after every token scored).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import Example, Fields, model_positions, pad_id, prompt_ids
from .datafiles import open_rows
from .errors import InputError
from .models import device_of

METRIC = "choice"
SCHEMA = '{"prompt": str, "choices": [str, ...], "answer": int}'
_FIX = f"write each line as {SCHEMA} (or with 'messages' in place of 'prompt')"


@dataclass
class Choice:
    """One multiple-choice example: ``answer`` indexes ``choices``; ``messages`` (when given,
    instead of ``prompt``) is the conversation the options answer."""

    prompt: str
    choices: list[str]
    answer: int
    messages: list | None = None
    line: int = 0
    source: str = ""
    location: str = ""  # where it is, when that is more than ``source:line`` (a table's row)

    @property
    def where(self) -> str:
        return self.location or f"{self.source}:{self.line}"

    def context(self) -> Example:
        """The prompt as an ``Example``, whose ``prompt_ids`` are the tokens the options follow
        (a conversation's last message, here the right option, is the one the template leaves
        out, opening the assistant's turn instead)."""
        right = self.choices[self.answer]
        messages = None
        if self.messages is not None:
            messages = [*self.messages, {"role": "assistant", "content": right}]
        return Example(self.prompt, right, messages, self.line, self.source, location=self.location)


def read_choices(
    path: str,
    split: str | None = None,
    fields: Fields | None = None,
    default_split: str = "test",
    limit: int | None = None,
) -> list[Choice]:
    """The multiple-choice examples of ``--data`` in any format ``lota.datafiles`` reads (the
    first ``limit`` only), each row checked (see ``SCHEMA``; ``fields`` renames the prompt and
    messages fields)."""
    f = fields or Fields()
    rows = open_rows(path, (f.prompt, f.messages, "choices", "answer"), split, default_split, limit)
    if rows.columns is not None:
        missing = [c for c in ("choices", "answer") if c not in rows.columns]
        if f.prompt not in rows.columns and f.messages not in rows.columns:
            missing.append(f"{f.prompt}' or '{f.messages}")
        if missing:
            raise InputError(
                f"no '{missing[0]}' column (its columns: {', '.join(rows.columns)})",
                rows.label,
                f"multiple-choice rows are {SCHEMA}",
            )
    out = [_choice(obj, rows.where(n), n, rows.label, f) for _, n, obj in rows]
    if not out:
        raise InputError("data file has no examples", rows.label, f"add lines like {SCHEMA}")
    return out


def _choice(obj, where: str, number: int, source: str, f: Fields) -> Choice:
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", where, _FIX)
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        got = "missing" if choices is None else f"a {type(choices).__name__}"
        if isinstance(choices, list):
            got = f"a list of {len(choices)}"
        raise InputError(
            f"'choices' must be a list of at least two options, got {got}", where, _FIX
        )
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise InputError(f"'choices[{i}]' is a {type(c).__name__}, not a string", where, _FIX)
        if not c.strip():
            raise InputError(f"'choices[{i}]' is empty", where, "give every option some text")
    answer = obj.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool):
        got = "missing" if answer is None else repr(answer)
        raise InputError(
            f"'answer' must be the 0-based index of the right option, got {got}", where, _FIX
        )
    if not 0 <= answer < len(choices):
        raise InputError(
            f"'answer' {answer} is out of range for {len(choices)} choices",
            where,
            f"give the 0-based index of the right option, 0 to {len(choices) - 1}",
        )
    location = "" if where == f"{source}:{number}" else where
    if f.messages in obj:
        msgs = _messages(obj[f.messages], where, f.messages)
        return Choice("", choices, answer, msgs, number, source, location)
    if not isinstance(obj.get(f.prompt), str):
        raise InputError(f"missing '{f.prompt}' string (or '{f.messages}')", where, _FIX)
    return Choice(obj[f.prompt], choices, answer, None, number, source, location)


def _messages(msgs, where: str, name: str = "messages") -> list:
    if (
        not isinstance(msgs, list)
        or not msgs
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
    ):
        raise InputError(f"'{name}' must be a list of {{role, content}} objects", where, _FIX)
    if msgs[-1]["role"] == "assistant":
        raise InputError(
            "the last message has role 'assistant', but the options are the assistant's answer",
            where,
            f"end '{name}' with the turn the options answer",
        )
    return msgs


def encode(
    examples: list[Choice], tokenizer, positions: int | None
) -> list[tuple[list[int], list[list[int]]]]:
    """``(prompt ids, [option ids, ...])`` of each example. A prompt of no tokens (nothing for the
    first option token to follow) and a prompt plus option longer than the model's ``positions``
    are refused, naming the line."""
    out = []
    for e in examples:
        p = prompt_ids(e.context(), tokenizer)
        if not p:
            raise InputError(
                "the prompt is empty (no tokens), so the first token of an option has nothing "
                "to follow",
                e.where,
                "give every example a prompt",
            )
        options = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in e.choices]
        for i, o in enumerate(options):
            if not o:
                raise InputError(f"'choices[{i}]' has no tokens", e.where, "give it some text")
            if positions is not None and len(p) + len(o) > positions:
                raise InputError(
                    f"the prompt of {len(p)} tokens plus choices[{i}] of {len(o)} tokens is more "
                    f"than the model's {positions} positions",
                    e.where,
                    "shorten the prompt or the option",
                )
        out.append((p, options))
    return out


@torch.no_grad()
def loglikelihoods(
    model,
    encoded: list[tuple[list[int], list[list[int]]]],
    pad: int,
    batch_size: int = 16,
    show_progress: bool = True,
) -> list[list[float]]:
    """The summed log-probability of each option's tokens after its prompt's, ``[example][option]``.

    Every prompt + option is one row; rows of all examples, longest first (so the first batch
    shows whether memory suffices), go ``batch_size`` to a forward pass, right-padded: a row's
    positions and the tokens it attends to are those it has alone."""
    model.eval()
    device = device_of(model)
    rows = [(i, j, p, o) for i, (p, opts) in enumerate(encoded) for j, o in enumerate(opts)]
    rows.sort(key=lambda r: -(len(r[2]) + len(r[3])))  # stable: ties keep the data's order
    out = [[0.0] * len(opts) for _, opts in encoded]
    bar = tqdm(total=len(rows), desc="eval", unit="option", disable=not show_progress,
               leave=False, file=sys.stderr)  # fmt: skip
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(p) + len(o) for _, _, p, o in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (_, _, p, o) in enumerate(chunk):
            ids[r, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
            mask[r, : len(p) + len(o)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, T, V]
        for r, (i, j, p, o) in enumerate(chunk):
            # position t predicts token t + 1: the option's tokens from the prompt's last on
            span = logits[r, len(p) - 1 : len(p) + len(o) - 1].float().log_softmax(-1)  # [n, V]
            target = torch.tensor(o, device=span.device)[:, None]
            out[i][j] = span.gather(-1, target).sum().item()
        bar.update(len(chunk))
    bar.close()
    return out


def option_length(option: str) -> int:
    """What ``acc_norm`` divides by: the option's characters, leading whitespace not counted."""
    return len(option.lstrip())


def score_choices(examples: list[Choice], lls: list[list[float]]) -> dict:
    """``acc`` (the pick by summed log-likelihood) and ``acc_norm`` (by log-likelihood per
    ``option_length``), each the mean over examples; a tie goes to the first option."""
    per = []
    for e, ll in zip(examples, lls):
        norm = [x / option_length(c) for x, c in zip(ll, e.choices)]
        pick, pick_norm = ll.index(max(ll)), norm.index(max(norm))
        per.append({
            "line": e.line, "answer": e.answer, "prediction": pick, "prediction_norm": pick_norm,
            "loglikelihoods": ll, "score": float(pick == e.answer),
            "score_norm": float(pick_norm == e.answer),
        })  # fmt: skip
    n = max(1, len(per))
    acc = sum(r["score"] for r in per) / n
    return {
        "metric": METRIC,
        "n": len(per),
        "score": acc,
        "acc": acc,
        "acc_norm": sum(r["score_norm"] for r in per) / n,
        "examples": per,
    }


def evaluate_choices(
    model,
    tokenizer,
    examples: list[Choice],
    batch_size: int = 16,
    show_progress: bool = True,
    encoded: list | None = None,
) -> dict:
    """``score_choices`` of ``model`` on ``examples`` (``encoded``: their ``encode``, if done)."""
    if encoded is None:
        encoded = encode(examples, tokenizer, model_positions(model.config))
    lls = loglikelihoods(model, encoded, pad_id(tokenizer), batch_size, show_progress)
    return score_choices(examples, lls)
