"""Task data: JSONL in the formats TRL uses, tokenized with the loss on completion tokens only.

Each line is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
whose last message is the assistant's answer (the rest goes through the tokenizer's chat
template). Every problem is reported with the file and line number.

Data and chat templates are untrusted input: the file is read line by line, never whole; a line
is refused when it is longer than ``MAX_LINE_CHARS``, nested deeper than ``MAX_DEPTH``, or holds a
value Python's JSON parser accepts but lota cannot use (a lone surrogate escape, an integer past
Python's digit limit); a chat template that fails, or that runs longer than ``TEMPLATE_SECONDS``
on one conversation, is bad input, not a lota failure.
Examples are cut to the model's positions as they are to ``--max-length``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .format import json_nesting
from .input_files import check_input_file

IGNORE = -100
MAX_LINE_CHARS = 16 * 2**20  # far beyond any example that fits a model's positions
MAX_DEPTH = 64  # TRL's formats need 3 levels; tool calls and metadata a few more
TEMPLATE_SECONDS = 5.0  # a chat template renders one conversation in milliseconds
DEFAULT_MAX_LENGTH = 512


@dataclass
class Example:
    prompt: str
    completion: str
    messages: list | None = None
    line: int = 0
    source: str = ""  # the data file, for messages that name the line


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """The examples of a JSONL file, read line by line (see ``json_lines``)."""
    examples = []
    for number, obj in json_lines(path):
        example = _example(obj, f"{path}:{number}", number)
        example.source = str(path)
        examples.append(example)
    if not examples:
        raise InputError(
            "data file has no examples",
            str(path),
            'add lines like {"prompt": "...", "completion": "..."}',
        )
    return examples


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON)`` of each non-blank line of a data file, read line by line: no
    line longer than ``MAX_LINE_CHARS`` is ever held whole, and a FIFO or device is refused before
    it is opened."""
    path = Path(path)
    if not path.exists():
        raise InputError("data file not found", str(path), "check the path given to --data")
    if path.is_dir():
        raise InputError("data path is a folder", str(path), "pass a .jsonl file")
    check_input_file(path, "data file")
    try:
        f = path.open("rb")
    except PermissionError:
        raise InputError(
            "cannot read the data file (permission denied)", str(path), "fix its permissions"
        ) from None
    with f:
        for number, raw in _lines(f, path):
            if raw.strip():
                yield number, _parse_line(raw, f"{path}:{number}")


_MAX_LINE_BYTES = 4 * MAX_LINE_CHARS  # UTF-8 spends at most 4 bytes on a character


def _lines(f, path: Path) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of a binary file, each read with a bound on its size."""
    number = 0
    while chunk := f.readline(_MAX_LINE_BYTES + 1):
        number += 1
        where = f"{path}:{number}"
        if len(chunk) > _MAX_LINE_BYTES:
            raise _too_long(f"more than {_MAX_LINE_BYTES:,} bytes", where)
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(
                f"the line is not UTF-8 text (byte {e.start + 1} of the line)",
                where,
                "save the data file as UTF-8 JSONL",
            ) from None
        text = text.removesuffix("\n").removesuffix("\r")
        if len(text) > MAX_LINE_CHARS:
            raise _too_long(f"{len(text):,} characters", where)
        yield number, text


def _too_long(length: str, where: str) -> InputError:
    return InputError(
        f"the line is {length} long, more than the {MAX_LINE_CHARS:,} characters lota reads as "
        "one example",
        where,
        "shorten or split the example",
    )


# A "\uD800"-"\uDFFF" escape: JSON allows one alone, but it is half of a pair, no character.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_line(raw: str, where: str):
    """One line's JSON, refused (naming the line) before it can reach a parser's or a
    tokenizer's limits: nesting deeper than ``MAX_DEPTH``, a number beyond Python's integer
    digits, a string holding half a surrogate pair (it has no UTF-8 form)."""
    if json_nesting(raw) > MAX_DEPTH:  # before parsing: no recursion to exhaust
        raise _too_deep(where)
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(
            f"invalid JSON ({e.msg} at column {e.colno})",
            where,
            "each line must be one JSON object",
        ) from None
    except ValueError:  # an integer longer than int(str) converts
        raise InputError(
            f"the line holds a number of more than {sys.get_int_max_str_digits():,} digits",
            where,
            "write such a number as a string",
        ) from None
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(obj):
        raise InputError(
            "the line holds a lone surrogate escape (\\ud800 to \\udfff): half of a pair, "
            "not a character, with no UTF-8 form",
            where,
            "write the character itself, or escape it as a full surrogate pair",
        )
    return obj


def _has_lone_surrogate(obj) -> bool:
    """Whether any string (key or value) in parsed JSON holds an unpaired surrogate (the parser
    joins a valid pair into one character, so any surrogate left is unpaired)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def _too_deep(where: str) -> InputError:
    return InputError(
        f"the JSON is nested more than {MAX_DEPTH} levels deep",
        where,
        "each line must be one example: prompt/completion strings or a messages list",
    )


def _example(obj, where: str, number: int) -> Example:
    fix = 'use {"prompt": str, "completion": str} or {"messages": [{"role": ..., "content": ...}, ...]}'
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", where, fix)
    if "messages" in obj:
        msgs = obj["messages"]
        if (
            not isinstance(msgs, list)
            or len(msgs) < 2
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise InputError(
                "'messages' must be a list of at least two {role, content} objects", where, fix
            )
        if msgs[-1]["role"] != "assistant":
            raise InputError(
                f"the last message has role '{msgs[-1]['role']}', not 'assistant'",
                where,
                "end each conversation with the assistant's answer",
            )
        return Example(prompt="", completion=msgs[-1]["content"], messages=msgs, line=number)
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InputError("missing 'prompt' and 'completion' strings", where, fix)
    if not completion:
        raise InputError(
            "'completion' is empty", where, "every example needs a completion to learn"
        )
    return Example(prompt=prompt, completion=completion, line=number)


class _TemplateTimeout(Exception):
    """Raised inside a chat template's render when it runs past ``TEMPLATE_SECONDS``."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Interrupt the code inside after ``seconds`` with ``_TemplateTimeout``.

    A worker thread could not stop a render, so the render itself is interrupted: by SIGALRM on
    the main thread (no cost while it runs), elsewhere by a trace function that checks the clock
    on every line. A caller's own alarm and handler are restored afterwards. Only Python code is
    interrupted: a single C call that never returns (a huge integer power) is not.
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(
        signal, "setitimer"
    ):
        deadline = time.monotonic() + seconds

        def trace(frame, event, arg):
            if time.monotonic() > deadline:
                raise _TemplateTimeout
            return trace

        previous_trace = sys.gettrace()
        sys.settrace(trace)
        try:
            yield
        finally:
            sys.settrace(previous_trace)
        return
    armed = [True]

    def expire(signum, frame):
        if armed[0]:  # an alarm arriving after the render finished is dropped
            raise _TemplateTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        try:
            yield
        finally:
            armed[0] = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:  # the caller's alarm, with the time it has left
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), outer_interval)


def _where(example: Example) -> str:
    return f"{example.source}:{example.line}" if example.source else f"line {example.line}"


def _render_chat(example: Example, tokenizer) -> str:
    """The prompt of a conversation through the tokenizer's chat template, which is untrusted:
    whatever goes wrong inside it is bad input, named by the data line and the template."""
    where = _where(example)
    template = f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}"
    fix = "fix or replace the model's chat template, or use prompt/completion data"
    try:
        with _time_limit(TEMPLATE_SECONDS):
            text = tokenizer.apply_chat_template(
                example.messages[:-1], tokenize=False, add_generation_prompt=True
            )
    except _TemplateTimeout:
        raise InputError(
            f"{template} takes longer than {TEMPLATE_SECONDS:g} seconds to render", where, fix
        ) from None
    except Exception as e:  # whatever the template raises is the template's fault, not lota's
        import jinja2

        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        if isinstance(e, jinja2.exceptions.SecurityError):
            raise InputError(
                f"{template} did something its sandbox forbids ({reason})", where, fix
            ) from None
        raise InputError(f"{template} failed on this conversation ({reason})", where, fix) from None
    if len(text) > MAX_LINE_CHARS:  # the time limit does not cover tokenizing what it wrote
        raise InputError(
            f"{template} renders this conversation as {len(text):,} characters, more than the "
            f"{MAX_LINE_CHARS:,} lota reads as one example",
            where,
            fix,
        )
    return text


def prompt_ids(example: Example, tokenizer) -> list[int]:
    """Token ids of the prompt, through the chat template for conversations."""
    if example.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "conversation data needs a chat template, and the tokenizer has none",
                _where(example),
                "use prompt/completion data or a tokenizer with a chat_template",
            )
        text = _render_chat(example, tokenizer)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(example.prompt)["input_ids"]


def model_positions(config) -> int | None:
    """How many positions the model has (learned or rotary), from its config; None if unbounded."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_max_length(max_length: int | None, positions: int | None) -> int:
    """The tokens per example: ``max_length``, or by default 512 or the model's positions if
    fewer. A ``max_length`` beyond the positions is refused: past them a model with learned
    positions fails and a rotary one trains on positions it was never made for."""
    if max_length is None:
        return min(DEFAULT_MAX_LENGTH, positions) if positions else DEFAULT_MAX_LENGTH
    if positions is not None and max_length > positions:
        raise InputError(
            f"--max-length {max_length} is more than the model's {positions} positions",
            "--max-length",
            f"use --max-length {positions} or less",
        )
    return max_length


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize(
    examples: list[Example],
    tokenizer,
    max_length: int,
    where: str = "data",
    positions: int | None = None,
) -> list[Tokenized]:
    """Prompt + completion + EOS; labels are -100 on the prompt. Long completions are truncated,
    examples whose prompt alone fills ``max_length`` are dropped; all dropped is an error.
    ``positions`` (the model's) only makes that error say that ``max_length`` cannot grow."""
    out = []
    eos = tokenizer.eos_token_id
    for ex in examples:
        p = prompt_ids(ex, tokenizer)
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + (
            [eos] if eos is not None else []
        )
        if len(p) >= max_length:
            continue
        c = c[: max_length - len(p)]
        out.append(Tokenized(input_ids=p + c, labels=[IGNORE] * len(p) + c))
    if not out:
        if positions is not None and max_length >= positions:
            raise InputError(
                f"all {len(examples)} examples have prompts of at least {max_length} tokens, "
                f"and the model has only {positions} positions",
                where,
                "shorten the prompts",
            )
        raise InputError(
            f"all {len(examples)} examples have prompts of at least --max-length {max_length} tokens",
            where,
            "raise --max-length or shorten the prompts",
        )
    return out


def pad_id(tokenizer) -> int:
    """The id padded positions get: the pad token, else end-of-sequence, else 0. Padding is
    masked out of attention and ignored by the loss, so any token of the vocabulary serves."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def collate(batch: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(t.input_ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, t in enumerate(batch):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


GROUP_WINDOW = 64  # batches whose examples are sorted by length together, with --group-by-length


def batches(
    data: list[Tokenized],
    batch_size: int,
    seed: int,
    pad_id: int,
    skip: int = 0,
    group_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs of padded batches; the order depends only on ``seed``.

    ``skip`` batches are passed over first (without building them), so a resumed run sees exactly
    the batches an uninterrupted run would have seen next. ``group_by_length``: each window of
    ``GROUP_WINDOW`` batches of the shuffled epoch is sorted by length, cut into batches, and
    those batches are shuffled, so a batch pads to a length near its own examples' (each epoch
    still visits every example once, and batches still come in a random order).
    """
    rng = random.Random(seed)
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if len(chunks[-1]) < batch_size and len(order) >= batch_size:
            chunks[-1] = chunks[-1] + order[: batch_size - len(chunks[-1])]
        if group_by_length:
            chunks = _grouped(chunks, data, batch_size, rng)
        for chunk in chunks:
            if skip:
                skip -= 1
                continue
            yield collate([data[j] for j in chunk], pad_id)


def _grouped(chunks: list[list[int]], data, batch_size: int, rng: random.Random) -> list[list[int]]:
    out = []
    for w in range(0, len(chunks), GROUP_WINDOW):
        window = [j for chunk in chunks[w : w + GROUP_WINDOW] for j in chunk]
        window.sort(key=lambda j: -len(data[j].input_ids))  # stable: ties keep the shuffled order
        group = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(group)
        out += group
    return out


def steps_for(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        return steps
    per_epoch = max(1, -(-n_examples // batch_size))
    return max(1, round((epochs if epochs is not None else 1.0) * per_epoch))
