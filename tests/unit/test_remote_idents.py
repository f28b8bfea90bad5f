"""File identities across kernels: what the coordinator sends a `[[node]] remote` agent, and
how it reads the identities such an agent reports (its share numbers inodes its own way; the
two-node guest of tests/numa_vm/test_remote_agents.py runs the whole path over 9p)."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_a_remote_agents_report_takes_this_kernels_inode_where_size_and_mtime_agree(
    tmp_path: Path,
) -> None:
    for m in ("slm-1", "slm-2"):
        (tmp_path / f"crosscheck_{m}.parquet").write_bytes(b"x" * 100)
    st1 = (tmp_path / "crosscheck_slm-1.parquet").stat()
    st2 = (tmp_path / "crosscheck_slm-2.parquet").stat()
    reported = {
        "slm-1": (st1.st_ino + 2, 100, st1.st_mtime_ns),  # as Linux's 9p numbers it
        "slm-2": (st2.st_ino + 2, 100, st2.st_mtime_ns + 1),  # not the file here: a rewrite
        "slm-3": (5, 100, 1),  # no such file here
    }
    assert idents_seen_here(tmp_path, reported) == {
        "slm-1": (st1.st_ino, 100, st1.st_mtime_ns),
        "slm-2": reported["slm-2"],
        "slm-3": reported["slm-3"],
    }


def test_a_symlink_under_the_name_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.parquet"
    target.write_bytes(b"x" * 100)
    os.symlink(target, tmp_path / "crosscheck_slm-1.parquet")
    st = target.stat()
    reported = {"slm-1": (st.st_ino + 2, 100, st.st_mtime_ns)}
    assert idents_seen_here(tmp_path, reported) == reported
