"""Hostile model folders: custom code, FIFOs, shapes or dtypes that disagree with the config, and
shard indexes that point outside the folder or at pickles. Every command that reads a model folder
refuses them with one line and exit 2, before any code from the folder runs or any file blocks."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lota.cli import main

from .conftest import watch_fifo
from .test_cli import ADAPT, assert_refused, lota
from .test_resume import lota as run_lota

UP = "model.layers.0.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.layers.1.input_layernorm.weight"


def _commands(workdir, trained, tmp_path, bad) -> dict[str, list]:
    """Every command that reads a model folder, with ``bad`` in the model position named."""
    base, data, out = workdir / "base", workdir / "a.jsonl", tmp_path / "o"
    return {
        "adapt": ["adapt", bad, "--data", data, "--out", out, *ADAPT],
        "mask-base": ["mask", bad, base, "--out", out, "--quiet"],
        "mask-tuned": ["mask", base, bad, "--out", out, "--quiet"],
        "delta": ["delta", base, bad, "--sparsity", "0.9", "--out", out, "--quiet"],
        "apply": ["apply", bad, trained / "delta.safetensors", "--out", out],
        "eval": ["eval", bad, "--data", data],
        "merge": ["merge", bad, base, "--base", base, "--out", out],
        "ks": ["ks", base, bad, "--out", out],
    }


def _copy(workdir, tmp_path, name: str = "bad") -> Path:
    folder = tmp_path / name
    shutil.copytree(workdir / "base", folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(folder: Path, **tensors: torch.Tensor) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    for key, t in tensors.items():
        weights[{"up": UP, "q": Q, "norm": NORM}[key]] = t
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------- custom code
def _custom_code_folder(workdir, tmp_path, marker: Path, variant: str) -> Path:
    """A copy of the base whose config asks for the Python file beside it, which would leave
    ``marker`` behind if it were ever imported."""
    folder = _copy(workdir, tmp_path)
    (folder / "hostile.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
    )
    auto_map = {
        "AutoConfig": "hostile.HostileConfig",
        "AutoModelForCausalLM": "hostile.HostileForCausalLM",
    }
    if variant == "auto_map-unknown-type":
        _edit_json(folder / "config.json", model_type="hostile", auto_map=auto_map)
    elif variant == "auto_map-known-type":
        _edit_json(folder / "config.json", auto_map=auto_map)
    elif variant == "unknown-type":
        _edit_json(folder / "config.json", model_type="hostile")
    else:  # the tokenizer asks for code of its own
        _edit_json(
            folder / "tokenizer_config.json",
            auto_map={"AutoTokenizer": ["hostile.HostileTokenizer", None]},
        )
    return folder


@pytest.mark.parametrize(
    "command",
    ["adapt", "mask-base", "mask-tuned", "delta", "apply", "eval", "merge", "ks"],
)
def test_custom_code_never_runs_even_when_stdin_says_yes(
    workdir, trained, capsys, monkeypatch, tmp_path, command
):
    marker = tmp_path / "marker"
    bad = _custom_code_folder(workdir, tmp_path, marker, "auto_map-unknown-type")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 20))
    capsys.readouterr()
    code, out, err = lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command])
    assert_refused(code, out, err, str(bad), "runs no code")
    assert "custom code" not in out  # no question was asked
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("variant", ["auto_map-known-type", "unknown-type", "tokenizer-auto_map"])
@pytest.mark.parametrize("command", ["mask-tuned", "eval"])
def test_every_kind_of_custom_code_is_refused(
    workdir, trained, capsys, monkeypatch, tmp_path, variant, command
):
    marker = tmp_path / "marker"
    bad = _custom_code_folder(workdir, tmp_path, marker, variant)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 20))
    capsys.readouterr()
    assert_refused(
        *lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command]),
        str(bad),
        "runs no code",
    )
    assert not marker.exists()
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- special files
def _fifo_folder(workdir, tmp_path, name: str) -> Path:
    folder = _copy(workdir, tmp_path)
    if name == "model.safetensors.index.json":  # a sharded folder, so the index is what is read
        shard = "model-00001-of-00001.safetensors"
        (folder / "model.safetensors").rename(folder / shard)
    else:
        (folder / name).unlink()
    os.mkfifo(folder / name)
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "model.safetensors",
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ],
)
@pytest.mark.parametrize("command", ["mask-tuned", "eval"])
def test_fifo_in_a_model_folder_is_refused_without_blocking(
    workdir, trained, capsys, tmp_path, name, command
):
    bad = _fifo_folder(workdir, tmp_path, name)
    capsys.readouterr()
    flag = tmp_path / "opened"
    with watch_fifo(bad / name, flag):
        code, out, err = lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command])
    assert not flag.exists(), "lota opened the FIFO"
    assert_refused(code, out, err, name, "FIFO")
    assert not (tmp_path / "o").exists()


def test_symlinked_and_sharded_folders_still_load(workdir, capsys, tmp_path):
    """Regular files reached through symlinks (as in a hub cache) and sharded weights with a
    well-formed index are fine."""
    from lota.models import load_model
    from lota.targets import named_weights

    linked = tmp_path / "linked"
    linked.mkdir()
    for f in (workdir / "base").iterdir():
        (linked / f.name).symlink_to(f)
    sharded = _copy(workdir, tmp_path, "sharded")
    weights = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for shard in set(shards.values()):
        part = {n: weights[n] for n in names if shards[n] == shard}
        save_file(part, str(sharded / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": shards}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for folder in (linked, sharded):
        loaded = named_weights(load_model(str(folder)))
        assert all(torch.equal(loaded[n], weights[n]) for n in names)
        out = tmp_path / f"{folder.name}.safetensors"
        assert lota(capsys, "mask", workdir / "base", folder, "--out", out, "--quiet")[0] == 0


# ---------------------------------------------------------------------------- shapes and dtypes
SHAPES = {
    # one tensor stored transposed
    "weights": (lambda f: _edit_weights(f, up=torch.zeros(32, 64)), [UP, "[32, 64]", "[64, 32]"]),
    # the config promises a wider MLP than the weights hold
    "config": (
        lambda f: _edit_json(f / "config.json", intermediate_size=96),
        ["model.layers.0.mlp.", "[32, 64]", "[32, 96]"],
    ),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
@pytest.mark.parametrize(
    "command", ["adapt", "mask-base", "mask-tuned", "delta", "apply", "eval", "merge"]
)
def test_weight_shapes_that_disagree_with_the_config_are_refused(
    workdir, trained, capsys, tmp_path, case, command
):
    _assert_edit_refused(workdir, trained, capsys, tmp_path, SHAPES[case], command)


DTYPES = {
    "int32": (lambda f: _edit_weights(f, q=torch.ones(32, 32, dtype=torch.int32)), [Q, "I32"]),
    "bool": (lambda f: _edit_weights(f, norm=torch.ones(32, dtype=torch.bool)), [NORM, "BOOL"]),
}


@pytest.mark.parametrize("case", sorted(DTYPES))
@pytest.mark.parametrize("command", ["adapt", "mask-base", "mask-tuned", "delta", "eval", "merge"])
def test_integer_weights_for_float_parameters_are_refused(
    workdir, trained, capsys, tmp_path, case, command
):
    _assert_edit_refused(workdir, trained, capsys, tmp_path, DTYPES[case], command)


def _assert_edit_refused(workdir, trained, capsys, tmp_path, case, command) -> None:
    """``command`` on a copy of the base with the weights edited by ``case`` (edit, words) is
    refused in one line holding the words, and writes nothing."""
    bad = _copy(workdir, tmp_path)
    edit, words = case
    edit(bad)
    capsys.readouterr()
    assert_refused(*lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command]), *words)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- shard indexes
def _sharded_with(workdir, tmp_path, entry: str) -> Path:
    """A sharded copy of the base whose index sends the second half of the tensors to ``entry``
    (written there as a pickle or as safetensors, wherever that lands)."""
    folder = _copy(workdir, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({n: weights[n] for n in first}, str(folder / "model-00001-of-00002.safetensors"))
    target = Path(entry) if os.path.isabs(entry) else folder / entry
    if entry.endswith(".safetensors"):
        if entry != "missing.safetensors":
            save_file({n: weights[n] for n in second}, str(target), metadata={"format": "pt"})
    else:
        torch.save({n: weights[n] for n in second}, str(target))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: entry for n in second})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


@pytest.mark.parametrize(
    "entry",
    [
        "pytorch_model.bin",
        "model-00002-of-00002.pt",
        "../outside.safetensors",
        "ABSOLUTE",
        "missing.safetensors",
    ],
)
@pytest.mark.parametrize("command", ["adapt", "mask-tuned", "apply", "eval"])
def test_shard_index_names_only_safetensors_files_in_the_folder(
    workdir, trained, capsys, monkeypatch, tmp_path, entry, command
):
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "elsewhere.safetensors")
    bad = _sharded_with(workdir, tmp_path, entry)
    loads = []

    def record(*a, **k):
        loads.append(a)
        raise AssertionError("lota unpickled something")

    monkeypatch.setattr(pickle, "load", record)
    monkeypatch.setattr(torch, "load", record)
    capsys.readouterr()
    assert_refused(
        *lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command]),
        "model.safetensors.index.json",
        Path(entry).name,
    )
    assert not loads
    assert not (tmp_path / "o").exists()


def test_a_folder_with_a_peft_adapter_is_refused(workdir, trained, capsys, monkeypatch, tmp_path):
    """transformers would also load the adapter that adapter_config.json describes, from weights
    lota never checked, into the model."""
    bad = _copy(workdir, tmp_path)
    (bad / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": str(workdir / "base"),
                "target_modules": ["q_proj"],
                "r": 2,
                "lora_alpha": 2,
            }
        )
    )
    torch.save({}, str(bad / "adapter_model.bin"))
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or {})
    for command in ("eval", "apply", "adapt"):
        capsys.readouterr()
        assert_refused(
            *lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command]),
            "adapter_config.json",
        )
    assert not loads
    assert not (tmp_path / "o").exists()


def test_non_json_config_is_refused(workdir, capsys, tmp_path):
    bad = _copy(workdir, tmp_path)
    (bad / "config.json").write_text("{not json")
    assert main(["eval", str(bad), "--data", str(workdir / "a.jsonl")]) == 2
    assert_refused(2, *capsys.readouterr(), "config.json")


def test_fifo_in_an_adapter_folder_is_refused_without_blocking(workdir, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    fifo, flag = adapter / "adapter_model.safetensors", tmp_path / "blocked"
    os.mkfifo(fifo)
    with watch_fifo(fifo, flag):
        got = lota(capsys, "import-lora", adapter, "--base", workdir / "base", "--out",
                   tmp_path / "d.safetensors")  # fmt: skip
    assert not flag.exists(), "lota blocked opening the FIFO"
    assert_refused(*got, "adapter_model.safetensors", "not a regular file")


# ---------------------------------------------------------------------------- config values
@pytest.mark.parametrize(
    "field,value",
    [("num_attention_heads", 0), ("hidden_size", -32), ("vocab_size", "259"), ("head_dim", 1.5)],
)
@pytest.mark.parametrize("command", ["eval", "mask-tuned"])
def test_config_sizes_that_build_no_model_are_refused_naming_the_field(
    workdir, trained, capsys, tmp_path, field, value, command
):
    """A size the model is built from, zero, negative or not an integer: the config's problem,
    named as such (not the tokenizer's, which reads the config first)."""
    bad = _copy(workdir, tmp_path)
    _edit_json(bad / "config.json", **{field: value})
    got = lota(capsys, *_commands(workdir, trained, tmp_path, bad)[command])
    assert_refused(*got, "config.json", field)
    assert "tokenizer" not in got[2]


def test_a_config_of_more_layers_than_the_weights_is_refused_before_building(
    workdir, capsys, tmp_path, monkeypatch
):
    """A million layers would take minutes and gigabytes to build (on the meta device too)."""
    import transformers

    bad = _copy(workdir, tmp_path)
    _edit_json(bad / "config.json", num_hidden_layers=1_000_000)
    build = transformers.AutoModelForCausalLM.from_config

    def guarded(config, **kw):
        assert config.num_hidden_layers < 1000, "built a skeleton of the config's blocks"
        return build(config, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", guarded)
    commands = [
        ["eval", bad, "--data", workdir / "a.jsonl"],
        ["mask", bad, workdir / "base", "--out", tmp_path / "o"],
    ]
    for command in commands:
        got = lota(capsys, *command)
        assert_refused(*got, "config.json", "1,000,000 layers (num_hidden_layers)", "hold 2")
    assert not (tmp_path / "o").exists()


def test_token_ids_outside_the_vocabulary_in_config_json(workdir, tmp_path):
    """Run as a user runs it (a process of its own, transformers' logging as it starts): a pad
    id past the vocabulary builds no model and is one line naming it, not transformers' warnings
    and then an error; bos / eos ids past it (a small config keeping GPT-2's 50256, say) are not
    what lota feeds the model (the tokenizer's own tokens are), so the run works, silently."""
    bad, odd = _copy(workdir, tmp_path, "bad"), _copy(workdir, tmp_path, "odd")
    _edit_json(bad / "config.json", pad_token_id=99_998)
    for name in ("config.json", "generation_config.json"):
        _edit_json(odd / name, eos_token_id=99_999, bos_token_id=50_256)
    args = ["--data", workdir / "a.jsonl", "--quiet", "--limit", "2", "--max-new-tokens", "2"]
    refused = run_lota("eval", bad, *args)
    assert_refused(refused.returncode, refused.stdout, refused.stderr, "config.json",
                   "pad_token_id to 99998")  # fmt: skip
    ran = run_lota("eval", odd, *args)
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr


def _without_special_tokens(workdir, tmp_path) -> Path:
    folder = _copy(workdir, tmp_path)
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        tok.pop(key, None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((folder / name).read_text())
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            cfg.pop(key, None)
        (folder / name).write_text(json.dumps(cfg))
    return folder


def test_a_tokenizer_without_special_tokens(workdir, capsys, tmp_path):
    """No eos, pad or bos token: ``adapt`` needs eos (it ends every completion, so the model
    learns to stop) and says what to set; ``eval`` needs none (it pads with token 0, masked out,
    and generates --max-new-tokens)."""
    bare, out = _without_special_tokens(workdir, tmp_path), tmp_path / "o"
    got = lota(capsys, "adapt", bare, "--data", workdir / "a.jsonl", "--out", out, *ADAPT)
    assert_refused(*got, "no end-of-sequence token", '"eos_token"', "tokenizer_config.json")
    assert not out.exists()
    code, stdout, err = lota(capsys, "eval", bare, "--data", workdir / "a.jsonl", "--quiet",
                             "--limit", "2", "--max-new-tokens", "3")  # fmt: skip
    assert code == 0 and err == "", err
    assert "on 2 examples" in stdout


def test_a_tokenizer_token_outside_the_models_vocabulary_is_refused(workdir, capsys, tmp_path):
    from lota.toy import byte_tokenizer

    bad = _copy(workdir, tmp_path)
    tok = byte_tokenizer()
    tok.add_special_tokens({"eos_token": "<end>"})  # id 259, past the model's 259 rows
    tok.save_pretrained(bad)
    for command in (["eval", bad], ["adapt", bad, "--out", tmp_path / "o", *ADAPT]):
        got = lota(capsys, *command, "--data", workdir / "a.jsonl")
        assert_refused(*got, "eos_token '<end>' has id 259", "259-row vocabulary")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- weight values
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_base_with_non_finite_weights_is_refused_naming_the_tensor(
    workdir, capsys, tmp_path, value
):
    """Every output of such a model is NaN: refused at load, not reported later as a run that
    diverged (with the advice to lower --lr)."""
    bad = _copy(workdir, tmp_path)
    up = load_file(str(bad / "model.safetensors"))[UP]
    up[3, 5] = value
    _edit_weights(bad, up=up)
    out = tmp_path / "o"
    for command in (["adapt", bad, "--out", out, *ADAPT], ["eval", bad]):
        got = lota(capsys, *command, "--data", workdir / "a.jsonl")
        assert_refused(*got, "non-finite weights", f"'{UP}'")
        assert "--lr" not in got[2]
    assert not out.exists()
