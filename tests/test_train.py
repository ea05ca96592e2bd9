"""The training loop: optimizers, the metrics log, micro-batches, and steps on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lota
from lota.dist import World
from lota.errors import InputError, TrainingError
from lota.targets import named_weights, resolve_targets
from lota.ticket import Ticket
from lota.toy import tiny_llama
from lota.train import (
    OPTIMIZERS,
    MetricsLog,
    TrainSettings,
    make_optimizer,
    micro_batches,
    train,
)


def fixed_batches(n: int = 4, batch: int = 4, length: int = 6, seed: int = 0):
    """``n`` fixed batches of random tokens, cycled forever (the same for every call)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 259, (batch, length), generator=g)
        labels = ids.clone()
        labels[:, : length // 2] = -100  # a prompt, then the completion
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})

    def stream():
        while True:
            yield from out

    return stream()


def prepared_model(seed: int = 0):
    model = tiny_llama(hidden=16, layers=1, heads=2, seed=seed)
    targets = resolve_targets(model)
    g = torch.Generator().manual_seed(1)
    indices = {
        n: torch.sort(torch.randperm(math.prod(s), generator=g)[:10]).values
        for n, s in targets.items()
    }
    lota.prepare(model, Ticket(shapes=targets, indices=indices))
    return model, indices


# ---------------------------------------------------------------------------- settings
def test_train_settings_defaults():
    s = TrainSettings(lr=1e-3, steps=5)
    assert (s.optimizer, s.weight_decay, s.momentum, s.max_grad_norm, s.seed) == (
        "adamw",
        0.0,
        0.0,
        1.0,
        0,
    )


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop), ("sgd", torch.optim.SGD)],
)
def test_each_optimizer_gets_its_settings(name, cls):
    assert name in OPTIMIZERS
    p = torch.nn.Parameter(torch.zeros(3))
    s = TrainSettings(lr=0.5, steps=1, optimizer=name, weight_decay=0.1, momentum=0.9)
    opt = make_optimizer([p], s)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.1 and group["params"] == [p]
    if name != "adamw":
        assert group["momentum"] == 0.9


@pytest.mark.parametrize(
    ("on_gpu", "expected"),
    [
        ((True, True), {"fused": True, "foreach": None}),
        ((True, False), {"fused": None, "foreach": True}),
        ((False, False), {"fused": None, "foreach": None}),
    ],
)
def test_adamw_is_fused_when_every_parameter_is_on_a_gpu(monkeypatch, on_gpu, expected):
    """Fused AdamW where every trained tensor is a floating-point CUDA tensor (the device check
    mocked: no GPU here), foreach where some are, torch's own loop on the CPU."""
    import lota.train as train_module

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    where = {id(p): gpu for p, gpu in zip(params, on_gpu)}
    monkeypatch.setattr(train_module, "_on_cuda", lambda p: where[id(p)])
    opt = make_optimizer(params, TrainSettings(lr=0.5, steps=1))
    assert type(opt) is torch.optim.AdamW
    assert {k: opt.defaults[k] for k in expected} == expected


def test_an_unknown_optimizer_is_refused_with_the_choices():
    with pytest.raises(InputError, match="unknown optimizer 'adam'") as e:
        make_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainSettings(1.0, 1, "adam"))
    assert e.value.where == "--optimizer"
    assert all(o in e.value.fix for o in OPTIMIZERS)


# ---------------------------------------------------------------------------- metrics log
def test_the_metrics_log_writes_one_json_object_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"phase": "train", "step": 1, "loss": 2.5})
    log.write({"phase": "train", "step": 2, "loss": float("nan")})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert log.records[0] == {"phase": "train", "step": 1, "loss": 2.5}
    assert math.isnan(json.loads(lines[1])["loss"])


def test_the_metrics_log_keeps_only_the_lines_of_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 6)), encoding="utf-8")
    log = MetricsLog(path, keep=3)
    assert [r["step"] for r in log.records] == [1, 2, 3]
    log.write({"step": 4, "again": True})
    assert [json.loads(x) for x in path.read_text().splitlines()][3:] == [
        {"step": 4, "again": True}
    ]
    MetricsLog(path)  # a fresh run starts an empty log
    assert path.read_text() == ""


def test_a_metrics_log_without_a_path_keeps_records_in_memory(tmp_path):
    log = MetricsLog(None)
    log.write({"step": 1})
    assert log.records == [{"step": 1}] and log.path is None
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- micro-batches
def test_micro_batches_split_the_global_batch_by_rank_then_accumulation():
    batch = {"input_ids": torch.arange(8).unsqueeze(1), "labels": torch.arange(8).unsqueeze(1)}
    parts = micro_batches(batch, World(rank=1, size=2), accum=2)
    assert [p["input_ids"].flatten().tolist() for p in parts] == [[4, 5], [6, 7]]
    assert [p["input_ids"].flatten().tolist() for p in micro_batches(batch, World(), 4)] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]


# ---------------------------------------------------------------------------- steps
def run_steps(steps: int = 3, **kw):
    model, indices = prepared_model()
    log = MetricsLog(None)
    s = TrainSettings(lr=1e-2, steps=steps)
    losses = train(
        model, lota.trainable_parameters(model), fixed_batches(), s, "train", log, False, **kw
    )
    return model, indices, losses, log


def test_training_steps_are_deterministic():
    model_a, _, losses_a, _ = run_steps()
    model_b, _, losses_b, _ = run_steps()
    assert losses_a == losses_b and len(losses_a) == 3
    delta_a, delta_b = lota.extract_delta(model_a), lota.extract_delta(model_b)
    assert any(bool(v.abs().sum() > 0) for v in delta_a.values.values())
    for name, v in delta_a.values.items():
        assert torch.equal(v, delta_b.values[name])


def test_training_leaves_every_entry_outside_the_ticket_bit_identical():
    model, indices, _, _ = run_steps()
    base = named_weights(tiny_llama(hidden=16, layers=1, heads=2, seed=0))
    after = named_weights(lota.unprepare(model))
    for name, w0 in base.items():
        w = after[name].detach()
        keep = torch.ones(w0.numel(), dtype=torch.bool)
        if name in indices:
            keep[indices[name]] = False
            assert not torch.equal(w.reshape(-1)[~keep], w0.detach().reshape(-1)[~keep])
        assert torch.equal(w.reshape(-1)[keep], w0.detach().reshape(-1)[keep]), name


def test_training_logs_each_step_and_calls_back_after_it():
    seen = []
    _, _, losses, log = run_steps(on_step=lambda step, opt: seen.append((step, type(opt))))
    assert seen == [(1, torch.optim.AdamW), (2, torch.optim.AdamW), (3, torch.optim.AdamW)]
    assert [r["step"] for r in log.records] == [1, 2, 3]
    assert [r["loss"] for r in log.records] == losses
    assert all(r["phase"] == "train" and r["lr"] == 1e-2 for r in log.records)
    assert all(r["completion_tokens"] == 4 * 3 for r in log.records)  # 4 rows, 3 labelled


def test_training_from_a_later_step_runs_only_the_remaining_steps():
    _, _, losses, log = run_steps(steps=4, start_step=2)
    assert len(losses) == 2 and [r["step"] for r in log.records] == [3, 4]


def test_training_nothing_is_refused():
    model = tiny_llama(hidden=16, layers=1, heads=2)
    with pytest.raises(InputError, match="nothing to train"):
        train(model, [], fixed_batches(), TrainSettings(1e-2, 1), "train", MetricsLog(None))


def test_a_non_finite_loss_stops_the_run():
    model, _ = prepared_model()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="the loss became nan at step 1 of sparse"):
        train(
            model,
            lota.trainable_parameters(model),
            fixed_batches(),
            TrainSettings(1e-2, 2),
            "sparse",
            MetricsLog(None),
            False,
        )
