"""Outputs, crash safety, locks and OS errors: an existing output is never replaced without
``--force`` (and a link is replaced, never written through), a folder swap killed half-way is
finished by the next command, a run killed before its first checkpoint reruns with the same
command, two runs never write one folder, and write failures get one line naming the path."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lota import format as fmt
from lota.checkpoint import DIRNAME
from lota.cli import main

from .test_cli import ADAPT, assert_refused, lota
from .test_resume import ARGS, assert_same, outputs
from .test_resume import lota as lota_process

LOCKNAME = ".lota.lock"  # the lock file of a folder a run is writing


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
    assert not (tmp_path / LOCKNAME).exists()


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
    from lota.fileio import atomic_dir, check_new_folder

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
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == ["run"]
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
    # Even a command that refuses to replace the folder first finishes the swap it finds.
    r = lota_process(*args)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    r = lota_process(*args, "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


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
    assert not (out / DIRNAME).exists() and not (out / LOCKNAME).exists()


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
    assert (out / LOCKNAME).exists()  # the killed process's lock file stays, its lock does not
    code, _, err = lota(capsys, *_adapt_args(workdir, out, *ARGS, "--restart"))
    assert code == 0, err
    assert_same(outputs(out), reference)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2 + 4
    assert not (out / LOCKNAME).exists()


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
