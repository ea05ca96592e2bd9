"""Atomic file output, the lock on an output folder, and folder swaps.

Invariant: no lota output ever appears under its final name half-written. Files go to a temporary
name in the same folder, are flushed to disk and then renamed; folders are built beside their
final place and swapped in (``atomic_dir``), and a swap a kill interrupted is finished by the next
lota command that writes there. One process at a time writes a folder (``FolderLock``). Write
failures the user can act on (disk full, read-only, no permission) become one ``OutputError``
naming the output. What an output must not be (an existing file without ``--force``, an input) is
checked in ``output_checks``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import InputError, OutputError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

LOCKNAME = ".lota.lock"  # inside a folder whose parent is not writable
LOCK_SUFFIX = ".lota.lock"  # PARENT/.NAME.lota.lock: the lock of folder NAME

# errno: (what the user reads, how to fix it, exit code). A full disk fails a valid run (1); a
# read-only or forbidden location is a wrong choice of output (2).
_WRITE_ERRORS = {
    errno.ENOSPC: (
        "No space left on device",
        "free space on that disk, or write elsewhere, then run the command again",
        1,
    ),
    errno.EDQUOT: (
        "Disk quota exceeded",
        "free space within your quota, or write elsewhere, then run the command again",
        1,
    ),
    errno.EROFS: (
        "the file system is read-only",
        "choose an output location on a writable disk",
        2,
    ),
    errno.EACCES: (
        "Permission denied",
        "choose a writable output location, or fix the permissions of this one",
        2,
    ),
    errno.EPERM: (
        "Operation not permitted",
        "choose a writable output location, or fix the permissions of this one",
        2,
    ),
}


def write_error(e: BaseException, where: str | None) -> OutputError | None:
    """The one-line error for a failed write, or None when ``e`` is not one the user can fix.

    safetensors reports I/O failures as its own ``SafetensorError`` with the OS error number in
    the text ("... (os error 28)"), so that text is read too."""
    code = None
    if not isinstance(e, (OSError, SafetensorError)) and isinstance(e.__context__, OSError):
        e = e.__context__  # torch.save reports a failed write as a RuntimeError raised during it
    if isinstance(e, OSError):
        code = e.errno
    elif isinstance(e, SafetensorError):
        m = re.search(r"os error (\d+)|code: (\d+)", str(e))
        code = int(m.group(1) or m.group(2)) if m else None
    if code not in _WRITE_ERRORS:
        return None
    what, fix, exit_code = _WRITE_ERRORS[code]
    return OutputError(f"cannot write: {what}", where, fix, exit_code=exit_code)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``."""
    refuse_folder_name(path)
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    _ensure_dir(parent)
    _remove_dead_temporaries(parent, path.name)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=parent)
    except OSError as e:
        raise write_error(e, str(path)) or e from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        _fsync(tmp_path)
        fault(f"save:{path.name}")
        # rename(2) replaces the directory entry: a link at ``path`` is replaced by the new file
        # and whatever it pointed to stays untouched (only --force gets this far over a link).
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)
        mapped = write_error(e, str(path))
        if mapped is not None:
            raise mapped from None
        raise


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> None:
    """Write a safetensors file at ``path`` (inside ``atomic_path`` or ``atomic_dir``) so that the
    same tensors and metadata always give the same bytes: every safetensors file lota writes goes
    through here.

    safetensors keeps the metadata in a hash map whose order changes from one process to the
    next; the file's JSON header is rewritten in place with the metadata keys sorted. The text
    has the same characters in another order, so the header keeps its length and the tensor data
    does not move."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" in header:
            header = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} | header
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(text) > size:  # JSON escapes the same characters as safetensors' writer
            raise RuntimeError("the sorted safetensors header is longer than the written one")
        f.seek(8)
        f.write(text.ljust(size, b" "))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``.

    The swap is three renames: the finished folder to ``.NAME.new`` (the commit: from here on the
    new output is complete and wins), the old ``NAME`` (folder, file or link; a link is moved
    itself, never its target) to ``.NAME.old``, and ``.NAME.new`` to ``NAME``; then ``.NAME.old``
    is deleted. A kill before the commit leaves the old ``NAME`` as it was (and a ``.tmp`` folder
    that is deleted later). A kill after it may leave ``NAME`` missing, with the complete new
    folder under ``.NAME.new``: the next lota command writing ``NAME`` finishes the swap before it
    does anything else (``recover_dir``). So, seen by lota, ``NAME`` holds the whole old output or
    the whole new one, never a mix.

    The folder's lock (``FolderLock``) is held from the first check to the last rename: a second
    writer is refused, so the ``.NAME.new`` or temporaries found here are never a live writer's.
    A command that checks ``NAME`` before it computes holds the lock from there (``writing_folder``).
    """
    final = output_folder(path)
    _ensure_dir(final.parent)
    with FolderLock(final):
        recover_dir(final)
        _remove_dead_temporaries(final.parent, final.name)
        try:
            tmp = Path(
                tempfile.mkdtemp(prefix=_tmp_prefix(final.name), suffix=".tmp", dir=final.parent)
            )
        except OSError as e:
            raise write_error(e, str(path)) or e from None
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())
            fault(f"save:{final.name}")
            _swap_in(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OutputError) and e.where and e.where.startswith(str(tmp)):
                # a file inside the temporary folder: name the output the user asked for
                raise OutputError(e.what, str(path), e.fix, exit_code=e.exit_code) from None
            mapped = write_error(e, str(path))
            if mapped is not None:
                raise mapped from None
            raise


def _swap_in(tmp: Path, final: Path) -> None:
    new, old = _swap_names(final)
    _remove(new)  # recover_dir, under the same lock, finished any committed swap: a stray
    os.replace(tmp, new)  # the commit point
    if os.path.lexists(final):
        _remove(old)
        os.replace(final, old)
    fault(f"swap:{final.name}")
    os.replace(new, final)
    _remove(old)
    _fsync_dir(final.parent)


def recover_dir(path: str | os.PathLike) -> bool:
    """Finish a folder swap (``atomic_dir``) that a killed lota process left half-done at ``path``;
    True when it put a committed output in place.

    A complete ``.NAME.new`` takes ``NAME``'s place (the swap had committed); otherwise a
    ``.NAME.old`` without a ``NAME`` comes back (a swap of an older lota, cut before its last
    rename); a ``.NAME.old`` beside a ``NAME`` is deleted. Done under the folder's lock, so a
    swap still in progress is never taken for a killed one: its writer is named instead."""
    final = Path(os.path.abspath(path))
    new, old = _swap_names(final)
    if not (os.path.lexists(new) or os.path.lexists(old)):
        return False
    with FolderLock(final):
        try:
            committed = new.is_dir() and not new.is_symlink()
            if committed:
                if os.path.lexists(final):
                    _remove(old)
                    os.replace(final, old)
                os.replace(new, final)
            elif os.path.lexists(old) and not os.path.lexists(final):
                os.replace(old, final)
            _remove(old)
        except OSError as e:
            raise write_error(e, str(path)) or e from None
    return committed


def _tmp_prefix(name: str) -> str:
    # The writer's pid is in the name, so a later writer can tell a killed one's leftovers from
    # the temporaries of one still writing.
    return f".{name}.{os.getpid()}."


def _remove_dead_temporaries(folder: Path, name: str) -> None:
    """Delete temporaries of ``name`` in ``folder`` whose writing process no longer runs."""
    pattern = re.compile(r"\." + re.escape(name) + r"\.(\d+)\.[^.]+\.tmp")
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            m = pattern.fullmatch(p.name)
            if m and not _alive(int(m.group(1))):
                _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def _swap_names(final: Path) -> tuple[Path, Path]:
    return final.with_name(f".{final.name}.new"), final.with_name(f".{final.name}.old")


def _remove(p: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder tree; nothing if absent."""
    if p.is_symlink() or p.is_file():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)


def output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` made absolute (``.``, ``..`` and a trailing slash resolved); refuses the current
    folder and the folders above it, which a swap would move away from under the shell and the
    command's own inputs."""
    final = Path(os.path.abspath(path))
    try:
        here = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the current folder was deleted: nothing above it to protect
        return final
    real = Path(os.path.realpath(final.parent)) / final.name
    if not final.name or real == here or real in here.parents:
        raise InputError(
            "the output folder is the current folder or holds it, and lota replaces an output "
            "folder as a whole",
            str(path),
            f"give a new folder, e.g. {option} out",
        )
    return final


def refuse_folder_name(path: str | os.PathLike) -> None:
    s = os.fspath(path)
    if (
        s.endswith(("/", os.sep))
        or Path(s).name in ("", ".", "..")
        or (os.path.isdir(s) and not os.path.islink(s))
    ):
        raise InputError("output path is a folder", s, "give a file name, e.g. out.safetensors")


def fault(point: str) -> None:
    """Test hook: ``LOTA_FAULT=point`` kills the process with SIGKILL when ``point`` is reached.

    Points are ``calibration:N`` / ``train:N`` (after step N), ``save:NAME`` (a file or folder
    fully written under its temporary name, not yet renamed), ``swap:NAME`` (a folder swap between
    moving the old folder aside and renaming the new one into place), ``checkpoint-save``, and in
    ``lota adapt`` ``locked`` (the output folder locked, nothing written) and ``started`` (the
    metrics log opened, no checkpoint yet).
    """
    if os.environ.get("LOTA_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


class FolderLock:
    """An exclusive lock on a folder that one process writes or replaces, held until ``release``.

    Every lota command that writes a folder holds it from its first check to its last write, so a
    second writer is refused in one line naming the holder's pid. ``fcntl.flock`` on a file beside
    the folder, ``PARENT/.NAME.lota.lock``, which a folder swap (``atomic_dir``) does not move; the
    kernel drops the lock when its process ends, however it ends, so a killed process's lock never
    sticks (its file stays, and is reused). The file holds the holder's pid and is deleted on
    release. Where the parent is not writable the file is ``FOLDER/.lota.lock`` (a run folder
    made for the user in a read-only place; nothing can swap such a folder anyway).

    ``follow_link``: the lock is on the folder a link at ``folder`` points to (a command that
    writes into it), not on the link (a command that replaces the link, never its target). A
    process may take a lock it holds again (a command holds its output and the swap takes it too);
    it is released with the last ``release``.
    """

    def __init__(self, folder: str | os.PathLike, option: str = "--out", follow_link: bool = False):
        self.folder, self.option = str(folder), option
        target = Path(os.path.abspath(folder))
        if follow_link:
            target = Path(os.path.realpath(target))
        else:  # the entry itself, in its real parent folder
            target = Path(os.path.realpath(target.parent)) / target.name
        self.target = target
        self.path = target.with_name(f".{target.name}{LOCK_SUFFIX}") if target.name else None
        self.key: str | None = None

    def acquire(self) -> FolderLock:
        if fcntl is None or self.key is not None:
            return self
        path = self.path
        try:
            if path is None:
                raise PermissionError(errno.EACCES, "no parent folder")
            fd = self._locked(path)
        except OSError as e:
            inside = self.target.is_dir() and not self.target.is_symlink()
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not inside:
                raise write_error(e, self.folder) or e from None
            path = self.target / LOCKNAME
            try:
                fd = self._locked(path)
            except OSError as e2:
                raise write_error(e2, self.folder) or e2 from None
        self.key = str(path)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _HELD[self.key] = [fd, 1, os.getpid()]
        return self

    def _locked(self, path: Path) -> int | None:
        """An open descriptor of ``path`` locked by this process (None: this process already
        holds it, now once more)."""
        held = _HELD.get(str(path))
        if held is not None and held[2] == os.getpid():
            held[1] += 1
            return None
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return fd  # a file system without locks: run unlocked rather than not at all
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise InputError(
                    "another lota process"
                    + (f" (pid {holder})" if holder.isdigit() else "")
                    + " is writing to this folder",
                    self.folder,
                    f"wait until it ends, or choose another {self.option}",
                ) from None
            # The holder we waited on may have deleted the file after we opened it; a lock on a
            # deleted file guards nothing, so lock the file that is there now.
            if _same_file(fd, path):
                return fd
            os.close(fd)

    def release(self) -> None:
        if self.key is None:
            return
        key, self.key = self.key, None
        held = _HELD.get(key)
        if held is None or held[2] != os.getpid():
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        fd = held[0]
        if _same_file(fd, Path(key)):
            with contextlib.suppress(OSError):
                os.unlink(key)  # while still locked, so nobody takes a lock on a file going away
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# lock file -> [descriptor, times taken, pid] of the locks this process holds
_HELD: dict[str, list[int]] = {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def create_folder(path: str | os.PathLike) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, deepest first, for ``remove_folders``."""
    created = []
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p):
        created.append(p)
        p = p.parent
    _ensure_dir(Path(path))
    return created


def remove_folders(created: list[Path]) -> None:
    """Undo ``create_folder``: the deepest folder with what is in it, then each parent if empty."""
    for i, folder in enumerate(created):
        if i == 0:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                folder.rmdir()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _ensure_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        mapped = write_error(e, str(folder))
        if mapped is not None and mapped.exit_code == 1:
            raise mapped from None
        raise InputError(
            f"cannot create the output folder ({e.strerror})",
            str(folder),
            "choose a writable output location",
        ) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> None:
    """Clean up after a killed lota process in ``folder``: finish its folder swaps (``.NAME.new``
    and ``.NAME.old``, see ``atomic_dir``) and delete its temporary files and folders. The
    temporaries of a process still running are left alone."""
    folder = Path(folder)
    for p in [*folder.glob(".*.new"), *folder.glob(".*.old")]:
        recover_dir(folder / p.name[1:-4])
    for p in folder.glob(".*.tmp"):
        m = re.fullmatch(r"\..+\.(\d+)\.[^.]+\.tmp", p.name)
        if m is None or not _alive(int(m.group(1))):  # no pid in it: an older lota's
            _remove(p)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
