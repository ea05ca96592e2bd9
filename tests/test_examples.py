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
