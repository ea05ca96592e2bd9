"""``lota.events``: a run's phases, steps, checkpoints and model load, observed without patching;
an observer never changes or stops a run."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lota import events
from lota.adapt import AdaptConfig, adapt

SMALL = {"steps": 3, "calibration_steps": 2, "lr": 1e-2, "batch_size": 4, "progress": False}


def run(workdir, out: str) -> dict[str, torch.Tensor]:
    cfg = AdaptConfig(
        model=str(workdir / "base"), data=str(workdir / "a.jsonl"), out=str(workdir / out), **SMALL
    )
    adapt(cfg)
    return load_file(str(workdir / out / "delta.safetensors"))  # the tensors (the metadata
    # names the output folder)


def test_an_adapt_run_emits_its_phases_in_order(workdir):
    seen = []
    with events.subscribe(seen.append):
        run(workdir, "events_order")
    trace = [(e.kind, e.phase, e.step, e.data.get("what")) for e in seen]
    assert [t for t in trace if t[0] != "weight_hashed"] == [
        ("model_loaded", None, None, None),
        ("checkpoint_start", "calibration", 0, "state"),
        ("checkpoint_saved", "calibration", 0, "state"),
        ("phase_start", "calibration", 0, None),
        ("step_end", "calibration", 1, None),
        ("step_end", "calibration", 2, None),
        ("phase_end", "calibration", 2, None),
        ("checkpoint_start", None, None, "ticket"),
        ("checkpoint_saved", None, None, "ticket"),
        ("checkpoint_start", "train", 0, "state"),
        ("checkpoint_saved", "train", 0, "state"),
        ("phase_start", "train", 0, None),
        ("step_end", "train", 1, None),
        ("step_end", "train", 2, None),
        ("checkpoint_start", "train", 3, "state"),  # the last step's checkpoint, before its end
        ("checkpoint_saved", "train", 3, "state"),
        ("step_end", "train", 3, None),
        ("phase_end", "train", 3, None),
    ]
    steps = [e.data["metrics"] for e in seen if e.kind == "step_end"]
    assert [(m["phase"], m["step"]) for m in steps] == [
        (e.phase, e.step) for e in seen if e.kind == "step_end"
    ]
    assert all(e.data["path"].name.endswith(".safetensors") for e in seen if "path" in e.data)
    assert {e.data["model"] for e in seen if e.kind == "model_loaded"} != {None}
    assert sum(e.kind == "weight_hashed" for e in seen) > 0
    # closing the subscription stops the events
    run(workdir, "events_closed")
    assert len(seen) == len(trace)


def test_a_subscriber_that_raises_neither_stops_nor_changes_the_run(workdir):
    plain = run(workdir, "events_plain")
    calls = []

    def broken(event):
        calls.append(event.kind)
        raise ValueError("observer bug")

    with events.subscribe(broken), pytest.warns(RuntimeWarning, match="observer bug"):
        observed = run(workdir, "events_broken")
    assert observed.keys() == plain.keys()  # the same delta, bit for bit
    assert all(torch.equal(observed[k], plain[k]) for k in plain)
    assert calls == ["model_loaded"]  # unsubscribed after its first failure


def test_emitting_reaches_only_current_subscribers():
    seen = []
    sub = events.subscribe(seen.append)
    events.emit("phase_start", "train", 0)
    sub.close()
    sub.close()  # closing twice is harmless
    events.emit("phase_end", "train", 1)
    assert [(e.kind, e.phase, e.step) for e in seen] == [("phase_start", "train", 0)]
    with pytest.raises(TypeError):
        events.subscribe("not callable")


def test_an_interrupt_from_a_subscriber_stops_the_run_as_a_kill_would():
    def interrupt(event):
        raise KeyboardInterrupt

    with events.subscribe(interrupt), pytest.raises(KeyboardInterrupt):
        events.emit("step_end", "train", 1)
