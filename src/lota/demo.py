"""``lota demo``: LoTA, FFT and LoTTO end to end on a built-in toy model and two toy tasks.

Everything is generated locally (no download): two small, dissimilar tasks (A: two-digit addition,
B: reversing a short string of letters) as prompt/completion JSONL, and a tiny byte-level Llama
given a short dense "pretraining" on a generic generated corpus, so that its embeddings and output
head mean something before only the transformer blocks are adapted. The base is cached in
``OUT/base`` together with the recipe it was built from and reused while the recipe is unchanged.

The runs go through the same ``adapt`` pipeline as ``lota adapt``: FFT and LoTA on A, then B on
top of each (FFT on B after FFT on A, the forgetting baseline; LoTTO on B after LoTA on A, with A's
ticket protected). Every model is scored on both tests, and the entries of A's ticket are compared
bit for bit between the LoTA-A and LoTTO-B model files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .data import Example, batches, tokenize
from .fileio import write_json, write_text
from .models import save_model
from .toy import byte_tokenizer, tiny_llama
from .train import MetricsLog, TrainSettings, train

RECIPE = {
    "version": 1,
    "model": {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "max_positions": 96},
    "corpus_docs": 6000,
    "steps": 500,
    "batch_size": 32,
    "lr": 3e-3,
    "max_length": 80,
}
N_TRAIN, N_TEST = 3000, 200
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------------------- tasks
def addition_task(seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list, list]:
    """Task A: ``"a+b="`` -> ``"a+b"`` for two-digit a, b; train and test share no pair."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]
    return rows[:n_train], rows[n_train : n_train + n_test]


def reversal_task(seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list, list]:
    """Task B: ``"abcd>"`` -> ``"dcba"`` for 3 to 6 random letters; train and test share no word."""
    rng = random.Random(seed + 1)
    words: dict[str, None] = {}
    while len(words) < n_train + n_test:
        words["".join(rng.choices(LETTERS, k=rng.randint(3, 6)))] = None
    rows = [{"prompt": f"{w}>", "completion": w[::-1]} for w in words]
    return rows[:n_train], rows[n_train:]


def write_tasks(folder: str | Path, seed: int) -> dict[str, dict[str, str]]:
    """Write ``{a,b}_{train,test}.jsonl``; returns ``{task: {split: path}}``."""
    paths: dict[str, dict[str, str]] = {}
    for task, make in (("A", addition_task), ("B", reversal_task)):
        for split, rows in zip(("train", "test"), make(seed)):
            p = Path(folder) / f"{task.lower()}_{split}.jsonl"
            write_text(p, "".join(json.dumps(r) + "\n" for r in rows))
            paths.setdefault(task, {})[split] = str(p)
    return paths


# ---------------------------------------------------------------------------- base model
def pretraining_corpus(n: int, seed: int) -> list[str]:
    """Generic character-level text: counting, copies, words, expressions (not the task formats)."""
    rng = random.Random(seed + 2)

    def word() -> str:
        return "".join(rng.choices(LETTERS, k=rng.randint(2, 7)))

    def snippet() -> str:
        kind = rng.randrange(6)
        if kind == 0:  # counting up or down
            start, step = rng.randint(0, 190), rng.choice([1, 1, 2, -1])
            return " ".join(str(max(0, start + i * step)) for i in range(rng.randint(3, 7)))
        if kind == 1:  # copies of a digit string
            s = str(rng.randint(0, 99999))
            return f"{s} {s}"
        if kind == 2:  # copies of a letter string
            w = word()
            return f"{w} {w}"
        if kind == 3:  # words
            return " ".join(word() for _ in range(rng.randint(2, 6)))
        if kind == 4:  # single-digit facts in words
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            return f"{a} plus {b} is {a + b}"
        return f"{rng.randint(0, 99)}*{rng.randint(0, 9)}-{rng.randint(0, 9)}"  # expressions

    docs = []
    for _ in range(n):
        parts = [snippet()]
        while len(" ; ".join(parts)) < 50:
            parts.append(snippet())
        docs.append(" ; ".join(parts))
    return docs


def build_base(folder: str | Path, seed: int, show_progress: bool = True) -> bool:
    """Pretrain the toy base into ``folder`` unless it already holds this recipe; True if built."""
    folder = Path(folder)
    recipe = dict(RECIPE, seed=seed)
    stamp = folder / "demo_recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return False
    tokenizer = byte_tokenizer()
    model = tiny_llama(seed=seed, **recipe["model"])
    docs = [
        Example(prompt="", completion=d) for d in pretraining_corpus(recipe["corpus_docs"], seed)
    ]
    data = tokenize(docs, tokenizer, recipe["max_length"])
    stream = batches(data, recipe["batch_size"], seed, tokenizer.pad_token_id)
    settings = TrainSettings(lr=recipe["lr"], steps=recipe["steps"], seed=seed)
    torch.manual_seed(seed)
    train(
        model,
        list(model.parameters()),
        stream,
        settings,
        "pretrain",
        MetricsLog(None),
        show_progress,
    )
    save_model(model, tokenizer, folder)
    write_json(stamp, recipe)
    return True
