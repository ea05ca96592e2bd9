"""PEFT LoRA adapters as lota deltas (``lota import-lora``).

The import computes what PEFT's ``merge_and_unload()`` writes into the base and stores the change
as a lota delta for that base (dense, or its exact global top-k with ``--sparsity``). Per adapted
layer the change is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with rsLoRA), ``r`` and ``lora_alpha`` resolved per layer through ``rank_pattern`` /
``alpha_pattern`` as PEFT resolves them; on top of that come DoRA's magnitude rescaling, LoRA on
embeddings, ``lora_bias``, trainable tokens and tensors PEFT loads whole (``modules_to_save``,
saved embedding layers, trained biases). Whatever else an adapter asks for is refused by name.

Key invariant: nothing is computed before every tensor's shape and dtype (from the safetensors
header) and every config field was checked against the base, and no non-finite value reaches the
output. Only safetensors adapter files are read; regular expressions from the config are never
compiled (pattern keys are matched by a fixed-length rule that reads PEFT's regex exactly).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .delta import SparseDelta
from .errors import FormatError, InputError, MismatchError
from .format import json_nesting
from .ticket import Ticket

PREFIX = "base_model.model."  # PEFT's key prefix; PEFT ignores keys without it
MAX_CONFIG_BYTES = 4 * 2**20  # a rank_pattern naming every layer of a 100-layer model is ~100 KB
MAX_CONFIG_DEPTH = 64
MAX_PATTERN_CHARS = 512
_FLOATS = {"F16", "BF16", "F32", "F64"}
_SAVED = "pass the folder written by PEFT's save_pretrained"
_OWN_BASE = "import the adapter against the base it was trained on"

# Key suffixes of the tensors PEFT saves for a LoRA layer, and the part each one is.
_PARTS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "a",
    ".lora_embedding_B": "b",
    ".lora_magnitude_vector": "magnitude",
    ".token_adapter.trainable_tokens_delta": "tokens",
}
# Config fields that do not change what the merge writes: PEFT reads them when it builds the
# layers, and the adapter file's own tensors already say which layers those are.
_INERT = {
    "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying",
    "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_dropout", "lora_ga_config", "megatron_core",
    "modules_to_save", "peft_type", "peft_version", "qalora_group_size", "revision",
    "runtime_config", "target_modules", "task_type",
}  # fmt: skip
_READ = {
    "r", "lora_alpha", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
    "trainable_token_indices", "init_lora_weights",
}  # fmt: skip
# init_lora_weights values whose saved tensors alone define the change; the others (PiSSA, OLoRA,
# CorDA, LoftQ, LoRA-GA) rewrite the base weights when PEFT builds the layer.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


@dataclass
class Settings:
    """The fields of ``adapter_config.json`` that decide the merged weights, checked."""

    r: int = 8  # PEFT's defaults for a field the file leaves out
    alpha: float = 8.0
    rslora: bool = False
    dora: bool = False
    lora_bias: bool = False
    rank_pattern: list = field(default_factory=list)  # [(key, parsed pattern, rank)]
    alpha_pattern: list = field(default_factory=list)
    tokens: list | dict | None = None
    targets: list | None = None  # target_modules when given as names
    excluded: list | None = None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        return _lookup(self.rank_pattern, module, self.r), _lookup(
            self.alpha_pattern, module, self.alpha
        )

    def scale(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / (math.sqrt(r) if self.rslora else r)


def read_settings(path: Path) -> Settings:
    """``adapter_config.json`` parsed with its size and nesting bounded before parsing, then every
    field that changes the merge type-checked; fields lota cannot honour are refused by name."""
    where = str(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise FormatError(f"the file is larger than {MAX_CONFIG_BYTES:,} bytes", where, _SAVED)
    try:
        text = raw.decode("utf-8")
        if json_nesting(text) > MAX_CONFIG_DEPTH:
            raise FormatError(
                f"the JSON is nested more than {MAX_CONFIG_DEPTH} levels deep", where, _SAVED
            )
        cfg = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"not readable JSON ({type(e).__name__})", where, _SAVED) from None
    if not isinstance(cfg, dict):
        raise FormatError("not a JSON object", where, _SAVED)
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(
            f"peft_type {json.dumps(peft_type)[:40]} is not LORA", where, "pass a LoRA adapter"
        )
    for key, value in cfg.items():
        if key not in _INERT and key not in _READ and value not in (None, False, 0, "", [], {}):
            raise InputError(
                f"the adapter sets {key!r}, a PEFT option whose merge lota does not reproduce",
                where,
                "merge the adapter with PEFT (merge_and_unload) and turn the model into a delta "
                "with 'lota delta BASE MERGED'",
            )
    init = cfg.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise InputError(
            f"init_lora_weights {json.dumps(init)[:40]} makes PEFT rewrite the base weights when "
            "it loads the adapter, which lota does not reproduce",
            where,
            "save the adapter with path_initial_model_for_weight_conversion (a plain LoRA), or "
            "merge it with PEFT and use 'lota delta BASE MERGED'",
        )
    s = Settings(
        r=_rank(cfg.get("r", 8), "r", where),
        alpha=_alpha(cfg.get("lora_alpha", 8), "lora_alpha", where),
        rslora=_flag(cfg, "use_rslora", where),
        dora=_flag(cfg, "use_dora", where),
        lora_bias=_flag(cfg, "lora_bias", where),
        rank_pattern=_patterns(cfg, "rank_pattern", _rank, where),
        alpha_pattern=_patterns(cfg, "alpha_pattern", _alpha, where),
        tokens=_token_indices(cfg.get("trainable_token_indices"), where),
        targets=_names(cfg.get("target_modules")),
        excluded=_names(cfg.get("exclude_modules")),
    )
    if s.dora and s.lora_bias:
        raise InputError("use_dora and lora_bias are both set; PEFT refuses that", where, _SAVED)
    return s


def _bad_field(name: str, value, want: str, where: str) -> InputError:
    return InputError(f"{name} is {json.dumps(value)[:60]}, not {want}", where, _SAVED)


def _rank(value, name: str, where: str) -> int:
    if type(value) is not int or not 0 < value <= 2**31:
        raise _bad_field(name, value, "a positive integer rank", where)
    return value


def _alpha(value, name: str, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > 1e30:
        raise _bad_field(name, value, "a finite number", where)
    return float(value)


def _flag(cfg: dict, name: str, where: str) -> bool:
    value = cfg.get(name, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise _bad_field(name, value, "true or false", where)
    return value


def _names(value) -> list | None:
    """A list of module names (PEFT's name-or-suffix rule applies), else None (not checked)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _patterns(cfg: dict, name: str, check, where: str) -> list:
    table = cfg.get(name) or {}
    if not isinstance(table, dict):
        raise _bad_field(name, table, "an object of module patterns", where)
    out = []
    for key, value in table.items():
        parsed = _parse_pattern(key)
        if parsed is None:
            raise InputError(
                f"{name} key {json.dumps(key)[:80]} is not a module name lota can match safely "
                "(it reads letters, digits, _ and -, '.', '\\.', '\\d', a leading ^ and a "
                "trailing $, as PEFT's regex does; repetition, groups and other regex syntax "
                "are not evaluated)",
                where,
                f"write {name} with the module names (or name suffixes) it should apply to",
            )
        out.append((key, parsed, check(value, f"{name}[{json.dumps(key)[:40]}]", where)))
    return out


_ANY, _DIGIT = object(), object()
_LITERAL = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _parse_pattern(key: str) -> tuple[bool, list] | None:
    """``(anchored, tokens)`` of a pattern key made only of fixed-width pieces, else None."""
    if len(key) > MAX_PATTERN_CHARS:
        return None
    anchored = key.startswith("^")
    body = key[1:] if anchored else key
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    tokens, i = [], 0
    while i < len(body):
        c = body[i]
        if c in _LITERAL:
            tokens.append(c)
        elif c == ".":
            tokens.append(_ANY)
        elif c == "\\" and body[i + 1 : i + 2] in (".", "d"):
            tokens.append("." if body[i + 1] == "." else _DIGIT)
            i += 1
        else:
            return None
        i += 1
    return (anchored, tokens) if tokens else None


def _pattern_matches(pattern: tuple[bool, list], module: str) -> bool:
    """PEFT's ``re.match(rf"(.*\\.)?({key})$", module)`` for a fixed-width key: the key matches
    the whole name, or (unless anchored with ^) a suffix that follows a '.'."""
    anchored, tokens = pattern
    start = len(module) - len(tokens)
    if start < 0 or (anchored and start) or (start and module[start - 1] != "."):
        return False
    for t, ch in zip(tokens, module[start:]):
        ok = ch != "\n" if t is _ANY else ch.isdecimal() if t is _DIGIT else ch == t
        if not ok:
            return False
    return True


def _lookup(table: list, module: str, default):
    for _, pattern, value in table:  # the first key that matches wins, as in PEFT
        if _pattern_matches(pattern, module):
            return value
    return default


def _token_indices(value, where: str):
    if value is None:
        return None
    tables = value.values() if isinstance(value, dict) else [value]
    for t in tables:
        if not isinstance(t, list) or not all(type(i) is int and 0 <= i < 2**40 for i in t):
            raise _bad_field(
                "trainable_token_indices",
                value,
                "a list of token ids (or an object of them)",
                where,
            )
        if len(set(t)) != len(t):
            raise InputError(
                "trainable_token_indices repeats a token id (PEFT's result would depend on the "
                "order it writes them in)",
                where,
                "list each token once",
            )
    return value


# ---------------------------------------------------------------------------- the file's layout
@dataclass
class Layer:
    """The tensors (safetensors keys) the adapter holds for one module."""

    module: str
    parts: dict = field(default_factory=dict)  # part -> key


def read_layout(f, where: str) -> tuple[dict[str, Layer], dict[str, str], dict[str, list]]:
    """``({module: Layer}, {parameter: key of a tensor PEFT loads whole}, {key: shape})`` of an
    opened adapter file, from its header alone."""
    layers: dict[str, Layer] = {}
    whole: dict[str, str] = {}
    shapes = {}
    for key in sorted(f.keys()):
        piece = f.get_slice(key)
        if piece.get_dtype() not in _FLOATS:
            raise FormatError(
                f"tensor '{key}' holds {piece.get_dtype()}, not floating-point values",
                where,
                _SAVED,
            )
        shapes[key] = list(piece.get_shape())
        if not key.startswith(PREFIX):
            raise FormatError(
                f"tensor '{key}' is not under '{PREFIX}' (PEFT would not load it)", where, _SAVED
            )
        rest = key[len(PREFIX) :]
        suffix = next((s for s in _PARTS if rest.endswith(s)), None)
        if suffix is not None:
            module = rest[: -len(suffix)]
            layer = layers.setdefault(module, Layer(module))
            part = _PARTS[suffix]
            if part in layer.parts:
                raise FormatError(
                    f"'{module}' has both lora_A/lora_B and lora_embedding_A/B", where, _SAVED
                )
            layer.parts[part] = key
        elif "lora_" in rest or ".token_adapter." in rest or ".modules_to_save." in rest:
            raise FormatError(
                f"tensor '{key}' is not a part of a LoRA adapter lota knows", where, _SAVED
            )
        else:
            module, base_layer, param = rest.rpartition(".base_layer.")
            name = f"{module}.{param}" if base_layer else rest
            if name in whole:
                raise FormatError(f"two tensors replace '{name}'", where, _SAVED)
            whole[name] = key
    return layers, whole, shapes


# ---------------------------------------------------------------------------- checks, then merge
@dataclass
class Plan:
    """What the merge does to one parameter of the base, in the order PEFT does it: load a tensor
    over it whole, add LoRA's product (DoRA: then rescale), add lora_B's bias, replace token rows."""

    name: str
    whole: str | None = None
    layer: Layer | None = None  # its LoRA, DoRA or trainable-tokens layer
    kind: str = "linear"  # linear | conv1d | embedding
    bias_of: Layer | None = None
    rows: list | None = None  # trainable token ids


def _kind(module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, Conv1D):
        return "conv1d"
    return "linear" if isinstance(module, torch.nn.Linear) else None


def plan_merge(layers, whole, shapes, s: Settings, reader, where: str) -> dict[str, Plan]:
    """Every parameter the adapter changes, each tensor's shape checked against the base."""
    from .models import tied_names

    aliases = {n: g for g in tied_names(reader.skeleton).values() if len(g) > 1 for n in g}
    modules = dict(reader.skeleton.named_modules())
    plans: dict[str, Plan] = {}

    def param(name: str, what: str) -> Plan:
        if name not in reader.shapes:
            others = [n for n in aliases.get(name, []) if n in reader.shapes]
            raise MismatchError(
                f"the adapter {what} '{name}', which the base "
                + (f"ties to '{others[0]}'" if others else "does not have")
                + " (lota imports adapters whose layers have weights of their own)",
                where,
                _OWN_BASE if not others else "merge with PEFT and use 'lota delta BASE MERGED'",
            )
        return plans.setdefault(name, Plan(name))

    for layer in layers.values():
        p = param(layer.module + ".weight", "adapts")
        p.layer, p.kind = layer, _kind(modules.get(layer.module))
        _check_layer(layer, p, s, shapes, reader, where)
        if "bias" in layer.parts:
            b = param(layer.module + ".bias", "adds lora_B's bias to")
            b.bias_of = layer
            _same_shape(layer.parts["bias"], shapes, [reader.shapes[b.name][0]], where)
        if "tokens" in layer.parts:
            p.rows = _rows_of(layer, s, reader, modules, where)
            _same_shape(
                layer.parts["tokens"], shapes, [len(p.rows), reader.shapes[p.name][1]], where
            )
    for name, key in whole.items():
        p = param(name, "replaces")
        plain = ".base_layer." not in key
        if plain and len(aliases.get(name, [])) > 1:
            raise MismatchError(
                f"the adapter replaces '{name}', which the base ties to "
                f"'{[n for n in aliases[name] if n != name][0]}' (PEFT's copy unties them)",
                where,
                "merge with PEFT and use 'lota delta BASE MERGED'",
            )
        if plain and name.rpartition(".")[0] in layers:
            raise FormatError(
                f"tensor '{key}' replaces a weight of a layer the adapter also adapts (PEFT "
                "saves those under base_layer)",
                where,
                _SAVED,
            )
        _same_shape(key, shapes, list(reader.shapes[name]), where)
        p.whole = key
    return plans


def _same_shape(key: str, shapes: dict, want: list, where: str) -> None:
    if shapes[key] != want:
        raise MismatchError(
            f"tensor '{key}' has shape {shapes[key]}, the base needs {want}", where, _OWN_BASE
        )


def _check_layer(layer: Layer, p: Plan, s: Settings, shapes, reader, where: str) -> None:
    parts, module = layer.parts, layer.module
    if p.kind is None:
        raise InputError(
            f"'{module}' is not a linear, Conv1D or embedding layer in the base",
            where,
            "lota imports LoRA on those layers only",
        )
    lora = "a" in parts or "b" in parts
    for part, needed in (("a", "b"), ("b", "a")):
        if part in parts and needed not in parts:
            raise FormatError(f"'{module}' has no matching lora_{needed.upper()}", where, _SAVED)
    embedding_keys = parts.get("a", "").endswith("lora_embedding_A")
    if lora and embedding_keys != (p.kind == "embedding"):
        raise FormatError(
            f"'{module}' is a {p.kind} layer, stored as "
            + ("an embedding's LoRA" if embedding_keys else "a linear layer's LoRA"),
            where,
            _SAVED,
        )
    if lora == ("tokens" in parts):
        raise FormatError(
            f"'{module}' has "
            + ("both LoRA and trainable tokens" if lora else "no lora_A / lora_B"),
            where,
            _SAVED,
        )
    if lora:
        _check_names(module, s, where)
        _check_extras(layer, p.kind, s, where)
        out, inp = reader.shapes[p.name] if p.kind == "linear" else reader.shapes[p.name][::-1]
        r, _ = s.rank_alpha(module)
        _same_shape(parts["a"], shapes, [r, inp], where)  # the config's rank, as PEFT builds it
        _same_shape(parts["b"], shapes, [out, r], where)
        if "magnitude" in parts:
            _same_shape(parts["magnitude"], shapes, [out], where)


def _check_names(module: str, s: Settings, where: str) -> None:
    def named(names):
        return module in names or any(module.endswith("." + n) for n in names)

    if s.targets is not None and not named(s.targets):
        raise FormatError(
            f"the adapter holds LoRA weights for '{module}', which target_modules does not name "
            "(PEFT would ignore them)",
            where,
            _SAVED,
        )
    if s.excluded is not None and named(s.excluded):
        raise FormatError(
            f"the adapter holds LoRA weights for '{module}', which exclude_modules excludes "
            "(PEFT would ignore them)",
            where,
            _SAVED,
        )


def _check_extras(layer: Layer, kind: str, s: Settings, where: str) -> None:
    for part, flag, name in (("magnitude", s.dora, "use_dora"), ("bias", s.lora_bias, "lora_bias")):
        if (part in layer.parts) != flag:
            what = "DoRA magnitude" if part == "magnitude" else "lora_B bias"
            raise FormatError(
                f"'{layer.module}' "
                + (
                    f"has no {what} though {name} is set"
                    if flag
                    else f"has a {what} though {name} is not set"
                ),
                where,
                _SAVED,
            )
    if "bias" in layer.parts and kind == "embedding":
        raise FormatError(f"'{layer.module}' is an embedding with a lora_B bias", where, _SAVED)


def _rows_of(layer: Layer, s: Settings, reader, modules: dict, where: str) -> list:
    module = layer.module
    if isinstance(s.tokens, dict):
        keys = [k for k in s.tokens if module.endswith(k)]  # PEFT's plain suffix rule
        rows = s.tokens[keys[0]] if len(keys) == 1 else None
    else:
        embedding = reader.skeleton.get_input_embeddings()
        is_input = s.tokens is not None and modules.get(module) is embedding
        rows = s.tokens if is_input else None
    if rows is None:
        raise FormatError(
            f"trainable_token_indices gives no single list of token ids for '{module}'",
            where,
            _SAVED,
        )
    vocab = reader.shapes[module + ".weight"][0]
    if any(i >= vocab for i in rows):
        raise MismatchError(
            f"trainable_token_indices names token {max(rows)}, the base's '{module}' has {vocab} "
            "rows",
            where,
            _OWN_BASE,
        )
    return rows


def _finite(t: torch.Tensor, what: str, where: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise FormatError(
            f"{what} holds non-finite values (NaN or inf)",
            where,
            "the adapter is broken; retrain or re-save it",
        )
    return t


def _merged(p: Plan, get, base, s: Settings, where: str) -> torch.Tensor:
    """The change PEFT's merge makes to ``p.name``, in float32."""
    layer = p.layer
    dora = layer is not None and "magnitude" in layer.parts
    needs_base = p.whole is not None or p.rows is not None or p.bias_of is not None or dora
    w0 = base(p.name) if needs_base else None
    new = get(p.whole) if p.whole is not None else w0
    if p.bias_of is not None:
        return _finite(new + get(p.bias_of.parts["bias"]) * s.scale(p.bias_of.module) - w0,
                       f"the change to '{p.name}'", where)  # fmt: skip
    if layer is not None and "a" in layer.parts:
        a, b = get(layer.parts["a"]), get(layer.parts["b"])
        delta = b @ a  # [out, in]
        delta = (delta if p.kind == "linear" else delta.T) * s.scale(layer.module)
        if new is None:
            return _finite(delta, f"the change to '{p.name}'", where)
        new = new + delta
        if dora:  # DoRA: each output's norm set to its magnitude
            norm = torch.linalg.norm(new if p.kind == "linear" else new.T, dim=1)
            factor = get(layer.parts["magnitude"]) / norm
            new = factor.view(-1, 1) * new if p.kind == "linear" else factor.view(1, -1) * new
    if p.rows is not None:
        new = new.index_copy(0, torch.tensor(p.rows), get(layer.parts["tokens"]))
    return _finite(new - w0, f"the change to '{p.name}'", where)


def lora_deltas(adapter: str, reader) -> dict[str, torch.Tensor]:
    """``{parameter name: dense float32 change}`` that merging the PEFT LoRA adapter folder
    ``adapter`` into the base of ``reader`` (a ``models.WeightReader``) makes."""
    from safetensors import safe_open

    folder = Path(adapter)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir() or not cfg_path.exists():
        raise InputError("not a PEFT adapter folder (no adapter_config.json)", adapter, _SAVED)
    if not weights_path.exists():
        raise InputError(
            "the adapter has no adapter_model.safetensors",
            adapter,
            "save the adapter with safe_serialization=True (lota reads no pickles)",
        )
    from .models import _refuse_special_files

    _refuse_special_files(folder, "adapter")  # a FIFO would block the open below
    settings = read_settings(cfg_path)
    where = str(weights_path)
    try:
        f = safe_open(str(weights_path), framework="pt")
    except Exception as e:
        raise FormatError(
            f"not a readable safetensors file ({type(e).__name__})", where, _SAVED
        ) from None
    with f:
        layers, whole, shapes = read_layout(f, where)
        plans = plan_merge(layers, whole, shapes, settings, reader, where)
        if not plans:
            raise InputError("the adapter holds no LoRA weights", adapter, "pass a LoRA adapter")

        def get(key: str) -> torch.Tensor:
            return _finite(f.get_tensor(key).to(torch.float32), f"tensor '{key}'", where)

        def base(name: str) -> torch.Tensor:
            return reader.get(name).to(torch.float32)

        return {n: _merged(plans[n], get, base, settings, where) for n in sorted(plans)}


def import_lora(adapter: str, base: str, sparsity: str | None = None) -> SparseDelta:
    """The adapter's change as a delta for ``base`` (dense, or its top-k at ``sparsity``)."""
    from . import selection
    from .models import WeightReader

    reader = WeightReader(base, "base model")
    changes = lora_deltas(adapter, reader)
    shapes = {n: tuple(c.shape) for n, c in sorted(changes.items())}
    if sparsity is None:
        indices = {n: torch.arange(math.prod(s)) for n, s in shapes.items()}
    else:
        k = selection.ticket_size(sparsity, sum(math.prod(s) for s in shapes.values()))
        ticket = selection.select("magnitude", shapes, k, delta_fn=lambda n: changes[n])
        indices = ticket.indices
    values = {n: changes[n].reshape(-1)[indices[n]].contiguous() for n in shapes}
    ticket = Ticket(shapes=shapes, indices=indices, base_fingerprint=reader.fingerprint())
    return SparseDelta(ticket, values)
