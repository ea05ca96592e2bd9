"""Loading and saving Hugging Face models, choosing target tensors, reading weights lazily.

Only safetensors weights are read: lota never unpickles a model file. Default targets are the
weight matrices of every linear layer inside the transformer blocks (q, k, v, o, gate, up, down on
Llama); embeddings, the output head, norms and biases are frozen entirely.
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

from .errors import InputError
from .fileio import atomic_dir, fingerprint, weight_digest

_DTYPES = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_BLOCK = re.compile(r"(^|\.)\d+\.")


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
    """A local model folder, or a hub snapshot where a hub is reachable."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise InputError(
                f"{what} folder has no config.json",
                str(p),
                "pass a Hugging Face model folder (config, safetensors weights, tokenizer)",
            )
        if not list(p.glob("*.safetensors")):
            raise InputError(
                f"{what} folder has no safetensors weights",
                str(p),
                "lota reads only safetensors; re-save the model with save_pretrained(safe_serialization=True)",
            )
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
                path,
                "pass a local model folder",
            ) from None
    raise InputError(f"{what} not found", str(p), "check the path")


def load_model(path: str, dtype: str = "auto") -> nn.Module:
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(path)
    quiet_transformers()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=_DTYPES[dtype], use_safetensors=True
            )
    except Exception as e:
        raise InputError(
            f"cannot load the model ({_first_line(e)})",
            str(folder),
            "check that it is a causal language model saved with save_pretrained",
        ) from None
    model.lota_source = str(folder)
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    folder = resolve_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise InputError(
            f"cannot load the tokenizer ({_first_line(e)})",
            str(folder),
            "save the tokenizer into the model folder (tokenizer.save_pretrained)",
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save_model(
    model: nn.Module, tokenizer, folder: str | os.PathLike, extra: dict | None = None
) -> None:
    """Write a loadable model folder atomically (weights, config, tokenizer)."""
    with atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if extra:
            (tmp / "lota.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


# ---------------------------------------------------------------------------- targets
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def default_targets(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weights of linear layers inside the repeated transformer blocks."""
    out = {}
    for module_name, module in model.named_modules():
        if (
            _is_linear(module)
            and _BLOCK.search(module_name + ".")
            and isinstance(getattr(module, "weight", None), nn.Parameter)
        ):
            out[f"{module_name}.weight"] = tuple(module.weight.shape)
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


def model_fingerprint(model: nn.Module) -> str:
    return fingerprint(named_weights(model).items())


# ---------------------------------------------------------------------------- lazy weights
class WeightReader:
    """Read a model folder's tensors one at a time from (sharded) safetensors files."""

    def __init__(self, path: str, what: str = "model"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = resolve_model_path(path, what)
        quiet_transformers()
        try:
            config = AutoConfig.from_pretrained(str(self.folder))
            with torch.device("meta"):
                self.skeleton = AutoModelForCausalLM.from_config(config)
        except Exception as e:
            raise InputError(
                f"cannot read the model config ({_first_line(e)})",
                str(self.folder),
                "pass a Hugging Face causal language model folder",
            ) from None
        self.where: dict[str, Path] = {}
        from safetensors import safe_open

        for f in sorted(self.folder.glob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f
            except Exception as e:
                raise InputError(
                    f"unreadable safetensors file ({_first_line(e)})",
                    str(f),
                    "the weights are corrupted; re-save the model",
                ) from None
        self.shapes = {n: tuple(p.shape) for n, p in named_weights(self.skeleton).items()}
        self._digests: dict = {}  # name -> hex digest, or a future of one
        self._pool = None

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise InputError(
                f"tensor '{name}' is not in the weight files",
                str(self.folder),
                "the weights do not match the config's architecture",
            )
        with safe_open(str(self.where[name]), framework="pt") as h:
            t = h.get_tensor(name)
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
