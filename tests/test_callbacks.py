"""Calibration from a user's own dense Trainer run: ``CalibrationCallback`` during the run, and
``lota mask`` on a Trainer checkpoint after it; both tickets drive ``lota adapt --ticket``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

import lota
from lota.cli import main
from lota.data import collate, read_jsonl, tokenize
from lota.models import load_model, load_tokenizer
from lota.toy import save_toy_model
from lota.weights import model_fingerprint

pytest.importorskip("accelerate")


def dense_trainer(base: Path, data: Path, out: Path, steps: int, callbacks=(), save_steps=3):
    """A plain full fine-tune: every parameter trainable, the Trainer's default optimizer."""
    from transformers import Trainer, TrainingArguments

    tokenizer, model = load_tokenizer(str(base)), load_model(str(base))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=save_steps,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=tokenize(read_jsonl(data), tokenizer, 128),
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        callbacks=list(callbacks),
    )


def adapt_with(workdir: Path, ticket: Path, out: Path) -> lota.SparseDelta:
    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    argv += ["--ticket", str(ticket), "--out", str(out)]
    assert main(argv + ["--steps", "2", "--lr", "1e-2", "--batch-size", "4", "--quiet"]) == 0
    return lota.load(out / "delta.safetensors")


@pytest.fixture(scope="module")
def calibrated(workdir, tmp_path_factory):
    """A dense run of 10 steps with the callback at step 3 (checkpoints every 3 steps)."""
    d = tmp_path_factory.mktemp("calib")
    cb = lota.CalibrationCallback(
        str(workdir / "base"), str(d / "ticket.safetensors"), at_step=3, sparsity="0.9"
    )
    trainer = dense_trainer(workdir / "base", workdir / "a.jsonl", d / "run", 10, [cb])
    trainer.train()
    return d, cb, trainer


def test_callback_stops_at_its_step_with_the_ticket_lota_mask_makes_from_that_checkpoint(
    workdir, calibrated
):
    d, cb, trainer = calibrated
    assert trainer.state.global_step == 3  # stopped, though max_steps is 10
    assert sorted(p.name for p in (d / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    saved = lota.load(d / "ticket.safetensors")
    assert isinstance(saved, lota.Ticket)

    base = str(workdir / "base")
    reference = lota.make_ticket(base, str(d / "run" / "checkpoint-3"), sparsity="0.9")
    numel = sum(math.prod(s) for s in reference.shapes.values())
    assert saved.nnz == cb.ticket.nnz == reference.nnz == lota.ticket_size("0.9", numel) > 0
    assert saved.names == reference.names
    for name in reference.names:
        assert torch.equal(saved.indices[name], reference.indices[name]), name
        assert torch.equal(cb.ticket.indices[name], reference.indices[name]), name
    # the same fingerprint lota adapt and lota mask record for this base
    fp = model_fingerprint(load_model(base))
    assert saved.base_fingerprint == reference.base_fingerprint == fp

    # the run really moved the weights: the comparison is not a tie-break over zeros
    delta = lota.make_delta(base, str(d / "run" / "checkpoint-3"), ticket=saved)
    assert all(bool((v != 0).all()) for v in delta.values.values())


def test_callback_ticket_drives_lota_adapt(workdir, calibrated, tmp_path):
    d, _, _ = calibrated
    ticket = lota.load(d / "ticket.safetensors")
    delta = adapt_with(workdir, d / "ticket.safetensors", tmp_path / "adapted")
    assert delta.base_fingerprint == ticket.base_fingerprint
    for name in ticket.names:
        assert torch.equal(delta.ticket.indices[name], ticket.indices[name]), name
    assert any(bool((v != 0).any()) for v in delta.values.values())


def test_lota_mask_on_an_existing_trainer_checkpoint_drives_lota_adapt(workdir, tmp_path):
    dense_trainer(workdir / "base", workdir / "a.jsonl", tmp_path / "run", 2, save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    ticket_path = tmp_path / "t.safetensors"
    argv = ["mask", str(workdir / "base"), str(checkpoint), "--sparsity", "0.9"]
    assert main(argv + ["--out", str(ticket_path), "--quiet"]) == 0

    ticket = lota.load(ticket_path)
    numel = sum(math.prod(s) for s in ticket.shapes.values())
    assert isinstance(ticket, lota.Ticket) and ticket.nnz == lota.ticket_size("0.9", numel) > 0
    assert ticket.base_fingerprint == model_fingerprint(load_model(str(workdir / "base")))
    delta = adapt_with(workdir, ticket_path, tmp_path / "adapted")
    for name in ticket.names:
        assert torch.equal(delta.ticket.indices[name], ticket.indices[name]), name
    assert any(bool((v != 0).any()) for v in delta.values.values())

    # one command: `lota adapt --calibrated CHECKPOINT` gives the same delta, bit for bit
    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    argv += ["--calibrated", str(checkpoint), "--sparsity", "0.9", "--out", str(tmp_path / "one")]
    assert main(argv + ["--steps", "2", "--lr", "1e-2", "--batch-size", "4", "--quiet"]) == 0
    same = lota.load(tmp_path / "one" / "delta.safetensors")
    for name in ticket.names:
        assert torch.equal(same.ticket.indices[name], ticket.indices[name]), name
        assert torch.equal(same.values[name], delta.values[name]), name
    summary = (tmp_path / "one" / "summary.json").read_text()
    assert str(checkpoint) in summary and '"calibration_steps"' not in summary


def test_callback_refuses_a_model_that_is_not_its_base(workdir, tmp_path):
    other = save_toy_model(tmp_path / "other", seed=1, hidden=32, layers=2, heads=2)
    out = tmp_path / "ticket.safetensors"
    cb = lota.CalibrationCallback(str(workdir / "base"), str(out), at_step=1)
    trainer = dense_trainer(Path(other), workdir / "a.jsonl", tmp_path / "run", 2, [cb])
    with pytest.raises(lota.InputError, match="not the base model") as e:
        trainer.train()
    assert "\n" not in str(e.value) and str(workdir / "base") in str(e.value)
    assert trainer.state.global_step == 0 and not out.exists()


def test_callback_hashes_each_base_weight_once(workdir, tmp_path, monkeypatch):
    """The model's weights are compared with the base's where they are (no hash of the model):
    the fingerprint is the base folder's, hashed once as its tensors are read."""
    from types import SimpleNamespace

    import lota.digests as digests
    import lota.weights as weights

    hashed = []
    digest = digests.weight_digest

    def counted(t):
        hashed.append(tuple(t.shape))
        return digest(t)

    monkeypatch.setattr(digests, "weight_digest", counted)
    monkeypatch.setattr(weights, "weight_digest", counted)
    model = load_model(str(workdir / "base"))
    cb = lota.CalibrationCallback(str(workdir / "base"), str(tmp_path / "t.safetensors"), 1)
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    cb.on_train_begin(None, state, None, model=model)
    assert len(hashed) == len(list(model.parameters()))
    monkeypatch.undo()
    assert cb.base_fingerprint == model_fingerprint(model)


def test_callback_refuses_a_base_of_another_architecture(workdir, tmp_path):
    cb = lota.CalibrationCallback(
        str(workdir / "other_arch"), str(tmp_path / "t.safetensors"), at_step=1
    )
    trainer = dense_trainer(workdir / "base", workdir / "a.jsonl", tmp_path / "run", 2, [cb])
    with pytest.raises(lota.InputError, match="does not match the base"):
        trainer.train()


def test_callback_resumed_past_its_step(workdir, calibrated, tmp_path):
    """Resuming after the calibration step reuses the ticket written then; without it, the error
    says how to make it from the checkpoint."""
    d, _, _ = calibrated
    run = tmp_path / "run"
    shutil.copytree(d / "run" / "checkpoint-3", run / "checkpoint-3")
    missing = tmp_path / "missing.safetensors"
    cb = lota.CalibrationCallback(str(workdir / "base"), str(missing), at_step=2, stop=False)
    trainer = dense_trainer(workdir / "base", workdir / "a.jsonl", run, 4, [cb])
    with pytest.raises(lota.InputError, match="lota mask BASE CHECKPOINT"):
        trainer.train(resume_from_checkpoint=True)

    cb = lota.CalibrationCallback(
        str(workdir / "base"), str(d / "ticket.safetensors"), at_step=3, stop=False
    )
    trainer = dense_trainer(workdir / "base", workdir / "a.jsonl", run, 4, [cb])
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    saved = lota.load(d / "ticket.safetensors")
    for name in saved.names:
        assert torch.equal(cb.ticket.indices[name], saved.indices[name]), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"at_step": 0}, "at_step must be a positive"),
        ({"at_step": 2.5}, "at_step must be a positive"),
        ({"out": "ticket.pt"}, "must be a file ending in .safetensors"),
        ({"sparsity": "1.5"}, "sparsity"),
        ({"base": "no/such/folder/here"}, "not found"),
    ],
)
def test_callback_checks_its_arguments_up_front(workdir, tmp_path, kwargs, message):
    args = {"base": str(workdir / "base"), "out": str(tmp_path / "t.safetensors"), "at_step": 3}
    with pytest.raises(lota.InputError, match=message):
        lota.CalibrationCallback(**{**args, **kwargs})


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--calibrated", "{other}"], ["differ in their target tensors"]),
        (["--calibrated", "{missing}"], ["missing"]),
        (["--calibrated", "{base}", "--ticket", "{base}"], ["--calibrated or --ticket"]),
        (["--calibrated", "{base}", "--method", "fft"], ["--method lota or bottomk"]),
    ],
)
def test_calibrated_is_checked_before_anything_is_written(workdir, tmp_path, capsys, extra, words):
    from .test_cli import assert_refused

    paths = {
        "other": str(workdir / "other_arch"),
        "missing": str(tmp_path / "missing"),
        "base": str(workdir / "base"),
    }
    out = tmp_path / "out"
    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl"), "--out", str(out)]
    argv += [x.format(**paths) for x in extra] + ["--steps", "1", "--quiet"]
    code = main(argv)
    captured = capsys.readouterr()
    assert_refused(code, captured.out, captured.err, *words)
    assert not out.exists() or not any(p.name != ".lota-checkpoint" for p in out.iterdir())
