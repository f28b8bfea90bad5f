"""Staging a batch into node-local tmpfs: exact copies, refusals, space checks, clean-up."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agents import staging
from coordinator.core.errors import NoSpaceError, StagingError
from coordinator.core.roots import Dir, LinkRefused
from tests.conftest import mounted_tmpfs


def make_batch(folder: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    """Write files of the given sizes with distinct content; return name -> content."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, size) in enumerate(sizes.items()):
        data = (bytes([i + 1]) + os.urandom(997)) * (size // 998) + os.urandom(size % 998)
        (folder / name).write_bytes(data)
        out[name] = data
    return out


def stage(
    src: Path,
    dest: Path,
    names: list[str],
    on_staged: Callable[[str, Path], None] | None = None,
) -> list[staging.StagedFile]:
    """staging.stage from the folder `src` into `dest` (a batch folder in its tmpfs root)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Dir.open(src) as s, Dir.open(dest.parent) as t:
        return staging.stage(s, t, dest.name, names, on_staged)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """A real 2 MiB tmpfs, unmounted afterwards."""
    with mounted_tmpfs(2048) as mnt:
        yield mnt


# --- copying -------------------------------------------------------------------------------


def test_stage_copies_byte_identical_files_and_leaves_no_temp(tmp_path: Path) -> None:
    src = tmp_path / "staging" / "b1"
    want = make_batch(src, {"slm-1.parquet": 300_001, "slm-2.parquet": 0, "x.parquet": 5})
    dest = tmp_path / "node0" / "b1"
    staged = stage(src, dest, list(want))
    assert [(s.name, s.bytes) for s in staged] == [(n, len(d)) for n, d in want.items()]
    assert files_in(dest) == sorted(want)
    for name, data in want.items():
        assert (dest / name).read_bytes() == data
    assert files_in(src) == sorted(want)  # the staging copy is left alone


def test_stage_copies_only_the_names_asked_for(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 10, "b.parquet": 10})
    dest = tmp_path / "node0" / "b1"
    stage(src, dest, ["b.parquet"])
    assert files_in(dest) == ["b.parquet"]


def test_restaging_skips_files_already_complete(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    want = make_batch(src, {"a.parquet": 5000, "b.parquet": 7000})
    dest = tmp_path / "node0" / "b1"
    stage(src, dest, ["a.parquet"])
    again = stage(src, dest, ["a.parquet", "b.parquet"])
    assert [(s.name, s.bytes) for s in again] == [("a.parquet", 0), ("b.parquet", 7000)]
    assert (dest / "b.parquet").read_bytes() == want["b.parquet"]


def test_a_copy_of_another_counted_file_of_the_same_size_is_made_again(tmp_path: Path) -> None:
    """A count lost to a crash and taken again after a rewrite of the same size: the old copy
    is not the counted file (its mtime, which copies carry, says so) and is replaced."""
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 5000})
    dest = tmp_path / "node0" / "b1"
    assert stage(src, dest, ["a.parquet"])[0].bytes == 5000
    assert (dest / "a.parquet").stat().st_mtime_ns == (src / "a.parquet").stat().st_mtime_ns
    rewritten = os.urandom(5000)
    (src / "a.parquet").write_bytes(rewritten)
    os.utime(src / "a.parquet", ns=(1, 2_000_000_000))
    st = (src / "a.parquet").stat()
    counted = {"a.parquet": [st.st_ino, st.st_size, st.st_mtime_ns]}
    with Dir.open(src) as s, Dir.open(dest.parent) as t:
        again = staging.stage(s, t, "b1", ["a.parquet"], expected=counted)
        assert again[0].bytes == 5000  # copied again, not reused
        assert (dest / "a.parquet").read_bytes() == rewritten
        # The copy of the counted file now is reused as it is.
        assert staging.stage(s, t, "b1", ["a.parquet"], expected=counted)[0].bytes == 0


def test_an_identity_without_inode_is_checked_by_size_and_mtime(tmp_path: Path) -> None:
    """What a remote agent is sent (its share numbers inodes its own way): inode 0, size and
    mtime_ns. The counted file is copied; a rewrite with another mtime, or another size, is
    refused as it is with the inode."""
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 5000})
    st = (src / "a.parquet").stat()
    dest = tmp_path / "node0"
    dest.mkdir()
    portable = {"a.parquet": [0, st.st_size, st.st_mtime_ns]}
    with Dir.open(src) as s, Dir.open(dest) as t:
        assert staging.stage(s, t, "b1", ["a.parquet"], expected=portable)[0].bytes == 5000
        staging.purge(t, "b1")
        for other in ([0, st.st_size, st.st_mtime_ns + 1], [0, st.st_size + 1, st.st_mtime_ns]):
            with pytest.raises(StagingError, match="rewritten after the batch counted it"):
                staging.stage(s, t, "b1", ["a.parquet"], expected={"a.parquet": other})
        # With an inode, it must be this file's.
        wrong_inode = {"a.parquet": [st.st_ino + 2, st.st_size, st.st_mtime_ns]}
        with pytest.raises(StagingError, match="rewritten after the batch counted it"):
            staging.stage(s, t, "b1", ["a.parquet"], expected=wrong_inode)
    assert staging.is_counted(st, (st.st_ino, st.st_size, st.st_mtime_ns))
    assert staging.is_counted(st, (0, st.st_size, st.st_mtime_ns))
    assert not staging.is_counted(st, (st.st_ino + 2, st.st_size, st.st_mtime_ns))


def test_restaging_replaces_a_copy_of_the_wrong_size(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    want = make_batch(src, {"a.parquet": 5000})
    dest = tmp_path / "node0" / "b1"
    dest.mkdir(parents=True)
    (dest / "a.parquet").write_bytes(b"stale")
    staged = stage(src, dest, ["a.parquet"])
    assert staged[0].bytes == 5000
    assert (dest / "a.parquet").read_bytes() == want["a.parquet"]


# --- refusals ------------------------------------------------------------------------------


def test_stage_refuses_a_symlink_and_leaves_no_partial_dest(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 4000})
    target = tmp_path / "elsewhere.parquet"
    target.write_bytes(b"PAR1 secret PAR1")
    (src / "b.parquet").symlink_to(target)
    dest = tmp_path / "node0" / "b1"
    with pytest.raises(LinkRefused, match=r"b\.parquet is a symbolic link"):
        stage(src, dest, ["a.parquet", "b.parquet"])
    assert files_in(dest) == []  # a.parquet, copied first, was removed again


def test_stage_refuses_a_hard_linked_source_and_leaves_no_partial_dest(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 4000, "b.parquet": 4000})
    os.link(src / "b.parquet", tmp_path / "second-name")
    dest = tmp_path / "node0" / "b1"
    with pytest.raises(StagingError, match="hard links"):
        stage(src, dest, ["a.parquet", "b.parquet"])
    assert files_in(dest) == []


def test_stage_refuses_a_folder_in_place_of_a_file(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 10})
    (src / "b.parquet").mkdir()
    dest = tmp_path / "node0" / "b1"
    with pytest.raises(StagingError):
        stage(src, dest, ["a.parquet", "b.parquet"])
    assert files_in(dest) == []


def test_stage_of_a_vanished_file_is_a_staging_error(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 10})
    dest = tmp_path / "node0" / "b1"
    with pytest.raises(StagingError, match="vanished"):
        stage(src, dest, ["a.parquet", "gone.parquet"])
    assert files_in(dest) == []


# --- free space ----------------------------------------------------------------------------


def test_no_space_error_when_free_space_is_below_need_plus_headroom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 1000, "b.parquet": 2000})
    dest = tmp_path / "node0" / "b1"
    monkeypatch.setattr(staging, "free_bytes", lambda _p: 3000 + staging.HEADROOM - 1)
    with pytest.raises(NoSpaceError):
        stage(src, dest, ["a.parquet", "b.parquet"])
    assert files_in(dest) == []
    monkeypatch.setattr(staging, "free_bytes", lambda _p: 3000 + staging.HEADROOM)
    assert len(stage(src, dest, ["a.parquet", "b.parquet"])) == 2


def test_a_no_space_error_is_a_staging_error() -> None:
    assert issubclass(NoSpaceError, StagingError)


def test_free_bytes_reports_a_real_small_tmpfs(small_tmpfs: Path) -> None:
    assert 0 < staging.free_bytes(small_tmpfs) <= 2 << 20


def test_a_real_small_tmpfs_refuses_a_batch_larger_than_its_free_space(
    tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "HEADROOM", 0)
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 1 << 20, "b.parquet": 1_500_000})
    dest = small_tmpfs / "b1"
    with pytest.raises(NoSpaceError):
        stage(src, dest, ["a.parquet", "b.parquet"])
    assert files_in(dest) == []


def test_running_out_of_space_mid_copy_is_a_no_space_error_with_nothing_left(
    tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even when the up-front check is fooled, ENOSPC while copying cleans up the dest."""
    monkeypatch.setattr(staging, "free_bytes", lambda _p: 1 << 40)
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 1 << 20, "b.parquet": 1_500_000})
    dest = small_tmpfs / "b1"
    with pytest.raises(NoSpaceError, match="no space"):
        stage(src, dest, ["a.parquet", "b.parquet"])
    assert files_in(dest) == []
    assert staging.free_bytes(small_tmpfs) > 1_900_000  # every partial page was given back


# --- clean-up ------------------------------------------------------------------------------


def test_remove_partials_removes_dot_files_in_batch_folders_only(tmp_path: Path) -> None:
    root = tmp_path / "node0"
    (root / "b1").mkdir(parents=True)
    (root / "b2").mkdir()
    for p in ("b1/.a.parquet.tmp", "b1/a.parquet", "b2/.b.parquet.tmp", "b2/b.parquet"):
        (root / p).write_bytes(b"x")
    (root / ".top-level").write_bytes(b"x")  # not inside a batch folder
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".keep.tmp").write_bytes(b"x")
    (root / "linked").symlink_to(outside)  # never followed
    with Dir.open(root) as d:
        removed = staging.remove_partials(d)
    assert sorted(removed) == ["b1/.a.parquet.tmp", "b2/.b.parquet.tmp"]
    assert files_in(root / "b1") == ["a.parquet"]
    assert files_in(root / "b2") == ["b.parquet"]
    assert (root / ".top-level").exists()
    assert (outside / ".keep.tmp").exists()


def test_purge_removes_the_batch_and_returns_the_bytes_freed(tmp_path: Path) -> None:
    src = tmp_path / "b1"
    make_batch(src, {"a.parquet": 1234, "b.parquet": 4321})
    dest = tmp_path / "node0" / "b1"
    stage(src, dest, ["a.parquet", "b.parquet"])
    with Dir.open(dest.parent) as tmpfs:
        assert staging.purge(tmpfs, "b1") == 1234 + 4321
        assert not dest.exists()
        assert staging.purge(tmpfs, "b1") == 0


def test_on_staged_sees_each_copy_complete_in_order_also_one_staged_before(
    tmp_path: Path,
) -> None:
    src = tmp_path / "staging" / "b1"
    want = make_batch(src, {"slm-1.parquet": 10_000, "slm-2.parquet": 20_000})
    dest = tmp_path / "node0" / "b1"
    stage(src, dest, ["slm-1.parquet"])
    seen: list[tuple[str, bytes]] = []
    stage(src, dest, list(want), lambda name, path: seen.append((name, path.read_bytes())))
    assert seen == list(want.items())
