"""PEFT LoRA adapters imported as lota deltas."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model

from lota import format as fmt
from lota.cli import main
from lota.models import load_model, named_weights
from lota.selection import ticket_size


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def make_adapter(workdir, folder, use_rslora=False):
    model = load_model(str(workdir / "base"))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give the adapter a real change
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(folder, safe_serialization=True)
    merged = peft_model.merge_and_unload()
    return {n: t.detach().clone() for n, t in named_weights(merged).items()}


def test_imported_adapter_equals_the_merged_change(workdir, tmp_path, capsys):
    for rs in (False, True):
        merged = make_adapter(workdir, tmp_path / f"adapter{rs}", use_rslora=rs)
        base = {n: t.detach() for n, t in named_weights(load_model(str(workdir / "base"))).items()}
        out = tmp_path / f"lora{rs}.safetensors"
        code, _, err = run(
            capsys,
            "import-lora",
            tmp_path / f"adapter{rs}",
            "--base",
            workdir / "base",
            "--out",
            out,
        )
        assert code == 0, err
        d = fmt.load(out)
        assert d.nnz == sum(t.numel() for t in d.to_dense().values())  # dense
        dense = d.to_dense()
        assert len(dense) == 6  # q, v and down of both blocks
        for name, change in dense.items():
            torch.testing.assert_close(change, merged[name] - base[name], rtol=1e-5, atol=1e-6)
        for name in base:
            if name not in dense:
                assert torch.equal(merged[name], base[name])


def test_sparsified_import_keeps_the_exact_top_k(workdir, tmp_path, capsys):
    make_adapter(workdir, tmp_path / "adapter")
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "dense.safetensors",
    )
    assert code == 0, err
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--sparsity",
        "0.9",
        "--out",
        tmp_path / "sparse.safetensors",
    )
    assert code == 0, err
    dense, sparse = (
        fmt.load(tmp_path / "dense.safetensors"),
        fmt.load(tmp_path / "sparse.safetensors"),
    )
    names = sorted(dense.shapes)
    flat = torch.cat([dense.to_dense()[n].reshape(-1) for n in names])
    k = ticket_size("0.9", flat.numel())
    assert sparse.nnz == k
    order = torch.sort(-flat.abs(), stable=True).indices[:k]  # ties: lower global position
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[order] = True
    got = torch.cat([sparse.ticket.dense_masks()[n].reshape(-1) for n in names])
    assert torch.equal(got, want)
    kept = torch.cat([sparse.to_dense()[n].reshape(-1) for n in names])
    assert torch.equal(kept[want], flat[want])


def test_bad_adapters_are_refused(workdir, tmp_path, capsys):
    make_adapter(workdir, tmp_path / "adapter")
    other = tmp_path / "other"
    other.mkdir()
    code, _, err = run(
        capsys,
        "import-lora",
        other,
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and "adapter_config.json" in err
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "other_arch",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and ("shape" in err or "does not have" in err)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and "LORA" in err
    assert not (tmp_path / "x.safetensors").exists()
