"""``lota bench quality`` and ``lota demo`` as short smoke runs on a tiny lab base."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lota import format as fmt
from lota.cli import main
from lota.lab.base import pretrain
from lota.lab.context import stats
from lota.lab.report import compare
from lota.lab.runner import CALIBRATOR_KEYS, Lab
from lota.lab.scales import lr_grid
from lota.merge import overlap

# `make test` runs these in one worker, which builds the session's smoke bench once
pytestmark = pytest.mark.xdist_group("lab")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("labbase") / "base"
    pretrain(str(out), "tiny", steps=10, show_progress=False)
    return str(out)


@pytest.fixture(scope="session")
def smoke(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "quality"
    args = ["bench", "quality", "--scale", "smoke", "--base", tiny_base, "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    return out


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_versions(recorded: dict, report: str) -> None:
    """The results name the installed versions they were computed with, as does the report."""
    from importlib import metadata

    for name in ("torch", "transformers", "peft", "tokenizers", "numpy"):
        assert recorded[name] == metadata.version(name), name
        assert f"{name} {recorded[name]}" in report, name


def test_smoke_bench_reports_every_claim_with_plots(smoke):
    r = _results(smoke)
    assert r["kind"] == "quality-bench" and r["meta"]["scale"] == "smoke"
    assert_versions(r["meta"]["versions"], (smoke / "report.md").read_text())
    for claim in ("single", "sequential", "merge", "safety", "ks", "calibration"):
        assert r[claim], claim
    report = (smoke / "report.md").read_text()
    for title in ("Claim 1", "Claim 2", "Claim 3", "Claim 4", "KS-Lottery", "## Calibration"):
        assert title in report
    # general-ability forgetting of every single-task run, and the claim about it, with its test
    for key, row in r["single"]["methods"].items():
        assert row["forgetting"]["n"] == r["meta"]["seeds"], key
        assert all(math.isfinite(x) for x in row["forgetting"]["values"]), key
    assert "General forgetting" in report and "Welch p" in report
    assert "LoTA forgets less general ability than FFT and LoRA: **" in report
    # ... and of every model of every other claim, in a column of its table
    seq = r["sequential"]
    for order in seq["orders"].values():
        for row in order.values():
            assert all(math.isfinite(x) for x in row["general_forgetting"]["values"])
    for stages in seq["chain"].values():
        assert all(st["general_forgetting"]["n"] == r["meta"]["seeds"] for st in stages)
    for row in r["merge"]["methods"].values():
        assert row["general_forgetting"]["n"] == r["meta"]["seeds"]
    assert r["safety"]["rows"]["base"]["general_forgetting"]["values"] == [0.0]
    assert all(row["general_forgetting"]["n"] for row in r["safety"]["rows"].values())
    assert all(row["general_forgetting"]["n"] for row in r["ks"]["methods"].values())
    assert all(v["general_forgetting"]["n"] for v in r["calibration"]["variants"].values())
    assert report.count("general forgetting") >= 8
    # every task of the chain is also trained alone, and its learnability tested
    solo = seq["chain_solo"]
    assert set(solo) == {"LoTA", "FFT"} and list(solo["FFT"]) == r["meta"]["tasks"]
    assert "Every task of the chain on its own" in report and "alone on translate" in report
    # each run's measured memory per phase; memory and size plotted against score
    lota = r["single"]["methods"]["math/lota"]
    assert set(lota["memory_mb"]) == {"calibration", "train"}
    assert lota["peak_memory_mb"]["mean"] > 0
    assert set(r["single"]["methods"]["math/fft"]["memory_mb"]) == {"train"}
    pngs = ("single", "calibration_sparsity", "sequential", "chain", "merge", "safety", "ks")
    pngs += ("memory_score", "size_score")
    for png in (*pngs, "calibration"):
        data = (smoke / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({png}.png)" in report
    # every method of claim 1 had its learning rate chosen on validation, and it is reported
    for m in ("fft", "lora", "lota", "random", "bottomk"):
        assert r["learning_rates"][f"math/{m}"]["chosen"] in lr_grid(m, 3)
        assert (
            r["single"]["methods"][f"math/{m}"]["lr"] == r["learning_rates"][f"math/{m}"]["chosen"]
        )


def test_masks_are_the_size_of_lota_tickets_and_frozen_entries_verified(smoke):
    r = _results(smoke)["single"]["methods"]
    for t in ("math", "sql"):
        k = r[f"{t}/lota"]["trained_entries"]
        assert r[f"{t}/random"]["trained_entries"] == k == r[f"{t}/bottomk"]["trained_entries"]
        assert r[f"{t}/fft"]["trained_entries"] == 10 * k or r[f"{t}/fft"]["trained_entries"] > k
    sparse = 0
    for f in (smoke / "cache" / "runs").glob("*/result.json"):
        res = json.loads(f.read_text())
        if res["spec"]["method"] in ("lota", "random", "bottomk", "ks-lottery"):
            assert res["info"]["frozen_verified"] is True, f
            sparse += 1
    assert sparse >= 10


def test_lotto_stage_tickets_are_disjoint_from_the_first(smoke):
    pairs = 0
    for f in (smoke / "cache" / "runs").glob("*/result.json"):
        spec = json.loads(f.read_text())["spec"]
        if spec.get("protect") and spec.get("protect_mode", "constrained") == "constrained":
            lab = Lab(
                smoke, json.loads((smoke / "results.json").read_text())["meta"]["base"], "smoke"
            )
            first = lab.folder(spec["protect"][0]) / "delta.safetensors"
            ov = overlap([str(first), str(f.parent / "delta.safetensors")])["pairs"][0]
            assert ov["shared"] == 0
            pairs += 1
    assert pairs >= 2


def test_rerun_reuses_every_cached_run(smoke):
    before = {p: p.stat().st_mtime_ns for p in (smoke / "cache").rglob("result.json")}
    first = _results(smoke)
    base = first["meta"]["base"]
    args = ["bench", "quality", "--scale", "smoke", "--base", base, "--out", str(smoke), "--quiet"]
    assert main(args) == 0
    after = {p: p.stat().st_mtime_ns for p in (smoke / "cache").rglob("result.json")}
    assert after == before  # nothing trained again
    second = _results(smoke)
    for key in ("single", "sequential", "merge", "safety", "ks", "calibration", "learning_rates"):
        assert second[key] == first[key]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--claims", "single,everything"], "unknown claim 'everything'"),
        (["--tasks", "math,chess"], "'chess' is not a fine-tuning task"),
        (["--tasks", "math"], "at least two different tasks"),
        (["--seeds", "0"], "--seeds 0 must be at least 1"),
        (["--scale", "huge"], "unknown scale 'huge'"),
        (["--jobs", "0"], "--jobs 0 must be at least 1"),
    ],
)
def test_bad_bench_options_get_one_line_and_write_nothing(
    tiny_base, tmp_path, capsys, extra, message
):
    out = tmp_path / "q"
    code = main(["bench", "quality", "--base", tiny_base, "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_base_that_is_not_a_lab_base_is_refused_before_any_work(workdir, tmp_path, capsys):
    broken = tmp_path / "broken"  # a model folder whose recipe lacks what the lab reads
    shutil.copytree(workdir / "base", broken)
    (broken / "lab_recipe.json").write_text('{"recipe": {"docs": 10}}')
    cases = [
        (workdir / "base", "not a lab base model"),
        (broken, "not a lab recipe"),
        (tmp_path / "missing", "does not exist"),
    ]
    for base, words in cases:
        for command in (["demo", "--jobs", "1"], ["bench", "quality"]):
            out = tmp_path / "runs" / "out"
            code = main([*command, "--scale", "smoke", "--base", str(base), "--out", str(out)])
            err = capsys.readouterr().err.strip()
            assert code == 2 and words in err and "lota lab pretrain" in err, err
            assert len(err.splitlines()) == 1
            assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing written


def test_stats_and_comparisons():
    s = stats([0.5, 0.7, None, 0.6])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert stats([])["mean"] is None
    assert "within noise" in compare("a", stats([0.6, 0.7]), "b", stats([0.62, 0.66]))
    assert " above " in compare("a", stats([0.9, 0.91]), "b", stats([0.5, 0.52]))
    assert " below " in compare("a", stats([0.1, 0.11]), "b", stats([0.5, 0.52]))
    assert "not measured" in compare("a", stats([]), "b", stats([1.0]))
    # the verdict is Welch's test, not "exceeds both spreads": these means differ by three
    # standard deviations, yet two seeds a side cannot reject equal means (p 0.106)
    near = compare("a", stats([0.5, 0.6]), "b", stats([0.7, 0.8]))
    assert "within noise" in near and "Welch p 0.106" in near and "95% CI [" in near
    assert "one seed, no test" in compare("a", stats([0.9]), "b", stats([0.1]))


class _Run:
    def __init__(self, spec):
        self.model = json.dumps(spec, sort_keys=True)


class _ScoredLab:
    """A lab whose validation scores are given per (learning rate, seed)."""

    def __init__(self, scores):
        self.scores, self.scale = scores, {"lr_points": 3}

    def run(self, spec):
        return _Run(spec)

    def score(self, model, task, split):
        spec = json.loads(model)
        return {"score": self.scores[(spec["lr"], spec["seed"])]}


def test_learning_rate_is_chosen_on_the_mean_of_two_seeds():
    from lota.lab.context import Quality

    grid = lr_grid("lota", 3)
    # the first grid point has the best single seed, the second the best mean of two
    scores = {(grid[0], 0): 0.9, (grid[0], 1): 0.1, (grid[1], 0): 0.6, (grid[1], 1): 0.6}
    scores |= {(grid[2], 0): 0.2, (grid[2], 1): 0.3}
    q = Quality(_ScoredLab(scores), ["math", "sql"], seeds=5)
    specs = q.searches("math", "lota")
    assert [(s["lr"], s["seed"]) for s in specs] == [(lr, seed) for lr in grid for seed in (0, 1)]
    assert q.choose("math", "lota", specs) == grid[1]
    rec = q.search["math/lota"]
    assert rec["seeds"] == 2 and rec["validation"] == pytest.approx([0.5, 0.6, 0.25])
    assert rec["validation_per_seed"][0] == [0.9, 0.1]
    # one seed: the search runs on it alone; ties go to the first grid point
    q1 = Quality(_ScoredLab({(lr, 0): 0.5 for lr in grid}), ["math", "sql"], seeds=1)
    assert q1.choose("math", "lota", q1.searches("math", "lota")) == grid[0]


def test_chain_tasks_are_tested_for_learnability_against_the_base():
    from lota.lab.claims.sequential import learned

    assert "learnable within its budget" in learned("FFT", "math", stats([0.3, 0.35, 0.32]), 0.0)
    # a mean above the base by less than the seeds' spread is not shown learnable
    weak = learned("FFT", "instruct", stats([0.0, 0.02, 0.0]), 0.005)
    assert "**not shown learnable**" in weak and "p 0." in weak
    assert "one seed, no test" in learned("LoTA", "sql", stats([0.9]), 0.0)
    assert "not shown" in learned("LoTA", "sql", stats([0.0, 0.0]), 0.0)


def test_phase_memory_is_each_phases_peak_less_what_the_process_held(tmp_path):
    from lota.lab.runner import phase_memory

    log = tmp_path / "metrics.jsonl"
    records = [
        {"phase": "calibration", "step": 1, "phase_peak_rss_mb": 600.0},
        {"phase": "calibration", "step": 2, "phase_peak_rss_mb": 650.0},
        {"phase": "train", "step": 1, "phase_peak_rss_mb": 580.5},
        {"phase": "train", "step": 2, "phase_peak_rss_mb": 575.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    m = phase_memory(log, 500.0)
    assert m["phase_peak_mb"] == {"calibration": 650.0, "train": 580.5}
    assert m["phase_added_mb"] == {"calibration": 150.0, "train": 80.5}
    assert m["peak_added_mb"] == 150.0 and m["before_mb"] == 500.0


def test_parallel_prefetch_equals_serial(tiny_base, tmp_path):
    specs = [
        {"task": "math", "method": "lota", "lr": 3e-3, "seed": 0},
        {"task": "sql", "method": "fft", "lr": 1e-3, "seed": 1},
    ]
    want = [("math", "test", "default")]
    serial, parallel = Lab(tmp_path / "s", tiny_base, "smoke", 1, False), None
    parallel = Lab(tmp_path / "p", tiny_base, "smoke", 2, False)
    serial.prefetch([(s, want) for s in specs])
    parallel.prefetch([(s, want) for s in specs])
    for s in specs:
        a = fmt.load(serial.run(s).delta)
        b = fmt.load(parallel.run(s).delta)
        for name in a.values:
            assert torch.equal(a.ticket.indices[name], b.ticket.indices[name])
            assert torch.equal(a.values[name], b.values[name])
        assert serial.score(serial.run(s).model, "math") == parallel.score(
            parallel.run(s).model, "math"
        )


def test_demo_prints_the_table_and_writes_the_report(tiny_base, tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--scale", "smoke", "--base", tiny_base, "--out", str(out), "--jobs", "1"]
    assert main([*args, "--quiet"]) == 0
    r = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    for name in ("FFT A", "LoRA A", "LoTA A", "FFT A -> FFT B", "LoTA A -> LoTTO B", "merge"):
        assert name in printed and name in "".join(r["rows"])
    assert r["lotto_protected"]["bit_identical"] and r["lotto_protected"]["entries"] > 0
    assert r["fft_chain"]["changed"] > 0
    assert_versions(r["versions"], (out / "report.md").read_text())
    lota = r["rows"]["LoTA A"]
    assert lota["trained_entries"] * 5 < r["rows"]["FFT A"]["trained_entries"]
    assert lota["delta_bytes"] < r["rows"]["FFT A"]["delta_bytes"]
    lora = r["rows"]["LoRA A"]  # reported as LoRA: its adapter, beside its merged delta
    assert lora["lora_r"] and lora["trained_parameters"] < lora["trained_entries"]
    assert lora["adapter_bytes"] < lora["delta_bytes"]
    assert f"(LoRA r={lora['lora_r']})" in printed and "adapter bytes" in printed
    # general-ability forgetting: every trained model's held-out text loss moved from the base's
    assert r["rows"]["base"]["forgetting_general"] is None and "general forgetting" in printed
    for name, row in r["rows"].items():
        if name != "base":
            assert math.isfinite(row["forgetting_general"]) and row["forgetting_general"] != 0
    folder = out
    assert (folder / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "demo.png" in (folder / "report.md").read_text()


def test_calibration_claim_compares_every_calibration_on_tickets_of_one_size(
    smoke, tiny_base, tmp_path
):
    # the full smoke bench trained the claim's runs; the claim alone finds every one in the cache
    out = tmp_path / "calibration"
    shutil.copytree(smoke / "cache", out / "cache")
    before = set((out / "cache").rglob("result.json"))
    args = ["bench", "quality", "--scale", "smoke", "--claims", "calibration", "--base", tiny_base]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert set((out / "cache").rglob("result.json")) == before
    r = _results(out)
    assert r["meta"]["claims"] == ["calibration"] and "single" not in r
    cal = r["calibration"]
    assert cal["tasks"] == ["math", "sql"]
    variants = (
        "adamw", "sgd", "rmsprop", "adafactor", "fisher", "lora-change", "lora-gradient", "random"
    )  # fmt: skip
    assert set(cal["variants"]) == {f"{t}/{v}" for t in cal["tasks"] for v in variants}
    lab = Lab(out, tiny_base, "smoke")
    for t in cal["tasks"]:
        rows = {v: cal["variants"][f"{t}/{v}"] for v in variants}
        assert len({row["trained_entries"] for row in rows.values()}) == 1  # same ticket size
        assert rows["adamw"]["shared_with_adamw"]["mean"] == 1.0
        assert rows["random"]["shared_with_adamw"]["mean"] < 0.5
        # LoTA's own calibration and the random ticket are the single claim's specs, unchanged
        assert rows["adamw"]["spec_keys"] == rows["random"]["spec_keys"] == {}
        assert lab.done({"task": t, "method": "lota", "lr": rows["adamw"]["lr"], "seed": 0})
        assert rows["sgd"]["spec_keys"] == {"calibration_method": "sgd"}
        assert rows["rmsprop"]["spec_keys"]["calibration_lr_scale"] == 0.1
        assert rows["lora-gradient"]["spec_keys"]["lora_calibration_score"] == "gradient"
        for v in variants:
            assert rows[v]["score"]["n"] == 1
            assert rows[v]["lr"] in lr_grid("lota", 3)
        for v in variants[1:]:
            assert cal["vs_adamw"][f"{t}/{v}"]["within_noise"] is None  # one seed: no test
    # each of its lota runs calibrated the way its spec names
    seen, plain = set(), {"task", "method", "lr", "seed"}
    for f in (out / "cache" / "runs").glob("*/result.json"):
        res = json.loads(f.read_text())
        spec, info = res["spec"], res["info"]
        if spec["method"] == "lota" and set(spec) <= plain | {
            *CALIBRATOR_KEYS,
            "calibration_lr_scale",
        }:
            assert info["frozen_verified"] is True
            assert info["calibration"] == spec.get("calibration_method", "adamw")
            lora = info["calibration"] == "lora"
            score = spec.get("lora_calibration_score", "change") if lora else None
            assert info.get("lora_calibration_score") == score
            seen.add((info["calibration"], score))
    assert seen == {
        ("adamw", None),
        ("sgd", None),
        ("rmsprop", None),
        ("adafactor", None),
        ("fisher", None),
        ("lora", "change"),
        ("lora", "gradient"),
    }
    report = (out / "report.md").read_text()
    assert "## Calibration" in report and "Welch" in report and "(calibration.png)" in report
    assert "math/lota, sgd calibration" in report  # its own learning-rate search
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_welch_test_equals_scipy():
    from scipy import stats as st

    from lota.lab.report import welch

    a, b = [0.41, 0.405, 0.41], [0.4, 0.345, 0.41]
    w = welch(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    lo, hi = ref.confidence_interval(0.95)
    assert w["ci"] == pytest.approx([lo, hi])
    assert w["within_noise"] is bool(ref.pvalue >= 0.05) is True
    far = welch([0.9, 0.91, 0.92], [0.1, 0.12, 0.11])
    assert far["within_noise"] is False and far["diff"] > 0 and far["ci"][0] > 0
    # every seed equal on both sides: equal means are within noise, different ones are not
    assert welch([0.5, 0.5], [0.5, 0.5])["within_noise"] is True
    assert welch([0.6, 0.6], [0.5, 0.5])["within_noise"] is False
    assert welch([0.6], [0.5, 0.4])["within_noise"] is None


def test_a_ledger_continues_a_bench_on_a_fresh_cache(tiny_base, tmp_path):
    s = {"task": "math", "method": "lota", "lr": 3e-3, "seed": 0}
    first = Lab(tmp_path / "a", tiny_base, "smoke", 1, False, ledger=tmp_path / "ledger")
    run = first.run(s)
    score = first.score(run.model, "math")
    # another machine: the same ledger, an empty cache
    other = Lab(tmp_path / "b", tiny_base, "smoke", 1, False, ledger=tmp_path / "ledger")
    assert other.done(s)
    again = other.run(s)
    assert again.info == run.info and other.score(again.model, "math") == score
    assert not (tmp_path / "b" / "cache" / "runs").exists()  # nothing was trained
    # weights needed (a later run starts from it): trained again, the same run bit for bit
    made = other.materialize(s)
    a, b = fmt.load(run.delta), fmt.load(made.delta)
    for name in a.values:
        assert torch.equal(a.ticket.indices[name], b.ticket.indices[name])
        assert torch.equal(a.values[name], b.values[name])


def test_the_real_protocol_runs_every_claim_and_resumes_from_its_ledger(tiny_base, tmp_path):
    from lota.lab.claims.real import LIGHT, MERGES, METHODS, SEQUENTIAL
    from lota.lab.quality import run_quality

    def bench(out):
        return run_quality(
            str(out),
            tiny_base,
            ["math", "sql"],
            claims=["real"],
            scale="smoke",
            progress=False,
            ledger=str(tmp_path / "ledger"),
        )

    r = bench(tmp_path / "one")["real"]
    assert set(r["single"]) == {f"{t}/{m}" for t in ("math", "sql") for m in METHODS}
    assert set(r["sequential"]) == set(SEQUENTIAL) and set(r["merge"]) == set(MERGES)
    for row in (*r["single"].values(), *r["sequential"].values(), *r["merge"].values()):
        assert row["forgetting"]["n"] == 1 and math.isfinite(row["forgetting"]["mean"])
    assert set(r["safety"]["rows"]) == {
        "base",
        "aligned",
        "aligned -> FFT",
        "aligned -> LoTTO (alignment ticket protected)",
    }
    # LoTTO's tickets avoid A's, and the Fisher variant avoids A's Fisher ticket too
    runs = [
        json.loads(p.read_text())
        for p in (tmp_path / "one" / "cache" / "runs").glob("*/result.json")
    ]
    fisher = [x for x in runs if x["spec"].get("calibration_method") == "fisher"]
    assert len(fisher) == 1 and fisher[0]["spec"]["steps"] == 1
    # the memory-light calibrations on A: LoTA's rate, a tenth of the calibration rate, and
    # AdamW's row is claim 1's LoTA on A (its ticket shares all of itself)
    cal = r["calibration"]
    assert cal["task"] == "math" and set(cal["rows"]) == {"adamw", *LIGHT}
    assert cal["rows"]["adamw"]["score"] == r["single"]["math/lota"]["score"]
    assert cal["rows"]["adamw"]["shared_with_adamw"]["mean"] == 1.0
    for c in LIGHT:
        [light] = [x["spec"] for x in runs if x["spec"].get("calibration_method") == c]
        assert light["lr"] == r["single"]["math/lota"]["lr"] and light["task"] == "math"
        assert light["calibration_lr_scale"] == 0.1
        assert 0 <= cal["rows"][c]["shared_with_adamw"]["mean"] < 1
    report = (tmp_path / "one" / "report.md").read_text()
    assert "On a real pretrained model" in report and "Claim 4: safety" in report
    assert "Memory-light calibrations on math" in report
    # another machine with the ledger only: the same results, nothing trained or merged
    again = bench(tmp_path / "two")["real"]
    assert again == r
    assert not (tmp_path / "two" / "cache" / "runs").exists()
    assert not (tmp_path / "two" / "cache" / "models").exists()
    # a report from a ledger that lacks one LoTTO run: the parts that need it wait for it, the
    # rest equals the full results, and nothing is trained or written to the ledger
    ledger = tmp_path / "ledger"
    lotto = [
        p for p in ledger.glob("*.json") if json.loads(p.read_text()).get("spec", {}).get("protect")
    ]
    lotto[0].unlink()
    before = {p.name: p.read_bytes() for p in ledger.glob("*.json")}
    out = tmp_path / "partial"
    assert main(["bench", "quality", "--base", tiny_base, "--claims", "real", "--tasks", "math,sql",
          "--scale", "smoke", "--out", str(out), "--ledger", str(ledger), "--report-only",
          "--quiet"]) == 0  # fmt: skip
    part = _results(out)["real"]
    assert part["sequential"] == {"pending": lotto[0].stem}
    assert part["single"] == r["single"] and part["merge"] == r["merge"]
    assert part["safety"] == r["safety"]
    assert {p.name: p.read_bytes() for p in ledger.glob("*.json")} == before
    assert not (out / "cache" / "runs").exists() and not (out / "cache" / "models").exists()
    report = (out / "report.md").read_text()
    assert f"*Pending*: waits for `{lotto[0].stem}`" in report and "--report-only" in report


def test_report_only_refuses_to_commit_the_ledger(tmp_path, capsys):
    code = main(["bench", "quality", "--out", str(tmp_path / "q"), "--ledger", str(tmp_path / "l"),
                 "--commit", "--report-only"])  # fmt: skip
    assert code == 2 and "--report-only never writes the ledger" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
