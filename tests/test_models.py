"""Models: default and pattern targets, plain weight names, fingerprints, lazy weight reading."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lota
from lota.digests import fingerprint
from lota.errors import InputError
from lota.targets import default_targets, named_weights, resolve_targets
from lota.ticket import Ticket
from lota.toy import tiny_llama
from lota.weights import WeightReader, model_fingerprint

LINEARS = [
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
]


def small_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def flip_one_bit_(t: torch.Tensor, position: int = 0) -> None:
    with torch.no_grad():
        bits = t.view(-1).view(torch.int32)
        bits[position] ^= 1


# ---------------------------------------------------------------------------- targets
def test_default_targets_are_the_linear_weights_inside_the_blocks():
    model = tiny_llama(hidden=16, layers=2, heads=2)
    targets = resolve_targets(model)
    want = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in LINEARS]
    assert list(targets) == sorted(want)
    params = dict(model.named_parameters())
    assert all(targets[n] == tuple(params[n].shape) for n in targets)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in targets)


def test_default_targets_recognise_conv1d_layers_and_skip_layers_outside_blocks():
    class Conv1D(nn.Module):  # GPT-2's linear layer, recognised by its class name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 6))
            self.bias = nn.Parameter(torch.zeros(6))

    model = nn.Module()
    model.h = nn.ModuleList([nn.Module(), nn.Module()])
    for block in model.h:
        block.attn = Conv1D()
        block.proj = nn.Linear(4, 4)
    model.head = nn.Linear(4, 8)  # outside the repeated blocks
    assert default_targets(model) == {
        "h.0.attn.weight": (4, 6),
        "h.0.proj.weight": (4, 4),
        "h.1.attn.weight": (4, 6),
        "h.1.proj.weight": (4, 4),
    }


def test_a_model_without_blocks_has_no_default_targets():
    model = nn.Module()
    model.up, model.down = nn.Linear(4, 8), nn.Linear(8, 4)
    with pytest.raises(InputError, match="no linear layers inside transformer blocks") as e:
        resolve_targets(model)
    assert e.value.where == "--targets"


def test_a_pattern_selects_floating_point_parameters_in_name_order():
    model = tiny_llama(hidden=16, layers=2, heads=2)
    model.register_parameter(
        "steps", nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)
    )
    norms = resolve_targets(model, r"norm\.weight$")
    assert list(norms) == sorted(n for n, _ in model.named_parameters() if "norm.weight" in n)
    assert len(norms) == 2 * 2 + 1  # two per block, one final
    assert "steps" not in resolve_targets(model, ".")  # integers are never trainable
    assert list(resolve_targets(model, r"layers\.1\..*q_proj")) == [
        "model.layers.1.self_attn.q_proj.weight"
    ]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [("(", "invalid regular expression"), ("^nothing$", "matches no parameter")],
)
def test_a_bad_pattern_is_refused_naming_the_option(pattern, message):
    model = tiny_llama(hidden=16, layers=1, heads=2)
    with pytest.raises(InputError, match=message) as e:
        resolve_targets(model, pattern)
    assert e.value.where == "--targets"
    if message == "matches no parameter":
        assert "model.embed_tokens.weight" in e.value.fix  # an example of a real name


# ---------------------------------------------------------------------------- plain names
def test_named_weights_list_tied_weights_once():
    model = small_llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    weights = named_weights(model)
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    assert len(weights) == len({id(p) for p in weights.values()})
    assert "lm_head.weight" in named_weights(small_llama(tied=False))


def test_named_weights_of_a_prepared_model_are_its_plain_weights():
    model = small_llama()
    before = named_weights(model)
    targets = resolve_targets(model)
    name = next(iter(targets))
    ticket = Ticket(shapes=targets, indices={n: torch.tensor([0, 3]) for n in targets})
    lota.prepare(model, ticket)
    after = named_weights(model)
    assert list(after) == list(before)  # no ".parametrizations", ".original" or ".delta"
    assert (
        after[name] is model.get_submodule(name.rsplit(".", 1)[0]).parametrizations.weight.original
    )
    assert not any(p.requires_grad for p in after.values())


# ---------------------------------------------------------------------------- fingerprints
def test_the_fingerprint_is_stable_and_changes_with_one_bit():
    model = small_llama()
    fp = model_fingerprint(model)
    assert fp.startswith("blake2b:")
    assert model_fingerprint(model) == fp
    assert model_fingerprint(copy.deepcopy(model)) == fp
    assert model_fingerprint(small_llama(seed=0)) == fp
    assert model_fingerprint(small_llama(seed=1)) != fp
    w = model.model.layers[1].mlp.down_proj.weight
    flip_one_bit_(w, position=5)
    changed = model_fingerprint(model)
    assert changed != fp
    flip_one_bit_(w, position=5)
    assert model_fingerprint(model) == fp


def test_the_fingerprint_ignores_order_and_precision_but_not_names():
    model = small_llama()
    items = list(named_weights(model).items())
    assert fingerprint(items[::-1]) == fingerprint(items)
    halves = [(n, t.detach().to(torch.bfloat16)) for n, t in items]
    widened = [(n, t.float()) for n, t in halves]
    assert fingerprint(halves) == fingerprint(widened)  # bf16 hashed as its exact fp32 value
    renamed = [(n + "x" if i == 0 else n, t) for i, (n, t) in enumerate(items)]
    assert fingerprint(renamed) != fingerprint(items)


def test_preparing_a_model_keeps_its_fingerprint():
    model = small_llama()
    fp = model_fingerprint(model)
    targets = resolve_targets(model)
    lota.prepare(model, Ticket(shapes=targets, indices={n: torch.arange(4) for n in targets}))
    assert model_fingerprint(model) == fp


# ---------------------------------------------------------------------------- lazy weights
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [False, True])
def test_the_weight_reader_reads_what_the_model_holds(tmp_path, tied, shards):
    model = small_llama(tied=tied)
    folder = tmp_path / "model"
    model.save_pretrained(
        folder, safe_serialization=True, max_shard_size="20KB" if shards else "5GB"
    )
    assert (folder / "model.safetensors.index.json").exists() == shards
    reader = WeightReader(str(folder))
    weights = named_weights(model)
    assert reader.shapes == {n: tuple(t.shape) for n, t in weights.items()}
    for name, t in weights.items():
        assert torch.equal(reader.get(name), t.detach())
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(reader[name], weights[name].detach())
    assert reader.targets() == resolve_targets(model)
    assert reader.targets("norm") == resolve_targets(model, "norm")
    assert reader.fingerprint() == model_fingerprint(model)


def test_the_weight_reader_hashes_while_reading_to_the_same_fingerprint(tmp_path):
    model = small_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    reader = WeightReader(str(tmp_path))
    reader.hash_while_reading()
    for name in list(reader.shapes)[::2]:  # half read (and hashed) first, the rest on demand
        reader.get(name)
    assert reader.fingerprint() == model_fingerprint(model)
    flip_one_bit_(model.model.norm.weight)
    assert reader.fingerprint() != model_fingerprint(model)


def test_a_fingerprint_of_a_reader_hashing_while_reading_hashes_each_weight_once(tmp_path):
    """The fingerprint's own threads read the weights not yet hashed without handing them to the
    background hasher as well: each weight is hashed once, and no thread changes the reader's
    digests while another walks them (which failed as 'dictionary changed size during
    iteration' on a 135M-parameter model)."""
    from lota import events

    small_llama().save_pretrained(tmp_path, safe_serialization=True)
    reader = WeightReader(str(tmp_path))
    reader.hash_while_reading()
    reader.get(next(iter(reader.shapes)))
    hashed = []
    with events.subscribe(lambda e: hashed.append(e) if e.kind == "weight_hashed" else None):
        first = reader.fingerprint()
        assert len(hashed) == len(reader.shapes) - 1  # the one read before was hashed already
        assert reader.fingerprint() == first
    assert first == WeightReader(str(tmp_path)).fingerprint()


def test_the_weight_reader_refuses_a_tensor_the_files_lack(tmp_path):
    small_llama().save_pretrained(tmp_path, safe_serialization=True)
    reader = WeightReader(str(tmp_path))
    with pytest.raises(InputError, match="'lm_head.bias' is not in the weight files") as e:
        reader.get("lm_head.bias")
    assert e.value.where == str(tmp_path)


# ---------------------------------------------------------------------------- checkpoint keys
def _saved(tmp_path, arch: str):
    from .test_architectures import ROWS, _build

    model = _build(ROWS[arch], 0)
    model.save_pretrained(tmp_path / arch, safe_serialization=True)
    return model, tmp_path / arch


def _file_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3", "gpt-neox"])
def test_the_weight_reader_reads_parameters_stored_under_other_keys(tmp_path, arch):
    model, folder = _saved(tmp_path, arch)
    files = _file_tensors(folder)
    weights = named_weights(model)
    assert set(weights) - set(files)  # the files do not hold these parameters by their names
    reader = WeightReader(str(folder))
    assert reader.shapes == {n: tuple(t.shape) for n, t in weights.items()}
    for name, t in weights.items():
        assert torch.equal(reader.get(name), t.detach()), name
    assert reader.fingerprint() == model_fingerprint(model)
    flip_one_bit_(next(p for n, p in model.named_parameters() if n not in files))
    assert reader.fingerprint() != model_fingerprint(model)


def test_fused_experts_are_stacked_in_expert_order_gate_before_up(tmp_path):
    model, folder = _saved(tmp_path, "qwen3-moe")
    files, reader = _file_tensors(folder), WeightReader(str(folder))
    experts = model.config.num_experts
    for layer in range(model.config.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up, down = reader.get(p + "gate_up_proj"), reader.get(p + "down_proj")
        for e in range(experts):
            stored = [files[f"{p}{e}.{w}_proj.weight"] for w in ("gate", "up", "down")]
            assert torch.equal(gate_up[e], torch.cat(stored[:2]))
            assert torch.equal(down[e], stored[2])


def test_the_weight_reader_refuses_experts_of_another_config(tmp_path):
    import json

    from lota.errors import MismatchError

    _, folder = _saved(tmp_path, "mixtral")
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        MismatchError,
        match=r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' \(stored as .*block_sparse_moe.*\[4, 128, 32\]",
    ):
        WeightReader(str(folder))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2-moe", "qwen3-moe", "deepseek-v3"])
def test_default_targets_hold_every_expert_and_no_router(arch):
    from .test_architectures import ROWS, _build

    model = _build(ROWS[arch], 0)
    targets = default_targets(model)
    for layer, block in enumerate(model.model.layers):
        experts = getattr(block.mlp, "experts", None)
        if experts is None:
            continue
        for attr in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{attr}"
            assert targets[name] == tuple(getattr(experts, attr).shape)
    routers = [n for n in named_weights(model) if n.endswith(("mlp.gate.weight", "_gate.weight"))]
    assert routers and not set(routers) & set(targets)
    assert set(resolve_targets(model, r"mlp\.gate\.")) == {n for n in routers if "mlp.gate." in n}
    assert all(len(s) == 3 for s in resolve_targets(model, r"mlp\.experts\.[a-z_]+$").values())


def test_prepare_trains_only_the_ticket_of_fused_expert_weights():
    from .test_architectures import ROWS, _build

    model = _build(ROWS["mixtral"], 0)
    names = [n for n, s in default_targets(model).items() if len(s) == 3]
    before = {n: p.detach().clone() for n, p in named_weights(model).items()}
    g = torch.Generator().manual_seed(0)
    indices = {n: torch.randperm(before[n].numel(), generator=g)[:50].sort().values for n in names}
    ticket = Ticket({n: tuple(before[n].shape) for n in names}, indices)
    lota.prepare(model, ticket)
    opt = torch.optim.AdamW(lota.trainable_parameters(model), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(3, 259, (2, 12), generator=g)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    delta = lota.extract_delta(model)
    assert delta.nnz == 50 * len(names)
    lota.unprepare(model)
    for n, w in named_weights(model).items():
        changed = (w.detach() != before[n]).reshape(-1).nonzero().view(-1)
        if n in indices:
            assert set(changed.tolist()) <= set(indices[n].tolist()) and changed.numel() > 0, n
        else:
            assert changed.numel() == 0, n
