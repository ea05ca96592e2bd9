"""``--values-dtype auto``: 16-bit values wherever they hold the float32 difference exactly.

The invariant: an auto file loads to the very float32 values of the float32 file, so ``apply``,
``merge`` and ``export-peft`` of the two give identical outputs, while the file is smaller.
``lota adapt`` on 16-bit weights writes by default the change its saved model holds, so that
``lota apply`` of its delta is the saved model bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lota import format as fmt
from lota.cli import main
from lota.delta import SparseDelta, apply_delta_, saved_change
from lota.errors import FormatError
from lota.ticket import Ticket
from lota.toy import byte_tokenizer, tiny_llama

from .conftest import ADAPT

TINY = {"hidden": 32, "layers": 2, "heads": 2}


def lota(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def save_pair(folder, dtype: torch.dtype, sigma: float = 1e-3):
    """A base of ``dtype`` and a tuned model: every weight moved by ``N(0, sigma)``, rounded."""
    model = tiny_llama(seed=0, **TINY).to(dtype)
    model.save_pretrained(folder / "base", safe_serialization=True)
    byte_tokenizer().save_pretrained(folder / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p.float() + torch.randn(p.shape, generator=g) * sigma).to(dtype))
    model.save_pretrained(folder / "tuned", safe_serialization=True)
    byte_tokenizer().save_pretrained(folder / "tuned")
    return folder / "base", folder / "tuned"


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half(request, tmp_path_factory):
    """Base, tuned, and the delta between them as an auto and as a float32 file."""
    folder = tmp_path_factory.mktemp(f"half_{request.param}")
    base, tuned = save_pair(folder, getattr(torch, request.param))
    files = {}
    for vd in ("auto", "float32"):
        files[vd] = folder / f"{vd}.safetensors"
        argv = ["delta", base, tuned, "--sparsity", "0.5", "--out", files[vd], "--quiet"]
        assert main([str(a) for a in argv + ["--values-dtype", vd]]) == 0
    return folder, base, tuned, files


def test_auto_is_the_default_of_lota_delta(half, tmp_path):
    _, base, tuned, files = half
    out = tmp_path / "d.safetensors"
    assert main([str(a) for a in ["delta", base, tuned, "--sparsity", "0.5", "--out", out]]) == 0
    assert fmt.read_header(out)[1]["config"]["values_dtype"] == "auto"
    assert fmt.read_header(out)[1]["tensors"] == fmt.read_header(files["auto"])[1]["tensors"]
    a, b = load_file(str(out)), load_file(str(files["auto"]))
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def test_auto_loads_to_the_float32_values_bit_for_bit(half):
    _, _, _, files = half
    auto, f32 = fmt.load(files["auto"]), fmt.load(files["float32"])
    for name, idx in f32.indices.items():
        assert torch.equal(auto.indices[name], idx), name
        assert auto.values[name].dtype == torch.float32, name
        assert torch.equal(bits(auto.values[name]), bits(f32.values[name])), name
    assert files["auto"].stat().st_size < files["float32"].stat().st_size


def test_auto_stores_16_bits_where_exact_and_float32_elsewhere(half):
    _, _, _, files = half
    f32 = fmt.load(files["float32"])
    _, header = fmt.read_header(files["auto"])
    split = 0
    with safe_open(str(files["auto"]), framework="pt") as f:
        for name, e in header["tensors"].items():
            want = f32.values[name]
            if not want.numel():
                continue
            stored = f.get_tensor(f"{name}::values")
            assert str(stored.dtype).removeprefix("torch.") == e["values_dtype"], name
            if e["values_dtype"] == "float32":
                assert "fix" not in e, name
                continue
            assert stored.dtype in (torch.bfloat16, torch.float16), name
            # exactly the entries that 16 bits do not hold are kept as float32
            inexact = torch.nonzero(
                bits(stored.float()).view(torch.int32) != bits(want).view(torch.int32)
            ).view(-1)
            nfix = e.get("fix", {}).get("nnz", 0)
            assert nfix == inexact.numel(), name
            if nfix:
                split += 1
                assert torch.equal(bits(f.get_tensor(f"{name}::fix_values")), bits(want[inexact]))
    assert split > 0  # a perturbed model has entries that need float32
    assert fmt.read_header(files["auto"])[0]["format_version"] == "3"


def test_apply_of_auto_is_the_tuned_model_bit_for_bit(half, capsys):
    folder, base, tuned, files = half
    for vd in ("auto", "float32"):
        lota(capsys, "apply", base, files[vd], "--out", folder / f"applied_{vd}", "--quiet")
    a = load_file(str(folder / "applied_auto" / "model.safetensors"))
    b = load_file(str(folder / "applied_float32" / "model.safetensors"))
    t = load_file(str(tuned / "model.safetensors"))
    delta = fmt.load(files["auto"])
    for key in b:
        assert torch.equal(bits(a[key]), bits(b[key])), key
    for name, idx in delta.indices.items():  # the ticket's entries are the tuned weights
        assert torch.equal(bits(a[name].reshape(-1)[idx]), bits(t[name].reshape(-1)[idx])), name


def test_merge_add_of_auto_equals_merge_of_float32(half, capsys):
    folder, _, _, files = half
    merged = {}
    for vd in ("auto", "float32"):
        out = folder / f"merged_{vd}.safetensors"
        lota(capsys, "merge", files[vd], files[vd], "--method", "add", "--out", out, "--quiet")
        merged[vd] = fmt.load(out)
    for name, v in merged["float32"].values.items():
        assert torch.equal(merged["auto"].indices[name], merged["float32"].indices[name])
        assert torch.equal(bits(merged["auto"].values[name].float()), bits(v.float())), name


def test_export_peft_of_auto_equals_export_of_float32(half, capsys):
    folder, base, _, files = half
    adapters = {}
    for vd in ("auto", "float32"):
        out = folder / f"adapter_{vd}"
        text = lota(capsys, "export-peft", files[vd], "--base", base, "--out", out)
        assert "merge exact" in text, text
        adapters[vd] = load_file(str(out / "adapter_model.safetensors"))
    assert adapters["auto"].keys() == adapters["float32"].keys()
    for key, t in adapters["float32"].items():
        assert torch.equal(bits(adapters["auto"][key]), bits(t)), key


def test_inspect_shows_the_per_tensor_dtypes(half, capsys):
    _, _, _, files = half
    text = lota(capsys, "inspect", files["auto"])
    assert "+float32" in text, text
    info = json.loads(lota(capsys, "inspect", files["auto"], "--json"))
    info = info[0] if isinstance(info, list) else info
    _, header = fmt.read_header(files["auto"])
    for name, t in info["tensors"].items():
        e = header["tensors"][name]
        want = e["values_dtype"] + ("+float32" if "fix" in e else "")
        assert t["values_dtype"] == want, name
        assert t["float32_fixes"] == e.get("fix", {}).get("nnz", 0), name
    assert "float32" in info["values_dtype"] and len(info["values_dtype"]) >= 2


def test_explicit_dtypes_keep_their_meaning(half, tmp_path):
    _, base, tuned, files = half
    f32 = fmt.load(files["float32"])
    for vd in ("bfloat16", "float16"):
        out = tmp_path / f"{vd}.safetensors"
        argv = ["delta", base, tuned, "--sparsity", "0.5", "--out", out, "--values-dtype", vd]
        assert main([str(a) for a in argv + ["--quiet"]]) == 0
        got = fmt.load(out)
        assert fmt.read_header(out)[0]["format_version"] == "1"
        for name, v in f32.values.items():
            assert got.values[name].dtype == getattr(torch, vd), name
            assert torch.equal(bits(got.values[name]), bits(v.to(getattr(torch, vd)))), name


def test_fp32_base_gives_the_float32_file(tmp_path):
    base, tuned = save_pair(tmp_path, torch.float32)
    paths = {}
    for vd in ("auto", "float32"):
        paths[vd] = tmp_path / f"{vd}.safetensors"
        argv = ["delta", base, tuned, "--sparsity", "0.5", "--out", paths[vd], "--values-dtype", vd]
        assert main([str(a) for a in argv + ["--quiet"]]) == 0
    (meta_a, head_a), (meta_f, head_f) = map(fmt.read_header, paths.values())
    assert head_a["tensors"] == head_f["tensors"] and head_a["checksums"] == head_f["checksums"]
    assert meta_a["format_version"] == meta_f["format_version"] == "1"
    a, f = load_file(str(paths["auto"])), load_file(str(paths["float32"]))
    assert a.keys() == f.keys() and all(torch.equal(bits(a[k]), bits(f[k])) for k in f)
    assert all(e["values_dtype"] == "float32" for e in head_a["tensors"].values())


def test_auto_keeps_values_already_in_16_bits_and_all_exact_tensors_stay_v1(tmp_path):
    ticket = Ticket(
        shapes={"a": (64,), "b": (64,)}, indices={"a": torch.arange(8), "b": torch.arange(4)}
    )
    values = {"a": torch.randn(8).to(torch.bfloat16), "b": torch.tensor([0.5, -0.25, 0.0, 2.0])}
    path = tmp_path / "d.safetensors"
    fmt.save(SparseDelta(ticket, values), path, values_dtype="auto")
    meta, header = fmt.read_header(path)
    assert meta["format_version"] == "1" and "fix" not in str(header["tensors"])
    assert header["tensors"]["a"]["values_dtype"] == "bfloat16"
    assert header["tensors"]["b"]["values_dtype"] in ("bfloat16", "float16")
    got = fmt.load(path)
    assert torch.equal(bits(got.values["a"]), bits(values["a"]))
    assert torch.equal(got.values["b"].float(), values["b"])


def test_split_file_refused_when_it_claims_an_older_version_or_fixes_are_corrupt(half, tmp_path):
    _, _, _, files = half
    tensors = load_file(str(files["auto"]))
    with safe_open(str(files["auto"]), framework="pt") as f:
        meta = f.metadata()
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "format_version": "2"})
    with pytest.raises(FormatError, match="version 3"):
        fmt.load(old)
    key = next(k for k in tensors if k.endswith("::fix_values"))
    bad = dict(tensors, **{key: tensors[key][:-1]})
    corrupt = tmp_path / "corrupt.safetensors"
    save_file(bad, str(corrupt), metadata=meta)
    with pytest.raises(FormatError):
        fmt.load(corrupt)
    with pytest.raises(FormatError):
        fmt.load(corrupt, verify=False)


def _rice_sized_pair(folder):
    """A bfloat16 base with tensors large enough for Rice-coded indices, a tuned model (the
    weights moved a little, those of ``up_proj`` and attention by far more than their size, so
    that their differences need float32) and a ticket giving every index encoding, Rice twice."""
    model = tiny_llama(seed=0, hidden=64, layers=1, heads=4, intermediate=2048).to(torch.bfloat16)
    model.save_pretrained(folder / "base", safe_serialization=True)
    byte_tokenizer().save_pretrained(folder / "base")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            sigma = 1.0 if "up_proj" in name or "self_attn" in name else 1e-3
            p.copy_((p.float() + torch.randn(p.shape, generator=g) * sigma).to(torch.bfloat16))
    model.save_pretrained(folder / "tuned", safe_serialization=True)
    byte_tokenizer().save_pretrained(folder / "tuned")

    def from_gaps(lo, hi, numel):  # gaps drawn from [lo, hi] until the tensor ends
        idx = torch.cumsum(torch.randint(lo, hi + 1, (numel,), generator=g) + 1, 0) - 1
        return idx[idx < numel]

    layer = "model.layers.0."
    plan = {
        "mlp.down_proj": ("gaps", from_gaps(100, 255, 131072)),
        "mlp.gate_proj": ("rice", from_gaps(0, 600, 131072)),
        "mlp.up_proj": ("rice", from_gaps(0, 600, 131072)),
        "self_attn.k_proj": ("full", torch.arange(4096)),
        "self_attn.o_proj": ("empty", torch.zeros(0, dtype=torch.long)),
        "self_attn.q_proj": ("bitmask", from_gaps(0, 1, 4096)),
        "self_attn.v_proj": ("gaps", torch.tensor([5, 100, 300])),
    }
    params = dict(model.named_parameters())
    names = {layer + k + ".weight": v for k, v in plan.items()}
    ticket = Ticket(
        shapes={n: tuple(params[n].shape) for n in names},
        indices={n: idx for n, (_, idx) in names.items()},
    )
    fmt.save(ticket, folder / "ticket.safetensors")
    encodings = {n: e for n, (e, _) in names.items()}
    return folder / "base", folder / "tuned", folder / "ticket.safetensors", encodings


def test_auto_delta_with_split_and_rice_tensors_is_read_by_inspect_apply_merge(tmp_path, capsys):
    """At sizes where indices are Rice coded, ``lota delta`` (auto) writes split tensors and, after
    them, a Rice-coded tensor whose values stay float32: the file carries the version its content
    needs, and every reader takes it."""
    base, tuned, ticket, encodings = _rice_sized_pair(tmp_path)
    files = {}
    for vd in ("auto", "float32"):
        files[vd] = tmp_path / f"{vd}.safetensors"
        argv = ["delta", base, tuned, "--ticket", ticket, "--out", files[vd], "--values-dtype", vd]
        lota(capsys, *argv, "--quiet")
    meta, header = fmt.read_header(files["auto"])
    assert {n: e["encoding"] for n, e in header["tensors"].items()} == encodings
    # split tensors first, then Rice-coded up_proj and the rest with float32 values
    split = [n for n, e in header["tensors"].items() if "fix" in e]
    assert split == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    assert header["tensors"]["model.layers.0.mlp.up_proj.weight"]["values_dtype"] == "float32"
    assert meta["format_version"] == "3"

    info = json.loads(lota(capsys, "inspect", files["auto"], "--json"))
    assert info["format_version"] == 3 and info["nnz"] == header["nnz"]
    lota(capsys, "apply", base, files["auto"], "--out", tmp_path / "applied", "--quiet")
    applied = load_file(str(tmp_path / "applied" / "model.safetensors"))
    t, b = load_file(str(tuned / "model.safetensors")), load_file(str(base / "model.safetensors"))
    delta = fmt.load(files["auto"])
    for name in b:
        want = b[name].reshape(-1).clone()
        if name in delta.indices:  # the ticket's entries are the tuned weights, the rest the base
            idx = delta.indices[name]
            want[idx] = t[name].reshape(-1)[idx]
        assert torch.equal(bits(applied[name].reshape(-1)), bits(want)), name
    merged = tmp_path / "merged.safetensors"
    lota(capsys, "merge", files["auto"], files["float32"], "--out", merged, "--quiet")
    f32 = fmt.load(files["float32"])
    for name, v in fmt.load(merged).values.items():
        assert torch.equal(bits(v), bits(2 * f32.values[name])), name


LOOSE_FIXES = {
    "fix encoding a list": lambda fix: fix.update(encoding=["gaps"]),
    "fix encoding an object": lambda fix: fix.update(encoding={"gaps": 1}),
    "fix encoding a number": lambda fix: fix.update(encoding=3),
    "fix count a string": lambda fix: fix.update(nnz=str(fix["nnz"])),
    "fix rice parameter a list": lambda fix: fix.update(rice_r=[2]),
}


@pytest.mark.parametrize("case", LOOSE_FIXES)
def test_loosely_typed_fix_fields_of_a_split_file_are_refused_in_one_line(
    half, tmp_path, capsys, case
):
    _, _, _, files = half
    tensors = load_file(str(files["auto"]))
    with safe_open(str(files["auto"]), framework="pt") as f:
        meta = dict(f.metadata())
    header = json.loads(meta["header"])
    split = [e for e in header["tensors"].values() if "fix" in e]
    assert split, "the auto file has a split tensor"
    LOOSE_FIXES[case](split[0]["fix"])
    meta["header"] = json.dumps(header)
    path = tmp_path / "loose.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(FormatError, match=str(path)):
        fmt.load(path)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and str(path) in err


# ---------------------------------------------------------------------------- lota adapt
@pytest.fixture(scope="module")
def adapted(workdir, tmp_path_factory):
    """``adapted(dtype, method, *options)``: ``lota adapt`` of the tiny base in ``dtype``, made
    once; returns (base folder, run folder)."""
    from lota.models import load_model, load_tokenizer, save_model

    folder = tmp_path_factory.mktemp("adapted")
    runs = {}

    def run(dtype: str, method: str = "lota", *options: str):
        base = folder / dtype
        if not base.exists():
            model = load_model(str(workdir / "base"), dtype)
            save_model(model, load_tokenizer(str(workdir / "base")), base)
        key = (dtype, method, *options)
        if key not in runs:
            out = folder / "_".join(key).replace("-", "")
            argv = ["adapt", base, "--data", workdir / "a.jsonl", "--out", out, "--method", method]
            assert main([str(a) for a in [*argv, *ADAPT, *options]]) == 0
            runs[key] = out
        return base, runs[key]

    return run


def model_weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", ["lota", "fft"])
def test_adapt_on_16_bit_weights_writes_the_saved_models_change(adapted, capsys, dtype, method):
    base, run = adapted(dtype, method, "--save-model")
    path = run / "delta.safetensors"
    assert fmt.read_header(path)[1]["config"]["values_dtype"] == "auto"
    delta = fmt.load(path)
    w0, saved = model_weights(base), model_weights(run / "model")
    for name, idx in delta.indices.items():  # saved - base, exactly
        change = saved[name].reshape(-1)[idx].float() - w0[name].reshape(-1)[idx].float()
        assert torch.equal(bits(delta.values[name].float()), bits(change)), name
    lota(capsys, "apply", base, path, "--out", run / "applied", "--quiet")
    applied = model_weights(run / "applied")
    assert applied.keys() == saved.keys()
    for key, t in saved.items():
        assert torch.equal(bits(applied[key]), bits(t)), key


def test_adapt_on_bf16_weights_stores_16_bits_in_a_smaller_file(adapted):
    _, run = adapted("bfloat16", "lota", "--save-model")
    _, f32 = adapted("bfloat16", "lota", "--save-model", "--values-dtype", "float32")
    path = run / "delta.safetensors"
    stored = {e["values_dtype"] for e in fmt.read_header(path)[1]["tensors"].values()}
    assert stored & {"bfloat16", "float16"}, stored
    assert path.stat().st_size < (f32 / "delta.safetensors").stat().st_size


def test_adapt_values_dtype_float32_keeps_the_master_values(adapted):
    """``--values-dtype float32``: the trained float32 values, some finer than a bfloat16 step;
    the default file holds the change they make to the saved model."""
    base, run = adapted("bfloat16", "lota", "--save-model", "--values-dtype", "float32")
    _, default = adapted("bfloat16", "lota", "--save-model")
    _, header = fmt.read_header(run / "delta.safetensors")
    assert header["config"]["values_dtype"] == "float32"
    assert {e["values_dtype"] for e in header["tensors"].values()} == {"float32"}
    masters, change = fmt.load(run / "delta.safetensors"), fmt.load(default / "delta.safetensors")
    w0 = model_weights(base)
    finer = 0
    for name, idx in masters.indices.items():
        assert torch.equal(change.indices[name], idx), name
        want = saved_change(masters, w0, torch.bfloat16).values[name]
        assert torch.equal(bits(change.values[name].float()), bits(want)), name
        finer += int((want != masters.values[name]).sum())
    assert finer > 0
    again = {n: t.clone() for n, t in w0.items()}
    apply_delta_(again, masters)  # the master values too give the saved model (sparse training)
    for key, t in model_weights(run / "model").items():
        assert torch.equal(bits(again[key]), bits(t)), key


def test_adapt_writes_the_same_delta_without_save_model(adapted):
    _, with_model = adapted("bfloat16", "lota", "--save-model")
    _, without = adapted("bfloat16", "lota")
    a = load_file(str(with_model / "delta.safetensors"))
    b = load_file(str(without / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def test_adapt_on_float32_weights_writes_the_float32_file(adapted):
    _, default = adapted("float32", "lota")
    _, f32 = adapted("float32", "lota", "--values-dtype", "float32")
    (meta_a, head_a), (meta_f, head_f) = (
        fmt.read_header(r / "delta.safetensors") for r in (default, f32)
    )
    assert head_a["config"]["values_dtype"] == "auto"
    assert head_a["tensors"] == head_f["tensors"] and head_a["checksums"] == head_f["checksums"]
    assert meta_a["format_version"] == meta_f["format_version"] == "1"
    a = load_file(str(default / "delta.safetensors"))
    f = load_file(str(f32 / "delta.safetensors"))
    assert a.keys() == f.keys() and all(torch.equal(bits(a[k]), bits(f[k])) for k in f)


def test_saved_change_of_base_plus_delta_is_the_change_apply_makes():
    """Without the saved weights, ``saved_change`` takes ``base + delta`` as ``apply`` writes it
    (a sharded run's model): the same values as from the applied weights."""
    g = torch.Generator().manual_seed(3)
    w0 = {"w": torch.randn(64, 8, generator=g).bfloat16(), "v": torch.randn(100, generator=g)}
    w0["v"] = w0["v"].bfloat16()
    ticket = Ticket(
        shapes={"w": (64, 8), "v": (100,)},
        indices={"w": torch.arange(0, 512, 3), "v": torch.arange(100)},
    )
    values = {n: torch.randn(i.numel(), generator=g) * 0.01 for n, i in ticket.indices.items()}
    delta = SparseDelta(ticket, values)
    applied = {n: t.clone() for n, t in w0.items()}
    apply_delta_(applied, delta)
    got = saved_change(delta, w0, torch.bfloat16)
    want = saved_change(delta, w0, torch.bfloat16, saved=applied)
    again = {n: t.clone() for n, t in w0.items()}
    apply_delta_(again, got)
    for name in ticket.names:
        assert torch.equal(bits(got.values[name]), bits(want.values[name])), name
        assert torch.equal(bits(again[name]), bits(applied[name])), name
