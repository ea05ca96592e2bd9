"""KS-Lottery's statistics against scipy, the corrections, and a planted shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")

from lota.errors import InputError  # noqa: E402
from lota.ks import ks_pvalues, ks_statistics, select_tokens  # noqa: E402


def scipy_rows(a, b, mode="auto"):
    res = [scipy_stats.ks_2samp(x, y, method=mode) for x, y in zip(a.numpy(), b.numpy())]
    return np.array([r.statistic for r in res]), np.array([r.pvalue for r in res])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n1, n2", [(64, 64), (50, 37), (7, 200), (1, 5)])
def test_statistic_equals_scipy_bit_for_bit(n1, n2, dtype):
    g = torch.Generator().manual_seed(n1 * 1000 + n2)
    a = torch.randn(40, n1, generator=g, dtype=dtype)
    b = torch.randn(40, n2, generator=g, dtype=dtype) * 1.3 + 0.2
    a[0, : min(n1, n2)] = b[0, : min(n1, n2)]  # shared values across the samples
    a[1, 0] = -0.0
    b[1, 0] = 0.0
    want, _ = scipy_rows(a.double(), b.double())
    assert np.array_equal(ks_statistics(a, b).numpy(), want)


def test_statistic_with_ties_and_identical_rows_equals_scipy():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (60, 33), generator=g).float()  # heavy ties, shared across samples
    b = torch.randint(0, 5, (60, 20), generator=g).float()
    b[:5, :] = a[:5, :20]  # rows with identical values
    a[5:8] = 2.0  # constant rows
    want, _ = scipy_rows(a.double(), b.double())
    assert np.array_equal(ks_statistics(a, b, chunk=7).numpy(), want)
    want_asymp, _ = scipy_rows(a.double(), b.double(), "asymp")
    assert np.array_equal(ks_statistics(a, b, "asymp").numpy(), want_asymp)


@pytest.mark.parametrize(
    "mode, n1, n2", [("auto", 64, 64), ("exact", 30, 45), ("asymp", 64, 64), ("auto", 20, 11)]
)
def test_pvalues_match_scipy(mode, n1, n2):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(50, n1, generator=g)
    b = torch.randn(50, n2, generator=g) + torch.linspace(0, 1.5, 50)[:, None]
    d, want = scipy_rows(a.double(), b.double(), mode)
    stat = ks_statistics(a, b, mode)
    assert np.array_equal(stat.numpy(), d)
    got = ks_pvalues(stat, n1, n2, mode).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_bf16_rows_are_compared_exactly():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(20, 48, generator=g).to(torch.bfloat16)
    b = (a.float() + torch.randn(20, 48, generator=g) * 0.05).to(torch.bfloat16)
    want, _ = scipy_rows(a.double(), b.double())
    assert np.array_equal(ks_statistics(a, b).numpy(), want)


def test_planted_rows_are_found_exactly_with_bonferroni():
    g = torch.Generator().manual_seed(11)
    vocab, dim = 400, 256
    before = torch.randn(vocab, dim, generator=g) * 0.02
    after = before.clone()
    after += torch.randn(vocab, dim, generator=g) * 1e-4  # every row drifts a little
    planted = [3, 17, 64, 65, 200, 399]
    for j in planted:  # a real distribution shift: scale and offset
        after[j] = before[j] * 2.0 + 0.03
    sel = select_tokens(before, after, alpha=0.05, correction="bonferroni")
    assert sel.token_ids == planted
    assert sel.threshold == pytest.approx(0.05 / vocab)
    assert (sel.shift[planted] > sel.shift[[0, 1, 2]].max()).all()


def test_corrections_nest_and_top_n():
    g = torch.Generator().manual_seed(5)
    before = torch.randn(300, 64, generator=g)
    after = before + torch.randn(300, 64, generator=g) * torch.linspace(0, 1.2, 300)[:, None]
    none = set(select_tokens(before, after, 0.05, "none").token_ids)
    bh = set(select_tokens(before, after, 0.05, "bh").token_ids)
    bonf = set(select_tokens(before, after, 0.05, "bonferroni").token_ids)
    assert bonf <= bh <= none and len(bonf) < len(none)
    sel = select_tokens(before, after, 0.05, "none")
    p = sel.p_value.numpy()
    m = p.size  # Benjamini-Hochberg by its definition
    ranked = np.sort(p)
    passing = np.nonzero(ranked <= np.arange(1, m + 1) * 0.05 / m)[0]
    want = set(np.nonzero(p <= ranked[passing.max()])[0].tolist()) if passing.size else set()
    assert bh == want
    top = select_tokens(before, after, top=10)
    d = sel.statistic.numpy()
    assert len(top.token_ids) == 10 and min(d[top.token_ids]) >= np.sort(d)[-10]


def test_bad_settings_are_refused():
    a = torch.zeros(4, 8)
    with pytest.raises(InputError):
        select_tokens(a, torch.zeros(4, 9))
    with pytest.raises(InputError):
        select_tokens(a, a, alpha=1.5)
    with pytest.raises(InputError):
        select_tokens(a, a, correction="holm")
    with pytest.raises(InputError):
        select_tokens(a, a, top=5)


# ---------------------------------------------------------------------------- commands end to end
def _lota(capsys, *args):
    from lota.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--steps", "6", "--lr", "5e-2", "--batch-size", "4", "--quiet"]


def test_embedding_tuning_ks_partial_tuning_and_transfer(workdir, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    base = workdir / "base"
    emb = tmp_path / "emb"
    code, _, err = _lota(
        capsys,
        "adapt",
        base,
        "--data",
        workdir / "a.jsonl",
        "--method",
        "embeddings",
        "--out",
        emb,
        "--save-model",
        *SMALL,
    )
    assert code == 0, err
    w0, w1 = (
        load_file(str(base / "model.safetensors")),
        load_file(str(emb / "model" / "model.safetensors")),
    )
    name = "model.embed_tokens.weight"
    assert not torch.equal(w0[name], w1[name])
    assert all(torch.equal(w0[k], w1[k]) for k in w0 if k != name)  # only the embedding moved

    tickets = tmp_path / "tickets"
    code, out, err = _lota(
        capsys,
        "ks",
        base,
        emb / "model",
        "--alpha",
        "0.05",
        "--correction",
        "bonferroni",
        "--data",
        workdir / "a.jsonl",
        "--out",
        tickets,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    chosen = [r["token_id"] for r in report["selected"]]
    assert chosen and report["selected_count"] == len(chosen)
    assert all(r["count_in_data"] > 0 for r in report["selected"])  # unseen rows get no gradient
    for r in report["selected"]:
        assert (
            set(r) >= {"token_id", "token", "D", "p_value", "shift"} and r["p_value"] < 0.05 / 259
        )
    csv = (tickets / "tokens.csv").read_text().splitlines()
    assert csv[0].startswith("token_id,token,D,p_value,shift") and len(csv) == len(chosen) + 1

    ks_run = tmp_path / "ks"
    code, _, err = _lota(
        capsys,
        "adapt",
        base,
        "--data",
        workdir / "a.jsonl",
        "--method",
        "ks-lottery",
        "--tokens",
        tickets,
        "--out",
        ks_run,
        "--save-model",
        *SMALL,
    )
    assert code == 0, err
    w2 = load_file(str(ks_run / "model" / "model.safetensors"))
    changed = (w2[name] != w0[name]).any(1).nonzero().view(-1).tolist()
    assert changed and set(changed) <= set(chosen)
    others = torch.ones(w0[name].shape[0], dtype=torch.bool)
    others[chosen] = False
    assert torch.equal(w2[name][others], w0[name][others])  # every other row bit-identical
    assert all(torch.equal(w0[k], w2[k]) for k in w0 if k != name)

    moved = tmp_path / "transferred"
    code, _, err = _lota(
        capsys, "apply", base, tickets / "transfer.safetensors", "--out", moved, "--quiet"
    )
    assert code == 0, err
    w3 = load_file(str(moved / "model.safetensors"))
    torch.testing.assert_close(w3[name][chosen], w1[name][chosen], rtol=0, atol=1e-7)
    assert torch.equal(w3[name][others], w0[name][others])


def test_an_empty_selection_is_refused(workdir, tmp_path, capsys):
    from lota import format as fmt
    from lota.ticket import Ticket

    base = workdir / "base"
    code, _, err = _lota(capsys, "ks", base, base, "--out", tmp_path / "none")
    assert code == 2 and err.count("\n") == 1
    assert "no token row" in err and "--alpha" in err and "--top" in err
    assert not (tmp_path / "none").exists()

    name = "model.embed_tokens.weight"
    empty = Ticket({name: (259, 32)}, {name: torch.zeros(0, dtype=torch.long)})
    fmt.save(empty, tmp_path / "empty.safetensors")
    code, _, err = _lota(
        capsys,
        "adapt",
        base,
        "--data",
        workdir / "a.jsonl",
        "--method",
        "ks-lottery",
        "--tokens",
        tmp_path / "empty.safetensors",
        "--out",
        tmp_path / "run",
        *SMALL,
    )
    assert code == 2 and err.count("\n") == 1 and "selects no entry" in err and "--top" in err
    assert not (tmp_path / "run").exists()


def test_summaries_name_the_method_that_ran(workdir, tmp_path, capsys):
    base, data = workdir / "base", workdir / "a.jsonl"
    run = ["--data", data, "--steps", "1", "--batch-size", "4", "--quiet"]
    code, out, err = _lota(
        capsys, "adapt", base, *run, "--method", "embeddings", "--out", tmp_path / "e"
    )
    assert code == 0 and "adapt (embeddings):" in out, err
    code, _, err = _lota(
        capsys,
        "ks",
        base,
        base,
        "--top",
        "2",
        "--out",
        tmp_path / "ks",
    )
    assert code == 0, err
    code, out, err = _lota(
        capsys,
        "adapt",
        base,
        *run,
        "--method",
        "ks-lottery",
        "--tokens",
        tmp_path / "ks",
        "--out",
        tmp_path / "k",
    )
    assert code == 0 and "adapt (ks-lottery):" in out, err
