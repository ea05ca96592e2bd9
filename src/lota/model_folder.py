"""What lota checks of a Hugging Face model folder before transformers sees it.

Only safetensors weights are read: lota never unpickles a model file. A folder is checked before
transformers sees it (``check_model_folder``): lota runs no code from it, opens no FIFO or device
in it, and loads no file its shard index names outside it; the config's sizes must build a model
and its layer count must be one the weights hold (checked before anything is built); the weights'
headers must match the architecture the config builds, in shape and in kind (floats for float
parameters) (``checked_headers``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, MismatchError
from .input_files import check_folder_files
from .keymap import KeyMap, KeyMapError

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
            f"{path.name} is not readable JSON ({first_line(e)})",
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
        f"config.json describes no model transformers can build ({first_line(e)})",
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
                f"unreadable safetensors file ({first_line(e)})",
                str(f),
                "the weights are corrupted; re-save the model",
            ) from None
    return where, headers


def checked_headers(folder: Path) -> tuple[nn.Module, dict[str, Path], KeyMap]:
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


def first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]
