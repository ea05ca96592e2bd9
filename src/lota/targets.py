"""The tensors lota adapts (targets) and a model's parameters by their plain names.

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
