"""The contract every architecture users fine-tune meets, one row per architecture.

Each row is a tiny config built in memory and saved with ``save_pretrained``, so its folder holds
the checkpoint keys transformers writes (per-expert tensors of a mixture of experts, GPT-NeoX's
``embed_out``). Each step runs the CLI in-process: ``adapt`` (frozen entries bit-identical, k
exact), LoTTO (``--protect`` the first delta), ``mask`` and ``delta`` from folders (the ticket
equals the one ``adapt --calibrated`` selects in memory, the values equal the in-memory task
vector), ``apply`` (the written folder reloads equal to base + delta), ``merge`` of model
folders, ``export-peft`` (or its one-line refusal where the layers are not PEFT's), and ``ks``
(tied or untied embeddings). A new architecture is one row of ``ROWS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as T

from lota import format as fmt
from lota.cli import main
from lota.delta import apply_delta_
from lota.models import load_model
from lota.selection import Sparsity, numel_of, require_trainable
from lota.targets import default_targets, named_weights
from lota.toy import byte_tokenizer
from lota.weights import WeightReader

from .conftest import ADAPT, addition_rows, assert_only_ticket_changed, reverse_rows, write_jsonl

V = 259
IDS = {"vocab_size": V, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _sizes(**extra):
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        **IDS,
        **extra,
    }


MOE = {"num_experts_per_tok": 2, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Row:
    config: object  # a callable returning the config
    dtype: torch.dtype = torch.float32
    shard: str | None = None  # max_shard_size for save_pretrained
    peft: bool = True  # every default target is an nn.Linear weight SHiRA can hold
    experts: bool = False  # the default targets include fused 3-D expert weights
    marks: tuple = field(default=())


ROWS = {
    "llama": Row(lambda: T.LlamaConfig(**_sizes(tie_word_embeddings=False))),
    "llama-tied": Row(lambda: T.LlamaConfig(**_sizes(tie_word_embeddings=True))),
    "llama-bf16": Row(lambda: T.LlamaConfig(**_sizes(tie_word_embeddings=False)), torch.bfloat16),
    "llama-fp16": Row(lambda: T.LlamaConfig(**_sizes(tie_word_embeddings=False)), torch.float16),
    "llama-sharded": Row(lambda: T.LlamaConfig(**_sizes(tie_word_embeddings=False)), shard="40KB"),
    "mistral": Row(lambda: T.MistralConfig(**_sizes(tie_word_embeddings=False))),
    "qwen2": Row(lambda: T.Qwen2Config(**_sizes(tie_word_embeddings=False))),
    "qwen3": Row(lambda: T.Qwen3Config(**_sizes(head_dim=16, tie_word_embeddings=False))),
    "qwen3-moe": Row(
        lambda: T.Qwen3MoeConfig(
            **_sizes(head_dim=16, num_experts=4, moe_intermediate_size=16, **MOE)
        ),
        peft=False,
        experts=True,
    ),
    "qwen2-moe": Row(
        lambda: T.Qwen2MoeConfig(
            **_sizes(
                num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=32, **MOE
            )
        ),
        peft=False,
        experts=True,
    ),
    "mixtral": Row(
        lambda: T.MixtralConfig(**_sizes(num_local_experts=4, **MOE)), peft=False, experts=True
    ),
    "deepseek-v3": Row(
        lambda: T.DeepseekV3Config(
            **_sizes(
                n_routed_experts=4,
                n_shared_experts=1,
                moe_intermediate_size=16,
                first_k_dense_replace=1,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
                n_group=1,
                topk_group=1,
                **MOE,
            )
        ),
        peft=False,
        experts=True,
    ),
    "gemma2": Row(lambda: T.Gemma2Config(**_sizes(head_dim=16))),
    "gemma3": Row(lambda: T.Gemma3TextConfig(**_sizes(head_dim=16))),
    "phi3": Row(lambda: T.Phi3Config(**_sizes(tie_word_embeddings=False))),
    "gpt2": Row(
        lambda: T.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        ),
        peft=False,  # Conv1D layers
    ),
    "gpt-neox": Row(
        lambda: T.GPTNeoXConfig(
            **{k: v for k, v in _sizes(tie_word_embeddings=False).items() if "key_value" not in k}
        )
    ),
    "falcon": Row(
        lambda: T.FalconConfig(
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "opt": Row(
        lambda: T.OPTConfig(
            vocab_size=V,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "olmo2": Row(lambda: T.Olmo2Config(**_sizes(tie_word_embeddings=False))),
}
ARCHS = list(ROWS)


def lota(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _build(row: Row, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(row.config())
    return model.to(row.dtype)


def _save(model, row: Row, folder: Path) -> Path:
    kwargs = {"max_shard_size": row.shard} if row.shard else {}
    model.save_pretrained(folder, **kwargs)
    byte_tokenizer().save_pretrained(folder)
    return folder


@dataclass
class Arch:
    """A row's folders: the base, two dense fine-tunes of it, and the in-memory models."""

    row: Row
    dir: Path
    base: Path
    tuned: Path
    tuned2: Path
    models: dict  # "base", "tuned", "tuned2" -> in-memory model
    runs: dict = field(default_factory=dict)


def _perturbed(base, row: Row, seed: int):
    model = _build(row, 0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once, so they stay tied
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model


_CACHE: dict[str, Arch] = {}


@pytest.fixture
def arch(request, tmp_path_factory) -> Arch:
    name = request.param
    if name not in _CACHE:
        row = ROWS[name]
        d = tmp_path_factory.mktemp(name)
        base = _build(row, 0)
        tuned, tuned2 = _perturbed(base, row, 1), _perturbed(base, row, 2)
        _CACHE[name] = Arch(
            row,
            d,
            _save(base, row, d / "base"),
            _save(tuned, row, d / "tuned"),
            _save(tuned2, row, d / "tuned2"),
            {"base": base, "tuned": tuned, "tuned2": tuned2},
        )
        write_jsonl(d / "a.jsonl", addition_rows(16))
        write_jsonl(d / "b.jsonl", reverse_rows(16))
    return _CACHE[name]


def _params(names):
    return [pytest.param(n, marks=list(ROWS[n].marks), id=n) for n in names]


def _adapted(a: Arch, capsys, key: str, *extra) -> Path:
    """``lota adapt`` of the base, run once per row and settings."""
    if key not in a.runs:
        out = a.dir / key
        code, _, err = lota(capsys, "adapt", a.base, *extra, "--out", out, "--save-model", *ADAPT)
        assert code == 0, err
        a.runs[key] = out
    return a.runs[key]


def _expected_k(targets) -> int:
    return require_trainable(Sparsity.of("0.9"), numel_of(targets))


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_adapt_trains_exactly_k_entries_and_nothing_else(arch, capsys):
    run = _adapted(arch, capsys, "run", "--data", arch.dir / "a.jsonl")
    delta = fmt.load(run / "delta.safetensors")
    targets = default_targets(arch.models["base"])
    assert delta.ticket.shapes == dict(sorted(targets.items()))
    assert delta.nnz == _expected_k(targets)
    assert bool(torch.cat([v.float() for v in delta.values.values()]).ne(0).any())
    assert any(len(s) == 3 for s in targets.values()) == arch.row.experts
    assert not any(n.endswith(("gate.weight", "router.weight")) for n in targets)
    assert_only_ticket_changed(
        WeightReader(str(arch.base)), WeightReader(str(run / "model")), delta.ticket
    )


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_lotto_second_ticket_avoids_the_first(arch, capsys):
    first = _adapted(arch, capsys, "run", "--data", arch.dir / "a.jsonl")
    d1 = fmt.load(first / "delta.safetensors")
    second = _adapted(
        arch,
        capsys,
        "lotto",
        "--data",
        arch.dir / "b.jsonl",
        "--protect",
        first / "delta.safetensors",
    )
    d2 = fmt.load(second / "delta.safetensors")
    assert d2.nnz == d1.nnz and d2.ticket.overlap(d1.ticket) == 0


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_mask_and_delta_from_folders_name_the_model_parameters(arch, capsys, tmp_path):
    t, d = tmp_path / "t.safetensors", tmp_path / "d.safetensors"
    assert lota(capsys, "mask", arch.base, arch.tuned, "--out", t, "--quiet")[0] == 0
    code, _, err = lota(
        capsys, "delta", arch.base, arch.tuned, "--ticket", t, "--out", d, "--quiet"
    )
    assert code == 0, err
    ticket, delta = fmt.load(t), fmt.load(d)
    base, tuned = named_weights(arch.models["base"]), named_weights(arch.models["tuned"])
    assert ticket.shapes == dict(sorted(default_targets(arch.models["base"]).items()))
    assert ticket.nnz == _expected_k(ticket.shapes)
    for name, idx in delta.indices.items():  # the in-memory task vector at the ticket's entries
        want = (
            tuned[name].detach().reshape(-1)[idx].float()
            - base[name].detach().reshape(-1)[idx].float()
        )
        assert torch.equal(delta.values[name], want), name
    # the ticket from two folders is the one adapt selects in memory from the same fine-tune
    # (checked where the files store tensors under other keys than the parameters' names)
    reader = WeightReader(str(arch.base))
    if any(reader.keymap.is_renamed(n) for n in reader.shapes):
        run = _adapted(
            arch, capsys, "calibrated", "--data", arch.dir / "a.jsonl", "--calibrated", arch.tuned
        )
        adapted = fmt.load(run / "delta.safetensors").ticket
        assert adapted.shapes == ticket.shapes
        assert all(torch.equal(adapted.indices[n], ticket.indices[n]) for n in ticket.shapes)
        assert adapted.base_fingerprint == ticket.base_fingerprint


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_apply_writes_a_folder_that_reloads_as_base_plus_delta(arch, capsys, tmp_path):
    d = tmp_path / "d.safetensors"
    code, _, err = lota(
        capsys, "delta", arch.base, arch.tuned, "--sparsity", "0.9", "--out", d, "--quiet"
    )
    assert code == 0, err
    code, _, err = lota(capsys, "apply", arch.base, d, "--out", tmp_path / "applied", "--quiet")
    assert code == 0, err
    delta = fmt.load(d)
    want = _build(arch.row, 0)
    apply_delta_(named_weights(want), delta)
    got = named_weights(load_model(str(tmp_path / "applied")))
    reader = WeightReader(str(tmp_path / "applied"))
    for name, w in named_weights(want).items():
        assert torch.equal(got[name], w), name
        assert torch.equal(reader.get(name), w), name


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_merge_of_model_folders_sums_their_task_vectors(arch, capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    code, _, err = lota(
        capsys, "merge", arch.tuned, arch.tuned2, "--base", arch.base, "--out", out, "--quiet"
    )
    assert code == 0, err
    merged = fmt.load(out)
    base = named_weights(arch.models["base"])
    t1, t2 = named_weights(arch.models["tuned"]), named_weights(arch.models["tuned2"])
    assert merged.ticket.shapes == dict(sorted(default_targets(arch.models["base"]).items()))
    dense = merged.to_dense()
    for name in merged.ticket.shapes:
        w0 = base[name].detach().float()
        want = (t1[name].detach().float() - w0) + (t2[name].detach().float() - w0)
        assert torch.allclose(dense[name].float(), want, atol=1e-6), name


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_export_peft_holds_the_delta_or_refuses_in_one_line(arch, capsys, tmp_path):
    d = tmp_path / "d.safetensors"
    code, _, err = lota(
        capsys, "delta", arch.base, arch.tuned, "--sparsity", "0.99", "--out", d, "--quiet"
    )
    assert code == 0, err
    code, _, err = lota(
        capsys, "export-peft", d, "--base", arch.base, "--out", tmp_path / "peft", "--quiet"
    )
    if not arch.row.peft:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "lota apply" in err
        if arch.row.experts:
            assert "mlp.experts." in err
        return
    assert code == 0, err
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_model(str(arch.base)), str(tmp_path / "peft"))
    merged = named_weights(merged.merge_and_unload())
    want = _build(arch.row, 0)
    apply_delta_(named_weights(want), fmt.load(d))
    for name, w in named_weights(want).items():
        assert torch.equal(merged[name], w), name


def _untied(row: Row) -> bool:
    model = _build(row, 0)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head is None or head.weight is not emb.weight


@pytest.mark.parametrize("arch", _params(ARCHS), indirect=True)
def test_ks_selects_embedding_rows_tied_or_not(arch, capsys, tmp_path):
    out = tmp_path / "ks"
    code, _, err = lota(capsys, "ks", arch.base, arch.tuned, "--top", "3", "--out", out, "--quiet")
    assert code == 0, err
    ticket = fmt.load(out / "ticket.safetensors")
    ((name, shape),) = ticket.shapes.items()
    assert ticket.nnz == 3 * shape[1] and name == next(
        n
        for n, p in arch.models["base"].named_parameters()
        if p is arch.models["base"].get_input_embeddings().weight
    )
    assert math.prod(shape) == arch.models["base"].get_input_embeddings().weight.numel()
    # a tied fine-tune changed its head through the tie: the transfer carries it by the head's name
    transfer = fmt.load(out / "transfer.safetensors")
    heads = sorted(set(transfer.names) - {name})
    assert len(heads) == (0 if _untied(arch.row) else 1)
    for head in heads:
        assert torch.equal(transfer.indices[head], transfer.indices[name])
        assert torch.equal(transfer.values[head], transfer.values[name])
