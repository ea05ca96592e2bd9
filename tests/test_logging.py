"""Progress and metrics of ``lota adapt``: metrics.jsonl always, TensorBoard on request."""

from __future__ import annotations

import json
import signal

import pytest

from .conftest import ADAPT
from .test_resume import lota as run_lota

pytest.importorskip("tensorboard")


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _jsonl(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_logged_number(workdir, tmp_path):
    from lota.cli import main

    out = tmp_path / "tb"
    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl"), "--out", str(out)]
    assert main([*argv, *ADAPT, "--report-to", "tensorboard"]) == 0
    records = _jsonl(out)
    scalars = _scalars(out / "tensorboard")
    for phase in ("calibration", "train"):
        lines = [(i + 1, r) for i, r in enumerate(records) if r["phase"] == phase]
        assert lines
        for key in ("loss", "lr", "tokens_per_s", "peak_rss_mb"):
            got = scalars[f"{key}/{phase}"]
            assert [s for s, _ in got] == [i for i, _ in lines]
            assert [v for _, v in got] == pytest.approx([r[key] for _, r in lines], rel=1e-6)


def test_tensorboard_of_a_resumed_run_has_each_step_once(workdir, tmp_path):
    out = tmp_path / "tb_resume"
    args = ["adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *ADAPT]
    args += ["--steps", "4", "--checkpoint-every", "1", "--report-to", "tensorboard"]
    killed = run_lota(*args, fault="train:3")
    assert killed.returncode == -signal.SIGKILL
    assert run_lota(*args).returncode == 0
    records = _jsonl(out)
    loss = _scalars(out / "tensorboard")["loss/train"]
    assert [s for s, _ in loss] == [i + 1 for i, r in enumerate(records) if r["phase"] == "train"]
    assert len(loss) == 4


def test_report_to_is_checked(workdir, tmp_path):
    from lota.cli import main

    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    assert main([*argv, "--out", str(tmp_path / "x"), *ADAPT, "--report-to", "wandb"]) == 2
    assert not (tmp_path / "x").exists()
