"""Task data in the formats TRL uses, tokenized with the loss on completion tokens only.

Each row is ``{"prompt": str, "completion": str}``, ``{"messages": [{"role", "content"}, ...]}``
whose last message is the assistant's answer (the rest goes through the tokenizer's chat
template), or ``{"text": str}``, trained with the loss on every token (continued pretraining);
``Fields`` renames the fields. The rows come from any format ``lota.datafiles`` reads (JSONL,
JSON, CSV, Parquet, a ``datasets`` folder, the Hub); every problem is reported with the file and
the line (or row).

Memory does not grow with the data: ``read_data`` checks every row once and keeps only where each
one is; ``TokenizedData`` tokenizes each once and keeps only which are kept and their lengths; an
example is read and tokenized again when a batch needs it.

Chat templates are untrusted input: a template that fails, or that runs longer than
``TEMPLATE_SECONDS`` on one conversation, is bad input, not a lota failure.
Examples are cut to the model's positions as they are to ``--max-length``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .batching import IGNORE, Tokenized
from .batching import batches as batches  # the data's batches, named here too
from .batching import collate as collate
from .batching import pad_id as pad_id
from .batching import steps_for as steps_for
from .datafiles import MAX_DEPTH as MAX_DEPTH  # the reader's limits, named here too
from .datafiles import MAX_LINE_CHARS, Fields, open_rows
from .datafiles import json_lines as json_lines
from .errors import InputError

TEMPLATE_SECONDS = 5.0  # a chat template renders one conversation in milliseconds
DEFAULT_MAX_LENGTH = 512


@dataclass
class Example:
    """One example: a prompt and its completion, a conversation (``messages``, whose last
    message is ``completion``), or a plain ``text`` trained on every token (prompt and completion
    empty). ``line`` is its line (its row, for formats other than JSONL) in ``source``;
    ``location`` says where it is when that is more than ``source:line``."""

    prompt: str
    completion: str
    messages: list | None = None
    line: int = 0
    source: str = ""  # the data file, for messages that name the line
    text: str | None = None
    location: str = ""

    @property
    def where(self) -> str:
        if self.location:
            return self.location
        return f"{self.source}:{self.line}" if self.source else f"line {self.line}"


def read_data(
    path: str | os.PathLike,
    split: str | None = None,
    fields: Fields | None = None,
    default_split: str = "train",
    limit: int | None = None,
    scoring: bool = False,
) -> Examples:
    """The examples of ``--data`` in any format ``lota.datafiles`` reads, every row checked (see
    ``open_rows`` for ``split``, ``default_split`` and ``limit``). ``scoring``: the examples will
    be scored against their completions, so a plain-text row is refused."""
    fields = fields or Fields()
    wanted = (fields.prompt, fields.completion, fields.messages, fields.text)
    rows = open_rows(path, wanted, split, default_split, limit)
    _check_columns(rows, fields, scoring)
    return Examples(rows, fields, scoring)


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """The examples of a data file as a list (``read_data`` reads them without one)."""
    return list(read_data(path))


class Examples(Sequence):
    """The examples of a table of rows, each row checked once in order; an example is read again
    from its row when it is asked for, so only where each row is stays in memory."""

    def __init__(self, rows, fields: Fields, scoring: bool = False):
        self.rows, self.fields, self.scoring = rows, fields, scoring
        self._keys, self._numbers = Counting(0), Counting(1)
        for key, number, obj in rows:
            _example(obj, rows.where(number), number, fields, scoring)
            self._keys.append(key)
            self._numbers.append(number)
        if not self._keys:
            raise InputError(
                "data file has no examples",
                rows.label,
                'add lines like {"prompt": "...", "completion": "..."}',
            )

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        number = self._numbers[i]
        return self._example(self.rows.at(self._keys[i], number), number)

    def __iter__(self) -> Iterator[Example]:
        """The examples in order, read in one pass over the rows."""
        for n, (_, number, obj) in enumerate(self.rows):
            if n >= len(self):
                return
            yield self._example(obj, number)

    def _example(self, obj, number: int) -> Example:
        where = self.rows.where(number)
        example = _example(obj, where, number, self.fields, self.scoring)
        example.source = self.rows.label
        if where != f"{self.rows.label}:{number}":
            example.location = where
        return example


def _check_columns(rows, fields: Fields, scoring: bool) -> None:
    """A table (CSV, Parquet, a datasets folder) has the columns of at least one kind of example
    (a JSONL file is checked line by line)."""
    cols = rows.columns
    if cols is None:
        return
    found = f"(its columns: {', '.join(cols) or 'none'})"
    fix = "name the columns with --prompt-field and --completion-field, --messages-field"
    if scoring:
        if fields.messages in cols or (fields.prompt in cols and fields.completion in cols):
            return
        if fields.text in cols:
            raise InputError(
                f"the data has a '{fields.text}' column but no completions to score {found}",
                rows.label,
                "lota eval scores prompt/completion or messages data; text rows only train",
            )
    elif {fields.messages, fields.text} & set(cols) or {fields.prompt, fields.completion} <= set(
        cols
    ):
        return
    if fields.prompt in cols or fields.completion in cols:
        have, lack = (
            (fields.prompt, fields.completion)
            if fields.prompt in cols
            else (fields.completion, fields.prompt)
        )
        raise InputError(f"no '{lack}' column beside '{have}' {found}", rows.label, fix)
    kinds = f"'{fields.prompt}' and '{fields.completion}', or '{fields.messages}'"
    if not scoring:
        kinds += f", or '{fields.text}'"
    raise InputError(
        f"no {kinds} column {found}", rows.label, fix + ("" if scoring else " or --text-field")
    )


def _example(
    obj, where: str, number: int, fields: Fields | None = None, scoring: bool = False
) -> Example:
    f = fields or Fields()
    fix = (
        f'use {{"{f.prompt}": str, "{f.completion}": str}}, '
        f'{{"{f.messages}": [{{"role": ..., "content": ...}}, ...]}} or {{"{f.text}": str}}'
    )
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}", where, fix)
    if f.messages in obj:
        msgs = obj[f.messages]
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
                f"'{f.messages}' must be a list of at least two {{role, content}} objects",
                where,
                fix,
            )
        if msgs[-1]["role"] != "assistant":
            raise InputError(
                f"the last message has role '{msgs[-1]['role']}', not 'assistant'",
                where,
                "end each conversation with the assistant's answer",
            )
        return Example(prompt="", completion=msgs[-1]["content"], messages=msgs, line=number)
    if f.text in obj and f.prompt not in obj and f.completion not in obj:
        return _text_example(obj[f.text], where, number, f, scoring)
    prompt, completion = obj.get(f.prompt), obj.get(f.completion)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise InputError(f"missing '{f.prompt}' and '{f.completion}' strings", where, fix)
    if not completion:
        raise InputError(
            f"'{f.completion}' is empty", where, "every example needs a completion to learn"
        )
    return Example(prompt=prompt, completion=completion, line=number)


def _text_example(text, where: str, number: int, f: Fields, scoring: bool) -> Example:
    """A plain-text row (TRL's language-modeling format): the loss is on every token."""
    if scoring:
        raise InputError(
            f"a '{f.text}' row has no completion to score",
            where,
            "lota eval scores prompt/completion or messages rows; text rows only train",
        )
    if not isinstance(text, str) or not text:
        got = "empty" if text == "" else f"a {type(text).__name__}"
        raise InputError(
            f"'{f.text}' must be a string with some text, got {got}",
            where,
            "give each text row some text",
        )
    return Example(prompt="", completion="", line=number, text=text)


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


def _render_chat(example: Example, tokenizer) -> str:
    """The prompt of a conversation through the tokenizer's chat template, which is untrusted:
    whatever goes wrong inside it is bad input, named by the data line and the template."""
    where = example.where
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
                example.where,
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


def encode(example: Example, tokenizer, max_length: int) -> Tokenized | None:
    """Prompt + completion + EOS with labels -100 on the prompt; a text row is its tokens + EOS
    with labels on every token. A long completion (or text) is truncated; an example whose prompt
    alone fills ``max_length`` is dropped (None)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.text is not None:
        ids = (tokenizer(example.text)["input_ids"] + eos)[:max_length]
        return Tokenized(input_ids=ids, labels=list(ids))
    p = prompt_ids(example, tokenizer)
    if len(p) >= max_length:
        return None
    c = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + eos
    c = c[: max_length - len(p)]
    return Tokenized(input_ids=p + c, labels=[IGNORE] * len(p) + c)


def encoded(
    examples, tokenizer, max_length: int, where: str = "data", positions: int | None = None
) -> Iterator[tuple[int, Tokenized]]:
    """``(index, tokenized)`` of each example ``encode`` keeps, in order; all dropped is an
    error. ``positions`` (the model's) only makes that error say that ``max_length`` cannot
    grow."""
    n = -1
    kept = False
    for n, ex in enumerate(examples):
        t = encode(ex, tokenizer, max_length)
        if t is not None:
            kept = True
            yield n, t
    if kept:
        return
    if positions is not None and max_length >= positions:
        raise InputError(
            f"all {n + 1} examples have prompts of at least {max_length} tokens, "
            f"and the model has only {positions} positions",
            where,
            "shorten the prompts",
        )
    raise InputError(
        f"all {n + 1} examples have prompts of at least --max-length {max_length} tokens",
        where,
        "raise --max-length or shorten the prompts",
    )


def tokenize(
    examples: Sequence[Example],
    tokenizer,
    max_length: int,
    where: str = "data",
    positions: int | None = None,
) -> list[Tokenized]:
    """Every example ``encode`` keeps, as a list (``tokenized`` keeps none in memory)."""
    return [t for _, t in encoded(examples, tokenizer, max_length, where, positions)]


class Counting:
    """Increasing integers appended one by one, held in an array only from the first one that
    is not its index + ``start``: a table's row numbers, the examples kept, cost nothing while
    they simply count."""

    def __init__(self, start: int):
        self.start, self.n, self.values = start, 0, None

    def append(self, value: int) -> None:
        if self.values is None and value != self.n + self.start:
            self.values = array("q", range(self.start, self.n + self.start))
        if self.values is not None:
            self.values.append(value)
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        if self.values is not None:
            return self.values[i]
        return (i % self.n) + self.start


class TokenizedData(Sequence):
    """The examples ``encode`` keeps, each tokenized once in order to learn which are kept and
    their lengths (``lengths``), and again when it is asked for: only those numbers stay in
    memory. Equal, item for item, to ``tokenize``'s list."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int, **kw):
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length
        self._kept, self.lengths = Counting(0), array("I")
        for i, t in encoded(examples, tokenizer, max_length, **kw):
            self._kept.append(i)
            self.lengths.append(len(t.input_ids))

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, i) -> Tokenized:
        return encode(self.examples[self._kept[i]], self.tokenizer, self.max_length)
