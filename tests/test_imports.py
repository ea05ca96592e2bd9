"""Every module of lota imports on its own, and ``import lota`` stays light.

An import cycle shows only when one of its modules is imported first, so each module is imported
first in a process of its own. The processes are forked from one interpreter that has loaded the
third-party libraries lota imports at module level (torch, numpy, ...) and no module of lota:
each child imports lota from scratch, without paying for torch again.
"""

from __future__ import annotations

import ast
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


@pytest.mark.parametrize("argv", [["--help"], ["adapt", "--help"], ["merge", "--help"]])
def test_help_loads_no_torch(argv):
    """``lota --help`` (and a command's) prints its options without loading torch."""
    code = (
        "import sys; from lota.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('LOADED', sorted({'torch', 'transformers', 'peft', 'numpy'} & set(sys.modules)))"
    )
    r = _python(code, *argv)
    assert r.returncode == 0, r.stderr
    assert "usage: lota" in r.stdout and r.stdout.strip().endswith("LOADED []"), r.stdout[-500:]


# ---------------------------------------------------------------------------- one-way layers
# lota's modules from the bottom up: a module imports only from its own layer and the layers below
# it (imports inside functions count too), and no modules import each other in a circle. Every
# module is in exactly one layer: a new module is placed here. ``x.*`` stands for every module of
# package ``x`` (not the package itself).
LAYERS = (
    ("foundation", ["lota._version", "lota.errors", "lota.keymap", "lota.shards", "lota.precision", "lota.toy", "lota.events", "lota.names"]),
    ("files, option declarations", ["lota.input_files", "lota.digests", "lota.fileio", "lota.output_checks", "lota.settings"]),
    ("tickets and deltas", ["lota.ticket", "lota.delta", "lota.codecs", "lota.selection"]),
    ("file format", ["lota.container", "lota.format", "lota.ticketfiles", "lota.lora_config"]),
    ("models and training", ["lota.model_folder", "lota.targets", "lota.weights", "lota.models", "lota.sparse_model", "lota.dist", "lota.checkpoint", "lota.datafiles", "lota.batching", "lota.data", "lota.train", "lota.official"]),
    ("library commands", ["lota.task_vectors", "lota.merge_methods", "lota.merge", "lota.compare", "lota.hotswap", "lota.choice", "lota.evaluate", "lota.ks", "lota.lora_import", "lota.peft_export", "lota.callbacks"]),
    ("adapt: the run and its phases", ["lota.phases"]),
    ("adapt: calibrations", ["lota.calibrations", "lota.calibrations.*"]),
    ("adapt: ticket sources and methods", ["lota.sources"]),
    ("option declarations several commands share", ["lota.options"]),
    ("adapt: settings", ["lota.adapt_config"]),
    ("adapt: plan, trainers, frozen check, output folder", ["lota.plan", "lota.trainers", "lota.frozen", "lota.run_folder"]),
    ("adapt: the recipe", ["lota.adapt"]),
    ("lab: base, tasks, report helpers", ["lota.lab", "lota.lab.tasks", "lota.lab.base", "lota.lab.realbase", "lota.lab.report", "lota.lab.scales", "lota.lab.ledger"]),
    ("lab: runs", ["lota.lab.runner"]),
    ("lab: what claims measure with", ["lota.lab.context"]),
    ("lab: claims", ["lota.lab.claims.*"]),
    ("lab: the claim registry", ["lota.lab.claims"]),
    ("lab: the quality bench and the demo", ["lota.lab.quality", "lota.lab.demo"]),
    ("command line and package", ["lota.commands", "lota.cli", "lota"]),
)  # fmt: skip


def _sources(root: Path = SRC) -> dict[str, Path]:
    """``{module: file}`` of every module under ``root`` (a package's is its ``__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_edges(modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """``(importer, line, imported)`` for every import of one module of ``modules`` by another,
    wherever it stands (in functions, under ``TYPE_CHECKING``), relative ones resolved; a name
    imported from a package is its module if it is one, else the package."""

    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = set()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [nearest(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [nearest(f"{base}.{a.name}") for a in node.names]
            else:
                continue
            edges |= {(name, node.lineno, t) for t in targets if t is not None and t != name}
    return sorted(edges)


def layer_of(module: str, layers=LAYERS) -> list[int]:
    """The indices of the layers that name ``module``."""
    found = []
    for i, (_, names) in enumerate(layers):
        for entry in names:
            if module == entry or (entry.endswith(".*") and module.startswith(entry[:-1])):
                found.append(i)
    return found


def layering_errors(modules: dict[str, Path], layers=LAYERS) -> list[str]:
    """Modules in no layer or in several, upward imports and import cycles, one line each."""
    errors = []
    for m in modules:
        if len(layer_of(m, layers)) != 1:
            errors.append(f"{m} is in {len(layer_of(m, layers))} layers of LAYERS; place it in one")
    edges = import_edges(modules)
    rel = {  # the file as a path from the folder that holds the lota package
        m: p.relative_to(p.parents[len(m.split(".")) - (p.name != "__init__.py")])
        for m, p in modules.items()
    }
    for m, line, t in edges:
        lm, lt = layer_of(m, layers), layer_of(t, layers)
        if len(lm) == len(lt) == 1 and lt[0] > lm[0]:
            errors.append(
                f"{rel[m]}:{line}: {m} (layer '{layers[lm[0]][0]}') imports {t}, which is above "
                f"it (layer '{layers[lt[0]][0]}')"
            )
    for cycle in _cycles({(m, t) for m, _, t in edges}):
        hops = [f"{rel[m]}:{line} {m} -> {t}" for m, line, t in edges if m in cycle and t in cycle]
        errors.append(f"import cycle among {', '.join(sorted(cycle))}: " + "; ".join(hops))
    return errors


def _cycles(edges: set[tuple[str, str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_modules_import_only_downward_and_never_in_a_circle():
    errors = layering_errors(_sources())
    assert not errors, "\n".join(errors)


def _package(root: Path, files: dict[str, str]) -> Path:
    """A package ``lota`` under ``root`` holding ``files`` ({relative path: source})."""
    pkg = root / "lota"
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    return pkg


def test_the_layer_check_names_upward_imports_and_cycles(tmp_path):
    """The check itself: an upward import inside a function, a relative import cycle and a
    module in no layer are each reported with the importing file and line."""
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "def f():\n    from .high import x\n",
            "high.py": "from . import low\n",
            "sub/__init__.py": "",
            "sub/a.py": "from .b import y\n",
            "sub/b.py": "import lota.sub.a\n",
            "stray.py": "",
        },
    )
    layers = (
        ("low", ["lota.low", "lota.sub", "lota.sub.*"]),
        ("high", ["lota.high", "lota"]),
    )
    errors = layering_errors(_sources(pkg), layers)
    assert errors[0] == "lota.stray is in 0 layers of LAYERS; place it in one"
    assert "lota/low.py:2: lota.low (layer 'low') imports lota.high, which is above it" in errors[1]
    cycles = sorted(e for e in errors if e.startswith("import cycle"))
    assert len(errors) == 4 and len(cycles) == 2
    assert cycles[0].startswith("import cycle among lota.high, lota.low: ")
    assert "lota/low.py:2 lota.low -> lota.high" in cycles[0]
    assert "lota/sub/b.py:1 lota.sub.b -> lota.sub.a" in cycles[1]


def _shown(path: Path) -> Path:
    return path.relative_to(SRC.parent) if path.is_relative_to(SRC.parent) else path


def private_crossings(modules: dict[str, Path]) -> list[str]:
    """``file:line`` of every use of another lota module's private name: ``from .x import _name``
    and ``x._name`` where ``x`` is a lota module imported under that name."""
    out = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                if not base.startswith("lota"):
                    continue
                for a in node.names:
                    if f"{base}.{a.name}" in modules:  # a module imported by name
                        aliases.add(a.asname or a.name)
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        out.append(f"{_shown(path)}:{node.lineno} imports {a.name}")
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("lota")}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                out.append(f"{_shown(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names():
    crossings = private_crossings(_sources())
    assert not crossings, "\n".join(crossings)


def test_the_private_name_check_finds_both_forms(tmp_path):
    pkg = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "def _hidden():\n    pass\n",
            "b.py": "from .a import _hidden\n",
            "c.py": "from . import a\n\ndef f():\n    return a._hidden()\n",
            "d.py": "from .a import __doc__\nfrom . import a\nx = a.__name__\n",
        },
    )
    found = private_crossings(_sources(pkg))
    assert [f.split(" ", 1)[1] for f in found] == ["imports _hidden", "uses a._hidden"]
