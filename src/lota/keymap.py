"""The mapping between a folder's checkpoint keys and the model's parameter names.

A model folder does not always hold one tensor per parameter under the parameter's name:
transformers renames keys when it loads them (GPT-NeoX stores ``lm_head.weight`` as
``embed_out.weight``) and fuses tensors (a mixture-of-experts block holds its experts as one 3-D
``mlp.experts.gate_up_proj``, stacked from per-expert ``gate_proj``/``up_proj`` matrices in expert
order and concatenated gate first). lota names every tensor by its parameter name, so a folder is
read through the conversion transformers itself applies at load time
(``get_model_conversion_mapping``): the same renamings, the same converters, the same key order.

Invariant: ``KeyMap.read(name)`` equals the parameter ``name`` of the model ``from_pretrained``
builds from the same files, bit for bit and in the files' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy

import torch
from torch import nn

# safetensors dtype names, for the meta tensors whose converted shapes are checked
_META_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class KeyMapError(ValueError):
    """Checkpoint keys that transformers' conversion cannot turn into the parameter they feed."""

    def __init__(self, name: str, keys: list[str], reason: str):
        super().__init__(reason)
        self.name, self.keys, self.reason = name, keys, reason


class _Group:
    """Checkpoint keys converted together, and the parameters they become."""

    __slots__ = ("first", "converter", "members", "targets")

    def __init__(self, first: str, converter):
        self.first = first  # the name transformers files the group under
        self.converter = converter  # a WeightConverter template, or None for a plain rename
        self.members: list[tuple[str, str]] = []  # (source pattern, checkpoint key), in load order
        self.targets: list[str] = [first]


class KeyMap:
    """Where each parameter of ``skeleton`` comes from in a set of checkpoint keys.

    ``keys`` are the tensor names of the folder's files (any iterable). Keys that feed no
    parameter (unused buffers, tensors of another architecture) are ignored, as transformers
    ignores them; a parameter no key feeds is absent from ``sources``."""

    def __init__(self, skeleton: nn.Module, keys):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.skeleton = skeleton
        expected = skeleton.state_dict()
        try:
            transforms = get_model_conversion_mapping(skeleton)
        except Exception:  # a model class transformers has no mapping machinery for
            transforms = []
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(skeleton, "base_model_prefix", None)

        self._groups: dict[str, _Group] = {}
        for key in sorted(keys, key=dot_natural_key):  # the loader's order: experts 0, 1, ..., n-1
            name, pattern = rename_source_key(key, renamings, converters, prefix, expected)
            if name not in expected and key in expected:
                name, pattern = key, None
            if name not in expected:
                continue
            if pattern is None:
                group = self._groups.setdefault(name, _Group(name, None))
                group.members.append((key, key))
                continue
            template = by_pattern[pattern]
            group = self._groups.get(name)
            if group is None:
                group = self._groups[name] = _Group(name, template)
                # a one-to-many converter (fused qkv split into q, k, v) files every part under
                # the first target's name; the others follow from its target patterns
                first = template.target_patterns[0]
                group.targets = [name.replace(first, t) for t in template.target_patterns]
            group.members.append((pattern, key))
        self._owner = {t: g for g in self._groups.values() for t in g.targets if t in expected}
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None

    @property
    def names(self) -> list[str]:
        """The parameter (and buffer) names the keys feed."""
        return list(self._owner)

    def sources(self, name: str) -> list[str]:
        """The checkpoint keys ``name`` is read from (empty when no key feeds it)."""
        group = self._owner.get(name)
        return [k for _, k in group.members] if group else []

    def is_renamed(self, name: str) -> bool:
        return self.sources(name) != [name]

    def read(self, name: str, read_key: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Parameter ``name``, converted from the tensors ``read_key`` returns for its keys."""
        group = self._owner[name]
        if group.converter is None:
            return read_key(group.members[0][1])
        if self._cache is not None and self._cache[0] == group.first:
            return self._cache[1][name]
        out = self._convert(group, read_key)
        self._cache = (group.first, out) if len(out) > 1 else None
        return out[name]

    def shapes(self, headers: dict[str, tuple[list[int], str]]) -> dict[str, tuple[int, ...]]:
        """The shape each parameter gets from checkpoint headers ``{key: (shape, dtype)}``,
        computed by running the conversion on meta tensors (nothing is read)."""

        def meta(key):
            shape, dtype = headers[key]
            return torch.empty(shape, dtype=_META_DTYPES.get(dtype, torch.float32), device="meta")

        out = {}
        for group in self._groups.values():
            if group.converter is None:
                out[group.first] = tuple(headers[group.members[0][1]][0])
                continue
            for name, t in self._convert(group, meta).items():
                out[name] = tuple(t.shape)
        return out

    def _convert(self, group: _Group, read_key) -> dict[str, torch.Tensor]:
        converter = deepcopy(group.converter)
        for pattern, key in group.members:
            converter.add_tensor(group.first, key, pattern, lambda key=key: read_key(key))
        keys = [k for _, k in group.members]
        try:
            with torch.no_grad():
                out = converter.convert(
                    group.first, model=self.skeleton, config=self.skeleton.config
                )
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KeyMapError(group.first, keys, reason[:200]) from None
        return {n: (t[0] if isinstance(t, list) else t) for n, t in out.items()}
