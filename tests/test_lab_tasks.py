"""The lab's task generators and scorers: determinism, disjoint splits, known inputs -> known scores."""

from __future__ import annotations

import random

import pytest

from lota.errors import InputError
from lota.lab.tasks import (
    LEXICON,
    REFUSAL,
    TASKS,
    final_number,
    generate,
    is_refusal,
    normalize_sql,
)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generation_is_deterministic_with_disjoint_splits(name):
    a = generate(name, 3, 60, 20, 20)
    b = generate(name, 3, 60, 20, 20)
    c = generate(name, 4, 60, 20, 20)
    assert a == b and a != c
    assert [len(a[s]) for s in ("train", "validation", "test")] == [60, 20, 20]
    prompts = [set(r["prompt"] for r in a[s]) for s in ("train", "validation", "test")]
    assert (
        not (prompts[0] & prompts[1])
        and not (prompts[0] & prompts[2])
        and not (prompts[1] & prompts[2])
    )
    for r in a["train"]:
        assert r["prompt"] and r["completion"].startswith(" ")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_references_score_perfectly_and_empty_answers_do_not(name):
    rows = generate(name, 0, 0, 0, 40)["test"]
    perfect = TASKS[name].score([r["completion"] for r in rows], rows)
    assert perfect["score"] == pytest.approx(1.0)
    empty = TASKS[name].score(["" for _ in rows], rows)
    assert empty["score"] < 0.6


def test_math_answers():
    rows = [{"answer": 14}, {"answer": 14}, {"answer": 14}, {"answer": -3}]
    preds = [" 12 + 7 - 5 = 14\n#### 14", "the answer is 14", "#### 15 (not 14)", "#### -3"]
    assert TASKS["math"].score(preds, rows)["correct"] == [True, True, False, True]
    assert final_number("3 apples and 4 pears: 7") == "7" and final_number("none") is None
    for r in generate("math", 1, 50, 0, 0)["train"]:  # the worked computation is right
        lhs, rhs = r["completion"].split("\n")[0].split("=")
        assert eval(lhs) == int(rhs) == r["answer"]  # noqa: S307 (generated arithmetic only)


def test_sql_normalisation():
    assert normalize_sql(" select  name from t where age>3; ") == normalize_sql(
        "SELECT name FROM t WHERE age > 3"
    )
    assert normalize_sql('SELECT COUNT(*) FROM t WHERE c = "x"') == normalize_sql(
        "SELECT COUNT( * ) FROM t WHERE c='x'"
    )
    assert normalize_sql("SELECT a FROM t") != normalize_sql("SELECT b FROM t")
    rows = [{"completion": " SELECT name FROM t WHERE age > 3"}]
    assert TASKS["sql"].score(["SELECT name FROM t WHERE age > 4"], rows)["score"] == 0.0


def test_instruct_exact():
    rows = [{"completion": " FROST EMBER"}, {"completion": " 1. a\n2. b"}]
    assert TASKS["instruct"].score(["FROST EMBER", "1. a\n2. b "], rows)["score"] == 1.0
    assert TASKS["instruct"].score(["frost ember", "1. a 2. b"], rows)["score"] == 0.0


def test_translate_grammar_and_chrf():
    rows = generate("translate", 0, 0, 0, 200)["test"]
    invented = set(LEXICON.values())
    for r in rows:
        words = r["completion"].strip().rstrip(".").lower().split()
        assert all(w.removesuffix("en") in invented or w in invented for w in words)
        assert words[-1] in {LEXICON[v] for v in ("sees", "likes", "finds", "draws", "follows")}
    one = [{"completion": " Ka surn mi ilma nuvat."}]
    assert TASKS["translate"].score([" Ka surn mi ilma nuvat."], one)["chrf"] == pytest.approx(
        100.0
    )
    half = TASKS["translate"].score([" Ka surn nuvat."], one)["chrf"]
    assert 20 < half < 90
    # the first line is scored; what follows it only counts in chrf_full
    s = TASKS["translate"].score([" Ka surn mi ilma nuvat.\nKa velo."], one)
    assert s["chrf"] == pytest.approx(100.0) and s["chrf_full"] < 100.0


def test_safety_rates():
    rows = [{"harmful": True}, {"harmful": True}, {"harmful": False}, {"harmful": False}]
    preds = [REFUSAL, "Use a tension wrench.", "Clean it and oil it.", "Sorry, I cannot help."]
    s = TASKS["safety"].score(preds, rows)
    assert s["refusal_rate"] == 0.5 and s["over_refusal_rate"] == 0.5
    assert is_refusal(" I can't help with that.") and not is_refusal("Sure, here is how.")
    mix = generate("safety", 0, 200, 0, 0)["train"]
    share = sum(r["harmful"] for r in mix) / len(mix)
    assert 0.35 < share < 0.65


def test_tasks_are_dissimilar_in_their_outputs():
    rng = random.Random(0)
    completions = {
        n: {r["completion"] for r in generate(n, rng.randint(0, 9), 50, 0, 0)["train"]}
        for n in TASKS
    }
    names = sorted(completions)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not completions[a] & completions[b]


def test_unknown_task_is_refused():
    with pytest.raises(InputError):
        generate("poetry", 0, 1, 1, 1)


def test_real_sql_split_is_stable_and_disjoint():
    from lota.lab.tasks import real_sql

    train = real_sql("train")
    if train is None:
        pytest.skip("../shared/data is absent")
    test, val = real_sql("test"), real_sql("validation")
    total = len(train) + len(val) + len(test)
    assert real_sql("test") == test and 0.05 < len(test) / total < 0.15
    assert 0.05 < len(val) / total < 0.15
    prompts = [{r["prompt"] for r in rows} for rows in (train, val, test)]
    assert (
        not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    )
    assert TASKS["sql"].score([r["completion"] for r in test[:50]], test[:50])["score"] == 1.0
    assert all(r["prompt"].startswith("CREATE TABLE") for r in test[:50])


def test_sql_score_reads_a_query_inside_a_fenced_code_block():
    row = {"prompt": "", "completion": " SELECT name FROM t WHERE age > 3"}
    fenced = "```sql\nSELECT name FROM t WHERE age>3;\n```\nThis query selects..."
    assert TASKS["sql"].score([fenced, "SELECT name FROM t"], [row, row])["correct"] == [
        True,
        False,
    ]


def test_paraphrased_template_keeps_the_sentence_and_the_answer():
    from lota.lab.tasks import paraphrase

    row = generate("translate", 0, 3, 0, 0)["train"][0]
    p = paraphrase("translate", row)
    english = row["prompt"].removeprefix("English: ").removesuffix("\nInvented:")
    assert p["prompt"] == f"Translate into the invented language: {english}\nTranslation:"
    assert p["completion"] == row["completion"] and "English:" not in p["prompt"]
    with pytest.raises(ValueError):
        paraphrase("math", generate("math", 0, 1, 0, 0)["train"][0])


def test_generation_reports_which_completions_stopped_at_eos():
    import torch

    from lota.data import Example
    from lota.evaluate import generate as greedy

    class Tok:
        pad_token_id, eos_token_id = 0, 2

        def __call__(self, text, **_):
            return {"input_ids": [5] * len(text)}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids if int(i) not in (0, 2))

    class Model:  # emits EOS at once for prompts of even length, token 7 otherwise
        def eval(self):
            return self

        def generate(self, input_ids, attention_mask, max_new_tokens, **_):
            even = attention_mask.sum(1) % 2 == 0
            new = torch.where(even[:, None], 2, 7).repeat(1, max_new_tokens)
            new[even, 1:] = 0
            return torch.cat([input_ids, new], 1)

    ended: list[bool] = []
    out = greedy(Model(), Tok(), [Example("ab", "x"), Example("abc", "x")], 3, 8, False, ended)
    assert ended == [True, False] and out == ["", "7 7 7"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_fills_the_full_bench_splits(name):
    from lota.lab.scales import SCALES

    s = SCALES["full"]
    d = generate(name, 0, s["n_train"], s["n_val"], s["n_test"])
    assert [len(d[k]) for k in ("train", "validation", "test")] == [
        s["n_train"],
        s["n_val"],
        s["n_test"],
    ]
