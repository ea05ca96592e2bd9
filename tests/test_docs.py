"""docs/commands.md against the command line itself: every command `lota --help` lists has a
section, each section lists exactly the options that command's `--help` lists, and every example
line (there and in README.md) uses only options its command takes. Only the help text is read, so the check
holds however the options are declared."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from lota.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "commands.md"
README = ROOT / "README.md"
HEADING = re.compile(r"^#{2,3} `lota ([a-z][a-z-]*(?: [a-z][a-z-]*)?)`\s*$", re.M)
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


def _help(words: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*words, "--help"]) == 0
    return out.getvalue()


def _block(text: str, title: str) -> list[str]:
    """The lines of one `title:` block of argparse's help, up to the next blank line."""
    lines = text.splitlines()
    start = lines.index(title) + 1 if title in lines else len(lines)
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    return block


def _options(text: str) -> set[str]:
    """Long options of the help's options block: the invocation column only (two-space indent,
    ending at the gap before the help), never options named inside a help sentence."""
    found = set()
    for line in _block(text, "options:"):
        m = re.match(r"^  (-\S.*?)(?: {2,}|$)", line)
        if m:
            found.update(OPTION.findall(m.group(1)))
    return found


def _subcommands(text: str) -> list[str]:
    """Names of the sub-commands a help lists (four-space indent under positional arguments)."""
    names = []
    for line in _block(text, "positional arguments:"):
        m = re.match(r"^ {4}([a-z][a-z-]*)(?: {2,}|$)", line)
        if m:
            names.append(m.group(1))
    return names


def _commands() -> dict[str, set[str]]:
    """Every runnable command, as typed after `lota`, with its long options."""
    top = _help(())
    found: dict[str, set[str]] = {"": _options(top)}
    todo = [(name,) for name in _subcommands(top)]
    while todo:
        words = todo.pop()
        text = _help(words)
        found[" ".join(words)] = _options(text)
        todo += [(*words, name) for name in _subcommands(text)]
    return found


def _sections() -> dict[str, str]:
    doc = DOC.read_text(encoding="utf-8")
    heads = list(HEADING.finditer(doc))
    ends = [h.start() for h in heads[1:]] + [len(doc)]
    return {h.group(1): doc[h.end() : end] for h, end in zip(heads, ends)}


def _documented_options(section: str) -> set[str]:
    """Options named in backticks on the first line of each item of the section's **Options**
    list (up to the blank line that ends it): the reference's way of listing them."""
    lines = section.splitlines()
    start = next((i + 1 for i, ln in enumerate(lines) if ln.strip() == "**Options**"), len(lines))
    found: set[str] = set()
    started = False
    for line in lines[start:]:
        if not line.strip():
            if started:
                break
            continue
        started = True
        if re.match(r"^\s*- ", line):
            for span in re.findall(r"`([^`]*)`", line):
                found.update(OPTION.findall(span))
    return found


def _example_lines(section: str) -> list[str]:
    """Lines of the shell code blocks (not ```python ones), continuation lines joined."""
    lines, block, shell = [], False, False
    for line in section.splitlines():
        if line.startswith("```"):
            block, shell = not block, line.strip("`").strip() in ("", "bash", "sh", "shell")
        elif block and shell:
            if lines and lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1] + line
            else:
                lines.append(line)
    return lines


@pytest.fixture(scope="module")
def commands(request):
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "200")  # one help line per option, so the columns parse alike
    request.addfinalizer(mp.undo)
    return _commands()


def test_every_command_has_a_section_in_the_command_reference(commands):
    sections = _sections()
    missing = [c for c in commands if c and c not in sections]
    assert not missing, f"docs/commands.md has no section for: {missing}"
    unknown = [s for s in sections if s not in commands]
    assert not unknown, f"docs/commands.md documents commands lota lacks: {unknown}"


def test_each_section_lists_exactly_the_options_of_its_command(commands):
    common = commands[""]  # --help, --version, --quiet, --debug: documented once, at the top
    sections = _sections()
    for name, options in commands.items():
        if not name:
            continue
        documented = _documented_options(sections.get(name, ""))
        assert options - common <= documented, (name, sorted(options - common - documented))
        assert documented <= options, (name, sorted(documented - options))


def _command_of(line: str, commands: dict[str, set[str]]) -> tuple[str, list[str]] | None:
    """The lota command a shell line runs (`lota ...`, `torchrun ... -m lota.cli ...`) and the
    words after it; None for a line that runs no lota command."""
    words = line.split("#")[0].split()
    for head in ("lota", "lota.cli"):
        if head in words:
            words = words[words.index(head) + 1 :]
            break
    else:
        return None
    for name in sorted(commands, key=len, reverse=True):  # `lab pretrain` before `lab`
        if name and words[: len(name.split())] == name.split():
            return name, words
    return "?", words


@pytest.mark.parametrize("doc", [DOC, README], ids=lambda p: p.name)
def test_examples_use_only_options_their_command_takes(commands, doc):
    for line in _example_lines(doc.read_text(encoding="utf-8")):
        found = _command_of(line, commands)
        if found is None:
            continue
        name, words = found
        assert name != "?", f"{doc.name}: an example runs no lota command: {line}"
        unknown = set(OPTION.findall(" ".join(words))) - commands[name] - commands[""]
        assert not unknown, f"{doc.name}: `lota {name}` has no {sorted(unknown)}: {line}"


def test_each_section_shows_its_command_in_use(commands):
    sections = _sections()
    for name in commands:
        if not name or any(c.startswith(name + " ") for c in commands):
            continue  # `lota lab` and `lota bench` only group their commands
        uses = [ln for ln in _example_lines(sections.get(name, "")) if f"lota {name}" in ln]
        assert uses, f"docs/commands.md: the section on `lota {name}` has no usage line"


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for a markdown file's headings (code blocks skipped; a repeated heading
    gets -1, -2, ...)."""
    found: set[str] = set()
    block = False
    for line in text.splitlines():
        if line.startswith("```"):
            block = not block
        elif not block and re.match(r"^#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n, anchor = 0, slug
            while anchor in found:
                n += 1
                anchor = f"{slug}-{n}"
            found.add(anchor)
    return found


@pytest.mark.parametrize(
    "doc",
    [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_point_to_files_and_headings_that_exist(doc):
    text = doc.read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file.read_text("utf-8")):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to nothing: {broken}"
