"""``lota merge``: every method against a dense reference (PEFT's merge utilities where they
exist), the union support, seeds, model-folder inputs, overlap reports and mismatched inputs."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from peft.utils import merge_utils

from lota import format as fmt
from lota.cli import main
from lota.delta import SparseDelta
from lota.merge import MergeSettings, merge
from lota.merge_methods import METHODS, TensorInputs, random_keep
from lota.ticket import Ticket

SHAPES = {"a.weight": (12, 10), "b.weight": (7, 9), "c.weight": (5, 4)}
FP = "blake2b:" + "ab" * 16


def make_delta(seed: int, density: float, fingerprint: str = FP, shapes=SHAPES) -> SparseDelta:
    g = torch.Generator().manual_seed(seed)
    indices, values = {}, {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        idx = torch.randperm(numel, generator=g)[: max(1, int(density * numel))].sort().values
        indices[name] = idx
        values[name] = torch.randn(idx.numel(), generator=g)
    return SparseDelta(Ticket(dict(shapes), indices, base_fingerprint=fingerprint), values)


@pytest.fixture
def files(tmp_path):
    paths = []
    for i, density in enumerate([0.3, 0.5, 0.2]):
        p = tmp_path / f"d{i}.safetensors"
        fmt.save(make_delta(i, density), p)
        paths.append(str(p))
    return paths


def dense(paths) -> list[dict[str, torch.Tensor]]:
    return [fmt.load(p).to_dense() for p in paths]


def merged_dense(d: SparseDelta) -> dict[str, torch.Tensor]:
    return d.to_dense()


def run(paths, method, **kw) -> SparseDelta:
    given = set(kw.pop("given", set(kw) - {"lam"}))
    if "lam" in kw:
        given.add("lambda")
    return merge(paths, MergeSettings(method=method, given=given, **kw), show_progress=False)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def union_support(paths, name):
    idx = torch.cat([fmt.load(p).ticket.indices[name] for p in paths])
    return torch.unique(idx)


def test_add_is_the_plain_sum_on_the_union_support(files):
    out = run(files, "add")
    for name in SHAPES:
        assert torch.equal(out.ticket.indices[name], union_support(files, name))
        close(merged_dense(out)[name], sum(d[name] for d in dense(files)))
    assert out.base_fingerprint == FP


@pytest.mark.parametrize("lam", [1.0, 0.4])
def test_task_arithmetic_equals_peft(files, lam):
    w = [1.0, 0.5, -0.25]
    out = run(files, "task-arithmetic", weights=w, lam=lam)
    ds = dense(files)
    for name in SHAPES:
        want = merge_utils.task_arithmetic([d[name] for d in ds], torch.tensor(w)) * lam
        close(merged_dense(out)[name], want)


@pytest.mark.parametrize("density", ["0.1", "0.25", "0.6"])
def test_ties_equals_peft(files, density):
    w = [1.0, 0.7, 1.3]
    out = run(files, "ties", weights=w, density=density, lam=0.8)
    ds = dense(files)
    for name in SHAPES:
        want = merge_utils.ties([d[name] for d in ds], torch.tensor(w), float(density)) * 0.8
        close(merged_dense(out)[name], want)


def _masks(paths, drop, seed):
    """The keep masks lota draws, rebuilt from its building block, per tensor and input."""
    out = {}
    for name, shape in SHAPES.items():
        union = union_support(paths, name)
        present = torch.zeros(len(paths), union.numel(), dtype=torch.bool)
        for j, p in enumerate(paths):
            present[j] = torch.isin(union, fmt.load(p).ticket.indices[name])
        inp = TensorInputs(name, math.prod(shape), union, present.float(), present, torch.ones(3))
        inp.seed = seed
        keep = random_keep(inp, 1.0 - drop)
        masks = []
        for j in range(len(paths)):
            m = torch.zeros(math.prod(shape))
            m[union[keep[j]]] = 1.0
            masks.append(m.view(shape))
        out[name] = masks
    return out


@pytest.mark.parametrize("method", ["dare-linear", "dare-ties"])
def test_dare_equals_peft_with_the_same_drop_mask(files, method, monkeypatch):
    drop, seed, w = 0.6, 7, [1.0, 0.5, 2.0]
    out = run(files, method, weights=w, drop=str(drop), seed=seed)
    masks = _masks(files, drop, seed)
    ds = dense(files)
    for name in SHAPES:
        pending = iter(masks[name])

        def fake_prune(tensor, density, method, rescale=False, pending=pending):
            assert method == "random" and rescale and density == pytest.approx(1 - drop)
            return tensor * next(pending) / density

        monkeypatch.setattr(merge_utils, "prune", fake_prune)
        fn = merge_utils.dare_linear if method == "dare-linear" else merge_utils.dare_ties
        close(merged_dense(out)[name], fn([d[name] for d in ds], torch.tensor(w), 1 - drop))


def test_dare_is_reproducible_by_seed_and_drops_at_the_rate(tmp_path):
    shapes = {"big.weight": (300, 200)}
    paths = []
    for i in range(2):
        p = tmp_path / f"big{i}.safetensors"
        fmt.save(make_delta(10 + i, 0.5, shapes=shapes), p)
        paths.append(str(p))
    a = run(paths, "dare-linear", drop="0.9", seed=3)
    b = run(paths, "dare-linear", drop="0.9", seed=3)
    c = run(paths, "dare-linear", drop="0.9", seed=4)
    assert torch.equal(a.values["big.weight"], b.values["big.weight"])
    assert not torch.equal(a.values["big.weight"], c.values["big.weight"])
    entries = sum(fmt.load(p).nnz for p in paths)  # 60,000 present entries over both inputs
    kept = run(paths, "dare-linear", drop="0.9", seed=3, weights=[1.0, 0.0])
    kept_b = run(paths, "dare-linear", drop="0.9", seed=3, weights=[0.0, 1.0])
    n_kept = int((kept.values["big.weight"] != 0).sum() + (kept_b.values["big.weight"] != 0).sum())
    sd = math.sqrt(entries * 0.1 * 0.9)
    assert abs(n_kept - 0.1 * entries) < 5 * sd


def test_breadcrumbs_equals_dense_reference(files):
    w, gamma, density = [1.0, -0.5, 0.8], "0.05", "0.2"
    out = run(files, "breadcrumbs", weights=w, gamma=gamma, density=density)
    for name, shape in SHAPES.items():
        numel = math.prod(shape)
        top = math.floor(Fraction(gamma) * numel)
        k = math.floor(Fraction(density) * numel)
        want = torch.zeros(shape)
        for wi, d in zip(w, dense(files)):
            flat = d[name].reshape(-1)
            order = torch.sort(-flat.abs(), stable=True).indices
            keep = torch.zeros(numel, dtype=torch.bool)
            keep[order[top : top + k]] = True
            want += wi * (flat * keep).view(shape)
        close(merged_dense(out)[name], want)


def test_della_equals_dense_reference(files):
    drop, eps, seed, w = 0.5, 0.2, 11, [1.0, 1.0, 0.5]
    out = run(files, "della", weights=w, drop=str(drop), epsilon=str(eps), seed=seed)
    for name, shape in SHAPES.items():
        union = union_support(files, name)
        scaled = []
        for j, p in enumerate(files):
            d = fmt.load(p)
            idx, v = d.ticket.indices[name], d.values[name]
            n = idx.numel()
            rank = torch.empty(n)
            rank[torch.sort(v.abs(), stable=True).indices] = torch.arange(n, dtype=torch.float32)
            p_drop = (drop + eps) - 2 * eps * rank / (n - 1)
            probe = TensorInputs(name, 0, union, torch.zeros(1), torch.zeros(1), torch.ones(1))
            probe.seed = seed
            draws = torch.rand(n, generator=probe.generator(j))
            keep = draws < 1 - p_drop
            full = torch.zeros(math.prod(shape))
            full[idx[keep]] = v[keep] / (1 - p_drop[keep])
            scaled.append(full.view(shape))
        stacked = torch.stack(scaled)
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = stacked.sign() == sign
        want = (stacked * torch.tensor(w).view(-1, 1, 1) * agree).sum(0) / agree.sum(0).clamp(min=1)
        close(merged_dense(out)[name], want)


def test_stack_sums_disjoint_deltas_and_refuses_overlap(tmp_path, files, capsys):
    a, b = make_delta(1, 0.3), make_delta(2, 0.3)
    for name in SHAPES:  # make b disjoint from a
        keep = ~torch.isin(b.ticket.indices[name], a.ticket.indices[name])
        b.ticket.indices[name] = b.ticket.indices[name][keep]
        b.values[name] = b.values[name][keep]
    fmt.save(a, tmp_path / "a.safetensors")
    fmt.save(b, tmp_path / "b.safetensors")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    out = run(paths, "stack")
    for name in SHAPES:
        close(merged_dense(out)[name], a.to_dense()[name] + b.to_dense()[name])
    code = main(["merge", *files, "--method", "stack", "--out", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "held by more than one input" in err and err.count("\n") == 1
    assert not (tmp_path / "s.safetensors").exists()


def test_every_registered_method_runs_through_the_cli(files, tmp_path, capsys):
    for method in METHODS:
        if method == "stack":
            continue
        out = tmp_path / f"{method}.safetensors"
        assert main(["merge", *files, "--method", method, "--out", str(out), "--quiet"]) == 0
        d = fmt.load(out)
        assert d.base_fingerprint == FP and d.meta["config"]["method"] == method
        for name in SHAPES:
            assert torch.equal(d.ticket.indices[name], union_support(files, name))
            assert torch.isfinite(d.values[name]).all()
    capsys.readouterr()


def test_model_folders_merge_as_their_dense_deltas(workdir, tmp_path):
    from lota.models import load_model, load_tokenizer, save_model
    from lota.targets import named_weights, resolve_targets

    base = workdir / "base"
    model = load_model(str(base))
    targets = resolve_targets(model)
    w0 = {n: t.detach().clone() for n, t in named_weights(model).items()}
    tuned = []
    for i in range(2):
        m = load_model(str(base))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in named_weights(m).values():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        save_model(m, load_tokenizer(str(base)), tmp_path / f"ft{i}")
        tuned.append({n: t.detach().clone() for n, t in named_weights(m).items()})
    settings = MergeSettings(
        method="ties", weights=[1.0, 0.5], density="0.3", given={"weights", "density"}
    )
    out = merge(
        [str(tmp_path / "ft0"), str(tmp_path / "ft1")],
        settings,
        base=str(base),
        show_progress=False,
    )
    assert set(out.ticket.shapes) == set(targets)
    from lota.weights import WeightReader

    assert out.base_fingerprint == WeightReader(str(base)).fingerprint()
    for name in targets:
        deltas = [t[name] - w0[name] for t in tuned]
        want = merge_utils.ties(deltas, torch.tensor([1.0, 0.5]), 0.3)
        close(out.to_dense()[name], want)
    # and written as a model folder
    code = main(
        [
            "merge",
            str(tmp_path / "ft0"),
            str(tmp_path / "ft1"),
            "--base",
            str(base),
            "--method",
            "ties",
            "--weights",
            "1,0.5",
            "--density",
            "0.3",
            "--out-model",
            str(tmp_path / "m"),
            "--quiet",
        ]
    )
    assert code == 0
    merged = named_weights(load_model(str(tmp_path / "m")))
    for name in targets:
        close(merged[name], w0[name] + out.to_dense()[name])


def test_inspect_reports_overlap_and_sign_conflicts(files, capsys):
    assert main(["inspect", *files[:2], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    pair = info["overlap"][0]
    a, b = fmt.load(files[0]), fmt.load(files[1])
    shared = conflicts = 0
    for name in SHAPES:
        ia, ib = a.ticket.indices[name], b.ticket.indices[name]
        common = ia[torch.isin(ia, ib)]
        shared += common.numel()
        va = a.to_dense()[name].reshape(-1)[common]
        vb = b.to_dense()[name].reshape(-1)[common]
        conflicts += int((va.sign() * vb.sign() < 0).sum())
    assert pair["shared"] == shared > 0 and pair["sign_conflicts"] == conflicts > 0
    assert [f["path"] for f in info["files"]] == files[:2]
    assert main(["inspect", *files[:2]]) == 0
    assert f"{shared:,} shared entries" in capsys.readouterr().out


def test_inspect_gives_recall_and_density_by_layer_and_kind(tmp_path, capsys):
    """Two tickets on Llama-like names: each one's share held by the other, and the density of
    each by layer and by tensor kind, from the entries themselves."""
    from lota.compare import layer_and_kind

    shapes = {
        "model.embed_tokens.weight": (8, 4),
        "model.layers.0.self_attn.q_proj.weight": (6, 5),
        "model.layers.0.mlp.up_proj.weight": (7, 5),
        "model.layers.1.self_attn.q_proj.weight": (6, 5),
        "model.layers.1.mlp.experts.3.up_proj.weight": (7, 5),
    }
    paths = []
    for seed, density in ((0, 0.3), (1, 0.6)):
        p = tmp_path / f"t{seed}.safetensors"
        fmt.save(make_delta(seed, density, shapes=shapes), p)
        paths.append(str(p))
    assert main(["inspect", *paths, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    a, b = (fmt.load(p).ticket for p in paths)
    shared = sum(int(torch.isin(a.indices[n], b.indices[n]).sum()) for n in shapes)
    pair = info["overlap"][0]
    assert pair["a_held_by_b"] == shared / a.nnz and pair["b_held_by_a"] == shared / b.nnz
    assert 0 < shared < min(a.nnz, b.nnz)
    for ticket, desc in zip((a, b), info["files"]):
        for table, part in (("by_layer", 0), ("by_kind", 1)):
            expected = {}
            for n, shape in shapes.items():
                row = expected.setdefault(layer_and_kind(n)[part], [0, 0])
                row[0] += ticket.indices[n].numel()
                row[1] += shape[0] * shape[1]
            assert {k: (r["nnz"], r["numel"]) for k, r in desc[table].items()} == {
                k: tuple(v) for k, v in expected.items()
            }
            assert all(r["density"] == r["nnz"] / r["numel"] for r in desc[table].values())
        assert list(desc["by_layer"]) == ["0", "1", "-"]
        assert set(desc["by_kind"]) == {"embed_tokens", "q_proj", "up_proj"}
    assert main(["inspect", *paths]) == 0
    text = capsys.readouterr().out
    assert "recall" in text and "density by layer:" in text and "density by tensor kind:" in text
    assert layer_and_kind("transformer.h.2.attn.c_attn.bias") == ("2", "c_attn.bias")


def refused(capsys, *argv) -> str:
    code = main(["merge", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lota: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_mismatched_and_bad_inputs_are_refused(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    other = tmp_path / "other.safetensors"
    fmt.save(make_delta(5, 0.3, fingerprint="blake2b:" + "cd" * 16), other)
    assert "other.safetensors" in refused(capsys, files[0], other, "--out", out)
    wrong = tmp_path / "wrong.safetensors"
    fmt.save(make_delta(5, 0.3, shapes={"a.weight": (10, 12)}), wrong)
    assert "shape" in refused(capsys, files[0], wrong, "--out", out)
    ticket = tmp_path / "ticket.safetensors"
    fmt.save(make_delta(6, 0.3).ticket, ticket)
    assert "ticket" in refused(capsys, files[0], ticket, "--out", out)
    assert "at least two" in refused(capsys, files[0], "--out", out)
    assert "unknown merge method" in refused(capsys, *files, "--method", "average", "--out", out)
    assert "does not use --density" in refused(capsys, *files, "--density", "0.3", "--out", out)
    assert "weights" in refused(
        capsys, *files, "--method", "task-arithmetic", "--weights", "1,2", "--out", out
    )
    assert "outside" in refused(
        capsys, *files, "--method", "ties", "--density", "1.5", "--out", out
    )
    assert "outside" in refused(
        capsys, *files, "--method", "dare-linear", "--drop", "1", "--out", out
    )
    assert "epsilon" in refused(
        capsys, *files, "--method", "della", "--drop", "0.9", "--epsilon", "0.2", "--out", out
    )
    assert "not a number" in refused(
        capsys, *files, "--method", "ties", "--density", "inf", "--out", out
    )
    assert "--base" in refused(capsys, files[0], tmp_path, "--out", out)
    assert "not found" in refused(capsys, files[0], tmp_path / "missing.safetensors", "--out", out)
    assert not out.exists()


# ---------------------------------------------------------------------------- refused results
@pytest.mark.parametrize(
    "option, value",
    [
        ("--weights", "1e39,1,1"),
        ("--weights", "1,-1e39,1"),
        ("--lambda", "1e39"),
        ("--lambda", "-inf"),
        ("--lambda", "nan"),
    ],
)
def test_weights_and_lambda_beyond_float32_are_refused_up_front(
    files, tmp_path, capsys, option, value
):
    out = tmp_path / "m.safetensors"
    err = refused(capsys, *files, "--method", "task-arithmetic", option, value, "--out", out)
    assert f"{option}:" in err and "float32" in err
    assert not out.exists()


def constant_files(tmp_path, value: float) -> list[str]:
    """Two deltas on the same entries, every value ``value``."""
    d = make_delta(0, 0.3)
    d = SparseDelta(d.ticket, {n: torch.full_like(v, value) for n, v in d.values.items()})
    paths = [str(tmp_path / f"c{i}.safetensors") for i in range(2)]
    for p in paths:
        fmt.save(d, p)
    return paths


@pytest.mark.parametrize(
    "method, options",
    [
        ("add", []),
        ("task-arithmetic", ["--weights", "1,0.5", "--lambda", "1.2"]),
        ("dare-linear", ["--drop", "0.5"]),  # the rescale by 1 / (1 - drop) overflows
    ],
)
def test_merged_values_that_overflow_float32_are_refused(tmp_path, capsys, method, options):
    paths = constant_files(tmp_path, 2.5e38)
    out = tmp_path / "m.safetensors"
    err = refused(capsys, *paths, "--method", method, *options, "--out", out, "--quiet")
    assert "merged tensor 'a.weight' overflows float32" in err and f"--method {method}" in err
    assert not out.exists()


def test_merge_into_a_float16_base_that_overflows_it_is_refused(fp16_base, tmp_path, capsys):
    from .conftest import constant_delta

    a = constant_delta(fp16_base, tmp_path / "a.safetensors", 4e4)
    b = constant_delta(fp16_base, tmp_path / "b.safetensors", 4e4)
    out = tmp_path / "m"
    err = refused(capsys, a, b, "--base", fp16_base, "--out-model", out, "--quiet")
    assert "q_proj.weight' overflows its float16" in err and str(fp16_base) in err
    assert not out.exists()
    # the merged delta itself is finite in float32
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    "options, where",
    [
        (["--method", "ties", "--density", "0"], "--density:"),
        (["--method", "breadcrumbs", "--density", "0"], "--density:"),
        (["--method", "breadcrumbs", "--gamma", "1"], "--gamma:"),
        # each input's largest entries, 0.6 of the tensor, are all of its entries
        (["--method", "breadcrumbs", "--gamma", "0.6", "--density", "0.2"], "--gamma"),
    ],
)
def test_merges_that_keep_no_entry_are_refused(files, tmp_path, capsys, options, where):
    out = tmp_path / "m.safetensors"
    err = refused(capsys, *files, *options, "--out", out, "--quiet")
    assert "the merged delta would be empty" in err and where in err
    assert not out.exists()


def test_inputs_that_cancel_out_are_refused_as_empty(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    options = ["--method", "task-arithmetic", "--weights", "1,-1"]
    err = refused(capsys, files[0], files[0], *options, "--out", out, "--quiet")
    assert "every merged value is 0, so the merged delta would be empty" in err
    assert not out.exists()


def test_negative_weights_and_lambda_parse_with_a_space(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    options = ["--method", "task-arithmetic", "--weights", "-1,0.5,-2.5e-1", "--lambda", "-1e-1"]
    assert main(["merge", *files, *options, "--out", str(out), "--quiet"]) == 0, capsys
    want = run(files, "task-arithmetic", weights=[-1.0, 0.5, -0.25], lam=-0.1)
    got = fmt.load(out)
    for name in SHAPES:
        assert torch.equal(got.values[name], want.values[name])
    capsys.readouterr()
