"""Tied input and output embeddings: KS-Lottery, embedding tuning, apply, eval and hot-swap.

A change of a tied input embedding changes the input embedding alone: the output head gets its own
copy of the base's embedding (frozen, bit-identical) and the model is written untied
(``tie_word_embeddings`` false, an ``lm_head.weight`` of its own). Deltas keep the tied base's
fingerprint, so they apply to the tied base folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lota
from lota import format as fmt
from lota.delta import SparseDelta, apply_delta_
from lota.hotswap import DeltaBank
from lota.models import load_model, load_tokenizer, save_model
from lota.targets import named_weights, tied_embedding, untie_embeddings
from lota.toy import tiny_llama
from lota.weights import WeightReader, model_fingerprint

from .conftest import entry_bits
from .test_cli import lota as run

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SMALL = ["--steps", "6", "--lr", "5e-2", "--batch-size", "4", "--quiet"]


def tied_llama(seed: int = 0):
    model = tiny_llama(hidden=32, layers=2, heads=2, seed=seed)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def tied(workdir, tmp_path_factory) -> Path:
    """A tiny Llama folder whose output head is tied to its input embedding."""
    folder = tmp_path_factory.mktemp("tied") / "base"
    save_model(tied_llama(), load_tokenizer(str(workdir / "base")), folder)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"]
    assert HEAD not in load_file(str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def emb_run(tied, workdir, tmp_path_factory) -> Path:
    """``lota adapt --method embeddings --save-model`` of the tied base."""
    out = tmp_path_factory.mktemp("tied_runs") / "emb"
    from lota.cli import main

    code = main(
        [str(a) for a in ("adapt", tied, "--data", workdir / "a.jsonl", "--method", "embeddings")]
        + ["--out", str(out), "--save-model", *SMALL]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def applied(tied, emb_run) -> Path:
    """``lota apply`` of the embedding run's delta to the tied base."""
    from lota.cli import main

    out = emb_run.parent / "applied"
    assert main([str(a) for a in ("apply", tied, emb_run / "delta.safetensors", "--out", out)]) == 0
    return out


def logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the folder as plain transformers loads it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 20, 40, 60, 80, 100, 120, 140]])


# ---------------------------------------------------------------------------- training
def test_embedding_tuning_trains_only_the_input_embedding(tied, emb_run):
    info = json.loads((emb_run / "summary.json").read_text())
    assert info["untied_head"] == HEAD
    d = fmt.load(emb_run / "delta.safetensors")
    assert d.names == [EMB] and d.base_fingerprint == WeightReader(str(tied)).fingerprint()
    w0 = load_file(str(tied / "model.safetensors"))
    w1 = load_file(str(emb_run / "model" / "model.safetensors"))
    assert set(w1) == set(w0) | {HEAD}
    assert not torch.equal(w1[EMB], w0[EMB])
    assert torch.equal(entry_bits(w1[HEAD]), entry_bits(w0[EMB]))  # the head: the base's copy
    assert all(torch.equal(entry_bits(w0[n]), entry_bits(w1[n])) for n in w0 if n != EMB)
    config = json.loads((emb_run / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    saved = json.loads((emb_run / "model" / "lota.json").read_text())
    assert saved["untied_head"] == HEAD and saved["base_fingerprint"] == d.base_fingerprint


def test_the_saved_folder_loads_untied_and_equals_lota_apply(tied, emb_run, applied):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(emb_run / "model"))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    a = load_file(str(applied / "model.safetensors"))
    b = load_file(str(emb_run / "model" / "model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(entry_bits(a[n]), entry_bits(b[n])) for n in a if n != EMB)
    # a dense delta holds the float32 difference: base + difference is the trained value to
    # within the roundings of the two operations (bit for bit for a sparse run: ks-lottery test)
    w0 = load_file(str(tied / "model.safetensors"))[EMB]
    bound = torch.finfo(torch.float32).eps * (b[EMB].abs() + w0.abs())
    assert bool(((a[EMB] - b[EMB]).abs() <= bound).all())
    assert json.loads((applied / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads((applied / "lota.json").read_text())["untied_head"] == HEAD
    torch.testing.assert_close(logits(applied, IDS), logits(emb_run / "model", IDS))
    # a tied model changed through the tie (the head too) computes something else
    through = load_model(str(tied))
    apply_delta_(named_weights(through), fmt.load(emb_run / "delta.safetensors"))
    with torch.no_grad():
        assert not torch.allclose(through(IDS).logits, logits(applied, IDS), atol=1e-3)


def test_a_zero_delta_on_the_embedding_gives_the_base_logits(tied, emb_run, tmp_path, capsys):
    d = fmt.load(emb_run / "delta.safetensors")
    zero = SparseDelta(d.ticket, {EMB: torch.zeros_like(d.values[EMB])})
    fmt.save(zero, tmp_path / "zero.safetensors")
    out = tmp_path / "zero"
    code, _, err = run(capsys, "apply", tied, tmp_path / "zero.safetensors", "--out", out)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(logits(out, IDS), logits(tied, IDS))


def test_ks_and_ks_lottery_on_a_tied_base(tied, emb_run, workdir, tmp_path, capsys):
    ks = tmp_path / "ks"
    code, _, err = run(capsys, "ks", tied, emb_run / "model", "--top", "5", "--out", ks, "--quiet")
    assert code == 0, err
    ticket, transfer = fmt.load(ks / "ticket.safetensors"), fmt.load(ks / "transfer.safetensors")
    rows = sorted({int(i) // 32 for i in ticket.indices[EMB]})
    assert ticket.names == [EMB] and len(rows) == 5
    assert transfer.names == [EMB]  # the head was kept frozen: the delta holds the rows alone
    assert transfer.base_fingerprint == WeightReader(str(tied)).fingerprint()

    moved = tmp_path / "moved"
    code, _, err = run(capsys, "apply", tied, ks / "transfer.safetensors", "--out", moved)
    assert code == 0, err
    w0, w1 = load_file(str(tied / "model.safetensors")), load_file(str(moved / "model.safetensors"))
    tuned = load_file(str(emb_run / "model" / "model.safetensors"))
    assert torch.equal(w1[HEAD], w0[EMB])
    torch.testing.assert_close(w1[EMB][rows], tuned[EMB][rows], rtol=0, atol=1e-7)
    others = torch.ones(w0[EMB].shape[0], dtype=torch.bool)
    others[rows] = False
    assert torch.equal(w1[EMB][others], w0[EMB][others])

    out = tmp_path / "ks_run"
    code, _, err = run(
        capsys, "adapt", tied, "--data", workdir / "a.jsonl", "--method", "ks-lottery",
        "--tokens", ks, "--out", out, "--save-model", *SMALL,
    )  # fmt: skip
    assert code == 0, err
    w2 = load_file(str(out / "model" / "model.safetensors"))
    changed = (w2[EMB] != w0[EMB]).any(1).nonzero().view(-1).tolist()
    assert changed and set(changed) <= set(rows)
    assert torch.equal(entry_bits(w2[HEAD]), entry_bits(w0[EMB]))
    assert all(torch.equal(w0[n], w2[n]) for n in w0 if n != EMB)
    code, _, err = run(
        capsys, "apply", tied, out / "delta.safetensors", "--out", tmp_path / "ks_applied"
    )
    assert code == 0, err
    w3 = load_file(str(tmp_path / "ks_applied" / "model.safetensors"))
    assert set(w3) == set(w2)
    assert all(torch.equal(entry_bits(w3[n]), entry_bits(w2[n])) for n in w2)  # bit for bit


def test_ks_transfer_from_a_tied_tuned_model_carries_the_head(tied, tmp_path, capsys):
    """A tied fine-tune changed its head through the tie: the transfer delta holds that change
    under the head's name too, and applying it gives the tuned rows in both tensors."""
    tuned = tied_llama()
    with torch.no_grad():
        tuned.model.embed_tokens.weight[[5, 9]] *= 2.0  # exact: 2w - w + w = 2w
    save_model(tuned, load_tokenizer(str(tied)), tmp_path / "tuned")
    ks = tmp_path / "ks"
    code, _, err = run(capsys, "ks", tied, tmp_path / "tuned", "--top", "2", "--out", ks)
    assert code == 0, err
    transfer = fmt.load(ks / "transfer.safetensors")
    assert sorted(transfer.names) == [HEAD, EMB]
    assert torch.equal(transfer.indices[HEAD], transfer.indices[EMB])
    assert torch.equal(transfer.values[HEAD], transfer.values[EMB])
    code, _, err = run(capsys, "apply", tied, ks / "transfer.safetensors", "--out", tmp_path / "m")
    assert code == 0, err
    w = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = tuned.model.embed_tokens.weight.detach()
    assert torch.equal(w[EMB], want) and torch.equal(w[HEAD], want)
    # lota delta on the same ticket is the same task vector
    out = tmp_path / "d.safetensors"
    code, _, err = run(
        capsys, "delta", tied, tmp_path / "tuned", "--ticket", ks / "ticket.safetensors",
        "--targets", "embed", "--values-dtype", "float32", "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    d = fmt.load(out)
    assert sorted(d.names) == [HEAD, EMB]
    assert all(torch.equal(d.values[n], transfer.values[n]) for n in d.names)


# ---------------------------------------------------------------------------- using the delta
def test_eval_with_the_delta_equals_eval_of_the_applied_folder(
    tied, emb_run, applied, workdir, capsys
):
    args = ["--data", workdir / "a.jsonl", "--limit", "6", "--max-new-tokens", "6", "--json"]
    code, out, err = run(capsys, "eval", applied, *args, "--quiet")
    assert code == 0, err
    folder = json.loads(out)
    code, out, err = run(
        capsys, "eval", tied, "--delta", emb_run / "delta.safetensors", *args, "--quiet"
    )
    assert code == 0, err
    switched = json.loads(out)
    assert folder["examples"] == switched["examples"] and folder["n"] == 6


def test_the_bank_refuses_a_tied_embedding_and_equals_apply_once_untied(tied, emb_run, applied):
    d = fmt.load(emb_run / "delta.safetensors")
    model = load_model(str(tied))
    base_fp = model_fingerprint(model)
    with pytest.raises(lota.InputError) as e:
        DeltaBank(model).add("emb", d)
    line = e.value.line()
    assert len(line.splitlines()) == 1 and EMB in line and HEAD in line and "untie" in line

    assert lota.untie_embeddings(model) == HEAD and tied_embedding(model) is None
    assert model_fingerprint(model) == base_fp  # the copy stands for the tie it replaced
    bank = DeltaBank(model).add("emb", d)
    bank.activate("emb")
    want = WeightReader(str(applied))
    now = named_weights(model)
    assert set(now) == set(want.shapes)
    for name, w in now.items():
        assert torch.equal(entry_bits(w), entry_bits(want.get(name))), name
    assert model_fingerprint(model) == want.fingerprint()  # the embedding moved: the head counts
    bank.deactivate()
    assert model_fingerprint(model) == base_fp


def test_untying_copies_the_embedding_bit_for_bit_and_only_where_asked():
    model = tied_llama().to(torch.bfloat16)
    fp = model_fingerprint(model)
    assert untie_embeddings(model, ["model.layers.0.mlp.up_proj.weight"]) is None
    assert tied_embedding(model) == (EMB, HEAD)
    assert untie_embeddings(model, [EMB]) == HEAD
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert head is not emb and not head.requires_grad and head.dtype == torch.bfloat16
    assert torch.equal(entry_bits(head), entry_bits(emb)) and not model.config.tie_word_embeddings
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        emb[3, 0] += 1.0
    assert model_fingerprint(model) != fp


def test_lotto_chains_across_the_untie_apply_and_switch_in(tied, workdir, tmp_path, capsys):
    """A run on top of an untied folder (even one whose embedding change is zero) and a run on
    the embedding of a tied folder both apply as chains to the tied base, and switch in (eval)."""
    data = ["--data", workdir / "a.jsonl"]
    steps = ["--steps", "2", "--lr", "5e-2", "--batch-size", "4", "--save-model"]

    def adapt(model, out, *extra):
        code, _, err = run(capsys, "adapt", model, *data, "--out", out, *extra, "--quiet")
        assert code == 0, err
        return out

    code, _, err = run(capsys, "ks", tied, tied, "--top", "3", "--out", tmp_path / "ks")
    assert code == 0, err
    ks = ["--method", "ks-lottery", "--tokens", tmp_path / "ks", *steps]
    lotto = [*steps, "--calibration-steps", "1"]
    # rows 0-2 (<pad>, <s>, </s>) get no gradient: the untied folder equals the tied base
    a = adapt(tied, tmp_path / "a", *ks)
    assert not fmt.load(a / "delta.safetensors").values[EMB].any()
    b = adapt(a / "model", tmp_path / "b", "--protect", a / "delta.safetensors", *lotto)
    c = adapt(tied, tmp_path / "c", *lotto)  # the blocks only: c's folder stays tied
    assert json.loads((c / "model" / "config.json").read_text())["tie_word_embeddings"]
    d = adapt(c / "model", tmp_path / "d", *ks)
    for first, second in ((a, b), (c, d)):
        out = tmp_path / f"{first.name}{second.name}"
        deltas = [first / "delta.safetensors", second / "delta.safetensors"]
        code, _, err = run(capsys, "apply", tied, *deltas, "--out", out, "--quiet")
        assert code == 0, err
        got = load_file(str(out / "model.safetensors"))
        want = load_file(str(second / "model" / "model.safetensors"))
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in got)
        args = ["--data", workdir / "a.jsonl", "--limit", "2", "--max-new-tokens", "2", "--quiet"]
        code, _, err = run(capsys, "eval", tied, "--delta", deltas[0], "--delta", deltas[1], *args)
        assert code == 0, err
