"""The tensors lota adapts (targets), a model's parameters by their plain names, and its tied
input and output embeddings (untied where a change of the input embedding must leave the head).

Default targets are the weight matrices of every linear layer inside the transformer blocks (q, k,
v, o, gate, up, down on Llama) and every expert's weights of a mixture of experts (the fused 3-D
``mlp.experts.gate_up_proj`` and ``down_proj``); routers and gates, embeddings, the output head,
norms and biases are frozen entirely.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import InputError

_BLOCK = re.compile(r"(^|\.)\d+\.")


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


# ---------------------------------------------------------------------------- tied embeddings
UNTIED = "lota_untied"  # set on a model whose output head ``untie_embeddings`` gave its own copy


def tied_embedding(model: nn.Module) -> tuple[str, str] | None:
    """``(input embedding, output head)`` parameter names where the output head reads the input
    embedding's weight (tied embeddings, ``tie_word_embeddings``), else None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is None or getattr(head, "weight", None) is not weight:
        return None
    head_module = next(n for n, m in model.named_modules() if m is head)
    return tied_names(model)[id(weight)][0], f"{head_module}.weight"


def tied_to(model: nn.Module, names) -> tuple[str, str] | None:
    """``(name, other name)`` for the first of ``names`` that names a tied embedding's weight."""
    pair = tied_embedding(model)
    for name in pair or ():
        if name in names:
            return name, pair[1] if name == pair[0] else pair[0]
    return None


def untie_embeddings(model: nn.Module, names=None) -> str | None:
    """Give an output head tied to the input embedding its own copy of the weight, bit-identical
    and frozen, and mark the config untied (``tie_word_embeddings`` false), so that a change of
    the input embedding leaves the head as it was and the model saves (``save_pretrained``) and
    loads as an untied one. With ``names`` (tensor names), only where they name the tied weight.
    Returns the head's name where it untied, else None.

    Cost: one more vocabulary x hidden matrix in the weights' dtype. A fingerprint counts the
    copy as the tie it replaced (``untied_copy``), so the model keeps its tied base's fingerprint
    until a delta on the embedding is added (``writes_untied``) or the embedding changes."""
    pair = tied_embedding(model)
    if pair is None or (names is not None and tied_to(model, set(names)) is None):
        return None
    weight = model.get_input_embeddings().weight
    model.get_output_embeddings().weight = nn.Parameter(
        weight.detach().clone(), requires_grad=False
    )
    configs = [model.config] if hasattr(model, "config") else []
    if configs and hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    setattr(model, UNTIED, pair)
    return pair[1]


def writes_untied(model: nn.Module, names) -> bool:
    """Whether a delta of tensors ``names`` changes the embedding or head ``untie_embeddings``
    untied: the model it gives is then the untied folder ``lota apply`` writes, whose head counts
    in its fingerprint (even where the change is zero)."""
    pair = getattr(model, UNTIED, None)
    return pair is not None and any(n in pair for n in names)


def untied_copy(model: nn.Module, written: bool = False) -> str | None:
    """The name of an output head ``untie_embeddings`` untied that still equals the input
    embedding bit for bit: in a fingerprint it stands for the tie it replaced, counted once.
    None once ``written`` (a delta on the untied pair was added: see ``writes_untied``)."""
    pair = getattr(model, UNTIED, None)
    if pair is None or written:
        return None
    weights = named_weights(model)
    emb, head = weights.get(pair[0]), weights.get(pair[1])
    if emb is None or head is None or emb.shape != head.shape or emb.dtype != head.dtype:
        return None
    a, b = emb.detach().contiguous(), head.detach().contiguous()
    same = torch.equal(a.view(torch.uint8), b.to(a.device).view(torch.uint8))
    return pair[1] if same else None


def untied_record(model_or_head) -> dict:
    """What a summary and a written folder's ``lota.json`` say of an output head lota untied (of
    a model, or the head's name as ``untie_embeddings`` returned it)."""
    head = model_or_head
    if isinstance(model_or_head, nn.Module):
        head = (getattr(model_or_head, UNTIED, None) or (None, None))[1]
    return {"untied_head": head} if head else {}
