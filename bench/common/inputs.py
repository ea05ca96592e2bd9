"""Inputs the benchmarks build: random Llama folders, short question/answer data, and the
command line or settings of a ``lota adapt`` run."""

from __future__ import annotations

import json
from pathlib import Path


def save_llama(folder: Path, reuse: bool = True, **shape):
    """A random Llama (``lota.toy.tiny_llama(**shape)``) with the byte tokenizer in ``folder``.
    Returns the model, or None when ``reuse`` and the folder holds a model already."""
    from lota.toy import byte_tokenizer, tiny_llama

    if reuse and (folder / "config.json").exists():
        return None
    model = tiny_llama(**shape)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return model


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sums_data(path: Path, n: int = 64) -> Path:
    """``n`` short prompt/completion pairs (``Q3: what is 3 plus 3?`` -> `` 6.``)."""
    rows = [
        {"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(n)
    ]
    return write_jsonl(path, rows)


def flags(**options) -> list[str]:
    """Command-line flags from keywords: ``batch_size=2`` -> ``--batch-size 2``; True -> the bare
    flag, False or None -> nothing."""
    out: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        out.append("--" + key.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out


def adapt_argv(model, data, out, *extra: str, **options) -> list[str]:
    """``lota --quiet adapt MODEL --data DATA --out OUT`` with ``options`` as flags, then
    ``extra`` (the arguments after ``lota``)."""
    argv = ["--quiet", "adapt", str(model), "--data", str(data), "--out", str(out)]
    return [*argv, *flags(**options), *extra]
