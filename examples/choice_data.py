"""ARC and BoolQ rows as ``lota eval --metric choice`` data, with lm-evaluation-harness's prompts.

    python examples/choice_data.py arc_challenge/test.jsonl --out arc_test.jsonl [--chat]
    python examples/choice_data.py boolq/test.json --out boolq_test.jsonl [--chat]
    lota eval MODEL --data arc_test.jsonl --metric choice

The input is JSONL or a JSON list; each row's format is recognised by its fields:
- ARC (AI2 ARC, as the Hugging Face dataset gives it): ``{"question", "choices": {"text",
  "label"}, "answerKey"}`` becomes ``Question: {question}\\nAnswer:`` with the options
  `` {text}``, the right one the label ``answerKey`` names.
- BoolQ (the Hugging Face dataset): ``{"question", "passage", "answer": true|false}`` becomes
  ``{passage}\\nQuestion: {question}?\\nAnswer:`` with the options `` no`` and `` yes``.
- BoolQ in the LLM-Adapters format (no passage): ``{"instruction": "Please answer the following
  question with true or false, question: ...\\n\\nAnswer format: true/false", "answer":
  "true"|"false"}`` becomes ``Question: {question}\\nAnswer:`` with `` no`` and `` yes``.

Each output line is ``{"prompt": str, "choices": [str, ...], "answer": int}`` (plus the row's
``id`` where it has one). With ``--chat`` the prompt is a conversation instead, ``{"messages":
[{"role": "user", "content": question}], ...}``, which ``lota eval`` renders through the model's
chat template, and the options are the assistant's reply (no leading space).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from lota.errors import InputError
from lota.fileio import write_text

_LLM_ADAPTERS = re.compile(
    r"Please answer the following question with true or false, question: (.*)"
    r"\n\nAnswer format: true/false",
    re.S,
)


def rows(path: Path) -> list[tuple[str, object]]:
    """``(where, row)`` of each row of a JSONL file or a JSON list."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return [(f"{path}: row {i}", r) for i, r in enumerate(json.loads(text))]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append((f"{path}:{number}", json.loads(line)))
    return out


def convert(row, where: str, chat: bool = False) -> dict:
    """One ARC or BoolQ row as a ``lota eval --metric choice`` line."""
    if isinstance(row, dict) and isinstance(row.get("choices"), dict) and "answerKey" in row:
        text, labels = row["choices"].get("text"), row["choices"].get("label")
        if not isinstance(text, list) or not isinstance(labels, list) or len(text) != len(labels):
            raise InputError("'choices' needs lists 'text' and 'label' of one length", where)
        if row["answerKey"] not in labels:
            raise InputError(f"'answerKey' {row['answerKey']!r} is not one of {labels}", where)
        question, options = _text(row, "question", where), text
        answer = labels.index(row["answerKey"])
        prompt = f"Question: {question}\nAnswer:"
    elif isinstance(row, dict) and isinstance(row.get("answer"), bool) and "passage" in row:
        passage, question = _text(row, "passage", where), _text(row, "question", where)
        question = f"{passage}\nQuestion: {question}?"
        options, answer = ["no", "yes"], int(row["answer"])
        prompt = f"{question}\nAnswer:"
    elif isinstance(row, dict) and row.get("answer") in ("true", "false") and "instruction" in row:
        m = _LLM_ADAPTERS.fullmatch(_text(row, "instruction", where))
        if not m:
            raise InputError("'instruction' is not LLM-Adapters' BoolQ question", where)
        question = m.group(1).strip()
        question += "" if question.endswith("?") else "?"
        options, answer = ["no", "yes"], int(row["answer"] == "true")
        prompt = f"Question: {question}\nAnswer:"
    else:
        raise InputError(
            "not an ARC or BoolQ row",
            where,
            "give rows with question/choices/answerKey (ARC), question/passage/answer (BoolQ) "
            "or instruction/answer (BoolQ, LLM-Adapters)",
        )
    out = {"id": row["id"]} if "id" in row else {}
    if chat:
        out["messages"] = [{"role": "user", "content": question}]
        out["choices"] = list(options)
    else:
        out["prompt"] = prompt
        out["choices"] = [f" {o}" for o in options]
    out["answer"] = answer
    return out


def _text(row: dict, key: str, where: str) -> str:
    if not isinstance(row.get(key), str):
        raise InputError(f"'{key}' is not a string", where)
    return row[key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="an ARC JSONL file or a BoolQ JSON(L) file")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--chat", action="store_true", help="write the question as a user message")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    try:
        if Path(a.out).exists() and not a.force:
            raise InputError("exists", a.out, "pass --force to replace it")
        lines = [convert(row, where, a.chat) for where, row in rows(Path(a.data))]
        write_text(a.out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    except (InputError, OSError, ValueError) as e:
        print(f"choice_data: {e.line() if isinstance(e, InputError) else e}", file=sys.stderr)
        return 2
    print(f"choice_data: {len(lines)} examples -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
