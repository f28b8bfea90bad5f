"""The agents' rewrite guard (issue 18, item 3): a file is copied only if the open descriptor is
the file the barrier counted (inode, size, mtime_ns), in `agents/staging.py` (stage) and in
`agents/agent.py` (the stage request's `idents`, the archive's fallback to staging).

Until these tests, disabling the check passed every test: the daemon's own quarantine always
won the race, so the agent never saw a rewritten file. Here the agent meets one: directly (the
ident taken, the file rewritten, then the copy asked for), and against the real daemon with the
rewrite made while the daemon is stopped (SIGSTOP) between its last scan and the agent's open.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from agents import slm
from agents import staging as stg
from agents.agent import Agent
from coordinator.core.config import load_config
from coordinator.core.errors import StagingError
from coordinator.core.messages import Aggregate, Archive, Crosscheck, Stage
from coordinator.core.roots import Dir
from tests.conftest import agent_config, wait_until
from tests.faultlib import (
    FINAL,
    hooks,
    lake_dirs,
    ledger,
    publish,
    publish_all,
    quarantined,
    tables,
)

MODELS = ["slm-1", "slm-2", "slm-3"]


def ident(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime_ns) as the barrier counts a file."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def table(seed: int) -> pa.Table:
    ids = [f"i{k:03d}" for k in range(40)]
    return pa.table(
        {
            "item_id": ids,
            "prediction": [["a", "b", "c"][(k * seed) % 3] for k in range(40)],
            "score": [0.5] * 40,
        }
    )


def rewrite_in_place(path: Path, data: bytes | None = None, *, mtime_ns: int | None = None) -> None:
    """Change the file's content through the same inode (a producer writing in place)."""
    with open(path, "r+b") as f:
        if data is not None:
            f.seek(0)
            f.write(data)
            f.truncate()
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


# -- check_source ------------------------------------------------------------------------------


def test_check_source_accepts_exactly_the_counted_file(tmp_path: Path) -> None:
    p = tmp_path / "slm-1.parquet"
    p.write_bytes(b"PAR1" + b"x" * 100)
    stg.check_source(str(p), os.stat(p), ident(p))  # no error
    stg.check_source(str(p), os.stat(p), None)  # nothing counted: only the file type is checked


@pytest.mark.parametrize("change", ["replaced", "mtime", "size", "size_same_mtime"])
def test_check_source_refuses_a_file_that_is_not_the_counted_one(
    tmp_path: Path, change: str
) -> None:
    """A new inode under the name, or the same inode with another mtime or size, is refused
    with a message naming the file."""
    p = tmp_path / "slm-1.parquet"
    p.write_bytes(b"PAR1" + b"x" * 100)
    counted = ident(p)
    if change == "replaced":
        tmp = tmp_path / ".slm-1.parquet.tmp"
        tmp.write_bytes(b"PAR1" + b"y" * 100)  # same size
        os.utime(tmp, ns=(counted[2], counted[2]))  # and the same mtime: only the inode differs
        os.rename(tmp, p)
        assert os.stat(p).st_ino != counted[0]
    elif change == "mtime":
        rewrite_in_place(p, mtime_ns=counted[2] + 1_000_000)
    elif change == "size":
        rewrite_in_place(p, b"PAR1" + b"z" * 50)
    else:
        rewrite_in_place(p, b"PAR1" + b"z" * 50, mtime_ns=counted[2])
    st = os.stat(p)
    with pytest.raises(StagingError, match="rewritten after the batch counted it") as info:
        stg.check_source(str(p), st, counted)
    assert str(p) in str(info.value)
    assert str(tuple(counted)) in str(info.value)


# -- copy_file and stage ---------------------------------------------------------------------


def test_copy_file_refuses_a_rewrite_between_the_count_and_the_open(tmp_path: Path) -> None:
    src, dst = tmp_path / "staging", tmp_path / "node0"
    src.mkdir()
    dst.mkdir()
    (src / "slm-1.parquet").write_bytes(b"PAR1 counted content")
    counted = ident(src / "slm-1.parquet")
    (src / ".new").write_bytes(b"PAR1 content published after the count")
    os.rename(src / ".new", src / "slm-1.parquet")
    with Dir.open(src) as s, Dir.open(dst) as d:
        with pytest.raises(StagingError, match=r"slm-1\.parquet: rewritten after the batch"):
            stg.copy_file(s, "slm-1.parquet", d, ".slm-1.parquet.tmp", counted)
    assert os.listdir(dst) == []  # nothing of the new content was written


def test_copy_file_never_copies_a_file_replaced_right_after_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check reads the open descriptor: a rename over the name right after the open leaves
    the agent holding the counted inode, now unlinked, which it refuses too. Neither the
    counted content (no longer the batch's file) nor the new one is copied."""
    src, dst = tmp_path / "staging", tmp_path / "node0"
    src.mkdir()
    dst.mkdir()
    (src / "slm-1.parquet").write_bytes(b"PAR1 counted content")
    counted = ident(src / "slm-1.parquet")
    real_open = Dir.open_file

    def open_then_replace(self: Dir, name: str, *args: int) -> int:
        fd = real_open(self, name, *args)
        if name == "slm-1.parquet":
            (src / ".new").write_bytes(b"PAR1 content published after the open")
            os.rename(src / ".new", src / "slm-1.parquet")
        return fd

    monkeypatch.setattr(Dir, "open_file", open_then_replace)
    with Dir.open(src) as s, Dir.open(dst) as d:
        with pytest.raises(StagingError, match=r"slm-1\.parquet: has 0 hard links"):
            stg.copy_file(s, "slm-1.parquet", d, "slm-1.parquet", counted)
    assert os.listdir(dst) == []


def test_stage_refuses_a_rewritten_file_names_it_and_leaves_no_copy(tmp_path: Path) -> None:
    src, tmpfs = tmp_path / "staging" / "b1", tmp_path / "node0"
    src.mkdir(parents=True)
    tmpfs.mkdir()
    for i, m in enumerate(MODELS):
        (src / f"{m}.parquet").write_bytes(b"PAR1" + bytes([i]) * 1000)
    counted = {f"{m}.parquet": ident(src / f"{m}.parquet") for m in MODELS}
    rewrite_in_place(src / "slm-3.parquet", mtime_ns=counted["slm-3.parquet"][2] + 1)
    names = [f"{m}.parquet" for m in MODELS]
    with Dir.open(src) as s, Dir.open(tmpfs) as t:
        with pytest.raises(StagingError, match=r"slm-3\.parquet: rewritten after the batch"):
            stg.stage(s, t, "b1", names, expected=counted)
    assert os.listdir(tmpfs) == []  # the batch is never left half-staged


# -- the agent's handlers ----------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    """Node 0's agent with batch b1 published (not staged yet)."""
    cfg = agent_config(tmp_path, f"{tmp_path / 'shm'}/node{{node}}", 0, MODELS)
    a = Agent(load_config(cfg), 0)
    a.tmpfs.mkdir(parents=True)
    for i, m in enumerate(MODELS):
        slm.publish(a.config.paths.staging, "b1", m, table(i + 1))
    return a


def counted_idents(a: Agent) -> dict[str, tuple[int, int, int]]:
    folder = a.config.paths.staging / "b1"
    return {f"{m}.parquet": ident(folder / f"{m}.parquet") for m in MODELS}


def test_the_agent_stage_request_refuses_content_published_after_the_count(agent: Agent) -> None:
    idents = counted_idents(agent)
    slm.publish(agent.config.paths.staging, "b1", "slm-2", table(9))
    msg = Stage(batch_id="b1", files=tuple(f"{m}.parquet" for m in MODELS), idents=idents)
    with pytest.raises(StagingError, match=r"b1/slm-2\.parquet: rewritten after the batch"):
        agent.stage(msg)
    assert not (agent.tmpfs / "b1").exists()
    # With the count of what is there now, the same request stages.
    agent.stage(replace(msg, idents=counted_idents(agent)))
    assert sorted(p.name for p in (agent.tmpfs / "b1").iterdir()) == sorted(msg.files)


def test_the_archive_falls_back_to_staging_only_for_the_counted_file(agent: Agent) -> None:
    """Where a node copy is gone, the archive takes staging's file only if it is the counted
    one: a rewrite since is refused and nothing reaches the lake."""
    idents = counted_idents(agent)
    files = tuple(f"{m}.parquet" for m in MODELS)
    agent.stage(Stage(batch_id="b1", files=files, idents=idents))
    agent.crosscheck(Crosscheck(batch_id="b1", models=tuple(MODELS)))
    agent.aggregate(Aggregate(batch_id="b1", models=tuple(MODELS)))
    (agent.tmpfs / "b1" / "slm-1.parquet").unlink()
    slm.publish(agent.config.paths.staging, "b1", "slm-1", table(8))
    msg = Archive(batch_id="b1", date="2026-11-28", models=tuple(MODELS), idents=idents)
    with pytest.raises(StagingError, match=r"b1/slm-1\.parquet: rewritten after the batch"):
        agent.archive(msg)
    assert agent.lake.list_batch("b1", "2026-11-28") == []


# -- against the real daemon -------------------------------------------------------------------


def test_a_rewrite_between_the_daemons_last_scan_and_the_agents_open_is_never_staged(
    env, daemon
) -> None:
    """The agent copies in model order and holds after its copy of slm-1 (`stage_pause_s`, until
    a gate file appears). While it holds, the daemon is stopped (SIGSTOP), so it cannot see what
    comes next, slm-7 is published again, and the gate opens. The agent then opens slm-7, a file
    the daemon never scanned: only its own check against the counted ident stands between the
    new content and node memory. It must refuse, naming the file; the batch then fails, and
    neither PostgreSQL nor the lake ever get the new content."""
    gate = env.root / "gate"
    d = daemon(extra_env=hooks(stage_pause_s=50, stage_pause_until=str(gate))).start()
    publish_all(env, "guard", seed=1831)
    local = env.tmpfs / "node0" / "guard"
    wait_until(lambda: (local / ".slm-1.parquet.tmp").exists(), 30, "the agent at slm-1")
    assert d.proc is not None
    refusal = re.compile(r"guard/slm-7\.parquet: rewritten after the batch counted it")
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        newer = publish(env, "guard", "slm-7", tables(1832)["slm-7"])
        gate.touch()

        def agent_decided() -> str:
            for line in d.log.read_text(errors="replace").splitlines():
                if '"role": "agent"' in line and '"step failed"' in line and refusal.search(line):
                    return "refused"
            if (local / "slm-7.parquet").exists():
                return "copied"
            return ""

        outcome = wait_until(agent_decided, 30, "the agent to open slm-7")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert outcome == "refused", "the agent copied a file published after the barrier counted it"
    row = d.wait_state("guard", FINAL, timeout=60)
    assert row["state"] == "failed", row
    assert "slm-7.parquet" in row["error"], row["error"]
    assert row["rows"] is None
    assert lake_dirs(env, "guard") == []
    assert ledger(env, "guard")["state"] == "failed"
    # The daemon, awake again, quarantined the new content; node memory holds nothing.
    assert any(data == newer for data, _ in quarantined(env, "guard").values())
    wait_until(lambda: not local.exists(), 15, "the node-local copies to be purged")
