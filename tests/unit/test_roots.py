"""Access confined to a root folder: no link is ever followed, names always fit, and the scanner
and quarantine turn every error about one name into that name's verdict, never a crash."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from agents import slm
from coordinator.core import files, roots
from coordinator.core.errors import BatchFinishedError
from coordinator.core.roots import Dir, LinkRefused, Root, fit_name
from coordinator.daemon import scanner
from coordinator.daemon.scanner import QUARANTINE, Scanner
from tests.tables import result as table

MODELS = ["m1", "m2"]


def result(n: int) -> Any:
    """A valid result table of `n` items."""
    return table([(f"i{i}", "cat", 0.5) for i in range(n)])


def listing(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below `folder` (links as links): relative name -> (inode, size, mtime_ns)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside staging that holds what an attacker would like read, moved or written:
    a valid result for every model, and a sub-folder."""
    folder = tmp_path / "outside"
    (folder / "sub").mkdir(parents=True)
    for m in MODELS:
        pq.write_table(result(3), folder / f"{m}.parquet")
    (folder / "sub" / "secret").write_text("do not touch")
    return folder


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    folder = tmp_path / "staging"
    folder.mkdir()
    return folder


# -- Dir: links are refused, never followed -------------------------------------------------------


def test_a_link_in_place_of_a_folder_or_file_is_refused_naming_it(
    staging: Path, outside: Path
) -> None:
    (staging / "b1").symlink_to(outside)
    (staging / "f").symlink_to(outside / "m1.parquet")
    (staging / "plain").write_text("x")
    with Dir.open(staging) as d:
        with pytest.raises(LinkRefused, match=r"staging/b1 is a symbolic link"):
            d.sub("b1")
        with pytest.raises(LinkRefused, match=r"staging/f is a symbolic link"):
            d.open_file("f")
        with pytest.raises(LinkRefused):
            d.sub("f")
        with pytest.raises(NotADirectoryError, match="plain"):
            d.sub("plain")
        with pytest.raises(ValueError, match="single"):
            d.sub("../outside")


def test_a_fifo_swapped_in_does_not_block_a_reader(staging: Path) -> None:
    os.mkfifo(staging / "m1.parquet")
    with Dir.open(staging) as d:
        fd = d.open_file("m1.parquet")  # would hang forever without O_NONBLOCK
        os.close(fd)


def test_rmtree_removes_a_tree_but_never_what_a_link_in_it_points_to(
    staging: Path, outside: Path
) -> None:
    before = listing(outside)
    (staging / "b1" / "deep").mkdir(parents=True)
    (staging / "b1" / "to-outside").symlink_to(outside)
    (staging / "b1" / "deep" / "file").symlink_to(outside / "m1.parquet")
    with Dir.open(staging) as d:
        d.rmtree("b1")
        assert not (staging / "b1").exists()
        (staging / "b2").symlink_to(outside)
        with pytest.raises(LinkRefused):
            d.rmtree("b2")
        d.rmtree("absent")  # already gone is fine
    assert (staging / "b2").is_symlink()
    assert listing(outside) == before


def test_a_root_removed_and_made_again_is_opened_again(staging: Path) -> None:
    root = Root(staging)
    root.dir().sub("b1", create=True).close()
    shutil.rmtree(staging)
    staging.mkdir()
    (staging / "b2").mkdir()
    assert [e.name for e in root.dir().entries()] == ["b2"]
    root.close()


@pytest.mark.parametrize(
    "name",
    ["short", "x" * 255, "y" * 240, "é" * 127 + "z", "é" * 128, os.fsdecode(b"\xff" * 250)],
)
def test_fit_name_keeps_a_name_within_the_limit_and_its_suffix(name: str) -> None:
    suffix = ".1733100000000000000"
    fitted = fit_name(name, suffix, 255 - len(".reason"))
    raw = os.fsencode(fitted)
    assert len(raw) + len(".reason") <= 255
    assert fitted.endswith(suffix)
    if len(os.fsencode(name)) + len(suffix) + len(".reason") <= 255:
        assert fitted == name + suffix
    else:  # cut, and told apart from another long name with the same beginning
        assert fitted != fit_name(name + "!", suffix, 255 - len(".reason"))


# -- the scanner and the quarantine ---------------------------------------------------------------


def publish_all(staging: Path, batch_id: str) -> None:
    for m in MODELS:
        slm.publish(staging, batch_id, m, result(5))


def test_a_batch_folder_that_is_a_link_is_rejected_and_never_read(
    staging: Path, outside: Path
) -> None:
    before = listing(outside)
    (staging / "b1").symlink_to(outside)
    sc = Scanner(staging, settle_s=0)
    assert sc.batch_ids() == []
    scan = sc.scan("b1", MODELS)
    assert not scan.exists and scan.results == {}
    assert sc.stats.rejected == {"not a folder (symlinks are never followed)": 1}
    assert sc.quarantine_batch("b1", "finished: b1 is already done") == 0
    assert sc.quarantine("b1", "m1.parquet", "corrupt") is None
    sc.remove_batch("b1")
    assert (staging / "b1").is_symlink()
    assert listing(outside) == before
    assert not (staging / QUARANTINE / "b1").exists() or not any(
        (staging / QUARANTINE / "b1").iterdir()
    )


def test_a_file_swapped_for_a_link_between_the_look_and_the_open_is_rejected(
    staging: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_all(staging, "b1")
    real = Dir.open_file

    def swapping(self: Dir, name: str, *a: Any, **kw: Any) -> int:
        if name == "m2.parquet":
            os.unlink(staging / "b1" / name)
            os.symlink(outside / name, staging / "b1" / name)
        return real(self, name, *a, **kw)

    monkeypatch.setattr(Dir, "open_file", swapping)
    scan = Scanner(staging, settle_s=0).scan("b1", MODELS)
    assert scan.valid_models() == ["m1"]
    assert scan.results["m2"].reason == "rejected: symlink (never followed)"


def test_a_long_name_is_quarantined_under_a_name_that_fits_keeping_the_original(
    staging: Path,
) -> None:
    long = "n" * 240
    (staging / "b1").mkdir()
    (staging / "b1" / long).write_bytes(b"junk")
    sc = Scanner(staging)
    moved = sc.quarantine_batch("b1", "finished: batch b1 is already done")
    assert moved == 1
    assert not (staging / "b1").exists()
    [kept] = [p for p in (staging / QUARANTINE / "b1").iterdir() if not p.name.endswith(".reason")]
    assert len(os.fsencode(kept.name + ".reason")) <= 255
    assert kept.read_bytes() == b"junk"
    reason = (kept.parent / (kept.name + ".reason")).read_text().splitlines()
    assert reason == ["finished: batch b1 is already done", f"name: {long}"]


@pytest.mark.parametrize("where", ["quarantine", "its batch folder"])
def test_a_quarantine_folder_that_is_a_link_is_refused_loudly_and_nothing_moves(
    staging: Path, outside: Path, where: str
) -> None:
    before = listing(outside)
    publish_all(staging, "b1")
    if where == "quarantine":
        (staging / QUARANTINE).symlink_to(outside)
    else:
        (staging / QUARANTINE).mkdir()
        (staging / QUARANTINE / "b1").symlink_to(outside)
    sc = Scanner(staging)
    assert sc.quarantine("b1", "m1.parquet", "corrupt: test") is None
    assert sc.quarantine_batch("b1", "finished: b1") == 0
    assert "symbolic link" in sc.stats.quarantine_refused
    assert sorted(os.listdir(staging / "b1")) == ["m1.parquet", "m2.parquet"]
    assert listing(outside) == before
    # Once the operator removes the link, the quarantine works again and says so.
    os.unlink(staging / QUARANTINE if where == "quarantine" else staging / QUARANTINE / "b1")
    assert sc.quarantine("b1", "m1.parquet", "corrupt: test") is not None
    assert sc.stats.quarantine_refused == ""


def test_the_scanner_gives_every_entry_its_verdict_once_and_reads_a_file_once(
    staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_all(staging, "b1")
    folder = staging / "b1"
    os.link(folder / "m2.parquet", tmp_path / "second-name")  # m2: two links
    (folder / "crosscheck_m1.parquet").mkdir()  # a folder where a file belongs
    (folder / "crosscheck_m2.parquet").write_bytes(b"PAR1" + b"\0" * 40 + b"PAR1")  # corrupt
    (folder / ".m3.parquet.tmp").write_bytes(b"being written")  # a temp: silently skipped
    (folder / "notes.txt").write_text("x")
    (staging / ".hidden").mkdir()
    (staging / "bad name!").mkdir()
    (staging / "stray.parquet").write_bytes(b"x")
    sc = Scanner(staging, settle_s=0)
    reads: list[str] = []
    monkeypatch.setattr(scanner, "check_parquet", lambda p: reads.append(p) or slm.check_parquet(p))
    for _ in range(2):  # the second look reads nothing again and reports nothing again
        assert sc.batch_ids() == ["b1"]
        scan = sc.scan("b1", MODELS)
    assert scan.valid_models() == ["m1"]
    assert scan.results["m2"].reason == "rejected: hard link (more than one link)"
    assert scan.crosschecks["m1"].reason == "rejected: not a regular file"
    assert not scan.crosschecks["m2"].valid
    assert [n for n, _ in scan.settled_bad] == ["crosscheck_m2.parquet"]
    assert len(reads) == 2  # m1 and the corrupt file, once each
    assert sc.stats.rejected == {
        "bad batch folder name": 1,
        "not a folder (symlinks are never followed)": 1,
        "hard link (more than one link)": 1,
        "not a regular file": 1,
        "name does not match <model>.parquet": 1,
    }
    # A rewrite is read again; a batch forgotten is reported again.
    slm.publish(staging, "b1", "m1", result(7))
    assert sc.scan("b1", MODELS).results["m1"].size == (folder / "m1.parquet").stat().st_size
    assert len(reads) == 3
    sc.forget("b1")
    sc.scan("b1", MODELS)
    assert sc.stats.rejected["hard link (more than one link)"] == 2


def test_an_unreadable_file_counts_as_corrupt_only_once_unchanged_for_settle_s(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_all(staging, "b1")
    (staging / "b1" / "m2.parquet").write_bytes(b"PAR1 half written")
    now = [1000.0]
    monkeypatch.setattr("coordinator.daemon.scanner.time.monotonic", lambda: now[0])
    sc = Scanner(staging, settle_s=5.0)
    assert sc.scan("b1", MODELS).settled_bad == []
    now[0] += 4.9
    assert sc.scan("b1", MODELS).settled_bad == []
    now[0] += 0.1
    [(name, reason)] = sc.scan("b1", MODELS).settled_bad
    assert name == "m2.parquet" and "m2.parquet" in reason
    # Changed again: the clock starts over for the new content.
    (staging / "b1" / "m2.parquet").write_bytes(b"PAR1 still being written")
    assert sc.scan("b1", MODELS).settled_bad == []


def test_is_folder_says_no_for_a_link_a_file_a_bad_name_and_nothing(
    staging: Path, outside: Path
) -> None:
    (staging / "b1").mkdir()
    (staging / "b2").symlink_to(outside)
    (staging / "b3").write_text("x")
    sc = Scanner(staging)
    assert [sc.is_folder(b) for b in ("b1", "b2", "b3", "b4", "../b1")] == [
        True,
        False,
        False,
        False,
        False,
    ]


# Every errno the scanner and the quarantine can meet, thrown at each system call they make on
# a name under staging: each is that name's verdict, never an exception out of them.
ERRNOS = [
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.ENOTDIR,
    errno.EACCES,
    errno.EISDIR,
    errno.ENOENT,
    errno.EIO,
    errno.ENOSPC,
]
CALLS = [
    *("open", "stat", "fstat", "listdir", "scandir", "rename", "mkdir", "rmdir"),
    *("fstatvfs", "fsync", "write", "unlink"),
]


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, int], None]]:
    """failing(call, errno): make `os.<call>` raise that errno whenever roots or the scanner
    (and only they: not pytest) make it relative to a folder under staging (dir_fd= given, or
    on a descriptor)."""

    def arm(call: str, err: int) -> None:
        real = getattr(os, call)

        def fake(*a: Any, **kw: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__")
            under_root = any(k in kw for k in ("dir_fd", "src_dir_fd")) or (
                a and isinstance(a[0], int)
            )
            if under_root and caller in ("coordinator.core.roots", "coordinator.daemon.scanner"):
                raise OSError(err, os.strerror(err))
            return real(*a, **kw)

        monkeypatch.setattr(roots.os, call, fake)

    yield arm


@pytest.mark.parametrize("err", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("call", CALLS)
def test_no_errno_on_any_call_escapes_the_scanner_or_the_quarantine(
    staging: Path, failing: Callable[[str, int], None], call: str, err: int
) -> None:
    publish_all(staging, "b1")
    (staging / "b1" / ("q" * 240)).write_bytes(b"x")
    sc = Scanner(staging, settle_s=0)
    sc.root.dir()  # the root itself opens fine; what fails is below it
    failing(call, err)
    ids = sc.batch_ids()
    scan = sc.scan("b1", MODELS)
    moved = sc.quarantine("b1", "m1.parquet", "corrupt: test")
    sc.quarantine_batch("b1", "finished: b1 is already done")
    sc.remove_batch("b1")
    # What the failure allowed is reported as such, never as a false success.
    assert ids in ([], ["b1"])
    assert set(scan.valid_models()) <= set(MODELS)
    assert moved is None or moved.startswith("m1.parquet.")


# -- publishing into a batch that finishes meanwhile ----------------------------------------------


def test_a_publish_whose_folder_is_removed_meanwhile_says_the_batch_is_finished(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slm.publish(staging, "b1", "m1", result(3))
    real = files.write_table

    def cleaned_up_meanwhile(table: Any, where: Any, **kw: Any) -> None:
        real(table, where, **kw)
        shutil.rmtree(staging / "b1")  # the coordinator's clean-up of a finished batch

    monkeypatch.setattr(files, "write_table", cleaned_up_meanwhile)
    with pytest.raises(BatchFinishedError, match=r"batch b1 is finished"):
        slm.publish(staging, "b1", "m2", result(3))


def test_a_publish_whose_new_folder_is_removed_at_once_says_the_batch_is_finished(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon removes a finished batch's new, empty folder as soon as it sees it."""
    real = os.mkdir

    def made_and_removed(name: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real(name, mode, dir_fd=dir_fd)
        if name == "b1":
            os.rmdir(name, dir_fd=dir_fd)

    monkeypatch.setattr(roots.os, "mkdir", made_and_removed)
    with pytest.raises(BatchFinishedError, match=r"batch b1 is finished"):
        slm.publish(staging, "b1", "m1", result(3))


def test_a_publish_taken_into_the_quarantine_right_after_its_rename_says_so(
    staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slm.publish(staging, "b1", "m1", result(3))
    sc = Scanner(staging)
    real = Dir.rename

    def quarantined_meanwhile(self: Dir, name: str, dest: Dir, new: str) -> None:
        real(self, name, dest, new)
        if new == "m2.parquet":  # the daemon finds the finished batch published again
            sc.quarantine_batch("b1", "finished: batch b1 is already done")

    monkeypatch.setattr(Dir, "rename", quarantined_meanwhile)
    with pytest.raises(BatchFinishedError, match="publish under a new batch id"):
        slm.publish(staging, "b1", "m2", result(3))
    assert not (staging / "b1").exists()


@pytest.mark.parametrize("setgid", [False, True])
def test_a_batch_folder_the_sdk_makes_is_the_groups_whatever_the_umask(
    staging: Path, setgid: bool
) -> None:
    """The agents, in the service's group, write their cross-check files into it."""
    if setgid:
        staging.chmod(0o2770)
    old = os.umask(0o077)
    try:
        slm.publish(staging, "b1", "m1", result(3))
    finally:
        os.umask(old)
    mode = (staging / "b1").stat().st_mode
    assert mode & 0o770 == 0o770
    assert bool(mode & 0o2000) is setgid
    assert mode & 0o007 == 0  # and nobody else's


def test_a_publish_into_a_batch_folder_that_is_a_link_writes_nothing_through_it(
    staging: Path, outside: Path
) -> None:
    before = listing(outside)
    (staging / "b1").symlink_to(outside)
    with pytest.raises(LinkRefused):
        slm.publish(staging, "b1", "m1", result(3))
    with pytest.raises(LinkRefused):
        slm.publish_crosscheck(staging, "b1", "m1", result(3))
    assert listing(outside) == before
