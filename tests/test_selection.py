import itertools
import math
import random
from decimal import Decimal
from fractions import Fraction

import pytest
import torch

from lota.errors import InputError
from lota.selection import parse_sparsity, select, select_top_k, ticket_size
from lota.ticket import Ticket

SHAPES = {
    "b.weight": (7, 5),
    "a.weight": (13,),
    "c.w": (3, 4, 2),
    "a.bias": (1,),
    "d.proj.weight": (16, 9),
    "e.empty": (0, 4),
}


def _deltas(shapes, seed, decimals=1, zero_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        d = torch.randn(shapes[name], generator=g).round(decimals=decimals)
        if zero_frac:
            d[torch.rand(shapes[name], generator=g) < zero_frac] = 0.0
        out[name] = d
    return out


def _reference(shapes, deltas, k, exclude=None, smallest=False):
    entries = []
    for rank, name in enumerate(sorted(shapes)):
        banned = set()
        if exclude is not None and name in exclude.indices:
            banned = set(exclude.indices[name].tolist())
        for i, v in enumerate(deltas[name].reshape(-1).tolist()):
            if i in banned:
                continue
            key = abs(v) if smallest else -abs(v)
            entries.append((key, rank, i, name))
    entries.sort()
    chosen = entries[:k]
    return {n: sorted(i for _, _, i, m in chosen if m == n) for n in shapes}


def _as_lists(ticket):
    return {n: ticket.indices[n].tolist() for n in ticket.names}


def _check_invariants(ticket, shapes, k):
    assert sorted(ticket.names) == sorted(shapes)
    assert ticket.nnz == k
    for name, idx in ticket.items():
        assert idx.dtype == torch.long
        assert ticket.shapes[name] == tuple(shapes[name])
        if idx.numel():
            assert bool((idx[1:] > idx[:-1]).all())
            assert 0 <= int(idx[0]) and int(idx[-1]) < math.prod(shapes[name])


# ---------------------------------------------------------------------------- sizes
def test_exact_k_decimal():
    assert ticket_size("0.9", 81920) == 8192
    assert ticket_size(0.9, 81920) == 8192
    assert ticket_size(Fraction(9, 10), 81920) == 8192
    cases = [
        ("0.9", 81920),
        ("0.99", 12345),
        ("0.999", 1_000_000),
        ("0.7", 10),
        ("0.3", 10),
        ("0.1", 1000),
        ("0.5", 3),
        ("0.95", 7_000_000_000),
        ("0.9999", 7_241_465_856),
        ("0.123456789", 987_654_321),
        ("0.875", 8),
        ("1e-9", 10**9),
    ]
    for s, n in cases:
        assert ticket_size(s, n) == math.floor((1 - Fraction(Decimal(s))) * n), (s, n)
    for n in [0, 1, 17, 81920, 10**12]:
        assert ticket_size("0", n) == n
        assert ticket_size(0, n) == n
    assert parse_sparsity("0.9") == Fraction(9, 10)


@pytest.mark.parametrize("bad", ["1", "1.0", "-0.1", "abc", "nan", "", "2", "1/2"])
def test_parse_sparsity_rejects_out_of_range_and_non_numbers(bad):
    with pytest.raises(InputError):
        parse_sparsity(bad)
    with pytest.raises(InputError):
        ticket_size(bad, 100)


@pytest.mark.parametrize("bad", ["inf", "-inf", "Infinity"])
def test_parse_sparsity_rejects_infinity_with_input_error(bad):
    with pytest.raises(InputError):
        parse_sparsity(bad)


# ---------------------------------------------------------------------------- top-k
def test_top_k_matches_sorted_reference():
    numel = sum(math.prod(s) for s in SHAPES.values())
    for seed in range(16):
        deltas = _deltas(SHAPES, seed)
        rng = random.Random(seed)
        ks = sorted({0, 1, numel // 3, rng.randrange(numel + 1), numel - 1, numel})
        for k in ks:
            t = select("magnitude", SHAPES, k, deltas.__getitem__)
            _check_invariants(t, SHAPES, k)
            assert _as_lists(t) == _reference(SHAPES, deltas, k), (seed, k)


def test_top_k_separates_scores_that_differ_only_in_low_bits():
    # Scores one ulp apart share the high 16 bits of their keys: only the second radix pass
    # tells them apart.
    base = torch.full((40,), 1.0)
    steps = torch.arange(40) % 7
    vals = base.clone()
    for i in range(40):
        for _ in range(int(steps[i])):
            vals[i] = torch.nextafter(vals[i], torch.tensor(2.0))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    vals = vals[perm]
    shapes = {"x": (40,), "y": (5, 8)}
    deltas = {"x": vals, "y": -vals.flip(0).reshape(5, 8)}
    for k in [0, 1, 5, 17, 39, 40, 41, 60, 79, 80]:
        t = select("magnitude", shapes, k, deltas.__getitem__)
        assert _as_lists(t) == _reference(shapes, deltas, k), k


def test_top_k_matches_reference_on_wide_ranges_of_magnitude():
    g = torch.Generator().manual_seed(1)
    shapes = {"m1": (300,), "m0": (17, 11)}
    deltas = {
        "m1": torch.randn(300, generator=g) * 10 ** torch.randint(-30, 30, (300,), generator=g),
        "m0": torch.randn(17, 11, generator=g) * 1e-38,  # subnormals
    }
    for k in [1, 50, 187, 300, 487]:
        t = select("magnitude", shapes, k, deltas.__getitem__)
        assert _as_lists(t) == _reference(shapes, deltas, k), k


def test_many_exact_zeros_do_not_make_everything_trainable():
    shapes = {"p.weight": (40, 25), "q.weight": (30, 10)}
    numel = 1300
    for seed in range(3):
        deltas = _deltas(shapes, seed, decimals=3, zero_frac=0.9)
        nonzero = {n: set(d.reshape(-1).nonzero().view(-1).tolist()) for n, d in deltas.items()}
        n_nonzero = sum(len(s) for s in nonzero.values())
        zeros_total = numel - n_nonzero
        assert zeros_total >= numel // 2
        for k in [n_nonzero // 2, n_nonzero - 1, n_nonzero, n_nonzero + 1, 1000]:
            t = select("magnitude", shapes, k, deltas.__getitem__)
            assert t.nnz == k
            chosen = {n: set(t.indices[n].tolist()) for n in shapes}
            chosen_zeros = [(n, i) for n in sorted(shapes) for i in sorted(chosen[n] - nonzero[n])]
            if k >= n_nonzero:
                assert all(nonzero[n] <= chosen[n] for n in shapes)
                # the zeros filling up the ticket are those of lowest global position
                all_zeros = [
                    (n, i)
                    for n in sorted(shapes)
                    for i in range(math.prod(shapes[n]))
                    if i not in nonzero[n]
                ]
                assert chosen_zeros == all_zeros[: k - n_nonzero]
            else:
                assert chosen_zeros == []
            assert _as_lists(t) == _reference(shapes, deltas, k)


def test_negative_zero_ties_with_zero():
    shapes = {"a": (4,), "b": (3,)}
    scores = {"a": torch.tensor([-0.0, 0.0, -0.0, 0.0]), "b": torch.tensor([0.0, -0.0, 0.0])}
    for k in range(8):
        out = select_top_k(sorted(shapes), shapes, scores.__getitem__, k)
        flat = [("a", i) for i in range(4)] + [("b", i) for i in range(3)]
        want = {"a": [], "b": []}
        for n, i in flat[:k]:
            want[n].append(i)
        assert {n: v.tolist() for n, v in out.items()} == want
    # a -0.0 before a +0.0 wins the tie by position, in either order of signs
    one = {"x": (2,)}
    assert select_top_k(["x"], one, lambda n: torch.tensor([-0.0, 0.0]), 1)["x"].tolist() == [0]
    assert select_top_k(["x"], one, lambda n: torch.tensor([0.0, -0.0]), 1)["x"].tolist() == [0]
    # and through the selectors: -0.0 deltas are as small as 0.0 ones
    deltas = {"x": torch.tensor([1.0, -0.0, 0.0, -2.0, -0.0])}
    shapes = {"x": (5,)}
    assert select("bottomk", shapes, 2, deltas.__getitem__).indices["x"].tolist() == [1, 2]
    assert select("magnitude", shapes, 3, deltas.__getitem__).indices["x"].tolist() == [0, 1, 3]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("method", ["magnitude", "bottomk"])
def test_nonfinite_scores_rejected(bad, method):
    shapes = {"a.weight": (3, 3), "z.weight": (4,)}
    deltas = {"a.weight": torch.zeros(3, 3), "z.weight": torch.tensor([1.0, bad, 2.0, 3.0])}
    with pytest.raises(InputError, match="z.weight"):
        select(method, shapes, 2, deltas.__getitem__)
    with pytest.raises(InputError):
        select_top_k(["z.weight"], {"z.weight": (4,)}, deltas.__getitem__, 1)


def test_float64_scores_beyond_float32_range_are_rejected():
    with pytest.raises(InputError):
        select(
            "magnitude", {"x": (2,)}, 1, lambda n: torch.tensor([1.0, 1e300], dtype=torch.float64)
        )


def test_wrong_score_size_rejected():
    with pytest.raises(InputError):
        select("magnitude", {"x": (2, 3)}, 2, lambda n: torch.ones(5))


def test_unknown_selector_rejected():
    with pytest.raises(InputError, match="unknown selector"):
        select("nope", {"x": (2,)}, 1, lambda n: torch.ones(2))


# ---------------------------------------------------------------------------- exclusion
def test_constrained_selection_is_disjoint_and_exact():
    numel = sum(math.prod(s) for s in SHAPES.values())
    for seed in range(3):
        deltas = _deltas(SHAPES, seed)
        excluded = select("random", SHAPES, numel // 3, seed=seed + 100)
        available = numel - excluded.nnz
        for k in [0, 1, available // 2, available - 1, available]:
            t = select("magnitude", SHAPES, k, deltas.__getitem__, exclude=excluded)
            _check_invariants(t, SHAPES, k)
            assert t.overlap(excluded) == 0
            assert _as_lists(t) == _reference(SHAPES, deltas, k, exclude=excluded), (seed, k)
        full = select("magnitude", SHAPES, available, deltas.__getitem__, exclude=excluded)
        assert _as_lists(full) == _as_lists(excluded.complement())
        with pytest.raises(InputError):
            select("magnitude", SHAPES, available + 1, deltas.__getitem__, exclude=excluded)
    with pytest.raises(InputError):
        select("magnitude", SHAPES, numel + 1, _deltas(SHAPES, 0).__getitem__)
    with pytest.raises(InputError):
        select("magnitude", SHAPES, -1, _deltas(SHAPES, 0).__getitem__)


def test_exclusion_of_tensors_outside_the_shapes_is_ignored():
    shapes = {"a": (10,)}
    excluded = Ticket(
        shapes={"a": (10,), "other": (5,)},
        indices={"a": torch.tensor([0, 1, 2]), "other": torch.tensor([0, 1, 2, 3, 4])},
    )
    deltas = {"a": torch.arange(10.0).flip(0)}
    t = select("magnitude", shapes, 7, deltas.__getitem__, exclude=excluded)
    assert t.indices["a"].tolist() == [3, 4, 5, 6, 7, 8, 9]


# ---------------------------------------------------------------------------- other selectors
def test_bottomk_and_random():
    numel = sum(math.prod(s) for s in SHAPES.values())
    for seed in range(3):
        deltas = _deltas(SHAPES, seed)
        for k in [0, 1, numel // 2, numel]:
            t = select("bottomk", SHAPES, k, deltas.__getitem__)
            _check_invariants(t, SHAPES, k)
            assert _as_lists(t) == _reference(SHAPES, deltas, k, smallest=True), (seed, k)

    k = numel // 4
    r0 = select("random", SHAPES, k, seed=0)
    r0_again = select("random", SHAPES, k, seed=0)
    r1 = select("random", SHAPES, k, seed=1)
    _check_invariants(r0, SHAPES, k)
    _check_invariants(r1, SHAPES, k)
    assert _as_lists(r0) == _as_lists(r0_again)
    assert _as_lists(r0) != _as_lists(r1)
    # the delta is ignored by the random selector
    with_delta = select("random", SHAPES, k, _deltas(SHAPES, 3).__getitem__, seed=0)
    assert _as_lists(with_delta) == _as_lists(r0)
    # every tensor gets a share of a large random ticket
    big = select("random", SHAPES, numel // 2, seed=5)
    assert all(big.indices[n].numel() > 0 for n in SHAPES if math.prod(SHAPES[n]) > 10)

    excluded = select("random", SHAPES, numel // 2, seed=7)
    for seed in range(2):
        t = select("random", SHAPES, numel // 3, seed=seed, exclude=excluded)
        _check_invariants(t, SHAPES, numel // 3)
        assert t.overlap(excluded) == 0
        b = select(
            "bottomk", SHAPES, numel // 3, _deltas(SHAPES, seed).__getitem__, exclude=excluded
        )
        assert b.overlap(excluded) == 0 and b.nnz == numel // 3
        assert _as_lists(b) == _reference(
            SHAPES, _deltas(SHAPES, seed), numel // 3, exclude=excluded, smallest=True
        )


def test_selection_independent_of_dict_order():
    names = list(SHAPES)
    deltas = _deltas(SHAPES, 4)
    numel = sum(math.prod(s) for s in SHAPES.values())
    k = numel // 3
    results = {}
    for method in ["magnitude", "bottomk", "random"]:
        seen = set()
        for perm in itertools.islice(itertools.permutations(names), 0, None, 23):
            shapes = {n: SHAPES[n] for n in perm}
            d = {n: deltas[n] for n in reversed(perm)}
            t = select(method, shapes, k, d.__getitem__, seed=2)
            assert t.names == sorted(names)
            seen.add(tuple((n, tuple(v)) for n, v in sorted(_as_lists(t).items())))
        assert len(seen) == 1, method
        results[method] = seen.pop()
    assert results["magnitude"] != results["bottomk"]


def test_progress_ticks_once_per_tensor_per_pass():
    class Count:
        n = 0

        def update(self, i):
            self.n += i

    c = Count()
    select("magnitude", SHAPES, 5, _deltas(SHAPES, 0).__getitem__, progress=c)
    assert c.n == 2 * len(SHAPES)  # a histogram pass and a collecting pass


@pytest.mark.parametrize("nonnegative", [True, False])
def test_three_pass_fallback_equals_two_pass(nonnegative):
    from lota.selection import select_top_k

    shapes = {"b": (64, 33), "a": (500,), "c": (7, 7)}
    g = torch.Generator().manual_seed(4)
    scores = {
        n: torch.randn(math.prod(s), generator=g).round(decimals=1) for n, s in shapes.items()
    }
    if nonnegative:
        scores = {n: v.abs() for n, v in scores.items()}
    exclude = select("random", shapes, 300, seed=9)
    for k in (1, 17, 700, 1500):
        two = select_top_k(
            list(shapes), shapes, scores.__getitem__, k, exclude=exclude, nonnegative=nonnegative
        )
        three = select_top_k(
            list(shapes),
            shapes,
            scores.__getitem__,
            k,
            exclude=exclude,
            nonnegative=nonnegative,
            candidate_budget=0,
        )
        assert all(torch.equal(two[n], three[n]) for n in shapes)
        assert sum(v.numel() for v in two.values()) == k


@pytest.mark.parametrize("budget", [1 << 24, 0])
def test_scores_stay_where_they_are_and_the_device_path_selects_the_same_ticket(
    monkeypatch, budget
):
    """No score tensor is copied to the host whole (a GPU's stay on it: only histograms and the
    selected positions cross), and the path a GPU takes (torch's ``nonzero`` instead of numpy's)
    gives the same exact ticket, with ties, protected entries and the three-pass finish."""
    import lota.selection as selection

    shapes = {"b": (64, 33), "a": (500,), "c": (7, 7)}
    g = torch.Generator().manual_seed(4)
    scores = {
        n: torch.randn(math.prod(s), generator=g).round(decimals=1) for n, s in shapes.items()
    }
    exclude = select("random", shapes, 300, seed=9)

    def run(nonnegative):
        fn = (lambda n: scores[n].abs()) if nonnegative else scores.__getitem__
        return [
            select_top_k(
                list(shapes),
                shapes,
                fn,
                k,
                exclude=exclude,
                nonnegative=nonnegative,
                candidate_budget=budget,
            )
            for k in (1, 17, 700, 1500)
        ]

    expected = {nn: run(nn) for nn in (True, False)}
    moved = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: moved.append(t.numel()) or cpu(t))
    monkeypatch.setattr(selection, "_NUMPY_ON_HOST", False)
    for nonnegative, tickets in expected.items():
        got = run(nonnegative)
        for a, b in zip(got, tickets):
            assert all(torch.equal(a[n], b[n]) for n in shapes)
    # only histograms (65,536 bins) and at most k positions: never the 2,112 scores of 'b'
    assert moved and all(m == 1 << 16 or m <= 1500 for m in moved)
