"""Two processes on the gloo backend (CPU), started the way users start them: ``torchrun`` and
``accelerate launch``. Each multi-process result is compared with one process that sees the same
micro-batches (``--grad-accum 2``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lota
from lota import selection

# `make test` runs these in one worker: torchrun and accelerate launch, one at a time
# (accelerate takes a fixed port)
pytestmark = pytest.mark.xdist_group("distributed")

pytest.importorskip("accelerate")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("dist_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",  # no GPU here: lota joins with gloo on the CPU
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
ARGS = ["--steps", "3", "--calibration-steps", "2", "--lr", "1e-2", "--batch-size", "4"]
ARGS += ["--checkpoint-every", "1", "--quiet"]


def _run(cmd, fault: str | None = None, check: bool = True, env: dict | None = None):
    env = {**ENV, "LOTA_FAULT": fault or "", **(env or {})}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _adapt(launcher, workdir, out, *extra, fault=None, check=True, env=None):
    cmd = [*launcher, "-m", "lota.cli"] if launcher else [sys.executable, "-m", "lota.cli"]
    cmd += ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl"), "--out", str(out)]
    return _run([*cmd, *ARGS, *extra], fault=fault, check=check, env=env)


# what `accelerate launch` with an FSDP2 (or FSDP1, DeepSpeed) config sets for its processes
FSDP2_CONFIG = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def _losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, exact: bool = True):
    da, db = lota.load(a / "delta.safetensors"), lota.load(b / "delta.safetensors")
    assert da.ticket.base_fingerprint == db.ticket.base_fingerprint
    assert sorted(da.ticket.indices) == sorted(db.ticket.indices)
    for n in da.ticket.indices:
        assert torch.equal(da.ticket.indices[n], db.ticket.indices[n]), n
        if exact:
            assert torch.equal(da.values[n], db.values[n]), n
        else:
            torch.testing.assert_close(da.values[n], db.values[n], rtol=0, atol=1e-6)
    assert any(bool(v.abs().sum() > 0) for v in db.values.values())
    if exact:
        assert _losses(a) == _losses(b)


@pytest.fixture(scope="module")
def single(workdir, tmp_path_factory):
    """One process, two micro-batches per step: the reference of every multi-process run."""
    out = tmp_path_factory.mktemp("dist") / "single"
    _adapt(None, workdir, out, "--grad-accum", "2")
    return out


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """``dist_worker.py`` in one process and under torchrun with two; returns a loader of
    ``(single-process result, [rank 0 result, rank 1 result])`` per mode."""
    out = tmp_path_factory.mktemp("worker")
    _run([sys.executable, str(WORKER), "select,prepare", str(out / "one")])
    _run([*TORCHRUN, str(WORKER), "select,prepare", str(out / "two")])

    def results(mode):
        one = load_file(str(out / "one" / mode / "rank0.safetensors"))
        return one, [load_file(str(out / "two" / mode / f"rank{r}.safetensors")) for r in (0, 1)]

    return results


# ------------------------------------------------------------------------ sharded selection
def test_sharded_selection_equals_single_process(worker):
    one, parts = worker("select")
    assert set(one) == set(parts[0]) == set(parts[1]) and len(one) == 48
    for key, whole in one.items():
        # rank 0 holds the lower rows, so its entries come first
        assert torch.equal(torch.cat([parts[0][key], parts[1][key]]), whole), key
    # and the reference itself is the exact top-k with ties to the lowest positions
    from .dist_worker import SHAPES, scores

    ref = selection.select_top_k(sorted(SHAPES), SHAPES, scores, 17)
    for n in SHAPES:
        assert torch.equal(one[f"17/{1 << 24}/False/{n}"], ref[n])


# ----------------------------------------------------------------- a user's own FSDP2 loop
def test_fsdp2_prepared_model_trains_like_one_process_and_keeps_frozen_rows(worker):
    one, parts = worker("prepare")
    deltas = [k for k in one if k.startswith("delta/")]
    assert deltas and any(bool(one[k].abs().sum() > 0) for k in deltas)
    for k in deltas:
        for part in parts:  # every rank extracts the whole delta
            assert torch.equal(part[k], one[k]), k
    # every rank's rows: outside the ticket bit-identical to the start
    checked = 0
    for part in parts:
        for key in [k for k in part if k.startswith("rows/")]:
            name = key[len("rows/") :]
            rows, w0 = part[key].reshape(-1), part[f"w0/{name}"].reshape(-1)
            if f"ticket/{name}" not in one:
                assert torch.equal(rows, w0), name
                continue
            start = int(part[f"start/{name}"]) * (part[key][0].numel() if rows.numel() else 0)
            idx = one[f"ticket/{name}"]
            outside = torch.ones(rows.numel(), dtype=torch.bool)
            outside[idx[(idx >= start) & (idx < start + rows.numel())] - start] = False
            assert torch.equal(rows[outside], w0[outside]), name
            checked += int(outside.sum())
    assert checked > 10_000


def test_fsdp2_shards_are_rewritten_with_one_collective_per_step(worker):
    """After each optimizer step every sharded weight's rows get ``base + delta``: the deltas of
    all weights come over in one all-gather, not one per weight."""
    _, parts = worker("prepare")
    for part in parts:
        assert part["gathers_per_step"].item() == 1


# ---------------------------------------------------------------------- lota adapt, 2 ranks
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_adapt_under_torchrun_equals_one_process(workdir, single, tmp_path, mode):
    """DDP, and FSDP2 asked for by an accelerate config (the --fsdp flag: the LoTTO test)."""
    out = tmp_path / mode
    _adapt(TORCHRUN, workdir, out, env=FSDP2_CONFIG if mode == "fsdp" else None)
    _assert_same_run(single, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["frozen_verified"] is True
    assert summary["fsdp"] is (mode == "fsdp")
    assert not list(out.glob("*.tmp*")) and not (out / ".lota-checkpoint").exists()


@pytest.mark.parametrize("calibration", ["sgd", "adafactor", "fisher"])
def test_light_calibrations_under_torchrun_equal_one_process(workdir, tmp_path, calibration):
    """Two DDP processes select the ticket one process selects from the same micro-batches, and
    train the same delta. (``adafactor`` takes the averaged gradients in its step there, as
    ``rmsprop``, which shares its code, does.)"""
    one, two = tmp_path / "one", tmp_path / "two"
    _adapt(None, workdir, one, "--grad-accum", "2", "--calibration", calibration)
    _adapt(TORCHRUN, workdir, two, "--calibration", calibration)
    _assert_same_run(one, two)
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["calibration"], summary["processes"]) == (calibration, 2)
    assert summary["frozen_verified"] is True


@pytest.mark.parametrize("mode", ["fsdp"])
def test_bf16_autocast_and_checkpointing_under_torchrun_equal_one_process(workdir, tmp_path, mode):
    """``--mixed-precision bf16 --gradient-checkpointing`` with two processes under FSDP2 (whose
    hooks must stay outside the checkpointed blocks) trains what one process trains from the same
    micro-batches, frozen entries included. (DDP gives the same bits; it adds no path of its own.)"""
    flags = ["--mixed-precision", "bf16", "--gradient-checkpointing"]
    one, two = tmp_path / "one", tmp_path / "two"
    _adapt(None, workdir, one, "--grad-accum", "2", *flags)
    _adapt(TORCHRUN, workdir, two, *flags, *(["--fsdp"] if mode == "fsdp" else []))
    _assert_same_run(one, two, exact=mode == "ddp")
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["frozen_verified"] is True
    config = (two / "config.yaml").read_text()
    assert "mixed_precision: bf16" in config and "gradient_checkpointing: true" in config


def test_adapt_under_accelerate_launch_equals_one_process(workdir, single, tmp_path):
    _adapt(ACCELERATE, workdir, tmp_path / "acc")
    _assert_same_run(single, tmp_path / "acc")


def test_lotto_under_fsdp_excludes_the_protected_ticket_like_one_process(workdir, single, tmp_path):
    protect = str(single / "delta.safetensors")
    _adapt(None, workdir, tmp_path / "one", "--grad-accum", "2", "--protect", protect)
    _adapt(TORCHRUN, workdir, tmp_path / "two", "--fsdp", "--protect", protect)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert (
        lota.load(tmp_path / "two" / "delta.safetensors").ticket.overlap(lota.load(protect).ticket)
        == 0
    )


def test_fft_under_fsdp_matches_one_process(workdir, tmp_path):
    _adapt(None, workdir, tmp_path / "one", "--grad-accum", "2", "--method", "fft")
    _adapt(TORCHRUN, workdir, tmp_path / "two", "--method", "fft", "--fsdp")
    # gradient clipping sums the squared norms shard by shard: equal to about 1e-8
    _assert_same_run(tmp_path / "one", tmp_path / "two", exact=False)


def test_killed_ddp_run_resumes_to_the_same_outputs(workdir, single, tmp_path):
    out = tmp_path / "killed"
    killed = _adapt(TORCHRUN, workdir, out, fault="train:2", check=False)
    assert killed.returncode != 0 and (out / ".lota-checkpoint").exists()
    assert not (out / "delta.safetensors").exists()
    _adapt(TORCHRUN, workdir, out)
    _assert_same_run(single, out)


def test_bad_distributed_settings_are_one_line_errors(workdir, tmp_path, monkeypatch, capsys):
    from lota import dist
    from lota.cli import main

    def adapt(out, *extra):
        argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
        code = main([*argv, "--out", str(tmp_path / out), *ARGS, *extra])
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / out).exists()
        return code, err

    code, err = adapt("a", "--fsdp")
    assert code == 2 and "--fsdp needs several processes" in err
    code, err = adapt("b", "--grad-accum", "3")
    assert code == 2 and "multiple of 3" in err
    for env, says in [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP2 only"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "does not run under DeepSpeed"),
    ]:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            code, err = adapt("c")
            assert code == 2 and says in err
    # as two processes would see it (validation runs before any collective)
    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=0, size=2))
    code, err = adapt("d", "--method", "lora", "--fsdp")
    assert code == 2 and "does not shard PEFT LoRA" in err
    code, err = adapt("f", "--calibration", "fisher", "--fsdp")
    assert code == 2 and "--calibration fisher does not run under --fsdp" in err
    code, err = adapt("e", "--batch-size", "6", "--grad-accum", "2")
    assert code == 2 and "2 process(es) x --grad-accum 2" in err


PERTURBED = """
import sys, torch
import lota.phases as A
from lota.cli import main
load = A.load_run_model
def perturbed(cfg, world):  # one rank reads other weights (a stale copy on its node, say)
    model = load(cfg, world)
    if world.rank == 1:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1.0
    return model
A.load_run_model = perturbed
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_that_loaded_other_weights_are_refused_in_one_line(workdir, tmp_path):
    """Every rank's fingerprint of what it loaded is gathered right after loading: a rank with
    other weights stops the run on every rank (exit 2, the main process prints the one line),
    before anything is written."""
    script = tmp_path / "perturbed.py"
    script.write_text(PERTURBED)
    out = tmp_path / "out"
    cmd = [*TORCHRUN, str(script), "adapt", str(workdir / "base"), "--data"]
    r = _run([*cmd, str(workdir / "a.jsonl"), "--out", str(out), *ARGS], check=False)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("lota: error:")]
    assert len(lines) == 1, r.stderr[-3000:]  # every rank stops; the main process says why
    assert "process(es) 1 loaded other weights than process 0" in lines[0]
    assert "exitcode: 2" in r.stderr and "lota/adapt.py" not in r.stderr  # no lota traceback
    assert not out.exists()


def test_the_process_group_waits_as_long_as_asked(monkeypatch):
    """``--dist-timeout`` minutes (120 by default) is the process group's timeout: the main
    process alone writes checkpoints and outputs while the others wait in a collective."""
    import datetime

    import accelerate

    from lota import dist
    from lota.adapt_config import AdaptConfig

    seen = []

    class State:
        def __init__(self, cpu=False, **kw):
            seen.append(kw["timeout"])
            self.process_index, self.num_processes, self.local_process_index = 0, 2, 0

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for minutes in (None, 7.5):
        monkeypatch.setattr(dist, "_WORLD", None)
        dist.world("cpu", minutes)
    assert seen == [datetime.timedelta(minutes=120), datetime.timedelta(minutes=7.5)]
    assert AdaptConfig(model="m", data="d", out="o").dist_timeout == 120
    with pytest.raises(lota.InputError, match="--dist-timeout 0"):
        AdaptConfig(model="m", data="d", out="o", dist_timeout=0).validate()


# ------------------------------------------------------------- the Trainer example, 2 ranks
def test_trainer_example_under_torchrun_trains_the_ticket_and_resumes(workdir, trained, tmp_path):
    """examples/hf_trainer.py unchanged under torchrun: the Trainer wraps the prepared model in
    DDP; a run resumed from its step-2 checkpoint ends with the uninterrupted run's delta."""
    script = str(Path(__file__).parents[1] / "examples" / "hf_trainer.py")
    ticket = lota.load(trained / "delta.safetensors").ticket
    common = ["--model", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    common += ["--ticket", str(trained / "delta.safetensors"), "--steps", "4"]
    common += ["--save-steps", "2", "--batch-size", "2", "--lr", "1e-2"]
    full = _run([*TORCHRUN, script, *common, "--out", str(tmp_path / "full")])
    assert full.stdout.count("delta.safetensors") == 1  # printed (and written) by rank 0 only
    src, dst = tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2"
    dst.parent.mkdir()
    import shutil

    shutil.copytree(src, dst)
    _run([*TORCHRUN, script, *common, "--out", str(tmp_path / "resumed"), "--resume"])
    a = lota.load(tmp_path / "full" / "delta.safetensors")
    b = lota.load(tmp_path / "resumed" / "delta.safetensors")
    assert any(bool(v.abs().sum() > 0) for v in a.values.values())
    for n in ticket.indices:
        assert torch.equal(a.ticket.indices[n], ticket.indices[n]), n
        assert torch.equal(a.values[n], b.values[n]), n


def test_killed_fsdp_run_resumes_mid_phase_to_the_same_outputs(workdir, single, tmp_path):
    """The sparse phase under FSDP2 checkpoints gathered deltas and optimizer state (O(k))."""
    out = tmp_path / "killed_fsdp"
    killed = _adapt(TORCHRUN, workdir, out, "--fsdp", fault="train:2", check=False)
    assert killed.returncode != 0 and (out / ".lota-checkpoint").exists()
    from lota.checkpoint import Checkpointer

    state = Checkpointer(out, {}, 1).load()
    assert (state["phase"], state["step"]) == ("train", 2) and state["optimizer"]
    _adapt(TORCHRUN, workdir, out, "--fsdp")
    _assert_same_run(single, out)
