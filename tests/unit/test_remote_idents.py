"""File identities across kernels: what the coordinator sends a `[[node]] remote` agent, and
how it reads the identities such an agent reports (its share numbers inodes its own way; the
two-node guest of tests/numa_vm/test_remote_agents.py runs the whole path over 9p)."""

from __future__ import annotations

import os
from pathlib import Path

from coordinator.core.messages import Ident
from coordinator.core.roots import Root
from coordinator.daemon.pipeline import idents_for_agent, idents_seen_here


def test_a_local_agent_gets_the_identities_as_counted() -> None:
    idents = {"slm-1.parquet": (1234, 10, 99)}
    assert idents_for_agent(idents, remote=False) == idents


def test_a_remote_agent_gets_them_without_the_inode() -> None:
    idents = {"slm-1.parquet": (1234, 10, 99), "slm-2.parquet": (77, 0, 5)}
    assert idents_for_agent(idents, remote=True) == {
        "slm-1.parquet": (0, 10, 99),
        "slm-2.parquet": (0, 0, 5),
    }


def seen(staging: Path, batch_id: str, reported: dict[str, Ident]) -> dict[str, Ident]:
    root = Root(staging)
    try:
        return idents_seen_here(root, batch_id, reported)
    finally:
        root.close()


def test_a_remote_agents_report_takes_this_kernels_inode_where_size_and_mtime_agree(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "b1"
    folder.mkdir()
    for m in ("slm-1", "slm-2"):
        (folder / f"crosscheck_{m}.parquet").write_bytes(b"x" * 100)
    st1 = (folder / "crosscheck_slm-1.parquet").stat()
    st2 = (folder / "crosscheck_slm-2.parquet").stat()
    reported = {
        "slm-1": (st1.st_ino + 2, 100, st1.st_mtime_ns),  # as Linux's 9p numbers it
        "slm-2": (st2.st_ino + 2, 100, st2.st_mtime_ns + 1),  # not the file here: a rewrite
        "slm-3": (5, 100, 1),  # no such file here
    }
    assert seen(tmp_path, "b1", reported) == {
        "slm-1": (st1.st_ino, 100, st1.st_mtime_ns),
        "slm-2": reported["slm-2"],
        "slm-3": reported["slm-3"],
    }


def test_a_symlink_under_the_name_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "b1").mkdir()
    target = tmp_path / "elsewhere.parquet"
    target.write_bytes(b"x" * 100)
    os.symlink(target, tmp_path / "b1" / "crosscheck_slm-1.parquet")
    st = target.stat()
    reported = {"slm-1": (st.st_ino + 2, 100, st.st_mtime_ns)}
    assert seen(tmp_path, "b1", reported) == reported


def test_a_batch_folder_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    """The folder swapped for a link to one outside staging holding a file of the reported
    size and mtime: nothing there is taken for the agent's file (the report stays, and the
    barrier, which never follows a link either, takes it for a rewrite)."""
    staging, outside = tmp_path / "staging", tmp_path / "outside"
    staging.mkdir()
    outside.mkdir()
    (outside / "crosscheck_slm-1.parquet").write_bytes(b"x" * 100)
    st = (outside / "crosscheck_slm-1.parquet").stat()
    os.symlink(outside, staging / "b1")
    reported = {"slm-1": (st.st_ino + 2, 100, st.st_mtime_ns)}
    assert seen(staging, "b1", reported) == reported
    assert seen(staging, "gone", reported) == reported
