"""Crash safety: a run killed with SIGKILL at any point resumes to bit-identical outputs, and a
kill during a save never leaves a half-written file under its final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lota import format as fmt
from lota.checkpoint import DIRNAME

ARGS = [
    "--steps",
    "4",
    "--calibration-steps",
    "2",
    "--lr",
    "1e-2",
    "--batch-size",
    "4",
    "--checkpoint-every",
    "2",
    "--save-model",
    "--quiet",
    "--optimizer",
    "adamw",
    "--weight-decay",
    "0.1",
]


def lota(*args, fault=None):
    env = {**os.environ, "LOTA_FAULT": fault or ""}
    return subprocess.run(
        [sys.executable, "-m", "lota.cli", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def outputs(folder):
    d = fmt.load(folder / "delta.safetensors")
    return d, load_file(str(folder / "model" / "model.safetensors"))


def assert_same(a, b):
    (da, ma), (db, mb) = a, b
    assert da.names == db.names
    for n in da.names:
        assert torch.equal(da.indices[n], db.indices[n])
        assert torch.equal(da.values[n].view(torch.int32), db.values[n].view(torch.int32)), n
    for n in ma:
        assert torch.equal(ma[n].view(torch.uint8), mb[n].view(torch.uint8)), n


@pytest.fixture(scope="module")
def reference(workdir):
    out = workdir / "resume_ref"
    r = lota("adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    assert not (out / DIRNAME).exists()  # a finished run leaves no checkpoint behind
    return outputs(out)


@pytest.mark.parametrize(
    "point",
    [
        "calibration:1",
        "extraction",
        "train:1",
        "train:3",
        "checkpoint-save",
        "save:delta.safetensors",
        "after-delta",
        "save:model",
    ],
)
def test_killed_run_resumes_to_identical_outputs(workdir, reference, point):
    out = workdir / f"resume_{point.replace(':', '_').replace('.', '_')}"
    killed = lota(
        "adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *ARGS, fault=point
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / DIRNAME).exists()
    assert not (out / "summary.json").exists()
    again = lota("adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *ARGS)
    assert again.returncode == 0, again.stderr
    assert_same(outputs(out), reference)
    assert not (out / DIRNAME).exists()
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 + 4  # the log has each step once, as in an uninterrupted run


def test_a_calibration_ends_in_a_checkpoint_of_its_ticket_alone(workdir, reference):
    """With ``--checkpoint-every 0`` the calibration's last step writes no checkpoint (a dense
    calibration's would hold the targets and both AdamW moments, 12 bytes per target entry): what
    follows it is the ticket. A kill before the ticket is written resumes from the calibration's
    start, to the uninterrupted run's bits."""
    from lota.checkpoint import Checkpointer

    args = [*ARGS]
    args[args.index("--checkpoint-every") + 1] = "0"
    out = workdir / "resume_every_0"
    cmd = ["adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *args]
    killed = lota(*cmd, fault="extraction")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = Checkpointer(out, {}, 0).load()
    assert (state["phase"], state["step"]) == ("calibration", 0)
    assert not state["params"] and not state["optimizer"]
    again = lota(*cmd)
    assert again.returncode == 0, again.stderr
    assert_same(outputs(out), reference)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 + 4


def test_lotto_resumes_too(workdir, reference):
    ref = workdir / "resume_ref"  # the reference run of task A: LoTTO's B starts from its model
    args = [
        "adapt",
        ref / "model",
        "--data",
        workdir / "b.jsonl",
        "--protect",
        ref / "delta.safetensors",
        *ARGS,
    ]
    r = lota(*args, "--out", workdir / "lotto_ref_b")
    assert r.returncode == 0, r.stderr
    killed = lota(*args, "--out", workdir / "lotto_b", fault="train:3")
    assert killed.returncode == -signal.SIGKILL
    assert lota(*args, "--out", workdir / "lotto_b").returncode == 0
    assert_same(outputs(workdir / "lotto_b"), outputs(workdir / "lotto_ref_b"))


def test_checkpoint_of_other_settings_is_not_resumed(workdir):
    out = workdir / "resume_other"
    killed = lota(
        "adapt",
        workdir / "base",
        "--data",
        workdir / "a.jsonl",
        "--out",
        out,
        *ARGS,
        fault="train:1",
    )
    assert killed.returncode == -signal.SIGKILL
    r = lota(
        "adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *ARGS, "--lr", "0.5"
    )
    assert r.returncode == 2 and "--restart" in r.stderr and "Traceback" not in r.stderr
    r = lota(
        "adapt",
        workdir / "base",
        "--data",
        workdir / "a.jsonl",
        "--out",
        out,
        *ARGS,
        "--lr",
        "0.5",
        "--restart",
    )
    assert r.returncode == 0, r.stderr


def test_resume_without_checkpoint_is_refused(workdir):
    r = lota(
        "adapt",
        workdir / "base",
        "--data",
        workdir / "a.jsonl",
        "--out",
        workdir / "resume_none",
        *ARGS,
        "--resume",
    )
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_kill_during_save_keeps_previous_file(workdir, reference, tmp_path):
    src = workdir / "resume_ref"
    target = tmp_path / "d.safetensors"
    assert (
        lota(
            "delta",
            workdir / "base",
            src / "model",
            "--sparsity",
            "0.9",
            "--out",
            target,
            "--quiet",
        ).returncode
        == 0
    )
    before = target.read_bytes()
    killed = lota(
        "delta",
        workdir / "base",
        src / "model",
        "--sparsity",
        "0.5",
        "--out",
        target,
        "--quiet",
        "--force",
        fault="save:d.safetensors",
    )
    assert killed.returncode == -signal.SIGKILL
    assert target.read_bytes() == before
    fmt.load(target)
