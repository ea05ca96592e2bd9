"""Hot-swap (``DeltaBank``): switching deltas in place equals ``lota apply``, restores the base
bit for bit, refuses what it cannot do exactly, and composes with ``prepare`` and ``generate``."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import lota
from lota import format as fmt
from lota.delta import SparseDelta, apply_delta_
from lota.hotswap import DeltaBank
from lota.models import load_model
from lota.selection import select
from lota.targets import named_weights, resolve_targets
from lota.toy import tiny_llama
from lota.weights import model_fingerprint

from .conftest import ADAPT
from .test_cli import assert_refused
from .test_cli import lota as run_cli

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    )


ARCHS = {
    "llama": lambda: tiny_llama(hidden=32, layers=2, heads=2),
    "gpt2": gpt2,  # Conv1D weights, tied head
}


def random_delta(model, k, seed, ticket=None, scale=0.05) -> SparseDelta:
    """``k`` random target entries of ``model`` with random float32 values, for its base."""
    ticket = ticket or select("random", resolve_targets(model), k, seed=seed)
    ticket.base_fingerprint = model_fingerprint(model)
    g = torch.Generator().manual_seed(seed)
    values = {n: scale * torch.randn(i.numel(), generator=g) for n, i in ticket.indices.items()}
    return SparseDelta(ticket=ticket, values=values)


def disjoint_deltas(model, k, n, seed=0) -> list[SparseDelta]:
    """``n`` deltas of ``k`` entries each on disjoint tickets (as LoTTO makes them)."""
    union = select("random", resolve_targets(model), k * n, seed=seed)
    out = []
    for j in range(n):
        indices = {}
        for name, idx in union.indices.items():
            indices[name] = idx[j::n]
        t = lota.Ticket(shapes=dict(union.shapes), indices=indices)
        out.append(random_delta(model, 0, seed + j + 1, ticket=t))
    return out


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def bit_identical(model, snap) -> bool:
    now = model.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[n], snap[n]) for n in snap)


def applied(model, *deltas: SparseDelta):
    """A copy of ``model`` with the deltas added by ``lota apply``'s arithmetic, in order."""
    ref = copy.deepcopy(model)
    for d in deltas:
        apply_delta_(named_weights(ref), d)
    return snapshot(ref)


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_active_delta_equals_lota_apply_and_base_is_restored_after_1000_switches(arch, dtype):
    model = ARCHS[arch]().to(dtype)
    base = snapshot(model)
    a, b, c = disjoint_deltas(model, 300, 3)
    bank = DeltaBank(model).add("a", a).add("b", b).add("c", c)
    want_a, want_bc = applied(model, a), applied(model, b, c)
    bank.activate("a")
    assert bit_identical(model, want_a)
    bank.switch("b", "c")
    assert bit_identical(model, want_bc)
    for i in range(1000):
        bank.switch(*(["b", "c"] if i % 2 else ["a"]))
    assert bank.active == ["b", "c"] and bit_identical(model, want_bc)
    bank.deactivate()
    assert bank.active == [] and bit_identical(model, base)


def test_scaled_activation_equals_scaled_apply():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    d = random_delta(model, 500, 3)
    ref = copy.deepcopy(model)
    apply_delta_(named_weights(ref), d, scale=0.5)
    bank = DeltaBank(model).add("d", d)
    bank.activate("d", scale=0.5)
    assert bit_identical(model, snapshot(ref))


def test_overlapping_deltas_are_refused_unless_allowed_then_stack_exactly():
    model = tiny_llama(hidden=32, layers=2, heads=2).to(torch.bfloat16)
    base = snapshot(model)
    a, b, c = (random_delta(model, 2000, s) for s in (1, 2, 3))
    want = {"a": applied(model, a), "abc": applied(model, a, b, c), "bc": applied(model, b, c)}
    want["b"] = applied(model, b)
    bank = DeltaBank(model).add("a", a).add("b", b).add("c", c)
    assert bank.overlap("a", "b") > 0 and bank.overlap("b", "c") > 0
    bank.activate("a")
    with pytest.raises(lota.InputError, match="share"):
        bank.activate("b")
    with pytest.raises(lota.InputError, match="share"):
        bank.switch("b", "c")
    assert bank.active == ["a"] and bit_identical(model, want["a"])  # refusals change nothing
    bank.activate("b", "c", allow_overlap=True)
    assert bit_identical(model, want["abc"])  # in order, as 'lota apply A B C' adds them
    # taking the lowest off leaves exactly what activating the others in order on the base gives
    bank.deactivate("a")
    assert bank.active == ["b", "c"] and bit_identical(model, want["bc"])
    bank.deactivate("c")
    assert bit_identical(model, want["b"])
    bank.deactivate()
    assert bit_identical(model, base)


def test_using_restores_the_previous_set_even_on_error():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    base = snapshot(model)
    a, b = disjoint_deltas(model, 400, 2)
    bank = DeltaBank(model).add("a", a).add("b", b)
    want_a, want_b = applied(model, a), applied(model, b)
    bank.activate("a")
    with bank.using("b"):
        assert bank.active == ["b"] and bit_identical(model, want_b)
        with bank.using("a", "b"):
            assert sorted(bank.active) == ["a", "b"]
        assert bank.active == ["b"]
    assert bank.active == ["a"] and bit_identical(model, want_a)
    with pytest.raises(RuntimeError), bank.using():
        assert bank.active == [] and bit_identical(model, base)
        raise RuntimeError("inside the block")
    assert bank.active == ["a"]
    bank.deactivate()
    assert bit_identical(model, base)


def test_tied_weights_count_as_one_tensor():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    first, second = (model.model.layers[i].mlp.up_proj for i in (0, 1))
    second.weight = first.weight  # one tensor under two names
    shape = tuple(first.weight.shape)
    fp = model_fingerprint(model)
    idx = torch.arange(0, 40, 2)

    def delta(name):
        t = lota.Ticket(shapes={name: shape}, indices={name: idx}, base_fingerprint=fp)
        return SparseDelta(t, {name: torch.ones(idx.numel())})

    bank = DeltaBank(model).add("one", delta("model.layers.0.mlp.up_proj.weight"))
    bank.add("two", delta("model.layers.1.mlp.up_proj.weight"))
    assert bank.overlap("one", "two") == idx.numel()
    bank.activate("one")
    with pytest.raises(lota.InputError, match="share"):
        bank.activate("two")


@pytest.mark.parametrize("name", ["lm_head.weight", "transformer.wte.weight"])
def test_a_delta_on_a_tied_embedding_is_refused_until_the_model_is_untied(name):
    """Written in place, a tied embedding's change would reach the head too, unlike lota apply
    (which gives the head its own copy): refused in one line; once untied, it equals apply."""
    model = gpt2()  # lm_head.weight is transformer.wte.weight
    base = snapshot(model)
    fp = model_fingerprint(model)
    shape, idx = tuple(model.lm_head.weight.shape), torch.arange(0, 40, 2)
    t = lota.Ticket(shapes={name: shape}, indices={name: idx}, base_fingerprint=fp)
    d = SparseDelta(t, {name: torch.ones(idx.numel())})
    with pytest.raises(lota.InputError) as e:
        DeltaBank(model).add("d", d)
    assert len(e.value.line().splitlines()) == 1 and "ties" in e.value.line()
    assert bit_identical(model, base)
    assert lota.untie_embeddings(model) == "lm_head.weight" and model_fingerprint(model) == fp
    want = applied(model, d)
    bank = DeltaBank(model).add("d", d)
    bank.activate("d")
    assert bit_identical(model, want)
    other = "transformer.wte.weight" if name == "lm_head.weight" else "lm_head.weight"
    assert torch.equal(named_weights(model)[other], base["lm_head.weight"])  # the other: as before


def test_switching_holds_only_the_active_entries():
    model = tiny_llama(hidden=32, layers=2, heads=2).to(torch.bfloat16)
    a, b = disjoint_deltas(model, 700, 2)
    bank = DeltaBank(model).add("a", a).add("b", b)
    assert bank.memory_bytes() == {"registered": 2 * 700 * (8 + 4), "active": 0}
    bank.activate("a")
    assert bank.memory_bytes()["active"] == a.nnz * 2 * 2  # replaced and written, bf16
    bank.deactivate()
    lean = DeltaBank(model, verify=False).add("a", a)
    lean.activate("a")
    assert lean.memory_bytes()["active"] == a.nnz * 2  # replaced only


# ---------------------------------------------------------------------------- refusals
def test_foreign_and_malformed_deltas_are_refused(tmp_path):
    model = tiny_llama(hidden=32, layers=2, heads=2)
    base = snapshot(model)
    other = random_delta(tiny_llama(hidden=32, layers=2, heads=2, seed=1), 100, 1)
    bank = DeltaBank(model)
    with pytest.raises(lota.MismatchError, match="made for base"):
        bank.add("other", other)
    bank.add("other", other, allow_mismatch=True)  # explicitly allowed
    wide = random_delta(tiny_llama(hidden=48, layers=2, heads=2), 100, 1)
    with pytest.raises(lota.InputError, match="shape|does not have"):
        bank.add("wide", wide, allow_mismatch=True)
    nan = random_delta(model, 100, 2)
    next(iter(nan.values.values()))[0] = float("nan")
    with pytest.raises(lota.InputError, match="non-finite"):
        bank.add("nan", nan)
    bad = random_delta(model, 100, 3)
    name = next(n for n, i in bad.indices.items() if i.numel() > 1)
    bad.ticket.indices[name] = bad.indices[name].flip(0)
    with pytest.raises(lota.InputError, match="sorted"):
        bank.add("unsorted", bad)
    t = select("random", resolve_targets(model), 10, seed=0)
    fmt.save(t, tmp_path / "t.safetensors")
    with pytest.raises(lota.InputError, match="ticket, not a delta"):
        bank.add("ticket", tmp_path / "t.safetensors")
    with pytest.raises(lota.InputError, match="no delta named"):
        bank.activate("missing")
    assert bank.names == ["other"] and bit_identical(model, base)


def test_shape_and_range_mismatches_name_the_tensor():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    d = random_delta(model, 50, 1)
    name = next(iter(d.indices))
    d.ticket.shapes[name] = (1, 1)
    d.ticket.indices[name] = torch.zeros(0, dtype=torch.long)
    d.values[name] = torch.zeros(0)
    with pytest.raises(lota.InputError, match=f"'{name}' has shape"):
        DeltaBank(model).add("d", d)
    d2 = random_delta(model, 50, 1)
    d2.ticket.indices[name] = torch.tensor([10**9])
    d2.values[name] = torch.zeros(1)
    with pytest.raises(lota.InputError, match=f"'{name}' are not sorted, unique and inside"):
        DeltaBank(model).add("d2", d2)


# ---------------------------------------------------------------------------- composition
def test_prepare_trains_on_top_and_switching_a_trained_tensor_is_refused():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    base = snapshot(model)
    a, b = disjoint_deltas(model, 400, 2)
    bank = DeltaBank(model).add("a", a)
    bank.activate("a")
    lota.prepare(model, b.ticket)  # train task B on top of active A, on a disjoint ticket
    with pytest.raises(lota.InputError, match="being trained"):
        bank.deactivate("a")
    opt = torch.optim.AdamW(lota.trainable_parameters(model), lr=1e-2)
    ids = torch.randint(3, 200, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    trained = lota.extract_delta(model)
    lota.unprepare(model)
    bank.deactivate("a")  # A's entries back to the base; B's trained entries stay
    ref = tiny_llama(hidden=32, layers=2, heads=2)
    assert bit_identical(ref, base)
    apply_delta_(named_weights(ref), trained)
    assert bit_identical(model, snapshot(ref))


def test_a_changed_entry_is_not_silently_discarded():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    base = snapshot(model)
    (a,) = disjoint_deltas(model, 300, 1)
    bank = DeltaBank(model).add("a", a)
    bank.activate("a")
    name = next(n for n, i in a.indices.items() if i.numel())
    with torch.no_grad():
        named_weights(model)[name].view(-1)[a.indices[name][0]] += 1.0
    with pytest.raises(lota.InputError, match="changed since"):
        bank.deactivate("a")
    assert bank.active == ["a"]
    bank.deactivate("a", discard_changes=True)
    assert bit_identical(model, base)


def test_generate_sees_the_active_delta_and_then_the_base():
    model = tiny_llama(hidden=32, layers=2, heads=2).eval()
    d = random_delta(model, 3000, 5, scale=0.5)
    ref = copy.deepcopy(model)
    apply_delta_(named_weights(ref), d)
    ids = torch.randint(3, 200, (2, 6))

    def gen(m):
        return m.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)

    want_base, want_tuned = gen(model), gen(ref)
    assert not torch.equal(want_base, want_tuned)  # the delta changes what is generated
    bank = DeltaBank(model).add("d", d)
    with bank.using("d"):
        assert torch.equal(gen(model), want_tuned)
    assert torch.equal(gen(model), want_base)


# ---------------------------------------------------------------------------- lota eval
def test_eval_with_deltas_equals_eval_of_the_applied_folder(workdir, trained, capsys, tmp_path):
    base, data = workdir / "base", workdir / "a.jsonl"
    delta = trained / "delta.safetensors"
    other = tmp_path / "other.safetensors"
    model = load_model(str(base))
    fmt.save(random_delta(model, 2000, 9, scale=0.3), other)
    for name, files in {"a": [delta], "other": [other]}.items():
        code, _, err = run_cli(capsys, "apply", base, *files, "--out", tmp_path / name)
        assert code == 0, err
    common = ["--data", data, "--limit", "6", "--max-new-tokens", "6", "--json", "--quiet"]

    def scored(*args):
        code, out, err = run_cli(capsys, "eval", *args, *common)
        assert code == 0, err
        return json.loads(out)

    def preds(r):
        return [e["prediction"] for e in r["examples"]]

    want = {name: scored(tmp_path / name) for name in ("a", "other")}
    got = scored(base, "--delta", delta)
    assert preds(got) == preds(want["a"]) and got["deltas"] == [str(delta)]
    each = scored(base, "--delta", delta, "--delta", other, "--each")
    assert [preds(r) for r in each["results"]] == [preds(want["a"]), preds(want["other"])]
    assert preds(want["a"]) != preds(want["other"])
    code, out, _ = run_cli(capsys, "eval", base, "--delta", delta, *common[:-2], "--quiet")
    assert code == 0 and "with" in out and str(delta) in out


def test_eval_refusals(workdir, trained, capsys, tmp_path):
    base, data = workdir / "base", workdir / "a.jsonl"
    delta = trained / "delta.safetensors"
    foreign = tmp_path / "foreign.safetensors"
    fmt.save(random_delta(tiny_llama(hidden=32, layers=2, heads=2, seed=3), 100, 1), foreign)
    assert_refused(*run_cli(capsys, "eval", base, "--data", data, "--delta", foreign), "made for")
    assert_refused(*run_cli(capsys, "eval", base, "--data", data, "--each"), "--each")
    assert_refused(
        *run_cli(capsys, "eval", base, "--data", data, "--delta", delta, "--delta", delta),
        "twice",
    )
    assert_refused(
        *run_cli(capsys, "eval", base, "--data", data, "--delta", workdir / "missing.safetensors"),
        "missing",
    )
    code, _, err = run_cli(
        capsys, "eval", base, "--data", data, "--limit", "2", "--max-new-tokens", "2",
        "--delta", foreign, "--allow-mismatch", "--quiet",
    )  # fmt: skip
    assert code == 0, err


def test_one_delta_file_under_two_names_is_refused_not_added_twice(
    workdir, trained, capsys, tmp_path
):
    base, data = workdir / "base", workdir / "a.jsonl"
    delta = tmp_path / "d.safetensors"
    delta.write_bytes((trained / "delta.safetensors").read_bytes())
    link = tmp_path / "link.safetensors"
    link.symlink_to(delta)
    hard = tmp_path / "hard.safetensors"
    os.link(delta, hard)
    (tmp_path / "sub").mkdir()
    for other in (link, hard, tmp_path / "sub" / ".." / "d.safetensors"):
        for each in ([], ["--each"]):
            got = run_cli(
                capsys, "eval", base, "--data", data, "--delta", delta, "--delta", other,
                "--allow-overlap", *each,
            )  # fmt: skip
            assert_refused(*got, "twice", str(other))


def test_a_lotto_chain_switches_in_as_lota_apply_writes_it(workdir, trained, capsys, tmp_path):
    base, a = workdir / "base", trained / "delta.safetensors"
    code, _, err = run_cli(
        capsys, "adapt", trained / "model", "--data", workdir / "b.jsonl",
        "--out", tmp_path / "b", "--protect", a, *ADAPT,
    )  # fmt: skip
    assert code == 0, err
    b = tmp_path / "b" / "delta.safetensors"  # trained on top of A: made for base + A
    with pytest.raises(lota.MismatchError, match="made for base"):
        DeltaBank(load_model(str(base))).add("b", b)
    code, _, err = run_cli(capsys, "apply", base, a, b, "--out", tmp_path / "ab")
    assert code == 0, err
    model = load_model(str(base))
    before = snapshot(model)
    bank = DeltaBank(model).add("a", a).add("b", b)
    assert bank.active == [] and bit_identical(model, before)  # checking B switched nothing in
    bank.activate("a", "b")
    assert bit_identical(model, snapshot(load_model(str(tmp_path / "ab"))))
    bank.deactivate()
    assert bit_identical(model, before)
    code, out, err = run_cli(
        capsys, "eval", base, "--data", workdir / "b.jsonl", "--limit", "2",
        "--max-new-tokens", "2", "--delta", a, "--delta", b, "--quiet",
    )  # fmt: skip
    assert code == 0 and " + " in out, err


# ---------------------------------------------------------------------------- all or nothing
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 1e39])
def test_a_scale_that_is_not_a_finite_float32_is_refused(scale):
    model = tiny_llama(hidden=32, layers=2, heads=2)
    base = snapshot(model)
    bank = DeltaBank(model).add("d", random_delta(model, 300, 1))
    with pytest.raises(lota.InputError, match="scale .* is not a finite number"):
        bank.activate("d", scale=scale)
    assert bank.active == [] and bit_identical(model, base)


def test_a_sum_that_overflows_float16_weights_is_refused_and_changes_nothing():
    model = tiny_llama(hidden=32, layers=2, heads=2).to(torch.float16)
    base = snapshot(model)
    a, big = disjoint_deltas(model, 300, 2)
    name = next(n for n, i in big.indices.items() if i.numel())
    big.values[name][0] = 1e5  # finite in float32, beyond float16's 65504
    want_a = applied(model, a)
    bank = DeltaBank(model).add("a", a).add("big", big)
    with pytest.raises(lota.InputError, match=f"'{name}' overflows its float16") as e:
        bank.activate("a", "big")  # 'a' was written before 'big' overflowed: it is undone too
    assert e.value.where == "delta 'big'"
    assert bank.active == [] and bit_identical(model, base)
    bank.activate("a")
    with pytest.raises(lota.InputError, match="overflows"):
        bank.switch("big")
    assert bank.active == ["a"] and bit_identical(model, want_a)


def _overlapping_bank():
    """A bank with ``a`` and ``b`` sharing entries (stacked), ``c`` disjoint from both."""
    model = tiny_llama(hidden=32, layers=2, heads=2).to(torch.bfloat16)
    a, b = random_delta(model, 2000, 1), random_delta(model, 2000, 2)
    union = lota.Ticket(
        shapes=dict(a.shapes),
        indices={n: torch.cat([a.indices[n], b.indices[n]]).unique() for n in a.indices},
    )
    c = select("random", resolve_targets(model), 500, seed=9, exclude=union)
    bank = DeltaBank(model, allow_overlap=True).add("a", a).add("b", b)
    bank.add("c", random_delta(model, 0, 3, ticket=c))
    assert bank.overlap("a", "b") > 0 and bank.overlap("a", "c") == bank.overlap("b", "c") == 0
    return model, bank


OPERATIONS = {  # each starts from 'a' then 'b' active
    "deactivate": lambda bank: bank.deactivate("a"),  # takes b off, restores a, puts b back
    "deactivate-all": lambda bank: bank.deactivate(),
    "switch": lambda bank: bank.switch("c", "b"),
    "using-exit": None,  # leaving 'with bank.using("c")': a and b back
}


def _prepared(op):
    """``(model, bank, the operation to interrupt)``, with 'a' then 'b' active."""
    model, bank = _overlapping_bank()
    bank.activate("a", "b")
    if op == "using-exit":
        block = bank.using("c")
        block.__enter__()
        return model, bank, lambda: block.__exit__(None, None, None)
    return model, bank, lambda: OPERATIONS[op](bank)


def _patched_weight(monkeypatch, fail_at=None, error=RuntimeError) -> list[int]:
    """Count the per-tensor weight look-ups of every read and write of the bank, raising
    ``error`` once, at look-up ``fail_at`` (from 0), as one Ctrl-C would."""
    calls, real = [0], lota.hotswap._weight

    def weight(module, attr):
        calls[0] += 1
        if calls[0] - 1 == fail_at:
            raise error("interrupted")
        return real(module, attr)

    monkeypatch.setattr(lota.hotswap, "_weight", weight)
    return calls


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_an_interrupted_switch_leaves_the_weights_and_active_as_before(op, error, monkeypatch):
    model, bank, run = _prepared(op)
    calls = _patched_weight(monkeypatch)
    run()
    monkeypatch.undo()
    total = calls[0]
    for fail_at in sorted({0, 1, total // 3, total // 2, total - 1}):
        model, bank, run = _prepared(op)
        before, active = snapshot(model), bank.active
        _patched_weight(monkeypatch, fail_at, error)
        with pytest.raises(error):
            run()
        monkeypatch.undo()
        assert bank.active == active, (op, fail_at)
        assert bit_identical(model, before), (op, fail_at)
        bank.deactivate()  # the bank still works: everything off gives the base
        assert bit_identical(model, snapshot(_overlapping_bank()[0])), (op, fail_at)


def test_changing_a_delta_after_add_changes_nothing_in_the_bank():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    d = random_delta(model, 300, 4)
    want = applied(model, d)
    bank = DeltaBank(model).add("d", d)
    name = next(n for n, i in d.indices.items() if i.numel() > 1)
    d.values[name].fill_(float("nan"))  # past add()'s checks: the bank must not see it
    d.indices[name][0] = 10**9
    d.indices[name].flip(0)
    bank.activate("d")
    assert bit_identical(model, want)


def test_deactivate_with_nothing_active_does_nothing():
    model = tiny_llama(hidden=32, layers=2, heads=2)
    base = snapshot(model)
    bank = DeltaBank(model).add("d", random_delta(model, 300, 5))
    bank.deactivate()
    assert bank.active == [] and bit_identical(model, base)
    bank.activate("d")
    bank.deactivate()
    bank.deactivate()
    assert bank.active == [] and bit_identical(model, base)
    with pytest.raises(lota.InputError, match="'d' is not active"):
        bank.deactivate("d")
