"""Every command's options come from its settings dataclass in ``lota.commands``, declared once:
its ``--help`` lists exactly what the dataclass declares, and no option is declared twice."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from lota import commands, options
from lota.cli import RUNS, build_parser, main
from lota.settings import flags

COMMON = ["-h", "--help", *flags(commands.CommonOptions)]


def _parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for word in name.split():
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def _fields(cls) -> list[str]:
    """Field names of ``cls``, those of included settings classes in place."""
    out = []
    for f in dataclasses.fields(cls):
        out += _fields(f.default_factory) if "lota.included" in f.metadata else [f.name]
    return out


@pytest.mark.parametrize("name", list(commands.COMMANDS))
def test_help_lists_the_options_the_settings_declare(name, capsys):
    cls = commands.COMMANDS[name].settings
    assert main([*name.split(), "--help"]) == 0
    shown = capsys.readouterr().out
    declared = flags(cls)
    for flag in declared:
        assert flag in shown, f"lota {name} --help does not list {flag}"
    parser = _parser(name)
    given = [s for a in parser._actions for s in a.option_strings]
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    common = COMMON if " " not in name else ["-h", "--help"]  # a group's commands: no --debug
    assert [*given, *positionals] == [
        *common,
        *[f for f in declared if f.startswith("--") and f not in common],
        *[f for f in declared if not f.startswith("--")],
    ]


@pytest.mark.parametrize("name", list(commands.COMMANDS))
def test_no_option_is_declared_twice(name):
    cls = commands.COMMANDS[name].settings
    assert len(set(flags(cls))) == len(flags(cls))
    assert len(set(_fields(cls))) == len(_fields(cls))


def test_every_command_has_its_run_and_nothing_else_runs():
    assert list(RUNS) == list(commands.COMMANDS)
    groups = {name.split()[0] for name in commands.COMMANDS if " " in name}
    assert groups == set(commands.GROUPS)


def test_shared_options_read_alike_in_every_command():
    # --force, --device and --values-dtype take their kind and help shape from lota.options
    for name in commands.COMMANDS:
        parser = _parser(name)
        for action in parser._actions:
            if "--force" in action.option_strings and name != "adapt":
                assert action.help.startswith("replace an existing --out")
            if "--device" in action.option_strings:
                assert "auto (cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:N" in (
                    action.help
                )
            if "--values-dtype" in action.option_strings:
                assert list(action.choices) == ["auto", "float32", "bfloat16", "float16"]


def test_a_shared_check_runs_before_anything_is_read(tmp_path, capsys):
    # the inputs do not exist: the option's own check speaks first
    for flag, argv in (
        ("--sparsity", ["mask", "b", "t", "--out", str(tmp_path / "m"), "--sparsity", "1.5"]),
        (
            "--sparsity",
            ["import-lora", "a", "--base", "b", "--out", str(tmp_path / "l"), "--sparsity", "x"],
        ),
        ("--jobs", ["demo", "--out", str(tmp_path / "d"), "--jobs", "0"]),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("lota: error: ") and err.count("\n") == 1 and flag in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Exception, match="must be at least 1"):
        options.at_least_one(0, "--jobs")
