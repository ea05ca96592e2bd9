"""Official LoTA mask files: import (weights_only), export, round trip, refusals."""

from __future__ import annotations

import os
import pickle

import torch

from lota import format as fmt
from lota.cli import main
from lota.models import load_model
from lota.selection import select
from lota.targets import resolve_targets
from lota.weights import WeightReader


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_round_trip_gives_the_same_ticket(workdir, tmp_path, capsys):
    targets = resolve_targets(load_model(str(workdir / "base")))
    ticket = select("random", targets, 500, seed=3)
    fmt.save(ticket, tmp_path / "t.safetensors")
    assert (
        run(capsys, "export-mask", tmp_path / "t.safetensors", "--out", tmp_path / "m.pt")[0] == 0
    )
    masks = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(masks) == set(targets) and all(m.dtype == torch.bool for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == 500  # True = frozen
    code, _, err = run(
        capsys,
        "import-mask",
        tmp_path / "m.pt",
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "back.safetensors",
    )
    assert code == 0, err
    back = fmt.load(tmp_path / "back.safetensors")
    assert back.shapes == ticket.shapes
    assert all(torch.equal(back.indices[n], ticket.indices[n]) for n in targets)
    assert back.base_fingerprint == WeightReader(str(workdir / "base")).fingerprint()


def test_official_style_file_with_float_masks_imports(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    frozen = torch.rand(6, 5, generator=g) > 0.3
    masks = {"model.layers.0.mlp.up_proj.weight": frozen, "model.norm.weight": torch.ones(5)}
    torch.save(masks, tmp_path / "0.9_mask.pt")
    assert (
        run(capsys, "import-mask", tmp_path / "0.9_mask.pt", "--out", tmp_path / "t.safetensors")[0]
        == 0
    )
    t = fmt.load(tmp_path / "t.safetensors")
    assert torch.equal(
        t.indices["model.layers.0.mlp.up_proj.weight"], (~frozen).reshape(-1).nonzero().view(-1)
    )
    assert t.indices["model.norm.weight"].numel() == 0


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_mask",))


def test_code_in_a_mask_file_never_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": _Exploit()}))
    code, _, err = run(
        capsys, "import-mask", tmp_path / "evil.pt", "--out", tmp_path / "t.safetensors"
    )
    assert code == 2 and "refused" in err and err.count("\n") == 1
    assert not (tmp_path / "pwned_by_mask").exists() and not (tmp_path / "t.safetensors").exists()


def test_import_loads_with_weights_only(tmp_path, capsys, monkeypatch):
    torch.save({"a.weight": torch.zeros(2, 2, dtype=torch.bool)}, tmp_path / "m.pt")
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert (
        run(capsys, "import-mask", tmp_path / "m.pt", "--out", tmp_path / "t.safetensors")[0] == 0
    )
    assert seen.get("weights_only") is True


def test_bad_mask_files_are_refused(workdir, tmp_path, capsys):
    torch.save({"a.weight": torch.full((2, 2), 0.5)}, tmp_path / "half.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    torch.save({"nope.weight": torch.zeros(3, 3, dtype=torch.bool)}, tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    cases = [
        ("half.pt", "other than 0 and 1", []),
        ("list.pt", "dict", []),
        ("foreign.pt", "no such parameter", ["--base", workdir / "base"]),
        ("junk.pt", "refused", []),
        ("missing.pt", "not found", []),
    ]
    for name, words, extra in cases:
        code, _, err = run(
            capsys, "import-mask", tmp_path / name, *extra, "--out", tmp_path / "t.safetensors"
        )
        assert code == 2 and words in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "t.safetensors").exists()


def test_masks_are_checked_before_they_are_expanded(workdir, tmp_path, capsys, monkeypatch):
    """A 1.4 KB file can hold a stride-0 view declaring 3.6e9 entries: its shape and storage are
    checked (and, with --base, compared with the model) before a single entry is expanded; sparse
    and meta tensors and names with newlines end in one line too."""
    import numpy as np

    view = torch.zeros(1, dtype=torch.bool).expand(60_000, 60_000)
    torch.save({"model.layers.0.mlp.up_proj.weight": view}, tmp_path / "view.pt")
    assert (tmp_path / "view.pt").stat().st_size < 2_000
    fits = torch.zeros(1, dtype=torch.bool).expand(64, 32)  # the base's shape, still a view
    torch.save({"model.layers.0.mlp.up_proj.weight": fits}, tmp_path / "fits.pt")
    torch.save({"a.weight": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    torch.save({"a.weight": torch.zeros(3, 3, device="meta")}, tmp_path / "meta.pt")
    torch.save({"a\nb.weight": torch.zeros(2, 2, dtype=torch.complex64)}, tmp_path / "name.pt")
    expanded = []
    monkeypatch.setattr(np, "flatnonzero", lambda a: expanded.append(a.size))
    cases = [
        ("view.pt", [], "stores only 1 values"),
        ("view.pt", ["--base", workdir / "base"], "stores only 1 values"),
        ("fits.pt", ["--base", workdir / "base"], "stores only 1 values"),
        ("sparse.pt", [], "sparse_coo tensor"),
        ("meta.pt", [], "meta device"),
        ("name.pt", [], "a\\nb.weight"),
    ]
    for name, extra, words in cases:
        code, _, err = run(
            capsys, "import-mask", tmp_path / name, *extra, "--out", tmp_path / "t.safetensors"
        )
        assert code == 2 and words in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "t.safetensors").exists()
    assert not expanded
