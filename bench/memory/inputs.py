"""The memory benchmark's inputs: the random Llama, its ticket and data, and the copies of the
model the pipeline and checkpointing parts read (bf16 weights, more positions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.common.inputs import save_llama, sums_data, write_jsonl


def build(work: Path, args) -> tuple[Path, Path, Path]:
    """A random Llama of the requested size, a ticket at sparsity 0.9, and short training data."""
    import lota
    from lota.targets import resolve_targets

    model_dir, data, ticket = work / "model", work / "data.jsonl", work / "ticket.safetensors"
    shape = dict(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers)
    shape.update(heads=args.heads, intermediate=args.intermediate, max_positions=128)
    model = save_llama(model_dir, **shape)
    if model is not None:
        targets = resolve_targets(model)
        k = lota.ticket_size("0.9", sum(math.prod(s) for s in targets.values()))
        lota.save(lota.select("random", targets, k, seed=0), ticket)
        sums_data(data)
    return model_dir, data, ticket


def count_params(model_dir: Path) -> int:
    """The parameters stored in the folder's weight file."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def bf16_copy(model_dir: Path) -> Path:
    """The same model stored in bfloat16, so the bf16 runs read bf16 weights as an 8B model would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = model_dir.parent / f"{model_dir.name}-bf16"
    if not out.exists():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def long_model(model_dir: Path, positions: int) -> Path:
    """``model_dir`` itself if it has ``positions`` positions, else a copy whose config has them
    (rotary positions have no weights, so the weights are the same; the weight file is linked)."""
    import os
    import shutil

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("max_position_embeddings", 0) >= positions:
        return model_dir
    out = model_dir.parent / f"{model_dir.name}-p{positions}"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in model_dir.iterdir():
            if f.name == "config.json":
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        config["max_position_embeddings"] = positions
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(out)
    return out


def long_data(work: Path, length: int) -> Path:
    """Examples whose completion fills ``length`` tokens (it is cut there), so every batch is
    ``length`` tokens long and the loss covers almost all of them."""
    path = work / f"data-{length}.jsonl"
    if not path.exists():
        rows = [
            {
                "prompt": f"Q{i}: count on from {i}.",
                "completion": " " + " ".join(str(i + j) for j in range(length)),
            }
            for i in range(64)
        ]
        write_jsonl(path, rows)
    return path
