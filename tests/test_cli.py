"""The CLI end to end, in-process, and its answer to bad input: one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lota import format as fmt
from lota.cli import main
from lota.selection import select
from lota.ticket import Ticket

from .conftest import (
    ADAPT,  # noqa: F401 (other test modules import it from here)
    write_jsonl,
)


def lota(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_end_to_end_commands(workdir, trained, capsys):
    base, tuned = workdir / "base", trained / "model"
    code, out, _ = lota(
        capsys,
        "mask",
        base,
        tuned,
        "--sparsity",
        "0.95",
        "--out",
        workdir / "t.safetensors",
        "--quiet",
    )
    assert code == 0 and "mask:" in out
    code, out, _ = lota(capsys, "inspect", workdir / "t.safetensors", "--json")
    info = json.loads(out)
    assert (
        info["kind"] == "ticket"
        and info["format_version"] == 1
        and info["nnz"] == info["numel"] // 20
    )
    for key in ("numel", "density", "base_fingerprint", "tensors", "file_bytes"):
        assert key in info
    assert sum(t["nnz"] for t in info["tensors"].values()) == info["nnz"]

    code, _, _ = lota(
        capsys,
        "delta",
        base,
        tuned,
        "--ticket",
        workdir / "t.safetensors",
        "--out",
        workdir / "d1.safetensors",
        "--quiet",
    )
    assert code == 0
    code, _, _ = lota(
        capsys,
        "delta",
        base,
        tuned,
        "--sparsity",
        "0.95",
        "--out",
        workdir / "d2.safetensors",
        "--quiet",
    )
    assert code == 0
    d1, d2 = fmt.load(workdir / "d1.safetensors"), fmt.load(workdir / "d2.safetensors")
    assert all(torch.equal(d1.indices[n], d2.indices[n]) for n in d1.names)
    assert d1.base_fingerprint == info["base_fingerprint"]

    # The trained run's own delta applied to the base reproduces the saved model bit for bit.
    code, out, _ = lota(
        capsys, "apply", base, trained / "delta.safetensors", "--out", workdir / "applied"
    )
    assert code == 0 and "apply:" in out
    from safetensors.torch import load_file

    a, b = (
        load_file(str(workdir / "applied" / "model.safetensors")),
        load_file(str(tuned / "model.safetensors")),
    )
    assert all(torch.equal(a[n], b[n]) for n in a)

    code, out, _ = lota(
        capsys,
        "eval",
        workdir / "applied",
        "--data",
        workdir / "a.jsonl",
        "--limit",
        "3",
        "--max-new-tokens",
        "2",
        "--json",
        "--quiet",
    )
    result = json.loads(out)
    assert (
        code == 0
        and result["n"] == 3
        and 0 <= result["score"] <= 1
        and len(result["examples"]) == 3
    )
    assert {"prediction", "reference", "score"} <= set(result["examples"][0])

    code, out, _ = lota(capsys, "inspect", trained / "delta.safetensors")
    assert code == 0 and "lota delta" in out


def test_lotto_chain_through_cli(workdir, trained, capsys):
    code, out, err = lota(
        capsys,
        "adapt",
        trained / "model",
        "--data",
        workdir / "b.jsonl",
        "--out",
        workdir / "cli_b",
        "--protect",
        trained / "delta.safetensors",
        *ADAPT,
    )
    assert code == 0, err
    a, b = (
        fmt.load(trained / "delta.safetensors"),
        fmt.load(workdir / "cli_b" / "delta.safetensors"),
    )
    assert a.ticket.overlap(b.ticket) == 0 and a.nnz == b.nnz
    # B was trained on top of A: applying A then B to the original base is accepted (a chain).
    code, _, err = lota(
        capsys,
        "apply",
        workdir / "base",
        trained / "delta.safetensors",
        workdir / "cli_b" / "delta.safetensors",
        "--out",
        workdir / "chain",
    )
    assert code == 0, err


# ---------------------------------------------------------------------------- bad input
def assert_refused(code, out, err, *words, exit_code=2):
    assert code == exit_code, (code, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lota: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_negative_numbers_are_values_also_after_a_space(workdir, trained, capsys, tmp_path):
    from lota.weights import WeightReader

    base, delta = workdir / "base", trained / "delta.safetensors"
    for form, out in [(["--scales", "-1,0.5"], "a"), (["--scales=-1,0.5"], "b")]:
        code, _, err = lota(capsys, "apply", base, delta, delta, *form, "--out", tmp_path / out)
        assert code == 0, err
    a, b = WeightReader(str(tmp_path / "a")), WeightReader(str(tmp_path / "b"))
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.shapes)
    # a negative exponent reaches lota's own check, not argparse's usage error
    code, out, err = lota(
        capsys, "adapt", base, "--data", workdir / "a.jsonl", "--out", tmp_path / "o", "--lr",
        "-1e-3", "--steps", "1",
    )  # fmt: skip
    assert_refused(code, out, err, "--lr -0.001 must be > 0")
    code, out, err = lota(capsys, "apply", base, delta, "--scales", "-inf", "--out", tmp_path / "c")
    assert_refused(code, out, err, "--scales: scale -inf")
    code, _, err = lota(capsys, "apply", base, delta, "-x", "--out", tmp_path / "c")
    assert code == 2 and "unrecognized arguments: -x" in err  # an unknown option still is one


def test_missing_model(workdir, capsys):
    out = workdir / "bad_missing_model"
    assert_refused(
        *lota(
            capsys, "adapt", workdir / "nope", "--data", workdir / "a.jsonl", "--out", out, *ADAPT
        ),
        "nope",
    )
    assert not out.exists()


def test_missing_data(workdir, capsys):
    out = workdir / "bad_missing_data"
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            workdir / "nope.jsonl",
            "--out",
            out,
            *ADAPT,
        ),
        "nope.jsonl",
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "content,words",
    [
        ('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "x"\n', [":2", "invalid JSON"]),
        ('{"prompt": "1+1=", "completion": "2"}\n\n[1, 2]\n', [":3", "JSON object"]),
        ('{"prompt": "1+1=", "answer": "2"}\n', [":1", "completion"]),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n',
            [":1", "assistant"],
        ),
        ("", ["no examples"]),
        ("\n  \n", ["no examples"]),
    ],
)
def test_malformed_data_names_the_line(workdir, capsys, content, words, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    assert_refused(
        *lota(capsys, "adapt", workdir / "base", "--data", data, "--out", out, *ADAPT), *words
    )
    assert not out.exists()


def test_all_too_long_data(workdir, capsys, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 50, "completion": "y"}])
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            data,
            "--out",
            tmp_path / "o",
            "--max-length",
            "16",
            *ADAPT,
        ),
        "max-length",
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sparsity", ["1", "1.0", "-0.1", "abc", "nan"])
def test_sparsity_out_of_range(workdir, capsys, tmp_path, sparsity):
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            "--sparsity",
            sparsity,
            *ADAPT,
        ),
        "sparsity",
    )
    assert not (tmp_path / "o").exists()
    assert_refused(
        *lota(
            capsys,
            "mask",
            workdir / "base",
            workdir / "base",
            "--sparsity",
            sparsity,
            "--out",
            tmp_path / "t.safetensors",
        ),
        "sparsity",
    )
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "0"),
        ("--batch-size", "0"),
        ("--steps", "0"),
        ("--method", "magic"),
        ("--optimizer", "lion"),
        ("--protect-mode", "sideways"),
    ],
)
def test_out_of_range_settings(workdir, capsys, tmp_path, flag, value):
    args = [a for a in ADAPT]
    if flag in args:
        i = args.index(flag)
        del args[i : i + 2]
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            flag,
            value,
            *args,
        ),
        flag.lstrip("-").split("-")[0],
    )
    assert not (tmp_path / "o").exists()


def test_protect_file_for_another_architecture(workdir, capsys, tmp_path):
    shapes = {"model.layers.0.self_attn.q_proj.weight": (48, 48)}
    t = select("random", shapes, 10, seed=0)
    fmt.save(t, tmp_path / "other.safetensors")
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            "--protect",
            tmp_path / "other.safetensors",
            *ADAPT,
        ),
        "other.safetensors",
        "shape",
    )
    assert not (tmp_path / "o").exists()


def test_mask_protect_file_wider_than_the_targets(workdir, trained, capsys, tmp_path):
    out, protect = tmp_path / "t.safetensors", trained / "delta.safetensors"
    code, _, err = lota(
        capsys,
        "mask",
        workdir / "base",
        trained / "model",
        "--targets",
        r"self_attn\.",
        "--protect",
        protect,
        "--out",
        out,
        "--quiet",
    )
    assert code == 0, err
    t, a = fmt.load(out), fmt.load(protect)
    assert all("self_attn" in n for n in t.names) and t.overlap(a.ticket) == 0


def test_ticket_outside_the_targets_is_named_as_such(workdir, trained, capsys, tmp_path):
    out = tmp_path / "o"
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            workdir / "a.jsonl",
            "--out",
            out,
            "--ticket",
            trained / "delta.safetensors",
            "--targets",
            r"self_attn\.q_proj",
            *ADAPT,
        ),
        "ticket has tensor",
        "targets do not have",
        "--targets",
    )
    assert not out.exists()


def test_ticket_overlapping_protection(workdir, trained, capsys, tmp_path):
    d = trained / "delta.safetensors"
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            "--ticket",
            d,
            "--protect",
            d,
            *ADAPT,
        ),
        "protected",
    )
    assert not (tmp_path / "o").exists()


def test_apply_refuses_foreign_base_unless_overridden(workdir, trained, capsys, tmp_path):
    other = tmp_path / "other_base"
    from lota.toy import save_toy_model

    save_toy_model(other, seed=7, hidden=32, layers=2, heads=2)
    assert_refused(
        *lota(capsys, "apply", other, trained / "delta.safetensors", "--out", tmp_path / "m"),
        "allow-mismatch",
    )
    assert not (tmp_path / "m").exists()
    code, _, err = lota(
        capsys,
        "apply",
        other,
        trained / "delta.safetensors",
        "--out",
        tmp_path / "m",
        "--allow-mismatch",
    )
    assert code == 0, err


def test_apply_refuses_wrong_architecture(workdir, trained, capsys, tmp_path):
    assert_refused(
        *lota(
            capsys,
            "apply",
            workdir / "other_arch",
            trained / "delta.safetensors",
            "--out",
            tmp_path / "m",
            "--allow-mismatch",
        ),
        "delta.safetensors",
    )
    assert not (tmp_path / "m").exists()


def test_apply_refuses_non_finite_delta(workdir, trained, capsys, tmp_path, monkeypatch):
    from lota.delta import SparseDelta

    d = fmt.load(trained / "delta.safetensors")
    name = d.names[0]
    d.values[name][0] = float("nan")
    with monkeypatch.context() as m:  # a file some other writer made: lota.save refuses NaN
        m.setattr(SparseDelta, "check_finite", lambda self, where="delta": None)
        fmt.save(d, tmp_path / "nan.safetensors")
    assert_refused(
        *lota(
            capsys, "apply", workdir / "base", tmp_path / "nan.safetensors", "--out", tmp_path / "m"
        ),
        "non-finite",
    )
    assert not (tmp_path / "m").exists()


def test_inspect_refuses_non_lota_and_corrupt_files(workdir, trained, capsys, tmp_path):
    assert_refused(
        *lota(capsys, "inspect", workdir / "base" / "model.safetensors"), "not a lota file"
    )
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes((trained / "delta.safetensors").read_bytes()[:-100])
    assert_refused(*lota(capsys, "inspect", bad), "cut.safetensors")
    assert_refused(*lota(capsys, "inspect", tmp_path / "missing.safetensors"), "not found")


def test_existing_output_is_not_overwritten(workdir, trained, capsys, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_refused(
        *lota(
            capsys, "adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *ADAPT
        ),
        "--force",
    )
    assert (out / "precious.txt").read_text() == "keep me"
    assert_refused(
        *lota(capsys, "apply", workdir / "base", trained / "delta.safetensors", "--out", out),
        "--force",
    )
    assert (out / "precious.txt").read_text() == "keep me"


def test_model_without_safetensors_is_refused(workdir, capsys, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(workdir / "base", folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert_refused(*lota(capsys, "eval", folder, "--data", workdir / "a.jsonl"), "safetensors")


def test_unknown_metric(workdir, capsys):
    assert_refused(
        *lota(capsys, "eval", workdir / "base", "--data", workdir / "a.jsonl", "--metric", "bleu"),
        "metric",
    )


def test_ticket_overlap_count(workdir, trained):
    d = fmt.load(trained / "delta.safetensors")
    assert d.ticket.overlap(d.ticket) == d.nnz
    empty = Ticket(shapes=d.shapes, indices={n: torch.zeros(0, dtype=torch.long) for n in d.names})
    assert d.ticket.overlap(empty) == 0
