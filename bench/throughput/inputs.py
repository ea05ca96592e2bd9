"""The throughput benchmark's inputs: the model folder, the prompt/completion data, and the
batches lota trains on (its own data pipeline), which TRL is given in the same order."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from bench.common.inputs import save_llama, write_jsonl


def gsm8k_pairs(data_dir: Path, tok, max_prompt: int, limit: int) -> list[dict] | None:
    """GSM8K train pairs, in file order, whose prompt has at most ``max_prompt`` tokens."""
    path = data_dir / "gsm8k" / "train.jsonl"
    if not path.exists():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompt = r["question"] + "\n"  # the question alone: few fit 128 byte tokens otherwise
        if len(tok(prompt)["input_ids"]) <= max_prompt:
            rows.append({"prompt": prompt, "completion": r["answer"]})
        if len(rows) == limit:
            break
    return rows


def synthetic_pairs(tok, max_prompt: int, limit: int, seed: int) -> list[dict]:
    """Arithmetic word problems in GSM8K's form (worked answer, ``#### N`` last)."""
    rng = random.Random(seed)
    names, items = ["Ana", "Bo", "Cy", "Di", "Ed"], ["apple", "pen", "card", "egg", "book"]
    rows = []
    for _ in range(100 * limit):  # bounded: a --max-length too short for every prompt fits none
        if len(rows) == limit:
            break
        n, it = rng.choice(names), rng.choice(items)
        a, b, c = rng.randint(2, 90), rng.randint(2, 9), rng.randint(2, 12)
        prompt = f"{n} has {a} {it}s and buys {b} packs of {c}. How many {it}s now?\n"
        completion = (
            f"{n} buys {b} * {c} = <<{b}*{c}={b * c}>>{b * c} {it}s.\n"
            f"So {n} has {a} + {b * c} = <<{a}+{b * c}={a + b * c}>>{a + b * c} {it}s.\n"
            f"#### {a + b * c}"
        )
        if len(tok(prompt)["input_ids"]) <= max_prompt:
            rows.append({"prompt": prompt, "completion": completion})
    if len(rows) < limit:
        raise SystemExit(f"only {len(rows)} synthetic problems fit --max-length: raise it")
    return rows


def build(work: Path, args) -> dict:
    """Write the model folder (a random Llama, fp32, byte tokenizer) and lota's prompt/completion
    JSONL; returns what they hold."""
    from lota.targets import resolve_targets
    from lota.toy import byte_tokenizer

    tok = byte_tokenizer()
    shape = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, seed=args.seed)
    shape.update(intermediate=args.intermediate, max_positions=args.max_length)
    model = save_llama(work / "model", reuse=False, **shape)
    max_prompt = int(args.prompt_fraction * args.max_length)
    rows = gsm8k_pairs(Path(args.data_dir), tok, max_prompt, args.examples)
    source = "gsm8k train (real)"
    if rows is None:
        print(f"no GSM8K under {args.data_dir}: synthetic problems", file=sys.stderr)
        rows, source = synthetic_pairs(tok, max_prompt, args.examples, args.seed), "synthetic"
    if len(rows) < args.batch_size:
        raise SystemExit(f"only {len(rows)} examples fit --max-length {args.max_length}")
    write_jsonl(work / "data.jsonl", rows)
    targets = resolve_targets(model)
    return {
        "source": source,
        "examples": len(rows),
        "max_prompt_tokens": max_prompt,
        "params": sum(p.numel() for p in model.parameters()),
        "target_params": sum(p.numel() for n, p in model.named_parameters() if n in targets),
        "lora_modules": sorted({n.rsplit(".", 2)[-2] for n in targets}),
        "config": {k: getattr(model.config, k) for k in CONFIG_KEYS},
    }


CONFIG_KEYS = (
    "hidden_size intermediate_size num_hidden_layers num_attention_heads vocab_size "
    "max_position_embeddings"
).split()


def batch_stats(batch) -> dict:
    """Real (non-pad) and completion tokens of a padded batch, and a digest of its shape, ids,
    attention mask and labels."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    h.update(str(tuple(batch["input_ids"].shape)).encode())
    for key in ("input_ids", "attention_mask", "labels"):
        h.update(batch[key].to(torch.int64).contiguous().numpy().tobytes())
    return {
        "tokens": int(batch["attention_mask"].sum()),
        "completion_tokens": int((batch["labels"] != -100).sum()),
        "digest": h.hexdigest(),
    }


def reference(work: Path, args, skip: int) -> tuple[list[list[int]], list[dict]]:
    """The batches lota trains on from batch ``skip`` on, through lota's own data pipeline: the
    example indices of each step, and each batch's token counts and digest."""
    from lota.data import Tokenized, batches, read_jsonl, tokenize
    from lota.models import load_tokenizer

    tok = load_tokenizer(str(work / "model"))
    data = tokenize(read_jsonl(work / "data.jsonl"), tok, args.max_length)
    examples = len((work / "data.jsonl").read_text().splitlines())
    if len(data) != examples:  # the indices below are lines of the file only if none was dropped
        raise SystemExit(f"lota dropped {examples - len(data)} of {examples} examples")
    # the same shuffle over stand-ins that carry their own index: the order lota serves them in
    marks = batches(
        [Tokenized([i], [i]) for i in range(len(data))], args.batch_size, args.seed, 0, skip
    )
    real = batches(data, args.batch_size, args.seed, tok.pad_token_id, skip)
    order, stats = [], []
    for _ in range(args.steps):
        order.append(next(marks)["input_ids"][:, 0].tolist())
        stats.append(batch_stats(next(real)))
    return order, stats


# ---------------------------------------------------------------------------- the runs
