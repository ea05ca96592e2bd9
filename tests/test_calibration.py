"""``--calibration``: every way of calibrating gives an exact-k ticket of its own scores, disjoint
from the protected entries, with the frozen entries bit-identical; each score equals its reference
computed by hand; a run killed in calibration resumes to the same bits. Tiny Llama and GPT-2."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from lota import calibrations, selection
from lota import fileio as fileio_module
from lota import format as fmt
from lota import train as train_module
from lota.adapt import AdaptConfig, adapt
from lota.calibrations import dense as dense_module
from lota.calibrations import scoring as cal_module
from lota.data import model_positions
from lota.models import load_model, load_tokenizer
from lota.targets import named_weights
from lota.toy import byte_tokenizer

# max_grad_norm 0: no clipping, so each reference is the plain formula
SMALL = {
    "steps": 1,
    "calibration_steps": 2,
    "lr": 1e-2,
    "batch_size": 4,
    "max_grad_norm": 0.0,
    "progress": False,
}
VARIANTS = {
    "adamw": {"calibration": "adamw"},
    "sgd": {"calibration": "sgd"},
    "rmsprop": {"calibration": "rmsprop"},
    "adafactor": {"calibration": "adafactor"},
    "fisher": {"calibration": "fisher"},
    "fisher-bf16": {"calibration": "fisher", "fisher_dtype": "bfloat16"},
    "lora-change": {"calibration": "lora"},
    "lora-gradient": {"calibration": "lora", "lora_calibration_score": "gradient"},
}


def bits(t):
    return t.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def bases(workdir, tmp_path_factory):
    """{arch: model folder}: the session's tiny Llama and a tiny GPT-2 (Conv1D weights), without
    dropout so references by hand see the same forward pass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path_factory.mktemp("gpt2") / "base"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(gpt2, safe_serialization=True)
    byte_tokenizer().save_pretrained(gpt2)
    return {"llama": workdir / "base", "gpt2": gpt2}


@pytest.fixture(scope="module")
def protect(bases, tmp_path_factory):
    """{arch: a ticket file of 500 random target entries}, the entries every run must avoid."""
    folder = tmp_path_factory.mktemp("protect")
    out = {}
    for arch, base in bases.items():
        from lota.targets import resolve_targets

        targets = resolve_targets(load_model(str(base), "auto"))
        ticket = selection.select("random", targets, 500, seed=7)
        fmt.save(ticket, folder / f"{arch}.safetensors")
        out[arch] = folder / f"{arch}.safetensors"
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The finished runs of this module, by (arch, variant): the references of the resume tests."""
    return tmp_path_factory.mktemp("finished"), {}


def reference_run(bases, protect, finished, arch, variant, monkeypatch=None):
    """The run of ``variant`` protecting ``protect[arch]``, with a saved model; made once."""
    folder, runs = finished
    if (arch, variant) not in runs or monkeypatch is not None:  # a spied run is made afresh
        out = folder / f"{arch}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        info, spy = run(
            bases[arch],
            task_data(bases),
            out,
            monkeypatch,
            **common(protect, arch),
            **VARIANTS[variant],
        )
        runs[(arch, variant)] = (info, out, spy)
    return runs[(arch, variant)]


def common(protect, arch) -> dict:
    return {"protect": [str(protect[arch])], "save_model": True}


def task_data(bases):
    return bases["llama"].parent / "a.jsonl"


class Spy:
    """What the run selected from: every score tensor, and the weights at selection time."""

    def __init__(self, monkeypatch):
        self.scores, self.weights = {}, {}
        select, pick = selection.select, cal_module.select_top

        def spy_select(method, shapes, k, delta_fn=None, **kw):
            if delta_fn is not None:
                self.scores = {n: delta_fn(n).detach().cpu().clone() for n in shapes}
            return select(method, shapes, k, delta_fn=delta_fn, **kw)

        def spy_pick(run, *args):
            self.weights = {  # the base weights by their names, inside LoRA layers too
                n.replace(".base_layer.", "."): p.detach().clone()
                for n, p in named_weights(run.model).items()
                if ".lora_" not in n
            }
            return pick(run, *args)

        monkeypatch.setattr(selection, "select", spy_select)
        monkeypatch.setattr(cal_module, "select_top", spy_pick)


def run(base, data, out, monkeypatch=None, **kw):
    spy = Spy(monkeypatch) if monkeypatch is not None else None
    cfg = AdaptConfig(model=str(base), data=str(data), out=str(out), **{**SMALL, **kw})
    return adapt(cfg), spy


def reference_topk(scores, protected, k):
    """The exact top-k of |score| over all tensors by name, ties to the lower global position,
    protected entries excluded: by sorting everything, not by lota's radix select."""
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1).float().abs() for n in names])
    sizes = [scores[n].numel() for n in names]
    offset = dict(zip(names, [0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]]))
    for n, idx in protected.indices.items():
        flat[offset[n] + idx] = -1.0
    top = torch.sort(flat, descending=True, stable=True).indices[:k].sort().values
    return {
        n: top[(top >= offset[n]) & (top < offset[n] + s)] - offset[n] for n, s in zip(names, sizes)
    }


# ------------------------------------------------------------------------ the references by hand
def hand_batches(base, data, n):
    """The first ``n`` batches the run's data stream serves."""
    from lota.data import batches, fit_max_length, read_jsonl, tokenize

    tok = load_tokenizer(str(base))
    positions = model_positions(load_model(str(base), "auto").config)
    rows = tokenize(
        read_jsonl(str(data)), tok, fit_max_length(None, positions), where=str(data),
        positions=positions,
    )  # fmt: skip
    stream = batches(rows, SMALL["batch_size"], 0, tok.pad_token_id)
    return [next(stream) for _ in range(n)]


def hand_gradients(model, params, batch):
    for p in params.values():
        p.grad = None
    model(**batch).loss.backward()
    return {n: p.grad.detach().clone() for n, p in params.items()}


def hand_scores(variant, base, data, targets):
    """The score each calibration selects from, computed from its definition."""
    steps, lr = SMALL["calibration_steps"], SMALL["lr"]
    model = load_model(str(base), "auto")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    w = named_weights(model)
    params = {n: w[n] for n in targets}
    if variant in ("adamw", "sgd", "rmsprop", "adafactor", "fisher", "fisher-bf16"):
        for p in params.values():
            p.requires_grad_(True)
        dtype = torch.bfloat16 if variant == "fisher-bf16" else torch.float32
        score = {n: torch.zeros(p.shape, dtype=dtype) for n, p in params.items()}
        w0 = {n: p.detach().clone() for n, p in params.items()}
        adamw = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
        rmsprop = torch.optim.RMSprop(list(params.values()), lr=lr, foreach=False)
        rows = {n: torch.zeros(p.shape[:-1].numel()) for n, p in params.items()}
        cols = {n: torch.zeros(p.shape[-1]) for n, p in params.items()}
        for batch in hand_batches(base, data, steps):
            g = hand_gradients(model, params, batch)
            if variant in ("adamw", "rmsprop"):
                (adamw if variant == "adamw" else rmsprop).step()
                continue
            if variant == "adafactor":  # v = outer(row means, col means) / mean(row means)
                with torch.no_grad():
                    for n, p in params.items():
                        sq = (g[n] * g[n]).reshape(rows[n].numel(), -1)
                        rows[n] = 0.99 * rows[n] + 0.01 * sq.mean(1)
                        cols[n] = 0.99 * cols[n] + 0.01 * sq.mean(0)
                        v = torch.outer(rows[n], cols[n]) / rows[n].mean()
                        p.sub_(lr * g[n] / (v.sqrt().reshape(p.shape) + 1e-8))
                continue
            with torch.no_grad():
                for n, p in params.items():
                    if variant == "sgd":
                        p.sub_(lr * g[n])  # w - lr * g
                    else:
                        score[n] += g[n] * g[n]
        if variant in ("adamw", "sgd", "rmsprop", "adafactor"):
            return {n: params[n].detach() - w0[n] for n in targets}
        return score
    # LoRA: seeded as the run seeds it, trained by AdamW on the calibration batches
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    from transformers.pytorch_utils import Conv1D

    modules = sorted({n.rsplit(".", 1)[0] for n in targets})
    conv1d = isinstance(model.get_submodule(modules[0]), Conv1D)  # GPT-2: transposed weights
    lcfg = LoraConfig(
        r=16, lora_alpha=32, target_modules=modules, lora_dropout=0.0, fan_in_fan_out=conv1d
    )
    peft = get_peft_model(model, lcfg)
    adapter = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapter, lr=lr, weight_decay=0.0)
    feed = hand_batches(base, data, steps + 1)
    for batch in feed[:steps]:
        peft(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if variant == "lora-change":
        out = {}
        for n in targets:
            layer = model.get_submodule(n.rsplit(".", 1)[0])
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            change = (b @ a) * (32 / 16)  # scale * B @ A
            out[n] = (change.T if layer.fan_in_fan_out else change).detach()
        return out
    for p in adapter:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    g = hand_gradients(peft, params, feed[steps])  # the next batch, at the warmed-up adapter
    return {n: g[n] * g[n] for n in targets}


# ------------------------------------------------------------------------------------ the tests
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_calibration_ticket_is_the_exact_top_k_of_its_score_and_frozen_stays(
    workdir, bases, protect, finished, monkeypatch, arch, variant
):
    base, data = bases[arch], workdir / "a.jsonl"
    kw = VARIANTS[variant]
    info, out, spy = reference_run(bases, protect, finished, arch, variant, monkeypatch)
    delta = fmt.load(out / "delta.safetensors")
    protected = fmt.load(protect[arch]).ticket
    k = math.floor(delta.numel / 10)
    # exactly k entries, disjoint from the protected ones, the top-k of the run's own score
    assert delta.nnz == info["k"] == k
    assert delta.ticket.overlap(protected) == 0
    expected = reference_topk(spy.scores, protected, k)
    for n in delta.names:
        assert torch.equal(delta.indices[n], expected[n]), n
    # the score is the one its definition gives
    hand = hand_scores(variant, base, data, delta.shapes)
    for n in delta.names:
        got = spy.scores[n]
        if variant == "fisher-bf16":  # the buffer held bfloat16 values
            assert torch.equal(got, got.bfloat16().float()), n
        # a task vector is a difference of rounded weights: a few float32 ulps of a weight apart
        atol = 2e-8 if variant in ("adamw", "sgd", "rmsprop", "adafactor") else 1e-9
        torch.testing.assert_close(got.float(), hand[n].float(), rtol=1e-5, atol=atol)
    # fisher and LoRA never change a base weight: at selection they are the base's bits
    base_weights = load_file(str(base / "model.safetensors"))
    if variant.startswith(("fisher", "lora")):
        assert spy.weights and set(delta.names) <= set(spy.weights)
        for n in delta.names:
            assert torch.equal(bits(spy.weights[n]), bits(base_weights[n])), n
    # after the run: every entry outside the ticket (the protected ones too) is the base's
    tuned = load_file(str(out / "model" / "model.safetensors"))
    changed = 0
    for n, w0 in base_weights.items():
        if n not in tuned:  # a tied head is saved once
            continue
        outside = torch.ones(w0.numel(), dtype=torch.bool)
        if n in delta.indices:
            outside[delta.indices[n]] = False
            changed += int((tuned[n].reshape(-1) != w0.reshape(-1))[~outside].sum())
        assert torch.equal(bits(w0.reshape(-1)[outside]), bits(tuned[n].reshape(-1)[outside])), n
    assert changed > 0 and info["frozen_verified"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"] == kw["calibration"]
    assert fmt.load(out / "delta.safetensors").meta["config"]["calibration"] == kw["calibration"]


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing catches it, so the run stops where it is."""


def kill_at(monkeypatch, point):
    def fault(p):
        if p == point:
            raise Killed(p)

    for module in (train_module, fileio_module, dense_module, sys.modules["lota.adapt"]):
        monkeypatch.setattr(module, "fault", fault)


def assert_same_delta(a, b):
    a, b = fmt.load(a / "delta.safetensors"), fmt.load(b / "delta.safetensors")
    assert a.names == b.names and a.nnz == b.nnz
    for n in a.names:
        assert torch.equal(a.indices[n], b.indices[n]), n
        assert torch.equal(bits(a.values[n]), bits(b.values[n])), n


@pytest.mark.parametrize(
    "variant,point",
    [
        ("sgd", "calibration:1"),
        ("adafactor", "calibration:1"),
        ("fisher", "calibration:1"),
        ("fisher-bf16", "extraction"),
        ("lora-change", "calibration:1"),
        ("lora-gradient", "score:1"),
    ],
)
def test_killed_calibration_resumes_to_the_same_bits(
    bases, protect, finished, tmp_path, variant, point
):
    """Killed (in-process) after a step or after the scores, with a checkpoint every step."""
    _, reference, _ = reference_run(bases, protect, finished, "llama", variant)
    kw = {**VARIANTS[variant], **common(protect, "llama"), "checkpoint_every": 1}
    base, data, out = bases["llama"], task_data(bases), tmp_path / "killed"
    with pytest.MonkeyPatch.context() as m:
        kill_at(m, point)
        with pytest.raises(Killed):
            run(base, data, out, **kw)
    assert (out / ".lota-checkpoint" / "state.safetensors").exists()
    assert not (out / "delta.safetensors").exists()
    info, _ = run(base, data, out, **kw)
    assert info["resumed_from"] is not None
    assert_same_delta(reference, out)


def test_sigkill_in_fisher_calibration_resumes_to_the_same_bits(bases, protect, finished, tmp_path):
    import os
    import signal
    import subprocess

    _, reference, _ = reference_run(bases, protect, finished, "llama", "fisher")
    args = ["adapt", bases["llama"], "--data", task_data(bases), "--out", tmp_path / "killed"]
    args += ["--steps", "1", "--calibration-steps", "2", "--lr", "1e-2", "--batch-size", "4"]
    args += ["--max-grad-norm", "0", "--protect", protect["llama"], "--save-model", "--quiet"]
    args += ["--calibration", "fisher", "--checkpoint-every", "1"]

    def lota(fault=""):
        return subprocess.run(
            [sys.executable, "-m", "lota.cli", *map(str, args)],
            env={**os.environ, "LOTA_FAULT": fault},
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert lota("calibration:1").returncode == -signal.SIGKILL
    again = lota()
    assert again.returncode == 0, again.stderr
    assert_same_delta(reference, tmp_path / "killed")


def tiny_projections():
    """A tiny Llama whose projection weights are its only trainable parameters, and those."""
    from lota.toy import tiny_llama

    model = tiny_llama(hidden=32, layers=2, heads=2, seed=0)
    params = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    return model, params


def two_steps(model, params, opt) -> int:
    """Two steps of ``opt`` on seeded batches; the most gradients alive whenever the backward
    pass finished one (the counting hook runs after the optimizer's own)."""
    alive = []
    for p in params:
        p.register_post_accumulate_grad_hook(
            lambda _, params=params: alive.append(sum(q.grad is not None for q in params))
        )
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(3, 250, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return max(alive)


def test_squares_taken_in_the_backward_pass_equal_the_steps_and_free_each_gradient():
    """``in_backward`` sums the same squares, bit for bit, with at most one gradient alive."""
    sums = []
    for in_backward in (False, True):
        model, params = tiny_projections()
        acc = cal_module.SquaredGradients(params, torch.float32, in_backward=in_backward)
        alive = two_steps(model, params, acc)
        acc.close()
        sums.append(acc.scores())
        if in_backward:
            assert alive <= 1
            assert all(p.grad is None for p in params)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(*sums))
    assert all(bool(s.abs().sum() > 0) for s in sums[1])


def train_normalized(factored, in_backward, max_norm=None, reference=False):
    """Two steps of ``NormalizedSteps`` (or of ``torch.optim.RMSprop``) on a tiny Llama's
    projections; returns the weights, the optimizer and the most gradients alive at a hook."""
    from lota.calibrations.inbackward import NormalizedSteps

    model, params = tiny_projections()
    if reference:
        opt = torch.optim.RMSprop(params, lr=1e-2, foreach=False)
    else:
        opt = NormalizedSteps(
            params, 1e-2, max_norm=max_norm, factored=factored, in_backward=in_backward
        )
    alive = two_steps(model, params, opt)
    if not reference:
        opt.close()
    return [p.detach().clone() for p in params], opt, alive


@pytest.mark.parametrize("factored", [False, True])
def test_normalized_steps_in_the_backward_pass_equal_the_steps_and_free_each_gradient(factored):
    """``rmsprop`` and ``adafactor``: the same weights, bit for bit, whether each gradient is used
    inside the backward pass or by the step, with no more than one dense gradient alive then."""
    stepped, _, _ = train_normalized(factored, in_backward=False)
    taken, opt, alive = train_normalized(factored, in_backward=True)
    assert alive <= 1
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(stepped, taken))
    start, _, _ = train_normalized(factored, in_backward=False, max_norm=1e9)  # clip: a no-op
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(stepped, start))
    held = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim())
    weights = sum(w.numel() for w in taken)
    if factored:  # one value per row and per column of each matrix
        assert held == sum(w.shape[0] + w.shape[1] for w in taken) < weights / 8
    else:  # RMSprop's update: torch's own, bit for bit, when nothing is clipped
        reference, _, _ = train_normalized(False, in_backward=False, reference=True)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(reference, taken))
        assert held == weights


def test_normalized_steps_clip_each_tensor_on_its_own():
    """Each tensor's gradient is scaled to ``max_norm`` when its own norm is larger."""
    from lota.calibrations.inbackward import NormalizedSteps

    big = torch.nn.Parameter(torch.zeros(2, 3))
    small = torch.nn.Parameter(torch.zeros(4))
    opt = NormalizedSteps([big, small], lr=1.0, alpha=0.0, eps=1e-30, max_norm=1.0)
    gb, gs = torch.full((2, 3), 10.0), torch.tensor([0.1, -0.2, 0.0, 0.3])
    big.grad, small.grad = gb.clone(), gs.clone()
    opt.step()
    # alpha 0: the mean square is this step's, so each entry moves by -sign(g) whatever the clip
    assert torch.equal(big.detach(), -torch.ones(2, 3))
    assert torch.equal(small.detach(), -torch.sign(gs))
    clipped = gb * (1.0 / (torch.linalg.vector_norm(gb) + 1e-6))
    torch.testing.assert_close(opt.state[big]["square_avg"], clipped * clipped)
    assert torch.equal(opt.state[small]["square_avg"], gs * gs)  # norm below 1: unclipped


def test_the_squared_gradient_buffer_changes_no_weight_and_keeps_its_precision():
    w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))
    before = w.detach().clone()
    acc = cal_module.SquaredGradients([w], torch.float32)
    grads = [torch.randn(3, 4, dtype=torch.bfloat16) for _ in range(2)]
    for g in grads:
        w.grad = g
        acc.step()
        acc.zero_grad(set_to_none=True)
    assert w.grad is None and torch.equal(bits(w.detach()), bits(before))
    (score,) = acc.scores()
    expected = torch.zeros(3, 4)
    for g in grads:
        expected.addcmul_(g, g)
    assert score.dtype == torch.float32 and torch.equal(score, expected)
    again = cal_module.SquaredGradients([w], torch.float32)
    again.load_state_dict(acc.state_dict())  # as a resume restores it: not cast to bf16
    assert torch.equal(again.scores()[0], expected)


@pytest.mark.parametrize(
    "extra,says",
    [
        (["--method", "fft", "--calibration", "fisher"], "--calibration fisher needs a run that"),
        (["--method", "random", "--calibration", "sgd"], "--calibration sgd needs a run that"),
        (["--ticket", "t.safetensors", "--calibration", "lora"], "--calibration lora needs"),
        (["--calibrated", "tuned", "--calibration", "sgd"], "--calibration sgd needs a run"),
        (["--protect", "p", "--protect-mode", "flip", "--calibration", "fisher"], "needs a run"),
        (["--calibration", "magic"], "--calibration 'magic' is not one of adamw, sgd, rmsprop"),
        (["--fisher-dtype", "float16"], "--fisher-dtype 'float16' is not one of float32"),
        (["--lora-calibration-score", "x"], "--lora-calibration-score 'x' is not one of"),
        (["--calibration", "lora", "--targets", "norm"], "LoRA needs targets that are weights"),
    ],
)
def test_bad_calibration_settings_are_one_line_errors(workdir, tmp_path, capsys, extra, says):
    from lota.cli import main

    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    code = main([*argv, "--out", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.startswith("lota: error:"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_calibrations_that_do_not_shard_refuse_fsdp(monkeypatch):
    from lota import dist
    from lota.errors import InputError

    monkeypatch.setattr(dist, "_WORLD", dist.World(rank=0, size=2))
    for name in ("sgd", "rmsprop", "adafactor", "fisher", "lora"):
        cfg = AdaptConfig(model="m", data="d", out="o", calibration=name, fsdp=True)
        with pytest.raises(InputError) as e:
            cfg.validate()
        assert e.value.what == calibrations.CALIBRATIONS[name].fsdp_refusal
    AdaptConfig(model="m", data="d", out="o", calibration="adamw", fsdp=True).validate()
    AdaptConfig(model="m", data="d", out="o", calibration="sgd").validate()


def test_calibration_names_are_the_tables():
    assert calibrations.names() == ("adamw", "sgd", "rmsprop", "adafactor", "fisher", "lora")
    assert set(VARIANTS[v]["calibration"] for v in VARIANTS) == set(calibrations.CALIBRATIONS)
    for c in calibrations.CALIBRATIONS.values():
        assert c.help and c.memory and c.select is not None
