"""Out-of-core extraction (``lota mask``) selects exactly the ticket an in-memory top-k selects."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lota.models import load_model
from lota.selection import ticket_size
from lota.task_vectors import make_ticket
from lota.toy import save_toy_model


def _write_sharded(folder, model_dir, weights: dict[str, torch.Tensor], per_shard: int) -> None:
    """A copy of ``model_dir`` whose weights are ``weights`` split over several safetensors shards."""
    folder.mkdir()
    for f in model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    names = sorted(weights)
    weight_map = {}
    for i in range(0, len(names), per_shard):
        shard = f"model-{i // per_shard + 1:05d}.safetensors"
        save_file(
            {n: weights[n].contiguous() for n in names[i : i + per_shard]}, str(folder / shard)
        )
        weight_map.update({n: shard for n in names[i : i + per_shard]})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _reference(base, tuned, shapes, k):
    """Concatenate every |Δ| in name order, sort descending; ties go to the lowest position."""
    names = sorted(shapes)
    flat = torch.cat([(tuned[n].float() - base[n].float()).abs().reshape(-1) for n in names])
    order = torch.sort(-flat.double(), stable=True).indices[:k]
    out, start = {}, 0
    for n in names:
        numel = math.prod(shapes[n])
        mine = order[(order >= start) & (order < start + numel)] - start
        out[n] = torch.sort(mine).values
        start += numel
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sparsity", ["0.5", "0.9", "0.999"])
def test_out_of_core_ticket_equals_in_memory_top_k(tmp_path, dtype, sparsity):
    base_dir = tmp_path / "toy"
    save_toy_model(base_dir, hidden=32, layers=2, heads=2)
    model = load_model(base_dir)
    base = {n: p.detach().to(dtype) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    tuned = {}
    for n, w in base.items():
        change = torch.randn(w.shape, generator=g) * 1e-2
        change[torch.rand(w.shape, generator=g) < 0.2] = 0.0  # many exact ties at zero
        change[torch.rand(w.shape, generator=g) < 0.1] = 5e-3  # and ties at a common value
        tuned[n] = (w.float() + change).to(dtype)
    _write_sharded(tmp_path / "base", base_dir, base, per_shard=3)
    _write_sharded(tmp_path / "tuned", base_dir, tuned, per_shard=4)
    ticket = make_ticket(
        str(tmp_path / "base"), str(tmp_path / "tuned"), sparsity, show_progress=False
    )
    shapes = ticket.shapes
    k = sum(int(i.numel()) for i in ticket.indices.values())
    assert k == ticket_size(sparsity, sum(math.prod(s) for s in shapes.values()))
    want = _reference(base, tuned, shapes, k)
    for n in shapes:
        assert torch.equal(ticket.indices[n], want[n]), n
