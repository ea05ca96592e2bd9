"""The sparse delta: values aligned with a ticket, applied to weights at its entries only."""

from __future__ import annotations

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
