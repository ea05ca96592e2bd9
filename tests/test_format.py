import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

import lota.codecs
import lota.format
from lota.codecs import RiceCode, decode_indices, encode_indices
from lota.delta import SparseDelta
from lota.errors import FormatError, InputError
from lota.fileio import tensor_digest
from lota.format import describe, load, save
from lota.ticket import Ticket

DATA = Path(__file__).parent / "data"

# name -> (shape, indices, expected encoding, expected index dtype)
CASES = {
    "empty": ((50,), [], "empty", None),
    "full": ((3, 4), list(range(12)), "full", None),
    "bitmask": (
        (10, 100),
        sorted(random.Random(0).sample(range(1000), 300)),
        "bitmask",
        torch.uint8,
    ),
    "gaps-uint8": ((100, 100), [5, 100, 300, 555], "gaps", torch.uint8),
    "gaps-uint16": ((400, 250), [0, 60000, 60001], "gaps", torch.uint16),
    "gaps-uint32": ((400, 250), [0, 99999], "gaps", torch.uint32),
    "gaps-int64": ((2**17, 2**16), [0, 2**32 + 5, 2**33 - 1], "gaps", torch.int64),
    "rice": (
        (200, 500),
        sorted(random.Random(1).sample(range(100_000), 2000)),
        "rice",
        torch.uint8,
    ),
}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _ticket(case, fingerprint="blake2b:" + "ab" * 16):
    shape, idx, _, _ = CASES[case]
    return Ticket(
        shapes={"layer.0.w": shape, "layer.1.aux": (6, 5)},
        indices={
            "layer.0.w": torch.tensor(idx, dtype=torch.long),
            "layer.1.aux": torch.tensor([0, 7, 29]),
        },
        base_fingerprint=fingerprint,
    )


def _values(ticket, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, idx in ticket.items():
        v = torch.randn(idx.numel(), generator=g) * 3
        specials = torch.tensor([-0.0, 1e-40, 65504.0, -1e-7, 3.0e38])
        n = min(len(specials), v.numel())
        v[:n] = specials[:n]
        out[name] = v
    return out


def _fit(values, dtype):
    """``values`` clamped to ``dtype``'s range: lota refuses to round a value past it."""
    top = torch.finfo(dtype).max
    return {n: v.clamp(-top, top) for n, v in values.items()}


def _same_bits(a, b):
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def _assert_same_ticket(a, b):
    assert a.names == b.names
    assert a.shapes == b.shapes
    for n in a.names:
        assert b.indices[n].dtype == torch.long
        assert torch.equal(a.indices[n], b.indices[n]), n
    assert a.base_fingerprint == b.base_fingerprint


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("case", list(CASES))
def test_ticket_round_trip_is_exact_for_every_encoding(case, tmp_path):
    shape, idx, encoding, dtype = CASES[case]
    t = _ticket(case)
    enc, data = encode_indices(t.indices["layer.0.w"], math.prod(shape), name="layer.0.w")
    assert enc == encoding
    if isinstance(data, RiceCode):
        assert data.q.dtype == data.rem.dtype == dtype
    else:
        assert (data.dtype if data is not None else None) == dtype
    path = tmp_path / "t.safetensors"
    size = save(t, path)
    assert size == path.stat().st_size
    back = load(path)
    assert type(back) is Ticket
    _assert_same_ticket(t, back)
    assert describe(path)["tensors"]["layer.0.w"]["encoding"] == encoding
    with safetensors.safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        if encoding in ("bitmask", "gaps", "rice"):
            suffixes = {"bitmask": ["mask"], "gaps": ["gaps"], "rice": ["rice_q", "rice_r"]}
            for suffix in suffixes[encoding]:
                key = "layer.0.w::" + suffix
                assert key in keys
                assert f.get_tensor(key).dtype == dtype
            assert f.metadata()["format_version"] == ("2" if encoding == "rice" else "1")
        else:
            assert not any(k.startswith("layer.0.w::") for k in keys)


@pytest.mark.parametrize(
    "values_dtype, expect",
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("case", list(CASES))
def test_delta_round_trip_is_bit_exact(case, values_dtype, expect, tmp_path):
    t = _ticket(case)
    d = SparseDelta(ticket=t, values=_fit(_values(t), expect))
    path = tmp_path / "d.safetensors"
    save(d, path, values_dtype=values_dtype)
    back = load(path)
    assert type(back) is SparseDelta
    _assert_same_ticket(t, back.ticket)
    for name in t.names:
        want = d.values[name].to(expect)
        got = back.values[name]
        _same_bits(want, got)
        assert torch.equal(want, got) or bool(torch.isnan(want).any())
    if values_dtype is not None or expect == torch.float32:
        info = describe(path)
        assert info["values_dtype"] == [str(expect).removeprefix("torch.")]


def test_delta_keeps_each_tensors_own_dtype_without_values_dtype(tmp_path):
    t = _ticket("bitmask")
    vals = _values(t)
    vals["layer.1.aux"] = vals["layer.1.aux"].to(torch.float16)
    empty = Ticket(
        shapes={**t.shapes, "z.empty": (4,)},
        indices={**t.indices, "z.empty": torch.zeros(0, dtype=torch.long)},
    )
    vals["z.empty"] = torch.zeros(0, dtype=torch.bfloat16)
    d = SparseDelta(ticket=empty, values=vals)
    path = tmp_path / "d.safetensors"
    save(d, path)
    back = load(path)
    for name in d.names:
        _same_bits(d.values[name], back.values[name])


def test_save_rejects_names_with_separator(tmp_path):
    t = Ticket(shapes={"a::b": (2,)}, indices={"a::b": torch.tensor([0])})
    with pytest.raises(InputError, match="a::b"):
        save(t, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- index encodings
def _gap_width(max_gap):
    for width, hi in [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)]:
        if max_gap <= hi:
            return width
    return 8


def test_encode_decode_property():
    g = torch.Generator().manual_seed(0)
    numels = [1, 7, 8, 9, 100, 1000, 4099, 65537, 300_000]
    densities = [0.001, 0.005, 0.01, 0.05, 0.1, 0.125, 0.13, 0.2, 0.5, 0.9]
    checked = set()
    for numel in numels:
        for density in densities:
            for trial in range(3):
                nnz = min(numel, max(1, round(density * numel)))
                if trial == 2 and nnz > 1:  # clustered, with one far entry
                    idx = list(range(nnz - 1)) + [numel - 1]
                    idx = torch.tensor(idx, dtype=torch.long)
                else:
                    idx = torch.randperm(numel, generator=g)[:nnz].sort().values
                enc, data = encode_indices(idx, numel)
                back = decode_indices(enc, data, numel, nnz)
                assert back.dtype == torch.long
                assert torch.equal(back, idx), (numel, density, trial)
                if nnz == numel:
                    assert enc == "full"
                    continue
                gaps = torch.diff(idx, prepend=torch.tensor([-1])) - 1
                gap_bytes = nnz * _gap_width(int(gaps.max()))
                mask_bytes = (numel + 7) // 8
                rice_bytes, _ = _reference_rice(idx)
                costs = {
                    "bitmask": mask_bytes,
                    "gaps": gap_bytes,
                    "rice": rice_bytes + lota.codecs.rice_overhead(""),
                }
                assert enc == min(costs, key=lambda e: (costs[e], list(costs).index(e)))
                assert _stored_bytes(data) == {**costs, "rice": rice_bytes}[enc]
                if enc == "gaps":
                    assert data.element_size() == _gap_width(int(gaps.max()))
                checked.add(enc)
    assert checked == {"bitmask", "gaps", "rice"}
    for numel in [0, 1, 5]:
        enc, data = encode_indices(torch.zeros(0, dtype=torch.long), numel)
        assert enc == "empty" and data is None
        assert decode_indices(enc, data, numel, 0).numel() == 0


def test_decode_rejects_inconsistent_data():
    with pytest.raises(ValueError):
        decode_indices("bitmask", torch.zeros(3, dtype=torch.uint8), 8, 0)
    with pytest.raises(ValueError):  # bit set past the end
        decode_indices("bitmask", torch.tensor([0, 0b100], dtype=torch.uint8), 10, 1)
    with pytest.raises(ValueError):
        decode_indices("gaps", torch.tensor([3, 4], dtype=torch.uint8), 10, 3)
    with pytest.raises(ValueError):
        decode_indices("gaps", torch.tensor([3, 6], dtype=torch.uint8), 10, 2)
    with pytest.raises(ValueError):
        decode_indices("gaps", torch.tensor([1.0]), 10, 1)
    with pytest.raises(ValueError):
        decode_indices("zigzag", None, 10, 1)


def test_negative_int64_gaps_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save(_ticket("gaps-int64"), path)
    _rewrite(path, tensors={"layer.0.w::gaps": torch.tensor([5, -3, -10], dtype=torch.int64)})
    with pytest.raises(FormatError, match=str(path)):
        load(path)


# ---------------------------------------------------------------------------- metadata
def test_metadata_and_describe(tmp_path):
    t = _ticket("bitmask", fingerprint="blake2b:0123")
    tp, dp = tmp_path / "t.safetensors", tmp_path / "sub" / "d.safetensors"
    save(t, tp, config={"selector": "magnitude", "sparsity": "0.9"})
    d = SparseDelta(ticket=t, values=_values(t), meta={"config": {"lr": 0.001}})
    save(d, dp)
    for path, kind in [(tp, "ticket"), (dp, "delta")]:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "lota"
        assert meta["kind"] == kind
        assert meta["format_version"] == "1"
        assert meta["base_fingerprint"] == "blake2b:0123"
        header = json.loads(meta["header"])
        assert header["nnz"] == t.nnz and header["numel"] == t.numel
        info = describe(path)
        for key in [
            "kind",
            "format_version",
            "numel",
            "nnz",
            "density",
            "base_fingerprint",
            "tensors",
            "file_bytes",
        ]:
            assert key in info
        assert info["kind"] == kind
        assert info["format_version"] == 1
        assert info["numel"] == t.numel == 1030
        assert info["nnz"] == t.nnz == 303
        assert info["density"] == pytest.approx(303 / 1030)
        assert info["base_fingerprint"] == "blake2b:0123"
        assert info["file_bytes"] == os.path.getsize(path)
        assert {n: e["nnz"] for n, e in info["tensors"].items()} == {
            "layer.0.w": 300,
            "layer.1.aux": 3,
        }
        assert info["tensors"]["layer.0.w"]["shape"] == [10, 100]
        json.dumps(info)
    assert describe(tp)["config"] == {"selector": "magnitude", "sparsity": "0.9"}
    assert load(tp).meta["config"] == {"selector": "magnitude", "sparsity": "0.9"}
    assert describe(dp)["config"] == {"lr": 0.001}
    want_norm = math.sqrt(sum(float(v.norm()) ** 2 for v in d.values.values()))
    assert describe(dp)["l2_norm"] == pytest.approx(want_norm, rel=1e-6)


# ---------------------------------------------------------------------------- atomic writes
def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "ticket.safetensors"
    save(_ticket("gaps-uint8"), path)
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(lota.format, "save_safetensors", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        save(_ticket("bitmask"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.safetensors"]

    monkeypatch.undo()
    save(_ticket("bitmask"), path)
    _assert_same_ticket(_ticket("bitmask"), load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ticket.safetensors"]


def test_atomic_write_on_interrupt_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "new.safetensors"

    def interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(lota.format, "save_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(_ticket("full"), path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- corrupted files
def _rewrite(path, meta=None, tensors=None, drop=(), fix_checksums=True, drop_meta=()):
    with safetensors.safe_open(str(path), "pt") as f:
        m = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(m["header"])
    for k in drop:
        del ts[k]
    for k, v in (tensors or {}).items():
        ts[k] = v
        if k.endswith("::gaps"):
            name = k.removesuffix("::gaps")
            header["tensors"][name]["nnz"] = v.numel()
        if fix_checksums:
            header["checksums"][k] = tensor_digest(v)
    m["header"] = json.dumps(header)
    m.update(meta or {})
    for k in drop_meta:
        del m[k]
    safetensors.torch.save_file(ts, str(path), metadata=m)


def _refused(path, error=FormatError, match=None):
    with pytest.raises(error) as info:
        load(path)
    assert str(path) in str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def _saved_delta(tmp_path, name="d.safetensors"):
    t = _ticket("bitmask")
    path = tmp_path / name
    save(SparseDelta(ticket=t, values=_values(t)), path)
    return path


def test_format_error_is_an_input_error():
    assert issubclass(FormatError, InputError)
    assert FormatError("x").exit_code == 2


def test_truncated_files_are_refused(tmp_path):
    good = _saved_delta(tmp_path, "good.safetensors")
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    for cut in sorted({0, 1, 7, 8, 9, 40, n + 7, n + 8, n + 9, len(data) // 2, len(data) - 1}):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        _refused(path)
        with pytest.raises(FormatError):
            describe(path)


def _tensor_byte(data, key):
    n = int.from_bytes(data[:8], "little")
    info = json.loads(data[8 : 8 + n])[key]
    start, end = info["data_offsets"]
    return 8 + n + (start + end) // 2


@pytest.mark.parametrize("key", ["layer.0.w::values", "layer.1.aux::values", "layer.0.w::mask"])
def test_flipped_byte_is_refused(tmp_path, key):
    path = _saved_delta(tmp_path)
    data = bytearray(path.read_bytes())
    data[_tensor_byte(data, key)] ^= 0x5A
    path.write_bytes(bytes(data))
    _refused(path)
    if key.endswith("::values"):
        _refused(path, match="checksum")
        # without verification the flipped value comes through, so the checksum is what caught it
        back = load(path, verify=False)
        name = key.removesuffix("::values")
        assert not torch.equal(back.values[name], load_good_values(tmp_path)[name])


def load_good_values(tmp_path):
    return load(_saved_delta(tmp_path, "again.safetensors")).values


def test_non_lota_and_random_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.ones(3)}, str(plain))
    _refused(plain, match="not a lota file")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.ones(3)}, str(other), metadata={"format": "pt"})
    _refused(other, match="not a lota file")
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(random.Random(0).randbytes(3000))
    _refused(rnd)
    small = tmp_path / "huge-header.safetensors"
    small.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    _refused(small)
    text = tmp_path / "ticket.json"
    text.write_text('{"format": "lota"}')
    _refused(text)


def test_missing_file_and_folder_are_refused(tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = _refused(missing, error=InputError)
    assert "not found" in str(err)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    _refused(folder, error=InputError, match="folder")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"format_version": "99"}, "newer"),
        ({"format_version": "4"}, "newer"),
        ({"format_version": "one"}, "format_version"),
        ({"format_version": ""}, "format_version"),
        ({"kind": "banana"}, "kind"),
        ({"format": "LOTA"}, "not a lota file"),
        ({"header": "{not json"}, "header"),
        ({"header": "[]"}, "header"),
        ({"header": '{"tensors": 3}'}, "header"),
    ],
)
def test_bad_metadata_is_refused(tmp_path, change, match):
    path = _saved_delta(tmp_path)
    _rewrite(path, meta=change)
    _refused(path, match=match)


def test_missing_metadata_fields_are_refused(tmp_path):
    for field in ["format", "format_version", "kind", "header"]:
        path = _saved_delta(tmp_path, f"{field}.safetensors")
        _rewrite(path, drop_meta=[field])
        _refused(path)


def test_inconsistent_content_is_refused(tmp_path):
    # a values tensor is missing
    p = _saved_delta(tmp_path, "a.safetensors")
    _rewrite(p, drop=["layer.1.aux::values"])
    _refused(p, match="layer.1.aux::values")
    # values of the wrong length, with a matching checksum
    p = _saved_delta(tmp_path, "b.safetensors")
    _rewrite(p, tensors={"layer.1.aux::values": torch.ones(4)})
    _refused(p)
    # integer values
    p = _saved_delta(tmp_path, "c.safetensors")
    _rewrite(p, tensors={"layer.1.aux::values": torch.ones(3, dtype=torch.int32)})
    _refused(p)
    # a changed tensor without a new checksum
    p = _saved_delta(tmp_path, "d.safetensors")
    _rewrite(p, tensors={"layer.1.aux::values": torch.ones(3)}, fix_checksums=False)
    _refused(p, match="checksum")
    # a bitmask that marks more entries than the header says
    p = _saved_delta(tmp_path, "e.safetensors")
    _rewrite(p, tensors={"layer.0.w::mask": torch.full((125,), 255, dtype=torch.uint8)})
    _refused(p)
    # the header's nnz / shape disagree with the data
    for i, edit in enumerate(
        [
            lambda e: e.update(nnz=e["nnz"] + 1),
            lambda e: e.update(nnz=-1),
            lambda e: e.update(shape=[10, 99]),
            lambda e: e.update(shape=[-10, -100]),
            lambda e: e.update(encoding="zigzag"),
            lambda e: e.update(encoding="full"),
            lambda e: e.update(encoding="empty"),
            lambda e: e.pop("shape"),
        ]
    ):
        p = _saved_delta(tmp_path, f"h{i}.safetensors")
        with safetensors.safe_open(str(p), "pt") as f:
            m = dict(f.metadata())
        header = json.loads(m["header"])
        edit(header["tensors"]["layer.0.w"])
        _rewrite(p, meta={"header": json.dumps(header)})
        _refused(p)


def test_no_checksum_is_refused_unless_verification_is_off(tmp_path):
    p = _saved_delta(tmp_path)
    with safetensors.safe_open(str(p), "pt") as f:
        m = dict(f.metadata())
    header = json.loads(m["header"])
    header["checksums"] = {}
    _rewrite(p, meta={"header": json.dumps(header)})
    _refused(p, match="checksum")
    t = _ticket("bitmask")
    _assert_same_ticket(t, load(p, verify=False).ticket)


# ---------------------------------------------------------------------------- checked-in files
V1_FINGERPRINT = "blake2b:00112233445566778899aabbccddeeff"
V1_SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (8, 16),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.self_attn.k_proj.weight": (3, 2),
    "model.layers.0.self_attn.v_proj.weight": (2, 2),
    "model.layers.1.mlp.down_proj.weight": (400, 250),
    "model.layers.1.mlp.gate_proj.weight": (400, 250),
}
V1_INDICES = {
    "model.layers.0.mlp.up_proj.weight": [1, 5, 6, 100],
    "model.layers.0.self_attn.q_proj.weight": [0, 2, 3, 5, 8, 9, 12, 15],
    "model.layers.0.self_attn.k_proj.weight": [],
    "model.layers.0.self_attn.v_proj.weight": [0, 1, 2, 3],
    "model.layers.1.mlp.down_proj.weight": [7, 60007],
    "model.layers.1.mlp.gate_proj.weight": [2, 70000, 99999],
}
V1_ENCODINGS = {
    "model.layers.0.mlp.up_proj.weight": "gaps",
    "model.layers.0.self_attn.q_proj.weight": "bitmask",
    "model.layers.0.self_attn.k_proj.weight": "empty",
    "model.layers.0.self_attn.v_proj.weight": "full",
    "model.layers.1.mlp.down_proj.weight": "gaps",
    "model.layers.1.mlp.gate_proj.weight": "gaps",
}
V1_VALUES = {
    "model.layers.0.mlp.up_proj.weight": (torch.float32, [1.0, -1.0, 0.0078125, -3.5]),
    "model.layers.0.self_attn.q_proj.weight": (
        torch.float16,
        [0.5, -0.25, 1.5, -2.0, 0.125, 3.0, -0.0, 65504.0],
    ),
    "model.layers.0.self_attn.k_proj.weight": (torch.float32, []),
    "model.layers.0.self_attn.v_proj.weight": (torch.float32, [0.25, 0.5, 0.75, 1.0]),
    "model.layers.1.mlp.down_proj.weight": (torch.bfloat16, [0.0078125, -256.0]),
    "model.layers.1.mlp.gate_proj.weight": (
        torch.float32,
        [9.5367431640625e-07, -1234.5, 1.0000000150474662e30],
    ),
}


def _check_v1_ticket(t):
    assert t.shapes == V1_SHAPES
    assert list(t.shapes) == sorted(V1_SHAPES)
    assert {n: i.tolist() for n, i in t.indices.items()} == V1_INDICES
    assert all(i.dtype == torch.long for i in t.indices.values())
    assert t.base_fingerprint == V1_FINGERPRINT
    assert t.nnz == 21
    assert t.numel == 128 + 16 + 6 + 4 + 200_000


def test_v1_ticket_file_loads_forever():
    path = DATA / "ticket_v1.safetensors"
    assert path.stat().st_size < 4096
    t = load(path)
    assert type(t) is Ticket
    _check_v1_ticket(t)
    assert t.meta["config"] == {"selector": "magnitude", "sparsity": "0.9", "seed": 0}
    info = describe(path)
    assert info["kind"] == "ticket" and info["format_version"] == 1
    assert {n: e["encoding"] for n, e in info["tensors"].items()} == V1_ENCODINGS


def test_v1_delta_file_loads_forever():
    path = DATA / "delta_v1.safetensors"
    assert path.stat().st_size < 4096
    d = load(path)
    assert type(d) is SparseDelta
    _check_v1_ticket(d.ticket)
    assert d.meta["config"] == {"lr": "0.0001", "steps": 10}
    for name, (dtype, vals) in V1_VALUES.items():
        assert d.values[name].dtype == dtype, name
        assert d.values[name].tolist() == vals, name
    assert str(d.values["model.layers.0.self_attn.q_proj.weight"][6].item()) == "-0.0"
    info = describe(path)
    assert info["kind"] == "delta"
    assert info["values_dtype"] == ["bfloat16", "float16", "float32"]
    assert {n: e["encoding"] for n, e in info["tensors"].items()} == V1_ENCODINGS


# ---------------------------------------------------------------------------- rice (format v2)
def _reference_rice(idx, r=None):
    """(bytes, r) of the best Rice code of sorted indices, by brute force over every r."""
    g = (torch.diff(idx, prepend=torch.tensor([-1])) - 1).to(torch.long)
    nnz = g.numel()
    options = []
    for k in range(41) if r is None else [r]:
        q_bits = nnz + int((g >> k).sum())
        options.append(((q_bits + 7) // 8 + (nnz * k + 7) // 8, k))
    return min(options)


def _reference_rice_streams(idx, r):
    """The two byte streams written out bit by bit, straight from docs/format.md."""
    q_bits, r_bits = [], []
    prev = -1
    for i in idx.tolist():
        g = i - prev - 1
        prev = i
        q_bits += [1] * (g >> r) + [0]
        r_bits += [(g >> k) & 1 for k in range(r)]
    q_bits += [1] * (-len(q_bits) % 8)  # quotient padding: one bits
    r_bits += [0] * (-len(r_bits) % 8)  # remainder padding: zero bits

    def pack(bits):
        return [sum(b << k for k, b in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8)]

    return pack(q_bits), pack(r_bits)


def _as_ticket(obj):
    return obj.ticket if isinstance(obj, SparseDelta) else obj


def _stored_bytes(data):
    if isinstance(data, RiceCode):
        return data.q.numel() + data.rem.numel()
    return data.numel() * data.element_size()


def _random_indices(rng, numel, nnz, style):
    if style == "uniform":
        return torch.tensor(sorted(rng.sample(range(numel), nnz)), dtype=torch.long)
    if style == "runs":  # long runs of consecutive entries and long holes
        out, i = [], rng.randrange(max(1, numel // 10))
        while i < numel and len(out) < nnz:
            run = rng.randint(1, 50)
            out += range(i, min(numel, i + run))
            i += run + rng.randint(1, 2000)
        return torch.tensor(out[:nnz], dtype=torch.long)
    # "ends": the first and last entries of the tensor plus a few in between
    mid = rng.sample(range(1, numel - 1), max(0, min(numel - 2, nnz - 2))) if numel > 2 else []
    return torch.tensor(sorted({0, numel - 1, *mid}), dtype=torch.long)


def test_rice_bit_layout_matches_the_documentation():
    # gaps 3, 0, 5, 19 with r = 2: quotients 0, 0, 1, 4 and remainders 3, 0, 1, 3
    code = lota.codecs.rice_encode(np.array([3, 0, 5, 19], dtype=np.int64), 2)
    assert code.r == 2
    assert code.q.tolist() == [0b11110100, 0b11111110]
    assert code.rem.tolist() == [0b11010011]
    idx = torch.tensor([3, 4, 10, 30])
    assert torch.equal(decode_indices("rice", code, 31, 4), idx)
    assert _reference_rice_streams(idx, 2) == (code.q.tolist(), code.rem.tolist())


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("r", [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 39, 40])
def test_rice_round_trip_every_r(density, r):
    rng = random.Random(r * 1000 + int(density * 1e4))
    numel = 20_011
    nnz = max(1, round(density * numel))
    idx = _random_indices(rng, numel, nnz, "uniform")
    code = lota.codecs.rice_encode(lota.codecs._gaps_of(idx), r)
    assert code.q.dtype == code.rem.dtype == torch.uint8
    assert code.rem.numel() == (nnz * r + 7) // 8
    assert _stored_bytes(code) == _reference_rice(idx, r)[0]
    back = decode_indices("rice", code, numel, nnz)
    assert back.dtype == torch.long
    assert torch.equal(back, idx)
    if nnz <= 2000:
        assert _reference_rice_streams(idx, r) == (code.q.tolist(), code.rem.tolist())


def test_rice_large_gaps_and_large_r():
    # gaps near 2**40 and beyond: quotients stay short with a large r
    numel = 2**45
    idx = torch.tensor([0, 2**40 - 1, 2**40, 2**41 + 12345, 2**44 + 7, numel - 1])
    for r in [0, 20, 38, 39, 40]:
        if r < 30:  # r = 0 would need 2**45 quotient bits: only check the size formula
            assert _reference_rice(idx, r)[0] > 2**20
            continue
        code = lota.codecs.rice_encode(lota.codecs._gaps_of(idx), r)
        assert torch.equal(decode_indices("rice", code, numel, idx.numel()), idx)
    enc, data = encode_indices(idx, numel, "rice")
    assert data.r == 40 and _stored_bytes(data) == _reference_rice(idx)[0]
    assert torch.equal(decode_indices(enc, data, numel, idx.numel()), idx)


def test_rice_property_over_seeds():
    """Random tensors, densities, index structures and r: round trips, sizes, choice of r."""
    styles = ["uniform", "runs", "ends"]
    for seed in range(300):
        rng = random.Random(seed)
        numel = rng.choice([1, 2, 3, 8, 9, 63, 64, 65, 1000, 4097, rng.randint(1, 60_000)])
        nnz = (
            rng.randint(1, numel) if rng.random() < 0.3 else max(1, int(numel * rng.random() ** 3))
        )
        idx = _random_indices(rng, numel, nnz, rng.choice(styles))
        nnz = idx.numel()
        g = lota.codecs._gaps_of(idx)
        r = rng.randint(0, 40) if seed % 2 else rng.randint(0, 12)
        code = lota.codecs.rice_encode(g, r)
        assert torch.equal(decode_indices("rice", code, numel, nnz), idx), seed
        assert _stored_bytes(code) == _reference_rice(idx, r)[0], seed
        best_r, best_bytes = lota.codecs.rice_parameter(g)
        assert (best_bytes, best_r) == _reference_rice(idx), seed
        enc, data = encode_indices(idx, numel)
        assert torch.equal(decode_indices(enc, data, numel, nnz), idx), seed


def test_chosen_encoding_is_the_byte_smallest():
    g = torch.Generator().manual_seed(1)
    seen = set()
    for numel in [10, 1000, 50_000, 1_000_000]:
        for density in [0.0001, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.99]:
            nnz = max(1, min(numel - 1, round(density * numel)))
            idx = torch.randperm(numel, generator=g)[:nnz].sort().values
            for name in ["w", "model.layers.11.self_attn.o_proj.weight"]:
                enc, data = encode_indices(idx, numel, name=name)
                sizes = {
                    e: _stored_bytes(encode_indices(idx, numel, e)[1])
                    for e in ["bitmask", "gaps", "rice"]
                }
                assert sizes == {
                    k: v for k, v in lota.codecs.index_sizes(idx, numel).items() if k != "rice_r"
                }
                costs = {**sizes, "rice": sizes["rice"] + lota.codecs.rice_overhead(name)}
                best = min(costs.values())
                assert costs[enc] == best
                # ties go to the simpler encoding
                assert enc == next(e for e in ["bitmask", "gaps", "rice"] if costs[e] == best)
                seen.add(enc)
    assert seen == {"bitmask", "gaps", "rice"}
    # exact ties between bitmask and gaps pick the bitmask
    idx = torch.arange(0, 64, 8)  # 8 uint8 gaps = 8 bytes = the bitmask of 64 entries
    assert encode_indices(idx, 64)[0] == "bitmask"


def _forced_save(monkeypatch, obj, path, encoding):
    original = lota.format.encode_indices

    def forced(idx, numel, encoding_=None, name=""):
        if idx.numel() in (0, numel):
            return original(idx, numel, name=name)
        return original(idx, numel, encoding, name=name)

    monkeypatch.setattr(lota.format, "encode_indices", forced)
    try:
        return save(obj, path)
    finally:
        monkeypatch.setattr(lota.format, "encode_indices", original)


@pytest.mark.parametrize("nnz", [20, 60, 100, 400, 5000])
@pytest.mark.parametrize("name", ["w", "model.layers.11.self_attn.o_proj.weight"])
def test_chosen_encoding_gives_the_smallest_file(tmp_path, monkeypatch, nnz, name):
    """The overhead charged to rice is what its second tensor really costs in the file."""
    numel = 100_000
    idx = torch.tensor(sorted(random.Random(nnz).sample(range(numel), nnz)))
    t = Ticket(shapes={name: (numel,)}, indices={name: idx})
    d = SparseDelta(t, {name: torch.randn(nnz)})
    for obj in [t, d]:
        chosen = save(obj, tmp_path / "auto.safetensors")
        enc = describe(tmp_path / "auto.safetensors")["tensors"][name]["encoding"]
        sizes = {
            e: _forced_save(monkeypatch, obj, tmp_path / f"{e}.safetensors", e)
            for e in ["bitmask", "gaps", "rice"]
        }
        assert sizes[enc] == chosen
        assert chosen <= min(sizes.values()) + 16  # the header is padded to 8 bytes
        for e in sizes:
            _assert_same_ticket(t, _as_ticket(load(tmp_path / f"{e}.safetensors")))


@pytest.mark.parametrize("density", [0.002, 0.01, 0.1, 0.3])
def test_rice_files_round_trip_and_are_version_2(tmp_path, density):
    rng = random.Random(7)
    shapes = {"a.weight": (300, 700), "b.weight": (128, 1000), "c.small": (5, 5)}
    indices = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        nnz = max(1, round(density * numel))
        indices[name] = _random_indices(rng, numel, nnz, "uniform")
    t = Ticket(shapes=shapes, indices=indices, base_fingerprint="blake2b:" + "cd" * 16)
    d = SparseDelta(t, _fit(_values(t, seed=3), torch.float16))
    for obj, vd in [(t, None), (d, None), (d, "bfloat16"), (d, "float16")]:
        path = tmp_path / "x.safetensors"
        save(obj, path, values_dtype=vd)
        info = describe(path)
        assert info["format_version"] == 2
        assert info["tensors"]["a.weight"]["encoding"] == "rice"
        assert info["tensors"]["c.small"]["encoding"] != "rice"
        with safetensors.safe_open(str(path), "pt") as f:  # a plain safetensors file
            assert f.metadata()["format_version"] == "2"
            header = json.loads(f.metadata()["header"])
            entry = header["tensors"]["a.weight"]
            assert (
                entry["rice_r"] == lota.codecs.index_sizes(indices["a.weight"], 210_000)["rice_r"]
            )
            assert f.get_tensor("a.weight::rice_q").dtype == torch.uint8
            assert f.get_tensor("a.weight::rice_r").dtype == torch.uint8
        back = load(path)
        _assert_same_ticket(t, _as_ticket(back))
        if obj is d:
            for name in t.names:
                _same_bits(d.values[name].to(back.values[name].dtype), back.values[name])


def _rice_file(tmp_path, name="r.safetensors"):
    numel = 100_000
    idx = torch.tensor(sorted(random.Random(5).sample(range(numel), 3000)))
    t = Ticket(shapes={"w": (numel,), "v": (4,)}, indices={"w": idx, "v": torch.tensor([1])})
    path = tmp_path / name
    save(SparseDelta(t, _values(t)), path)
    assert describe(path)["tensors"]["w"]["encoding"] == "rice"
    with safetensors.safe_open(str(path), "pt") as f:
        q, rem = f.get_tensor("w::rice_q"), f.get_tensor("w::rice_r")
        r = json.loads(f.metadata()["header"])["tensors"]["w"]["rice_r"]
    return path, idx, q, rem, r


def test_corrupted_rice_streams_are_refused(tmp_path):
    _, idx, q, rem, r = _rice_file(tmp_path)
    numel, nnz = 100_000, idx.numel()

    def refused(q_, rem_, r_=r, numel_=numel, nnz_=nnz):
        with pytest.raises(ValueError):
            decode_indices("rice", RiceCode(q_, rem_, r_), numel_, nnz_)

    assert torch.equal(decode_indices("rice", RiceCode(q, rem, r), numel, nnz), idx)
    refused(q[:-1], rem)  # truncated quotient stream
    refused(q[: q.numel() // 2], rem)
    refused(torch.zeros(0, dtype=torch.uint8), rem)
    refused(q, rem[:-1])  # truncated remainder stream
    refused(q, torch.cat([rem, torch.zeros(1, dtype=torch.uint8)]))  # remainder bytes too many
    refused(torch.cat([q, torch.tensor([0xFF], dtype=torch.uint8)]), rem)  # trailing byte
    refused(torch.cat([q, torch.tensor([0xFE], dtype=torch.uint8)]), rem)  # extra terminator
    extra = q.clone()
    k = int((extra != 0).nonzero()[0])  # turn one quotient bit into a terminator
    extra[k] &= extra[k] - 1
    refused(extra, rem)
    fewer = q.clone()
    k = int((fewer != 0xFF).nonzero()[0])  # turn one terminator into a quotient bit
    fewer[k] |= fewer[k] + 1
    refused(fewer, rem)
    refused(q, rem, r + 1)  # r mismatch changes the remainder stream's length
    refused(q, rem, r - 1)
    for bad_r in [-1, 41, 2.0, "3", None, True]:
        refused(q, rem, bad_r)
    refused(q, rem, nnz_=nnz + 1)
    refused(q, rem, nnz_=nnz - 1)
    refused(q, rem, numel_=int(idx[-1]))  # last index past the end
    refused(q.to(torch.int16), rem)
    refused(q, rem.view(1, -1))
    used = nnz * r
    if used % 8:  # non-zero padding bits after the last remainder
        padded = rem.clone()
        padded[-1] |= 0x80
        refused(q, padded)
    # a code whose sums overflow 64 bits if computed naively is refused, not wrapped around
    many = 600_000
    q_ones = torch.tensor([0xFF] * (many // 8) + [0x00] * (many // 8), dtype=torch.uint8)
    big_rem = torch.full(((many // 8 * 8 * 40 + 7) // 8,), 0xFF, dtype=torch.uint8)
    refused(q_ones[many // 16 :], big_rem[: (many // 2 * 40) // 8], 40, 2**62, many // 2)
    with pytest.raises(ValueError):
        decode_indices("rice", q, numel, nnz)


def test_corrupted_rice_files_are_refused(tmp_path):
    path, idx, q, rem, r = _rice_file(tmp_path)
    fuzz = [
        {"w::rice_q": q[:-1]},
        {"w::rice_q": torch.cat([q, torch.tensor([0x7F], dtype=torch.uint8)])},
        {"w::rice_r": rem[:-1]},
        {"w::rice_q": q.to(torch.int32)},
        {"w::rice_r": rem.to(torch.float32)},
    ]
    for i, tensors in enumerate(fuzz):
        p = tmp_path / f"t{i}.safetensors"
        p.write_bytes(path.read_bytes())
        _rewrite(p, tensors=tensors)
        _refused(p)
    for i, key in enumerate(["w::rice_q", "w::rice_r"]):
        p = tmp_path / f"drop{i}.safetensors"
        p.write_bytes(path.read_bytes())
        _rewrite(p, drop=[key])
        _refused(p, match=key)
    for i, edit in enumerate(
        [
            lambda e: e.update(rice_r=e["rice_r"] + 1),
            lambda e: e.update(rice_r=str(e["rice_r"])),
            lambda e: e.update(rice_r=41),
            lambda e: e.pop("rice_r"),
            lambda e: e.update(encoding="gaps"),
            lambda e: e.update(nnz=e["nnz"] - 1),
        ]
    ):
        p = tmp_path / f"h{i}.safetensors"
        p.write_bytes(path.read_bytes())
        with safetensors.safe_open(str(p), "pt") as f:
            header = json.loads(f.metadata()["header"])
        edit(header["tensors"]["w"])
        _rewrite(p, meta={"header": json.dumps(header)})
        _refused(p)
    # a flipped byte inside a stream is caught (by the checksum or by the decoder)
    data = bytearray(path.read_bytes())
    for key in ["w::rice_q", "w::rice_r"]:
        p = tmp_path / "flip.safetensors"
        b = bytearray(data)
        b[_tensor_byte(b, key)] ^= 0x10
        p.write_bytes(bytes(b))
        _refused(p)
    # rice needs version 2: a file that claims version 1 is refused, version 4 is too new
    p = tmp_path / "v1.safetensors"
    p.write_bytes(path.read_bytes())
    _rewrite(p, meta={"format_version": "1"})
    _refused(p, match="version 2")
    p.write_bytes(path.read_bytes())
    _rewrite(p, meta={"format_version": "4"})
    _refused(p, match="newer")
    # the same content with verification off still decodes
    assert torch.equal(load(path, verify=False).indices["w"], idx)


def test_v1_encodings_still_write_version_1(tmp_path):
    for case in CASES:
        if CASES[case][2] == "rice":
            continue
        path = tmp_path / f"{case}.safetensors"
        save(_ticket(case), path)
        with safetensors.safe_open(str(path), "pt") as f:
            assert f.metadata()["format_version"] == "1"
            assert not any(k.endswith(("::rice_q", "::rice_r")) for k in f.keys())


def _entropy(d):
    return -d * math.log2(d) - (1 - d) * math.log2(1 - d)


def _file_bits(path):
    data = Path(path).read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    return 8 * (len(data) - header), 8 * len(data)


BOUND_DENSITIES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5]


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 16), (torch.float32, 32)])
def test_file_size_is_within_15_percent_of_the_entropy_bound(tmp_path, dtype, bits):
    """At density d with b-bit values a delta costs <= 1.15 (H(d) + d b) bits per eligible entry,
    the fixed header (8-byte length + JSON) aside."""
    shapes = {"model.layers.0.mlp.up_proj.weight": (1000, 1000), "x.w": (600, 1000)}
    shapes["z.w"] = (400, 1000)
    n = sum(math.prod(s) for s in shapes.values())
    assert n == 2_000_000
    report = {}
    for d in BOUND_DENSITIES:
        g = torch.Generator().manual_seed(int(d * 1e6) + bits)
        flat = torch.randperm(n, generator=g)[: round(d * n)].sort().values
        indices, start = {}, 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = flat[(flat >= start) & (flat < start + numel)] - start
            indices[name], start = part, start + numel
        t = Ticket(shapes=shapes, indices=indices)
        values = {k: torch.randn(i.numel(), generator=g).to(dtype) for k, i in indices.items()}
        path = tmp_path / f"d{d}.safetensors"
        save(SparseDelta(t, values), path)
        body, total = _file_bits(path)
        bound = _entropy(d) + d * bits
        report[d] = (body / n / bound, total / n / bound)
        assert body / n <= 1.15 * bound, (d, bits, body / n, bound)
        _assert_same_ticket(t, _as_ticket(load(path)))
    print(
        f"\nb={bits}: "
        + ", ".join(f"d={d}: {a:.4f} ({b:.4f} with header)" for d, (a, b) in report.items())
    )


# ---------------------------------------------------------------------------- every layout
# Whatever lota writes, lota reads back bit for bit: every index encoding, at a size where the
# writer picks it, under every value layout the writer produces, in every values dtype it stores.
# One file per layout holds one tensor per index encoding, then one more Rice-coded tensor whose
# values are never split, as in real models: the file's version must cover all of its tensors,
# whichever order they come in.
WRITABLE = ["float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2"]
HALVES = ["bfloat16", "float16"]
LAYOUTS = (
    [("plain", d) for d in WRITABLE]  # values_dtype=d: rounded to d
    + [("own", d) for d in WRITABLE]  # values already in d, values_dtype=None
    + [("auto", d) for d in WRITABLE if d != "float32"]  # auto keeps non-float32 values as given
    + [("auto-float32", None)]  # auto, no value is a 16-bit number: float32
    + [("auto-exact", h) for h in HALVES]  # auto, every value a 16-bit number: 16 bits, no fix
    + [(f"auto-split-{e}", h) for h in HALVES for e in ("bitmask", "gaps", "rice")]
)


def _from_gaps(gaps: torch.Tensor) -> tuple[torch.Tensor, int]:
    idx = torch.cumsum(gaps + 1, 0) - 1
    return idx, int(idx[-1]) + 1 + 5


def _encoding_ticket(n: int, g: torch.Generator) -> Ticket:
    """``n`` entries in each tensor but ``a.empty``, placed so that the writer picks the encoding
    the name says: all of a tensor; half of one at random (bitmask); gaps of 100-255 (uint8 gaps
    beat Rice); gaps averaging 300 (uint16 gaps lose to Rice), twice."""
    bitmask, bitmask_numel = _from_gaps(torch.randint(0, 2, (n,), generator=g))
    gaps, gaps_numel = _from_gaps(torch.randint(100, 256, (n,), generator=g))
    rice, rice_numel = _from_gaps(torch.randint(0, 601, (n,), generator=g))
    rice2, rice2_numel = _from_gaps(torch.randint(0, 601, (n,), generator=g))
    return Ticket(
        shapes={
            "a.empty": (7,),
            "b.full": (n,),
            "c.bitmask": (bitmask_numel,),
            "d.gaps": (gaps_numel,),
            "e.rice": (rice_numel,),
            "f.rice": (rice2_numel,),
        },
        indices={
            "a.empty": torch.zeros(0, dtype=torch.long),
            "b.full": torch.arange(n),
            "c.bitmask": bitmask,
            "d.gaps": gaps,
            "e.rice": rice,
            "f.rice": rice2,
        },
        base_fingerprint="blake2b:" + "ef" * 16,
    )


def _fix_positions(encoding: str, n: int, g: torch.Generator) -> torch.Tensor:
    """Positions among ``n`` values of the float32 fixes, placed so that their encoding is the
    one asked for: 30 % at random (bitmask), five (gaps), gaps of 256-320 (uint16 gaps lose to
    Rice once there are a few hundred)."""
    if encoding == "bitmask":
        return torch.nonzero(torch.rand(n, generator=g) < 0.3).view(-1)
    if encoding == "gaps":
        return torch.linspace(0, n - 1, 5).long()
    pos, _ = _from_gaps(torch.randint(256, 321, (n // 288,), generator=g))
    return pos[pos < n]


def _layout_values(kind: str, dtype: str | None, n: int, g: torch.Generator):
    """``(values, values_dtype for save, stored dtype, fix positions or None)`` for ``n``
    values of one tensor."""
    r = torch.randn(n, generator=g) * 0.1
    if kind == "plain":
        name_or_dtype = (
            dtype if dtype in ("float32", "bfloat16", "float16") else getattr(torch, dtype)
        )
        return r, name_or_dtype, dtype, None
    if kind in ("own", "auto"):
        return r.to(getattr(torch, dtype)), None if kind == "own" else "auto", dtype, None
    if kind == "auto-float32" or not n:  # auto keeps float32 values, and empty ones as given
        return r, "auto", "float32", None
    half = getattr(torch, dtype)
    if kind == "auto-exact":
        # float16 numbers need more significand bits than bfloat16 has: auto picks float16
        return r.to(half).float(), "auto", dtype, None
    # auto-split: 16-bit numbers (bfloat16 ones beyond float16's range, so auto cannot pick
    # float16) with float32 values that no 16-bit dtype holds at the fix positions
    scale = 1e6 if half == torch.bfloat16 else 1.0
    v = (r * scale).to(half).float()
    pos = _fix_positions(kind.removeprefix("auto-split-"), n, g)
    v[pos] = (torch.randn(pos.numel(), generator=g) * scale).float() + scale * 1e-3 / 3
    return v, "auto", dtype, pos


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("kind, dtype", LAYOUTS, ids=[f"{k}-{d}" for k, d in LAYOUTS])
def test_every_layout_lota_writes_reads_back_bit_for_bit(kind, dtype, tmp_path, capsys):
    from lota.cli import main

    g = torch.Generator().manual_seed(11)
    n = 75_000 if kind == "auto-split-rice" else 1200  # Rice fixes pay off past ~250 fixes
    t = _encoding_ticket(n, g)
    split = kind.startswith("auto-split")
    made = {
        name: _layout_values(
            "auto-exact" if split and name == "f.rice" else kind, dtype, i.numel(), g
        )
        for name, i in t.items()
    }
    values = {name: m[0] for name, m in made.items()}
    path = tmp_path / "d.safetensors"
    save(SparseDelta(t, values), path, values_dtype=made["b.full"][1])

    meta, header = lota.format.read_header(path)
    assert meta["format_version"] == ("3" if split else "2")  # Rice-coded e.rice needs 2
    back = load(path)
    _assert_same_ticket(t, back.ticket)
    for name in t.names:
        entry = header["tensors"][name]
        assert entry["encoding"] == name.split(".")[1], name
        _, _, stored, pos = made[name]
        if name == "a.empty":
            assert back.values[name].dtype == getattr(torch, stored)
            continue
        assert entry["values_dtype"] == stored, name
        if pos is None:
            assert "fix" not in entry, name
            want = values[name].to(getattr(torch, stored))
        else:  # split: the 16-bit values and the float32 fixes read back as the float32 values
            fix = entry["fix"]
            assert fix["nnz"] == pos.numel(), name
            assert fix["encoding"] == kind.removeprefix("auto-split-"), name
            want = values[name]
        assert back.values[name].dtype == want.dtype, name
        assert torch.equal(_bits_of(back.values[name]), _bits_of(want)), name
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format_version"] == int(meta["format_version"])
    assert {n: e["encoding"] for n, e in info["tensors"].items()} == {
        n: n.split(".")[1] for n in t.names
    }


def test_values_past_a_dtypes_range_or_of_another_dtype_are_refused(tmp_path, capsys):
    from lota.cli import main

    from .test_cli import assert_refused

    t = Ticket(shapes={"w": (10,)}, indices={"w": torch.tensor([1, 4, 7])})
    path = tmp_path / "d.safetensors"
    for big, dtype, words in [
        (1e6, "float16", "beyond the largest float16 number (65504)"),
        (1e3, torch.float8_e4m3fn, "beyond the largest float8_e4m3fn number (448)"),
        (1e5, torch.float8_e5m2, "beyond the largest float8_e5m2 number (57344)"),
    ]:
        d = SparseDelta(t, {"w": torch.tensor([0.5, -big, 1.0])})
        with pytest.raises(InputError, match="'w'") as e:
            save(d, path, values_dtype=dtype)
        assert words in str(e.value)
        assert not path.exists()
    for dtype in (torch.int32, torch.float8_e4m3fnuz, torch.complex64):
        with pytest.raises(InputError, match="not one lota files store"):
            save(SparseDelta(t, {"w": torch.ones(3)}), path, values_dtype=dtype)
    with pytest.raises(InputError, match="float8_e4m3fnuz, which lota files do not store"):
        save(SparseDelta(t, {"w": torch.ones(3).to(torch.float8_e4m3fnuz)}), path)
    assert not path.exists()
    # a file holding values of another dtype, or not the dtype its header names, is refused
    for values, words in [
        (torch.ones(3).to(torch.float8_e4m3fnuz), "are float8_e4m3fnuz, not one of"),
        (torch.ones(3, dtype=torch.float64), "are float64, the header says float32"),
    ]:
        save(SparseDelta(t, {"w": torch.ones(3)}), path)
        _rewrite(path, tensors={"w::values": values})
        _refused(path, match=words)
        assert_refused(main(["inspect", str(path)]), *capsys.readouterr(), words)
