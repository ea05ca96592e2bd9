"""Training throughput of ``lota adapt`` against TRL's ``SFTTrainer`` on the CPU, and whether the
loss curves agree.

Two pairs, each side in its own process:
- ``fft``: ``lota adapt --method fft`` against ``SFTTrainer`` full fine-tuning;
- ``sparse``: the sparse phase of ``lota adapt --method lota`` (metrics phase ``train``; its
  calibration phase is not timed) against ``SFTTrainer`` with a PEFT LoRA adapter (r 16, alpha 32,
  dropout 0) on the layers lota adapts by default (every linear layer of the decoder blocks).

Both sides train the same model (a random Llama config written by this script, fp32) on the same
batches in the same order: lota's own order (``lota.data.batches`` with the run's seed), which TRL
reads sequentially; for the sparse pair TRL starts where lota's sparse phase starts, after the
batches its calibration used. Shared settings: AdamW (torch defaults: betas 0.9/0.999, eps 1e-8,
weight decay 0, not fused), constant learning rate without warm-up, gradient clipping at norm 1.0,
fp32 (no mixed precision; TRL's default gradient checkpointing off, as lota has none), the same
maximum length, no packing, loss on completion tokens only, ``--threads`` torch threads. TRL's
full fine-tuning trains the tensors ``lota adapt --method fft`` trains (the default targets; the
embeddings, norms and LM head stay frozen), unless ``--trl-fft-params all``.

Data: GSM8K train pairs from ``--data-dir`` (the project's shared data folder; prompt: the
question and a newline, completion: the worked answer) whose prompt fits in
``--prompt-fraction`` of ``--max-length`` byte tokens; the completion is cut to fill the rest.
Without the folder, synthetic arithmetic problems of the same form.

Interleaving (``--interleave``), over ``--repeats`` rounds whose pair order alternates:
- ``steps`` (default): the two runs of a pair take turns step by step. Each stops at a gate
  before its first training step and after every step until the benchmark lets it go, so the two
  never compute at the same time and the drift of a shared machine hits both alike at the scale
  of one step. Time spent at a gate is outside the step time and taken out of the loop time.
- ``runs``: the two runs of a pair one after the other (which goes first alternates by round).

Measured per step: wall time (lota: ``step_s`` of its metrics; TRL: a callback from
``on_step_begin`` to ``on_step_end``), the whole loop iteration ("cycle": end of one step to the
end of the next, data loading and logging included), the loss, the real (non-pad) tokens and the
completion tokens. The first ``--warmup`` steps of each run are not timed. Per round and pair, the
ratio of the median step times (lota over TRL); reported as the median over rounds with its range
and interquartile range. Tokens per second: real tokens over step time. Every batch TRL trained on
is compared with lota's (a digest of ids, mask and labels), and lota's logged token counts with
those batches.

Loss curves: per run and step the mean over rounds; Pearson correlation and the largest absolute
difference between the two sides of each pair. Writes ``OUT/results.json``, ``OUT/report.md`` and
``OUT/loss_curves.png``; prints a table to stderr and one JSON line last on stdout.

    python bench/throughput.py [--repeats 5] [--steps 20] [--warmup 2] [--interleave steps|runs]
        [--threads 1] [--batch-size 8] [--max-length 128] [--hidden 256] [--layers 4]
        [--heads 4] [--intermediate 512] [--lr 1e-3] [--seed 0] [--sparsity 0.9]
        [--calibration-steps 2] [--lora-r 16] [--lora-alpha 32] [--trl-fft-params targets|all]
        [--examples 512] [--prompt-fraction 0.75] [--data-dir ../shared/data] [--workdir DIR]
        [--out bench/results/throughput]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import child

REPO = Path(__file__).resolve().parents[1]
LINUX = hasattr(os, "sched_getaffinity")
RUNS = ("lota-fft", "trl-fft", "lota-lota", "trl-lora")
PAIRS = {"fft": ("lota-fft", "trl-fft"), "sparse": ("lota-lota", "trl-lora")}
TARGET_FFT_RATIO = 1.05  # the target: lota FFT step time at most 1.05x TRL's
SHAPE_MATCH_R = 0.99  # loss curves "match in shape" when their Pearson r is at least this


# ---------------------------------------------------------------------------- inputs
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
    while len(rows) < limit:
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
    return rows


def build(work: Path, args) -> dict:
    """Write the model folder (a random Llama, fp32, byte tokenizer) and lota's prompt/completion
    JSONL; returns what they hold."""
    from lota.models import resolve_targets
    from lota.toy import byte_tokenizer, tiny_llama

    tok = byte_tokenizer()
    model = tiny_llama(
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        intermediate=args.intermediate,
        seed=args.seed,
        max_positions=args.max_length,
    )
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    max_prompt = int(args.prompt_fraction * args.max_length)
    rows = gsm8k_pairs(Path(args.data_dir), tok, max_prompt, args.examples)
    source = "gsm8k train (real)"
    if rows is None:
        print(f"no GSM8K under {args.data_dir}: synthetic problems", file=sys.stderr)
        rows, source = synthetic_pairs(tok, max_prompt, args.examples, args.seed), "synthetic"
    if len(rows) < args.batch_size:
        raise SystemExit(f"only {len(rows)} examples fit --max-length {args.max_length}")
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
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
# `lota adapt` in process, stopping at a gate when its training phase starts and after each of
# its steps until the benchmark lets it go on; the time spent waiting is printed at the end.
LOTA_GATED = r"""
import json, os, sys, time
from lota import cli
from lota.checkpoint import Checkpointer

ready, go = int(sys.argv[1]), int(sys.argv[2])
waits = []

def gate():
    t = time.perf_counter()
    os.write(ready, b"r")
    if os.read(go, 1) != b"g":
        raise SystemExit("the benchmark stopped")
    waits.append(time.perf_counter() - t)

save, maybe_save = Checkpointer.save, Checkpointer.maybe_save

def gated_save(self, phase, step, *a, **k):  # the phase-start checkpoint
    save(self, phase, step, *a, **k)
    if phase == "train" and step == 0:
        gate()

def gated_maybe_save(self, phase, step, last_step, **k):  # after every step
    maybe_save(self, phase, step, last_step, **k)
    if phase == "train":
        gate()

Checkpointer.save, Checkpointer.maybe_save = gated_save, gated_maybe_save
code = cli.main(sys.argv[3:])
print(json.dumps({"waits": waits}))
sys.exit(code)
"""


def lota_argv(work: Path, args, method: str) -> list[str]:
    """``lota adapt`` arguments of one run (after ``lota``)."""
    argv = ["--quiet", "adapt", str(work / "model"), "--data", str(work / "data.jsonl")]
    argv += ["--out", str(work / f"run_lota-{method}"), "--method", method]
    argv += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    argv += ["--optimizer", "adamw", "--weight-decay", "0", "--max-grad-norm", "1.0"]
    argv += ["--seed", str(args.seed), "--max-length", str(args.max_length), "--dtype", "float32"]
    argv += ["--checkpoint-every", "0", "--force", "--restart"]
    if method == "lota":
        argv += ["--sparsity", str(args.sparsity)]
        argv += ["--calibration-steps", str(args.calibration_steps)]
    return argv


def lota_rows(work: Path, method: str, ref: list[dict], waits: list[float] | None) -> list[dict]:
    """Per step of lota's training phase, from its metrics. ``waits``: the gated run's waits (at
    the phase start, then after each step), taken out of the loop iteration times."""
    lines = (work / f"run_lota-{method}" / "metrics.jsonl").read_text().splitlines()
    logged = [x for x in map(json.loads, lines) if x["phase"] == "train"]
    after = waits[1:] if waits else [0.0] * len(logged)  # the wait after each step
    rows, previous, cumulative = [], 0.0, 0
    for i, (x, b) in enumerate(zip(logged, ref, strict=True)):
        cumulative += b["tokens"]
        rows.append(
            {
                "step": x["step"],
                "loss": x["loss"],
                "step_s": x["step_s"],
                "cycle_s": x["elapsed_s"] - previous - (after[i - 1] if i else 0.0),
                # lota logs completion tokens per step, real tokens only as a cumulative rate:
                # the reference batch's count, checked against that rate times lota's clock
                "tokens": b["tokens"],
                "completion_tokens": x["completion_tokens"],
                "logged_tokens": round(x["tokens_per_s"] * x["elapsed_s"]),
                "reference_tokens": cumulative,
            }
        )
        previous = x["elapsed_s"]
    return rows


def trl_spec(work: Path, args, kind: str, order: list[list[int]], info: dict) -> dict:
    """The TRL child's settings; writes its data: lota's batches one after another."""
    examples = [json.loads(x) for x in (work / "data.jsonl").read_text().splitlines()]
    ordered = work / f"{kind}.jsonl"
    ordered.write_text("".join(json.dumps(examples[i]) + "\n" for b in order for i in b))
    return {
        "model": str(work / "model"),
        "data": str(ordered),
        "out": str(work / f"run_{kind}"),
        "lora_modules": info["lora_modules"],
        "gate": None,
        **{k: getattr(args, k) for k in CHILD_KEYS},
    }


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


class Gated:
    """A child process that stops at gates (once before its first timed step, then after each
    step) until it is let go, so that two of them take turns step by step and never compute at
    the same time. Started with ``command([ready_fd, go_fd])``."""

    def __init__(self, name: str, command):
        self.name = name
        self.ready, ready_w = os.pipe()
        go_r, self.go_w = os.pipe()
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            command([ready_w, go_r]), stdout=self.out, stderr=self.err, pass_fds=(ready_w, go_r)
        )
        os.close(ready_w)
        os.close(go_r)

    def arrive(self) -> None:
        """Wait until the child stops at its next gate."""
        if os.read(self.ready, 1) != b"r":
            self.finish()
            raise SystemExit(f"{self.name} stopped early")

    def go(self) -> None:
        os.write(self.go_w, b"g")

    def finish(self) -> child.Child:
        os.close(self.go_w)
        _, status, usage = os.wait4(self.proc.pid, 0)
        wall = time.perf_counter() - self.t0
        os.close(self.ready)
        code = os.waitstatus_to_exitcode(status)
        self.out.seek(0)
        self.err.seek(0)
        r = child.Child(wall, usage.ru_maxrss / 1024, code, self.out.read(), self.err.read())
        if code:
            raise SystemExit(f"{self.name} failed: {r.stderr.strip()[-800:]}")
        return r


def lockstep(a: Gated, b: Gated, steps: int) -> tuple[child.Child, child.Child]:
    """Alternate two gated children step by step (who goes first alternates too)."""
    a.arrive()
    b.arrive()
    for step in range(steps):
        for p in (a, b) if step % 2 == 0 else (b, a):
            p.go()
            p.arrive()
    a.go()
    b.go()
    return a.finish(), b.finish()


def run_pair(work: Path, args, pair: str, order, ref, info, flip: bool) -> dict[str, dict]:
    """Both runs of a pair: one after the other (``--interleave runs``) or taking turns step by
    step (``--interleave steps``); TRL goes first when ``flip``."""
    a, b = PAIRS[pair]
    method = a.removeprefix("lota-")
    spec = trl_spec(work, args, b, order, info)

    def lota_cmd(gate=None):
        head = ["-c", LOTA_GATED, *map(str, gate)] if gate else ["-m", "lota.cli"]
        return [sys.executable, *head, *lota_argv(work, args, method)]

    def trl_cmd(gate=None):
        return [
            sys.executable,
            __file__,
            "--child",
            b,
            "--spec",
            json.dumps({**spec, "gate": gate}),
        ]

    commands = {a: lota_cmd, b: trl_cmd}
    names = [b, a] if flip else [a, b]
    if args.interleave == "runs":
        done = {m: child.run_child(commands[m]()) for m in names}
        for m, r in done.items():
            if r.code:
                raise SystemExit(f"{m} failed: {r.stderr.strip()[-800:]}")
        waits = None
    else:
        done = dict(zip(names, lockstep(*(Gated(m, commands[m]) for m in names), args.steps)))
        waits = last_json(done[a].stdout)["waits"]
    return {
        a: {
            "rows": lota_rows(work, method, ref, waits),
            "wall_s": done[a].wall_s,
            "peak_mb": done[a].peak_mb,
        },
        b: {**last_json(done[b].stdout), "wall_s": done[b].wall_s, "peak_mb": done[b].peak_mb},
    }


CHILD_KEYS = "steps batch_size lr seed max_length lora_r lora_alpha trl_fft_params".split()


def trl_child(kind: str, spec: dict) -> None:
    """One TRL run (``trl-fft`` or ``trl-lora``); prints its per-step rows as one JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lota.models import resolve_targets

    gate = spec["gate"]  # [ready fd, go fd] when taking turns with lota, else None

    def wait_turn():
        if gate:
            os.write(gate[0], b"r")
            if os.read(gate[1], 1) != b"g":
                raise SystemExit("the benchmark stopped")

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step (on_step_begin to on_step_end), of each whole loop
        iteration (from the previous step's end, waiting for a turn excluded), and the logged
        loss of each step."""

        def __init__(self):
            self.rows, self.losses, self.begin, self.end = [], {}, 0.0, 0.0

        def on_train_begin(self, args, state, control, **kw):
            wait_turn()
            self.end = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.rows.append({"step_s": now - self.begin, "cycle_s": now - self.end})
            wait_turn()
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    class Counted:
        """The trainer's collator, counting each batch it builds (outside the timed step)."""

        def __init__(self, collate):
            self.collate, self.batches = collate, []

        def __call__(self, features):
            b = self.collate(features)
            self.batches.append(batch_stats(b))
            return b

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    peft_config = None
    if kind == "trl-lora":
        peft_config = LoraConfig(
            r=spec["lora_r"],
            lora_alpha=spec["lora_alpha"],
            lora_dropout=0.0,
            bias="none",
            target_modules=spec["lora_modules"],
            task_type="CAUSAL_LM",
        )
    elif spec["trl_fft_params"] == "targets":  # the tensors `lota adapt --method fft` trains
        targets = resolve_targets(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in targets)
    rows = [json.loads(x) for x in Path(spec["data"]).read_text().splitlines()]
    config = SFTConfig(
        output_dir=spec["out"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; lota does not checkpoint
        max_length=spec["max_length"],
        packing=False,
        completion_only_loss=True,
        train_sampling_strategy="sequential",  # the examples come in lota's batch order
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=spec["seed"],
        use_cpu=True,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.data_collator = counted = Counted(trainer.data_collator)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out = []
    for i, (t, b) in enumerate(zip(clock.rows, counted.batches, strict=False)):
        out.append({"step": i + 1, "loss": clock.losses.get(i + 1), **t, **b})
    print(json.dumps({"rows": out, "trainable": trainable, "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------- statistics
def spread(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "iqr": [q[0], q[2]]}


def timed(rows: list[dict], warmup: int) -> list[dict]:
    return rows[warmup:] if len(rows) > warmup else rows


def pair_summary(runs: dict, a: str, b: str, warmup: int) -> dict:
    """Per-repeat ratios of median step and cycle times (a over b), tokens/s each side, token
    agreement and the loss curves' agreement."""

    def med(run, key):
        return statistics.median(r[key] for r in timed(run["rows"], warmup))

    def rate(run):
        rows = timed(run["rows"], warmup)
        return sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)

    reps = list(zip(runs[a], runs[b]))
    curves = {m: mean_curve(runs[m]) for m in (a, b)}
    same = [
        x["tokens"] == y["tokens"] and x["completion_tokens"] == y["completion_tokens"]
        for ra, rb in reps
        for x, y in zip(ra["rows"], rb["rows"], strict=True)
    ]
    return {
        "step_ratio": spread([med(x, "step_s") / med(y, "step_s") for x, y in reps]),
        "cycle_ratio": spread([med(x, "cycle_s") / med(y, "cycle_s") for x, y in reps]),
        "step_s": {m: spread([med(r, "step_s") for r in runs[m]]) for m in (a, b)},
        "tokens_per_s": {m: spread([rate(r) for r in runs[m]]) for m in (a, b)},
        "tokens_per_step": {
            m: {
                "real": statistics.mean(r["tokens"] for r in runs[m][0]["rows"]),
                "completion": statistics.mean(r["completion_tokens"] for r in runs[m][0]["rows"]),
            }
            for m in (a, b)
        },
        "token_counts_agree_every_step": all(same),
        "loss": curve_agreement(curves[a], curves[b]),
    }


def mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.mean(step) for step in zip(*[[r["loss"] for r in x["rows"]] for x in runs])]


def curve_agreement(x: list[float], y: list[float]) -> dict:
    diff = [abs(p - q) for p, q in zip(x, y, strict=True)]
    return {
        "pearson_r": statistics.correlation(x, y) if len(x) > 2 else None,
        "max_abs_diff": max(diff),
        "mean_abs_diff": statistics.mean(diff),
        "first": [x[0], y[0]],
        "last": [x[-1], y[-1]],
    }


def checks(runs: dict, refs: dict) -> dict:
    """Whether every side trained on the reference batches."""
    out = {}
    for m, ref in (("lota-fft", refs["fft"]), ("lota-lota", refs["sparse"])):
        per_run = [[r["completion_tokens"] for r in x["rows"]] for x in runs[m]]
        logged = [
            abs(r["logged_tokens"] - r["reference_tokens"]) / r["reference_tokens"]
            for x in runs[m]
            for r in x["rows"]
        ]
        out[m] = {
            "completion_tokens_match_reference": all(
                c == [b["completion_tokens"] for b in ref] for c in per_run
            ),
            "logged_real_tokens_max_rel_dev": max(logged),  # rounding of lota's logged clock
        }
    for m, ref in (("trl-fft", refs["fft"]), ("trl-lora", refs["sparse"])):
        out[m] = {
            "batches_identical_to_lota": all(
                [r["digest"] for r in x["rows"]] == [b["digest"] for b in ref] for x in runs[m]
            ),
            "steps_logged": [len(x["rows"]) for x in runs[m]],
        }
    return out


# ---------------------------------------------------------------------------- reporting
def plot(runs: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (pair, (a, b)) in zip(axes, PAIRS.items()):
        for m, style in ((a, "-"), (b, "--")):
            curve = mean_curve(runs[m])
            ax.plot(range(1, len(curve) + 1), curve, style, marker=".", label=m)
        ax.set_title(f"{pair}: {a} vs {b} (mean of {args.repeats} repeats)")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (completion tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict) -> str:
    """The markdown table of report.md (also printed to stderr)."""
    lines = [
        "| pair | median step ratio (lota / TRL) | min-max | IQR | cycle ratio | "
        "tokens/s lota | tokens/s TRL | real / completion tokens per step | loss r | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, (a, b) in PAIRS.items():
        s = summary[pair]
        r, tps, tok, loss = s["step_ratio"], s["tokens_per_s"], s["tokens_per_step"], s["loss"]
        lines.append(
            f"| {a} / {b} | {r['median']:.3f} | {r['min']:.3f}-{r['max']:.3f} "
            f"| {r['iqr'][0]:.3f}-{r['iqr'][1]:.3f} | {s['cycle_ratio']['median']:.3f} "
            f"| {tps[a]['median']:.0f} | {tps[b]['median']:.0f} "
            f"| {tok[a]['real']:.0f}/{tok[a]['completion']:.0f} vs "
            f"{tok[b]['real']:.0f}/{tok[b]['completion']:.0f} "
            f"| {loss['pearson_r']:.4f} | {loss['max_abs_diff']:.4f} |"
        )
    return "\n".join(lines)


def write_report(out: Path, result: dict) -> None:
    s, st = result["summary"], result["settings"]
    fft = s["fft"]
    text = [
        "# Training throughput: lota adapt against TRL SFTTrainer (CPU)",
        "",
        f"Measured {result['date']} on {result['machine']['cpus']} CPUs, "
        f"{result['trl_threads']} torch thread(s) per run; torch "
        f"{result['versions']['torch']}, transformers {result['versions']['transformers']}, "
        f"peft {result['versions']['peft']}, trl {result['versions']['trl']}.",
        f"Model: random Llama, {result['model']['params']:,} parameters "
        f"({result['model']['target_params']:,} in the default targets), fp32. Data: "
        f"{result['model']['source']}, {result['model']['examples']} examples, max length "
        f"{st['max_length']}, batch {st['batch_size']}, {st['steps']} steps "
        f"(first {st['warmup']} not timed), {st['repeats']} repeats, pairs interleaved by "
        f"{st['interleave']}, lr {st['lr']}.",
        "",
        table(s),
        "",
        f"Target: FFT step ratio at most {TARGET_FFT_RATIO} "
        f"({'met' if result['met']['fft_step_ratio'] else 'not met'}: "
        f"{fft['step_ratio']['median']:.3f}); loss curves of the FFT pair match in shape "
        f"(Pearson r at least {SHAPE_MATCH_R}: "
        f"{'met' if result['met']['fft_loss_shape'] else 'not met'}). Token counts agree on every "
        f"step: fft {fft['token_counts_agree_every_step']}, sparse "
        f"{s['sparse']['token_counts_agree_every_step']}; TRL trained on lota's batches: "
        + ", ".join(
            f"{m} {c['batches_identical_to_lota']}"
            for m, c in result["checks"].items()
            if "batches_identical_to_lota" in c
        )
        + ".",
        "",
        "Step: lota's `step_s`, TRL's on_step_begin..on_step_end. Cycle: end of one step to the "
        "end of the next (data loading and logging included). The sparse pair compares "
        "different methods (lota's sparse phase against LoRA); its loss r is informational.",
        "",
        "![loss curves](loss_curves.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(text))


def versions() -> dict:
    import peft
    import torch
    import transformers
    import trl

    import lota

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "lota": getattr(lota, "__version__", "?"),
    }


# ---------------------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="steps per run left out of the timings")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--calibration-steps", type=int, default=2, help="of lota-lota, not timed")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--trl-fft-params", choices=("targets", "all"), default="targets")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every run (OMP_NUM_THREADS); 0: torch's default",
    )
    ap.add_argument(
        "--interleave",
        choices=("steps", "runs"),
        default="steps",
        help="the two runs of a pair take turns step by step, or run one after the other",
    )
    ap.add_argument("--examples", type=int, default=512, help="at most this many data lines")
    ap.add_argument("--prompt-fraction", type=float, default=0.75)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--workdir", default=None, help="default: a temporary folder")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "throughput"))
    ap.add_argument("--child", choices=("trl-fft", "trl-lora"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def measure(args, work: Path) -> dict:
    import torch

    info = build(work, args)
    order_fft, ref_fft = reference(work, args, skip=0)
    order_sparse, ref_sparse = reference(work, args, skip=args.calibration_steps)
    runs: dict[str, list] = {m: [] for m in RUNS}
    inputs = {"fft": (order_fft, ref_fft), "sparse": (order_sparse, ref_sparse)}
    t0 = time.perf_counter()
    for rep in range(args.repeats):
        for pair in PAIRS if rep % 2 == 0 else list(PAIRS)[::-1]:  # alternate: drift evens out
            print(f"[repeat {rep + 1}/{args.repeats}] {pair} ...", file=sys.stderr, flush=True)
            for m, r in run_pair(work, args, pair, *inputs[pair], info, rep % 2 == 1).items():
                if len(r["rows"]) != args.steps or any(x["loss"] is None for x in r["rows"]):
                    raise SystemExit(f"{m}: {len(r['rows'])} of {args.steps} steps with a loss")
                runs[m].append(r)
    summary = {p: pair_summary(runs, a, b, args.warmup) for p, (a, b) in PAIRS.items()}
    fft = summary["fft"]
    return {
        "benchmark": "throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if LINUX else None,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "spec")},
        "model": info,
        "wall_s": time.perf_counter() - t0,
        "summary": summary,
        "checks": checks(runs, {"fft": ref_fft, "sparse": ref_sparse}),
        "targets": {"fft_step_ratio_max": TARGET_FFT_RATIO, "fft_loss_pearson_min": SHAPE_MATCH_R},
        "met": {
            "fft_step_ratio": fft["step_ratio"]["median"] <= TARGET_FFT_RATIO,
            "fft_loss_shape": (fft["loss"]["pearson_r"] or 0.0) >= SHAPE_MATCH_R,
        },
        "trl_trainable_params": {m: runs[m][0]["trainable"] for m in ("trl-fft", "trl-lora")},
        "trl_threads": runs["trl-fft"][0]["threads"],
        "runs": runs,
    }


def main() -> None:
    args = parse()
    if args.child:
        return trl_child(args.child, json.loads(args.spec))
    if args.threads:  # inherited by every run, lota's and TRL's alike
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="benchthroughput") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(args, work)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_report(out, result)
    plot(result["runs"], out / "loss_curves.png", args)
    s = result["summary"]
    print(
        f"\n{result['model']['params']:,} parameters, {result['model']['source']}, "
        f"batch {args.batch_size} x {args.max_length} tokens, {args.steps} steps "
        f"(first {args.warmup} not timed) x {args.repeats} repeats, {result['wall_s']:.0f} s",
        file=sys.stderr,
    )
    print(table(s), file=sys.stderr)
    print(f"checks: {json.dumps(result['checks'])}", file=sys.stderr)
    print(f"wrote {out}/results.json, report.md, loss_curves.png", file=sys.stderr)
    brief = {p: {k: v for k, v in x.items() if k != "step_s"} for p, x in s.items()}
    print(json.dumps({"summary": brief, "met": result["met"], "checks": result["checks"]}))


if __name__ == "__main__":
    main()
