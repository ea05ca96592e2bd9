"""Lota files for the format tests: tickets of every index encoding, their values, and
rewriting a saved file to refuse what was changed in it."""

import json
import random

import pytest
import safetensors
import safetensors.torch
import torch

from lota.delta import SparseDelta
from lota.digests import tensor_digest
from lota.errors import FormatError
from lota.format import describe, load, save
from lota.ticket import Ticket

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


def case_ticket(case, fingerprint="blake2b:" + "ab" * 16):
    shape, idx, _, _ = CASES[case]
    return Ticket(
        shapes={"layer.0.w": shape, "layer.1.aux": (6, 5)},
        indices={
            "layer.0.w": torch.tensor(idx, dtype=torch.long),
            "layer.1.aux": torch.tensor([0, 7, 29]),
        },
        base_fingerprint=fingerprint,
    )


def case_values(ticket, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, idx in ticket.items():
        v = torch.randn(idx.numel(), generator=g) * 3
        specials = torch.tensor([-0.0, 1e-40, 65504.0, -1e-7, 3.0e38])
        n = min(len(specials), v.numel())
        v[:n] = specials[:n]
        out[name] = v
    return out


def fit_to(values, dtype):
    """``values`` clamped to ``dtype``'s range: lota refuses to round a value past it."""
    top = torch.finfo(dtype).max
    return {n: v.clamp(-top, top) for n, v in values.items()}


def assert_same_bits(a, b):
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def assert_same_ticket(a, b):
    assert a.names == b.names
    assert a.shapes == b.shapes
    for n in a.names:
        assert b.indices[n].dtype == torch.long
        assert torch.equal(a.indices[n], b.indices[n]), n
    assert a.base_fingerprint == b.base_fingerprint


def rewrite_file(path, meta=None, tensors=None, drop=(), fix_checksums=True, drop_meta=()):
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


def assert_load_refused(path, error=FormatError, match=None):
    with pytest.raises(error) as info:
        load(path)
    assert str(path) in str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def ticket_of(obj):
    return obj.ticket if isinstance(obj, SparseDelta) else obj


def random_indices(rng, numel, nnz, style):
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


def rice_file(tmp_path, name="r.safetensors"):
    numel = 100_000
    idx = torch.tensor(sorted(random.Random(5).sample(range(numel), 3000)))
    t = Ticket(shapes={"w": (numel,), "v": (4,)}, indices={"w": idx, "v": torch.tensor([1])})
    path = tmp_path / name
    save(SparseDelta(t, case_values(t)), path)
    assert describe(path)["tensors"]["w"]["encoding"] == "rice"
    with safetensors.safe_open(str(path), "pt") as f:
        q, rem = f.get_tensor("w::rice_q"), f.get_tensor("w::rice_r")
        r = json.loads(f.metadata()["header"])["tensors"]["w"]["rice_r"]
    return path, idx, q, rem, r
