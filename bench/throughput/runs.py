"""The throughput benchmark's runs: each pair's lota and TRL children, one after the other or
taking turns step by step at their gates."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import child
from bench.common.inputs import adapt_argv
from bench.common.stats import last_json

from .trl_run import CHILD_KEYS

RUNS = ("lota-fft", "trl-fft", "lota-lota", "trl-lora")
PAIRS = {"fft": ("lota-fft", "trl-fft"), "sparse": ("lota-lota", "trl-lora")}


def lota_argv(work: Path, args, method: str) -> list[str]:
    """``lota adapt`` arguments of one run (after ``lota``)."""
    sparse = method == "lota"
    return adapt_argv(
        work / "model",
        work / "data.jsonl",
        work / f"run_lota-{method}",
        method=method,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer="adamw",
        weight_decay=0,
        max_grad_norm=1.0,
        seed=args.seed,
        max_length=args.max_length,
        dtype="float32",
        checkpoint_every=0,
        force=True,
        restart=True,
        sparsity=args.sparsity if sparse else None,
        calibration_steps=args.calibration_steps if sparse else None,
    )


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
            command([ready_w, go_r]),
            stdout=self.out,
            stderr=self.err,
            pass_fds=(ready_w, go_r),
            env=child.env(),
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
        argv = lota_argv(work, args, method)
        if gate:
            return child.module("bench.throughput.gated", *gate, *argv)
        return child.module("lota.cli", *argv)

    def trl_cmd(gate=None):
        return child.module("bench.throughput.trl_run", b, json.dumps({**spec, "gate": gate}))

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
