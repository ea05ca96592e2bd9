import math

import pytest
import torch

from lota.delta import SparseDelta, apply_delta_
from lota.errors import InputError
from lota.format import load, save
from lota.selection import select, ticket_size
from lota.sparse_model import (
    extract_delta,
    is_prepared,
    prepare,
    trainable_parameters,
    unprepare,
)
from lota.ticket import Ticket
from lota.toy import tiny_llama

SIZE = dict(hidden=32, layers=2, heads=2)
DELTA_SUFFIX = ".parametrizations.weight.0.delta"


def _model(dtype=torch.float32):
    return tiny_llama(**SIZE).to(dtype)


def _targets(model):
    return {
        n: tuple(p.shape)
        for n, p in model.named_parameters()
        if p.dim() == 2 and "layers." in n and n.endswith("proj.weight")
    }


def _ticket(model, sparsity="0.9", seed=0, empty=None):
    shapes = _targets(model)
    numel = sum(math.prod(s) for s in shapes.values())
    t = select("random", shapes, ticket_size(sparsity, numel), seed=seed)
    if empty is not None:
        t.indices[empty] = torch.zeros(0, dtype=torch.long)
    return t


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _batch(seed, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (batch, length), generator=g)


def _train(model, opt, steps=5):
    for step in range(steps):
        ids = _batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _check_frozen(before, after, ticket, expect_change=True):
    assert set(before) == set(after)
    masks = ticket.dense_masks()
    changed = 0
    for name, b in before.items():
        a = after[name]
        assert a.dtype == b.dtype and a.shape == b.shape
        if name in masks:
            m = masks[name]
            assert torch.equal(a[~m], b[~m]), name
            changed += int((a[m] != b[m]).sum())
        else:
            assert torch.equal(a, b), name
    if expect_change:
        assert changed > 0
    return changed


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    # fused kernels write parameters without bumping their version counter
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}


@pytest.mark.parametrize("all_params", [False, True], ids=["deltas", "all-params"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_frozen_entries_bit_identical_under_every_optimizer(opt_name, all_params):
    model = _model()
    ticket = _ticket(model, empty="model.layers.1.mlp.down_proj.weight")
    before = _snapshot(model)
    prepare(model, ticket)
    params = list(model.parameters()) if all_params else trainable_parameters(model)
    _train(model, OPTIMIZERS[opt_name](params))
    unprepare(model)
    assert not is_prepared(model)
    _check_frozen(before, _snapshot(model), ticket)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_every_optimizer_implementation_trains_on_the_live_delta(impl):
    """Each step's forward sees the previous steps' updates, however the optimizer writes them:
    the same run with the plain for-loop AdamW gives the same delta and the same final loss."""
    deltas, losses = [], []
    for kw in ({"foreach": False}, {impl: True}):
        model = _model()
        prepare(model, _ticket(model, sparsity="0.8", seed=5))
        _train(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-2, **kw), steps=4)
        deltas.append(extract_delta(model))
        ids = _batch(99)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    for name, v in deltas[0].values.items():
        assert v.abs().sum() > 0 or v.numel() == 0
        torch.testing.assert_close(deltas[1].values[name], v, rtol=1e-5, atol=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_only_deltas_are_trainable():
    model = _model()
    empty = "model.layers.0.self_attn.k_proj.weight"
    ticket = _ticket(model, empty=empty)
    names_before = [n for n, _ in model.named_parameters()]
    prepare(model, ticket)
    assert is_prepared(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == len(ticket.names)
    total = 0
    for name, p in trainable.items():
        assert name.endswith(DELTA_SUFFIX), name
        target = name.removesuffix(DELTA_SUFFIX) + ".weight"
        assert p.numel() == ticket.indices[target].numel()
        assert p.dtype == torch.float32 and p.dim() == 1
        total += p.numel()
    assert total == ticket.nnz
    assert trainable[empty.removesuffix(".weight") + DELTA_SUFFIX].numel() == 0
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in trainable.values()}
    unprepare(model)
    assert [n for n, _ in model.named_parameters()] == names_before
    assert trainable_parameters(model) == []


def test_extract_delta_applied_to_base_equals_trained_model(tmp_path):
    model = _model()
    ticket = _ticket(model, sparsity="0.8", seed=3)
    prepare(model, ticket)
    _train(model, torch.optim.AdamW(trainable_parameters(model), lr=1e-2, weight_decay=0.1))
    delta = extract_delta(model, base_fingerprint="blake2b:x")
    assert delta.base_fingerprint == "blake2b:x"
    assert {n: i.tolist() for n, i in delta.indices.items()} == {
        n: i.tolist() for n, i in ticket.indices.items()
    }
    assert delta.shapes == ticket.shapes
    assert all(v.dtype == torch.float32 for v in delta.values.values())
    assert sum(int((v != 0).sum()) for v in delta.values.values()) > 0
    # the parametrized weights the forward pass sees already hold the trained values
    live = {n: model.get_submodule(n[:-7]).weight.detach().clone() for n in ticket.names}
    unprepare(model)
    trained = _snapshot(model)

    fresh = _model()
    apply_delta_(dict(fresh.named_parameters()), delta)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, trained[name]), name
    for name in ticket.names:
        assert torch.equal(live[name], trained[name]), name

    path = tmp_path / "delta.safetensors"
    save(delta, path)
    again = _model()
    apply_delta_(dict(again.named_parameters()), load(path))
    for name, p in again.named_parameters():
        assert torch.equal(p, trained[name]), name


def _random_delta(ticket, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(i.numel(), generator=g) * scale for n, i in ticket.items()}
    return SparseDelta(ticket=ticket, values=values)


def test_prepare_from_delta_resumes_values():
    model = _model()
    before = _snapshot(model)
    delta = _random_delta(_ticket(model, seed=1))
    prepare(model, delta)
    resumed = extract_delta(model)
    for name in delta.names:
        assert torch.equal(resumed.values[name], delta.values[name])
    state = model.state_dict()
    for name, base in before.items():
        if name in delta.indices:
            idx = delta.indices[name]
            want = base.clone().reshape(-1)
            want[idx] = (base.reshape(-1)[idx].to(torch.float32) + delta.values[name]).to(
                base.dtype
            )
            live = state[name.removesuffix(".weight") + ".parametrizations.weight.original"]
            assert torch.equal(live.reshape(-1), want), name
            assert torch.equal(model.get_submodule(name[:-7]).weight.reshape(-1), want)
        else:
            assert torch.equal(state[name], base), name
    # the prepared model computes what the base with the delta applied computes
    plain = _model()
    apply_delta_(dict(plain.named_parameters()), delta)
    ids = _batch(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    unprepare(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(plain.named_parameters())[name]), name


def test_prepare_rejects_mismatched_ticket():
    model = _model()
    bad_name = Ticket(
        shapes={"model.nope.weight": (2, 2)}, indices={"model.nope.weight": torch.tensor([0])}
    )
    with pytest.raises(InputError, match="model.nope.weight"):
        prepare(model, bad_name)
    name = "model.layers.0.mlp.up_proj.weight"
    bad_shape = Ticket(shapes={name: (3, 3)}, indices={name: torch.tensor([0])})
    with pytest.raises(InputError, match="shape"):
        prepare(model, bad_shape)
    assert not is_prepared(model)
    assert all(p.requires_grad for p in model.parameters())


def test_gradient_equals_dense_gradient_at_ticket():
    model = _model()
    delta = _random_delta(_ticket(model, sparsity="0.7", seed=2), seed=5)
    prepare(model, delta)
    dense = _model()
    apply_delta_(dict(dense.named_parameters()), delta)
    for p in dense.parameters():
        p.requires_grad_(True)
    ids = _batch(7, batch=3, length=10)
    model(input_ids=ids, labels=ids).loss.backward()
    dense(input_ids=ids, labels=ids).loss.backward()
    dense_params = dict(dense.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None
            continue
        target = name.removesuffix(DELTA_SUFFIX) + ".weight"
        want = dense_params[target].grad.reshape(-1)[delta.indices[target]]
        assert param.grad is not None and param.grad.dtype == torch.float32
        torch.testing.assert_close(param.grad, want, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == len(delta.names)


def test_the_backward_pass_holds_one_dense_weight_gradient_at_a_time(monkeypatch):
    """Each target's dense gradient is gathered into its ticket entries as autograd produces it and
    is gone before the next one arrives, so the sparse phase never holds the model's gradient."""
    import weakref

    from lota import sparse_model

    model = _model()
    targets = _targets(model)
    prepare(model, _random_delta(_ticket(model), seed=1))
    alive, seen = [], []
    backward = sparse_model._SparseTie.backward

    def watched(ctx, grad):
        alive.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(grad))
        return backward(ctx, grad)

    monkeypatch.setattr(sparse_model._SparseTie, "backward", staticmethod(watched))
    ids = _batch(3, batch=2, length=12)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(seen) == len(targets) and max(alive) == 0
    assert all(r() is None for r in seen)


def test_bf16_base_with_fp32_delta():
    model = _model(torch.bfloat16)
    ticket = _ticket(model, seed=4)
    before = _snapshot(model)
    prepare(model, ticket, dtype=torch.float32)
    deltas = trainable_parameters(model)
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), steps=3)
    delta = extract_delta(model)
    assert all(v.dtype == torch.float32 for v in delta.values.values())
    unprepare(model)
    after = _snapshot(model)
    assert all(p.dtype == torch.bfloat16 for p in after.values())
    _check_frozen(before, after, ticket)
    fresh = _model(torch.bfloat16)
    apply_delta_(dict(fresh.named_parameters()), delta)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, after[name]), name


def test_positions_are_kept_once_on_the_weights_device_in_int32():
    model = _model()
    ticket = _ticket(model)
    prepare(model, ticket)
    from lota.sparse_model import parametrized_modules

    for name, module, attr, p in parametrized_modules(model):
        pos = p.positions()
        assert pos is p.positions()  # the same tensor every time: no index is rebuilt
        assert (
            pos.dtype == torch.int32 and pos.device == module.parametrizations[attr].original.device
        )
        assert torch.equal(pos.long(), ticket.indices[name])


class _HostReads:
    """Counts the calls from lota's own code that make the host wait for a GPU."""

    def __init__(self, monkeypatch):
        import sys

        self.count, self.on = 0, False
        t = torch.Tensor

        def wrap(owner, attr, when=None):
            orig = getattr(owner, attr)

            def f(*a, **k):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if self.on and caller.startswith("lota") and (when is None or when(*a, **k)):
                    self.count += 1
                return orig(*a, **k)

            monkeypatch.setattr(owner, attr, f)

        for attr in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
            wrap(t, attr)
        wrap(torch, "nonzero")
        wrap(torch, "repeat_interleave", lambda *a, **k: k.get("output_size") is None)
        wrap(torch.amp.GradScaler, "get_scale")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_sparse_step_reads_the_device_once_whatever_the_micro_batches(monkeypatch, sharded):
    """One read per optimizer step (the summed loss and token counts), none per micro-batch or
    per weight: the positions are kept, and a sharded weight's span is found once."""
    from lota.dist import World
    from lota.sparse_model import mark_sharded
    from lota.train import MetricsLog, TrainSettings, train

    model = _model()
    prepare(model, _ticket(model))
    if sharded:  # the FSDP2 path in one process: whole tensors are their own shards
        mark_sharded(model)
    reads = _HostReads(monkeypatch)

    def data():
        for step in range(100):
            ids = _batch(step, batch=6)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def on_step(step, opt):
        reads.on = True  # counted from the second step on (the first finds the spans)

    steps = 3
    train(
        model,
        trainable_parameters(model),
        data(),
        TrainSettings(lr=1e-3, steps=steps + 1),
        "train",
        MetricsLog(None),
        show_progress=False,
        on_step=on_step,
        world=World(),
        grad_accum=3,
    )
    assert reads.count == steps
