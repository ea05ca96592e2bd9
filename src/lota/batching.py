"""Batches of tokenized examples: padding, collation and the order of a run's batches.

Invariant: the batches depend only on the data and the seed, so a resumed run (``skip``) is
served exactly the batches an uninterrupted run would have been.
"""

from __future__ import annotations

import itertools
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE = -100  # the label of a token the loss leaves out


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


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
    data: Sequence[Tokenized],
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
    still visits every example once, and batches still come in a random order). An epoch's order
    is an array of indices and its batches are cut as they are served: 4 bytes per example.
    """
    rng = random.Random(seed)
    lengths = None
    if group_by_length:
        lengths = getattr(data, "lengths", None) or [len(t.input_ids) for t in data]
    while True:
        order = array("I" if len(data) < 2**32 else "q", range(len(data)))
        rng.shuffle(order)
        chunks = _chunks(order, batch_size)
        if lengths is not None:
            chunks = _grouped(chunks, lengths, batch_size, rng)
        for chunk in chunks:
            if skip:
                skip -= 1
                continue
            yield collate([data[j] for j in chunk], pad_id)


def _chunks(order: array, batch_size: int) -> Iterator[list[int]]:
    """The epoch's batches of indices; a short last batch is filled from the epoch's start."""
    n = len(order)
    for i in range(0, n, batch_size):
        chunk = order[i : i + batch_size].tolist()
        if len(chunk) < batch_size and n >= batch_size:
            chunk += order[: batch_size - len(chunk)].tolist()
        yield chunk


def _grouped(
    chunks: Iterator[list[int]], lengths: Sequence[int], batch_size: int, rng: random.Random
) -> Iterator[list[int]]:
    while window_chunks := list(itertools.islice(chunks, GROUP_WINDOW)):
        window = [j for chunk in window_chunks for j in chunk]
        window.sort(key=lambda j: -lengths[j])  # stable: ties keep the shuffled order
        group = [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(group)
        yield from group


def steps_for(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    if steps is not None:
        return steps
    per_epoch = max(1, -(-n_examples // batch_size))
    return max(1, round((epochs if epochs is not None else 1.0) * per_epoch))
