import json
import os
import random
from pathlib import Path

import pytest
import torch

import lota.format
from lota.digests import fingerprint, tensor_digest
from lota.errors import InputError
from lota.fileio import atomic_dir, atomic_path, write_json, write_text
from lota.format import load, save

from .format_files import assert_same_ticket, case_ticket


def _weights():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
        "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.randn(11, 4, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 3),
    }


# ---------------------------------------------------------------------------- fingerprints
def test_fingerprint_is_order_independent():
    w = _weights()
    fp = fingerprint(w.items())
    assert fp.startswith("blake2b:") and len(fp) == len("blake2b:") + 32
    items = list(w.items())
    for seed in range(5):
        random.Random(seed).shuffle(items)
        assert fingerprint(items) == fp
        assert fingerprint(iter(items)) == fp
    assert fingerprint(reversed(list(w.items()))) == fp
    assert fingerprint((n, t.clone()) for n, t in w.items()) == fp


def test_fingerprint_is_the_same_hashed_on_several_threads(monkeypatch):
    """Tensors are hashed in parallel and combined in name order: the string of one thread, and
    the fixed digest of these weights (a fingerprint never changes between versions)."""
    import lota.digests as digests

    w = _weights()
    expected = "blake2b:" + _sequential_digest(w)
    for threads in (1, 2, 4):
        monkeypatch.setattr(digests, "HASH_THREADS", threads)
        assert fingerprint(w.items()) == expected
        assert fingerprint((n, lambda t=t: t) for n, t in w.items()) == expected


def _sequential_digest(w: dict) -> str:
    """The fingerprint's definition, one tensor after the other."""
    import hashlib

    from lota.digests import weight_digest

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(w):
        h.update(f"{name}|{weight_digest(w[name])}\n".encode())
    return h.hexdigest()


def test_fingerprint_changes_with_one_ulp():
    w = _weights()
    fp = fingerprint(w.items())
    for name in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]:
        for pos in [0, 17, -1]:
            changed = {n: t.clone() for n, t in w.items()}
            t = changed[name].view(-1)
            t[pos] = torch.nextafter(
                t[pos : pos + 1 or None], torch.tensor(float("inf")).to(t.dtype)
            )
            assert fingerprint(changed.items()) != fp, (name, pos)
    # -0.0 and 0.0 are different bytes
    zeros = {"z": torch.zeros(3)}
    neg = {"z": torch.tensor([0.0, -0.0, 0.0])}
    assert fingerprint(zeros.items()) != fingerprint(neg.items())


def test_fingerprint_covers_names_dtypes_shapes_and_set_of_tensors():
    w = _weights()
    fp = fingerprint(w.items())
    renamed = dict(w)
    renamed["model.norm.bias"] = renamed.pop("model.norm.weight")
    assert fingerprint(renamed.items()) != fp
    fewer = dict(w)
    del fewer["empty"]
    assert fingerprint(fewer.items()) != fp
    reshaped = dict(w)
    reshaped["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"].reshape(
        4, 8
    )
    assert fingerprint(reshaped.items()) != fp
    # same bytes read as other values
    bf = w["lm_head.weight"]
    as_half = dict(w)
    as_half["lm_head.weight"] = bf.view(torch.float16)
    assert fingerprint(as_half.items()) != fp
    as_int = dict(w)
    as_int["lm_head.weight"] = bf.view(torch.int16)
    assert fingerprint(as_int.items()) != fp
    # an integer tensor is not a float tensor of the same values
    ints = {"i": torch.arange(4, dtype=torch.int32)}
    assert fingerprint(ints.items()) != fingerprint({"i": torch.arange(4.0)}.items())
    assert fingerprint([]) == fingerprint(iter(()))
    assert fingerprint([]) != fp


def test_fingerprint_depends_on_values_not_layout():
    w = _weights()
    fp = fingerprint(w.items())
    t = w["model.layers.0.mlp.up_proj.weight"]
    transposed_twice = t.t().contiguous().t()  # same values, non-contiguous storage
    assert not transposed_twice.is_contiguous()
    again = dict(w)
    again["model.layers.0.mlp.up_proj.weight"] = transposed_twice
    assert fingerprint(again.items()) == fp
    bf = w["lm_head.weight"]
    again["lm_head.weight"] = bf.float().to(torch.bfloat16)  # bf16 -> fp32 -> bf16 is exact
    assert fingerprint(again.items()) == fp
    params = torch.nn.Parameter(t.clone())
    again["model.layers.0.mlp.up_proj.weight"] = params
    assert fingerprint(again.items()) == fp


def test_fingerprint_is_independent_of_float_precision():
    w = _weights()
    fp = fingerprint(w.items())
    bf = w["lm_head.weight"]
    upcast = dict(w)
    upcast["lm_head.weight"] = bf.to(torch.float32)
    assert fingerprint(upcast.items()) == fp
    all_fp32 = {n: t.float() for n, t in w.items()}
    assert fingerprint(all_fp32.items()) == fp
    # values that fp16 and bf16 both hold exactly
    exact = torch.tensor([0.5, -2.0, 0.0, 3.0, 1.0 / 64])
    half = fingerprint([("x", exact.to(torch.float16))])
    assert half == fingerprint([("x", exact.to(torch.bfloat16))])
    assert half == fingerprint([("x", exact)])
    # a value that rounds differently in bf16 and fp16
    odd = torch.tensor([0.1])
    assert fingerprint([("x", odd.to(torch.float16))]) != fingerprint(
        [("x", odd.to(torch.bfloat16))]
    )
    # the one-ulp change of a bf16 weight survives the widening
    bumped = bf.clone()
    bumped.view(-1)[3] = torch.nextafter(
        bumped.view(-1)[3:4], torch.tensor(9.0, dtype=torch.bfloat16)
    )
    changed = dict(w)
    changed["lm_head.weight"] = bumped
    assert fingerprint(changed.items()) != fp
    changed["lm_head.weight"] = bumped.float()
    assert fingerprint(changed.items()) != fp


def test_fingerprint_reads_callables_lazily():
    w = _weights()
    calls = []

    def reader(name):
        def read():
            calls.append(name)
            return w[name]

        return read

    lazy = [(n, reader(n)) for n in reversed(list(w))]
    assert fingerprint(lazy) == fingerprint(w.items())
    assert calls == sorted(w)


def test_tensor_digest():
    t = torch.arange(12, dtype=torch.float32)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert len(tensor_digest(t)) == 32
    assert tensor_digest(t) != tensor_digest(t.reshape(3, 4))
    assert tensor_digest(t) != tensor_digest(t.view(torch.int32))
    u = t.clone()
    u[5] = torch.nextafter(u[5], torch.tensor(100.0))
    assert tensor_digest(t) != tensor_digest(u)
    for dtype in [torch.uint8, torch.uint16, torch.uint32, torch.int64, torch.bool, torch.bfloat16]:
        tensor_digest(torch.zeros(5, dtype=dtype))
    assert tensor_digest(torch.zeros(0)) != tensor_digest(torch.zeros(0, dtype=torch.float16))


# ---------------------------------------------------------------------------- atomic folders
def _tree(folder):
    return {
        str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_atomic_dir_replaces_existing_folder_on_success(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("deep")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        (tmp / "new.txt").write_text("new")
        assert _tree(out) == {"old.txt": "old", "sub/deep.txt": "deep"}
    assert _tree(out) == {"new.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_dir_keeps_old_folder_when_body_raises(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for exc in [RuntimeError("boom"), KeyboardInterrupt()]:
        with pytest.raises(type(exc)):
            with atomic_dir(out) as tmp:
                (tmp / "new.txt").write_text("half")
                raise exc
        assert _tree(out) == {"old.txt": "old"}
        assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_dir_creates_new_folder_and_parents(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with atomic_dir(out) as tmp:
        (tmp / "x.json").write_text("{}")
    assert _tree(out) == {"x.json": "{}"}
    assert [p.name for p in out.parent.iterdir()] == ["run"]
    with pytest.raises(ValueError):
        with atomic_dir(tmp_path / "never") as tmp:
            raise ValueError
    assert not (tmp_path / "never").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_atomic_dir_replaces_a_stale_old_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "v1").write_text("1")
    stale = tmp_path / ".run.old"
    stale.mkdir()
    (stale / "junk").write_text("junk")
    with atomic_dir(out) as tmp:
        (tmp / "v2").write_text("2")
    assert _tree(out) == {"v2": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_temporaries_of_a_live_writer_are_never_removed(tmp_path):
    import subprocess
    import sys

    from lota.fileio import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid no longer runs
    live = tmp_path / f".model.{os.getpid()}.abcd1234.tmp"
    live.mkdir()
    gone = [tmp_path / f".model.{dead.pid}.abcd1234.tmp", tmp_path / ".delta.safetensors.tmp"]
    for p in gone:
        p.write_text("left by a killed writer")
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


# ---------------------------------------------------------------------------- atomic files
def test_atomic_path_keeps_old_file_when_body_raises(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old")
    with pytest.raises(OSError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.name != path.name
            tmp.write_text("new but broken")
            raise OSError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    write_text(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_json_and_text(tmp_path):
    write_json(tmp_path / "deep" / "m.json", {"b": 1, "a": [1.5, "x"]})
    text = (tmp_path / "deep" / "m.json").read_text()
    assert text.endswith("\n")
    assert json.loads(text) == {"b": 1, "a": [1.5, "x"]}
    assert text.index('"a"') < text.index('"b"')
    write_text(tmp_path / "u.txt", "héllo ✓")
    assert (tmp_path / "u.txt").read_text(encoding="utf-8") == "héllo ✓"


def test_unwritable_output_folder_is_an_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError) as info:
        with atomic_path(blocker / "out.txt"):
            pass
    assert str(blocker) in str(info.value)
    with pytest.raises(InputError):
        with atomic_dir(blocker / "sub" / "run"):
            pass


def test_atomic_outputs_respect_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------- atomic lota files
def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "ticket.safetensors"
    save(case_ticket("gaps-uint8"), path)
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(lota.format, "save_safetensors", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        save(case_ticket("bitmask"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.safetensors"]

    monkeypatch.undo()
    save(case_ticket("bitmask"), path)
    assert_same_ticket(case_ticket("bitmask"), load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.safetensors"]


def test_atomic_write_on_interrupt_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "new.safetensors"

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(lota.format, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(case_ticket("full"), path)
    assert list(tmp_path.iterdir()) == []
