"""Loading and saving Hugging Face models and their tokenizers.

A model is loaded only from a folder ``model_folder`` checked (no code from it runs, only its
safetensors weights are read), and its values must be finite. A model folder is written as a whole
(``fileio.atomic_dir``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError
from .fileio import atomic_dir
from .model_folder import checked_headers, first_line, load_config, resolve_model_path
from .names import LOAD_DTYPES

_DTYPES = {name: name if name == "auto" else getattr(torch, name) for name in LOAD_DTYPES}


def load_model(
    path: str, dtype: str = "auto", device: torch.device | str | None = None
) -> nn.Module:
    """A checked folder's model, read from its safetensors files only (no code from it runs).

    ``dtype`` ``auto`` keeps the checkpoint's dtype. With a GPU ``device`` the weights are read
    straight onto it, shard by shard (no whole copy in host memory first)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(path)
    checked_headers(folder)
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
            f"cannot load the model ({first_line(e)})",
            str(folder),
            "check that it is a causal language model saved with save_pretrained",
        ) from None
    _check_finite(model, folder)
    model.lota_source = str(folder)
    return model


def device_of(model) -> torch.device:
    """Where the model's weights are (the CPU for a model without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(iter(params), None)
    return first.device if first is not None else torch.device("cpu")


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
            f"cannot load the tokenizer ({first_line(e)})",
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
