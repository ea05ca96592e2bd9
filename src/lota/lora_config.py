"""A PEFT LoRA adapter's ``adapter_config.json``, read as PEFT reads it and checked as a file from
anywhere must be (``lota import-lora``).

Only the fields that change the merged weights are kept (``Settings``): the rank and alpha per
layer, rsLoRA, DoRA, ``lora_bias`` and trainable tokens. Fields lota cannot reproduce (other LoRA
variants, initialisations that rewrite the base) are refused by name, and so is any field it does
not know that is set.

Key invariant: the file is never trusted to be small, shallow, well typed or harmless. Its size and
nesting are bounded before parsing, every value that is used is type-checked (a NaN, a string for a
number or a bool for an int is refused), and ``rank_pattern`` / ``alpha_pattern`` keys, which PEFT
compiles as regular expressions, are never compiled: a key made of fixed-width pieces is matched
by a rule equal to PEFT's regex, in time linear in the names; any other key is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FormatError, InputError
from .format import json_nesting

MAX_CONFIG_BYTES = 4 * 2**20  # a rank_pattern naming every layer of a 100-layer model is ~100 KB
MAX_CONFIG_DEPTH = 64
MAX_PATTERN_CHARS = 512
MAX_PATTERN_KEYS = 4096  # per table; each layer's lookup may try every key
SAVED = "pass the folder written by PEFT's save_pretrained"
_MERGE_WITH_PEFT = (
    "merge the adapter with PEFT (merge_and_unload) and turn the model into a delta with "
    "'lota delta BASE MERGED'"
)

# Fields that do not change what the merge writes: PEFT reads them while it builds the layers,
# and the adapter file's tensors already say which layers those are (target_modules and
# exclude_modules are compared with them when they are lists of names).
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
    rank_pattern: list = field(default_factory=list)  # [(parsed key, rank)], in the file's order
    alpha_pattern: list = field(default_factory=list)
    tokens: list | dict | None = None  # trainable_token_indices
    targets: set | None = None  # target_modules, when a list of names
    excluded: set | None = None

    def rank_alpha(self, module: str) -> tuple[int, float]:
        r = _lookup(self.rank_pattern, module, self.r)
        return r, _lookup(self.alpha_pattern, module, self.alpha)

    def scale(self, module: str) -> float:
        r, alpha = self.rank_alpha(module)
        return alpha / (math.sqrt(r) if self.rslora else r)

    def names(self, module: str, which: set | None) -> bool | None:
        """Whether ``which`` (targets or excluded) names ``module`` by PEFT's list rule: the
        whole name or a suffix after a '.' (None: the config gives no list to compare)."""
        if which is None:
            return None
        return any(s in which for s in _dotted_suffixes(module))

    def token_rows(self, module: str, is_input_embedding: bool) -> list | None:
        """The trainable token ids of ``module``: the list when the config gives one (it is for
        the input embedding), else the one entry whose key ends ``module`` (PEFT's suffix rule)."""
        if isinstance(self.tokens, dict):
            keys = [module[i:] for i in range(len(module) + 1) if module[i:] in self.tokens]
            return self.tokens[keys[0]] if len(keys) == 1 else None
        return self.tokens if is_input_embedding else None


def read_settings(path: Path) -> Settings:
    """``adapter_config.json`` parsed with its size and nesting bounded before parsing, then every
    field that changes the merge type-checked; fields lota cannot honour are refused by name."""
    where = str(path)
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise FormatError(f"the file is larger than {MAX_CONFIG_BYTES:,} bytes", where, SAVED)
    try:
        text = raw.decode("utf-8")
        if json_nesting(text) > MAX_CONFIG_DEPTH:
            raise FormatError(
                f"the JSON is nested more than {MAX_CONFIG_DEPTH} levels deep", where, SAVED
            )
        cfg = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"not readable JSON ({type(e).__name__})", where, SAVED) from None
    if not isinstance(cfg, dict):
        raise FormatError("not a JSON object", where, SAVED)
    _refuse_what_lota_does_not_reproduce(cfg, where)
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
        raise InputError("use_dora and lora_bias are both set; PEFT refuses that", where, SAVED)
    return s


def _refuse_what_lota_does_not_reproduce(cfg: dict, where: str) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(
            f"peft_type {json.dumps(peft_type)[:40]} is not LORA", where, "pass a LoRA adapter"
        )
    for key, value in cfg.items():
        if key not in _INERT and key not in _READ and value not in (None, False, 0, "", [], {}):
            raise InputError(
                f"the adapter sets {json.dumps(key)[:60]}, a PEFT option whose merge lota does "
                "not reproduce",
                where,
                _MERGE_WITH_PEFT,
            )
    init = cfg.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
        raise InputError(
            f"init_lora_weights {json.dumps(init)[:40]} makes PEFT rewrite the base weights when "
            "it loads the adapter, which lota does not reproduce",
            where,
            "save the adapter with path_initial_model_for_weight_conversion (a plain LoRA), or "
            + _MERGE_WITH_PEFT,
        )


def _bad_field(name: str, value, want: str, where: str) -> InputError:
    return InputError(f"{name} is {json.dumps(value)[:60]}, not {want}", where, SAVED)


def _rank(value, name: str, where: str) -> int:
    if type(value) is not int or not 0 < value <= 2**31:
        raise _bad_field(name, value, "a positive integer rank", where)
    return value


def _alpha(value, name: str, where: str) -> float:
    # compared before any conversion: a 400-digit integer does not fit a float; NaN fails too
    if type(value) not in (int, float) or not abs(value) <= 1e30:
        raise _bad_field(name, value, "a finite number", where)
    return float(value)


def _flag(cfg: dict, name: str, where: str) -> bool:
    value = cfg.get(name, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise _bad_field(name, value, "true or false", where)
    return value


def _names(value) -> set | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return set(value)
    return None  # PEFT's regex form (a string): not evaluated


def _dotted_suffixes(module: str) -> list[str]:
    return [module] + [module[i + 1 :] for i, c in enumerate(module) if c == "."]


def _patterns(cfg: dict, name: str, check, where: str) -> list:
    table = cfg.get(name) or {}
    if not isinstance(table, dict):
        raise _bad_field(name, table, "an object of module patterns", where)
    if len(table) > MAX_PATTERN_KEYS:
        raise InputError(
            f"{name} has {len(table):,} keys, more than the {MAX_PATTERN_KEYS:,} lota matches",
            where,
            f"write {name} with fewer keys (a suffix such as 'q_proj' covers every layer)",
        )
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
        out.append((parsed, check(value, f"{name}[{json.dumps(key)[:40]}]", where)))
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
    for pattern, value in table:  # the first key that matches wins, as in PEFT
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
