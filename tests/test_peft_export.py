"""``lota export-peft``: a delta as a PEFT SHiRA adapter that runs and merges like lota apply."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from lota import format as fmt
from lota.cli import main
from lota.delta import SparseDelta
from lota.errors import InputError
from lota.models import load_model
from lota.peft_export import shira_plan
from lota.selection import select
from lota.targets import named_weights
from lota.ticket import Ticket
from lota.toy import byte_tokenizer, save_toy_model
from lota.weights import model_fingerprint


def lota(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *words):
    assert code == 2, (code, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lota: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def random_delta(base, names, k, path, seed=0, values_dtype=None, scale=0.05, fingerprint=None):
    """A delta of ``k`` random entries over ``names`` (or ``k[name]`` in each) with random values,
    saved to ``path``."""
    model = load_model(str(base))
    weights = named_weights(model)
    shapes = {n: tuple(weights[n].shape) for n in names}
    if isinstance(k, dict):
        indices = {n: select("random", {n: shapes[n]}, k[n], seed=seed).indices[n] for n in names}
        ticket = Ticket(shapes=shapes, indices=indices)
    else:
        ticket = select("random", shapes, k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(i.numel(), generator=g) * scale for n, i in ticket.indices.items()}
    ticket = Ticket(
        shapes=ticket.shapes,
        indices=ticket.indices,
        base_fingerprint=fingerprint if fingerprint is not None else model_fingerprint(model),
    )
    fmt.save(SparseDelta(ticket, values), path, values_dtype=values_dtype)
    return path


def export_and_apply(capsys, base, delta, tmp_path, tag):
    adapter, applied = tmp_path / f"adapter_{tag}", tmp_path / f"applied_{tag}"
    code, out, err = lota(capsys, "export-peft", delta, "--base", base, "--out", adapter)
    assert code == 0, err
    assert out.startswith("export-peft:") and len(out.strip().splitlines()) == 1, out
    assert "merge exact" in out, out
    code, _, err = lota(capsys, "apply", base, delta, "--out", applied)
    assert code == 0, err
    return adapter, applied


def check_equivalent(base, adapter, applied, exact=True):
    """PEFT's unmerged forward and its merge give what ``lota apply`` wrote."""
    want = load_model(str(applied)).eval()
    peft_model = PeftModel.from_pretrained(load_model(str(base)), str(adapter)).eval()
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = want(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected)
    base_weights = named_weights(load_model(str(base)))
    merged = named_weights(peft_model.merge_and_unload())
    wanted = named_weights(want)
    assert merged.keys() == wanted.keys()
    for name, w in wanted.items():
        assert merged[name].dtype == w.dtype
        if exact:
            assert torch.equal(merged[name], w), name  # bit-identical to base + delta
        else:  # within two float32 roundings of the larger of base entry and result
            bound = 2.0**-22 * torch.maximum(w.abs(), base_weights[name].abs())
            assert bool(((merged[name] - w).abs() <= bound).all()), name


def test_trained_delta_exports_to_an_equivalent_adapter(workdir, trained, capsys, tmp_path):
    base, delta = workdir / "base", trained / "delta.safetensors"
    adapter, applied = export_and_apply(capsys, base, delta, tmp_path, "trained")
    check_equivalent(base, adapter, applied)

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    d = fmt.load(delta)
    touched = {n for n, i in d.indices.items() if i.numel()}
    assert cfg["peft_type"] == "SHIRA" and cfg["task_type"] == "CAUSAL_LM"
    sparse, whole = set(cfg["target_modules"]), set(cfg["modules_to_save"] or [])
    assert sparse and not sparse & whole
    assert sparse | whole == {n.removesuffix(".weight") for n in touched}
    applied_weights = named_weights(load_model(str(applied)))
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        r = cfg["r"]
        for name in touched:
            key = "base_model.model." + name.removesuffix(".weight")
            if name.removesuffix(".weight") in whole:  # the layer as lota apply writes it
                assert torch.equal(f.get_tensor(key + ".weight"), applied_weights[name]), name
                continue
            idx = f.get_tensor(key + ".shira_indices").long()
            vals = f.get_tensor(key + ".shira_weight")
            out_f, in_f = d.shapes[name]
            assert idx.shape == (2, r * (in_f + out_f)) and vals.dtype == torch.float32
            flat = idx[0] * in_f + idx[1]
            assert torch.equal(flat, torch.unique(flat))  # sorted, no duplicates
            inside = torch.isin(flat, d.indices[name])
            assert torch.equal(flat[inside], d.indices[name])  # the whole ticket ...
            assert torch.equal(vals[inside], d.values[name])  # ... with its values
            assert not vals[~inside].any()  # padding is zero
    assert len(keys) == 2 * len(sparse) + len(whole)
    assert meta["format"] == "lota" and meta["kind"] == "peft-export"
    assert meta["format_version"] == "1"
    assert meta["base_fingerprint"] == d.base_fingerprint
    assert meta["base_fingerprint"] == model_fingerprint(load_model(str(base)))
    assert meta["source_delta_digest"].startswith("blake2b:")
    assert all(isinstance(v, str) for v in meta.values())


def test_output_head_and_a_full_square_layer(workdir, capsys, tmp_path):
    base = workdir / "base"
    names = [
        "lm_head.weight",  # untied in the toy model: a plain linear layer
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    delta = random_delta(base, names, 3000, tmp_path / "head.safetensors")
    check_equivalent(base, *export_and_apply(capsys, base, delta, tmp_path, "head"))
    # a square layer can be adapted in full: r * (n + n) == n * n
    name = "model.layers.0.self_attn.v_proj.weight"
    dense = random_delta(base, [name], 32 * 32, tmp_path / "dense.safetensors")
    check_equivalent(base, *export_and_apply(capsys, base, dense, tmp_path, "dense"))


def test_a_dense_layer_is_stored_whole_instead_of_setting_r_for_all(workdir, capsys, tmp_path):
    """One fully changed square layer would need r = 16 for every layer (12 bytes an entry); it
    is stored whole instead (4 bytes a weight) and the others keep r = 1: a smaller file, the
    same merge."""
    base = workdir / "base"
    dense = "model.layers.0.self_attn.q_proj.weight"  # [32, 32]: all 1024 entries
    names = [dense, "model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    k = {dense: 32 * 32, names[1]: 40, names[2]: 20}
    delta = random_delta(base, names, k, tmp_path / "d.safetensors")
    adapter, applied = export_and_apply(capsys, base, delta, tmp_path, "whole")
    check_equivalent(base, adapter, applied)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == [dense.removesuffix(".weight")] and cfg["r"] == 1
    assert sorted(cfg["target_modules"]) == sorted(n.removesuffix(".weight") for n in names[1:])
    one_rank = 12 * 16 * (64 + 96 + 64)  # every layer in SHiRA at the dense layer's r
    assert (adapter / "adapter_model.safetensors").stat().st_size < one_rank


def _plan_by_brute_force(shapes, nnz, itemsize):
    """The smallest adapter over every choice of layers stored whole (at least one in SHiRA)."""
    names, best = list(shapes), None
    for mask in range(2 ** len(names) - 1):
        whole = [n for i, n in enumerate(names) if mask >> i & 1]
        sparse = [n for n in names if n not in whole]
        r = max(max(1, math.ceil(nnz[n] / sum(shapes[n]))) for n in sparse)
        if any(r * sum(shapes[n]) > math.prod(shapes[n]) for n in sparse):
            continue
        size = 12 * r * sum(sum(shapes[n]) for n in sparse)
        size += itemsize * sum(math.prod(shapes[n]) for n in whole)
        best = size if best is None else min(best, size)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_shira_plan_is_the_smallest_adapter(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [8, 16, 24, 48, 96]
    shapes, nnz = {}, {}
    for i in range(int(torch.randint(1, 6, (1,), generator=g))):
        out_f, in_f = (sizes[int(torch.randint(0, 5, (1,), generator=g))] for _ in range(2))
        shapes[f"l{i}.weight"] = (out_f, in_f)
        nnz[f"l{i}.weight"] = int(torch.randint(1, out_f * in_f + 1, (1,), generator=g))
    ticket = Ticket(
        shapes=shapes,
        indices={n: torch.randperm(math.prod(s), generator=g)[: nnz[n]].sort().values
                 for n, s in shapes.items()},
    )  # fmt: skip
    delta = SparseDelta(ticket, {n: torch.ones(nnz[n]) for n in shapes})
    for itemsize in (2, 4):
        want = _plan_by_brute_force(shapes, nnz, itemsize)
        if want is None:
            with pytest.raises(InputError, match="too dense"):
                shira_plan(delta, sorted(shapes), itemsize, "d")
            continue
        r, whole = shira_plan(delta, sorted(shapes), itemsize, "d")
        sparse = [n for n in shapes if n not in whole]
        assert sparse and all(r * sum(shapes[n]) <= math.prod(shapes[n]) for n in sparse)
        assert all(r * sum(shapes[n]) >= nnz[n] for n in sparse)
        size = 12 * r * sum(sum(shapes[n]) for n in sparse)
        assert size + itemsize * sum(math.prod(shapes[n]) for n in whole) == want


def test_half_precision_values(workdir, capsys, tmp_path):
    """bf16 values: bit-exact on a bf16 base, within two float32 roundings on a float32 base
    (where ``lota apply`` rounds the base entry to bfloat16 before adding)."""
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    base = workdir / "base"
    delta = random_delta(base, names, 1500, tmp_path / "bf16.safetensors", values_dtype="bfloat16")
    adapter, applied = tmp_path / "adapter", tmp_path / "applied"
    code, out, err = lota(capsys, "export-peft", delta, "--base", base, "--out", adapter)
    assert code == 0 and "entries off by up to" in out, (out, err)
    assert lota(capsys, "apply", base, delta, "--out", applied)[0] == 0
    check_equivalent(base, adapter, applied, exact=False)

    half = tmp_path / "base_bf16"
    load_model(str(base)).to(torch.bfloat16).save_pretrained(half)
    byte_tokenizer().save_pretrained(half)
    assert load_model(str(half)).model.embed_tokens.weight.dtype == torch.bfloat16
    for values_dtype in ("bfloat16", "float32"):
        d = random_delta(
            half, names, 1500, tmp_path / f"{values_dtype}.safetensors", values_dtype=values_dtype
        )
        check_equivalent(half, *export_and_apply(capsys, half, d, tmp_path, values_dtype))


@pytest.mark.parametrize(
    "name", ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"]
)
def test_tensor_outside_linear_layers_is_refused(workdir, capsys, tmp_path, name):
    base = workdir / "base"
    names = [name, "model.layers.0.self_attn.q_proj.weight"]
    delta = random_delta(base, names, {names[0]: 3, names[1]: 40}, tmp_path / "d.safetensors")
    out = tmp_path / "adapter"
    code, _, err = lota(capsys, "export-peft", delta, "--base", base, "--out", out)
    assert_refused(code, err, name, "lota apply")
    assert not out.exists()


def test_a_delta_that_overflows_a_float16_base_is_refused(fp16_base, capsys, tmp_path):
    from .conftest import constant_delta

    delta = constant_delta(fp16_base, tmp_path / "big.safetensors", 1e5)  # float16 ends at 65504
    out = tmp_path / "adapter"
    code, _, err = lota(capsys, "export-peft", delta, "--base", fp16_base, "--out", out)
    assert_refused(code, err, "big.safetensors", "q_proj.weight' overflows its float16")
    assert not out.exists()


def test_too_dense_for_one_rank_is_refused(workdir, capsys, tmp_path):
    base = workdir / "base"
    # gate_proj is [64, 32]: all 2048 entries need r = 22, and 22 * (32 + 64) > 2048
    delta = random_delta(
        base, ["model.layers.0.mlp.gate_proj.weight"], 64 * 32, tmp_path / "d.safetensors"
    )
    out = tmp_path / "adapter"
    code, _, err = lota(capsys, "export-peft", delta, "--base", base, "--out", out)
    assert_refused(code, err, "too dense", "gate_proj", "lota apply")
    assert not out.exists()


def test_ticket_is_refused(workdir, trained, capsys, tmp_path):
    d = fmt.load(trained / "delta.safetensors")
    fmt.save(d.ticket, tmp_path / "t.safetensors")
    out = tmp_path / "adapter"
    code, _, err = lota(
        capsys, "export-peft", tmp_path / "t.safetensors", "--base", workdir / "base", "--out", out
    )
    assert_refused(code, err, "ticket")
    assert not out.exists()


def test_foreign_base_is_refused_unless_allowed(workdir, trained, capsys, tmp_path):
    other = tmp_path / "other_base"
    save_toy_model(other, seed=7, hidden=32, layers=2, heads=2)
    delta, out = trained / "delta.safetensors", tmp_path / "adapter"
    code, _, err = lota(capsys, "export-peft", delta, "--base", other, "--out", out)
    assert_refused(code, err, "--allow-mismatch")
    assert not out.exists()
    code, _, err = lota(
        capsys, "export-peft", delta, "--base", other, "--out", out, "--allow-mismatch"
    )
    assert code == 0, err
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["base_fingerprint"] != meta["delta_base_fingerprint"]
    assert meta["delta_base_fingerprint"] == fmt.load(delta).base_fingerprint
    code, _, err = lota(
        capsys,
        "export-peft",
        delta,
        "--base",
        workdir / "other_arch",
        "--out",
        tmp_path / "x",
        "--allow-mismatch",
    )
    assert_refused(code, err, "shape")
    assert not (tmp_path / "x").exists()


def test_existing_output_is_kept_without_force(workdir, trained, capsys, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["export-peft", trained / "delta.safetensors", "--base", workdir / "base", "--out", out]
    code, _, err = lota(capsys, *args)
    assert_refused(code, err, "--force")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, err = lota(capsys, *args, "--force")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not list(tmp_path.glob(".taken*"))  # no temporary or old folder left beside it
