"""Loading and saving Hugging Face models, choosing target tensors, reading weights lazily.

Only safetensors weights are read: lota never unpickles a model file. A folder is checked before
transformers sees it (``check_model_folder``): lota runs no code from it, opens no FIFO or device
in it, and loads no file its shard index names outside it; the config's sizes must build a model
and its layer count must be one the weights hold (checked before anything is built); the weights'
headers must match the architecture the config builds, in shape and in kind (floats for float
parameters), and their values must be finite.

Default targets are the weight matrices of every linear layer inside the transformer blocks (q, k,
v, o, gate, up, down on Llama) and every expert's weights of a mixture of experts (the fused 3-D
``mlp.experts.gate_up_proj`` and ``down_proj``); routers and gates, embeddings, the output head,
norms and biases are frozen entirely.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .digests import fingerprint, weight_digest
from .errors import InputError, MismatchError
from .fileio import atomic_dir
from .input_files import check_folder_files
from .keymap import KeyMap, KeyMapError
from .names import LOAD_DTYPES

_DTYPES = {name: name if name == "auto" else getattr(torch, name) for name in LOAD_DTYPES}
_BLOCK = re.compile(r"(^|\.)\d+\.")
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")  # its first match in a key: the block's index
_INDEX = "model.safetensors.index.json"


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advisory warnings (lota shows its own)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def resolve_model_path(path: str, what: str = "model") -> Path:
    """A local model folder, or a hub snapshot where a hub is reachable, that passed
    ``check_model_folder``: nothing else is ever handed to transformers."""
    p = Path(path)
    if p.is_dir():
        check_model_folder(p, what)
        return p
    if p.exists():
        raise InputError(
            f"{what} path is a file, not a model folder",
            str(p),
            "pass the folder that holds config.json",
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
            return resolve_model_path(local, what)
        except InputError:
            raise
        except Exception:
            raise InputError(
                f"{what} not found locally and the hub could not be reached",
                str(path),
                "pass a local model folder",
            ) from None
    raise InputError(f"{what} not found", str(p), "check the path")


# ---------------------------------------------------------------------------- hostile folders
def check_model_folder(folder: Path, what: str = "model") -> None:
    """Refuse a folder lota must not hand to transformers: one that needs Python code of its own
    (transformers would ask on the terminal, then import it), holds a special file (opening a FIFO
    blocks), holds a PEFT adapter (transformers would load its weights too), or has a shard index
    naming anything but safetensors files inside the folder. Only names, ``stat`` and JSON are
    read, so nothing from the folder runs or blocks before the refusal."""
    _refuse_special_files(folder, what)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise InputError(
            f"{what} folder has no config.json",
            str(folder),
            "pass a Hugging Face model folder (config, safetensors weights, tokenizer)",
        )
    config = _read_json(config_path)
    _refuse_custom_code(folder, config, what)
    _check_config_values(config, config_path)
    if (folder / "adapter_config.json").exists():
        raise InputError(
            f"the {what} folder holds a PEFT adapter (adapter_config.json), which transformers "
            "would load into the model",
            str(folder),
            "merge the adapter into its base first (merge_and_unload), or turn it into a delta "
            "with 'lota import-lora ADAPTER --base BASE'",
        )
    if not list(folder.glob("*.safetensors")):
        raise InputError(
            f"{what} folder has no safetensors weights",
            str(folder),
            "lota reads only safetensors; re-save the model with save_pretrained(safe_serialization=True)",
        )
    if (folder / _INDEX).exists():
        _index_shards(folder)


def _refuse_special_files(folder: Path, what: str) -> None:
    """Any entry transformers may open (the folder, and the tokenizer's chat-template folder)
    must be a regular file or a folder; a symlink counts as what it points to."""
    from transformers.utils import CHAT_TEMPLATE_DIR

    check_folder_files(folder, what, [CHAT_TEMPLATE_DIR])


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(
            f"{path.name} is not readable JSON ({_first_line(e)})",
            str(path),
            "restore the file, or re-save the model with save_pretrained",
        ) from None
    if not isinstance(obj, dict):
        raise InputError(
            f"{path.name} is not a JSON object",
            str(path),
            "restore the file, or re-save the model with save_pretrained",
        )
    return obj


# Sizes a model is built from (under the names architectures give them): zero, a negative number
# or a non-integer builds nothing, or divides by zero while building.
_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "n_positions",
    "n_ctx",
    "d_model",
    "num_layers",
    "num_heads",
    "ffn_dim",
)


def _check_config_values(config: dict, path: Path) -> None:
    """Refuse, naming the field, a config.json whose sizes or pad token id build no model (checked
    also in its ``text_config``)."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for field in _SIZES:
            value = cfg.get(field)
            if value is not None and (type(value) is not int or value < 1):
                raise InputError(
                    f"config.json sets {field} to {json.dumps(value)[:40]}, and a model needs a "
                    "positive integer there",
                    str(path),
                    f"set {field} to the model's value, or re-save the model with save_pretrained",
                )
        _check_pad_id(cfg, path)


def _check_pad_id(config: dict, path: Path) -> None:
    """The embedding reserves row ``pad_token_id`` for padding: an id outside the vocabulary
    (negative ids count from its end, as torch counts them) builds no model. Other special ids
    in the config are not lota's concern: it feeds the model the tokenizer's own tokens, checked
    against the vocabulary by ``check_special_tokens``."""
    vocab, pad = config.get("vocab_size"), config.get("pad_token_id")
    if type(vocab) is not int or pad is None:
        return
    if type(pad) is not int or not -vocab <= pad < vocab:
        raise InputError(
            f"config.json sets pad_token_id to {json.dumps(pad)[:40]}, which is not a token id "
            f"of the model's vocabulary (0 to {vocab - 1}), so the model cannot be built",
            str(path),
            "set pad_token_id to the id of the pad token in the tokenizer, or to null",
        )


def _refuse_custom_code(folder: Path, config: dict, what: str) -> None:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    reason = None
    if "auto_map" in config:
        reason = "config.json has auto_map"
    elif model_type is not None and (
        not isinstance(model_type, str) or model_type not in CONFIG_MAPPING
    ):
        reason = f"model_type {json.dumps(model_type)[:60]} is not one transformers implements"
    elif (folder / "tokenizer_config.json").exists():
        if "auto_map" in _read_json(folder / "tokenizer_config.json"):
            reason = "tokenizer_config.json has auto_map"
    if reason:
        raise InputError(
            f"the {what} needs Python code from its folder ({reason}), and lota runs no code "
            "from a model folder",
            str(folder),
            "use a model whose architecture transformers implements, or convert it to one",
        )


def _index_shards(folder: Path) -> list[str]:
    """The shard files ``model.safetensors.index.json`` names: each must be a safetensors file
    inside the folder, since transformers opens whatever the index names, pickles included."""
    path = folder / _INDEX
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(
            "the shard index has no weight_map of tensor names to file names",
            str(path),
            "restore the index, or re-save the model with save_pretrained",
        )
    shards = sorted(set(weight_map.values()))
    for name in shards:
        problem = None
        if Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            problem = "is not a file name inside the folder"
        elif not name.endswith(".safetensors"):
            problem = "is not a safetensors file (lota reads only safetensors)"
        elif not (folder / name).is_file():
            problem = "is missing from the folder"
        if problem:
            raise InputError(
                f"the shard index names {json.dumps(name)}, which {problem}",
                str(path),
                "re-save the model with save_pretrained(safe_serialization=True)",
            )
    return shards


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checked folder, as transformers picks them: the single file,
    else the shards its index names, else every safetensors file (which only lota reads)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / _INDEX).is_file():
        return [folder / n for n in _index_shards(folder)]
    return sorted(folder.glob("*.safetensors"))


def load_config(folder: Path):
    """The folder's config as transformers reads it; a config it cannot read, or whose values
    build no model, is refused naming config.json (and, where known, the field)."""
    from transformers import AutoConfig

    quiet_transformers()
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise _config_error(e, folder) from None


def _config_error(e: Exception, folder: Path) -> InputError:
    return InputError(
        f"config.json describes no model transformers can build ({_first_line(e)})",
        str(folder / "config.json"),
        "fix config.json, or re-save the model with save_pretrained",
    )


def _skeleton(folder: Path, headers: dict[str, tuple[list[int], str]]) -> nn.Module:
    """The model the config builds, on the meta device (no memory, no weights read), once its
    layer count was checked against the weights' ``headers``."""
    from transformers import AutoModelForCausalLM

    config = load_config(folder)
    _check_layers(config, headers, folder)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise _config_error(e, folder) from None


def _check_layers(config, headers: dict[str, tuple[list[int], str]], folder: Path) -> None:
    """Refuse a config asking for more blocks than the weights hold, before they are built (a
    million layers would take minutes and gigabytes to build only to be refused). A block's
    weights are the keys whose first number is its index (``model.layers.7.mlp...``)."""
    try:
        layers = config.get_text_config().num_hidden_layers
    except (AttributeError, ValueError):
        return
    if not isinstance(layers, int) or layers < 1:
        return
    stored = {m.group(1) for k in headers if (m := _BLOCK_INDEX.search(k))}
    if layers > len(stored):
        raise MismatchError(
            f"config.json asks for {layers:,} layers (num_hidden_layers) but the weights hold "
            f"{len(stored):,}",
            str(folder / "config.json"),
            "the weights and config.json belong to different models; put the weights' own "
            "config.json beside them, or re-save the model with save_pretrained",
        )


def _headers(folder: Path) -> tuple[dict[str, Path], dict[str, tuple[list[int], str]]]:
    """``{checkpoint key: file}`` and ``{key: (shape, dtype)}`` of a folder's weights, from the
    safetensors headers alone."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    headers: dict[str, tuple[list[int], str]] = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    headers[k] = (h.get_slice(k).get_shape(), h.get_slice(k).get_dtype())
                    where[k] = f
        except Exception as e:
            raise InputError(
                f"unreadable safetensors file ({_first_line(e)})",
                str(f),
                "the weights are corrupted; re-save the model",
            ) from None
    return where, headers


def _checked(folder: Path) -> tuple[nn.Module, dict[str, Path], KeyMap]:
    """The folder's skeleton, ``{checkpoint key: file}`` and the ``KeyMap`` from those keys to
    the model's parameters, after the weights' headers were checked against the config."""
    where, headers = _headers(folder)
    skeleton = _skeleton(folder, headers)
    return skeleton, where, _check_headers(skeleton, where, headers)


def _check_headers(
    skeleton: nn.Module, where: dict[str, Path], headers: dict[str, tuple[list[int], str]]
) -> KeyMap:
    """The ``KeyMap`` from the weights' keys to the model's parameters. A parameter is refused
    when the shape its keys convert to differs from the config's (the weights belong to another
    config) or when a key it comes from holds integers or bools for a floating-point parameter
    (used as weights, they would compute nonsense without any error)."""
    expected = skeleton.state_dict()
    keymap = KeyMap(skeleton, headers)
    for name in keymap.names:
        want, keys = expected[name], keymap.sources(name)
        if want.is_floating_point():
            for k in keys:
                if not headers[k][1].startswith(("F", "BF")):
                    raise InputError(
                        f"tensor '{k}' is stored as {headers[k][1]}, but the model's parameter "
                        f"'{name}' is floating point",
                        str(where[k]),
                        "lota reads float weights (F32, BF16, F16); save the model unquantized "
                        "with save_pretrained",
                    )
    try:
        shapes = keymap.shapes(headers)
    except KeyMapError as e:
        raise MismatchError(
            f"tensors {_keys_label(e.keys)} do not convert into parameter '{e.name}' ({e.reason})",
            str(where[e.keys[0]]),
            "the weights and config.json belong to different models; put the weights' own "
            "config.json beside them, or re-save the model with save_pretrained",
        ) from None
    for name, shape in shapes.items():
        want = expected.get(name)
        if want is not None and list(shape) != list(want.shape):
            keys = keymap.sources(name)
            label = f"'{name}'" if keys == [name] else f"'{name}' (stored as {_keys_label(keys)})"
            raise MismatchError(
                f"tensor {label} has shape {list(shape)} in the weights but "
                f"{list(want.shape)} in the architecture config.json describes",
                str(where[keys[0]]),
                "the weights and config.json belong to different models; put the weights' own "
                "config.json beside them, or re-save the model with save_pretrained",
            )
    return keymap


def _keys_label(keys: list[str]) -> str:
    more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
    return f"'{keys[0]}'{more}"


# ---------------------------------------------------------------------------- loading
def load_model(
    path: str, dtype: str = "auto", device: torch.device | str | None = None
) -> nn.Module:
    """A checked folder's model, read from its safetensors files only (no code from it runs).

    ``dtype`` ``auto`` keeps the checkpoint's dtype. With a GPU ``device`` the weights are read
    straight onto it, shard by shard (no whole copy in host memory first)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(path)
    _checked(folder)
    device = torch.device(device) if device is not None else None
    onto = {"device_map": {"": device}} if device is not None and device.type != "cpu" else {}
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                str(folder),
                dtype=_DTYPES[dtype],
                use_safetensors=True,
                trust_remote_code=False,
                **onto,
            )
    except Exception as e:
        raise InputError(
            f"cannot load the model ({_first_line(e)})",
            str(folder),
            "check that it is a causal language model saved with save_pretrained",
        ) from None
    _check_finite(model, folder)
    model.lota_source = str(folder)
    return model


def _check_finite(model: nn.Module, folder: Path, chunk: int = 1 << 24) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: every output of such a
    model is NaN, which training would otherwise report as a diverged run. One pass, a tensor
    at a time, in slices, so the check needs no memory beyond a slice's flags."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            flat = p.detach().reshape(-1)
            if any(
                not bool(torch.isfinite(flat[i : i + chunk]).all())
                for i in range(0, flat.numel(), chunk)
            ):
                raise InputError(
                    f"the model has non-finite weights (NaN or inf) in tensor '{name}'",
                    str(folder),
                    "restore the model's weights from a good copy (a model that computes NaN "
                    "cannot be adapted or evaluated)",
                )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' own non-reentrant activation checkpointing of each block; the KV cache is off
    in training anyway. A model that does not support it is refused in one line."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(
            f"{type(model).__name__} does not support gradient checkpointing",
            "--gradient-checkpointing",
            "drop --gradient-checkpointing (or lower --batch-size / --max-length)",
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_tokenizer(path: str):
    """A checked folder's tokenizer (its code, if it names any, is refused before this)."""
    from transformers import AutoTokenizer

    folder = resolve_model_path(path)
    load_config(folder)  # a broken config is the config's problem, not the tokenizer's
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise InputError(
            f"cannot load the tokenizer ({_first_line(e)})",
            str(folder),
            "save the tokenizer into the model folder (tokenizer.save_pretrained)",
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_special_tokens(tokenizer, model: nn.Module, folder: str, need_eos: bool) -> None:
    """The tokenizer's end-of-sequence and padding tokens, which lota feeds to the model, are
    tokens of the model's vocabulary; with ``need_eos`` (training: each completion ends with it,
    so the model learns where to stop) there must be an end-of-sequence token at all. Without a
    pad token lota pads with eos, or with token 0 (padding is masked out either way)."""
    if need_eos and tokenizer.eos_token_id is None:
        raise InputError(
            "the tokenizer has no end-of-sequence token, which lota appends to every completion "
            "so that the model learns where to stop",
            str(folder),
            'set "eos_token" in the model\'s tokenizer_config.json to the token that ends a '
            "reply (e.g. its chat template's end of turn)",
        )
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    for what in ("eos", "pad"):
        token_id = getattr(tokenizer, f"{what}_token_id")
        if rows is not None and token_id is not None and not 0 <= token_id < rows:
            raise InputError(
                f"the tokenizer's {what}_token {getattr(tokenizer, f'{what}_token')!r} has id "
                f"{token_id}, which is not a token of the model's {rows:,}-row vocabulary",
                str(folder),
                f'set "{what}_token" in tokenizer_config.json to a token of the model\'s '
                "vocabulary",
            )


def save_model(
    model: nn.Module,
    tokenizer,
    folder: str | os.PathLike,
    extra: dict | None = None,
    json_files: dict[str, object] | None = None,
) -> None:
    """Write a loadable model folder atomically (weights, config, tokenizer, ``extra`` as
    ``lota.json`` and each of ``json_files`` under its name)."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra:
            (tmp / "lota.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        for name, obj in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


# ---------------------------------------------------------------------------- targets
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_router(module_name: str) -> bool:
    """A mixture-of-experts router or gate (``mlp.gate``, ``router``, ``shared_expert_gate``):
    it picks experts rather than computing features, so it is not a default target."""
    last = module_name.rpartition(".")[2]
    return last == "gate" or last.endswith("_gate") or "router" in last


def _is_experts(module_name: str, module: nn.Module) -> bool:
    """A block's fused experts (``mlp.experts``): one 3-D parameter per projection."""
    return module_name.endswith(".experts") or type(module).__name__.endswith("Experts")


def default_targets(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weights of linear layers inside the repeated transformer blocks, routers and gates
    excepted, and every fused expert weight (the 3-D parameters of a mixture of experts)."""
    out = {}
    for module_name, module in model.named_modules():
        if not _BLOCK.search(module_name + "."):
            continue
        if (
            _is_linear(module)
            and not _is_router(module_name)
            and isinstance(getattr(module, "weight", None), nn.Parameter)
        ):
            out[f"{module_name}.weight"] = tuple(module.weight.shape)
        elif _is_experts(module_name, module) and not _is_linear(module):
            for attr, p in module.named_parameters(recurse=False):
                if p.dim() >= 3 and p.is_floating_point():
                    out[f"{module_name}.{attr}"] = tuple(p.shape)
    return out


def resolve_targets(model: nn.Module, pattern: str | None = None) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the eligible tensors: the default set, or parameters matching ``pattern``."""
    if pattern is None:
        targets = default_targets(model)
        if not targets:
            raise InputError(
                "found no linear layers inside transformer blocks",
                "--targets",
                "pass --targets REGEX matching the weights to adapt",
            )
        return dict(sorted(targets.items()))
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise InputError(
            f"invalid regular expression ({e})", "--targets", "fix the pattern"
        ) from None
    targets = {
        n: tuple(p.shape)
        for n, p in model.named_parameters()
        if rx.search(n) and p.is_floating_point()
    }
    if not targets:
        example = next(iter(n for n, _ in model.named_parameters()), "")
        raise InputError(
            f"pattern '{pattern}' matches no parameter",
            "--targets",
            f"match parameter names such as '{example}'",
        )
    return dict(sorted(targets.items()))


def named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their plain names (also for models prepared by lota)."""
    out = {}
    for name, p in model.named_parameters():
        name = name.replace(".parametrizations.", ".").replace(".original", "")
        if not name.endswith(".delta"):
            out[name] = p
    return out


def tied_names(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): every name it has}``: a tied parameter has several."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def model_fingerprint(model: nn.Module) -> str:
    return fingerprint(named_weights(model).items())


def differing_weight(model: nn.Module, reader: WeightReader) -> str | None:
    """The first parameter of ``model`` (by name) whose name, shape or values differ from the
    folder ``reader`` reads, or None when the model holds the folder's weights exactly: then the
    two have one fingerprint, and the folder's (``reader.fingerprint()``, hashed from the host's
    copy as it is read, see ``hash_while_reading``) is the model's without hashing it again. Values
    are compared as fingerprints see them (16-bit floats widened to float32, bit for bit), on the
    parameter's device: a GPU's weights never come over to the host."""
    live = named_weights(model)
    names = sorted(set(live) | set(reader.shapes))
    for name in names:
        if name not in live or name not in reader.shapes:
            return name
        p = live[name].detach()
        if tuple(p.shape) != reader.shapes[name] or not _same_values(p, reader.get(name)):
            return name
    return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit as ``weight_digest`` hashes them (floats widened to float32)."""

    def widened(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        return t.contiguous().reshape(-1)

    a, b = widened(a), widened(b.to(a.device))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        kind = torch.int64 if a.dtype == torch.float64 else torch.int32
        a, b = a.view(kind), b.view(kind)
    return torch.equal(a, b)


# ---------------------------------------------------------------------------- lazy weights
class WeightReader:
    """Read a model folder's parameters one at a time, by their in-memory names, from the
    (sharded) safetensors files transformers would load, after their headers were checked against
    the config. A parameter stored under another key, or fused from several (experts), is read
    through transformers' own conversion (``KeyMap``)."""

    def __init__(self, path: str, what: str = "model"):
        self.folder = resolve_model_path(path, what)
        self.skeleton, self.where, self.keymap = _checked(self.folder)
        self.shapes = {n: tuple(p.shape) for n, p in named_weights(self.skeleton).items()}
        self._digests: dict = {}  # name -> hex digest, or a future of one
        self._pool = None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if not self.keymap.sources(name):
            raise InputError(
                f"tensor '{name}' is not in the weight files",
                str(self.folder),
                "the weights do not match the config's architecture",
            )

        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}  # each file opened once for a fused parameter's keys

            def read_key(key: str) -> torch.Tensor:
                f = self.where[key]
                if f not in handles:
                    handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
                return handles[f].get_tensor(key)

            t = self.keymap.read(name, read_key)
        if self._pool is not None and name not in self._digests:
            self._bound_pending()
            self._digests[name] = self._pool.submit(weight_digest, t)
        return t

    __getitem__ = get

    def hash_while_reading(self) -> None:
        """Hash each tensor the first time it is read, in a background thread, so that
        ``fingerprint`` costs no extra pass over the files (hashing runs beside the caller's work)."""
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lota-hash")

    def _bound_pending(self, most: int = 4) -> None:
        pending = [f for f in self._digests.values() if not isinstance(f, str) and not f.done()]
        for f in pending[: max(0, len(pending) - most + 1)]:
            f.result()  # tensors wait in the queue; keep only a few of them alive at once

    def targets(self, pattern: str | None = None) -> dict[str, tuple[int, ...]]:
        return resolve_targets(self.skeleton, pattern)

    def fingerprint(self) -> str:
        items = []
        for n in self.shapes:
            d = self._digests.get(n)
            if d is None:
                items.append((n, lambda n=n: self.get(n)))
            else:
                items.append((n, d if isinstance(d, str) else d.result()))
        return fingerprint(items)
