"""The adapt pipeline's invariants, run in-process on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lota import format as fmt
from lota.adapt import AdaptConfig, adapt
from lota.delta import apply_delta_

from .conftest import assert_only_ticket_changed

SMALL = {"steps": 3, "calibration_steps": 2, "lr": 1e-2, "batch_size": 4, "progress": False}


def run(workdir, out, **kw):
    cfg = AdaptConfig(
        model=str(kw.pop("model", workdir / "base")),
        data=str(kw.pop("data", workdir / "a.jsonl")),
        out=str(workdir / out),
        **{**SMALL, **kw},
    )
    info = adapt(cfg)
    return info, workdir / out


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize(
    "optimizer,weight_decay,momentum",
    [("adamw", 0.1, 0.0), ("rmsprop", 0.0, 0.0), ("rmsprop", 0.01, 0.9), ("sgd", 0.1, 0.9)],
)
def test_frozen_entries_bit_identical_after_adapt(workdir, optimizer, weight_decay, momentum):
    info, out = run(
        workdir,
        f"frozen_{optimizer}_{momentum}",
        optimizer=optimizer,
        weight_decay=weight_decay,
        momentum=momentum,
        save_model=True,
    )
    delta = fmt.load(out / "delta.safetensors")
    base, tuned = weights(workdir / "base"), weights(out / "model")
    assert_only_ticket_changed(base, tuned, delta.ticket)
    changed = sum(
        int((base[n].reshape(-1)[i] != tuned[n].reshape(-1)[i]).sum())
        for n, i in delta.indices.items()
    )
    assert changed > 0
    assert info["frozen_verified"] is True


@pytest.mark.parametrize("sparsity", ["0.9", "0.75", "0.999"])
def test_ticket_has_exact_k(workdir, sparsity):
    info, out = run(workdir, f"k_{sparsity}", sparsity=sparsity, steps=1)
    delta = fmt.load(out / "delta.safetensors")
    from fractions import Fraction

    assert delta.nnz == math.floor((1 - Fraction(sparsity)) * delta.numel) == info["k"]


def test_saved_model_equals_base_plus_delta(workdir):
    _, out = run(workdir, "apply_exact", save_model=True)
    delta = fmt.load(out / "delta.safetensors")
    base, tuned = weights(workdir / "base"), weights(out / "model")
    apply_delta_(base, delta)
    for name in tuned:
        assert torch.equal(bits(base[name]), bits(tuned[name])), name


def test_protect_keeps_protected_entries_bit_identical(workdir):
    _, out_a = run(workdir, "seq_a", save_model=True)
    info_b, out_b = run(
        workdir,
        "seq_b",
        model=out_a / "model",
        data=workdir / "b.jsonl",
        protect=[str(out_a / "delta.safetensors")],
        save_model=True,
    )
    delta_a, delta_b = fmt.load(out_a / "delta.safetensors"), fmt.load(out_b / "delta.safetensors")
    assert delta_b.ticket.overlap(delta_a.ticket) == 0
    assert delta_b.nnz == delta_a.nnz  # k counts over all targets, with or without protection
    model_a, model_b = weights(out_a / "model"), weights(out_b / "model")
    for name, idx in delta_a.indices.items():
        assert torch.equal(
            bits(model_a[name].reshape(-1)[idx]), bits(model_b[name].reshape(-1)[idx])
        ), name
    assert_only_ticket_changed(model_a, model_b, delta_b.ticket)


def test_protect_file_wider_than_the_targets_protects_what_they_share(workdir):
    """A later task may adapt fewer tensors than the one it protects: the protected entries
    outside its targets are frozen anyway, those inside are kept out of its ticket."""
    _, out_a = run(workdir, "narrow_a", save_model=True)
    _, out_b = run(
        workdir,
        "narrow_b",
        model=out_a / "model",
        data=workdir / "b.jsonl",
        targets=r"self_attn\.(q|v)_proj\.weight",
        protect=[str(out_a / "delta.safetensors")],
        save_model=True,
    )
    delta_a, delta_b = fmt.load(out_a / "delta.safetensors"), fmt.load(out_b / "delta.safetensors")
    assert all("self_attn" in n for n in delta_b.names)
    assert any(delta_a.indices[n].numel() for n in delta_b.names)
    assert delta_b.ticket.overlap(delta_a.ticket) == 0
    assert_only_ticket_changed(weights(out_a / "model"), weights(out_b / "model"), delta_b.ticket)


def test_flip_mode_trains_complement_and_keeps_disjoint_ticket(workdir):
    _, out_a = run(workdir, "flip_a", save_model=True)
    _, out_b = run(
        workdir,
        "flip_b",
        model=out_a / "model",
        data=workdir / "b.jsonl",
        protect=[str(out_a / "delta.safetensors")],
        protect_mode="flip",
        save_model=True,
    )
    delta_a, delta_b = fmt.load(out_a / "delta.safetensors"), fmt.load(out_b / "delta.safetensors")
    assert delta_b.ticket.overlap(delta_a.ticket) == 0
    assert delta_b.nnz == delta_a.nnz
    assert_only_ticket_changed(weights(out_a / "model"), weights(out_b / "model"), delta_b.ticket)


@pytest.mark.parametrize("method", ["random", "bottomk"])
def test_baseline_tickets_have_the_same_size(workdir, method):
    info, out = run(workdir, f"baseline_{method}", method=method, save_model=True)
    delta = fmt.load(out / "delta.safetensors")
    assert delta.nnz == math.floor(delta.numel / 10)
    assert_only_ticket_changed(weights(workdir / "base"), weights(out / "model"), delta.ticket)


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_dense_methods_write_dense_deltas_without_an_index_per_entry(workdir, method, monkeypatch):
    """The delta of every target entry is written in the ``full`` encoding; in memory its
    indices are views of one ``arange`` of the largest target, not one int64 per entry."""
    written = []
    save = fmt.save
    monkeypatch.setattr(fmt, "save", lambda obj, *a, **k: written.append(obj) or save(obj, *a, **k))
    _, out = run(workdir, f"dense_{method}", method=method, save_model=True)
    delta = fmt.load(out / "delta.safetensors")
    assert delta.nnz == delta.numel
    base, tuned = weights(workdir / "base"), weights(out / "model")
    for name in base:
        if name not in delta.indices:
            assert torch.equal(base[name], tuned[name]), f"{method} changed non-target {name}"
    assert any(not torch.equal(base[n], tuned[n]) for n in delta.indices)
    (kept,) = written
    storages = {i.untyped_storage().data_ptr() for i in kept.indices.values()}
    largest = max(i.numel() for i in kept.indices.values())
    assert len(storages) == 1
    assert next(iter(kept.indices.values())).untyped_storage().nbytes() == 8 * largest
    for n in delta.indices:  # the values are the tuned minus the base weights, bit for bit
        assert torch.equal(
            bits(delta.values[n]), bits((tuned[n].float() - base[n].float()).reshape(-1))
        )


def test_ticket_reuse_skips_calibration(workdir):
    _, out_a = run(workdir, "reuse_src")
    _, out = run(workdir, "reuse", ticket=str(out_a / "delta.safetensors"))
    phases = {
        line.split('"phase": "')[1].split('"')[0]
        for line in (out / "metrics.jsonl").read_text().splitlines()
    }
    assert phases == {"train"}
    a, b = fmt.load(out_a / "delta.safetensors"), fmt.load(out / "delta.safetensors")
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.names)


def test_same_seed_gives_bit_identical_delta(workdir):
    _, o1 = run(workdir, "det1")
    _, o2 = run(workdir, "det2")
    d1, d2 = fmt.load(o1 / "delta.safetensors"), fmt.load(o2 / "delta.safetensors")
    for n in d1.names:
        assert torch.equal(d1.indices[n], d2.indices[n]) and torch.equal(
            bits(d1.values[n]), bits(d2.values[n])
        )


def test_outputs_and_metrics(workdir):
    info, out = run(workdir, "outputs", data=workdir / "b.jsonl")
    names = {p.name for p in out.iterdir()}
    assert {"delta.safetensors", "config.yaml", "metrics.jsonl", "summary.json"} <= names
    assert not any(n.startswith(".") for n in names)
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["calibration"] * 2 + ["train"] * 3
    assert all(r["loss"] > 0 and r["peak_rss_mb"] > 0 and "tokens_per_s" in r for r in rows)
    assert fmt.load(out / "delta.safetensors").meta["config"]["method"] == "lota"


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16"])
def test_bf16_base_trains_fp32_values_and_keeps_frozen_bits(workdir, tmp_path, values_dtype):
    """A bfloat16 checkpoint is adapted in bfloat16 with fp32 trainable values (and optimizer
    state); the delta is written in the requested precision and the saved model's frozen entries
    are bit-identical to the bf16 base."""
    from lota.models import load_model, load_tokenizer, save_model

    bf16 = tmp_path / "bf16"
    model = load_model(str(workdir / "base"), "bfloat16")
    save_model(model, load_tokenizer(str(workdir / "base")), bf16)
    base = weights(bf16)
    assert all(t.dtype == torch.bfloat16 for t in base.values())
    info, out = run(
        workdir, f"bf16_{values_dtype}", model=bf16, values_dtype=values_dtype, save_model=True
    )
    delta = fmt.load(out / "delta.safetensors")
    assert {str(v.dtype) for v in delta.values.values()} == {f"torch.{values_dtype}"}
    tuned = weights(out / "model")
    assert all(t.dtype == torch.bfloat16 for t in tuned.values())
    assert_only_ticket_changed(base, tuned, delta.ticket)
    changed = sum(
        int((bits(tuned[n]).view(-1, 2) != bits(base[n]).view(-1, 2)).any(1).sum())
        for n in delta.ticket.names
    )
    assert changed > 0
    if values_dtype == "float32":  # the saved model is the base plus the fp32 delta, bit for bit
        again = {n: t.clone() for n, t in base.items()}
        apply_delta_(again, delta)
        for n in tuned:
            assert torch.equal(bits(again[n]), bits(tuned[n])), n


def test_lora_writes_its_peft_adapter_and_reports_its_own_size(workdir):
    """``--method lora``: the adapter, loadable by PEFT onto the base, gives the merged model's
    logits; the summary counts the adapter's r x (in + out) parameters, not the merged entries."""
    from peft import PeftModel

    from lota.models import load_model

    info, out = run(workdir, "lora_adapter", method="lora", save_model=True, lora_r=4)
    base = load_model(str(workdir / "base"))
    want = sum(
        4 * (m.in_features + m.out_features)
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear)
        and f"{n}.weight" in fmt.load(out / "delta.safetensors").indices
    )
    assert info["trained_parameters"] == want and info["lora_r"] == 4
    assert info["lora_layers"] == 2 * 7 and info["k"] == info["numel"]
    adapter = out / "adapter" / "adapter_model.safetensors"
    assert info["adapter_bytes"] == adapter.stat().st_size < info["delta_bytes"]
    peft = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged = load_model(str(out / "model"))
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(peft(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(adapter), "pt") as f:
        meta = f.metadata()
    assert (
        meta["lota_kind"] == "lora-adapter" and meta["base_fingerprint"] == info["base_fingerprint"]
    )


def test_the_frozen_check_compares_on_the_weights_device_and_catches_any_change(monkeypatch):
    """``_verify_frozen`` brings the starting weights to the trained ones' device and compares
    there (no trained weight is copied to the host), and still fails on one changed bit outside
    the ticket or in a protected entry."""
    from lota.errors import LotaError
    from lota.frozen import verify_frozen as _verify_frozen
    from lota.ticket import Ticket

    g = torch.Generator().manual_seed(0)
    w0 = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)}
    ticket = Ticket(shapes={"a": (6, 5), "b": (7,)}, indices={"a": [1, 8, 29], "b": [0]})
    protected = Ticket(shapes={"a": (6, 5), "b": (7,)}, indices={"a": [2], "b": [3]})
    now = {n: t.clone() for n, t in w0.items()}
    kept = {n: t.clone() for n, t in w0.items()}
    now["a"].view(-1)[ticket.indices["a"]] += 1.0
    now["b"][0] = -0.0
    monkeypatch.setattr(torch.Tensor, "cpu", lambda *a, **k: pytest.fail("copied to the host"))
    assert _verify_frozen(now, w0, ticket, protected)
    assert all(torch.equal(w0[n], kept[n]) for n in w0)  # the starting weights untouched
    for name, where, message in [("a", 3, "outside the ticket"), ("b", 3, "protected entries")]:
        changed = {n: t.clone() for n, t in now.items()}
        flat = changed[name].view(-1)
        flat[where] = torch.tensor(flat[where].item()).view(torch.int32).add(1).view(torch.float32)
        with pytest.raises(LotaError, match=message):
            _verify_frozen(changed, w0, ticket, protected)


def test_the_mmap_threshold_is_set_only_on_the_cpu_and_undone_after_the_phase(workdir, monkeypatch):
    """glibc's mmap threshold is process-wide: the sparse phase (and the fisher calibration) set
    it for themselves on the CPU and leave the adaptive ceiling behind; a GPU phase leaves it."""
    import lota.train as train_module

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

        def malloc_trim(self, pad):
            return 1

    monkeypatch.setattr(train_module, "_glibc", Libc)
    with train_module.heap_growth_limited(torch.device("cuda", 0)):
        assert calls == []
    run(workdir, "mmap_threshold", calibration="fisher")
    assert calls == [(-3, 1 << 20), (-3, 32 << 20)] * 2
