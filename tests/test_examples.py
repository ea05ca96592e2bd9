"""The example scripts under ``examples/`` run as users would run them, on a tiny model."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

import lota

pytest.importorskip("accelerate")
EXAMPLES = Path(__file__).parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hf_trainer_example_trains_the_ticket_and_resumes_to_the_same_delta(
    workdir, trained, tmp_path
):
    example = _load("hf_trainer")
    common = ["--model", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    common += ["--ticket", str(trained / "delta.safetensors"), "--steps", "6", "--save-steps", "3"]
    common += ["--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2"]
    full = example.main([*common, "--out", str(tmp_path / "full")])

    # an interrupted run: only the checkpoint of step 3 exists; --resume continues from it
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = example.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])

    a, b, ticket = (
        lota.load(full),
        lota.load(resumed),
        lota.load(str(trained / "delta.safetensors")),
    )
    assert a.nnz == ticket.nnz and a.ticket.base_fingerprint == ticket.ticket.base_fingerprint
    assert any(bool(v.abs().sum() > 0) for v in a.values.values())
    for name in a.values:
        assert torch.equal(a.ticket.indices[name], ticket.ticket.indices[name])
        assert torch.equal(a.values[name], b.values[name]), name


def _common(workdir, trained, steps: int) -> list[str]:
    args = ["--model", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    args += ["--ticket", str(trained / "delta.safetensors"), "--steps", str(steps)]
    return args + ["--batch-size", "4", "--lr", "1e-2"]


def test_trl_sft_example_trains_only_the_ticket_and_resumes_to_the_same_delta(
    workdir, trained, tmp_path, monkeypatch
):
    pytest.importorskip("trl")
    from lota.models import load_model
    from lota.targets import named_weights

    example = _load("trl_sft")
    models = []  # the trained models, captured where the example extracts its delta
    extract = lota.extract_delta
    monkeypatch.setattr(lota, "extract_delta", lambda m: models.append(m) or extract(m))

    common = _common(workdir, trained, 6) + ["--save-steps", "3", "--grad-accum", "2"]
    common += ["--scheduler", "cosine"]
    full = example.main([*common, "--out", str(tmp_path / "full")])
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = example.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    assert (tmp_path / "resumed" / "checkpoint-6").is_dir()  # it trained steps 4-6 itself

    a, b = lota.load(full), lota.load(resumed)
    ticket = lota.load(str(trained / "delta.safetensors")).ticket
    assert a.ticket.base_fingerprint == ticket.base_fingerprint != ""
    assert a.nnz == ticket.nnz > 0
    assert all(bool((v != 0).all()) for v in a.values.values())  # every ticket entry trained
    for name in ticket.names:
        assert torch.equal(a.ticket.indices[name], ticket.indices[name]), name
        assert torch.equal(a.values[name], b.values[name]), name

    # after unprepare, the weights are the base's everywhere outside the ticket, w0 + delta inside
    model = lota.unprepare(models[0])
    trained_w = named_weights(model)
    base_w = named_weights(load_model(str(workdir / "base")))
    assert trained_w.keys() == base_w.keys()
    for name, w0 in base_w.items():
        w, w0 = trained_w[name].detach().reshape(-1), w0.detach().reshape(-1)
        outside = torch.ones_like(w0, dtype=torch.bool)
        if name in a.values:
            idx = a.ticket.indices[name]
            outside[idx] = False
            assert torch.equal(w[idx], w0[idx] + a.values[name]), name
        assert torch.equal(w[outside], w0[outside]), name


def test_trl_sft_example_trains_on_chat_data(workdir, trained, tmp_path):
    pytest.importorskip("trl")
    example = _load("trl_sft")
    argv = _common(workdir, trained, 1) + ["--out", str(tmp_path / "chat")]
    argv[argv.index("--data") + 1] = str(workdir / "b.jsonl")  # {"messages": [...]} lines
    delta = lota.load(example.main(argv))
    assert any(bool((v != 0).any()) for v in delta.values.values())


def test_trl_sft_example_refuses_a_file_that_mixes_formats(workdir, trained, tmp_path):
    pytest.importorskip("trl")
    mixed = tmp_path / "mixed.jsonl"
    lines = (workdir / "a.jsonl").read_text().splitlines()[:2]
    lines += (workdir / "b.jsonl").read_text().splitlines()[:2]
    mixed.write_text("\n".join(lines) + "\n")
    example = _load("trl_sft")
    argv = _common(workdir, trained, 1) + ["--out", str(tmp_path / "mixed")]
    argv[argv.index("--data") + 1] = str(mixed)
    with pytest.raises(lota.InputError, match="mixes prompt/completion lines and conversations"):
        example.main(argv)


@pytest.mark.parametrize("name", ["hf_trainer", "trl_sft"])
def test_examples_log_to_tensorboard(name, workdir, trained, tmp_path):
    pytest.importorskip("tensorboard")
    if name == "trl_sft":
        pytest.importorskip("trl")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a plain ticket file this time (as lota mask writes), not a delta
    ticket = tmp_path / "ticket.safetensors"
    lota.save(lota.load(trained / "delta.safetensors").ticket, ticket)
    argv = _common(workdir, trained, 2) + ["--out", str(tmp_path / name)]
    argv[argv.index("--ticket") + 1] = str(ticket)
    delta = lota.load(_load(name).main(argv + ["--report-to", "tensorboard"]))
    assert delta.nnz == lota.load(ticket).nnz > 0
    out = tmp_path / name
    events = sorted(out.rglob("events.out.tfevents*"))
    assert events, f"no tensorboard event file under {out}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
