"""The sparse delta: values aligned with a ticket, applied to weights at its entries only."""

from __future__ import annotations

import json

import pytest
import torch

from lota.delta import SparseDelta, apply_delta_, delta_from_weights
from lota.errors import InputError
from lota.ticket import Ticket, TicketError

SHAPES = {"a": (2, 3), "b": (4,)}


def ticket() -> Ticket:
    return Ticket(shapes=dict(SHAPES), indices={"a": torch.tensor([1, 4]), "b": torch.tensor([0])})


def delta() -> SparseDelta:
    return SparseDelta(
        ticket=ticket(),
        values={"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0])},
    )


def test_delta_reads_like_its_ticket():
    d = delta()
    assert d.shapes == d.ticket.shapes and d.nnz == 3 and d.numel == 10
    assert d.names == ["a", "b"] and d.summary() == d.ticket.summary()


def test_validate_names_the_tensor_whose_values_do_not_fit():
    with pytest.raises(TicketError, match="values for 'b' are missing"):
        SparseDelta(ticket=ticket(), values={"a": torch.zeros(2)})
    with pytest.raises(TicketError, match="values for 'a' have shape \\[3\\], its ticket has 2"):
        SparseDelta(ticket=ticket(), values={"a": torch.zeros(3), "b": torch.zeros(1)})
    with pytest.raises(TicketError, match="values for 'b' are torch.int64, not floating point"):
        SparseDelta(ticket=ticket(), values={"a": torch.zeros(2), "b": torch.zeros(1).long()})
    d = delta()
    d.ticket.indices["a"] = torch.tensor([4, 1])
    with pytest.raises(TicketError, match="not strictly increasing"):
        d.validate()


def test_to_dense_puts_values_at_the_entries_and_zeros_elsewhere():
    dense = delta().to_dense()
    assert dense["a"].tolist() == [[0.0, 0.5, 0.0], [0.0, -1.0, 0.0]]
    assert dense["b"].tolist() == [2.0, 0.0, 0.0, 0.0]
    assert delta().to_dense(torch.float64)["a"].dtype == torch.float64


def test_apply_touches_only_the_entries_and_scales():
    params = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    apply_delta_(params, delta(), scale=2.0)
    assert params["a"].tolist() == [[1.0, 2.0, 1.0], [1.0, -1.0, 1.0]]
    assert params["b"].tolist() == [5.0, 1.0, 1.0, 1.0]


def test_apply_refuses_another_architecture():
    with pytest.raises(InputError, match="delta has tensor 'b' that the model does not have"):
        apply_delta_({"a": torch.ones(2, 3)}, delta())
    with pytest.raises(InputError, match="delta tensor 'a' has shape \\[2, 3\\], the model has"):
        apply_delta_({"a": torch.ones(3, 2), "b": torch.ones(4)}, delta())


def test_delta_from_weights_round_trips_through_apply_bit_exactly():
    torch.manual_seed(0)
    base = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    tuned = {n: w + torch.randn_like(w) for n, w in base.items()}
    d = delta_from_weights(ticket(), base, tuned)
    assert d.values["a"].dtype == torch.float32 and d.nnz == 3
    rebuilt = {n: w.clone() for n, w in base.items()}
    apply_delta_(rebuilt, d)
    for n in base:
        flat, want, start = rebuilt[n].view(-1), tuned[n].view(-1), base[n].view(-1)
        idx = ticket().indices[n]
        outside = torch.ones(flat.numel(), dtype=torch.bool)
        outside[idx] = False
        assert torch.equal(flat[outside], start[outside])
        torch.testing.assert_close(flat[idx], want[idx], rtol=0, atol=1e-6)


def test_check_finite_names_the_tensor_and_the_file():
    d = delta()
    d.check_finite()
    d.values["b"] = torch.tensor([float("nan")])
    with pytest.raises(InputError) as e:
        d.check_finite("run/delta.safetensors")
    assert e.value.what == "tensor 'b' holds non-finite values (NaN or inf)"
    assert e.value.where == "run/delta.safetensors"


# ---------------------------------------------------------------------------- float8 values
@pytest.fixture(scope="module")
def float8_deltas(workdir, tmp_path_factory):
    """A base, and its delta to a fine-tune with values stored in each float8 dtype."""
    from lota import format as fmt
    from lota.cli import main
    from lota.toy import save_toy_model

    folder = tmp_path_factory.mktemp("float8")
    save_toy_model(folder / "tuned", seed=5, hidden=32, layers=2, heads=2)
    f32 = folder / "f32.safetensors"
    argv = ["delta", workdir / "base", folder / "tuned", "--sparsity", "0.9", "--out", f32]
    assert main([str(a) for a in argv + ["--values-dtype", "float32", "--quiet"]]) == 0
    d = fmt.load(f32)
    files = {}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        files[dtype] = folder / f"{dtype}.safetensors"
        fmt.save(d, files[dtype], values_dtype=dtype)
    return workdir / "base", files


def _base_plus(base, delta, scale=1.0):
    """``base + scale * values`` at the delta's entries, in float32, cast to the base's dtype:
    what merge computes for float8 values (it widens them to float32, exactly)."""
    from safetensors.torch import load_file

    weights = load_file(str(base / "model.safetensors"))
    for name, idx in delta.indices.items():
        w = weights[name].reshape(-1)
        w[idx] = (w[idx].float() + delta.values[name].float() * scale).to(w.dtype)
    return weights


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_values_apply_merge_export_and_eval_consistently(
    float8_deltas, workdir, capsys, tmp_path, dtype
):
    from safetensors.torch import load_file

    from lota import format as fmt
    from lota.hotswap import DeltaBank
    from lota.models import load_model
    from lota.targets import named_weights

    from .test_cli import lota

    base, files = float8_deltas
    path = files[dtype]
    d = fmt.load(path)
    assert {v.dtype for v in d.values.values()} == {dtype}  # stored and read as float8
    for scales in ([], ["--scales", "0.5"]):
        out = tmp_path / f"applied{len(scales)}"
        code, _, err = lota(capsys, "apply", base, path, "--out", out, *scales, "--quiet")
        assert code == 0, err
        want = _base_plus(base, d, 0.5 if scales else 1.0)
        got = load_file(str(out / "model.safetensors"))
        for name, w in want.items():
            assert torch.equal(got[name], w), name
    code, _, err = lota(capsys, "merge", path, path, "--out", tmp_path / "m.safetensors", "--quiet")
    assert code == 0, err
    merged = fmt.load(tmp_path / "m.safetensors")
    for name, v in d.values.items():
        assert torch.equal(merged.values[name], 2 * v.float()), name
    code, out, err = lota(capsys, "export-peft", path, "--base", base, "--out", tmp_path / "peft")
    assert code == 0 and "merge exact" in out, err
    model = load_model(str(base))  # the hot-swap bank behind eval --delta writes apply's weights
    with DeltaBank(model).add("d", path).using("d"):
        want = load_file(str(tmp_path / "applied0" / "model.safetensors"))
        for name, w in named_weights(model).items():
            assert torch.equal(w, want[name]), name
    data = ["--data", workdir / "a.jsonl", "--limit", "2", "--max-new-tokens", "2", "--json"]
    code, out, err = lota(capsys, "eval", base, "--delta", path, *data, "--quiet")
    assert code == 0, err
    code, applied_out, err = lota(capsys, "eval", tmp_path / "applied0", *data, "--quiet")
    assert json.loads(out)["score"] == json.loads(applied_out)["score"]
