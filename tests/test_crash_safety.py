"""Outputs, crash safety, locks and OS errors: an existing output is never replaced without
``--force`` (and a link is replaced, never written through), a folder swap killed half-way is
finished by the next command, a run killed before its first checkpoint reruns with the same
command, two runs never write one folder, and write failures get one line naming the path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lota import format as fmt
from lota.checkpoint import DIRNAME
from lota.cli import main

from .test_cli import ADAPT, assert_refused, lota
from .test_resume import ARGS, assert_same, outputs
from .test_resume import lota as lota_process

LOCK_SUFFIX = ".lota.lock"


def lock_file(folder):
    """The lock of a folder a command writes: ``PARENT/.NAME.lota.lock``, beside the folder."""
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _adapt_args(workdir, out, *extra):
    return ["adapt", workdir / "base", "--data", workdir / "a.jsonl", "--out", out, *extra]


# ---------------------------------------------------------------------------- output files
@pytest.fixture(scope="module")
def sources(workdir, trained, tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    assert main(["export-mask", str(trained / "delta.safetensors"), "--out", str(d / "m.pt")]) == 0
    return {"delta": trained / "delta.safetensors", "mask": d / "m.pt", "model": trained / "model"}


def _file_command(name, workdir, sources, out):
    base = workdir / "base"
    return {
        "mask": ["mask", base, sources["model"], "--out", out, "--quiet"],
        "delta": ["delta", base, sources["model"], "--sparsity", "0.9", "--out", out, "--quiet"],
        "merge": ["merge", sources["delta"], sources["delta"], "--out", out, "--quiet"],
        "export-mask": ["export-mask", sources["delta"], "--out", out],
        "import-mask": ["import-mask", sources["mask"], "--out", out],
    }[name]


FILE_COMMANDS = ["mask", "delta", "merge", "export-mask", "import-mask"]


@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_existing_output_file_is_kept_unless_forced(workdir, sources, capsys, tmp_path, command):
    out = tmp_path / "taken.out"
    out.write_bytes(b"precious")
    args = _file_command(command, workdir, sources, out)
    assert_refused(*lota(capsys, *args), "--force", str(out))
    assert out.read_bytes() == b"precious"
    code, _, err = lota(capsys, *args, "--force")
    assert code == 0, err
    assert out.read_bytes() != b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.out"]


@pytest.mark.parametrize("command", ["mask", "merge"])
def test_force_replaces_a_link_and_never_writes_through_it(
    workdir, sources, capsys, tmp_path, command
):
    target = tmp_path / "target.bin"
    target.write_bytes(b"the link's target")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    args = _file_command(command, workdir, sources, link)
    assert_refused(*lota(capsys, *args), "--force")
    assert link.is_symlink() and target.read_bytes() == b"the link's target"
    code, _, err = lota(capsys, *args, "--force")
    assert code == 0, err
    assert not link.is_symlink() and link.is_file()  # the link itself was replaced
    assert target.read_bytes() == b"the link's target"
    fmt.load(link)
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_refused(*lota(capsys, *_file_command(command, workdir, sources, dangling)), "--force")
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("out", [".", "..", "sub/..", "t.safetensors/"])
def test_file_outputs_that_name_folders_are_refused(
    workdir, sources, capsys, tmp_path, monkeypatch, out
):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    (here / "sub").mkdir()
    for force in ([], ["--force"]):
        assert_refused(*lota(capsys, *_file_command("mask", workdir, sources, out), *force))
    assert sorted(p.name for p in here.iterdir()) == ["sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


# ---------------------------------------------------------------------------- output folders
def test_apply_force_on_a_linked_folder_replaces_the_link(workdir, trained, capsys, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(target)
    args = ["apply", workdir / "base", trained / "delta.safetensors", "--out", link]
    assert_refused(*lota(capsys, *args), "--force")
    code, _, err = lota(capsys, *args, "--force")
    assert code == 0, err
    assert not link.is_symlink() and (link / "config.json").exists()
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


@pytest.mark.parametrize("out", [".", "..", "./", "sub/.."])
def test_folder_outputs_that_hold_the_current_folder_are_refused(
    workdir, trained, capsys, tmp_path, monkeypatch, out
):
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    delta = trained / "delta.safetensors"
    for args in (
        ["apply", workdir / "base", delta, "--out", out, "--force"],
        ["merge", delta, delta, "--base", workdir / "base", "--out-model", out, "--force"],
    ):
        assert_refused(*lota(capsys, *args), "current folder")
    assert sorted(p.name for p in here.iterdir()) == ["notes.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_folder_output_with_a_trailing_slash_works(workdir, trained, capsys, tmp_path):
    out = str(tmp_path / "m") + "/"
    code, _, err = lota(
        capsys, "apply", workdir / "base", trained / "delta.safetensors", "--out", out
    )
    assert code == 0, err
    assert (tmp_path / "m" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_adapt_into_the_current_folder_works(workdir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = lota(capsys, *_adapt_args(workdir, ".", *ADAPT))
    assert code == 0, err
    assert (tmp_path / "delta.safetensors").exists() and not (tmp_path / DIRNAME).exists()
    assert not lock_file(tmp_path).exists()


# ---------------------------------------------------------------------------- the folder swap
SWAP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lota.fileio import atomic_dir
    with atomic_dir(sys.argv[1]) as tmp:
        (Path(tmp) / "version.txt").write_text(sys.argv[2])
        (Path(tmp) / "second.txt").write_text("complete")
    """
)


def _swap(out, version, fault=None):
    env = {**os.environ, "LOTA_FAULT": fault or ""}
    return subprocess.run(
        [sys.executable, "-c", SWAP, str(out), version], env=env, capture_output=True, timeout=120
    )


@pytest.mark.parametrize("fault", ["save:run", "swap:run"])
def test_a_kill_during_the_folder_swap_is_finished_by_the_next_writer(tmp_path, fault):
    from lota.fileio import atomic_dir
    from lota.output_checks import check_new_folder

    out = tmp_path / "run"
    assert _swap(out, "old").returncode == 0
    killed = _swap(out, "new", fault=fault)
    assert killed.returncode == -signal.SIGKILL
    # The next command writing the folder finds it whole: the old output (killed before the
    # commit) or the new one (killed after it), never a mix and never nothing.
    check_new_folder(out, force=True)
    expected = "old" if fault.startswith("save:") else "new"
    assert (out / "version.txt").read_text() == expected
    assert (out / "second.txt").read_text() == "complete"
    # the killed writer's temporary and lock file stay until the next writer takes the lock
    leftovers = (".tmp", LOCK_SUFFIX)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(leftovers)] == ["run"]
    with atomic_dir(out) as tmp:
        (tmp / "version.txt").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the stale temporary went too


def test_apply_killed_between_the_renames_is_finished_by_a_rerun(workdir, trained, tmp_path):
    out = tmp_path / "m"
    args = ["apply", workdir / "base", trained / "delta.safetensors", "--out", out]
    assert lota_process(*args).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    killed = lota_process(*args, "--force", "--scales", "2", fault="swap:m")
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()  # killed with the old output moved aside and the new one beside it
    # The killed command never reported its output: the next command writing the folder finishes
    # the swap and replaces that output with its own, without --force.
    r = lota_process(*args)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # a finished output is replaced only with --force again
    r = lota_process(*args)
    assert r.returncode == 2 and "--force" in r.stderr


def _folder_command(name, workdir, trained, out, lab_base=None):
    base, delta = workdir / "base", trained / "delta.safetensors"
    return {
        "apply": ["apply", base, delta, "--out", out],
        "merge": ["merge", delta, delta, "--base", base, "--out-model", out, "--quiet"],
        "export-peft": ["export-peft", delta, "--base", base, "--out", out],
        "ks": ["ks", base, trained / "model", "--top", "3", "--out", out],
        "lab pretrain": ["lab", "pretrain", "--out", out, "--size", "tiny", "--steps", "1"],
        "demo": ["demo", "--base", lab_base, "--out", out, "--scale", "smoke", "--jobs", "1"],
        "bench quality": ["bench", "quality", "--base", lab_base, "--out", out, "--scale", "smoke"],
    }[name]


SWAPPED = ["apply", "merge", "export-peft", "ks"]  # the commands that swap in a whole folder

HOLD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from lota.fileio import FolderLock
    out = Path(sys.argv[1])
    lock = FolderLock(out).acquire()
    # what a writer leaves beside its output while it works: its temporary, then its new folder
    (out.parent / f".{out.name}.{os.getpid()}.abcd1234.tmp").mkdir()
    (out.parent / f".{out.name}.new").mkdir()
    (out.parent / f".{out.name}.new" / "config.json").write_text("{}")
    print("held", flush=True)
    time.sleep(600)
    """
)


def test_a_second_writer_of_an_output_folder_is_refused_while_the_first_holds_it(
    workdir, trained, capsys, tmp_path
):
    lab_base = tmp_path / "lab_base"  # what the lab needs of a base: a model and its recipe
    shutil.copytree(workdir / "base", lab_base)
    recipe = {"recipe": {"docs": 40, "seed": 0, "seq": 64}}
    (lab_base / "lab_recipe.json").write_text(json.dumps(recipe))
    here = tmp_path / "here"
    here.mkdir()
    out = here / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        theirs = sorted(p.name for p in here.iterdir())
        for name in [*SWAPPED, "lab pretrain", "demo", "bench quality"]:
            for force in ([], ["--force"]) if name not in ("demo", "bench quality") else ([],):
                args = _folder_command(name, workdir, trained, out, lab_base)
                assert_refused(*lota(capsys, *args, *force), f"pid {holder.pid}", str(out))
                # the holder's temporary and new folder are untouched, and nothing was written
                assert sorted(p.name for p in here.iterdir()) == theirs, name
        code, _, err = lota(capsys, *_adapt_args(workdir, out, *ADAPT))
        assert_refused(code, _, err, f"pid {holder.pid}")  # adapt takes the same lock
    finally:
        holder.kill()
        holder.wait()
    # a killed holder's lock does not stick, and what it left is cleaned up by the next writer
    code, _, err = lota(capsys, *_folder_command("apply", workdir, trained, out))
    assert code == 0, err
    assert sorted(p.name for p in here.iterdir()) == ["out"]
    assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("command", SWAPPED)
def test_a_command_killed_at_its_folder_swap_finishes_when_run_again(
    workdir, trained, capsys, tmp_path, command
):
    def files(folder):  # safetensors as tensors and metadata: its header's order may vary
        return {p.name: _content(p) for p in sorted(folder.iterdir())}

    reference = tmp_path / "reference"
    code, _, err = lota(capsys, *_folder_command(command, workdir, trained, reference))
    assert code == 0, err
    out = tmp_path / "out"
    args = _folder_command(command, workdir, trained, out)
    killed = lota_process(*args, fault="swap:out")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / ".out.new").is_dir()  # the output complete, not yet in place
    code, _, err = lota(capsys, *args)  # the same command again: it finishes and succeeds
    assert code == 0, err
    assert files(out) == files(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]


def _content(path):
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: _bytes(f.get_tensor(k)) for k in f.keys()}


def _bytes(t):
    return (
        str(t.dtype),
        tuple(t.shape),
        t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
    )


def test_an_output_that_would_replace_an_input_is_refused_even_with_force(
    workdir, trained, capsys, tmp_path
):
    base = tmp_path / "base"
    shutil.copytree(workdir / "base", base)
    tuned = tmp_path / "tuned"
    shutil.copytree(trained / "model", tuned)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    delta = inputs / "d.safetensors"
    shutil.copy(trained / "delta.safetensors", delta)
    alias = tmp_path / "alias"  # another spelling of tmp_path: strings differ, files do not
    alias.symlink_to(tmp_path)

    def state():
        return {
            str(p.relative_to(tmp_path)): p.read_bytes()
            for p in sorted(tmp_path.rglob("*"))
            if p.is_file() and "alias" not in p.parts
        }

    before = state()
    cases = [
        (["apply", base, delta, "--out", alias / "base"], "is the input"),
        (["apply", alias / "base", delta, "--out", base], "is the input"),
        (["merge", delta, delta, "--base", base, "--out-model", alias / "inputs"], "holds"),
        (["export-peft", delta, "--base", base, "--out", alias / "base"], "is the input"),
        (["ks", base, tuned, "--top", "3", "--out", alias / "tuned"], "is the input"),
        (["ks", base, tuned, "--top", "3", "--out", tmp_path], "holds the input"),
        (["merge", delta, delta, "--out", alias / "inputs" / "d.safetensors"], "is the input"),
        (["delta", base, tuned, "--sparsity", "0.9", "--out", tuned / "config.json"], "inside"),
        (["mask", base, tuned, "--out", alias / "tuned" / "model.safetensors"], "inside"),
    ]
    for args, words in cases:
        assert_refused(*lota(capsys, *args, "--force"), words)
        assert state() == before, args
    # a new output inside an input folder replaces nothing, and a link to an input is replaced
    # itself, never what it points to
    code, _, err = lota(capsys, "apply", base, delta, "--out", base / "applied")
    assert code == 0, err
    link = tmp_path / "link"
    link.symlink_to(base)
    code, _, err = lota(capsys, "apply", base, delta, "--out", link, "--force")
    assert code == 0, err
    assert not link.is_symlink()
    written = ("base/applied/", "link/")
    assert {k: v for k, v in state().items() if not k.startswith(written)} == before


# ---------------------------------------------------------------------------- killed runs
@pytest.fixture(scope="module")
def reference(workdir):
    out = workdir / "crash_ref"
    r = lota_process(*_adapt_args(workdir, out, *ARGS))
    assert r.returncode == 0, r.stderr
    return outputs(out)


@pytest.mark.parametrize(
    "point,again", [("locked", []), ("started", []), ("started", ["--resume"])]
)
def test_run_killed_before_its_first_checkpoint_reruns_to_identical_outputs(
    workdir, reference, tmp_path, point, again
):
    out = tmp_path / "run"
    killed = lota_process(*_adapt_args(workdir, out, *ARGS), fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / DIRNAME / "state.safetensors").exists()
    if point == "started":
        assert (out / "metrics.jsonl").exists()
    r = lota_process(*_adapt_args(workdir, out, *ARGS, *again))
    assert r.returncode == 0, r.stderr
    assert_same(outputs(out), reference)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 + 4  # each step once
    assert not (out / DIRNAME).exists() and not lock_file(out).exists()


def test_unstarted_run_folder_with_foreign_files_still_needs_force(workdir, reference, tmp_path):
    out = tmp_path / "run"
    assert lota_process(*_adapt_args(workdir, out, *ARGS), fault="started").returncode < 0
    (out / "notes.txt").write_text("mine")
    r = lota_process(*_adapt_args(workdir, out, *ARGS))
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "notes.txt").read_text() == "mine"
    r = lota_process(*_adapt_args(workdir, out, *ARGS, "--lr", "0.5"))
    assert r.returncode == 2 and "--restart" in r.stderr  # a start of other settings is not ours
    r = lota_process(*_adapt_args(workdir, out, *ARGS, "--force"))
    assert r.returncode == 0, r.stderr
    assert_same(outputs(out), reference)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(
    workdir, reference, capsys, tmp_path
):
    out = tmp_path / "run"
    slow = list(ARGS)
    slow[slow.index("--steps") + 1] = "100000"  # runs until it is killed
    first = subprocess.Popen(
        [sys.executable, "-m", "lota.cli", *map(str, _adapt_args(workdir, out, *slow))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while (
            not (out / "metrics.jsonl").exists()
            or len((out / "metrics.jsonl").read_text().splitlines()) < 4
        ):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        code, _, err = lota(capsys, *_adapt_args(workdir, out, *slow))
        assert_refused(code, _, err, f"pid {first.pid}", str(out))
        # with --force or --restart too: the lock is not a setting to override
        code, _, err = lota(capsys, *_adapt_args(workdir, out, *slow, "--restart", "--force"))
        assert_refused(code, _, err, f"pid {first.pid}")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_file(out).exists()  # the killed process's lock file stays, its lock does not
    code, _, err = lota(capsys, *_adapt_args(workdir, out, *ARGS, "--restart"))
    assert code == 0, err
    assert_same(outputs(out), reference)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 + 4
    assert not lock_file(out).exists()


def test_bad_input_found_after_the_run_started_leaves_nothing(
    workdir, capsys, tmp_path, monkeypatch
):
    from lota.delta import SparseDelta
    from lota.errors import InputError

    real = SparseDelta.check_finite

    def nan(self, where="delta"):
        if where == "trained delta":
            raise InputError("tensor 'x' holds non-finite values (NaN or inf)", where, "fix it")
        return real(self, where)

    monkeypatch.setattr(SparseDelta, "check_finite", nan)
    out = tmp_path / "new" / "run"
    assert_refused(*lota(capsys, *_adapt_args(workdir, out, *ADAPT)), "non-finite")
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(*lota(capsys, *_adapt_args(workdir, empty, *ADAPT)), "non-finite")
    assert list(empty.iterdir()) == []


# ---------------------------------------------------------------------------- OS errors
def _safetensors_error(code: int, text: str):
    from safetensors import SafetensorError

    return SafetensorError(f"Error while serializing: I/O error: {text} (os error {code})")


WRITE_ERRORS = {
    "ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), 1, ["No space left", "free"]),
    "EDQUOT": (OSError(errno.EDQUOT, "Disk quota exceeded"), 1, ["quota", "free"]),
    "EROFS": (OSError(errno.EROFS, "Read-only file system"), 2, ["read-only", "writable"]),
    "EACCES": (PermissionError(errno.EACCES, "Permission denied"), 2, ["ermission", "writable"]),
    "EPERM": (PermissionError(errno.EPERM, "Operation not permitted"), 2, ["not permitted"]),
    "safetensors-ENOSPC": (
        _safetensors_error(28, "No space left on device"),
        1,
        ["No space left", "free"],
    ),
    "safetensors-EROFS": (_safetensors_error(30, "Read-only file system"), 2, ["read-only"]),
}


@pytest.mark.parametrize("case", sorted(WRITE_ERRORS))
def test_write_errors_are_one_line_naming_the_path(
    workdir, trained, capsys, tmp_path, monkeypatch, case
):
    from transformers import PreTrainedModel

    error, code, words = WRITE_ERRORS[case]

    def fail(*a, **k):
        raise error

    monkeypatch.setattr(fmt, "save_safetensors", fail)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fail)
    target = tmp_path / "t.safetensors"
    got = lota(capsys, "mask", workdir / "base", trained / "model", "--out", target, "--quiet")
    assert_refused(*got, str(target), *words, exit_code=code)
    assert "internal error" not in got[2]
    got = lota(
        capsys, "apply", workdir / "base", trained / "delta.safetensors", "--out", tmp_path / "m"
    )
    assert_refused(*got, str(tmp_path / "m"), *words, exit_code=code)
    got = lota(capsys, *_adapt_args(workdir, tmp_path / "run", *ADAPT))
    assert_refused(*got, *words, exit_code=code)
    assert not (tmp_path / "t.safetensors").exists() and not (tmp_path / "m").exists()
    assert not (tmp_path / "run" / "delta.safetensors").exists()
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system at ``tmp_path/disk`` (needs the right to mount; else skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    )
    if r.returncode:
        pytest.skip("cannot mount a small file system here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_really_full_or_read_only_disk_is_one_line(workdir, trained, capsys, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (256 * 1024 - 8192))
    got = lota(
        capsys, "apply", workdir / "base", trained / "delta.safetensors", "--out", small_disk / "m"
    )
    assert_refused(*got, "No space left", str(small_disk / "m"), exit_code=1)
    filler.unlink()
    (small_disk / "old.txt").write_text("old")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    target = small_disk / "t.safetensors"
    got = lota(capsys, "mask", workdir / "base", trained / "model", "--out", target, "--quiet")
    assert_refused(*got, "read-only", exit_code=2)
    assert sorted(p.name for p in small_disk.iterdir()) == ["old.txt"]


def test_export_mask_on_a_really_full_disk_is_one_line(trained, capsys, small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (256 * 1024 - 8192))
    target = small_disk / "m.pt"  # a 20,480-entry mask does not fit in the 8 KiB left
    got = lota(capsys, "export-mask", trained / "delta.safetensors", "--out", target)
    assert_refused(*got, "No space left", str(target), exit_code=1)
    assert "internal error" not in got[2]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_finished_run_rerun_with_the_same_command_changes_nothing(workdir, capsys, tmp_path):
    out = tmp_path / "done"
    args = _adapt_args(workdir, out, *ADAPT)
    code, _, err = lota(capsys, *args)
    assert code == 0, err

    def state():
        return {
            str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }

    before = state()
    # the same command again (as after a kill past the last write): reported, nothing rewritten
    code, out_text, err = lota(capsys, *args)
    assert code == 0, err
    assert "already finished" in out_text and state() == before
    # other settings are still refused: the folder holds another run's outputs
    other = _adapt_args(workdir, out, *ADAPT[:-1], "--seed", "7", "--quiet")
    assert_refused(*lota(capsys, *other), "--force")
    assert state() == before
