"""Each list of names the command line offers is kept once, in ``lota.names``: the options
list it (without importing torch), and the module that implements the names registers or builds
exactly those."""

from __future__ import annotations

import pytest
import torch

from lota import choice, evaluate, ks, names, selection, train
from lota import format as fmt
from lota import merge_methods as merge_module
from lota import settings as decl
from lota.delta import SparseDelta
from lota.errors import InputError
from lota.ticket import Ticket


def test_method_names_are_the_registered_methods():
    # one list: the option offers it, and merge registers every name in it and no other
    assert decl.MERGE_METHODS is names.MERGE_METHODS
    assert tuple(sorted(merge_module.METHODS)) == names.MERGE_METHODS
    with pytest.raises(ValueError, match="'mean' is not listed"):
        merge_module.merge_method("mean")


def test_optimizer_names_are_the_trainers():
    # one list: the option offers it, and the trainer builds every name in it
    assert decl.OPTIMIZERS is names.OPTIMIZERS is train.OPTIMIZERS
    for name in names.OPTIMIZERS:
        p = torch.nn.Parameter(torch.zeros(1))
        train.make_optimizer([p], train.TrainSettings(lr=0.1, steps=1, optimizer=name))


def test_every_listed_values_dtype_is_one_lota_writes(tmp_path):
    # one list: --values-dtype offers it, and lota.save stores values in each of its dtypes
    t = Ticket({"w": (3, 4)}, {"w": torch.tensor([1, 5])})
    for name in ("auto", *names.VALUE_DTYPES):
        path = tmp_path / f"{name}.lota"
        fmt.save(SparseDelta(t, {"w": torch.tensor([1.0, -2.0])}), path, values_dtype=name)
        assert fmt.load(path).values["w"].tolist() == [1.0, -2.0]
        if name != "auto":
            assert fmt.describe(path)["values_dtype"] == [name]


def test_selector_and_metric_names_are_the_registered_ones():
    assert tuple(selection.SELECTORS) == names.SELECTORS
    # the generation metrics, then the one that scores options by log-likelihood
    assert (*evaluate.METRICS, choice.METRIC) == names.METRICS
    with pytest.raises(ValueError, match="'smallest' is not listed"):
        selection.selector("smallest")
    with pytest.raises(ValueError, match="'bleu' is not listed"):
        evaluate.metric("bleu")
    with pytest.raises(ValueError, match="scores no generations"):
        evaluate.metric("choice")


def test_ks_corrections_and_modes_are_the_ones_ks_takes():
    assert ks.CORRECTIONS is names.KS_CORRECTIONS
    d = torch.tensor([0.1, 0.5])
    for mode in names.KS_MODES:
        assert torch.isfinite(ks.ks_pvalues(d, 5, 7, mode)).all()
    with pytest.raises(InputError, match="unknown p-value mode"):
        ks.ks_pvalues(d, 5, 7, "fast")
