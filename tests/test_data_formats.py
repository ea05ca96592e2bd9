"""``--data`` in every format: the same rows give the same run, whatever holds them.

The formats (JSONL, a JSON array, CSV, Parquet, a ``save_to_disk`` folder of one dataset or of
several splits) are each read by ``lota adapt``, ``lota eval`` and ``lota ks``; the field options
rename the fields, ``--split`` picks a split, plain ``text`` rows train on every token, and what
cannot be read (a missing column, a split not there, a Hub name with no Hub to ask) is one line.
"""

from __future__ import annotations

import csv
import json
import pickle
import time
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from lota import data as lota_data
from lota import datafiles
from lota.batching import IGNORE
from lota.cli import main
from lota.data import Fields, TokenizedData, read_data, tokenize
from lota.errors import InputError
from lota.models import load_tokenizer

from .conftest import ADAPT, addition_rows, reverse_rows, write_jsonl
from .test_cli import assert_refused, lota

FORMATS = ["jsonl", "json", "csv", "parquet", "folder", "splits"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache in the test's own folder (it is read when a file is converted), and no
    progress bars from the files the tests write."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    datasets.disable_progress_bars()
    yield cache
    datasets.enable_progress_bars()


def write_as(
    kind: str, rows: list[dict], folder: Path, test_rows: list[dict] | None = None
) -> Path:
    """``rows`` in format ``kind`` under ``folder``; ``splits`` is a DatasetDict folder whose
    ``train`` split holds ``rows`` (and ``test`` ``test_rows``, by default the first two)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        return write_jsonl(folder / "data.jsonl", rows)
    if kind == "json":
        path = folder / "data.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
        return path
    if kind == "csv":
        path = folder / "data.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path
    if kind == "parquet":
        path = folder / "data.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path
    path = folder / kind
    if kind == "folder":
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        test = datasets.Dataset.from_list(test_rows or rows[:2])
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows), "test": test}
        ).save_to_disk(str(path))
    return path


def adapt_delta(capsys, base: Path, data, out: Path, *extra) -> dict[str, torch.Tensor]:
    code, _, err = lota(capsys, "adapt", base, "--data", data, "--out", out, *ADAPT, *extra)
    assert code == 0, err
    return load_file(str(out / "delta.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(workdir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The delta of ``lota adapt`` on the addition rows as JSONL."""
    out = tmp_path_factory.mktemp("reference") / "run"
    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl"), "--out", str(out)]
    assert main(argv + ADAPT) == 0
    return load_file(str(out / "delta.safetensors"))


# ---------------------------------------------------------------------------- formats x commands
@pytest.mark.parametrize("kind", FORMATS)
def test_adapt_gives_the_same_delta_in_every_format(workdir, capsys, tmp_path, reference, kind):
    data = write_as(kind, addition_rows(24), tmp_path / "d")
    before = sorted(p.name for p in (tmp_path / "d").rglob("*"))
    delta = adapt_delta(capsys, workdir / "base", data, tmp_path / "run")
    assert same_tensors(delta, reference)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["examples"] == 24
    # nothing is written beside the data: datasets' cache is elsewhere (a read-only folder works)
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == before


def eval_report(capsys, base: Path, data: Path) -> dict:
    code, out, err = lota(
        capsys, "eval", base, "--data", data, "--max-new-tokens", "2", "--json", "--quiet"
    )
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("kind", FORMATS)
def test_eval_scores_the_same_examples_in_every_format(workdir, capsys, tmp_path, kind):
    rows = addition_rows(6)
    data = write_as(kind, rows, tmp_path / "d", test_rows=rows)  # the split eval reads: test
    got = eval_report(capsys, workdir / "base", data)["examples"]
    want = eval_report(capsys, workdir / "base", write_jsonl(tmp_path / "r.jsonl", rows))[
        "examples"
    ]
    assert [e["reference"] for e in got] == [r["completion"] for r in rows]
    assert [e["prediction"] for e in got] == [e["prediction"] for e in want]


@pytest.mark.parametrize("kind", FORMATS)
def test_ks_counts_the_same_tokens_in_every_format(workdir, trained, capsys, tmp_path, kind):
    data = write_as(kind, addition_rows(24), tmp_path / "d")
    counts = []
    for i, given in enumerate([workdir / "a.jsonl", data]):
        code, out, err = lota(
            capsys, "ks", workdir / "base", trained / "model", "--top", "8", "--data", given,
            "--out", tmp_path / f"ks{i}", "--json",
        )  # fmt: skip
        assert code == 0, err
        counts.append({r["token_id"]: r["count_in_data"] for r in json.loads(out)["selected"]})
    assert counts[0] == counts[1] and any(counts[0].values())


@pytest.mark.parametrize("kind", ["json", "parquet", "folder"])
def test_conversations_tokenize_the_same_in_every_format(workdir, tmp_path, kind):
    tok = load_tokenizer(str(workdir / "base"))
    rows = reverse_rows(8)
    want = tokenize(read_data(workdir / "b.jsonl"), tok, 64)
    got = tokenize(read_data(write_as(kind, rows, tmp_path / "d")), tok, 64)
    assert [(t.input_ids, t.labels) for t in got] == [(t.input_ids, t.labels) for t in want[:8]]


# ---------------------------------------------------------------------------- fields and splits
def test_field_options_rename_the_fields(workdir, capsys, tmp_path, reference):
    rows = [{"question": r["prompt"], "answer": r["completion"]} for r in addition_rows(24)]
    fields = ["--prompt-field", "question", "--completion-field", "answer"]
    for kind in ("jsonl", "csv"):
        data = write_as(kind, rows, tmp_path / kind)
        assert same_tensors(
            adapt_delta(capsys, workdir / "base", data, tmp_path / f"run-{kind}", *fields),
            reference,
        )
    conversations = [{"chat": r["messages"]} for r in reverse_rows(8)]
    tok = load_tokenizer(str(workdir / "base"))
    got = read_data(
        write_as("parquet", conversations, tmp_path / "c"), fields=Fields(messages="chat")
    )
    assert [(t.input_ids, t.labels) for t in tokenize(got, tok, 64)] == [
        (t.input_ids, t.labels) for t in tokenize(read_data(workdir / "b.jsonl"), tok, 64)[:8]
    ]


def test_split_picks_the_split_train_for_adapt_test_for_eval(workdir, capsys, tmp_path, reference):
    train, test = addition_rows(24), addition_rows(5, seed=9)
    data = write_as("splits", train, tmp_path / "d", test_rows=test)
    assert same_tensors(adapt_delta(capsys, workdir / "base", data, tmp_path / "a"), reference)
    other = adapt_delta(capsys, workdir / "base", data, tmp_path / "b", "--split", "test")
    alone = adapt_delta(
        capsys, workdir / "base", write_as("jsonl", test, tmp_path / "t"), tmp_path / "c"
    )
    assert same_tensors(other, alone) and not same_tensors(other, reference)
    code, out, err = lota(
        capsys, "eval", workdir / "base", "--data", data, "--max-new-tokens", "1", "--json",
        "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert [e["reference"] for e in json.loads(out)["examples"]] == [r["completion"] for r in test]


def test_a_split_not_there_or_a_split_of_a_file_is_one_line(workdir, capsys, tmp_path):
    data = write_as("splits", addition_rows(4), tmp_path / "d")
    out = tmp_path / "o"
    assert_refused(
        *lota(capsys, "adapt", workdir / "base", "--data", data, "--out", out, "--split", "dev",
              *ADAPT),
        "no split 'dev'", "train, test", str(data),
    )  # fmt: skip
    assert_refused(
        *lota(capsys, "eval", workdir / "base", "--data", workdir / "a.jsonl", "--split", "test"),
        "--split test", "a.jsonl",
    )  # fmt: skip
    assert not out.exists()


# ---------------------------------------------------------------------------- plain text
def test_text_rows_put_the_loss_on_every_token(workdir, capsys, tmp_path):
    tok = load_tokenizer(str(workdir / "base"))
    texts = ["the cat sat on the mat", "a b c", "continued pretraining"]
    for kind in ("jsonl", "parquet"):
        data = read_data(write_as(kind, [{"text": t} for t in texts], tmp_path / kind))
        got = TokenizedData(data, tok, 64)
        for text, t in zip(texts, [got[i] for i in range(len(got))]):
            assert t.input_ids == tok(text)["input_ids"] + [tok.eos_token_id]
            assert t.labels == t.input_ids and IGNORE not in t.labels
    cut = TokenizedData(read_data(tmp_path / "jsonl" / "data.jsonl"), tok, 5)
    assert [len(cut[i].labels) for i in range(3)] == [5, 5, 5]  # truncated, never dropped
    data = write_as("jsonl", [{"text": t} for t in texts * 4], tmp_path / "t")
    adapt_delta(capsys, workdir / "base", data, tmp_path / "run")


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_eval_refuses_text_rows_in_one_line(workdir, capsys, tmp_path, kind):
    data = write_as(kind, [{"text": "some text"}] * 3, tmp_path / "d")
    assert_refused(*lota(capsys, "eval", workdir / "base", "--data", data), "'text'", str(data))


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kind", ["csv", "parquet", "folder", "json"])
def test_a_missing_column_is_one_line_naming_it_and_the_columns(workdir, capsys, tmp_path, kind):
    rows = [{"prompt": r["prompt"], "answer": r["completion"]} for r in addition_rows(4)]
    data = write_as(kind, rows, tmp_path / "d")
    out = tmp_path / "o"
    assert_refused(
        *lota(capsys, "adapt", workdir / "base", "--data", data, "--out", out, *ADAPT),
        str(data), "'completion'", "prompt, answer",
    )  # fmt: skip
    assert_refused(
        *lota(capsys, "eval", workdir / "base", "--data", data, "--prompt-field", "q"),
        str(data), "'q'", "prompt, answer",
    )  # fmt: skip
    assert not out.exists()


def test_a_bad_row_of_a_table_names_the_row(workdir, capsys, tmp_path):
    rows = addition_rows(4)
    rows[2]["completion"] = ""
    data = write_as("csv", rows, tmp_path / "d")
    assert_refused(
        *lota(capsys, "adapt", workdir / "base", "--data", data, "--out", tmp_path / "o", *ADAPT),
        f"{data} row 3", "'completion' is empty",
    )  # fmt: skip


def test_unreadable_tables_and_folders_are_one_line(workdir, capsys, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "1+1=", "completion": "2"}, {"prompt": ', encoding="utf-8")
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"PAR1 not really parquet")
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("", encoding="utf-8")
    plain = tmp_path / "plain"
    plain.mkdir()
    for data, words in [
        (bad_json, ["JSON"]),
        (bad_parquet, ["PARQUET"]),
        (empty_csv, ["header"]),
        (plain, ["save_to_disk"]),
    ]:
        assert_refused(*lota(capsys, "eval", workdir / "base", "--data", data), str(data), *words)


def test_a_huge_row_of_a_table_is_refused(workdir, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(datafiles, "MAX_LINE_CHARS", 100)
    rows = addition_rows(3)
    rows[1]["prompt"] = "x" * 200
    data = write_as("parquet", rows, tmp_path / "d")
    assert_refused(
        *lota(capsys, "eval", workdir / "base", "--data", data),
        f"{data} row 2",
        "more than the 100",
    )


def test_hub_name_without_a_reachable_hub_is_one_line_at_once(
    workdir, capsys, tmp_path, monkeypatch
):
    import huggingface_hub

    name = "lota-tests/no-such-dataset"
    out = tmp_path / "o"
    args = ["adapt", workdir / "base", "--data", name, "--out", out, *ADAPT]
    # the Hub unreachable: nothing listens where it is asked
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert_refused(*lota(capsys, *args), name, "could not be reached")
    assert time.monotonic() - start < datafiles.HUB_SECONDS + 5
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_refused(*lota(capsys, *args), name, "HF_HUB_OFFLINE")
    assert not out.exists()


def test_hub_name_on_this_machines_network_is_one_line(workdir, capsys):
    """Wherever this runs: the Hub cannot be reached (no network), or it says there is no such
    dataset; either way one line, within the time the Hub is given."""
    name = "lota-tests/no-such-dataset-3f9c2"
    start = time.monotonic()
    code, out, err = lota(capsys, "eval", workdir / "base", "--data", name)
    assert_refused(code, out, err, name)
    assert "could not be reached" in err or "no dataset of that name" in err
    assert time.monotonic() - start < datafiles.HUB_SECONDS + 10


def test_nothing_is_unpickled_in_any_format(workdir, capsys, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("lota unpickled something")

    kinds = ["json", "csv", "parquet", "folder", "splits"]
    paths = [write_as(kind, addition_rows(6), tmp_path / kind) for kind in kinds]
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for data in paths:
        code, _, err = lota(
            capsys, "eval", workdir / "base", "--data", data, "--max-new-tokens", "1", "--quiet",
            *(["--split", "train"] if data.name == "splits" else []),
        )  # fmt: skip
        assert code == 0, err


# ---------------------------------------------------------------------------- reading only what is needed
@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_eval_limit_reads_only_the_first_rows(workdir, capsys, tmp_path, monkeypatch, kind):
    rows = addition_rows(300)
    path = write_as(kind, rows, tmp_path / "d")
    if kind == "jsonl":  # row 3 onwards is not even JSON: it is never read
        path.write_text(
            path.read_text().split("\n", 2)[0] + "\n" + json.dumps(rows[1]) + "\n{oops\n"
        )
    read = []
    real = lota_data._example

    def counting(obj, *a, **k):
        read.append(obj)
        return real(obj, *a, **k)

    monkeypatch.setattr(lota_data, "_example", counting)
    code, out, err = lota(
        capsys, "eval", workdir / "base", "--data", path, "--limit", "2", "--max-new-tokens", "1",
        "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["n"] == 2
    assert 2 <= len(read) <= 12, len(read)  # each of the two rows checked, then read as needed


def test_tokenized_data_equals_the_tokenized_list(workdir, tmp_path):
    tok = load_tokenizer(str(workdir / "base"))
    rows = addition_rows(20)
    for i in (3, 7, 11):
        rows[i]["prompt"] = "9" * 40  # its prompt fills max_length: dropped
    examples = read_data(write_as("jsonl", rows, tmp_path / "d"))
    want = tokenize(examples, tok, 16)
    got = TokenizedData(examples, tok, 16)
    assert len(got) == len(want) == 17
    assert [(got[i].input_ids, got[i].labels) for i in range(len(got))] == [
        (t.input_ids, t.labels) for t in want
    ]
    assert list(got.lengths) == [len(t.input_ids) for t in want]


def test_trl_example_keeps_text_rows_and_refuses_a_mix(workdir, tmp_path):
    from .test_examples import _load

    example = _load("trl_sft")
    texts = [{"text": "a b c"}, {"text": "d e"}]
    assert example.sft_rows(str(write_as("parquet", texts, tmp_path / "t"))) == texts
    mixed = write_jsonl(tmp_path / "mixed.jsonl", texts + addition_rows(2))
    with pytest.raises(InputError, match="mixes text rows"):
        example.sft_rows(str(mixed))


def test_hub_dataset_is_read_by_split_and_limit(workdir, capsys, tmp_path, monkeypatch, reference):
    """The Hub's answers stood in for: the split (and slice) asked of ``load_dataset`` is
    ``--split``'s, and a dataset that needs a loading script is refused in one line."""
    import huggingface_hub

    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        if name == "lota-tests/scripted":
            raise RuntimeError("Dataset scripts are no longer supported, but found scripted.py")
        rows = addition_rows(24) if split == "train" else addition_rows(5, seed=9)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, timeout: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    delta = adapt_delta(capsys, workdir / "base", "lota-tests/sums", tmp_path / "run")
    assert same_tensors(delta, reference)
    code, out, err = lota(
        capsys, "eval", workdir / "base", "--data", "lota-tests/sums", "--limit", "2",
        "--max-new-tokens", "1", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert asked == [("lota-tests/sums", "train"), ("lota-tests/sums", "test[:2]")]
    assert_refused(
        *lota(capsys, "eval", workdir / "base", "--data", "lota-tests/scripted"),
        "lota-tests/scripted", "scripts are no longer supported",
    )  # fmt: skip
