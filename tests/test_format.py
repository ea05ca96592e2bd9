import json
import math
import os
import random
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import lota.format
from lota.delta import SparseDelta
from lota.errors import FormatError, InputError
from lota.fileio import tensor_digest
from lota.format import decode_indices, describe, encode_indices, load, save
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
    enc, data = encode_indices(t.indices["layer.0.w"], math.prod(shape))
    assert enc == encoding
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
        if encoding in ("bitmask", "gaps"):
            key = "layer.0.w::" + ("mask" if encoding == "bitmask" else "gaps")
            assert key in keys
            assert f.get_tensor(key).dtype == dtype
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
    d = SparseDelta(ticket=t, values=_values(t))
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
                assert enc == ("bitmask" if mask_bytes < gap_bytes else "gaps")
                assert data.numel() * data.element_size() == min(mask_bytes, gap_bytes)
                if enc == "gaps":
                    assert data.element_size() == _gap_width(int(gaps.max()))
                checked.add(enc)
    assert checked == {"bitmask", "gaps"}
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

    monkeypatch.setattr(lota.format, "save_file", broken_save_file)
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

    monkeypatch.setattr(lota.format, "save_file", interrupted)
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
        ({"format_version": "2"}, "newer"),
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
