"""Every module of lota imports on its own, and ``import lota`` stays light.

An import cycle shows only when one of its modules is imported first, so each module is imported
first in a process of its own. The processes are forked from one interpreter that has loaded the
third-party libraries lota imports at module level (torch, numpy, ...) and no module of lota:
each child imports lota from scratch, without paying for torch again.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lota"

# Imports every module named in argv[1] first in a forked child, argv[2] children at a time;
# prints {module: traceback} of the failures as JSON.
FORKER = r"""
import json, os, sys, tempfile, traceback

for lib in ("numpy", "torch", "torch.nn.utils.parametrize", "safetensors.torch", "tqdm.auto", "yaml"):
    try:
        __import__(lib)
    except ImportError:
        pass
assert not [m for m in sys.modules if m == "lota" or m.startswith("lota.")], "lota preloaded"
names, jobs = json.loads(sys.argv[1]), int(sys.argv[2])
errors = tempfile.mkdtemp()
running, failures = {}, {}


def wait_one():
    pid, status = os.wait()
    name = running.pop(pid)
    if status != 0:
        path = os.path.join(errors, name)
        failures[name] = open(path).read() if os.path.exists(path) else f"status {status}"


for name in names:
    while len(running) >= jobs:
        wait_one()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            __import__(name)
        except BaseException:
            with open(os.path.join(errors, name), "w") as f:
                f.write(traceback.format_exc())
            code = 1
        os._exit(code)
    running[pid] = name
while running:
    wait_one()
print(json.dumps(failures))
"""


def _modules(folder: Path = SRC, prefix: str = "lota") -> list[str]:
    """Every module and package under ``src/lota``, found on disk (nothing is imported)."""
    names = [prefix] if prefix == "lota" else []
    for m in pkgutil.iter_modules([str(folder)]):
        names.append(f"{prefix}.{m.name}")
        if m.ispkg:
            names += _modules(folder / m.name, f"{prefix}.{m.name}")
    return names


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def test_modules_are_found():
    names = _modules()
    assert {"lota", "lota.cli", "lota.format", "lota.codecs", "lota.lab"} <= set(names)
    assert all(n.startswith("lota") for n in names) and len(names) == len(set(names))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_first_on_its_own():
    r = _python(FORKER, json.dumps(_modules()), "4")
    assert r.returncode == 0, r.stderr
    failures = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"import {n} failed:\n{tb}" for n, tb in failures.items())


@pytest.mark.parametrize("module", ["lota", "lota.cli", "lota.errors"])
def test_import_loads_no_torch(module):
    heavy = ("torch", "transformers", "peft", "numpy")
    code = f"import sys, {module}; print([m for m in {heavy!r} if m in sys.modules])"
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_public_names_load_on_first_use():
    code = (
        "import sys, lota; names = sorted(lota.__all__); "
        "assert set(names) <= set(dir(lota)), 'dir(lota) misses names'; "
        "assert 'torch' not in sys.modules; "
        "missing = [n for n in names if getattr(lota, n, None) is None]; "
        "print(lota.__version__, len(names), missing)"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr
    version, count, missing = r.stdout.split(maxsplit=2)
    assert version and int(count) > 10 and missing.strip() == "[]"


def test_the_version_is_the_one_pyproject_declares():
    import re

    import lota

    pyproject = (SRC.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert declared and declared.group(1) == lota.__version__
