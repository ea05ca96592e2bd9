"""Index codecs (``lota.codecs``): every encoding round-trips exactly, the Rice code matches
its documented bit layout, the writer picks the byte-smallest encoding, and corrupt streams are
refused."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import lota.codecs
import lota.format
from lota.codecs import RiceCode, decode_indices, encode_indices
from lota.delta import SparseDelta
from lota.format import describe, load, save
from lota.ticket import Ticket

from .format_files import (
    assert_same_ticket,
    random_indices,
    rice_file,
    ticket_of,
)


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


def _stored_bytes(data):
    if isinstance(data, RiceCode):
        return data.q.numel() + data.rem.numel()
    return data.numel() * data.element_size()


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
    idx = random_indices(rng, numel, nnz, "uniform")
    code = lota.codecs.rice_encode(lota.codecs.gaps_of(idx), r)
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
        code = lota.codecs.rice_encode(lota.codecs.gaps_of(idx), r)
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
        idx = random_indices(rng, numel, nnz, rng.choice(styles))
        nnz = idx.numel()
        g = lota.codecs.gaps_of(idx)
        r = rng.randint(0, 40) if seed % 2 else rng.randint(0, 12)
        code = lota.codecs.rice_encode(g, r)
        assert torch.equal(decode_indices("rice", code, numel, nnz), idx), seed
        assert _stored_bytes(code) == _reference_rice(idx, r)[0], seed
        best_r, best_bytes = lota.codecs.rice_parameter(g)
        assert (best_bytes, best_r) == _reference_rice(idx), seed
        enc, data = encode_indices(idx, numel)
        assert torch.equal(decode_indices(enc, data, numel, nnz), idx), seed


def test_corrupted_rice_streams_are_refused(tmp_path):
    _, idx, q, rem, r = rice_file(tmp_path)
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
            assert_same_ticket(t, ticket_of(load(tmp_path / f"{e}.safetensors")))


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
        assert_same_ticket(t, ticket_of(load(path)))
    print(
        f"\nb={bits}: "
        + ", ".join(f"d={d}: {a:.4f} ({b:.4f} with header)" for d, (a, b) in report.items())
    )
