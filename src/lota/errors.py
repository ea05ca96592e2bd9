"""lota's exception types.

Every error says what went wrong, where (a path, a line, a tensor name) and how to fix it, so the
CLI can print it as one line. Library code raises these; only the CLI prints and exits.
"""

from __future__ import annotations


class LotaError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with: 2 for bad input, 1 for failures."""

    exit_code = 1

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(self.fix)
        return one_line(" -- ".join(parts))


def one_line(text: str) -> str:
    """``text`` with every unprintable character (a newline in a file or tensor name, a control
    character) written as its escape, so that an error stays one line whatever a file holds."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


class InputError(LotaError):
    """The user gave something lota cannot use: a path, an argument, a file's content."""

    exit_code = 2


class FormatError(InputError):
    """A file is not a valid lota file (wrong kind, version, truncated, corrupted)."""


class MismatchError(InputError):
    """Two things that must belong together do not (fingerprint, shapes, parameter names)."""


class TrainingError(LotaError):
    """A run failed while training (non-finite loss, out of memory)."""


class OutputError(LotaError):
    """An output could not be written: the disk is full, read-only, or not ours to write.

    ``exit_code`` is 1 when the machine failed a valid run (a full disk: free space and rerun)
    and 2 when the output location itself cannot be used (read-only, no permission)."""

    def __init__(
        self, what: str, where: str | None = None, fix: str | None = None, exit_code: int = 1
    ):
        super().__init__(what, where, fix)
        self.exit_code = exit_code
