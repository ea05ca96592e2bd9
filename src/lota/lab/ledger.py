"""The lab's ledger: what the report needs of every run and model, kept without weights.

A folder of JSON files, one per run or model (its spec, its result, its scores), each written as
it finishes (and committed with git when asked), so a bench continued on another machine, or on a
fresh cache, retrains only what a missing result needs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fileio import write_json


class Ledger:
    """The ledger in ``folder``; with ``commit`` each entry is committed with git as written.
    A ``read_only`` ledger keeps what is recorded in memory and never writes (a report made from
    the ledger while a bench fills it)."""

    def __init__(self, folder: str | Path, commit: bool = False, read_only: bool = False):
        self.folder = Path(folder)
        self.commit = commit and not read_only
        self.read_only = read_only
        self._memory: dict[str, dict] = {}

    def entry(self, name: str) -> dict:
        path = self.folder / f"{name}.json"
        stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        return {**stored, **self._memory.get(name, {})}

    def names(self) -> list[str]:
        """Every entry's name."""
        return sorted({p.stem for p in self.folder.glob("*.json")} | set(self._memory))

    def record(self, name: str, **fields) -> None:
        entry = {**self.entry(name), **fields}
        if self.read_only:
            self._memory[name] = entry
            return
        path = self.folder / f"{name}.json"
        write_json(path, entry)
        if self.commit:
            _git_commit(path, f"lab ledger: {name}")


def _git_commit(path: Path, message: str) -> None:
    """Commit one ledger file (only it) in the git repository that holds it; a folder outside
    git, or a git that fails, leaves the file written and uncommitted."""
    import subprocess

    cwd = path.parent
    try:
        subprocess.run(["git", "add", "--", path.name], cwd=cwd, check=True, capture_output=True)
        subprocess.run(
            ["git", "commit", "-q", "-m", message, "--", path.name],
            cwd=cwd,
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        pass
