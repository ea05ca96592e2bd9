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

RECIPE = {  # the toy base: a tiny byte-level Llama and its short dense pretraining
    "version": 1,
    "model": {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 256, "max_positions": 96},
    "corpus_docs": 8000,
    "doc_chars": 30,
    "steps": 600,
    "batch_size": 32,
    "lr": 3e-3,
    "max_length": 64,
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
    """Task B: ``"abcz>"`` -> ``"bcda"`` (each letter moved one on, z wraps to a) for 3 to 5 random
    letters; train and test share no word."""
    rng = random.Random(seed + 1)
    words: dict[str, None] = {}
    while len(words) < n_train + n_test:
        words["".join(rng.choices(LETTERS, k=rng.randint(3, 5)))] = None
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
    """Generic character-level text: counting, copies, alphabet runs, words, digit facts and symbols.

    It never holds the task formats (``"a+b="`` followed by the sum, or ``"word>"`` followed by the
    shifted word)."""
    rng = random.Random(seed + 2)

    def word() -> str:
        return "".join(rng.choices(LETTERS, k=rng.randint(2, 7)))

    def count() -> str:
        start, step = rng.randint(0, 190), rng.choice([1, 1, 2, -1])
        return " ".join(str(max(0, start + i * step)) for i in range(rng.randint(3, 7)))

    def run() -> str:
        i = rng.randrange(26)
        return "".join(LETTERS[(i + j) % 26] for j in range(rng.randint(3, 8)))

    def fact() -> str:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} plus {b} is {a + b}"

    def symbols() -> str:
        a, b = sorted(rng.sample(range(100), 2))
        return rng.choice([f"{word()} = {a}", f"{b} > {a}", f"{word()} + {word()}"])

    def copy() -> str:
        s = rng.choice([word(), str(rng.randint(0, 99999))])
        return f"{s} {s}"

    kinds = [
        count,
        count,
        run,
        fact,
        fact,
        symbols,
        copy,
        lambda: " ".join(word() for _ in range(3)),
    ]
    docs = []
    for _ in range(n):
        parts = [rng.choice(kinds)()]
        while len(" ; ".join(parts)) < chars:
            parts.append(rng.choice(kinds)())
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
RUNS = {  # name: (start model, task, method, lr, steps); sparse runs want a larger lr than FFT
    "FFT A": ("base", "A", "fft", 1e-3, 700),
    "LoTA A": ("base", "A", "lota", 5e-3, 700),
    "FFT A -> FFT B": ("FFT A", "B", "fft", 1e-3, 400),
    "LoTA A -> LoTTO B": ("LoTA A", "B", "lota", 5e-3, 400),
}
CALIBRATION = {"calibration_steps": 60, "calibration_lr": 1e-3}
EVAL = {"max_new_tokens": 8, "batch_size": 64, "limit": N_TEST}


def _weights(folder: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def changed_entries(before: str, after: str, ticket_path: str) -> tuple[int, int]:
    """How many entries of a ticket (or delta) file differ in their bits between two model folders,
    and of how many entries."""
    ticket = fmt.load(ticket_path).ticket
    wa, wb = _weights(before), _weights(after)
    changed = 0
    for name, idx in ticket.indices.items():
        a, b = wa[name].reshape(-1)[idx], wb[name].reshape(-1)[idx]
        if a.dtype != b.dtype:
            changed += int(idx.numel())
            continue
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        changed += int((a.view(bits) != b.view(bits)).sum())
    return changed, ticket.nnz


def run_demo(out: str, seed: int = 0, show_progress: bool = True) -> dict:
    """Build data and base, run FFT, LoTA, FFT->FFT and LoTA->LoTTO, score every model on both
    tasks, print a table and write ``OUT/results.json`` and ``OUT/report.md``."""
    threads = torch.get_num_threads()
    # These matrices are tiny: one thread loses little, and several threads slow down many times
    # over when the CPU is shared with another process.
    torch.set_num_threads(1)
    try:
        return _run(Path(out), seed, show_progress)
    finally:
        torch.set_num_threads(threads)


def _run(root: Path, seed: int, show_progress: bool) -> dict:
    t0 = time.perf_counter()
    quiet_transformers()
    paths = write_tasks(root / "data", seed)
    built = build_base(root / "base", seed, show_progress)
    folders, deltas = {"base": str(root / "base")}, {}
    rows: dict[str, dict] = {"base": {"seconds": round(time.perf_counter() - t0, 1)}}
    for name, (start, task, method, lr, steps) in RUNS.items():
        run = root / "runs" / name.replace(" -> ", "_then_").replace(" ", "_").lower()
        protect = [deltas[start]] if method == "lota" and start != "base" else []
        cfg = AdaptConfig(
            model=folders[start],
            data=paths[task]["train"],
            out=str(run),
            method=method,
            lr=lr,
            steps=steps,
            batch_size=32,
            seed=seed,
            protect=protect,
            save_model=True,
            force=True,
            progress=show_progress,
            **CALIBRATION,
        )
        info = adapt(cfg)
        folders[name], deltas[name] = str(run / "model"), str(run / "delta.safetensors")
        rows[name] = {
            "start": start,
            "task": task,
            "method": "lotto" if protect else method,
            "lr": lr,
            "steps": steps,
            "trained_entries": info["k"],
            "target_entries": info["numel"],
            "delta_bytes": info["delta_bytes"],
            "final_loss": info["final_loss"],
            "seconds": info["seconds"],
            "run": str(run),
        }
    for name, row in rows.items():
        for task in "AB":
            r = evaluate(folders[name], paths[task]["test"], **EVAL, show_progress=show_progress)
            row[f"score_{task}"] = r["score"]
        if name in RUNS and RUNS[name][1] == "B":
            row["forgetting_A"] = rows[row["start"]]["score_A"] - row["score_A"]
    lotto_changed, lotto_n = changed_entries(
        folders["LoTA A"], folders["LoTA A -> LoTTO B"], deltas["LoTA A"]
    )
    fft_changed, fft_n = changed_entries(
        folders["FFT A"], folders["FFT A -> FFT B"], deltas["FFT A"]
    )
    seconds = round(time.perf_counter() - t0, 1)
    lines = [
        f"LoTTO left all {lotto_n:,} entries of A's ticket bit-identical (compared in the model files)"
        if lotto_changed == 0
        else f"LoTTO CHANGED {lotto_changed:,} of the {lotto_n:,} entries of A's ticket",
        f"FFT on B changed {fft_changed:,} of the {fft_n:,} entries FFT trained on A",
        f"scores: exact answers on {EVAL['limit']} test examples per task, greedy decoding; "
        "forgetting A = score A before B - score A after B; s = training seconds (base: pretraining)",
        f"total {seconds} s ({'base pretrained now' if built else 'cached base reused'})",
    ]
    results = {
        "seed": seed,
        "base_pretrained_now": built,
        "recipe": dict(RECIPE, seed=seed),
        "eval": EVAL,
        "data": paths,
        "rows": rows,
        "lotto_protected": {
            "entries": lotto_n,
            "changed": lotto_changed,
            "bit_identical": lotto_changed == 0,
        },
        "fft_b_changed_a_entries": {"entries": fft_n, "changed": fft_changed},
        "seconds": seconds,
    }
    print(_table(rows, markdown=False) + "\n".join(lines))
    write_json(root / "results.json", results)
    report = (
        "# lota demo\n\n" + _table(rows, markdown=True) + "\n" + "".join(f"- {x}\n" for x in lines)
    )
    write_text(root / "report.md", report)
    return results


def _entries(row: dict) -> str:
    if "trained_entries" not in row:
        return "-"
    return f"{row['trained_entries']:,} ({row['trained_entries'] / row['target_entries']:.0%})"


def _table(rows: dict[str, dict], markdown: bool) -> str:
    def num(v, f: str = "{:.3f}") -> str:
        return "-" if v is None else f.format(v)

    head = ["method", "score A", "score B", "forgetting A", "trained entries", "delta bytes", "s"]
    body = [head] + [
        [
            name,
            num(r["score_A"]),
            num(r["score_B"]),
            num(r.get("forgetting_A"), "{:+.3f}"),
            _entries(r),
            num(r.get("delta_bytes"), "{:,}"),
            num(r["seconds"], "{:.1f}"),
        ]
        for name, r in rows.items()
    ]
    widths = [max(len(row[i]) for row in body) for i in range(len(head))]
    lines = [
        [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        for row in body
    ]
    lines.insert(1, ["-" * w for w in widths])
    if markdown:
        return "".join("| " + " | ".join(cells) + " |\n" for cells in lines)
    return "".join("  ".join(cells).rstrip() + "\n" for cells in lines)
