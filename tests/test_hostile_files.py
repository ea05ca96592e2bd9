"""Hostile lota files and misuse of the Python API: one clear refusal, never a crash or a huge
allocation, and nothing written.

The files here are crafted by hand: a header that declares more than the file holds, gap lists
whose running sum overflows int64, deeply nested or loosely typed JSON, totals that disagree with
the tensors. The API cases build tickets and deltas that break their invariants.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import lota
from lota import format as fmt
from lota.digests import tensor_digest
from lota.errors import FormatError, InputError, MismatchError
from lota.ticket import Ticket

from .conftest import ADAPT, watch_fifo
from .test_cli import assert_refused
from .test_cli import lota as run_lota

FP = "blake2b:" + "0" * 32


def _write(path: Path, entries: dict, tensors: dict | None = None, kind: str = "ticket", **top):
    """A lota file with exactly the header given (checksums recorded for ``tensors``)."""
    tensors = tensors or {}
    header = {
        "tensors": entries,
        "numel": sum(_numel(e["shape"]) for e in entries.values()),
        "nnz": sum(e["nnz"] for e in entries.values()),
        "checksums": {k: tensor_digest(t) for k, t in tensors.items()},
        "config": {},
        "created_by": "test",
    }
    header.update(top)
    _write_header(path, json.dumps(header), tensors, kind)
    return path


def _write_header(path: Path, header: str, tensors: dict | None = None, kind: str = "ticket"):
    meta = {
        "format": "lota",
        "kind": kind,
        "format_version": "1",
        "base_fingerprint": FP,
        "header": header,
    }
    safetensors.torch.save_file(tensors or {}, str(path), metadata=meta)
    return path


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _peak_rss_since_reset() -> int | None:
    """Peak resident set size in bytes since the last ``_reset_peak_rss`` (Linux only)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------- declared sizes
@pytest.mark.parametrize("numel", [50_000_000, 250_000_000, 6_000_000_000])
def test_inspect_of_a_huge_full_ticket_allocates_nothing(tmp_path, capsys, numel):
    """A few-KB ticket whose header declares a "full" tensor of ``numel`` entries: ``inspect``
    answers from the header (after verifying the other tensors) without materialising them."""
    path = _write(
        tmp_path / "full.safetensors",
        {"w": {"shape": [numel], "nnz": numel, "encoding": "full"}},
    )
    assert path.stat().st_size < 4096
    if not _reset_peak_rss():
        pytest.skip("peak RSS cannot be measured here")
    before = _current_rss()
    code, out, err = run_lota(capsys, "inspect", path, "--json")
    grown = _peak_rss_since_reset() - before
    assert code == 0, err
    info = json.loads(out)
    assert info["nnz"] == numel and info["numel"] == numel
    assert info["tensors"]["w"] == {
        "shape": [numel],
        "nnz": numel,
        "numel": numel,
        "encoding": "full",
    }
    assert grown < 100 * 2**20, f"inspect grew by {grown / 2**20:.0f} MiB"


def test_describe_of_a_full_ticket_equals_the_loaded_answer(tmp_path):
    """The arithmetic answer of ``describe`` is the one loading the whole file gives."""
    t = Ticket(
        shapes={"a": (4, 5), "b": (3,), "c": (2, 2)},
        indices={
            "a": torch.arange(20),
            "b": torch.tensor([1]),
            "c": torch.zeros(0, dtype=torch.long),
        },
    )
    path = tmp_path / "t.safetensors"
    fmt.save(t, path)
    info = fmt.describe(path)
    assert info["tensors"]["a"]["encoding"] == "full"
    assert info["nnz"] == t.nnz == 21 and info["numel"] == t.numel == 27
    assert {n: e["nnz"] for n, e in info["tensors"].items()} == {"a": 20, "b": 1, "c": 0}


def test_loading_a_huge_full_ticket_is_refused(workdir, trained, capsys, tmp_path):
    """Loading would materialise 6e9 indices (48 GB) that no byte of the file backs: refused in
    one line before anything is allocated, unless the model's shapes vouch for the size."""
    path = _write(
        tmp_path / "full.safetensors",
        {"w": {"shape": [6_000_000_000], "nnz": 6_000_000_000, "encoding": "full"}},
    )
    with pytest.raises(FormatError, match="full") as info:
        fmt.load(path)
    assert str(path) in str(info.value)
    out = tmp_path / "d.safetensors"
    code, _, err = run_lota(
        capsys, "delta", workdir / "base", trained / "model", "--ticket", path, "--out", out
    )
    # with a base at hand the header is checked against the model's tensors first: refused in one
    # line as not the model's, before any index is materialised
    assert_refused(code, "", err, "full.safetensors", "'w' is not a tensor of the model")
    assert not out.exists()
    # shapes that disagree with the file are refused from the header, before any decoding
    with pytest.raises(MismatchError, match="'w'"):
        fmt.load(path, shapes={"w": (10,)})


def test_full_ticket_within_the_models_shapes_loads(tmp_path):
    path = _write(
        tmp_path / "full.safetensors", {"w": {"shape": [3, 4], "nnz": 12, "encoding": "full"}}
    )
    t = fmt.load(path, shapes={"w": (3, 4), "other": (5,)})
    assert torch.equal(t.indices["w"], torch.arange(12))


def test_full_delta_is_bounded_by_its_values(tmp_path):
    """A delta's "full" tensor must carry one value per entry: the header's count is checked
    against the values tensor before any index is made."""
    values = torch.ones(4)
    path = _write(
        tmp_path / "d.safetensors",
        {"w": {"shape": [250_000_000], "nnz": 250_000_000, "encoding": "full"}},
        {"w::values": values},
        kind="delta",
    )
    if not _reset_peak_rss():
        pytest.skip("peak RSS cannot be measured here")
    before = _current_rss()
    with pytest.raises(FormatError, match="values"):
        fmt.load(path)
    assert _peak_rss_since_reset() - before < 100 * 2**20


# ---------------------------------------------------------------------------- gap overflow
def _overflowing_gaps(tmp_path) -> Path:
    gaps = torch.tensor([2**62, 2**62, 2**62], dtype=torch.int64)
    return _write(
        tmp_path / "gaps.safetensors",
        {"layer.w": {"shape": [2**63 - 1], "nnz": 3, "encoding": "gaps"}},
        {"layer.w::gaps": gaps},
    )


def test_gap_sum_overflow_is_refused(tmp_path, capsys):
    path = _overflowing_gaps(tmp_path)
    with pytest.raises(FormatError, match="layer.w") as info:
        fmt.load(path)
    assert str(path) in str(info.value)
    assert_refused(*run_lota(capsys, "inspect", path), "gaps.safetensors", "layer.w")


def test_decode_refuses_gaps_whose_sum_wraps():
    gaps = torch.tensor([2**62, 2**62, 2**62], dtype=torch.int64)
    with pytest.raises(ValueError, match="overflow"):
        fmt.decode_indices("gaps", gaps, 2**63 - 1, 3)


def test_tensor_larger_than_int64_indices_is_refused(tmp_path):
    path = _write(
        tmp_path / "big.safetensors",
        {"w": {"shape": [2**40, 2**40], "nnz": 0, "encoding": "empty"}},
    )
    with pytest.raises(FormatError, match="'w'"):
        fmt.load(path)


# ---------------------------------------------------------------------------- JSON headers
@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_header_is_refused(tmp_path, capsys, depth):
    header = '{"tensors": {}, "numel": 0, "nnz": 0, "config": ' + "[" * depth + "]" * depth + "}"
    path = _write_header(tmp_path / "deep.safetensors", header)
    with pytest.raises(FormatError, match="nested"):
        fmt.load(path)
    assert_refused(*run_lota(capsys, "inspect", path), "deep.safetensors", "nested")


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    t = Ticket(shapes={"w": (4,)}, indices={"w": torch.tensor([1])})
    path = tmp_path / "t.safetensors"
    fmt.save(t, path, config={"note": "[" * 500 + '\\"{' * 500})
    assert fmt.load(path).meta["config"]["note"].startswith("[[[")


def test_oversized_header_is_refused(tmp_path):
    header = json.dumps(
        {"tensors": {}, "numel": 0, "nnz": 0, "config": {"x": "a" * (fmt.MAX_HEADER_CHARS + 1)}}
    )
    path = _write_header(tmp_path / "big.safetensors", header)
    with pytest.raises(FormatError, match="header"):
        fmt.load(path)


def _valid_file(tmp_path, kind="ticket") -> Path:
    t = Ticket(
        shapes={"a": (8, 4), "b": (5,)},
        indices={"a": torch.tensor([0, 3, 9, 31]), "b": torch.tensor([2])},
        base_fingerprint=FP,
    )
    path = tmp_path / f"{kind}.safetensors"
    if kind == "delta":
        fmt.save(lota.SparseDelta(t, {"a": torch.ones(4), "b": torch.ones(1)}), path)
    else:
        fmt.save(t, path)
    return path


def _edit_header(path: Path, edit) -> None:
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["header"])
    edit(header)
    meta["header"] = json.dumps(header)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


LOOSE_FIELDS = {
    "float shape": lambda h: h["tensors"]["a"].update(shape=[8.0, 4.0]),
    "fractional shape": lambda h: h["tensors"]["a"].update(shape=[32.7, 64.7]),
    "string dimension": lambda h: h["tensors"]["a"].update(shape=["8", 4]),
    "bool dimension": lambda h: h["tensors"]["b"].update(shape=[True, 5]),
    "shape not a list": lambda h: h["tensors"]["a"].update(shape="84"),
    "string count": lambda h: h["tensors"]["a"].update(nnz="4"),
    "float count": lambda h: h["tensors"]["a"].update(nnz=4.0),
    "bool count": lambda h: h["tensors"]["b"].update(nnz=True),
    "encoding not a string": lambda h: h["tensors"]["a"].update(encoding=["gaps"]),
    "entry not an object": lambda h: h["tensors"].update(b=[5]),
    "top-level numel wrong": lambda h: h.update(numel=h["numel"] + 1),
    "top-level nnz wrong": lambda h: h.update(nnz=h["nnz"] - 1),
    "top-level numel a string": lambda h: h.update(numel=str(h["numel"])),
    "top-level nnz a float": lambda h: h.update(nnz=float(h["nnz"])),
    "top-level numel missing": lambda h: h.pop("numel"),
    "checksums not an object": lambda h: h.update(checksums=list(h["checksums"])),
    "config not an object": lambda h: h.update(config=[1, 2]),
}


@pytest.mark.parametrize("case", LOOSE_FIELDS)
def test_loosely_typed_header_fields_are_refused(tmp_path, capsys, case):
    path = _valid_file(tmp_path)
    _edit_header(path, LOOSE_FIELDS[case])
    with pytest.raises(FormatError) as info:
        fmt.load(path)
    assert str(path) in str(info.value)
    assert_refused(*run_lota(capsys, "inspect", path), "ticket.safetensors")


def test_loosely_typed_delta_fields_are_refused(tmp_path):
    path = _valid_file(tmp_path, "delta")
    _edit_header(path, lambda h: h["tensors"]["b"].update(values_dtype=7))
    with pytest.raises(FormatError, match=str(path)):
        fmt.load(path)


def test_strict_header_still_loads_genuine_files(tmp_path):
    for kind in ("ticket", "delta"):
        obj = fmt.load(_valid_file(tmp_path, kind))
        assert obj.nnz == 5 and obj.numel == 37


# ---------------------------------------------------------------------------- the Python API
BAD_INDICES = {
    "unsorted": torch.tensor([3, 1]),
    "duplicate": torch.tensor([1, 1, 2]),
    "negative": torch.tensor([-1, 2]),
    "out of range": torch.tensor([2, 12]),
    "two-dimensional": torch.tensor([[0, 1]]),
    "float": torch.tensor([0.0, 1.0]),
    "bool": torch.tensor([True, False, True]),
}


@pytest.mark.parametrize("case", BAD_INDICES)
def test_ticket_refuses_broken_indices(case):
    with pytest.raises(InputError, match="'w'") as info:
        Ticket(shapes={"w": (3, 4)}, indices={"w": BAD_INDICES[case]})
    assert isinstance(info.value, ValueError)  # what the constructor raised before
    assert info.value.fix


@pytest.mark.parametrize("shape", [(3.5, 4), (-1, 4), (True, 4), ("3", 4), (2**40, 2**40)])
def test_ticket_refuses_broken_shapes(shape):
    with pytest.raises(InputError, match="'w'"):
        Ticket(shapes={"w": shape}, indices={"w": torch.zeros(0, dtype=torch.long)})


def test_ticket_converts_integer_indices_to_int64():
    t = Ticket(
        shapes={"w": (3, 4), "v": (2,), "u": (5,)},
        indices={"w": torch.tensor([0, 5, 11], dtype=torch.int32), "v": [1], "u": []},
    )
    assert all(i.dtype == torch.int64 for i in t.indices.values())
    assert t.indices["w"].tolist() == [0, 5, 11] and t.nnz == 4


def test_save_refuses_a_ticket_broken_after_construction(tmp_path):
    """``lota.save`` of indices [-1, 2] used to write a file that reloads as [2, 7]."""
    t = Ticket(shapes={"w": (2, 4)}, indices={"w": torch.tensor([1, 2])})
    t.indices["w"] = torch.tensor([-1, 2])
    path = tmp_path / "t.safetensors"
    with pytest.raises(InputError, match="'w'"):
        lota.save(t, path)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_delta_broken_after_construction(tmp_path):
    t = Ticket(shapes={"w": (2, 4)}, indices={"w": torch.tensor([1, 2])})
    d = lota.SparseDelta(t, {"w": torch.ones(2)})
    path = tmp_path / "d.safetensors"
    for bad in (torch.ones(3), torch.ones(2, dtype=torch.int32), torch.ones(1, 2)):
        d.values["w"] = bad
        with pytest.raises(InputError, match="'w'"):
            lota.save(d, path)
    d.values["w"] = torch.ones(2)
    d.ticket.indices["w"] = torch.tensor([2, 2])
    with pytest.raises(InputError, match="'w'"):
        lota.save(d, path)
    assert list(tmp_path.iterdir()) == []


def test_save_writes_only_values_finite_in_the_dtype_they_are_stored_in(tmp_path):
    t = Ticket(shapes={"w": (2, 4)}, indices={"w": torch.tensor([1, 2])})
    path = tmp_path / "d.safetensors"
    big = lota.SparseDelta(t, {"w": torch.tensor([1e5, -1.0])})  # float16 ends at 65504
    with pytest.raises(InputError, match="'w' overflow float16") as e:
        lota.save(big, path, values_dtype="float16")
    assert e.value.where == str(path) and "--values-dtype" in e.value.fix
    for values in ([float("nan"), 1.0], [1.0, -float("inf")]):
        with pytest.raises(InputError, match="'w' holds non-finite values"):
            lota.save(lota.SparseDelta(t, {"w": torch.tensor(values)}), path)
    assert list(tmp_path.iterdir()) == []
    for values_dtype in ("bfloat16", "auto", None):  # each holds 1e5, "auto" exactly
        lota.save(big, path, values_dtype=values_dtype)
        assert bool(torch.isfinite(lota.load(path).values["w"]).all())


@pytest.mark.parametrize("values", [torch.ones(3), torch.ones(2, dtype=torch.int64)])
def test_delta_refuses_values_that_do_not_fit(values):
    t = Ticket(shapes={"w": (2, 4)}, indices={"w": torch.tensor([1, 2])})
    with pytest.raises(InputError, match="'w'") as info:
        lota.SparseDelta(t, {"w": values})
    assert isinstance(info.value, ValueError)


def test_prepare_never_sees_duplicate_indices():
    from lota.toy import tiny_llama

    model = tiny_llama(hidden=16, layers=1, heads=2)
    name = "model.layers.0.mlp.up_proj.weight"
    shape = tuple(dict(model.named_parameters())[name].shape)
    with pytest.raises(InputError, match="strictly increasing"):
        lota.prepare(model, Ticket(shapes={name: shape}, indices={name: torch.tensor([3, 3])}))
    assert all(p.requires_grad for p in model.parameters())


def test_int64_indices_are_kept_not_copied():
    """Validation reads the indices (a few vectorised passes) and keeps the caller's tensor."""
    idx = torch.arange(0, 4_000_000, 4)
    t = Ticket(shapes={"w": (4_000_000,)}, indices={"w": idx})
    assert t.indices["w"] is idx


def test_commands_with_a_model_vouch_for_a_ticket_of_whole_tensors(
    workdir, trained, capsys, tmp_path, monkeypatch
):
    from lota.weights import WeightReader

    targets = WeightReader(str(workdir / "base")).targets()
    ticket = lota.select("random", targets, sum(math.prod(s) for s in targets.values()), seed=0)
    lota.save(ticket, tmp_path / "all.safetensors")  # every tensor whole: stored as "full"
    monkeypatch.setattr(fmt, "MAX_UNBACKED_ENTRIES", 1000)  # as a big model's ticket would be
    with pytest.raises(lota.FormatError, match="full"):
        lota.load(tmp_path / "all.safetensors")
    args = ["delta", workdir / "base", trained / "model", "--ticket", tmp_path / "all.safetensors"]
    code, _, err = run_lota(capsys, *args, "--out", tmp_path / "d.safetensors", "--quiet")
    assert code == 0, err
    assert lota.load(tmp_path / "d.safetensors").nnz == ticket.nnz


# ---------------------------------------------------------------------------- special files
def _fifo_commands(workdir, trained, fifo, out) -> dict[str, list]:
    """Every place a command reads a file from a path it is given, with ``fifo`` there."""
    base, data, delta = workdir / "base", workdir / "a.jsonl", trained / "delta.safetensors"
    adapt = ["adapt", base, "--out", out, *ADAPT]
    return {
        "adapt --data": [*adapt, "--data", fifo],
        "adapt --ticket": [*adapt, "--data", data, "--ticket", fifo],
        "adapt --protect": [*adapt, "--data", data, "--protect", fifo],
        "eval --data": ["eval", base, "--data", fifo],
        "eval --delta": ["eval", base, "--data", data, "--delta", fifo],
        "ks --data": ["ks", base, trained / "model", "--data", fifo, "--out", out],
        "inspect": ["inspect", fifo],
        "apply": ["apply", base, fifo, "--out", out],
        "merge": ["merge", delta, fifo, "--out", out],
        "delta --ticket": ["delta", base, trained / "model", "--ticket", fifo, "--out", out],
        "mask --protect": ["mask", base, trained / "model", "--protect", fifo, "--out", out],
        "import-mask": ["import-mask", fifo, "--out", out],
        "export-mask": ["export-mask", fifo, "--out", out],
        "export-peft": ["export-peft", fifo, "--base", base, "--out", out],
    }


@pytest.mark.parametrize(
    "place",
    [
        "adapt --data",
        "adapt --ticket",
        "adapt --protect",
        "eval --data",
        "eval --delta",
        "ks --data",
        "inspect",
        "apply",
        "merge",
        "delta --ticket",
        "mask --protect",
        "import-mask",
        "export-mask",
        "export-peft",
    ],
)
def test_a_fifo_given_as_an_input_file_is_refused_unopened(
    workdir, trained, capsys, tmp_path, place
):
    """Opening a FIFO blocks until something writes to it: every input file is refused from
    ``stat`` alone, and a refused ``adapt`` leaves no output folder (nor its lock) behind."""
    fifo, flag, out = tmp_path / "input", tmp_path / "opened", tmp_path / "o"
    os.mkfifo(fifo)
    capsys.readouterr()
    with watch_fifo(fifo, flag):
        got = run_lota(capsys, *_fifo_commands(workdir, trained, fifo, out)[place])
    assert not flag.exists(), "lota opened the FIFO"
    assert_refused(*got, str(fifo), "a FIFO, not a regular file")
    assert not out.exists()


def test_a_device_as_data_is_refused_unread(workdir, capsys, tmp_path, monkeypatch):
    """/dev/zero never ends: read whole it fills memory. It is refused before it is opened."""
    real_open, real_read_text = Path.open, Path.read_text

    def no_devices(path):
        if str(path).startswith("/dev/"):
            raise AssertionError(f"lota opened {path}")

    monkeypatch.setattr(Path, "open", lambda p, *a, **k: no_devices(p) or real_open(p, *a, **k))
    monkeypatch.setattr(
        Path, "read_text", lambda p, *a, **k: no_devices(p) or real_read_text(p, *a, **k)
    )
    out = tmp_path / "o"
    for command in (["eval", workdir / "base"], ["adapt", workdir / "base", "--out", out, *ADAPT]):
        got = run_lota(capsys, *command, "--data", "/dev/zero")
        assert_refused(*got, "/dev/zero", "a character device, not a regular file")
    assert not out.exists()


def test_a_fifo_in_the_output_folder_of_adapt_is_refused_unopened(workdir, capsys, tmp_path):
    """``adapt`` reads its own files back from --out (to resume, or to report a finished run)."""
    out = tmp_path / "o"
    out.mkdir()
    fifo, flag = out / "summary.json", tmp_path / "opened"
    os.mkfifo(fifo)
    with watch_fifo(fifo, flag):
        got = run_lota(capsys, "adapt", workdir / "base", "--data", workdir / "a.jsonl",
                       "--out", out, *ADAPT)  # fmt: skip
    assert not flag.exists(), "lota opened the FIFO"
    assert_refused(*got, "summary.json", "FIFO")
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # no lock left behind
