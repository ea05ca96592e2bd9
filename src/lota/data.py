"""Task data: JSONL in the formats TRL uses, tokenized with the loss on completion tokens only.

Each line is ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}``
whose last message is the assistant's answer (the rest goes through the tokenizer's chat
template). Every problem is reported with the file and line number.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

IGNORE = -100


@dataclass
class Example:
    prompt: str
    completion: str
    messages: list | None = None
    line: int = 0


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    path = Path(path)
    if not path.exists():
        raise InputError("data file not found", str(path), "check the path given to --data")
    if path.is_dir():
        raise InputError("data path is a folder", str(path), "pass a .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise InputError(
            "cannot read the data file (permission denied)", str(path), "fix its permissions"
        ) from None
    except UnicodeDecodeError as e:
        raise InputError(
            f"data file is not UTF-8 text (byte {e.start})", str(path), "save it as UTF-8 JSONL"
        ) from None
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise InputError(
                f"invalid JSON ({e.msg} at column {e.colno})",
                where,
                "each line must be one JSON object",
            ) from None
        examples.append(_example(obj, where, number))
    if not examples:
        raise InputError(
            "data file has no examples",
            str(path),
            'add lines like {"prompt": "...", "completion": "..."}',
        )
    return examples


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


def prompt_ids(example: Example, tokenizer) -> list[int]:
    """Token ids of the prompt, through the chat template for conversations."""
    if example.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "conversation data needs a chat template, and the tokenizer has none",
                f"line {example.line}",
                "use prompt/completion data or a tokenizer with a chat_template",
            )
        text = tokenizer.apply_chat_template(
            example.messages[:-1], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(example.prompt)["input_ids"]


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize(
    examples: list[Example], tokenizer, max_length: int, where: str = "data"
) -> list[Tokenized]:
    """Prompt + completion + EOS; labels are -100 on the prompt. Long completions are truncated,
    examples whose prompt alone fills ``max_length`` are dropped; all dropped is an error."""
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
        raise InputError(
            f"all {len(examples)} examples have prompts of at least --max-length {max_length} tokens",
            where,
            "raise --max-length or shorten the prompts",
        )
    return out


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


def batches(
    data: list[Tokenized], batch_size: int, seed: int, pad_id: int, skip: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled epochs of padded batches; the order depends only on ``seed``.

    ``skip`` batches are passed over first (without building them), so a resumed run sees exactly
    the batches an uninterrupted run would have seen next.
    """
    rng = random.Random(seed)
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            if skip:
                skip -= 1
                continue
            chunk = order[i : i + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                chunk = chunk + order[: batch_size - len(chunk)]
            yield collate([data[j] for j in chunk], pad_id)


def steps_for(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        return steps
    per_epoch = max(1, -(-n_examples // batch_size))
    return max(1, round((epochs if epochs is not None else 1.0) * per_epoch))
