"""PEFT LoRA adapters as lota deltas (``lota import-lora``).

The import computes what PEFT's ``merge_and_unload()`` writes into the base and stores the change
as a lota delta for that base (dense, or its exact global top-k with ``--sparsity``). Per adapted
layer the change is ``scale * B @ A`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)``
with rsLoRA), ``r`` and ``lora_alpha`` resolved per layer through ``rank_pattern`` /
``alpha_pattern`` as PEFT resolves them; on top of that come DoRA's magnitude rescaling, LoRA on
embeddings, ``lora_bias``, trainable tokens and tensors PEFT loads whole (``modules_to_save``,
saved embedding layers, trained biases). Whatever else an adapter asks for is refused by name.
On a base whose output head is tied to the input embedding, PEFT's merge changes the one shared
tensor; the delta holds that change under both names, since ``lota apply`` gives a tied head its
own copy before adding a delta.

Key invariant: nothing is computed before every tensor's shape and dtype (from the safetensors
header) and every config field was checked against the base, and no non-finite value reaches the
output. Only safetensors adapter files are read; regular expressions from the config are never
compiled (pattern keys are matched by a fixed-length rule that reads PEFT's regex exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .delta import SparseDelta
from .errors import FormatError, InputError, MismatchError
from .input_files import check_folder_files
from .lora_config import SAVED, Settings, read_settings
from .ticket import Ticket

PREFIX = "base_model.model."  # PEFT's key prefix; PEFT ignores keys without it
_FLOATS = {"F16", "BF16", "F32", "F64"}
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
                SAVED,
            )
        shapes[key] = list(piece.get_shape())
        if not key.startswith(PREFIX):
            raise FormatError(
                f"tensor '{key}' is not under '{PREFIX}' (PEFT would not load it)", where, SAVED
            )
        rest = key[len(PREFIX) :]
        suffix = next((s for s in _PARTS if rest.endswith(s)), None)
        if suffix is not None:
            module = rest[: -len(suffix)]
            layer = layers.setdefault(module, Layer(module))
            part = _PARTS[suffix]
            if part in layer.parts:
                raise FormatError(
                    f"'{module}' has both lora_A/lora_B and lora_embedding_A/B", where, SAVED
                )
            layer.parts[part] = key
        elif "lora_" in rest or ".token_adapter." in rest or ".modules_to_save." in rest:
            raise FormatError(
                f"tensor '{key}' is not a part of a LoRA adapter lota knows", where, SAVED
            )
        else:
            module, base_layer, param = rest.rpartition(".base_layer.")
            name = f"{module}.{param}" if base_layer else rest
            if name in whole:
                raise FormatError(f"two tensors replace '{name}'", where, SAVED)
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
    from .targets import tied_names

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
                SAVED,
            )
        _same_shape(key, shapes, list(reader.shapes[name]), where)
        p.whole = key
    return plans


def _same_shape(key: str, shapes: dict, want: list, where: str, why: str = "the base's") -> None:
    if shapes[key] != want:
        raise MismatchError(
            f"tensor '{key}' has shape {shapes[key]}, not {want} ({why})", where, _OWN_BASE
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
            raise FormatError(f"'{module}' has no matching lora_{needed.upper()}", where, SAVED)
    embedding_keys = parts.get("a", "").endswith("lora_embedding_A")
    if lora and embedding_keys != (p.kind == "embedding"):
        raise FormatError(
            f"'{module}' is a {p.kind} layer, stored as "
            + ("an embedding's LoRA" if embedding_keys else "a linear layer's LoRA"),
            where,
            SAVED,
        )
    if lora == ("tokens" in parts):
        raise FormatError(
            f"'{module}' has "
            + ("both LoRA and trainable tokens" if lora else "no lora_A / lora_B"),
            where,
            SAVED,
        )
    if not lora and p.kind != "embedding":
        raise FormatError(f"'{module}' has trainable tokens but is a {p.kind} layer", where, SAVED)
    if lora:
        _check_names(module, s, where)
        _check_extras(layer, p.kind, s, where)
        out, inp = reader.shapes[p.name] if p.kind == "linear" else reader.shapes[p.name][::-1]
        r, _ = s.rank_alpha(module)  # PEFT builds the layer with the config's rank
        why = f"the base's layer and the config's r = {r}"
        _same_shape(parts["a"], shapes, [r, inp], where, why)
        _same_shape(parts["b"], shapes, [out, r], where, why)
        if "magnitude" in parts:
            _same_shape(parts["magnitude"], shapes, [out], where)


def _check_names(module: str, s: Settings, where: str) -> None:
    if s.names(module, s.targets) is False:
        raise FormatError(
            f"the adapter holds LoRA weights for '{module}', which target_modules does not name "
            "(PEFT would ignore them)",
            where,
            SAVED,
        )
    if s.names(module, s.excluded):
        raise FormatError(
            f"the adapter holds LoRA weights for '{module}', which exclude_modules excludes "
            "(PEFT would ignore them)",
            where,
            SAVED,
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
                SAVED,
            )
    if "bias" in layer.parts and kind == "embedding":
        raise FormatError(f"'{layer.module}' is an embedding with a lora_B bias", where, SAVED)


def _rows_of(layer: Layer, s: Settings, reader, modules: dict, where: str) -> list:
    module = layer.module
    is_input = modules.get(module) is reader.skeleton.get_input_embeddings()
    rows = s.token_rows(module, is_input)
    if rows is None:
        raise FormatError(
            f"trainable_token_indices gives no single list of token ids for '{module}'",
            where,
            SAVED,
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
    """The change PEFT's merge makes to ``p.name``, in float32 (``get``: an adapter tensor in
    float32, ``base``: the base's tensor as stored)."""
    layer = p.layer
    dora = layer is not None and "magnitude" in layer.parts
    needs_base = p.whole is not None or p.rows is not None or p.bias_of is not None or dora
    needs_base = needs_base or p.kind == "embedding"
    stored = base(p.name) if needs_base else None
    w0 = None if stored is None else stored.to(torch.float32)
    new = get(p.whole) if p.whole is not None else w0
    if p.bias_of is not None:
        new = new + get(p.bias_of.parts["bias"]) * s.scale(p.bias_of.module)
    elif layer is not None and "a" in layer.parts:
        a, b = get(layer.parts["a"]), get(layer.parts["b"])
        delta = b @ a  # [out, in]
        delta = (delta if p.kind == "linear" else delta.T) * s.scale(layer.module)
        if p.kind == "embedding" and not dora:  # PEFT rounds it to the weight's dtype first
            delta = delta.to(stored.dtype).to(torch.float32)
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
    ``adapter`` into the base of ``reader`` (a ``weights.WeightReader``) makes."""
    from safetensors import safe_open

    folder = Path(adapter)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not folder.is_dir() or not cfg_path.exists():
        raise InputError("not a PEFT adapter folder (no adapter_config.json)", adapter, SAVED)
    if not weights_path.exists():
        raise InputError(
            "the adapter has no adapter_model.safetensors",
            adapter,
            "save the adapter with safe_serialization=True (lota reads no pickles)",
        )
    check_folder_files(folder, "adapter")  # a FIFO would block the open below
    settings = read_settings(cfg_path)
    where = str(weights_path)
    try:
        f = safe_open(str(weights_path), framework="pt")
    except Exception as e:
        raise FormatError(
            f"not a readable safetensors file ({type(e).__name__})", where, SAVED
        ) from None
    with f:
        layers, whole, shapes = read_layout(f, where)
        plans = plan_merge(layers, whole, shapes, settings, reader, where)
        if not plans:
            raise InputError("the adapter holds no LoRA weights", adapter, "pass a LoRA adapter")

        def get(key: str) -> torch.Tensor:
            return _finite(f.get_tensor(key).to(torch.float32), f"tensor '{key}'", where)

        return {n: _merged(plans[n], get, reader.get, settings, where) for n in sorted(plans)}


def import_lora(adapter: str, base: str, sparsity: str | None = None) -> SparseDelta:
    """The adapter's change as a delta for ``base`` (dense, or its top-k at ``sparsity``)."""
    from . import selection
    from .targets import tied_embedding
    from .weights import WeightReader

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
    pair = tied_embedding(reader.skeleton)
    if pair is not None and pair[0] in shapes:  # PEFT's merge changes the head through the tie;
        emb, head = pair  # lota apply unties it, so the head's change is an entry of its own
        shapes[head], indices[head] = shapes[emb], indices[emb].clone()
        values[head] = values[emb].clone()  # a file holds no tensor twice
    ticket = Ticket(shapes=shapes, indices=indices, base_fingerprint=reader.fingerprint())
    return SparseDelta(ticket, values)
