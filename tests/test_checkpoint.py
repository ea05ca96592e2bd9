"""Checkpoints: the state round trip, the settings hash, and the run's mark."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lota.checkpoint import DIRNAME, NEUTRAL, Checkpointer, config_hash, load_optimizer_state
from lota.errors import FormatError, MismatchError
from lota.ticket import Ticket

CONFIG = {"lr": 1e-3, "steps": 4, "seed": 0, "base": "m", "progress": True}


def params_and_optimizer(kind: str = "adamw"):
    torch.manual_seed(0)
    params = {
        "a.delta": torch.nn.Parameter(torch.randn(5)),
        "b.delta": torch.nn.Parameter(torch.randn(3)),
    }
    if kind == "adamw":
        opt = torch.optim.AdamW(params.values(), lr=0.1)
    else:
        opt = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    return params, opt


def step_(params, opt, k: int) -> None:
    for i in range(k):
        loss = sum(((p - i) ** 2).sum() for p in params.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- settings hash
def test_the_hash_ignores_settings_that_do_not_change_the_result():
    h = config_hash(CONFIG)
    assert set(NEUTRAL) >= {"progress", "force", "resume", "restart", "checkpoint_every"}
    for key in NEUTRAL:
        assert config_hash({**CONFIG, key: "anything"}) == h, key
    assert config_hash(dict(reversed(list(CONFIG.items())))) == h


@pytest.mark.parametrize(("key", "value"), [("lr", 2e-3), ("steps", 5), ("seed", 1), ("new", 0)])
def test_the_hash_changes_with_any_other_setting(key, value):
    assert config_hash({**CONFIG, key: value}) != config_hash(CONFIG)


def test_the_hash_takes_paths_and_is_short():
    h = config_hash({**CONFIG, "out": Path("/x/y")})
    assert h == config_hash({**CONFIG, "out": "/x/y"}) and len(h) == 24


# ---------------------------------------------------------------------------- state round trip
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_checkpoint_gives_back_its_state_exactly(tmp_path, kind):
    params, opt = params_and_optimizer(kind)
    step_(params, opt, 2)
    ck = Checkpointer(tmp_path, CONFIG, every=1)
    ck.base_fingerprint = "blake2b:00"
    rng = torch.get_rng_state()
    ck.save("sparse", 2, params=params, optimizer=opt, batches=7, metric_lines=9)
    assert ck.exists() and ck.matches() and ck.state_path.parent == tmp_path / DIRNAME
    state = ck.load()
    assert (state["phase"], state["step"], state["batches"], state["metric_lines"]) == (
        "sparse",
        2,
        7,
        9,
    )
    assert state["base_fingerprint"] == "blake2b:00" and state["ticket"] is None
    assert torch.equal(state["rng"], rng)
    assert list(state["params"]) == list(params)
    for name, p in params.items():
        assert torch.equal(state["params"][name], p.detach())
    saved = opt.state_dict()["state"]
    assert set(state["optimizer"]) == set(saved)
    for i, entry in saved.items():
        for key, value in entry.items():
            back = state["optimizer"][i][key]
            assert torch.equal(back, value) if isinstance(value, torch.Tensor) else back == value


def test_resuming_the_optimizer_continues_the_same_bits(tmp_path):
    params, opt = params_and_optimizer()
    step_(params, opt, 1)
    ck = Checkpointer(tmp_path, CONFIG, every=1)
    ck.save("train", 1, params=params, optimizer=opt, batches=1, metric_lines=1)
    step_(params, opt, 2)  # the uninterrupted run
    state = ck.load()
    resumed = {n: torch.nn.Parameter(v.clone()) for n, v in state["params"].items()}
    opt2 = torch.optim.AdamW(resumed.values(), lr=0.1)
    load_optimizer_state(opt2, state["optimizer"])
    step_(resumed, opt2, 2)
    for name in params:
        assert torch.equal(resumed[name], params[name])


def test_the_ticket_is_kept_beside_the_state(tmp_path):
    ticket = Ticket(shapes={"w": (2, 3)}, indices={"w": torch.tensor([1, 4])})
    ck = Checkpointer(tmp_path, CONFIG, every=1)
    ck.save_ticket(ticket)
    ck.save("sparse", 1, params={}, optimizer=None, batches=0, metric_lines=0)
    back = ck.load(shapes={"w": (2, 3)})["ticket"]
    assert torch.equal(back.indices["w"], ticket.indices["w"])
    assert back.meta["config"] == {"checkpoint_config_hash": ck.hash}
    with pytest.raises(MismatchError):
        ck.load(shapes={"w": (3, 2)})


def test_a_damaged_checkpoint_is_refused(tmp_path):
    params, opt = params_and_optimizer()
    ck = Checkpointer(tmp_path, CONFIG, every=1)
    ck.save("train", 1, params=params, optimizer=opt, batches=1, metric_lines=1)
    data = bytearray(ck.state_path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    ck.state_path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="the checkpoint is unreadable") as e:
        ck.load()
    assert e.value.where == str(ck.state_path) and "--restart" in e.value.fix


def test_a_checkpoint_of_other_settings_does_not_match(tmp_path):
    params, opt = params_and_optimizer()
    Checkpointer(tmp_path, CONFIG, every=1).save(
        "train", 1, params=params, optimizer=opt, batches=1, metric_lines=1
    )
    assert Checkpointer(tmp_path, {**CONFIG, "force": True}, every=1).matches()
    assert not Checkpointer(tmp_path, {**CONFIG, "lr": 1.0}, every=1).matches()
    assert not Checkpointer(tmp_path / "elsewhere", CONFIG, every=1).matches()


def test_checkpoints_are_written_every_n_steps_and_at_the_last(tmp_path):
    params, opt = params_and_optimizer()
    ck = Checkpointer(tmp_path, CONFIG, every=2)
    written = []
    for step in range(1, 6):
        ck.maybe_save("train", step, 5, params=params, optimizer=opt, batches=step, metric_lines=0)
        if ck.exists():
            written.append(ck.load()["step"])
    assert sorted(set(written)) == [2, 4, 5]
    never = Checkpointer(tmp_path / "b", CONFIG, every=0)
    for step in range(1, 5):
        never.maybe_save("train", step, 5, params=params, optimizer=opt, batches=0, metric_lines=0)
    assert not never.exists()


# ---------------------------------------------------------------------------- mark and clear
def test_the_mark_records_the_settings_before_anything_else(tmp_path):
    ck = Checkpointer(tmp_path, CONFIG, every=1)
    assert ck.started_hash() is None
    ck.mark_started()
    assert ck.started_hash() == config_hash(CONFIG) and not ck.exists()
    ck.started_path.write_text("{not json", encoding="utf-8")
    assert ck.started_hash() is None


def test_clear_removes_the_checkpoint_folder(tmp_path):
    params, opt = params_and_optimizer()
    ck = Checkpointer(tmp_path, CONFIG, every=1)
    ck.mark_started()
    ck.save("train", 1, params=params, optimizer=opt, batches=1, metric_lines=1)
    (tmp_path / "result.txt").write_text("kept")
    ck.clear()
    assert not ck.dir.exists() and (tmp_path / "result.txt").read_text() == "kept"
    ck.clear()  # nothing left to clear is fine


def test_a_process_that_is_not_the_writer_writes_nothing(tmp_path):
    params, opt = params_and_optimizer()
    writer = Checkpointer(tmp_path, CONFIG, every=1)
    writer.mark_started()
    other = Checkpointer(tmp_path, CONFIG, every=1, writer=False)
    other.mark_started()
    other.save_ticket(Ticket(shapes={"w": (2,)}, indices={"w": torch.tensor([0])}))
    other.save("train", 1, params=params, optimizer=opt, batches=1, metric_lines=1)
    assert not other.exists() and not other.ticket_path.exists()
    other.clear()
    assert writer.started_hash() == writer.hash
