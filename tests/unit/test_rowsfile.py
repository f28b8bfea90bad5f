"""The rows CSV as the coordinator reads it for its COPY: opened by descriptor from the root,
never through a link, and only the very bytes the agent reported (coordinator.core.rowsfile);
and the pipeline's look at a node's tmpfs before the archive, by descriptor too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coordinator.core.errors import RowsRefused
from coordinator.core.rowsfile import RowsFile, RowsIdent, ident_of
from coordinator.core.summary import AggregateFiles, AggregateSummary
from coordinator.daemon.pipeline import _archivable

DATA = b"batch_id,item_id,consensus,votes,n_models,confidence\nb1,i1,cat,2,3,0.66\n" * 50


def written(root: Path, data: bytes = DATA, batch: str = "b1") -> RowsFile:
    """`data` as an agent writes its rows file, and what it reports of it."""
    (root / batch).mkdir(parents=True, exist_ok=True)
    path = root / batch / ".aggregates.csv"
    path.write_bytes(data)
    return RowsFile(root, batch, path.name, ident_of(path.stat(), data))


def read_all(rows: RowsFile, chunk: int = 64) -> bytes:
    """Read as asyncpg does: read(n) until b""."""
    reader = rows.open()
    try:
        out = b""
        while data := reader.read(chunk):
            out += data
        return out
    finally:
        reader.close()


def test_the_reported_file_reads_back_whole(tmp_path: Path) -> None:
    rows = written(tmp_path)
    assert read_all(rows) == DATA
    assert read_all(rows, chunk=1 << 20) == DATA
    reader = rows.open()
    assert reader.read() == DATA and reader.read() == b""  # read() with no size: the rest
    reader.close()


def test_a_same_size_rewrite_with_the_mtime_put_back_is_refused_at_the_end(
    tmp_path: Path,
) -> None:
    rows = written(tmp_path)
    path = tmp_path / "b1" / ".aggregates.csv"
    st = path.stat()
    with path.open("r+b") as f:
        f.write(DATA.replace(b"cat", b"dog"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    reader = rows.open()  # what fstat can tell is unchanged
    try:
        with pytest.raises(RowsRefused, match=r"batch b1: rows file .*/b1/\.aggregates\.csv: "):
            while reader.read(64):
                pass
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda p: p.write_bytes(DATA + b"b1,i2,dog,1,3,0.3\n"), "not the file the agent wrote"),
        (lambda p: os.utime(p, ns=(0, 1)), "not the file the agent wrote"),
        (lambda p: os.link(p, p.with_name("extra")), "has 2 hard links"),
    ],
    ids=["longer", "mtime", "hard-link"],
)
def test_a_file_that_is_not_the_reported_one_is_refused_on_opening(
    tmp_path: Path, change, why: str
) -> None:
    rows = written(tmp_path)
    change(tmp_path / "b1" / ".aggregates.csv")
    with pytest.raises(RowsRefused, match=why):
        rows.open()


def test_another_file_under_the_name_is_refused_by_inode_unless_the_agent_is_remote(
    tmp_path: Path,
) -> None:
    rows = written(tmp_path)
    path = tmp_path / "b1" / ".aggregates.csv"
    st = path.stat()
    tmp = path.with_name("new")
    tmp.write_bytes(DATA)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, path)
    with pytest.raises(RowsRefused, match="inode"):
        rows.open()
    # An agent in another kernel numbers inodes its own way: the content decides.
    remote = RowsFile(
        rows.root,
        rows.batch_id,
        rows.name,
        RowsIdent(7, rows.expect.size, rows.expect.mtime_ns, rows.expect.sha256),
        check_inode=False,
    )
    assert read_all(remote) == DATA


def test_a_link_in_place_of_the_file_or_its_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    rows = written(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".aggregates.csv").write_bytes(DATA)
    path = root / "b1" / ".aggregates.csv"
    path.unlink()
    os.symlink(outside / ".aggregates.csv", path)
    with pytest.raises(RowsRefused, match="symbolic link"):
        rows.open()
    os.rename(root / "b1", root / ".aside")
    os.symlink(outside, root / "b1")
    with pytest.raises(RowsRefused, match="symbolic link"):
        rows.open()


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    rows = written(tmp_path)
    (tmp_path / "b1" / ".aggregates.csv").unlink()
    with pytest.raises(FileNotFoundError):
        rows.open()


# -- the archive's look at node memory ----------------------------------------------------------


def node_copies(tmpfs: Path, models: tuple[str, ...]) -> AggregateFiles:
    folder = tmpfs / "b1"
    folder.mkdir(parents=True)
    for name in ["aggregates.parquet", *(f"crosscheck_{m}.parquet" for m in models)]:
        (folder / name).write_bytes(b"x")
    summary = AggregateSummary(0, (), None, {}, models)
    return AggregateFiles(summary, 0, folder / "aggregates.csv", folder / "aggregates.parquet", 0)


def test_the_archive_goes_on_while_node_memory_holds_every_copy(tmp_path: Path) -> None:
    agg = node_copies(tmp_path / "node0", ("slm-1", "slm-2"))
    assert _archivable(agg, ("slm-1", "slm-2"))
    (tmp_path / "node0" / "b1" / "crosscheck_slm-2.parquet").unlink()
    assert not _archivable(agg, ("slm-1", "slm-2"))


def test_a_link_in_node_memory_is_no_copy(tmp_path: Path) -> None:
    """A link where a copy was (even to a file that exists) is not what the vote read: the
    batch is aggregated again, whose copies replace the link."""
    tmpfs = tmp_path / "node0"
    agg = node_copies(tmpfs, ("slm-1",))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "crosscheck_slm-1.parquet").write_bytes(b"x")
    copy = tmpfs / "b1" / "crosscheck_slm-1.parquet"
    copy.unlink()
    os.symlink(outside / "crosscheck_slm-1.parquet", copy)
    assert not _archivable(agg, ("slm-1",))
    # The batch folder itself a link to a folder holding every name: no copies either.
    for name in ("aggregates.parquet",):
        (outside / name).write_bytes(b"x")
    os.rename(tmpfs / "b1", tmpfs / ".aside")
    os.symlink(outside, tmpfs / "b1")
    assert not _archivable(agg, ("slm-1",))
