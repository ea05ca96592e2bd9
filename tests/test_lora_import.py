"""PEFT LoRA adapters imported as lota deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lota import format as fmt
from lota.cli import main
from lota.delta import apply_delta_
from lota.models import load_model
from lota.selection import ticket_size
from lota.targets import named_weights, untie_embeddings
from lota.toy import byte_tokenizer

from .test_cli import assert_refused


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def make_adapter(workdir, folder, use_rslora=False):
    model = load_model(str(workdir / "base"))
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        lora_dropout=0.0,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give the adapter a real change
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(folder, safe_serialization=True)
    merged = peft_model.merge_and_unload()
    return {n: t.detach().clone() for n, t in named_weights(merged).items()}


def test_imported_adapter_equals_the_merged_change(workdir, tmp_path, capsys):
    for rs in (False, True):
        merged = make_adapter(workdir, tmp_path / f"adapter{rs}", use_rslora=rs)
        base = {n: t.detach() for n, t in named_weights(load_model(str(workdir / "base"))).items()}
        out = tmp_path / f"lora{rs}.safetensors"
        code, _, err = run(
            capsys,
            "import-lora",
            tmp_path / f"adapter{rs}",
            "--base",
            workdir / "base",
            "--out",
            out,
        )
        assert code == 0, err
        d = fmt.load(out)
        assert d.nnz == sum(t.numel() for t in d.to_dense().values())  # dense
        dense = d.to_dense()
        assert len(dense) == 6  # q, v and down of both blocks
        for name, change in dense.items():
            torch.testing.assert_close(change, merged[name] - base[name], rtol=1e-5, atol=1e-6)
        for name in base:
            if name not in dense:
                assert torch.equal(merged[name], base[name])


def test_sparsified_import_keeps_the_exact_top_k(workdir, tmp_path, capsys):
    make_adapter(workdir, tmp_path / "adapter")
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "dense.safetensors",
    )
    assert code == 0, err
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--sparsity",
        "0.9",
        "--out",
        tmp_path / "sparse.safetensors",
    )
    assert code == 0, err
    dense, sparse = (
        fmt.load(tmp_path / "dense.safetensors"),
        fmt.load(tmp_path / "sparse.safetensors"),
    )
    names = sorted(dense.shapes)
    flat = torch.cat([dense.to_dense()[n].reshape(-1) for n in names])
    k = ticket_size("0.9", flat.numel())
    assert sparse.nnz == k
    order = torch.sort(-flat.abs(), stable=True).indices[:k]  # ties: lower global position
    want = torch.zeros(flat.numel(), dtype=torch.bool)
    want[order] = True
    got = torch.cat([sparse.ticket.dense_masks()[n].reshape(-1) for n in names])
    assert torch.equal(got, want)
    kept = torch.cat([sparse.to_dense()[n].reshape(-1) for n in names])
    assert torch.equal(kept[want], flat[want])


def test_bad_adapters_are_refused(workdir, tmp_path, capsys):
    make_adapter(workdir, tmp_path / "adapter")
    other = tmp_path / "other"
    other.mkdir()
    code, _, err = run(
        capsys,
        "import-lora",
        other,
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and "adapter_config.json" in err
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "other_arch",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and ("shape" in err or "does not have" in err)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "x.safetensors",
    )
    assert code == 2 and "LORA" in err
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------- contract with PEFT
def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=259,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=259, n_embd=32, n_layer=2, n_head=2, n_positions=128)


BASES = {
    "llama": lambda: _llama_config(tie_word_embeddings=False),
    "biased": lambda: _llama_config(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "tied": lambda: _llama_config(tie_word_embeddings=True),
    "gpt2": _gpt2_config,  # Conv1D layers (PEFT's fan_in_fan_out)
    "bf16": lambda: _llama_config(tie_word_embeddings=False),  # stored in bfloat16
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The folder of each base model in BASES, built on first use."""
    from transformers import AutoModelForCausalLM

    root, made = tmp_path_factory.mktemp("bases"), {}

    def get(kind: str) -> Path:
        if kind not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(BASES[kind]())
            model = model.to(torch.bfloat16) if kind == "bf16" else model
            model.save_pretrained(root / kind, safe_serialization=True)
            byte_tokenizer().save_pretrained(root / kind)
            made[kind] = root / kind
        return made[kind]

    return get


QKV = ["q_proj", "v_proj", "down_proj"]
# Every adapter layout the import reproduces: (base, LoraConfig arguments[, "exact": bit for bit]).
LAYOUTS = {
    "lora": ("llama", {"target_modules": QKV}),
    "rslora": ("llama", {"target_modules": QKV, "use_rslora": True}),
    "float-alpha": ("llama", {"target_modules": QKV, "lora_alpha": 5.5}),
    "patterns": (
        "llama",
        {
            "target_modules": QKV,
            "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "v_proj": 6},
            "alpha_pattern": {"^model.layers.1.mlp.down_proj": 3, r"layers\.\d.self_attn.v_proj": 5},
        },
    ),
    "rslora-patterns": (
        "llama",
        {"target_modules": QKV, "use_rslora": True, "rank_pattern": {"q_proj": 3}},
    ),
    "all-linear": ("llama", {"target_modules": "all-linear"}),
    "dora": ("llama", {"target_modules": QKV, "use_dora": True}),
    "embedding": ("llama", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
    "dora-embedding": ("llama", {"target_modules": ["embed_tokens", "q_proj"], "use_dora": True}),
    "modules-to-save": ("llama", {"target_modules": QKV, "modules_to_save": ["lm_head", "norm"]}),
    "lora-bias": ("biased", {"target_modules": QKV, "lora_bias": True}),
    "bias-all": ("biased", {"target_modules": ["q_proj"], "bias": "all"}),
    "bias-lora-only": ("biased", {"target_modules": ["q_proj", "up_proj"], "bias": "lora_only"}),
    "tokens": ("llama", {"target_modules": QKV, "trainable_token_indices": [3, 7, 200]}),
    "tokens-by-name": ("llama", {"target_modules": QKV, "trainable_token_indices": {"embed_tokens": [5, 9]}}),
    "tied-embedding": ("tied", {"target_modules": ["embed_tokens", "q_proj"]}),
    "tied-tokens": ("tied", {"target_modules": ["q_proj"], "trainable_token_indices": [4, 8]}),
    "fan-in-fan-out-on-linear": ("llama", {"target_modules": QKV, "fan_in_fan_out": True}),
    "conv1d": ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
    "conv1d-dora": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "use_dora": True}),
    "init-false": ("llama", {"target_modules": QKV, "init_lora_weights": False}),
    "bf16-base": ("bf16", {"target_modules": ["embed_tokens", "q_proj", "lm_head"]}, "exact"),
    "bf16-dora": ("bf16", {"target_modules": QKV, "use_dora": True}),
    "bf16-modules-to-save": ("bf16", {"target_modules": QKV, "modules_to_save": ["lm_head"]}, "exact"),
}  # fmt: skip


def peft_adapter(base: Path, folder: Path, seed: int = 0, **config) -> dict:
    """Save a PEFT adapter whose every trainable tensor was moved off its initial value, and
    return the weights ``merge_and_unload`` writes (tied weights under each of their names)."""
    import warnings

    config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(load_model(str(base)), LoraConfig(**config))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:  # LoRA factors, magnitudes, biases, tokens, saved modules
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        peft_model.save_pretrained(folder, safe_serialization=True)
        merged = peft_model.merge_and_unload()
    return {n: p.detach().clone() for n, p in merged.named_parameters(remove_duplicate=False)}


def assert_delta_gives(delta_path: Path, base: Path, merged: dict, exact: bool = False) -> None:
    """``lota apply``'s arithmetic (base + delta) gives PEFT's merged weights for every
    parameter name of the model: to float32 rounding, or to one unit in the last place of a
    half-precision base (``exact``: bit for bit)."""
    model = load_model(str(base))
    delta = fmt.load(delta_path)
    untie_embeddings(model, delta.names)  # as lota apply does for a tied embedding's change
    apply_delta_(named_weights(model), delta)
    for name, p in model.named_parameters(remove_duplicate=False):
        if exact:
            assert torch.equal(p, merged[name]), name
        elif p.dtype == torch.float32:
            torch.testing.assert_close(p, merged[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(p, merged[name], msg=name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_import_equals_peft_merge_and_unload(bases, tmp_path, capsys, layout):
    kind, config, *exact = LAYOUTS[layout]
    merged = peft_adapter(bases(kind), tmp_path / "adapter", **config)
    out = tmp_path / "d.safetensors"
    code, _, err = run(
        capsys, "import-lora", tmp_path / "adapter", "--base", bases(kind), "--out", out
    )
    assert code == 0, err
    assert_delta_gives(out, bases(kind), merged, exact=bool(exact))


def test_config_fields_peft_ignores_are_ignored_alike(workdir, tmp_path, capsys):
    """PEFT sets fan_in_fan_out from the layer type whatever the config says (False for
    nn.Linear), so a config claiming it for linear layers changes nothing, in PEFT as in lota."""
    from peft import PeftModel

    peft_adapter(workdir / "base", tmp_path / "adapter", target_modules=QKV)
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": True}))
    loaded = PeftModel.from_pretrained(load_model(str(workdir / "base")), tmp_path / "adapter")
    merged = loaded.merge_and_unload()
    want = {n: p.detach().clone() for n, p in merged.named_parameters()}
    out = tmp_path / "d.safetensors"
    code, _, err = run(
        capsys, "import-lora", tmp_path / "adapter", "--base", workdir / "base", "--out", out
    )
    assert code == 0, err
    assert_delta_gives(out, workdir / "base", want)


def test_a_config_rank_other_than_the_tensors_is_refused_as_peft_refuses_it(
    workdir, tmp_path, capsys
):
    from peft import PeftModel

    peft_adapter(workdir / "base", tmp_path / "adapter", target_modules=QKV)
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_model(str(workdir / "base")), tmp_path / "adapter")
    code, _, err = run(
        capsys,
        "import-lora",
        tmp_path / "adapter",
        "--base",
        workdir / "base",
        "--out",
        tmp_path / "d.safetensors",
    )
    assert_refused(code, _, err, "has shape [4, 64], not [8, 64]", "r = 8")
    assert not (tmp_path / "d.safetensors").exists()


# ---------------------------------------------------------------------------- hostile adapters
@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, bases):
    """A plain PEFT adapter (q, v and down projections, r 4) of the "llama" base: its config and
    tensors, for the hostile edits below."""
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("good") / "adapter"
    peft_adapter(bases("llama"), folder, target_modules=QKV)
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(folder / "adapter_model.safetensors")


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _set(**fields):
    return lambda cfg, t: cfg.update(fields)


def _tensor(key, value):
    return lambda cfg, t: t.__setitem__(key, value)


def _drop(key):
    return lambda cfg, t: t.pop(key)


def _nan_b(cfg, t):
    t[f"{Q}.lora_B.weight"][3, 1] = float("nan")


def _inf_a(cfg, t):
    t[f"{Q}.lora_A.weight"][0, 0] = float("inf")


def _no_prefix(cfg, t):
    t["model.layers.0.self_attn.q_proj.lora_A.weight"] = t.pop(f"{Q}.lora_A.weight")


# id -> (edit of (config dict, tensor dict), words of the one-line refusal)
HOSTILE = {
    "r-other-than-the-tensors": (_set(r=2), "not [2, 64]"),
    "rank-of-A-other-than-B": (_tensor(f"{Q}.lora_B.weight", torch.zeros(32, 3)), "[32, 3]"),
    "r-zero": (_set(r=0), "r is 0"),
    "r-negative-with-rslora": (_set(r=-4, use_rslora=True), "r is -4"),
    "r-float": (_set(r=4.0), "r is 4.0"),
    "r-bool": (_set(r=True), "r is true"),
    "alpha-nan": (_set(lora_alpha=float("nan")), "lora_alpha is NaN"),
    "alpha-inf": (_set(lora_alpha=float("inf")), "lora_alpha is Infinity"),
    "alpha-string": (_set(lora_alpha="8"), "lora_alpha is \"8\""),
    "invalid-regex": (_set(rank_pattern={"(": 4}), "rank_pattern key \"(\""),
    "backtracking-regex": (_set(rank_pattern={"(.*.*)*X": 4}), "(.*.*)*X"),
    "repetition": (_set(alpha_pattern={"layers.*q_proj": 4}), "alpha_pattern key"),
    "pattern-value-not-int": (_set(rank_pattern={"q_proj": 4.5}), "rank_pattern[\"q_proj\"] is 4.5"),
    "pattern-value-nan": (_set(alpha_pattern={"q_proj": float("nan")}), "is NaN"),
    "pattern-not-an-object": (_set(rank_pattern=[4]), "rank_pattern is [4]"),
    "flag-not-bool": (_set(use_dora="yes"), "use_dora is \"yes\""),
    "peft-type": (_set(peft_type="IA3"), "is not LORA"),
    "variant": (_set(alora_invocation_tokens=[1, 2]), "\"alora_invocation_tokens\""),
    "unknown-option": (_set(use_magic=True), "\"use_magic\""),
    "huge-integer-alpha": (lambda cfg, t: cfg.update(lora_alpha=10**400), "lora_alpha is 1000"),
    "too-many-pattern-keys": (_set(rank_pattern={f"m{i}": 4 for i in range(5000)}), "5,000 keys"),
    "base-rewriting-init": (_set(init_lora_weights="pissa"), "init_lora_weights \"pissa\""),
    "dora-with-lora-bias": (_set(use_dora=True, lora_bias=True), "use_dora and lora_bias"),
    "dora-without-magnitudes": (_set(use_dora=True), "no DoRA magnitude"),
    "magnitude-without-dora": (_tensor(f"{Q}.lora_magnitude_vector", torch.ones(32)), "DoRA magnitude"),
    "nan-weight": (_nan_b, f"tensor '{Q}.lora_B.weight' holds non-finite"),
    "inf-weight": (_inf_a, f"tensor '{Q}.lora_A.weight' holds non-finite"),
    "integer-weight": (_tensor(f"{Q}.lora_A.weight", torch.ones(4, 32, dtype=torch.int32)), "I32"),
    "key-without-prefix": (_no_prefix, "is not under 'base_model.model.'"),
    "unknown-part": (_tensor(f"{Q}.lora_E", torch.ones(4)), "lora_E' is not a part"),
    "missing-B": (_drop(f"{Q}.lora_B.weight"), "no matching lora_B"),
    "lone-lora-A": (
        _tensor("base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight", torch.ones(4, 32)),
        "no matching lora_B",
    ),
    "module-not-in-target-modules": (
        lambda cfg, t: cfg.update(target_modules=["v_proj", "down_proj"]),
        "which target_modules does not name",
    ),
    "module-the-base-lacks": (
        _tensor("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", torch.ones(4, 32)),
        "does not have",
    ),
    "whole-tensor-of-another-shape": (
        _tensor("base_model.model.model.norm.weight", torch.ones(31)), "has shape [31]"
    ),
    "whole-tensor-the-base-lacks": (
        _tensor("base_model.model.model.extra.weight", torch.ones(3)), "does not have"
    ),
    "token-out-of-range": (
        lambda cfg, t: (
            cfg.update(trainable_token_indices=[999]),
            t.__setitem__(
                "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
                torch.ones(1, 32),
            ),
        ),
        "names token 999",
    ),
    "token-repeated": (_set(trainable_token_indices=[3, 3]), "repeats a token id"),
}  # fmt: skip


def _hostile_folder(good_adapter, folder: Path, edit) -> Path:
    from safetensors.torch import save_file

    config, tensors = good_adapter
    config, tensors = json.loads(json.dumps(config)), {k: v.clone() for k, v in tensors.items()}
    edit(config, tensors)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_adapters_are_refused_in_one_line(good_adapter, bases, tmp_path, capsys, case):
    edit, words = HOSTILE[case]
    adapter = _hostile_folder(good_adapter, tmp_path / "adapter", edit)
    out = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "import-lora", adapter, "--base", bases("llama"), "--out", out)
    assert_refused(code, _, err, words)
    assert not out.exists()


@pytest.mark.parametrize(
    "text,words",
    [
        ("[]", "not a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels"),
        ('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than 64 levels"),
        ("{" + " " * (5 * 2**20) + "}", "larger than"),
        ("{'r': 4}", "not readable JSON"),
        ("\udcff", "not readable JSON"),
    ],
    ids=["list", "deep", "deep-field", "huge", "not-json", "not-utf8"],
)
def test_unreadable_adapter_configs_are_refused(
    good_adapter, tmp_path, capsys, workdir, text, words
):
    adapter = _hostile_folder(good_adapter, tmp_path / "adapter", lambda cfg, t: None)
    (adapter / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    code, _, err = run(
        capsys, "import-lora", adapter, "--base", workdir / "base", "--out", tmp_path / "d"
    )
    assert_refused(code, _, err, "adapter_config.json", words)


def test_shapes_are_checked_before_anything_is_computed(bases, tmp_path, capsys, monkeypatch):
    """A [1, 200000] A and a [200000, 1] B (1.6 MB) would make a 160 GB product: the header's
    shapes are refused against the base before any tensor is read or multiplied."""
    from safetensors.torch import save_file

    from lota import lora_import

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file(
        {
            f"{Q}.lora_A.weight": torch.zeros(1, 200_000),
            f"{Q}.lora_B.weight": torch.zeros(200_000, 1),
        },
        adapter / "adapter_model.safetensors",
    )
    computed = []
    monkeypatch.setattr(lora_import, "_merged", lambda *a: computed.append(a))
    code, _, err = run(
        capsys, "import-lora", adapter, "--base", bases("llama"), "--out", tmp_path / "d"
    )
    assert_refused(code, _, err, "[1, 200000], not [1, 32]")
    assert not computed


def test_pattern_keys_match_as_peft_reads_them():
    """The fixed-width matcher agrees with PEFT's own regex on every key it accepts."""
    import re

    from lota.lora_config import _parse_pattern, _pattern_matches

    modules = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.12.mlp.down_proj",
        "model.embed_tokens",
        "lm_head",
        "xq_proj",
        "model.layers.0.self_attn.q_projx",
    ]
    keys = [
        "q_proj", "self_attn.q_proj", "^model.layers.0.self_attn.q_proj", "^q_proj", "q.proj",
        r"layers\.\d.self_attn.q_proj", r"layers.\d\d.mlp.down_proj", "lm_head$", "^lm_head$",
        "embed_tokens", "model.embed_tokens", "proj", "_proj", "layers.1", "lm-head",
    ]  # fmt: skip
    for key in keys:
        pattern = _parse_pattern(key)
        assert pattern is not None, key
        for module in modules:
            want = bool(re.match(rf"(.*\.)?({key})$", module))
            assert _pattern_matches(pattern, module) == want, (key, module)
    for key in ["(.*.*)*X", "a|b", "q_proj+", "[0-9]", "a{2}", "(q)", "", "^", r"\w", "a b"]:
        assert _parse_pattern(key) is None, key


def test_tied_weights_peft_unties_are_refused(bases, tmp_path, capsys):
    """LoRA on a tied output head, or a tied embedding saved whole (modules_to_save), leaves the
    two names different after PEFT's merge; a delta for the shared tensor cannot say that."""
    for i, config in enumerate(
        [
            {"target_modules": ["q_proj", "lm_head"]},
            {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
        ]
    ):
        peft_adapter(bases("tied"), tmp_path / f"a{i}", **config)
        code, _, err = run(
            capsys,
            "import-lora",
            tmp_path / f"a{i}",
            "--base",
            bases("tied"),
            "--out",
            tmp_path / "d",
        )
        assert_refused(code, _, err, "ties to")
        assert not (tmp_path / "d").exists()
