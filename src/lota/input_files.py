"""Checks of the files lota is given to read, made before anything opens them.

A FIFO blocks whoever opens it until something writes to it, and a device (``/dev/zero``,
``/dev/urandom``) never ends: lota refuses them unopened, naming the path (``check_input_file``,
``check_folder_files`` for a folder whose files are opened by name). Two inputs that are one file
(the same path, a link, a hard link) are found by device and inode (``first_repeat``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError

# What a path may be instead of a regular file or a folder. Opening a FIFO blocks until something
# writes to it, and a device (/dev/zero, /dev/urandom) never ends: lota refuses them unopened.
_SPECIAL = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def special_kind(path: str | os.PathLike) -> str | None:
    """``"a FIFO"``, ``"a character device"``, ... when ``path`` (a symlink counts as what it
    points to) is neither a regular file nor a folder; None otherwise, or when it cannot be
    stat'ed (then opening it fails at once, and nothing waits). Only ``stat``: nothing is opened."""
    try:
        return _SPECIAL.get(stat.S_IFMT(os.stat(path).st_mode))
    except (OSError, ValueError):
        return None


def check_input_file(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse an input path that is a FIFO, device or socket, before anything opens it: reading
    one would block (a FIFO nobody writes to) or never end (``/dev/zero``). Every file lota reads
    from a path it was given goes through this check first."""
    kind = special_kind(path)
    if kind:
        raise InputError(
            f"the {what} is {kind}, not a regular file, and reading it could block or never end",
            str(path),
            "pass a regular file (save what the pipe or device gives into a file first)",
        )


def check_folder_files(
    folder: str | os.PathLike, what: str, subfolders: Iterable[str] = ()
) -> None:
    """``check_input_file`` for every entry of ``folder`` (and of its ``subfolders``), for a
    folder whose files are opened by name (a model folder, an adapter, a run's output)."""
    for place in (Path(folder), *(Path(folder) / s for s in subfolders)):
        if not place.is_dir():
            continue
        with os.scandir(place) as entries:
            for entry in entries:
                kind = special_kind(entry.path)
                if kind:
                    raise InputError(
                        f"{entry.name} in the {what} folder is {kind}, not a regular file, and "
                        "opening it could block",
                        entry.path,
                        "replace it with the file itself (a symlink to a regular file is fine)",
                    )


def first_repeat(paths: Iterable[str | os.PathLike]) -> tuple[str, str] | None:
    """The first two of ``paths`` that name one file (the same path, a link to it, a hard link:
    compared by device and inode), or None. Paths that cannot be read are left to their reader."""
    seen: dict[tuple[int, int], str] = {}
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return seen[key], str(p)
        seen[key] = str(p)
    return None
