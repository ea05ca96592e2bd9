"""The container of a lota file (``lota.container``): its metadata and header, the format
versions (v1 files load forever, Rice needs v2), and every corruption of them refused."""

import json
import math
import os
import random
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import lota.codecs
import lota.format
from lota.delta import SparseDelta
from lota.errors import FormatError, InputError
from lota.format import describe, load, save
from lota.ticket import Ticket

from .format_files import (
    CASES,
    assert_load_refused,
    assert_same_bits,
    assert_same_ticket,
    case_ticket,
    case_values,
    fit_to,
    random_indices,
    rewrite_file,
    rice_file,
    ticket_of,
)

DATA = Path(__file__).parent / "data"


def test_metadata_and_describe(tmp_path):
    t = case_ticket("bitmask", fingerprint="blake2b:0123")
    tp, dp = tmp_path / "t.safetensors", tmp_path / "sub" / "d.safetensors"
    save(t, tp, config={"selector": "magnitude", "sparsity": "0.9"})
    d = SparseDelta(ticket=t, values=case_values(t), meta={"config": {"lr": 0.001}})
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


def _saved_delta(tmp_path, name="d.safetensors"):
    t = case_ticket("bitmask")
    path = tmp_path / name
    save(SparseDelta(ticket=t, values=case_values(t)), path)
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
        assert_load_refused(path)
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
    assert_load_refused(path)
    if key.endswith("::values"):
        assert_load_refused(path, match="checksum")
        # without verification the flipped value comes through, so the checksum is what caught it
        back = load(path, verify=False)
        name = key.removesuffix("::values")
        assert not torch.equal(back.values[name], load_good_values(tmp_path)[name])


def load_good_values(tmp_path):
    return load(_saved_delta(tmp_path, "again.safetensors")).values


def test_non_lota_and_random_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"x": torch.ones(3)}, str(plain))
    assert_load_refused(plain, match="not a lota file")
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.ones(3)}, str(other), metadata={"format": "pt"})
    assert_load_refused(other, match="not a lota file")
    rnd = tmp_path / "random.safetensors"
    rnd.write_bytes(random.Random(0).randbytes(3000))
    assert_load_refused(rnd)
    small = tmp_path / "huge-header.safetensors"
    small.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    assert_load_refused(small)
    text = tmp_path / "ticket.json"
    text.write_text('{"format": "lota"}')
    assert_load_refused(text)


def test_missing_file_and_folder_are_refused(tmp_path):
    missing = tmp_path / "nope.safetensors"
    err = assert_load_refused(missing, error=InputError)
    assert "not found" in str(err)
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert_load_refused(folder, error=InputError, match="folder")


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
    rewrite_file(path, meta=change)
    assert_load_refused(path, match=match)


def test_missing_metadata_fields_are_refused(tmp_path):
    for field in ["format", "format_version", "kind", "header"]:
        path = _saved_delta(tmp_path, f"{field}.safetensors")
        rewrite_file(path, drop_meta=[field])
        assert_load_refused(path)


def test_inconsistent_content_is_refused(tmp_path):
    # a values tensor is missing
    p = _saved_delta(tmp_path, "a.safetensors")
    rewrite_file(p, drop=["layer.1.aux::values"])
    assert_load_refused(p, match="layer.1.aux::values")
    # values of the wrong length, with a matching checksum
    p = _saved_delta(tmp_path, "b.safetensors")
    rewrite_file(p, tensors={"layer.1.aux::values": torch.ones(4)})
    assert_load_refused(p)
    # integer values
    p = _saved_delta(tmp_path, "c.safetensors")
    rewrite_file(p, tensors={"layer.1.aux::values": torch.ones(3, dtype=torch.int32)})
    assert_load_refused(p)
    # a changed tensor without a new checksum
    p = _saved_delta(tmp_path, "d.safetensors")
    rewrite_file(p, tensors={"layer.1.aux::values": torch.ones(3)}, fix_checksums=False)
    assert_load_refused(p, match="checksum")
    # a bitmask that marks more entries than the header says
    p = _saved_delta(tmp_path, "e.safetensors")
    rewrite_file(p, tensors={"layer.0.w::mask": torch.full((125,), 255, dtype=torch.uint8)})
    assert_load_refused(p)
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
        rewrite_file(p, meta={"header": json.dumps(header)})
        assert_load_refused(p)


def test_negative_int64_gaps_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    save(case_ticket("gaps-int64"), path)
    rewrite_file(path, tensors={"layer.0.w::gaps": torch.tensor([5, -3, -10], dtype=torch.int64)})
    with pytest.raises(FormatError, match=str(path)):
        load(path)


def test_no_checksum_is_refused_unless_verification_is_off(tmp_path):
    p = _saved_delta(tmp_path)
    with safetensors.safe_open(str(p), "pt") as f:
        m = dict(f.metadata())
    header = json.loads(m["header"])
    header["checksums"] = {}
    rewrite_file(p, meta={"header": json.dumps(header)})
    assert_load_refused(p, match="checksum")
    t = case_ticket("bitmask")
    assert_same_ticket(t, load(p, verify=False).ticket)


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


def test_v1_encodings_still_write_version_1(tmp_path):
    for case in CASES:
        if CASES[case][2] == "rice":
            continue
        path = tmp_path / f"{case}.safetensors"
        save(case_ticket(case), path)
        with safetensors.safe_open(str(path), "pt") as f:
            assert f.metadata()["format_version"] == "1"
            assert not any(k.endswith(("::rice_q", "::rice_r")) for k in f.keys())


@pytest.mark.parametrize("density", [0.002, 0.01, 0.1, 0.3])
def test_rice_files_round_trip_and_are_version_2(tmp_path, density):
    rng = random.Random(7)
    shapes = {"a.weight": (300, 700), "b.weight": (128, 1000), "c.small": (5, 5)}
    indices = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        nnz = max(1, round(density * numel))
        indices[name] = random_indices(rng, numel, nnz, "uniform")
    t = Ticket(shapes=shapes, indices=indices, base_fingerprint="blake2b:" + "cd" * 16)
    d = SparseDelta(t, fit_to(case_values(t, seed=3), torch.float16))
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
        assert_same_ticket(t, ticket_of(back))
        if obj is d:
            for name in t.names:
                assert_same_bits(d.values[name].to(back.values[name].dtype), back.values[name])


def test_corrupted_rice_files_are_refused(tmp_path):
    path, idx, q, rem, r = rice_file(tmp_path)
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
        rewrite_file(p, tensors=tensors)
        assert_load_refused(p)
    for i, key in enumerate(["w::rice_q", "w::rice_r"]):
        p = tmp_path / f"drop{i}.safetensors"
        p.write_bytes(path.read_bytes())
        rewrite_file(p, drop=[key])
        assert_load_refused(p, match=key)
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
        rewrite_file(p, meta={"header": json.dumps(header)})
        assert_load_refused(p)
    # a flipped byte inside a stream is caught (by the checksum or by the decoder)
    data = bytearray(path.read_bytes())
    for key in ["w::rice_q", "w::rice_r"]:
        p = tmp_path / "flip.safetensors"
        b = bytearray(data)
        b[_tensor_byte(b, key)] ^= 0x10
        p.write_bytes(bytes(b))
        assert_load_refused(p)
    # rice needs version 2: a file that claims version 1 is refused, version 4 is too new
    p = tmp_path / "v1.safetensors"
    p.write_bytes(path.read_bytes())
    rewrite_file(p, meta={"format_version": "1"})
    assert_load_refused(p, match="version 2")
    p.write_bytes(path.read_bytes())
    rewrite_file(p, meta={"format_version": "4"})
    assert_load_refused(p, match="newer")
    # the same content with verification off still decodes
    assert torch.equal(load(path, verify=False).indices["w"], idx)
