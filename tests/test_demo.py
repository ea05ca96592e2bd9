"""The demo's generated tasks: deterministic by seed, correct answers, disjoint splits."""

from __future__ import annotations

import json
import re

from lota.demo import addition_task, pretraining_corpus, shift, shift_task, write_tasks


def test_addition_answers_are_correct_and_splits_disjoint():
    train, test = addition_task(0, n_train=500, n_test=100)
    for row in train + test:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", row["prompt"]).groups())
        assert row["completion"] == str(a + b)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_shift_answers_are_correct_and_splits_disjoint():
    assert shift("abz") == "bca"
    train, test = shift_task(0, n_train=300, n_test=50)
    for row in train + test:
        word = row["prompt"].removesuffix(">")
        assert row["completion"] == "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_tasks_are_deterministic_by_seed(tmp_path):
    a = write_tasks(tmp_path / "a", seed=3)
    b = write_tasks(tmp_path / "b", seed=3)
    c = write_tasks(tmp_path / "c", seed=4)
    for task in ("A", "B"):
        for split in ("train", "test"):
            assert open(a[task][split]).read() == open(b[task][split]).read()
            assert open(a[task][split]).read() != open(c[task][split]).read()
            rows = [json.loads(x) for x in open(a[task][split])]
            assert rows and all({"prompt", "completion"} <= set(r) for r in rows)


def test_pretraining_corpus_avoids_the_task_formats():
    docs = pretraining_corpus(300, seed=0)
    assert len(docs) == 300 and pretraining_corpus(300, seed=0) == docs
    assert not any(re.search(r"\d+\+\d+=", d) or re.search(r"[a-z]+>", d) for d in docs)
