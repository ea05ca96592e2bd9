"""Shared fixtures: tiny model folders and task files built in memory (no downloads)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lota.model_folder import quiet_transformers
from lota.toy import save_toy_model

quiet_transformers()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each keeps to one thread, and so do the commands
    # its tests start, so that the workers do not take each other's cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY = {"hidden": 32, "layers": 2, "heads": 2}
ADAPT = ["--steps", "2", "--calibration-steps", "1", "--lr", "1e-2", "--batch-size", "4", "--quiet"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = r.randint(0, 9), r.randint(0, 9)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def reverse_rows(n: int, seed: int = 1) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        w = "".join(r.choice("abcd") for _ in range(3))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"rev {w}"},
                    {"role": "assistant", "content": w[::-1]},
                ]
            }
        )
    return rows


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lota")
    save_toy_model(d / "base", seed=0, **TINY)
    save_toy_model(d / "other_arch", seed=0, hidden=48, layers=1, heads=2)
    write_jsonl(d / "a.jsonl", addition_rows(24))
    write_jsonl(d / "b.jsonl", reverse_rows(24))
    return d


@pytest.fixture(scope="session")
def trained(workdir) -> Path:
    """``lota adapt`` of the tiny base on task A, with a saved model, run once per session."""
    from lota.cli import main

    argv = ["adapt", str(workdir / "base"), "--data", str(workdir / "a.jsonl")]
    assert main(argv + ["--out", str(workdir / "cli_a"), "--save-model", *ADAPT]) == 0
    return workdir / "cli_a"


def assert_only_ticket_changed(before, after, ticket) -> None:
    """Every entry outside ``ticket`` (a ticket or a delta) of every tensor is bit-identical
    between two ``lota.weights.WeightReader``s or two name -> tensor dicts (a tensor not in the
    ticket: all of it)."""
    for name in getattr(before, "shapes", before):
        w0, w1 = before.get(name), after.get(name)
        assert w0.dtype == w1.dtype and w0.shape == w1.shape, name
        a, b = entry_bits(w0), entry_bits(w1)
        idx = ticket.indices.get(name)
        if idx is not None and idx.numel():  # the ticket's entries may differ: take them as before
            b = b.clone()
            b[idx] = a[idx]
        assert torch.equal(a, b), name


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def entry_bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of each entry, flat, so that -0.0 and NaN payloads compare exactly."""
    return t.detach().contiguous().view(_INT_OF_SIZE[t.element_size()]).reshape(-1)


@pytest.fixture(scope="session")
def fp16_base(workdir) -> Path:
    """The tiny base in float16, whose weights end at 65504."""
    from lota.models import load_model
    from lota.toy import byte_tokenizer

    out = workdir / "base_fp16"
    load_model(str(workdir / "base")).to(torch.float16).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def constant_delta(base: Path, path: Path, value: float, n: int = 8) -> Path:
    """A delta for ``base`` adding ``value`` to the first ``n`` entries of its first layer's
    q_proj (a linear weight), saved to ``path``."""
    from lota import format as fmt
    from lota.delta import SparseDelta
    from lota.ticket import Ticket
    from lota.weights import WeightReader

    reader = WeightReader(str(base))
    name = "model.layers.0.self_attn.q_proj.weight"
    ticket = Ticket(
        shapes={name: tuple(reader.shapes[name])},
        indices={name: torch.arange(n)},
        base_fingerprint=reader.fingerprint(),
    )
    fmt.save(SparseDelta(ticket, {name: torch.full((n,), value)}), path)
    return path


_WATCHER = """
import os, sys, time
fifo, flag = sys.argv[1], sys.argv[2]
while True:
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody has it open for reading
        time.sleep(0.05)
        continue
    open(flag, "a").close()
    os.close(fd)
"""


@contextlib.contextmanager
def watch_fifo(fifo: Path, flag: Path):
    """Fail instead of hanging: whenever a reader is blocked opening ``fifo``, open its writing
    end (so the reader gets end-of-file) and leave ``flag`` behind. The watcher is a process of
    its own, since a blocked open can hold this process's GIL."""
    watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, str(fifo), str(flag)])
    try:
        yield
    finally:
        watcher.kill()
        watcher.wait()
