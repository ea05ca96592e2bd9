"""``save`` / ``load`` round trips (``lota.format``): every index encoding under every value
layout reads back bit for bit, and values lota files do not hold are refused."""

import json
import math

import pytest
import safetensors
import safetensors.torch
import torch

import lota.codecs
import lota.format
from lota.codecs import RiceCode, encode_indices
from lota.delta import SparseDelta
from lota.errors import InputError
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
    rewrite_file,
)


@pytest.mark.parametrize("case", list(CASES))
def test_ticket_round_trip_is_exact_for_every_encoding(case, tmp_path):
    shape, idx, encoding, dtype = CASES[case]
    t = case_ticket(case)
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
    assert_same_ticket(t, back)
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
    t = case_ticket(case)
    d = SparseDelta(ticket=t, values=fit_to(case_values(t), expect))
    path = tmp_path / "d.safetensors"
    save(d, path, values_dtype=values_dtype)
    back = load(path)
    assert type(back) is SparseDelta
    assert_same_ticket(t, back.ticket)
    for name in t.names:
        want = d.values[name].to(expect)
        got = back.values[name]
        assert_same_bits(want, got)
        assert torch.equal(want, got) or bool(torch.isnan(want).any())
    if values_dtype is not None or expect == torch.float32:
        info = describe(path)
        assert info["values_dtype"] == [str(expect).removeprefix("torch.")]


def test_delta_keeps_each_tensors_own_dtype_without_values_dtype(tmp_path):
    t = case_ticket("bitmask")
    vals = case_values(t)
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
        assert_same_bits(d.values[name], back.values[name])


def test_save_rejects_names_with_separator(tmp_path):
    t = Ticket(shapes={"a::b": (2,)}, indices={"a::b": torch.tensor([0])})
    with pytest.raises(InputError, match="a::b"):
        save(t, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


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
    assert_same_ticket(t, back.ticket)
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
        rewrite_file(path, tensors={"w::values": values})
        assert_load_refused(path, match=words)
        assert_refused(main(["inspect", str(path)]), *capsys.readouterr(), words)
