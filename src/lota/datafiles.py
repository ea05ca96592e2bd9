"""Where ``--data``'s rows come from: JSONL read line by line by lota itself, and through the
``datasets`` library a JSON array, CSV (or TSV), Parquet, a ``save_to_disk`` folder or a dataset
on the Hugging Face Hub, as an Arrow table memory-mapped from disk.

A table (``JsonlRows``, ``ArrowRows``) is read in order (iteration gives ``(key, number, row)``)
and any row is read again by its key (``at``): a JSONL line by its byte offset, an Arrow row by
its index. Nothing here holds the rows in memory; a caller keeps the keys it needs.

JSONL is untrusted input read line by line, never whole: a line is refused when it is longer than
``MAX_LINE_CHARS``, nested deeper than ``MAX_DEPTH``, or holds a value Python's JSON parser
accepts but lota cannot use (a lone surrogate escape, an integer past Python's digit limit).

The other formats are parsed by ``datasets``: a file is converted once into an Arrow file in
``datasets``' cache (``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``), never
beside the data, and reused while the file is unchanged; a ``save_to_disk`` folder is mapped
where it is. Nothing is unpickled or run: those files are Arrow and JSON, and ``datasets`` (>= 4)
runs no loading scripts. ``datasets`` is imported only for those formats.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .format import json_nesting
from .input_files import check_folder_files, check_input_file

MAX_LINE_CHARS = 16 * 2**20  # far beyond any example that fits a model's positions
MAX_DEPTH = 64  # TRL's formats need 3 levels; tool calls and metadata a few more
HUB_SECONDS = 10.0  # how long the Hub may take to say whether a dataset exists
_ARROW_BATCH = 512  # rows converted to Python at a time when a table is read in order

# {suffix: format read through datasets}; any other file is JSONL (a .json file too, unless it
# starts with "[": then it is one JSON array)
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".json": "json"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz")


@dataclass(frozen=True)
class Fields:
    """The names of the fields (columns) an example is read from: TRL's by default."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"

    @classmethod
    def of(cls, settings) -> Fields:
        """The fields named by a command's settings (``--prompt-field`` and the others)."""
        return cls(
            settings.prompt_field,
            settings.completion_field,
            settings.messages_field,
            settings.text_field,
        )


def open_rows(
    path: str | os.PathLike,
    wanted: tuple[str, ...],
    split: str | None = None,
    default_split: str = "train",
    limit: int | None = None,
) -> JsonlRows | ArrowRows:
    """The rows of ``--data``: a file, a ``save_to_disk`` folder (``split``, else
    ``default_split``, of one that holds several) or a Hub dataset name; the first ``limit`` rows
    only when given. ``wanted``: the columns a caller reads (an Arrow table maps no others)."""
    p = Path(path)
    if not p.exists():
        if _HUB_NAME.fullmatch(str(path)) and not str(path).lower().endswith(_FILE_SUFFIXES):
            ds, label = _hub(str(path), split or default_split, limit)
            return ArrowRows(ds, label, wanted, limit)
        raise InputError("data file not found", str(path), "check the path given to --data")
    if p.is_dir():
        ds, label = _folder(p, split, default_split)
        return ArrowRows(ds, label, wanted, limit)
    check_input_file(p, "data file")
    kind = _kind(p)
    if split is not None:
        raise InputError(
            f"--split {split} is for datasets folders and Hub datasets, which hold several "
            "splits; a data file is one table",
            str(p),
            "drop --split",
        )
    if kind == "jsonl":
        return JsonlRows(p, limit)
    return ArrowRows(_load_file(p, kind), str(p), wanted, limit)


# ---------------------------------------------------------------------------- JSONL
class JsonlRows:
    """The non-blank lines of a JSONL file, each parsed and checked (``json_lines``); a row's key
    is its byte offset. The file must not change while it is read."""

    def __init__(self, path: Path, limit: int | None = None):
        self.path, self.label, self.limit, self.columns = path, str(path), limit, None
        self._stat = _identity(path)

    def where(self, number: int) -> str:
        return f"{self.path}:{number}"

    def __iter__(self) -> Iterator[tuple[int, int, object]]:
        return itertools.islice(_json_lines(self.path), self.limit)  # no line past the limit

    def at(self, offset: int, number: int) -> object:
        if _identity(self.path) != self._stat:
            raise InputError(
                "the data file changed while lota was reading it",
                str(self.path),
                "leave the data file unchanged during a run",
            )
        with _open(self.path) as f:
            f.seek(offset)
            for _, text in _lines(f, self.path, number - 1):
                return _parse_line(text, self.where(number))
        raise InputError("the data file ended early", self.where(number), "rerun")


def _identity(path: Path) -> tuple[int, int, int]:
    s = path.stat()
    return s.st_ino, s.st_size, s.st_mtime_ns


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """``(line number, parsed JSON)`` of each non-blank line of a data file, read line by line: no
    line longer than ``MAX_LINE_CHARS`` is ever held whole, and a FIFO or device is refused before
    it is opened."""
    for _, number, obj in _json_lines(Path(path)):
        yield number, obj


def _json_lines(path: Path) -> Iterator[tuple[int, int, object]]:
    """``(byte offset, line number, parsed JSON)`` of each non-blank line."""
    if not path.exists():
        raise InputError("data file not found", str(path), "check the path given to --data")
    if path.is_dir():
        raise InputError("data path is a folder", str(path), "pass a .jsonl file")
    check_input_file(path, "data file")
    with _open(path) as f:
        offset = 0
        for number, text, size in _sized_lines(f, path):
            if text.strip():
                yield offset, number, _parse_line(text, f"{path}:{number}")
            offset += size


@contextlib.contextmanager
def _open(path: Path):
    try:
        f = path.open("rb")
    except PermissionError:
        raise InputError(
            "cannot read the data file (permission denied)", str(path), "fix its permissions"
        ) from None
    with f:
        yield f


_MAX_LINE_BYTES = 4 * MAX_LINE_CHARS  # UTF-8 spends at most 4 bytes on a character


def _lines(f, path: Path, before: int = 0) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of a binary file, each read with a bound on its size;
    ``before``: the lines before the file's position."""
    for number, text, _ in _sized_lines(f, path, before):
        yield number, text


def _sized_lines(f, path: Path, before: int = 0) -> Iterator[tuple[int, str, int]]:
    number = before
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
        yield number, text, len(chunk)


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
        raise InputError(
            f"the JSON is nested more than {MAX_DEPTH} levels deep",
            where,
            "each line must be one example: prompt/completion strings or a messages list",
        )
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


# ---------------------------------------------------------------------------- Arrow tables
class ArrowRows:
    """The rows of a ``datasets.Dataset`` (an Arrow table mapped from disk), the columns a caller
    reads only; a row's key is its index. ``columns``: every column the table has. A null value
    is left out of its row (as a key absent from a JSON line), and so is a null field of a
    message (Arrow gives every message of a column the same fields)."""

    def __init__(self, ds, label: str, wanted: tuple[str, ...], limit: int | None = None):
        self.columns = list(ds.column_names)
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        self.ds = ds.select_columns([c for c in self.columns if c in wanted])
        self.label = label

    def where(self, number: int) -> str:
        return f"{self.label} row {number}"

    def __iter__(self) -> Iterator[tuple[int, int, object]]:
        for start in range(0, len(self.ds), _ARROW_BATCH):
            batch = self.ds[start : start + _ARROW_BATCH]
            names = list(batch)
            for i, values in enumerate(zip(*batch.values()), start):
                yield i, i + 1, self._row(dict(zip(names, values)), i + 1)

    def at(self, index: int, number: int) -> object:
        return self._row(self.ds[index], number)

    def _row(self, row: dict, number: int) -> dict:
        out = {k: _present(v) for k, v in row.items() if v is not None}
        size = _chars(out)
        if size > MAX_LINE_CHARS:
            raise InputError(
                f"the row holds {size:,} characters, more than the {MAX_LINE_CHARS:,} lota reads "
                "as one example",
                self.where(number),
                "shorten or split the example",
            )
        return out


def _present(value):
    if isinstance(value, list):
        return [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
            for m in value
        ]
    return value


def _chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _kind(path: Path) -> str:
    kind = _SUFFIXES.get(path.suffix.lower(), "jsonl")
    if kind == "json":  # a JSON array, or JSON lines under a .json name
        with _open(path) as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        kind = "json" if head.startswith(b"[") else "jsonl"
    return kind


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` without its progress bars and info logging, restored afterwards."""
    import datasets
    from datasets.utils import logging as dlog

    bars, level = datasets.is_progress_bar_enabled(), dlog.get_verbosity()
    datasets.disable_progress_bars()
    dlog.set_verbosity_error()
    try:
        yield datasets
    finally:
        dlog.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _load_file(path: Path, kind: str):
    """A JSON array, CSV, TSV or Parquet file as a ``datasets.Dataset``, through datasets' cache.
    CSV values are read as the text they are ("NA", "007" and an empty cell stay strings)."""
    with _quiet_datasets() as datasets:
        try:
            if kind == "parquet":
                return datasets.Dataset.from_parquet(str(path))
            if kind == "json":
                return datasets.Dataset.from_json(str(path))
            sep = "\t" if kind == "tsv" else ","
            features = datasets.Features(
                {c: datasets.Value("string") for c in _csv_header(path, sep)}
            )
            return datasets.Dataset.from_csv(
                str(path), sep=sep, features=features, keep_default_na=False, na_filter=False
            )
        except InputError:
            raise
        except Exception as e:  # pyarrow's and pandas' many errors: the file is not readable
            raise InputError(
                f"cannot read the {kind.upper()} file ({_reason(e)})",
                str(path),
                f"check that it is a valid {kind.upper()} file",
            ) from None


def _csv_header(path: Path, sep: str) -> list[str]:
    with _open(path) as f:
        line = f.readline(2**20).decode("utf-8-sig", errors="replace")
    names = next(csv.reader([line], delimiter=sep), [])
    if not names or not any(n.strip() for n in names):
        raise InputError(
            "the file has no header row naming its columns",
            str(path),
            "write the column names (e.g. prompt,completion) on the first line",
        )
    return names


def _reason(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}".rstrip(": ")


def _folder(path: Path, split: str | None, default_split: str):
    """A folder written by ``save_to_disk``: one dataset, or one split of a ``DatasetDict``."""
    if (path / "dataset_dict.json").is_file():
        splits = _splits(path)
        name = split or default_split
        if name not in splits:
            raise InputError(
                f"the datasets folder has no split '{name}' (it has {', '.join(splits) or 'none'})",
                str(path),
                "choose one with --split",
            )
        return _load_folder(path / name, name), f"{path} [{name}]"
    if not (path / "state.json").is_file():
        raise InputError(
            "data path is a folder, but not one written by datasets' save_to_disk (it has no "
            "dataset_dict.json or state.json)",
            str(path),
            "pass a data file (JSONL, JSON, CSV, Parquet) or a folder saved with save_to_disk",
        )
    if split is not None:
        raise InputError(
            f"--split {split}: the datasets folder holds one dataset, not several splits",
            str(path),
            "drop --split",
        )
    return _load_folder(path, None), str(path)


def _splits(path: Path) -> list[str]:
    check_input_file(path / "dataset_dict.json", "datasets folder's dataset_dict.json")
    try:
        with _open(path / "dataset_dict.json") as f:
            splits = json.loads(f.read(2**20))["splits"]
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise ValueError("'splits' is not a list of names")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"the datasets folder's dataset_dict.json is not readable ({_reason(e)})",
            str(path),
            "write the folder again with save_to_disk",
        ) from None
    return [s for s in splits if (path / s / "state.json").is_file()]


def _load_folder(path: Path, split: str | None):
    check_folder_files(path, "datasets folder")
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged folder: its JSON or Arrow files
            raise InputError(
                f"cannot read the datasets folder ({_reason(e)})",
                str(path),
                "write it again with save_to_disk",
            ) from None
    if not isinstance(ds, datasets.Dataset):
        raise InputError(
            "the datasets folder is not one dataset", str(path), "pass the folder of one split"
        )
    return ds


def _hub(name: str, split: str, limit: int | None):
    """The ``split`` of the Hub dataset ``name`` (its first ``limit`` rows), after asking the Hub,
    within ``HUB_SECONDS``, whether it exists: unreachable or unknown is one line, not a wait."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    where = f"--data {name}"
    fix = "give a local file or folder, or a dataset name on the Hugging Face Hub"
    if constants.HF_HUB_OFFLINE:
        raise InputError(
            "no such file or folder, and the Hugging Face Hub is not reachable to look for a "
            "dataset of that name (HF_HUB_OFFLINE is set)",
            where,
            fix,
        )
    try:
        HfApi().dataset_info(name, timeout=HUB_SECONDS)
    except RepositoryNotFoundError:
        raise InputError(
            "no such file or folder, and no dataset of that name on the Hugging Face Hub",
            where,
            fix,
        ) from None
    except Exception as e:  # DNS, refused connections, timeouts, proxies: no answer
        raise InputError(
            "no such file or folder, and the Hugging Face Hub could not be reached to look for "
            f"a dataset of that name ({_reason(e)})",
            where,
            fix,
        ) from None
    with _quiet_datasets() as datasets:
        try:  # datasets >= 4 runs no loading scripts: a dataset that needs one is refused
            ds = datasets.load_dataset(name, split=f"{split}[:{limit}]" if limit else split)
        except Exception as e:
            raise InputError(f"cannot load the Hub dataset ({_reason(e)})", where, fix) from None
    return ds, f"{name} [{split}]"
