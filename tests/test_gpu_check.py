"""``bench/gpu_check.py`` as a smoke run on the CPU (``--tiny --device cpu``): six runs (fft, lora
and lota, each without and with gradient checkpointing) reported in one JSON line, with finite
losses, tokens/s and the frozen checks; and ``--device cuda`` without a GPU refused in one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT.relative_to(ROOT)), *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("gpu_check")
    r = _run("--tiny", "--device", "cpu", "--workdir", str(work), "--out", str(work / "r.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    report = lines[-1]
    assert json.loads((work / "r.json").read_text()) == report
    report["part_lines"] = lines[:-1]
    return report


def test_smoke_run_reports_each_method_with_and_without_checkpointing(smoke):
    rows = smoke["runs"]
    assert sorted((r["method"], r["gradient_checkpointing"]) for r in rows) == [
        (m, c) for m in ("fft", "lora", "lota") for c in (False, True)
    ]
    assert smoke["ok"] and smoke["bench"] == "gpu_check" and smoke["device"] == "cpu"
    assert smoke["settings"]["model"]["tied_embeddings"] is False
    assert {"torch", "transformers", "peft"} <= set(smoke["versions"])
    for r in rows:
        assert r["ok"] and r["error"] is None, r
        expected = ["calibration", "train"] if r["method"] == "lota" else ["train"]
        assert list(r["phases"]) == expected
        for s in r["phases"].values():
            assert s["steps"] == 2 and len(s["losses"]) == 2
            assert all(math.isfinite(x) for x in s["losses"])
            assert s["tokens_per_s"] > 0 and s["tokens_per_s_ratio"] > 0
            assert s["peak_mb"] is None and s["memory_ratio"] is None  # no GPU: no device peak
            assert s["rss_mb"] > 0


def test_smoke_run_checks_the_frozen_entries_of_lota(smoke):
    lota_runs = [r for r in smoke["runs"] if r["method"] == "lota"]
    assert all(r["frozen_verified"] is True for r in lota_runs)
    check = smoke["frozen_check"]
    assert check["ok"] and check["run"] == "lota" and not check["tensors_differing"]
    assert check["ticket_entries"] == lota_runs[0]["ticket_nnz"] > 0
    assert check["entries_outside_ticket"] > check["ticket_entries"]
    assert check["ticket_entries_changed"] > 0  # the saved model holds the trained entries
    assert "skipped" in smoke["distributed"]


def test_each_part_prints_its_json_line_as_it_finishes(smoke):
    parts = smoke["part_lines"]
    # the frozen check follows the first lota run
    expected = ["estimate", *["run"] * 5, "frozen_check", "run", "distributed"]
    assert [p["part"] for p in parts] == expected
    runs = [(p["method"], p["ok"]) for p in parts if p["part"] == "run"]
    assert runs == [(r["method"], True) for r in smoke["runs"]]
    assert parts[0]["total_s"] == smoke["estimate"]["total_s"] > 0


def test_the_default_set_fits_five_minutes_on_one_h100_by_its_own_estimate():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    planned = gpu_check.estimate(gpu_check.parse_args([]))
    runs = [(p["method"], p["gradient_checkpointing"]) for p in planned["parts"][1:]]
    assert runs == [(m, c) for m in ("fft", "lora", "lota") for c in (False, True)]
    assert all(p["seconds"] > 0 for p in planned["parts"])
    assert planned["total_s"] <= 300
    fewer = gpu_check.estimate(gpu_check.parse_args(["--methods", "lota"]))
    assert len(fewer["parts"]) == 3 and fewer["total_s"] < planned["total_s"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there to use")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    r = _run("--tiny", "--device", "cuda", "--workdir", str(tmp_path / "w"), timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no CUDA GPU" in lines[0] and "--device" in lines[0]
    assert r.stdout == ""
    assert not (tmp_path / "w").exists()  # refused before anything was written
