"""``lota demo``: LoTA, FFT and LoTTO end to end on a built-in toy model and two toy tasks.

Everything is generated locally (no download): two small, dissimilar tasks (A: two-digit addition,
B: reversing a short string of letters) as prompt/completion JSONL, and a tiny byte-level Llama
given a short dense "pretraining" on a generic generated corpus, so that its embeddings and output
head mean something before only the transformer blocks are adapted. The base is cached in
``OUT/base`` together with the recipe it was built from and reused while the recipe is unchanged.

The runs go through the same ``adapt`` pipeline as ``lota adapt``: FFT and LoTA on A, then B on
top of each (FFT on B after FFT on A, the forgetting baseline; LoTTO on B after LoTA on A, with A's
ticket protected). Every model is scored on both tests, and the entries of A's ticket are compared
bit for bit between the LoTA-A and LoTTO-B model files.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import format as fmt
from .adapt import AdaptConfig, adapt
from .data import Example, batches, tokenize
from .evaluate import evaluate
from .fileio import write_json, write_text
from .models import quiet_transformers, save_model
from .toy import byte_tokenizer, tiny_llama

RECIPE = {
    "version": 1,
    "model": {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "max_positions": 96},
    "corpus_docs": 6000,
    "doc_chars": 50,
    "steps": 500,
    "batch_size": 32,
    "lr": 3e-3,
    "max_length": 80,
}
N_TRAIN, N_TEST = 3000, 200
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# ---------------------------------------------------------------------------- tasks
def shift(word: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def addition_task(seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list, list]:
    """Task A: ``"a+b="`` -> ``"a+b"`` for two-digit a, b; train and test share no pair."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]
    return rows[:n_train], rows[n_train : n_train + n_test]


def shift_task(seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list, list]:
    """Task B: ``"abcz>"`` -> ``"bcda"`` (each letter moved one on, z wraps to a) for 3 to 6 random
    letters; train and test share no word."""
    rng = random.Random(seed + 1)
    words: dict[str, None] = {}
    while len(words) < n_train + n_test:
        words["".join(rng.choices(LETTERS, k=rng.randint(3, 6)))] = None
    rows = [{"prompt": f"{w}>", "completion": shift(w)} for w in words]
    return rows[:n_train], rows[n_train:]


def write_tasks(folder: str | Path, seed: int) -> dict[str, dict[str, str]]:
    """Write ``{a,b}_{train,test}.jsonl``; returns ``{task: {split: path}}``."""
    paths: dict[str, dict[str, str]] = {}
    for task, make in (("A", addition_task), ("B", shift_task)):
        for split, rows in zip(("train", "test"), make(seed)):
            p = Path(folder) / f"{task.lower()}_{split}.jsonl"
            write_text(p, "".join(json.dumps(r) + "\n" for r in rows))
            paths.setdefault(task, {})[split] = str(p)
    return paths


# ---------------------------------------------------------------------------- base model
def pretraining_corpus(n: int, seed: int, chars: int = 50) -> list[str]:
    """Generic character-level text: counting, copies, words, expressions (not the task formats)."""
    rng = random.Random(seed + 2)

    def word() -> str:
        return "".join(rng.choices(LETTERS, k=rng.randint(2, 7)))

    def snippet() -> str:
        kind = rng.randrange(7)
        if kind == 6:  # runs of the alphabet
            i = rng.randrange(26)
            return "".join(LETTERS[(i + j) % 26] for j in range(rng.randint(3, 8)))
        if kind == 0:  # counting up or down
            start, step = rng.randint(0, 190), rng.choice([1, 1, 2, -1])
            return " ".join(str(max(0, start + i * step)) for i in range(rng.randint(3, 7)))
        if kind == 1:  # copies of a digit string
            s = str(rng.randint(0, 99999))
            return f"{s} {s}"
        if kind == 2:  # copies of a letter string
            w = word()
            return f"{w} {w}"
        if kind == 3:  # words
            return " ".join(word() for _ in range(rng.randint(2, 6)))
        if kind == 4:  # single-digit facts in words
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            return f"{a} plus {b} is {a + b}"
        return f"{rng.randint(0, 99)}*{rng.randint(0, 9)}-{rng.randint(0, 9)}"  # expressions

    docs = []
    for _ in range(n):
        parts = [snippet()]
        while len(" ; ".join(parts)) < chars:
            parts.append(snippet())
        docs.append(" ; ".join(parts))
    return docs


def build_base(folder: str | Path, seed: int, show_progress: bool = True) -> bool:
    """Pretrain the toy base into ``folder`` unless it already holds this recipe; True if built."""
    folder = Path(folder)
    recipe = dict(RECIPE, seed=seed)
    stamp = folder / "demo_recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return False
    tokenizer = byte_tokenizer()
    model = tiny_llama(seed=seed, **recipe["model"])
    docs = [
        Example(prompt="", completion=d)
        for d in pretraining_corpus(recipe["corpus_docs"], seed, recipe["doc_chars"])
    ]
    data = tokenize(docs, tokenizer, recipe["max_length"])
    stream = batches(data, recipe["batch_size"], seed, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe["lr"], total_steps=recipe["steps"], pct_start=0.1, cycle_momentum=False
    )
    model.train()
    bar = tqdm(range(recipe["steps"]), desc="pretrain base", disable=not show_progress, leave=False)
    for _ in bar:
        loss = model(**next(stream)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    save_model(model, tokenizer, folder)
    write_json(stamp, recipe)
    return True


# ---------------------------------------------------------------------------- the demo
RUNS = {  # name: (start model, task, method, lr, steps, protect A's ticket)
    "FFT A": ("base", "A", "fft", 1e-3, 600, False),
    "LoTA A": ("base", "A", "lota", 1e-2, 600, False),
    "FFT A -> FFT B": ("FFT A", "B", "fft", 1e-3, 400, False),
    "LoTA A -> LoTTO B": ("LoTA A", "B", "lota", 1e-2, 400, True),
}
CALIBRATION = {"steps": 60, "lr": 1e-3}
EVAL = {"max_new_tokens": 8, "batch_size": 64, "limit": N_TEST}


def _slug(name: str) -> str:
    return name.replace(" -> ", "_then_").replace(" ", "_").lower()


def changed_entries(before: str, after: str, ticket_path: str) -> tuple[int, int]:
    """How many entries of the ticket differ in their bits between two model folders, of how many."""
    ticket = fmt.load(ticket_path).ticket
    weights = []
    for folder in (before, after):
        w: dict[str, torch.Tensor] = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            w.update(load_file(str(f)))
        weights.append(w)
    changed = 0
    for name, idx in ticket.indices.items():
        a, b = (w[name].reshape(-1)[idx] for w in weights)
        if a.dtype != b.dtype:
            changed += int(idx.numel())
        else:
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
                a.element_size()
            ]
            changed += int((a.view(bits) != b.view(bits)).sum())
    return changed, ticket.nnz


def run_demo(out: str, seed: int = 0, show_progress: bool = True) -> dict:
    """Build the data and base, run the four adaptations, score them; print and write a report."""
    t0 = time.perf_counter()
    root = Path(out)
    quiet_transformers()
    paths = write_tasks(root / "data", seed)
    t = time.perf_counter()
    built = build_base(root / "base", seed, show_progress)
    base_seconds = round(time.perf_counter() - t, 1)
    folders = {"base": str(root / "base")}
    deltas: dict[str, str] = {}
    rows: dict[str, dict] = {"base": {"seconds": base_seconds if built else 0.0}}
    for name, (start, task, method, lr, steps, protect) in RUNS.items():
        run = root / "runs" / _slug(name)
        cfg = AdaptConfig(
            model=folders[start],
            data=paths[task]["train"],
            out=str(run),
            method=method,
            lr=lr,
            steps=steps,
            calibration_steps=CALIBRATION["steps"],
            calibration_lr=CALIBRATION["lr"],
            batch_size=32,
            seed=seed,
            protect=[deltas[start]] if protect else [],
            save_model=True,
            force=True,
            progress=show_progress,
        )
        info = adapt(cfg)
        folders[name], deltas[name] = str(run / "model"), str(run / "delta.safetensors")
        rows[name] = {
            "start": start,
            "task": task,
            "method": method,
            "lr": lr,
            "steps": steps,
            "trained_entries": info["k"],
            "target_entries": info["numel"],
            "delta_bytes": info["delta_bytes"],
            "final_loss": info["final_loss"],
            "seconds": info["seconds"],
        }
    for name, row in rows.items():
        for task in "AB":
            r = evaluate(folders[name], paths[task]["test"], **EVAL, show_progress=show_progress)
            row[f"score_{task}"] = r["score"]
    for row in rows.values():
        if row.get("task") == "B":
            row["forgetting_A"] = rows[row["start"]]["score_A"] - row["score_A"]
    changed, total = changed_entries(
        folders["LoTA A"], folders["LoTA A -> LoTTO B"], deltas["LoTA A"]
    )
    fft_changed, fft_total = changed_entries(
        folders["FFT A"], folders["FFT A -> FFT B"], deltas["FFT A"]
    )
    results = {
        "seed": seed,
        "base_pretrained_now": built,
        "recipe": dict(RECIPE, seed=seed),
        "rows": rows,
        "lotto_protected": {"entries": total, "changed": changed, "bit_identical": changed == 0},
        "fft_chain": {"entries": fft_total, "changed": fft_changed},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    table = _table(rows)
    verdict = (
        f"LoTTO left all {total:,} entries of A's ticket bit-identical (checked in the model files)"
        if changed == 0
        else f"LoTTO CHANGED {changed:,} of the {total:,} entries of A's ticket"
    )
    lines = [
        verdict,
        f"FFT on B changed {fft_changed:,} of the {fft_total:,} target entries trained on A",
        f"total {results['seconds']} s ({'base pretrained now' if built else 'cached base reused'})",
    ]
    print(table.replace("|", " ").rstrip())
    print("\n".join(lines))
    write_json(root / "results.json", results)
    write_text(
        root / "report.md", "# lota demo\n\n" + table + "\n" + "".join(f"- {x}\n" for x in lines)
    )
    return results


def _table(rows: dict[str, dict]) -> str:
    def num(v, f="{:.3f}"):
        return "-" if v is None else f.format(v)

    head = [
        "method",
        "score A",
        "score B",
        "forgetting A",
        "trained entries",
        "delta bytes",
        "seconds",
    ]
    body = [
        [
            name,
            num(r["score_A"]),
            num(r["score_B"]),
            num(r.get("forgetting_A"), "{:+.3f}"),
            num(r.get("trained_entries"), "{:,}"),
            num(r.get("delta_bytes"), "{:,}"),
            num(r["seconds"], "{:.1f}"),
        ]
        for name, r in rows.items()
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def fmt_row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |\n"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|\n"
    return fmt_row(head) + sep + "".join(fmt_row(b) for b in body)
