"""A hostile writer to staging (an SLM's VM shares that folder) against the real daemon and its
agents on a real PostgreSQL: links planted at every level and at every step of a batch, and names
too long for the quarantine's suffix. Each test ends on outcomes: nothing outside the configured
roots was read, moved or written (a listing of a sibling folder before and after), the lake holds
only the bytes that were verified, and the daemon went on serving another batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import MODELS, Env, wait_until
from tests.faultlib import (
    FINAL,
    assert_exactly_once,
    hooks,
    lake_dirs,
    ledger,
    ledger_ids,
    parquet_bytes,
    publish,
    publish_all,
    quarantined,
    reconciled,
    tables,
)


def listing(folder: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry below `folder`, links as links: name -> (inode, size, mtime_ns, mode)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    return out


@pytest.fixture
def outside(env: Env) -> Path:
    """A folder beside staging holding what an attacker would like used: a valid result of every
    model, valid cross-check files, and an aggregate-looking file."""
    folder = env.root / "outside"
    folder.mkdir()
    bait = tables(4242)
    for m in MODELS:
        (folder / f"{m}.parquet").write_bytes(parquet_bytes(bait[m]))
        (folder / f"crosscheck_{m}.parquet").write_bytes(parquet_bytes(bait[m]))
    (folder / "aggregates.parquet").write_bytes(parquet_bytes(bait[MODELS[0]]))
    return folder


def swap_for_link(path: Path, target: Path) -> None:
    """Replace `path` (a file or a folder) by a symlink to `target`, as an attacker would: a
    folder is moved aside under a dot name (which the daemon ignores), a file replaced by an
    atomic rename."""
    if path.is_dir() and not path.is_symlink():
        os.rename(path, path.with_name(f".aside-{path.name}"))
        os.symlink(target, path)
    else:
        tmp = path.with_name(f".{path.name}.link")
        os.symlink(target, tmp)
        os.rename(tmp, path)


def appear(folder: Path, files: dict[str, bytes]) -> None:
    """Make `folder` appear with its files at once (built aside, renamed into place), as the
    daemon would otherwise remove a finished batch's empty folder before a file lands in it."""
    aside = folder.with_name(f".{folder.name}.new")
    aside.mkdir()
    for name, data in files.items():
        (aside / name).write_bytes(data)
    os.rename(aside, folder)


def served(env: Env, d, bid: str, seed: int) -> None:
    """The daemon still serves: a proper batch published now goes through exactly once."""
    pub = publish_all(env, bid, seed=seed)
    assert d.wait_state(bid, FINAL)["state"] == "done"
    assert_exactly_once(env, bid, published=pub)


def test_a_finished_batch_id_made_a_link_to_an_outside_folder_moves_nothing(env, daemon, outside):
    """The reported defect: the daemon took a link named like a finished batch for that batch
    published again, and moved the outside folder's files into its quarantine."""
    before = listing(outside)
    d = daemon().start()
    pub = publish_all(env, "done-once", seed=1)
    assert d.wait_state("done-once", FINAL)["state"] == "done"
    assert_exactly_once(env, "done-once", published=pub)
    os.symlink(outside, env.staging / "done-once")
    # Before the barrier: a new batch id that is a link from the start.
    os.symlink(outside, env.staging / "linked-new")
    reconciled(d)
    served(env, d, "after-links", seed=2)
    assert listing(outside) == before
    assert quarantined(env, "done-once") == {} and quarantined(env, "linked-new") == {}
    assert (env.staging / "done-once").is_symlink() and (env.staging / "linked-new").is_symlink()
    assert "linked-new" not in ledger_ids(env)
    rejected = d.status()["watcher"]["rejected"]
    assert rejected.get("not a folder (symlinks are never followed)", 0) >= 2, rejected
    assert ledger(env, "done-once")["state"] == "done"


def test_a_model_file_that_is_a_link_never_counts_and_a_real_publish_replaces_it(
    env, daemon, outside
):
    before = listing(outside)
    d = daemon().start()
    t = tables(3)
    pub = {m: publish(env, "file-link", m, t[m]) for m in MODELS[:-1]}
    last = MODELS[-1]
    os.symlink(outside / f"{last}.parquet", env.staging / "file-link" / f"{last}.parquet")
    wait_until(
        lambda: d.status()["watcher"]["rejected"].get("symlink (never followed)"),
        20,
        "the linked file to be rejected",
    )
    reconciled(d)
    assert ledger(env, "file-link")["state"] == "waiting"  # six of seven: the link is no model
    pub[last] = publish(env, "file-link", last, t[last])  # the SDK's rename replaces the link
    assert d.wait_state("file-link", FINAL)["state"] == "done"
    assert_exactly_once(env, "file-link", published=pub)
    assert listing(outside) == before


def test_a_batch_folder_swapped_for_a_link_between_stage_and_crosscheck_writes_nothing_outside(
    env, daemon, outside
):
    """The reported defect: the agents wrote their cross-check files through the link."""
    before = listing(outside)
    d = daemon(extra_env=hooks(staged_pause_s=2.0)).start()
    publish_all(env, "swapped", seed=4)
    node_copy = env.tmpfs / "node0" / "swapped"
    wait_until(
        lambda: node_copy.exists() and len(list(node_copy.glob("*.parquet"))) == len(MODELS),
        30,
        "the batch to be staged",
    )
    swap_for_link(env.staging / "swapped", outside)
    row = d.wait_state("swapped", FINAL)
    assert row["state"] == "failed"
    assert "symbolic link" in row["error"], row["error"]
    assert listing(outside) == before  # no crosscheck_* written there, nothing moved
    assert lake_dirs(env, "swapped") == []
    assert not node_copy.exists()  # a failed batch leaves nothing in node memory
    served(env, d, "after-swap", seed=5)


def test_a_crosscheck_file_swapped_for_a_link_after_aggregation_never_reaches_the_lake(
    env, daemon, outside
):
    """The reported defect: the agent's lake copy re-opened the path and followed the link."""
    before = listing(outside)
    d = daemon(extra_env=hooks(aggregate_pause_s=2.0)).start()
    pub = publish_all(env, "cc-link", seed=6)
    local = env.tmpfs / "node0" / "cc-link"
    wait_until(lambda: (local / "aggregates.parquet").exists(), 60, "the batch to be aggregated")
    name = f"crosscheck_{MODELS[2]}.parquet"
    aggregated = (local / name).read_bytes()  # the copy the vote read
    assert aggregated == (env.staging / "cc-link" / name).read_bytes()
    swap_for_link(env.staging / "cc-link" / name, outside / name)
    assert d.wait_state("cc-link", FINAL)["state"] == "done"
    lake = assert_exactly_once(env, "cc-link", published=pub)
    assert (lake / name).read_bytes() == aggregated
    assert (lake / name).read_bytes() != (outside / name).read_bytes()
    assert listing(outside) == before
    served(env, d, "after-cc-link", seed=7)


def test_a_crosscheck_file_rewritten_before_aggregation_is_quarantined_and_never_aggregated(
    env, daemon
):
    """Between the agents' replies and the vote: the second barrier counts the very files the
    agents wrote, so a rewrite is quarantined and the step is redone; the bytes aggregated and
    archived are the agents' own."""
    d = daemon(extra_env=hooks(crosscheck_pause_s=0.4)).start()
    pub = publish_all(env, "cc-rewrite", seed=8)
    name = f"crosscheck_{MODELS[0]}.parquet"
    target = env.staging / "cc-rewrite" / name
    wait_until(target.exists, 60, "the first cross-check file")
    forged = parquet_bytes(pq.read_table(target).slice(0, 10))
    tmp = target.with_name(f".{name}.forged")
    tmp.write_bytes(forged)
    os.rename(tmp, target)
    assert d.wait_state("cc-rewrite", FINAL, timeout=90)["state"] == "done"
    lake = assert_exactly_once(env, "cc-rewrite", published=pub)
    assert (lake / name).read_bytes() != forged
    rows = pq.read_table(lake / "aggregates.parquet").num_rows
    assert pq.read_table(lake / name).num_rows == rows
    assert any(data == forged for data, _ in quarantined(env, "cc-rewrite").values())


def test_a_quarantine_folder_that_is_a_link_is_refused_loudly_and_the_daemon_goes_on(
    env, daemon, outside
):
    """The reported defect: a later quarantine created files and .reason files through it."""
    before = listing(outside)
    d = daemon().start()
    os.symlink(outside, env.staging / ".quarantine")
    t = tables(9)
    pub = {m: publish(env, "q-link", m, t[m]) for m in MODELS}
    assert d.wait_state("q-link", FINAL)["state"] == "done"
    assert_exactly_once(env, "q-link", published=pub)
    # A finished batch published again must be quarantined: it cannot be, and stays put.
    appear(env.staging / "q-link", {f"{MODELS[0]}.parquet": parquet_bytes(tables(10)[MODELS[0]])})
    refused = wait_until(
        lambda: d.status()["watcher"]["quarantine_refused"], 20, "the quarantine to be refused"
    )
    assert "symbolic link" in refused and ".quarantine" in refused
    assert listing(outside) == before
    assert (env.staging / "q-link" / f"{MODELS[0]}.parquet").exists()
    assert "QUARANTINE REFUSED" in _status_text(env)
    served(env, d, "after-q-link", seed=11)
    # Once the operator removes the link the quarantine works again and takes the file.
    os.unlink(env.staging / ".quarantine")
    wait_until(
        lambda: not (env.staging / "q-link").exists(), 20, "the republished file quarantined"
    )
    assert d.status()["watcher"]["quarantine_refused"] is None
    assert listing(outside) == before


def test_a_name_too_long_for_the_quarantine_suffix_is_quarantined_and_the_daemon_lives(env, daemon):
    """The reported defect: ENAMETOOLONG out of the main loop, and a crash loop at restart."""
    d = daemon().start()
    pub = publish_all(env, "long-name", seed=12)
    assert d.wait_state("long-name", FINAL)["state"] == "done"
    long = "L" * 240
    folder = env.staging / "long-name"
    appear(folder, {long: b"a file named to overflow NAME_MAX with a suffix"})
    wait_until(lambda: not folder.exists(), 20, "the republished folder to be quarantined")
    [(kept, (data, reason))] = quarantined(env, "long-name").items()
    assert reason.startswith("finished"), reason
    assert data == b"a file named to overflow NAME_MAX with a suffix"
    assert len(os.fsencode(kept)) + len(".reason") <= 255
    reason_file = env.staging / ".quarantine" / "long-name" / f"{kept}.reason"
    assert f"name: {long}" in reason_file.read_text().splitlines()
    assert d.proc.poll() is None
    served(env, d, "after-long-name", seed=13)
    # And a restart with such a name waiting is no crash loop either.
    assert d.stop() == 0
    appear(folder, {"M" * 250: b"again"})
    d2 = daemon().start()
    wait_until(lambda: not folder.exists(), 20, "the folder quarantined after the restart")
    served(env, d2, "after-restart", seed=14)
    assert_exactly_once(env, "long-name", published=pub)


def _status_text(env: Env) -> str:
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "status", "--config", str(env.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    return done.stdout + done.stderr
