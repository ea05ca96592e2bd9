"""``lota eval --metric choice``: each option's log-likelihood equals a plain forward pass's, the
batch and its padding change nothing, ``--delta`` equals the applied model, bad rows are refused in
one line, and ARC and BoolQ convert to its data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lota import choice
from lota.choice import Choice, encode, loglikelihoods, read_choices, score_choices
from lota.data import pad_id
from lota.errors import InputError
from lota.lab.tasks import shared_data_dir
from lota.toy import byte_tokenizer, save_toy_model, tiny_llama

from .conftest import constant_delta, write_jsonl
from .test_cli import assert_refused
from .test_cli import lota as run_cli

EXAMPLES = Path(__file__).parents[1] / "examples"

ROWS = [
    {"prompt": "2+3=", "choices": [" 5", " 6", " 14"], "answer": 0},
    {"prompt": "Q: color of the sky?\nA:", "choices": [" blue", " green as grass"], "answer": 0},
    {"prompt": "x", "choices": ["a", "bb", "ccc", "a much longer option"], "answer": 3},
    {
        "messages": [{"role": "user", "content": "yes or no?"}],
        "choices": ["yes", "no"],
        "answer": 1,
    },
    {"prompt": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0},
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(hidden=32, layers=2, heads=2, seed=4).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("choice") / "c.jsonl", ROWS)


def direct(model, tokenizer, row: dict) -> list[float]:
    """Each option's summed log-probability from one plain forward pass of prompt + option."""
    if "messages" in row:
        text = tokenizer.apply_chat_template(
            row["messages"], tokenize=False, add_generation_prompt=True
        )
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt = tokenizer(row["prompt"])["input_ids"]
    out = []
    for option in row["choices"]:
        ids = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        out.append(sum(logp[len(prompt) + t - 1, tok].item() for t, tok in enumerate(ids)))
    return out


def test_loglikelihoods_and_scores_equal_a_direct_computation(model, data):
    tok = byte_tokenizer()
    examples = read_choices(str(data))
    got = loglikelihoods(model, encode(examples, tok, 256), pad_id(tok), 4, show_progress=False)
    want = [direct(model, tok, row) for row in ROWS]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    r = score_choices(examples, got)
    picks = [w.index(max(w)) for w in want]
    norm = [[x / len(c.lstrip()) for x, c in zip(w, row["choices"])] for w, row in zip(want, ROWS)]
    picks_norm = [n.index(max(n)) for n in norm]
    assert [e["prediction"] for e in r["examples"]] == picks
    assert [e["prediction_norm"] for e in r["examples"]] == picks_norm
    answers = [row["answer"] for row in ROWS]
    assert r["acc"] == sum(p == a for p, a in zip(picks, answers)) / len(ROWS) == r["score"]
    assert r["acc_norm"] == sum(p == a for p, a in zip(picks_norm, answers)) / len(ROWS)
    assert picks != picks_norm  # the lengths differ enough that the normalization matters here


def test_batching_and_padding_change_no_loglikelihood(model, data):
    tok = byte_tokenizer()
    encoded = encode(read_choices(str(data)), tok, 256)
    one = loglikelihoods(model, encoded, pad_id(tok), 1, show_progress=False)
    widths = {len(p) + len(o) for p, opts in encoded for o in opts}
    assert len(widths) > 5  # rows of many lengths share a batch below, most of them padded
    for batch_size in (3, 64):
        got = loglikelihoods(model, encoded, pad_id(tok), batch_size, show_progress=False)
        for a, b in zip(one, got):
            assert a == pytest.approx(b, abs=1e-5)
            assert a.index(max(a)) == b.index(max(b))


def test_a_tie_goes_to_the_first_option_and_normalization_skips_leading_space():
    e = Choice("p", [" ab", "cd", "x"], 1)
    r = score_choices([e], [[-2.0, -2.0, -1.5]])
    assert r["examples"][0]["prediction"] == 2  # -1.5 is the highest sum
    r = score_choices([e], [[-2.0, -2.0, -3.0]])
    assert r["examples"][0]["prediction"] == 0 and r["examples"][0]["prediction_norm"] == 0
    assert choice.option_length(" ab") == choice.option_length("cd") == 2


# ---------------------------------------------------------------------------- the command
def test_cli_choice_with_limit_delta_and_each_equals_the_applied_model(
    workdir, capsys, tmp_path, data
):
    base = workdir / "base"
    a = constant_delta(base, tmp_path / "a.safetensors", 0.5, n=600)
    b = constant_delta(base, tmp_path / "b.safetensors", -0.7, n=300)
    for name, d in (("a", a), ("b", b)):
        code, _, err = run_cli(capsys, "apply", base, d, "--out", tmp_path / name)
        assert code == 0, err
    common = ["--data", data, "--metric", "choice", "--limit", "4", "--json", "--quiet"]

    def scored(*args) -> dict:
        code, out, err = run_cli(capsys, "eval", *args, *common)
        assert code == 0, err
        return json.loads(out)

    def lls(r: dict) -> list[float]:
        return [x for e in r["examples"] for x in e["loglikelihoods"]]

    plain = scored(base)
    assert plain["n"] == 4 and plain["metric"] == "choice" and 0 <= plain["acc_norm"] <= 1
    applied = {name: scored(tmp_path / name) for name in ("a", "b")}
    switched = scored(base, "--delta", a)
    assert switched["deltas"] == [str(a)]
    assert lls(switched) == pytest.approx(lls(applied["a"]), abs=1e-5)
    assert max(abs(x - y) for x, y in zip(lls(applied["a"]), lls(plain))) > 1e-2  # it changes them
    each = scored(base, "--delta", a, "--delta", b, "--each")
    for r, name in zip(each["results"], ("a", "b")):
        assert lls(r) == pytest.approx(lls(applied[name]), abs=1e-5)
    code, out, err = run_cli(capsys, "eval", base, *common[:-2], "--quiet")
    assert code == 0 and "acc = " in out and "acc_norm = " in out, err


BAD = [
    ({"prompt": "p", "answer": 0}, ["'choices'", "missing"]),
    ({"prompt": "p", "choices": ["a"], "answer": 0}, ["'choices'", "list of 1"]),
    ({"prompt": "p", "choices": "ab", "answer": 0}, ["'choices'", "str"]),
    ({"prompt": "p", "choices": ["a", 3], "answer": 0}, ["'choices[1]'", "int"]),
    ({"prompt": "p", "choices": ["a", " "], "answer": 0}, ["'choices[1]'", "empty"]),
    ({"prompt": "p", "choices": ["a", "b"], "answer": 2}, ["'answer' 2", "out of range"]),
    ({"prompt": "p", "choices": ["a", "b"], "answer": -1}, ["'answer' -1", "out of range"]),
    ({"prompt": "p", "choices": ["a", "b"], "answer": "a"}, ["'answer'", "index"]),
    ({"prompt": "p", "choices": ["a", "b"], "answer": True}, ["'answer'", "index"]),
    ({"prompt": "p", "choices": ["a", "b"]}, ["'answer'", "missing"]),
    ({"choices": ["a", "b"], "answer": 0}, ["'prompt'"]),
    ({"messages": [], "choices": ["a", "b"], "answer": 0}, ["'messages'"]),
    (
        {"messages": [{"role": "assistant", "content": "x"}], "choices": ["a", "b"], "answer": 0},
        ["'assistant'"],
    ),
    ({"prompt": "", "choices": ["a", "b"], "answer": 0}, ["prompt is empty"]),
    ({"prompt": "p" * 300, "choices": ["a", "b"], "answer": 0}, ["256 positions"]),
    ([1, 2], ["JSON object"]),
]


@pytest.mark.parametrize("row,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_row_is_refused_in_one_line_naming_file_line_and_field(
    workdir, capsys, tmp_path, row, words
):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    got = run_cli(capsys, "eval", workdir / "base", "--data", path, "--metric", "choice")
    assert_refused(*got, f"{path}:2", *words)


def test_generation_data_is_refused_by_choice_and_choice_data_by_generation(workdir, capsys, data):
    got = run_cli(
        capsys, "eval", workdir / "base", "--data", workdir / "a.jsonl", "--metric", "choice"
    )
    assert_refused(*got, "a.jsonl:1", "'choices'")
    assert_refused(*run_cli(capsys, "eval", workdir / "base", "--data", data), "c.jsonl:1")
    with pytest.raises(InputError, match="log-likelihood"):
        from lota.evaluate import evaluate_model

        evaluate_model(None, None, [], "choice")


# ---------------------------------------------------------------------------- ARC and BoolQ
def _converter():
    spec = importlib.util.spec_from_file_location("choice_data", EXAMPLES / "choice_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _shared(*parts: str) -> Path:
    folder = shared_data_dir()
    if folder is None or not folder.joinpath(*parts).exists():
        pytest.skip("../shared/data is absent")
    return folder.joinpath(*parts)


def test_arc_challenge_converts_to_choice_data(tmp_path, capsys):
    src = _shared("arc_challenge", "test.jsonl")
    raw = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines()]
    for chat in ([], ["--chat"]):
        out = tmp_path / f"arc{len(chat)}.jsonl"
        assert _converter().main([str(src), "--out", str(out), *chat]) == 0
        got = read_choices(str(out))
        assert len(got) == len(raw) == 1172
        for e, r in zip(got, raw):
            assert e.answer == r["choices"]["label"].index(r["answerKey"])
            assert [c.strip() for c in e.choices] == r["choices"]["text"]
            if chat:
                assert e.messages == [{"role": "user", "content": r["question"]}]
            else:
                assert e.prompt == f"Question: {r['question']}\nAnswer:"
                assert all(c.startswith(" ") for c in e.choices)
    assert {len(e.choices) for e in got} == {3, 4, 5}  # ARC has a few 3- and 5-option questions


def test_boolq_converts_to_choice_data_and_scores(tmp_path, capsys):
    src = _shared("boolq", "test.json")
    raw = json.loads(src.read_text(encoding="utf-8"))
    out = tmp_path / "boolq.jsonl"
    assert _converter().main([str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"choice_data: 3270 examples -> {out}"
    got = read_choices(str(out))
    assert len(got) == len(raw) == 3270
    assert [e.answer for e in got] == [int(r["answer"] == "true") for r in raw]
    assert all(e.choices == [" no", " yes"] and e.prompt.startswith("Question: ") for e in got)
    assert all(e.prompt.split("\n")[0].removeprefix("Question: ") in r["instruction"]
               for e, r in zip(got, raw))  # fmt: skip
    folder = save_toy_model(tmp_path / "m", seed=1, hidden=32, layers=1, heads=2, max_positions=512)
    code, stdout, err = run_cli(
        capsys, "eval", folder, "--data", out, "--metric", "choice", "--limit", "3", "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["n"] == 3


def test_the_converter_refuses_a_bad_row_in_one_line(tmp_path, capsys):
    src = write_jsonl(
        tmp_path / "arc.jsonl",
        [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}],
    )
    out = tmp_path / "out.jsonl"
    assert _converter().main([str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{src}:1" in err and "'answerKey' 'C'" in err
    assert not out.exists()
