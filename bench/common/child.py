"""Run one benchmark child process and measure it: wall time, its own peak resident set (from
``wait4``, so one child's peak is never mixed with another's) and its output. A child is a
program (``lota``'s CLI) or a module of ``bench`` run with ``python -m``; it finds ``bench``
from any working folder (``env``)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[2]


class Child(NamedTuple):
    wall_s: float
    peak_mb: float
    code: int
    stdout: str
    stderr: str


def env() -> dict[str, str]:
    """This process's environment with the repository root first on ``PYTHONPATH``."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def module(name: str, *args) -> list[str]:
    """The command that runs module ``name`` (``bench.memory.official``, ``lota.cli``)."""
    return [sys.executable, "-m", name, *map(str, args)]


def run_module(name: str, *args) -> subprocess.CompletedProcess:
    """Run module ``name`` to its end; its output is captured as text."""
    return subprocess.run(module(name, *args), capture_output=True, text=True, env=env())


def run_child(cmd: list[str], limit_gb: float | None = None) -> Child:
    """Run ``cmd``; with ``limit_gb`` its address space is capped, so that running out of memory
    fails cleanly inside the child instead of taking the machine down."""

    def limit():
        if limit_gb:
            b = int(limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (b, b))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, preexec_fn=limit, env=env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(wall, usage.ru_maxrss / 1024, code, out.read(), err.read())
