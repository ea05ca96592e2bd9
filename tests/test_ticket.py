"""The ticket: its invariant, sizes, set algebra, and the check of a file's ticket against a model."""

from __future__ import annotations

import pytest
import torch

from lota.delta import SparseDelta
from lota.errors import MismatchError
from lota.ticket import Ticket, TicketError, check_against

SHAPES = {"a": (2, 3), "b": (4,)}


def ticket(a, b, **kw) -> Ticket:
    return Ticket(
        shapes=dict(SHAPES),
        indices={"a": torch.tensor(a, dtype=torch.long), "b": torch.tensor(b, dtype=torch.long)},
        **kw,
    )


def test_sizes_count_every_eligible_entry_including_empty_tensors():
    t = ticket([0, 5], [])
    assert t.numel == 10 and t.nnz == 2 and t.density == pytest.approx(0.2)
    assert t.names == ["a", "b"] and t.tensor_numel("a") == 6
    assert Ticket(shapes={}, indices={}).density == 0.0


def test_summary_states_entries_share_and_tensors():
    assert ticket([0, 5], [3]).summary() == "3 of 10 entries (30 %) in 2 tensors"


def test_validate_names_the_tensor_that_breaks_the_invariant():
    t = ticket([0, 5], [1, 2])
    t.indices["b"] = torch.tensor([2, 1])
    with pytest.raises(TicketError, match="indices of 'b' are not strictly increasing"):
        t.validate()
    t.indices["b"] = torch.tensor([4])
    with pytest.raises(TicketError, match="indices of 'b' reach position 4, the tensor has 4"):
        t.validate()
    del t.indices["b"]
    with pytest.raises(TicketError, match="shapes and indices disagree"):
        t.validate()


def test_construction_refuses_broken_indices():
    with pytest.raises(TicketError, match="negative position"):
        ticket([-1, 2], [])
    with pytest.raises(TicketError, match="not int64"):
        Ticket(shapes={"a": (3,)}, indices={"a": torch.tensor([0.0, 1.0])})


def test_dense_masks_mark_exactly_the_ticket():
    m = ticket([0, 5], [3]).dense_masks()
    assert m["a"].shape == (2, 3) and m["a"].sum() == 2 and m["a"][0, 0] and m["a"][1, 2]
    assert m["b"].tolist() == [False, False, False, True]


def test_union_covers_the_given_shapes_only_and_dedupes():
    u = Ticket.union([ticket([0, 5], [1]), ticket([1, 5], [1, 3])], {"a": (2, 3)})
    assert list(u.shapes) == ["a"] and u.indices["a"].tolist() == [0, 1, 5]
    assert Ticket.union([], SHAPES).nnz == 0


def test_complement_is_disjoint_and_fills_the_tensors():
    t = ticket([0, 5], [3])
    c = t.complement()
    assert c.indices["a"].tolist() == [1, 2, 3, 4] and c.indices["b"].tolist() == [0, 1, 2]
    assert t.overlap(c) == 0 and t.nnz + c.nnz == t.numel


def test_overlap_counts_shared_entries():
    assert ticket([0, 5], [1, 2]).overlap(ticket([5], [0, 1, 2])) == 3
    assert ticket([], []).overlap(ticket([0], [0])) == 0


def test_ticket_property_gives_the_ticket_of_a_ticket_and_of_a_delta():
    t = ticket([0], [1])
    d = SparseDelta(ticket=t, values={"a": torch.ones(1), "b": torch.ones(1)})
    assert t.ticket is t and d.ticket is t


def test_check_against_accepts_a_subset_of_the_targets():
    check_against({"a": (2, 3), "b": (4,), "c": (1,)}, ticket([0], []), "ticket")


def test_check_against_names_a_tensor_the_targets_lack():
    with pytest.raises(MismatchError) as e:
        check_against({"a": (2, 3)}, ticket([0], []), "protect file")
    assert e.value.what == "protect file has tensor 'b' that the model's targets do not have"
    assert e.value.fix == "use a file made for this architecture and the same --targets"


def test_check_against_names_a_tensor_of_another_shape():
    with pytest.raises(MismatchError) as e:
        check_against({"a": (3, 2), "b": (4,)}, ticket([0], []))
    assert e.value.what == "ticket tensor 'a' has shape [2, 3], the model has [3, 2]"
    assert e.value.fix == "use a file made for this architecture"
