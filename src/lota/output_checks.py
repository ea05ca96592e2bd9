"""Checks an output path passes before a command computes what it writes there.

An existing output, file or link, is replaced only on ``--force``; a link is replaced itself,
never written through; the current folder and the folders above it are never an output folder;
and no output replaces an input (``check_not_an_input``). A command that writes a folder as a
whole holds its lock from these checks to its swap (``writing_folder``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InputError
from .fileio import FolderLock, create_folder, output_folder, recover_dir, refuse_folder_name


def check_new_file(
    path: str | os.PathLike,
    force: bool,
    option: str = "--out",
    inputs: Iterable[str | os.PathLike | None] = (),
) -> None:
    """Refuse an output file name that is a folder, one whose writing would replace all or part of
    one of ``inputs`` (``check_not_an_input``), and an existing file or link unless ``force`` (a
    link, even one pointing nowhere, counts as existing: it is replaced, not followed)."""
    refuse_folder_name(path)
    check_not_an_input(path, inputs, option)
    if os.path.lexists(path) and not force:
        raise InputError(
            "output exists", str(path), f"choose a new {option}, or pass --force to replace it"
        )


def check_new_folder(path: str | os.PathLike, force: bool, option: str = "--out") -> None:
    """Refuse an output folder that already holds something (or is a file or a link) unless
    ``force``; the current folder and those above it are refused always. A swap a killed lota
    left half-done there is finished first, so the check sees the output as it really is. An
    output that swap put in place is not refused: it is the killed command's, which never
    reported it, and that command run again replaces it with the same output and succeeds."""
    output_folder(path, option)
    if recover_dir(path):
        return
    out = Path(path)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        if not force:
            raise InputError(
                "output exists", str(path), f"choose a new {option}, or pass --force to replace it"
            )


@contextlib.contextmanager
def writing_folder(
    path: str | os.PathLike,
    force: bool,
    option: str = "--out",
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Hold ``path``, an output folder a command writes as a whole (``atomic_dir``), from its checks
    to its swap: its lock is taken first (a second writer is refused naming this one), then it is
    checked (``check_new_folder``) and refused where replacing it would replace one of ``inputs``
    (``check_not_an_input``). Folders made for the lock's file are removed again if the command
    fails."""
    final = output_folder(path, option)
    created = create_folder(final.parent)
    try:
        with FolderLock(path, option):
            check_not_an_input(path, inputs, option)
            check_new_folder(path, force, option)
            yield final
    except BaseException:
        for folder in created:  # only the empty ones: an output written there stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def check_not_an_input(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str = "--out"
) -> None:
    """Refuse an output ``path`` whose writing would replace all or part of an input: what is at
    ``path`` now is an input, holds one, or lies inside an input folder. Paths are compared by
    identity (device and inode along their real paths), so a link, a ``..`` or a second mount of
    the same file is recognised. A new output inside an input folder replaces nothing and passes,
    and so does a link at ``path`` to an input (the link is replaced, never what it points to)."""
    final = Path(os.path.abspath(path))
    real_parent = Path(os.path.realpath(final.parent))
    try:
        replaced = os.lstat(real_parent / final.name)
    except OSError:
        return  # nothing there to replace
    around = [_stat(p) for p in (real_parent, *real_parent.parents)]  # what holds the output
    for given in inputs:
        if given is None or not str(given):
            continue
        ids = [_stat(Path(given)), _stat(Path(given), follow=False)]  # it, or a link to it
        holders = [_stat(p) for p in Path(os.path.realpath(given)).parents]
        if _is(replaced, ids):
            what = "is"
        elif _is(replaced, holders):
            what = "holds"
        elif any(a is not None and _is(a, ids) for a in around):
            what = "lies inside"
        else:
            continue
        raise InputError(
            f"the output {what} the input '{given}', and writing it would replace that input",
            str(path),
            f"choose a {option} outside the command's inputs",
        )


def _stat(p: Path, follow: bool = True) -> os.stat_result | None:
    try:
        return os.stat(p) if follow else os.lstat(p)
    except OSError:
        return None


def _is(a: os.stat_result, candidates) -> bool:
    return any(c is not None and os.path.samestat(a, c) for c in candidates)
