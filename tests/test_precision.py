"""The GPU path, proved on the CPU: the device choice and its refusals, mixed precision (bf16
autocast, fp16 with loss scaling), float32 master weights, gradient checkpointing and batches
grouped by length. Two architectures: Llama and GPT-2 (Conv1D weights)."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

import lota
from lota import dist, sources
from lota import format as fmt
from lota.adapt import adapt
from lota.adapt_config import AdaptConfig
from lota.data import Tokenized, batches, read_jsonl, tokenize
from lota.errors import InputError
from lota.models import load_model
from lota.plan import check_precision as _check_precision
from lota.precision import Precision
from lota.toy import byte_tokenizer, tiny_llama
from lota.weights import WeightReader

from .conftest import addition_rows, assert_only_ticket_changed, write_jsonl
from .test_calibration import assert_same_delta, bits
from .test_cli import assert_refused
from .test_cli import lota as lota_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SMALL = dict(steps=3, calibration_steps=2, lr=1e-3, batch_size=4, progress=False)


def _gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=259,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,  # a head of its own, as in the Llama (tied heads: test_tied_embeddings)
    )
    return GPT2LMHeadModel(cfg)


BUILD = {"llama": lambda seed: tiny_llama(hidden=32, layers=2, heads=2, seed=seed), "gpt2": _gpt2}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """``{(arch, dtype): model folder}`` and the training data."""
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for arch, build in BUILD.items():
        for name, dtype in DTYPES.items():
            folder = root / f"{arch}-{name}"
            build(0).to(dtype).save_pretrained(folder)
            byte_tokenizer().save_pretrained(folder)
            out[arch, name] = folder
    out["data"] = write_jsonl(root / "a.jsonl", addition_rows(24))
    return out


def run(bases, arch, dtype, out, **kw):
    cfg = AdaptConfig(
        model=str(bases[arch, dtype]), data=str(bases["data"]), out=str(out), **{**SMALL, **kw}
    )
    return adapt(cfg)


def metrics(out, phase=None):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if phase is None or r["phase"] == phase]


# ---------------------------------------------------------------------------- the device
def fake_gpus(monkeypatch, count: int, env: dict | None = None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize(
    "spec,count,env,want",
    [
        ("auto", 0, None, "cpu"),
        ("auto", 2, None, "cuda:0"),
        ("cpu", 2, None, "cpu"),
        ("cuda", 2, None, "cuda:0"),
        ("CUDA:1", 2, None, "cuda:1"),
        ("auto", 4, {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, "cuda:3"),
        ("cuda", 2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cuda:1"),
        ("cpu", 2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "cpu"),
    ],
)
def test_the_device_is_the_gpu_when_there_is_one(monkeypatch, spec, count, env, want):
    fake_gpus(monkeypatch, count, env)
    assert dist.resolve_device(spec) == torch.device(want)


@pytest.mark.parametrize(
    "spec,count,env,words",
    [
        ("cuda", 0, None, ["sees no CUDA GPU", "--device cpu"]),
        ("cuda:0", 0, None, ["sees no CUDA GPU"]),
        ("cuda:2", 2, None, ["cuda:2", "2 GPU(s)", "below 2"]),
        ("cuda:1", 2, {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["LOCAL_RANK", "--device cuda"]),
        ("auto", 2, {"WORLD_SIZE": "3", "LOCAL_RANK": "2"}, ["LOCAL_RANK 2", "at most 2"]),
        ("gpu", 1, None, ["'gpu' is not a device", "cuda:N"]),
        ("cuda:x", 1, None, ["not a device"]),
    ],
)
def test_a_device_that_is_not_there_is_refused(monkeypatch, spec, count, env, words):
    fake_gpus(monkeypatch, count, env)
    with pytest.raises(InputError) as e:
        dist.resolve_device(spec)
    assert e.value.where == "--device"
    for w in words:
        assert w in e.value.line(), (w, e.value.line())


def test_commands_refuse_a_missing_gpu_in_one_line_and_write_nothing(
    bases, capsys, tmp_path, monkeypatch
):
    fake_gpus(monkeypatch, 0)
    base, data = bases["llama", "float32"], bases["data"]
    out = tmp_path / "adapt"
    code, _, err = lota_cli(capsys, "adapt", base, "--data", data, "--out", out, "--device", "cuda")
    assert_refused(code, "", err, "--device", "no CUDA GPU")
    assert not out.exists()
    code, _, err = lota_cli(capsys, "eval", base, "--data", data, "--device", "cuda:0")
    assert_refused(code, "", err, "--device", "no CUDA GPU")
    code, _, err = lota_cli(
        capsys, "ks", base, base, "--out", tmp_path / "ks", "--device", "cuda", "--top", "3"
    )
    assert_refused(code, "", err, "--device", "no CUDA GPU")
    assert not (tmp_path / "ks").exists()


def test_auto_trains_on_the_cpu_here_and_says_so(bases, tmp_path):
    info = run(bases, "llama", "float32", tmp_path / "o", method="lota", device="auto")
    assert info["device"] == "cpu" and info["weights_dtype"] == "float32"
    same = run(bases, "llama", "float32", tmp_path / "cpu", method="lota", device="cpu")
    a, b = (
        fmt.load(tmp_path / "o" / "delta.safetensors"),
        fmt.load(tmp_path / "cpu" / "delta.safetensors"),
    )
    assert all(torch.equal(bits(a.values[n]), bits(b.values[n])) for n in a.names)
    assert same["device"] == "cpu"


def test_eval_and_ks_on_the_cpu_device_give_the_default_results(bases, capsys, tmp_path):
    base, data = bases["llama", "float32"], bases["data"]
    code, out, _ = lota_cli(capsys, "eval", base, "--data", data, "--limit", "4", "--json")
    code2, out2, _ = lota_cli(
        capsys, "eval", base, "--data", data, "--limit", "4", "--json", "--device", "cpu"
    )
    assert code == code2 == 0
    assert json.loads(out)["score"] == json.loads(out2)["score"]
    other = bases["llama", "bfloat16"]  # the same weights, rounded: every row changed a little
    for device, folder in (("auto", "a"), ("cpu", "b")):
        code, _, err = lota_cli(
            capsys, "ks", base, other, "--out", tmp_path / folder, "--top", "5", "--device", device
        )
        assert code == 0, err
    a = json.loads((tmp_path / "a" / "tokens.json").read_text())
    b = json.loads((tmp_path / "b" / "tokens.json").read_text())
    assert a["selected"] == b["selected"]


def test_the_exact_ks_statistic_in_torch_equals_numpys():
    from lota.ks import _exact_statistics, _exact_statistics_torch

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        a = torch.randn(70, 48, generator=g).to(dtype)
        b = (a + 0.05 * torch.randn(70, 48, generator=g)).to(dtype)
        b[:7] = a[:7]  # ties everywhere
        b[7, :3] = -0.0
        want = _exact_statistics(a, b, 16)
        assert torch.equal(_exact_statistics_torch(a, b, 16, torch.device("cpu")), want), dtype


# ---------------------------------------------------------------------------- precision
def test_the_phase_precision_follows_the_weights_and_the_settings():
    cpu = torch.device("cpu")
    f32 = [torch.zeros(2)]
    f16 = [torch.zeros(2, dtype=torch.float16)]
    p = Precision.of("no", cpu, f32, torch.float32)
    assert p.autocast_dtype is None and p.scaler is None
    p = Precision.of("bf16", cpu, f32, torch.float32)
    assert p.autocast_dtype == torch.bfloat16 and p.scaler is None
    p = Precision.of("fp16", cpu, f32, torch.float32)
    assert p.autocast_dtype == torch.float16 and p.scaler is not None
    # sparse deltas on float16 weights: native float16 compute, float32 deltas: scaled
    p = Precision.of("no", cpu, f32, torch.float16)
    assert p.autocast_dtype is None and p.scaler is not None
    # masters of bfloat16 weights compute in bfloat16 under autocast
    p = Precision.of("no", cpu, f32, torch.bfloat16, masters=True)
    assert p.autocast_dtype == torch.bfloat16 and p.scaler is None
    # float16 weights trained as they are: GradScaler cannot unscale float16 gradients
    assert Precision.of("no", cpu, f16, torch.float16).scaler is None


SPARSE = {name for name, m in sources.METHODS.items() if m.sparse}


@pytest.mark.parametrize(
    "arch,method,extra",
    [
        ("llama", "lota", {}),
        ("llama", "fft", {}),
        ("llama", "lora", {}),
        ("llama", "embeddings", {}),
        ("llama", "lota", {"calibration": "sgd"}),
        ("llama", "lota", {"calibration": "fisher"}),
        ("llama", "lota", {"calibration": "lora"}),
        ("gpt2", "lota", {}),
        ("gpt2", "fft", {}),
    ],
)
def test_float16_weights_train_without_nan_by_default(bases, tmp_path, arch, method, extra):
    """The default AdamW at lr 1e-5 on float16 weights: the loss stays finite on every method,
    the dense phases keep float32 masters, and the saved model is float16 again."""
    out = tmp_path / "o"
    info = run(bases, arch, "float16", out, method=method, lr=1e-5, save_model=True, **extra)
    rows = metrics(out)
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert info["weights_dtype"] == "float16"
    assert {p.dtype for p in load_model(str(out / "model")).parameters()} == {torch.float16}
    delta = fmt.load(out / "delta.safetensors")
    delta.check_finite("delta")
    if method in SPARSE:
        assert info["frozen_verified"] is True
        assert_only_ticket_changed(
            WeightReader(str(bases[arch, "float16"])), WeightReader(str(out / "model")), delta
        )
    # float32 deltas, masters or adapters with float16 compute: every phase scales its loss
    assert all("loss_scale" in r for r in rows if r["phase"] != "calibration" or not extra)


def test_float16_adamw_on_the_weights_themselves_is_refused_before_anything_is_written(
    bases, tmp_path
):
    out = tmp_path / "o"
    with pytest.raises(InputError) as e:
        run(bases, "llama", "float16", out, method="fft", master_weights="none")
    assert "--master-weights" in e.value.line() and "epsilon" in e.value.line()
    assert not out.exists()
    # plain SGD has no epsilon: allowed, and it trains the float16 weights directly
    info = run(
        bases, "llama", "float16", tmp_path / "sgd", method="lota", master_weights="none",
        optimizer="sgd", calibration="sgd", lr=1e-2,
    )  # fmt: skip
    assert info["frozen_verified"] is True
    # bfloat16 has float32's exponent: pure bfloat16 AdamW is allowed
    info = run(bases, "llama", "bfloat16", tmp_path / "bf", method="fft", master_weights="none")
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "bf"))


def test_fsdp_cannot_hold_float32_masters_of_16_bit_weights():
    cfg = AdaptConfig(model="m", data="d", out="o", method="lota", fsdp=True)
    with pytest.raises(InputError, match="--master-weights none"):
        _check_precision(cfg, torch.bfloat16)
    _check_precision(cfg, torch.float32)  # float32 weights are their own masters
    _check_precision(AdaptConfig(model="m", data="d", out="o", fsdp=True, master_weights="none"),
                     torch.bfloat16)  # fmt: skip
    # a sparse method without calibration updates no whole weight
    _check_precision(AdaptConfig(model="m", data="d", out="o", method="random", fsdp=True),
                     torch.float16)  # fmt: skip


def test_bf16_on_a_gpu_without_bf16_is_refused_in_one_line(monkeypatch):
    """A GPU before Ampere has no bfloat16 (``torch.cuda.is_bf16_supported``, mocked here): bf16
    compute there is refused, pointing to fp16; fp16 compute of bf16-stored weights is not."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")

    def cfg(**kw):
        return AdaptConfig(model="m", data="d", out="o", **kw)

    with pytest.raises(InputError) as e:
        _check_precision(cfg(mixed_precision="bf16"), torch.float32, gpu)
    assert e.value.where == "--mixed-precision" and "fp16" in e.value.fix
    assert "Tesla V100" in e.value.line() and "\n" not in e.value.line()
    with pytest.raises(InputError) as e:
        _check_precision(cfg(), torch.bfloat16, gpu)  # bf16 weights compute in bf16
    assert e.value.where == "--dtype" and "--mixed-precision fp16" in e.value.fix
    _check_precision(cfg(mixed_precision="fp16"), torch.bfloat16, gpu)
    _check_precision(cfg(mixed_precision="fp16"), torch.float32, gpu)
    _check_precision(cfg(mixed_precision="bf16"), torch.float32, cpu)  # the CPU computes bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    _check_precision(cfg(mixed_precision="bf16"), torch.bfloat16, gpu)


def test_deterministic_kernels_are_on_for_the_run_only(workdir, tmp_path, monkeypatch):
    """``--deterministic`` switches torch to deterministic kernels and sets cuBLAS's workspace
    before the device is touched, and puts both back after the run; on the CPU the run's bits
    are those of a run without it."""
    import lota.adapt as adapt_module

    seen = []
    world = adapt_module.dist.world

    def spy(device=None, *args):
        seen.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            )
        )
        return world(device, *args)

    monkeypatch.setattr(adapt_module.dist, "world", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    common = dict(model=str(workdir / "base"), data=str(workdir / "a.jsonl"), **SMALL)
    adapt(AdaptConfig(out=str(tmp_path / "det"), deterministic=True, **common))
    assert seen and set(seen) == {(True, ":4096:8")}
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    adapt(AdaptConfig(out=str(tmp_path / "plain"), **common))
    assert_same_delta(tmp_path / "det", tmp_path / "plain")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masters_give_the_exact_change_and_the_model_its_own_dtype(bases, tmp_path, arch):
    """FFT on bfloat16 weights with float32 masters: ``--values-dtype float32`` writes the
    masters' change (finer than bfloat16 steps), and the saved weights are ``w0 + delta``
    rounded to bfloat16; by default, and without masters, the delta is the saved weights'
    change."""
    out = tmp_path / "o"
    run(
        bases, arch, "bfloat16", out, method="fft", lr=1e-4, save_model=True, values_dtype="float32"
    )
    delta = fmt.load(out / "delta.safetensors")
    before, after = WeightReader(str(bases[arch, "bfloat16"])), WeightReader(str(out / "model"))
    finer = 0
    for name in delta.names:
        w0 = before.get(name).reshape(-1).float()
        values = torch.zeros_like(w0)
        values[delta.indices[name]] = delta.values[name]
        saved = after.get(name).reshape(-1)
        assert saved.dtype == torch.bfloat16
        assert torch.equal(bits(saved), bits((w0 + values).to(torch.bfloat16))), name
        finer += int(((w0 + values).to(torch.bfloat16).float() - w0 != values).sum())
    assert finer > 0  # some changes are below a bfloat16 step: masters hold them
    # by default, and without masters, the delta is exactly the rounded weights' change
    for options in [{}, {"master_weights": "none"}]:
        out = tmp_path / f"pure{len(options)}"
        run(bases, arch, "bfloat16", out, method="fft", lr=1e-4, save_model=True, **options)
        delta = fmt.load(out / "delta.safetensors")
        after = WeightReader(str(out / "model"))
        for name in delta.names:
            w0 = before.get(name).reshape(-1).float()
            change = after.get(name).reshape(-1).float() - w0
            assert torch.equal(change[delta.indices[name]], delta.values[name].float()), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lota", "lora"])
def test_bf16_autocast_computes_in_bf16_and_keeps_frozen_entries_bit_identical(
    bases, tmp_path, arch, method
):
    plain = tmp_path / "plain"
    run(bases, arch, "float32", plain, method=method)
    mixed = tmp_path / "mixed"
    info = run(
        bases, arch, "float32", mixed, method=method, mixed_precision="bf16", save_model=True
    )
    a, b = metrics(plain), metrics(mixed)
    assert a[0]["loss"] != b[0]["loss"]  # the first forward already computes in bfloat16
    assert all(abs(x["loss"] - y["loss"]) < 0.05 for x, y in zip(a, b))
    delta = fmt.load(mixed / "delta.safetensors")
    assert all(v.dtype == torch.float32 for v in delta.values.values())
    if method == "lota":
        assert info["frozen_verified"] is True
        assert_only_ticket_changed(
            WeightReader(str(bases[arch, "float32"])), WeightReader(str(mixed / "model")), delta
        )


def test_fp16_autocast_scales_the_loss_and_resumes_with_the_same_scale(bases, tmp_path):
    from .test_calibration import Killed, kill_at

    kw = dict(method="lota", mixed_precision="fp16", checkpoint_every=1, steps=4)
    ref = tmp_path / "ref"
    run(bases, "llama", "float32", ref, **kw)
    assert {r["loss_scale"] for r in metrics(ref)} == {65536.0}
    out = tmp_path / "killed"
    with pytest.MonkeyPatch.context() as m:
        kill_at(m, "train:2")
        with pytest.raises(Killed):
            run(bases, "llama", "float32", out, **kw)
    from safetensors import safe_open

    with safe_open(str(out / ".lota-checkpoint" / "state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["loss_scaler"])["scale"] == 65536.0
    info = run(bases, "llama", "float32", out, **kw)
    assert info["resumed_from"] == "train:2"
    assert_same_delta(ref, out)


def test_a_loss_scale_overflow_skips_the_step_and_leaves_everything_frozen(bases, tmp_path):
    """A scale so large that the first gradients overflow: the step is skipped, the scale halves."""
    from lota import train as train_module

    original = torch.amp.GradScaler.__init__

    def huge(self, *a, **k):
        original(self, *a, **{**k, "init_scale": 2.0**127})

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.amp.GradScaler, "__init__", huge)
        info = run(bases, "llama", "float16", tmp_path / "o", method="random", steps=3)
    rows = metrics(tmp_path / "o", "train")
    assert rows[0]["skipped"] is True and rows[0]["loss_scale"] < 2.0**127
    assert info["frozen_verified"] is True
    assert train_module  # the loop that logs these fields


# ---------------------------------------------------------------------------- checkpointing
def count_block_forwards(monkeypatch) -> list[int]:
    """Count the forward calls of the first projection inside every decoder block of the runs'
    models: with gradient checkpointing the backward pass recomputes the block's forward, up to
    the last activation it needs (the block's own hooks stay outside the checkpoint)."""
    from lota import phases

    calls = [0]
    load = phases.load_run_model

    def counted(cfg, world):
        model = load(cfg, world)
        for name, module in model.named_modules():
            if name.endswith(("self_attn.q_proj", "attn.c_attn")):
                module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        return model

    monkeypatch.setattr(phases, "load_run_model", counted)
    return calls


@pytest.mark.parametrize(
    "arch,method",
    [("llama", "lota"), ("llama", "fft"), ("llama", "lora"), ("llama", "embeddings"),
     ("gpt2", "lota"), ("gpt2", "lora")],
)  # fmt: skip
def test_gradient_checkpointing_recomputes_and_changes_no_result(
    bases, tmp_path, monkeypatch, arch, method
):
    calls = count_block_forwards(monkeypatch)
    plain = run(bases, arch, "float32", tmp_path / "plain", method=method)
    without = calls[0]
    calls[0] = 0
    ckpt = run(
        bases, arch, "float32", tmp_path / "ckpt", method=method, gradient_checkpointing=True
    )
    assert calls[0] > without  # the blocks ran again in the backward pass
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    assert [r["phase"] for r in a] == [r["phase"] for r in b]
    for x, y in zip(a, b):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-5, abs_tol=1e-6), (x, y)
    da, db = (
        fmt.load(tmp_path / "plain" / "delta.safetensors"),
        fmt.load(tmp_path / "ckpt" / "delta.safetensors"),
    )
    for n in da.names:
        assert torch.equal(da.indices[n], db.indices[n]), n
        assert torch.allclose(da.values[n], db.values[n], rtol=1e-4, atol=1e-7), n
    if method in SPARSE:
        assert plain["frozen_verified"] is ckpt["frozen_verified"] is True


def test_gradient_checkpointing_resumes_to_the_same_bits(bases, tmp_path):
    from .test_calibration import Killed, kill_at

    kw = dict(method="lota", gradient_checkpointing=True, checkpoint_every=1, steps=4)
    ref = tmp_path / "ref"
    run(bases, "gpt2", "float32", ref, **kw)
    out = tmp_path / "killed"
    with pytest.MonkeyPatch.context() as m:
        kill_at(m, "train:2")
        with pytest.raises(Killed):
            run(bases, "gpt2", "float32", out, **kw)
    assert run(bases, "gpt2", "float32", out, **kw)["resumed_from"] == "train:2"
    assert_same_delta(ref, out)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prepare_under_a_trainer_with_gradient_checkpointing(bases, tmp_path, checkpointing):
    from transformers import Trainer, TrainingArguments

    from lota.data import collate

    def train_once(flag: bool):
        model = tiny_llama(hidden=32, layers=2, heads=2)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        targets = lota.resolve_targets(model)
        k = lota.ticket_size("0.9", sum(torch.Size(s).numel() for s in targets.values()))
        ticket = lota.select("random", targets, k, seed=3)
        lota.prepare(model, ticket)
        tok = byte_tokenizer()
        data = tokenize(read_jsonl(bases["data"]), tok, 64)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"trainer{flag}"),
            max_steps=3,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            disable_tqdm=True,
            gradient_checkpointing=flag,
            seed=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=data,
            data_collator=lambda batch: collate(batch, tok.pad_token_id),
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return model, start, ticket, losses

    model, start, ticket, losses = train_once(checkpointing)
    assert model.is_gradient_checkpointing is checkpointing
    delta = lota.extract_delta(model)
    assert all(bool(v.abs().sum() > 0) for v in delta.values.values())  # every tensor learned
    lota.unprepare(model)
    assert_only_ticket_changed(start, {n: p.detach() for n, p in model.named_parameters()}, ticket)
    if checkpointing:
        *_, plain = train_once(False)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(losses, plain))


# ---------------------------------------------------------------------------- length grouping
def test_grouped_batches_pad_less_visit_every_example_and_resume_exactly():
    import random

    r = random.Random(0)
    data = [Tokenized([5] * n, [5] * n) for n in (r.randint(4, 200) for _ in range(300))]
    per_epoch = 300 // 10

    def epoch(group: bool, skip: int = 0):
        stream = batches(data, 10, 7, 0, skip=skip, group_by_length=group)
        return [next(stream) for _ in range(per_epoch - skip)]

    def padding(bs):
        return sum(int((b["attention_mask"] == 0).sum()) for b in bs) / sum(
            b["attention_mask"].numel() for b in bs
        )

    plain, grouped = epoch(False), epoch(True)
    assert padding(grouped) < padding(plain) / 3
    seen = sorted(int(m.sum()) for b in grouped for m in b["attention_mask"])
    assert seen == sorted(len(t.input_ids) for t in data)  # each example once per epoch
    widths = [b["input_ids"].shape[1] for b in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # shuffled
    again = epoch(True, skip=5)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped[5:], again))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(grouped, epoch(True)))


def test_group_by_length_trains_on_the_same_examples(bases, tmp_path):
    info = run(bases, "llama", "float32", tmp_path / "g", method="lota", group_by_length=True)
    assert info["frozen_verified"] is True
    rows = metrics(tmp_path / "g", "train")
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert sys.modules["lota.batching"].GROUP_WINDOW >= 1
