"""Reliability guarantees: the reader survives hostile files, nothing is unpickled, faults during a
run end with one clear line and leave no partial output."""

from __future__ import annotations

import errno
import json
import math
import pickle
import random

import pytest
import safetensors
import safetensors.torch
import torch

from lota import format as fmt
from lota.cli import main
from lota.digests import tensor_digest
from lota.errors import LotaError
from lota.selection import select

from .test_cli import ADAPT, assert_refused, lota


def _sample_files(tmp_path):
    shapes = {"a": (40, 30), "b": (7,), "c": (300, 300)}
    t = select("random", shapes, 600, seed=1)
    t.base_fingerprint = "blake2b:" + "0" * 32
    d = fmt.SparseDelta(t, {n: torch.randn(i.numel()) for n, i in t.items()})
    paths = [tmp_path / "t.safetensors", tmp_path / "d.safetensors"]
    fmt.save(t, paths[0])
    fmt.save(d, paths[1], values_dtype="bfloat16")
    return [p.read_bytes() for p in paths]


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # flip bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b))]
    elif kind == 2:  # overwrite a run with random bytes
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # insert bytes
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    elif kind == 4:  # corrupt the JSON header region (the first few hundred bytes)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(8, min(len(b), 2000))
            b[i] = rng.choice(b'{}[]",:0123456789-eE.  abcnulltrue')
    else:  # change the declared header length
        n = int.from_bytes(b[:8], "little") + rng.randint(-50, 50)
        b[:8] = max(0, n).to_bytes(8, "little")
    return bytes(b)


def test_fuzzed_files_only_raise_lota_errors(tmp_path):
    """10,000 mutated tickets and deltas: the reader either loads them or raises a LotaError."""
    originals = _sample_files(tmp_path)
    rng = random.Random(12345)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(10_000):
        path.write_bytes(_mutate(originals[i % 2], rng))
        try:
            obj = fmt.load(path)
        except LotaError as e:
            assert str(path) in e.line()
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            for idx in obj.indices.values():  # whatever loads is internally consistent
                assert idx.numel() == 0 or bool((idx[1:] > idx[:-1]).all())
    assert outcomes["refused"] > 9_000


def test_no_command_unpickles(workdir, capsys, monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("lota unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    out = tmp_path / "run"
    assert (
        main(
            [
                "adapt",
                str(workdir / "base"),
                "--data",
                str(workdir / "a.jsonl"),
                "--out",
                str(out),
                "--save-model",
                *ADAPT,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "mask",
                str(workdir / "base"),
                str(out / "model"),
                "--out",
                str(tmp_path / "t.safetensors"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "delta",
                str(workdir / "base"),
                str(out / "model"),
                "--ticket",
                str(tmp_path / "t.safetensors"),
                "--out",
                str(tmp_path / "d.safetensors"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "apply",
                str(workdir / "base"),
                str(tmp_path / "d.safetensors"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                str(tmp_path / "m"),
                "--data",
                str(workdir / "a.jsonl"),
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["inspect", str(tmp_path / "d.safetensors")]) == 0
    capsys.readouterr()


def test_disk_full_leaves_no_partial_output(workdir, capsys, monkeypatch, tmp_path):
    target = tmp_path / "t.safetensors"
    assert (
        main(
            ["mask", str(workdir / "base"), str(workdir / "base"), "--out", str(target), "--quiet"]
        )
        == 0
    )
    before = target.read_bytes()
    capsys.readouterr()

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(fmt, "save_safetensors", full)
    code, out, err = lota(
        capsys, "mask", workdir / "base", workdir / "base", "--out", target, "--quiet", "--force"
    )
    assert_refused(code, out, err, "No space left", exit_code=1)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_non_finite_loss_stops_and_keeps_checkpoint(workdir, capsys, tmp_path):
    out = tmp_path / "diverge"
    args = [a for a in ADAPT if a not in ("--lr", "1e-2")]
    code, o, err = lota(
        capsys,
        "adapt",
        workdir / "base",
        "--data",
        workdir / "a.jsonl",
        "--out",
        out,
        "--lr",
        "1e30",
        "--max-grad-norm",
        "0",
        "--steps",
        "20",
        "--calibration-steps",
        "1",
        "--optimizer",
        "sgd",
        *args[4:],
    )
    assert_refused(code, o, err, "loss became", "--lr", exit_code=1)
    assert (out / ".lota-checkpoint" / "state.safetensors").exists()
    assert not (out / "delta.safetensors").exists()


def test_out_of_memory_names_the_setting_to_lower(workdir, capsys, monkeypatch, tmp_path):
    from transformers import LlamaForCausalLM

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(LlamaForCausalLM, "forward", oom)
    code, o, err = lota(
        capsys,
        "adapt",
        workdir / "base",
        "--data",
        workdir / "a.jsonl",
        "--out",
        tmp_path / "o",
        *ADAPT,
    )
    assert_refused(code, o, err, "out of memory", "--batch-size", exit_code=1)
    assert not (tmp_path / "o" / "delta.safetensors").exists()


def test_unreadable_data_and_files(workdir, capsys, monkeypatch, tmp_path):
    from pathlib import Path

    real = Path.open

    def denied(self, *a, **k):
        if self.name == "secret.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    (tmp_path / "secret.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.setattr(Path, "open", denied)
    assert_refused(
        *lota(
            capsys,
            "adapt",
            workdir / "base",
            "--data",
            tmp_path / "secret.jsonl",
            "--out",
            tmp_path / "o",
            *ADAPT,
        ),
        "permission denied",
        "secret.jsonl",
    )
    assert not (tmp_path / "o").exists()


def test_non_utf8_data(workdir, capsys, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    assert_refused(*lota(capsys, "eval", workdir / "base", "--data", bad), "UTF-8")


@pytest.mark.parametrize(
    "flag,value", [("--max-new-tokens", "0"), ("--limit", "0"), ("--batch-size", "0")]
)
def test_eval_out_of_range(workdir, capsys, flag, value):
    assert_refused(
        *lota(capsys, "eval", workdir / "base", "--data", workdir / "a.jsonl", flag, value), flag
    )


def test_mask_of_different_architectures(workdir, capsys, tmp_path):
    assert_refused(
        *lota(
            capsys,
            "mask",
            workdir / "base",
            workdir / "other_arch",
            "--out",
            tmp_path / "t.safetensors",
        ),
        "differ",
    )
    assert not (tmp_path / "t.safetensors").exists()


def test_apply_a_ticket_is_refused(workdir, capsys, tmp_path):
    t = tmp_path / "t.safetensors"
    assert (
        main(["mask", str(workdir / "base"), str(workdir / "base"), "--out", str(t), "--quiet"])
        == 0
    )
    capsys.readouterr()
    assert_refused(*lota(capsys, "apply", workdir / "base", t, "--out", tmp_path / "m"), "ticket")
    assert not (tmp_path / "m").exists()


def test_mask_is_deterministic(workdir, tmp_path):
    from lota.task_vectors import make_ticket
    from lota.toy import save_toy_model

    save_toy_model(tmp_path / "tuned", seed=5, hidden=32, layers=2, heads=2)
    a = make_ticket(str(workdir / "base"), str(tmp_path / "tuned"), "0.9", show_progress=False)
    b = make_ticket(str(workdir / "base"), str(tmp_path / "tuned"), "0.9", show_progress=False)
    assert a.nnz == b.nnz and all(torch.equal(a.indices[n], b.indices[n]) for n in a.names)


def _tree_bytes(path):
    """``{relative name: bytes}`` of a file, or of every file under a folder."""
    if path.is_file():
        return {".safetensors": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_outputs_are_byte_identical_when_written_twice(workdir, capsys, tmp_path):
    """The same command on the same inputs writes the same bytes: safetensors keeps its metadata
    in a hash map whose order changes between writes, and lota writes it sorted."""
    from lota.toy import save_toy_model

    base, tuned = workdir / "base", tmp_path / "tuned"
    save_toy_model(tuned, seed=5, hidden=32, layers=2, heads=2)
    delta = tmp_path / "delta.safetensors"
    assert (
        lota(capsys, "delta", base, tuned, "--sparsity", "0.9", "--out", delta, "--quiet")[0] == 0
    )
    commands = {
        "delta": ["delta", base, tuned, "--sparsity", "0.9"],
        "mask": ["mask", base, tuned, "--sparsity", "0.9"],
        "merge": ["merge", delta, delta, "--method", "ties"],
        "export-peft": ["export-peft", delta, "--base", base],
        "ks": ["ks", base, tuned, "--top", "3"],
    }
    for command, argv in commands.items():
        outs = [tmp_path / f"{command}{i}" for i in range(2)]
        if command in ("delta", "mask", "merge"):
            outs = [o.with_suffix(".safetensors") for o in outs]
        for out in outs:
            code, _, err = lota(capsys, *argv, "--out", out, "--quiet")
            assert code == 0, err
        first, second = map(_tree_bytes, outs)
        assert any(name.endswith(".safetensors") for name in first), command
        assert first.keys() == second.keys(), command
        for name in first:
            assert first[name] == second[name], f"{command}: {name}"


def test_corrupt_checkpoint_is_refused(workdir, capsys, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "lota.cli",
        "adapt",
        str(workdir / "base"),
        "--data",
        str(workdir / "a.jsonl"),
        "--out",
        str(out),
        *ADAPT,
        "--checkpoint-every",
        "1",
    ]
    r = subprocess.run(
        args, env={**os.environ, "LOTA_FAULT": "train:1"}, capture_output=True, timeout=300
    )
    assert r.returncode == -signal.SIGKILL
    state = out / ".lota-checkpoint" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-5] ^= 0xFF
    state.write_bytes(bytes(data))
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "checkpoint" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- the matrix, per command
def _commands(workdir, trained, tmp_path, missing):
    d = trained / "delta.safetensors"
    base = workdir / "base"
    return {
        "adapt-model": [
            "adapt",
            missing,
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            *ADAPT,
        ],
        "adapt-data": ["adapt", base, "--data", missing, "--out", tmp_path / "o", *ADAPT],
        "adapt-protect": [
            "adapt",
            base,
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            "--protect",
            missing,
            *ADAPT,
        ],
        "adapt-ticket": [
            "adapt",
            base,
            "--data",
            workdir / "a.jsonl",
            "--out",
            tmp_path / "o",
            "--ticket",
            missing,
            *ADAPT,
        ],
        "mask-base": ["mask", missing, base, "--out", tmp_path / "o"],
        "mask-tuned": ["mask", base, missing, "--out", tmp_path / "o"],
        "delta-ticket": ["delta", base, base, "--ticket", missing, "--out", tmp_path / "o"],
        "apply-base": ["apply", missing, d, "--out", tmp_path / "o"],
        "apply-delta": ["apply", base, missing, "--out", tmp_path / "o"],
        "eval-model": ["eval", missing, "--data", workdir / "a.jsonl"],
        "eval-data": ["eval", base, "--data", missing],
        "inspect": ["inspect", missing],
        "merge-input": ["merge", d, missing, "--out", tmp_path / "o"],
        "merge-base": ["merge", base, base, "--base", missing, "--out", tmp_path / "o"],
        "ks-model": ["ks", missing, base, "--out", tmp_path / "o"],
        "ks-tuned": ["ks", base, missing, "--out", tmp_path / "o"],
        "ks-data": ["ks", base, base, "--data", missing, "--out", tmp_path / "o"],
        "import-mask": ["import-mask", missing, "--out", tmp_path / "o"],
        "export-mask": ["export-mask", missing, "--out", tmp_path / "o"],
    }


@pytest.mark.parametrize(
    "case",
    [
        "adapt-model",
        "adapt-data",
        "adapt-protect",
        "adapt-ticket",
        "mask-base",
        "mask-tuned",
        "delta-ticket",
        "apply-base",
        "apply-delta",
        "eval-model",
        "eval-data",
        "inspect",
        "merge-input",
        "merge-base",
        "ks-model",
        "ks-tuned",
        "ks-data",
        "import-mask",
        "export-mask",
    ],
)
def test_missing_path_every_command(workdir, trained, capsys, tmp_path, case):
    missing = tmp_path / "does-not-exist"
    capsys.readouterr()
    assert_refused(
        *lota(capsys, *_commands(workdir, trained, tmp_path, missing)[case]), "does-not-exist"
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["adapt", "delta", "apply"])
def test_disk_full_every_writing_command(workdir, capsys, monkeypatch, tmp_path, command):
    from transformers import PreTrainedModel

    from lota.models import load_model
    from lota.targets import resolve_targets

    t = select("random", resolve_targets(load_model(str(workdir / "base"))), 10, seed=0)
    sample = tmp_path / "sample.safetensors"
    fmt.save(fmt.SparseDelta(t, {n: torch.ones(i.numel()) for n, i in t.items()}), sample)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt, "save_safetensors", full)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    src = workdir / "base"
    args = {
        "adapt": ["adapt", src, "--data", workdir / "a.jsonl", "--out", tmp_path / "o", *ADAPT],
        "delta": [
            "delta",
            src,
            src,
            "--sparsity",
            "0.9",
            "--out",
            tmp_path / "o.safetensors",
            "--quiet",
        ],
        "apply": ["apply", src, sample, "--out", tmp_path / "o", "--allow-mismatch"],
    }[command]
    assert_refused(*lota(capsys, *args), "No space left", exit_code=1)
    assert not (tmp_path / "o.safetensors").exists()
    assert (
        not (tmp_path / "o" / "delta.safetensors").exists()
        and not (tmp_path / "o" / "model").exists()
    )
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []


def test_hypothesis_fuzz_of_the_reader(tmp_path):
    """Hypothesis-generated edits (up to 4 byte-level mutations each) of a ticket and a delta."""
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    originals = _sample_files(tmp_path)
    path = tmp_path / "hyp.safetensors"
    edit = st.tuples(
        st.sampled_from(["flip", "cut", "put", "insert"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=24),
    )

    @settings(
        max_examples=10_000,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hyp.given(which=st.integers(0, 1), edits=st.lists(edit, min_size=1, max_size=4))
    def check(which, edits):
        b = bytearray(originals[which])
        for kind, where, payload in edits:
            i = min(int(where * len(b)), max(len(b) - 1, 0))
            if kind == "flip" and b:
                b[i] ^= payload[0] or 1
            elif kind == "cut":
                del b[i:]
            elif kind == "put":
                b[i : i + len(payload)] = payload
            else:
                b[i:i] = payload
        path.write_bytes(bytes(b))
        try:
            obj = fmt.load(path)
        except LotaError as e:
            assert str(path) in e.line()
        else:
            for idx in obj.indices.values():
                assert idx.numel() == 0 or bool((idx[1:] > idx[:-1]).all())

    check()


# Values a hostile header may put where lota writes an int, a list of ints or a string.
_HOSTILE_VALUES = [
    -1, 0, 1, 2**31, 2**63 - 1, 2**63, 2**64 + 5, 10**30, -(2**63), 3.0, 32.7, -0.0, 1e308,
    True, False, None, "", "165", "gaps", "full", [], [1], [2.5, 4], ["4", 4], [True, 3],
    [2**40, 2**40], [-1, 4], {}, {"a": 1}, [[[[1]]]],
]  # fmt: skip


def _deep(depth: int, rng: random.Random):
    """A JSON value nested ``depth`` levels deep (lists or objects)."""
    v = rng.choice(_HOSTILE_VALUES)
    for _ in range(depth):
        v = [v] if rng.random() < 0.5 else {"k": v}
    return v


def _hostile_header(header: dict, rng: random.Random) -> dict:
    """One structured edit of a lota header: a field of a tensor entry or the top level set to a
    wrongly typed, out-of-range or deeply nested value, or a field dropped."""
    tensors = header.get("tensors")  # an earlier edit may have broken it already
    entries = (
        [e for e in tensors.values() if isinstance(e, dict)] if isinstance(tensors, dict) else []
    )
    target = rng.choice(entries) if entries and rng.random() < 0.7 else header
    fields = list(target) + ["shape", "nnz", "encoding", "rice_r", "values_dtype", "extra"]
    key = rng.choice(fields)
    roll = rng.random()
    if roll < 0.1:
        target.pop(key, None)
    elif roll < 0.25:
        target[key] = _deep(rng.choice([2, 50, 70, 500, 900]), rng)
    elif roll < 0.35 and key == "shape" and isinstance(target.get(key), list) and target[key]:
        target[key][rng.randrange(len(target[key]))] = rng.choice(_HOSTILE_VALUES)
    elif roll < 0.45 and key in ("nnz", "numel") and type(target.get(key)) is int:
        target[key] += rng.choice([-1, 1, 2**62, -(2**62)])
    else:
        target[key] = rng.choice(_HOSTILE_VALUES)
    return header


def _hostile_gaps(tensors: dict, header: dict, rng: random.Random) -> None:
    """Gaps whose running sum wraps int64, for a tensor whose shape is made to allow them."""
    name = rng.choice(list(header["tensors"]))
    n = rng.randint(2, 5)
    gaps = torch.full((n,), rng.choice([2**61, 2**62, 2**63 - 2]), dtype=torch.int64)
    e = header["tensors"][name]
    old = e["nnz"]
    e.update(shape=[2**63 - 1], nnz=n, encoding="gaps")
    for suffix in ("mask", "gaps", "rice_q", "rice_r"):
        tensors.pop(f"{name}::{suffix}", None)
    tensors[f"{name}::gaps"] = gaps
    header["numel"] = sum(math.prod(t["shape"]) for t in header["tensors"].values())
    header["nnz"] += n - old
    if f"{name}::values" in tensors:
        tensors[f"{name}::values"] = torch.zeros(n)
    for k, t in tensors.items():
        header["checksums"][k] = tensor_digest(t)


def _check_loads_or_refuses(path) -> str:
    try:
        obj = fmt.load(path)
    except LotaError as e:
        assert str(path) in e.line()
        assert "\n" not in e.line()
        return "refused"
    with safetensors.safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["header"])
    exact = lambda x: type(x) is int  # noqa: E731 (no bool, float or str passes for a count)
    for name, idx in obj.indices.items():  # whatever loads keeps the ticket's invariant
        assert idx.dtype == torch.int64 and idx.dim() == 1
        if idx.numel():
            assert int(idx[0]) >= 0 and int(idx[-1]) < math.prod(obj.shapes[name])
            assert bool((idx[1:] > idx[:-1]).all())
        e = header["tensors"][name]  # and is exactly what its header says, nothing coerced
        assert all(exact(d) for d in e["shape"]) and list(obj.shapes[name]) == e["shape"]
        assert exact(e["nnz"]) and e["nnz"] == idx.numel()
    assert exact(header["numel"]) and header["numel"] == obj.numel
    assert exact(header["nnz"]) and header["nnz"] == obj.nnz
    return "loaded"


def test_fuzzed_header_fields_only_raise_lota_errors(tmp_path):
    """3,000 structured edits of the header (wrong types, floats and strings for counts, huge or
    negative sizes, deep nesting, dropped fields, overflowing gap lists): every file is refused
    with lota's own one-line error naming it, or loads with the ticket's invariant intact."""
    originals = _sample_files(tmp_path)
    parsed = []
    for i, data in enumerate(originals):
        p = tmp_path / f"orig{i}.safetensors"
        p.write_bytes(data)
        with safetensors.safe_open(str(p), "pt") as f:
            parsed.append((dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}))
    rng = random.Random(2024)
    path = tmp_path / "hostile.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(3_000):
        meta, tensors = parsed[i % 2]
        meta, tensors = dict(meta), dict(tensors)
        header = json.loads(meta["header"])
        if rng.random() < 0.1:
            _hostile_gaps(tensors, header, rng)
        else:
            for _ in range(rng.randint(1, 3)):
                header = _hostile_header(header, rng)
        meta["header"] = json.dumps(header)
        safetensors.torch.save_file(tensors, str(path), metadata=meta)
        outcomes[_check_loads_or_refuses(path)] += 1
    assert outcomes["refused"] > 2_500, outcomes


def test_hypothesis_fuzz_of_header_fields(tmp_path):
    """Hypothesis puts arbitrary JSON (nested up to any depth it likes) in any header field."""
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    originals = _sample_files(tmp_path)
    p = tmp_path / "orig.safetensors"
    p.write_bytes(originals[0])
    with safetensors.safe_open(str(p), "pt") as f:
        meta0, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "hyp.safetensors"
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True)
        | st.text(max_size=8)
    )
    values = st.recursive(
        scalars,
        lambda kids: (
            st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3)
        ),
        max_leaves=40,
    )
    fields = ["shape", "nnz", "encoding", "rice_r", "values_dtype"]
    top = ["tensors", "numel", "nnz", "checksums", "config", "created_by"]

    @settings(
        max_examples=2_000,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hyp.given(
        where=st.sampled_from(["a", "b", "c", "top"]),
        field=st.integers(0, 5),
        value=values,
        depth=st.sampled_from([0, 0, 0, 65, 900]),
    )
    def check(where, field, value, depth):
        header = json.loads(meta0["header"])
        for _ in range(depth):
            value = [value]
        if where == "top":
            header[top[field]] = value
        else:
            header["tensors"][where][fields[field % len(fields)]] = value
        meta = dict(meta0, header=json.dumps(header))
        safetensors.torch.save_file(tensors, str(path), metadata=meta)
        _check_loads_or_refuses(path)

    check()


@pytest.mark.parametrize(
    "content,words",
    [
        ('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "x"\n', [":2", "invalid JSON"]),
        ("", ["no examples"]),
        ('{"prompt": 3, "completion": "2"}\n', [":1", "prompt"]),
    ],
)
def test_eval_malformed_data_names_the_line(workdir, capsys, tmp_path, content, words):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    assert_refused(*lota(capsys, "eval", workdir / "base", "--data", data), *words)


def _json_values(st):
    """Hypothesis strategy of any JSON value: NaN and infinities, huge integers, strings that
    look like regexes or numbers, lists and objects nested as deep as it likes."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=True)
        | st.text(max_size=12)
        | st.sampled_from(["(.*.*)*X", "q_proj", "^lm_head", "all-linear", "pissa", "LORA", "8"])
        | st.sampled_from([10**400, -(10**400), 2**31, 2**40])
    )
    return st.recursive(
        scalars,
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4)
        ),
        max_leaves=30,
    )


def test_hypothesis_fuzz_of_adapter_configs(workdir, tmp_path):
    """Hypothesis puts any JSON value (or several) in any field of a PEFT adapter's
    adapter_config.json, PEFT's fields and unknown ones, or replaces the whole file: the import
    either reproduces a finite change of the base's shapes or refuses with lota's one-line input
    error, never another exception or a hang."""
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    from lota.errors import InputError
    from lota.lora_import import lora_deltas
    from lota.weights import WeightReader

    from .test_lora_import import QKV, peft_adapter

    peft_adapter(workdir / "base", tmp_path / "adapter", target_modules=QKV)
    path = tmp_path / "adapter" / "adapter_config.json"
    good = json.loads(path.read_text())
    reader = WeightReader(str(workdir / "base"))
    fields = sorted(good) + ["use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "junk"]
    edit = st.tuples(
        st.sampled_from(fields), _json_values(st), st.sampled_from([0, 0, 0, 70, 3000])
    )

    @settings(
        max_examples=500,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hyp.given(edits=st.lists(edit, min_size=1, max_size=3), whole=st.booleans())
    def check(edits, whole):
        cfg, deep = dict(good), {}
        for i, (name, value, depth) in enumerate(edits):
            cfg[name] = f"@{i}@"  # nested by text below: json.dumps itself would recurse
            deep[f'"@{i}@"'] = "[" * depth + json.dumps(value) + "]" * depth
        text = json.dumps(edits[0][1]) if whole else json.dumps(cfg)
        for marker, nested in deep.items():
            text = text.replace(marker, nested)
        path.write_text(text)
        try:
            changes = lora_deltas(str(tmp_path / "adapter"), reader)
        except InputError as e:
            assert "\n" not in e.line() and e.exit_code == 2
            return
        for name, change in changes.items():
            assert tuple(change.shape) == reader.shapes[name]
            assert bool(torch.isfinite(change).all()), name
        imported.append(edits)

    imported = []
    check()
    assert len(imported) > 20  # the fuzz reaches the merge, not only the refusals


def test_hypothesis_fuzz_of_official_mask_files(workdir, tmp_path, monkeypatch):
    """Hypothesis writes .pt mask files of any entries: names of the base's parameters or not,
    tensors of any dtype and shape, dense, strided views (expand, transpose, slices), sparse or
    meta tensors, or plain values; imported with and without the base, each becomes a ticket of
    exactly its shapes or ends in lota's one-line input error."""
    hyp = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st

    from lota import weights
    from lota.errors import InputError
    from lota.official import import_official
    from lota.weights import WeightReader

    base = str(workdir / "base")
    reader = WeightReader(base)  # read once: the fuzz is about the mask files
    monkeypatch.setattr(weights, "WeightReader", lambda *a, **k: reader)
    shapes = reader.shapes
    names = sorted(shapes)[:6]
    dtypes = [torch.bool, torch.uint8, torch.int64, torch.float32, torch.bfloat16, torch.complex64]
    path = tmp_path / "m.pt"

    def make(kind, dtype, shape, seed):
        one = torch.ones([1] * len(shape), dtype=dtype)
        if kind == "expand" or math.prod(shape) > 10**5:  # a huge shape only as a view
            return one.expand(shape) if math.prod(shape) else one.reshape(-1)[:0].reshape(shape)
        g = torch.Generator().manual_seed(seed)
        dense = (torch.rand(shape, generator=g) < 0.5).to(dtype)
        if kind == "values":
            return (torch.rand(shape, generator=g) * 3).to(dtype)
        if kind == "transpose" and len(shape) == 2:
            return dense.T.contiguous().T
        if kind == "slice" and shape:
            return torch.cat([dense, dense], dim=0)[: shape[0]]
        if kind == "sparse":
            return dense.to(torch.float32).to_sparse()
        if kind == "meta":
            return torch.zeros(shape, device="meta")
        return dense

    tensor = st.builds(
        make,
        st.sampled_from(
            ["dense", "dense", "values", "expand", "transpose", "slice", "sparse", "meta"]
        ),
        st.sampled_from(dtypes),
        st.one_of(
            st.sampled_from([list(shapes[n]) for n in names]),
            st.lists(st.integers(0, 5), max_size=3),
            st.just([20_000, 20_000]),
        ),
        st.integers(0, 2**16),
    )
    entry_name = st.sampled_from(names) | st.text(max_size=8)
    value = tensor | st.integers() | st.text(max_size=4) | st.lists(st.integers(), max_size=2)

    @settings(
        max_examples=300,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hyp.given(entries=st.dictionaries(entry_name, value, max_size=4), with_base=st.booleans())
    def check(entries, with_base):
        torch.save(entries, path)
        try:
            ticket = import_official(str(path), base if with_base else None)
        except InputError as e:
            assert "\n" not in e.line() and e.exit_code == 2
            return
        for name, m in entries.items():
            assert ticket.shapes[name] == tuple(m.shape)
            assert ticket.indices[name].numel() <= m.numel()
            outcomes.add(name)

    outcomes = set()
    check()
    assert outcomes  # some files did import
