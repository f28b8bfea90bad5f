"""A hostile writer to staging (an SLM's VM shares that folder) against the real daemon and its
agents on a real PostgreSQL: links planted at every level and at every step of a batch, and names
too long for the quarantine's suffix. Each test ends on outcomes: nothing outside the configured
roots was read, moved or written (a listing of a sibling folder before and after), the lake holds
only the bytes that were verified, and the daemon went on serving another batch.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.conftest import MODELS, Daemon, Env, wait_until
from tests.faultlib import (
    FINAL,
    assert_exactly_once,
    db_rows,
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
from tests.opens import Opens
from tests.system.test_remote_node import (
    TwoNodeDaemon,
    batch_aggregated_on,
    remote_config,
    start_remote_agent,
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
    gate = env.root / "gate"
    d = daemon(extra_env=held("staged", "swapped", gate)).start()
    publish_all(env, "swapped", seed=4)
    node_copy = env.tmpfs / "node0" / "swapped"
    wait_until(
        lambda: node_copy.exists() and len(list(node_copy.glob("*.parquet"))) == len(MODELS),
        30,
        "the batch to be staged",
    )
    swap_for_link(env.staging / "swapped", outside)
    gate.touch()
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
    gate = env.root / "gate"
    d = daemon(extra_env=held("aggregate", "cc-link", gate)).start()
    pub = publish_all(env, "cc-link", seed=6)
    local = env.tmpfs / "node0" / "cc-link"
    wait_until(lambda: (local / "aggregates.parquet").exists(), 60, "the batch to be aggregated")
    name = f"crosscheck_{MODELS[2]}.parquet"
    aggregated = (local / name).read_bytes()  # the copy the vote read
    assert aggregated == (env.staging / "cc-link" / name).read_bytes()
    swap_for_link(env.staging / "cc-link" / name, outside / name)
    gate.touch()
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


# -- the rows CSV, and links planted while a batch is held at a step ----------------------------
#
# A batch is held at an agent's pause point (a test hook limited to that batch, ended by a gate
# file): the attack happens there, a bystander batch is published and must finish while the
# attacked one is still held (the daemon serves throughout), then the gate opens.


def held(extra: str, bid: str, gate: Path) -> dict[str, str]:
    """Test hooks that hold batch `bid` at the agent's pause point `extra` until `gate` exists
    (at most 50 s: within agents.step_timeout_s)."""
    return hooks(
        **{
            f"{extra}_pause_s": 50,
            f"{extra}_pause_batch": bid,
            f"{extra}_pause_until": str(gate),
        }
    )


def paused_at(env: Env, point: str) -> bool:
    """An agent (the daemon's, or the remote one) printed that it is at `point` now."""
    line = f"test hook: pausing at {point}"
    return any(
        line in p.read_text(errors="replace")
        for p in (env.root / "coordinatord.log", env.root / "remote-agent.log")
        if p.exists()
    )


def bystander_done_while_held(env: Env, d, bid: str, held_state: str, seed: int) -> None:
    """A batch published while `bid` is held finishes exactly once, and `bid` is still held."""
    other = f"bystander-{seed}"
    pub = publish_all(env, other, seed=seed)
    row = d.wait_state(other, FINAL, timeout=90)
    assert row["state"] == "done", row["error"]
    assert_exactly_once(env, other, published=pub)
    assert d.show(bid)["state"] == held_state  # still held: it was served meanwhile


def db_aggregates(env: Env, bid: str) -> set[tuple[str, str | None, int]]:
    rows = db_rows(
        env, "SELECT item_id, consensus, votes FROM {s}.aggregates WHERE batch_id = $1", bid
    )
    return {(r["item_id"], r["consensus"], r["votes"]) for r in rows}


def csv_aggregates(data: bytes) -> set[tuple[str, str | None, int]]:
    t = pacsv.read_csv(io.BytesIO(data))
    return {
        (i, c or None, v)
        for i, c, v in zip(
            t.column("item_id").to_pylist(),
            t.column("consensus").to_pylist(),
            t.column("votes").to_pylist(),
            strict=True,
        )
    }


def logged(d, event: str, batch_id: str) -> list[dict[str, object]]:
    """The daemon's log lines of `event` about `batch_id`."""
    lines = [
        json.loads(ln)
        for ln in d.log.read_text(errors="replace").splitlines()
        if ln.startswith("{")
    ]
    return [ln for ln in lines if ln.get("event") == event and ln.get("batch_id") == batch_id]


def refusals(d, batch_id: str) -> list[str]:
    """The coordinator's logged refusals of a batch's rows file."""
    return [
        str(ln["error"]) for ln in logged(d, "aggregated rows refused; aggregating again", batch_id)
    ]


@pytest.fixture
def remote_pair(env: Env, tmp_path: Path) -> Iterator[Callable[[dict[str, str]], Daemon]]:
    """Start the daemon with node 1 in another kernel (tests/system/test_remote_node.py): its
    aggregation leaves the rows CSV in STAGING/<batch>/.aggregates.csv, where a writer to
    staging can reach it."""
    if shutil.which("unshare") is None or shutil.which("numactl") is None:
        pytest.skip("needs unshare (util-linux) and numactl, as tests/system/test_remote_node.py")
    started: list[tuple[Daemon, subprocess.Popen[bytes]]] = []

    def start(extra_env: dict[str, str]) -> Daemon:
        views = tmp_path / "agent-view"
        remote_config(env, views)
        d = TwoNodeDaemon(env, extra_env=extra_env)
        d.start(wait=False)
        started.append((d, start_remote_agent(env, views, extra_env)))
        d.wait_ready()
        return d

    yield start
    for d, agent in started:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        d.cleanup()


def forge(genuine: bytes) -> bytes:
    """Other rows of the very same size: every "gamma" consensus made "delta"."""
    forged = genuine.replace(b'"gamma"', b'"delta"')
    assert forged != genuine and len(forged) == len(genuine)
    return forged


@pytest.mark.parametrize("attack", ["link", "same-size rewrite"])
def test_the_rows_csv_in_staging_changed_between_aggregate_and_commit_never_reaches_postgres(
    env, remote_pair, outside, attack
):
    """The rows of an agent in another kernel wait in staging for the COPY. Swapped for a link
    to forged rows, or rewritten in place with forged rows of the same size and the mtime put
    back: the coordinator opens the file by descriptor (the link is refused, never followed)
    and hashes what it sends (the rewrite aborts the COPY), logs the refusal naming the batch
    and the file, and aggregates again; the batch ends `done` with the agent's own rows."""
    gate = env.root / "release"
    bid = batch_aggregated_on(1, f"rows-{attack[:4]}")
    d = remote_pair(held("aggregate", bid, gate))
    pub = publish_all(env, bid, seed=21)
    csv = env.staging / bid / ".aggregates.csv"
    wait_until(lambda: csv.exists() and paused_at(env, "aggregate"), 60, "the rows written")
    genuine = csv.read_bytes()
    forged = forge(genuine)
    (outside / "forged.csv").write_bytes(forged)
    before = listing(outside)
    with Opens(outside) as opens:
        if attack == "link":
            swap_for_link(csv, outside / "forged.csv")
        else:
            st = csv.stat()
            with csv.open("r+b") as f:
                f.write(forged)
            os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert csv.stat().st_size == st.st_size
        bystander_done_while_held(env, d, bid, "aggregating", seed=22)
        gate.touch()
        row = d.wait_state(bid, FINAL, timeout=90)
        assert row["state"] == "done", (row["error"], d.tail())
        assert opens.files() == []  # nothing outside staging was opened, through any link
    assert db_aggregates(env, bid) == csv_aggregates(genuine) != csv_aggregates(forged)
    assert_exactly_once(env, bid, published=pub)
    [why] = refusals(d, bid)
    assert f"batch {bid}: rows file {env.staging}/{bid}/.aggregates.csv: " in why
    assert ("symbolic link" if attack == "link" else "content changed") in why, why
    assert listing(outside) == before


def test_rows_forged_again_after_the_second_aggregation_fail_the_batch(env, remote_pair):
    """A writer that rewrites every rows file the agent writes (same size, mtime put back):
    the first refusal is retried by aggregating again, the second fails the batch, naming the
    batch and the file, with nothing in PostgreSQL and its files left in staging."""
    bid = batch_aggregated_on(1, "rows-twice")
    # Every aggregation of the batch waits 2 s before its reply: the attacker's window.
    d = remote_pair(hooks(aggregate_pause_s=2.0, aggregate_pause_batch=bid))
    csv = env.staging / bid / ".aggregates.csv"
    forged_inodes: set[int] = set()
    stop = threading.Event()

    def attacker() -> None:
        while not stop.wait(0.02):
            try:
                st = csv.stat()
                if st.st_ino in forged_inodes:
                    continue
                data = csv.read_bytes()
                with csv.open("r+b") as f:
                    f.write(forge(data))
                os.utime(csv, ns=(st.st_atime_ns, st.st_mtime_ns))
                forged_inodes.add(st.st_ino)
            except FileNotFoundError:
                continue

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        publish_all(env, bid, seed=31)
        row = d.wait_state(bid, FINAL, timeout=90)
    finally:
        stop.set()
        thread.join()
    assert row["state"] == "failed"
    where = f"batch {bid}: rows file {env.staging}/{bid}/.aggregates.csv: content changed"
    assert row["error"].startswith(where), row["error"]
    assert [w[: len(where)] for w in refusals(d, bid)] == [where, where]
    assert len(forged_inodes) == 2  # two aggregations, each file forged
    assert db_aggregates(env, bid) == set()
    assert lake_dirs(env, bid) == []
    assert (env.staging / bid / f"{MODELS[0]}.parquet").exists()  # left for inspection
    served(env, d, "after-rows-twice", seed=32)


def test_a_batch_folder_swapped_for_a_link_before_the_commit_of_staged_rows_fails_the_batch(
    env, remote_pair, outside
):
    """The folder holding a remote agent's rows swapped, after the aggregation, for a link to a
    folder with forged rows in it: the COPY never opens them (the folder is refused), and the
    new aggregation is refused by the agent too (`invalid`): the batch fails naming the link,
    with nothing in PostgreSQL and nothing outside read, moved or written."""
    gate = env.root / "release"
    bid = batch_aggregated_on(1, "rows-folder")
    d = remote_pair(held("aggregate", bid, gate))
    pub_csv = env.staging / bid / ".aggregates.csv"
    publish_all(env, bid, seed=23)
    wait_until(lambda: pub_csv.exists() and paused_at(env, "aggregate"), 60, "the rows written")
    (outside / ".aggregates.csv").write_bytes(forge(pub_csv.read_bytes()))
    before = listing(outside)
    with Opens(outside) as opens:
        swap_for_link(env.staging / bid, outside)
        bystander_done_while_held(env, d, bid, "aggregating", seed=24)
        gate.touch()
        row = d.wait_state(bid, FINAL, timeout=90)
        assert opens.files() == []
    assert row["state"] == "failed"
    assert "symbolic link" in row["error"], row["error"]
    [why] = refusals(d, bid)
    assert f"batch {bid}: rows file {env.staging}/{bid}/.aggregates.csv: " in why
    assert "symbolic link" in why
    assert db_aggregates(env, bid) == set()
    assert lake_dirs(env, bid) == []
    assert listing(outside) == before
    assert (env.staging / bid).is_symlink()  # reported and left where it is


def test_a_batch_folder_swapped_for_a_link_after_aggregation_is_archived_from_node_memory(
    env, daemon, outside
):
    """An agent of this kernel: its rows and copies are in node memory, which the swap cannot
    reach. The batch commits and archives the bytes it counted; the cleanup refuses to remove
    through the link, and leaves it."""
    gate = env.root / "release"
    d = daemon(extra_env=held("aggregate", "folder-late", gate)).start()
    before = listing(outside)
    pub = publish_all(env, "folder-late", seed=25)
    local = env.tmpfs / "node0" / "folder-late"
    wait_until(
        lambda: (local / "aggregates.csv").exists() and paused_at(env, "aggregate"),
        60,
        "the batch to be aggregated",
    )
    with Opens(outside) as opens:
        swap_for_link(env.staging / "folder-late", outside)
        bystander_done_while_held(env, d, "folder-late", "aggregating", seed=26)
        gate.touch()
        row = d.wait_state("folder-late", FINAL, timeout=90)
        assert opens.files() == []
    assert row["state"] == "done", row["error"]
    lake = lake_dirs(env, "folder-late")
    assert len(lake) == 1
    for m in MODELS:
        assert (lake[0] / f"{m}.parquet").read_bytes() == pub[m]
    assert len(db_aggregates(env, "folder-late")) == 200
    assert (env.staging / "folder-late").is_symlink()  # the link is left, reported
    rejected = d.status()["watcher"]["rejected"]
    assert rejected.get("not a folder (symlinks are never followed)", 0) >= 1, rejected
    assert listing(outside) == before


def test_a_model_file_swapped_for_a_link_after_stage_is_never_read(env, daemon, outside):
    """Between stage and cross-check: every step after the stage reads the node's copies, and
    staging's scanner only ever looks at the link itself."""
    gate = env.root / "release"
    d = daemon(extra_env=held("staged", "model-late", gate)).start()
    before = listing(outside)
    pub = publish_all(env, "model-late", seed=27)
    wait_until(lambda: paused_at(env, "staged"), 60, "the batch to be staged")
    name = f"{MODELS[1]}.parquet"
    with Opens(outside) as opens:
        swap_for_link(env.staging / "model-late" / name, outside / name)
        bystander_done_while_held(env, d, "model-late", "staging", seed=28)
        gate.touch()
        row = d.wait_state("model-late", FINAL, timeout=90)
        assert opens.files() == []
    assert row["state"] == "done", row["error"]
    # The lake has the bytes counted and staged, from node memory; the link was reported and
    # never looked through, and went with the folder at cleanup.
    lake = assert_exactly_once(env, "model-late", published=pub)
    assert (lake / name).read_bytes() != (outside / name).read_bytes()
    [ignored] = [ln for ln in logged(d, "ignored in staging", "model-late") if ln["name"] == name]
    assert ignored["reason"] == "symlink (never followed)"
    assert listing(outside) == before


def test_a_crosscheck_file_swapped_for_a_link_before_aggregation_is_never_read(
    env, remote_pair, outside
):
    """A remote agent's cross-check file swapped for a link before the second barrier counts
    it: the coordinator's look at it (this kernel's inode) and the barrier never follow the
    link; the link is no file the agent wrote, so the step is done again, and the aggregation
    reads the agents' own results."""
    gate = env.root / "release"
    bid = batch_aggregated_on(1, "cc-early")
    d = remote_pair(held("crosscheck", bid, gate))
    before = listing(outside)
    pub = publish_all(env, bid, seed=29)
    model = MODELS[4]  # node 1's: written by the remote agent
    name = f"crosscheck_{model}.parquet"
    target = env.staging / bid / name
    wait_until(lambda: target.exists() and paused_at(env, "crosscheck"), 60, "the file written")
    with Opens(outside) as opens:
        swap_for_link(target, outside / name)
        bystander_done_while_held(env, d, bid, "crosschecking", seed=30)
        gate.touch()
        row = d.wait_state(bid, FINAL, timeout=90)
        assert opens.files() == []
    assert row["state"] == "done", row["error"]
    lake = assert_exactly_once(env, bid, published=pub)
    assert (lake / name).read_bytes() != (outside / name).read_bytes()
    [ignored] = [ln for ln in logged(d, "ignored in staging", bid) if ln["name"] == name]
    assert ignored["reason"] == "symlink (never followed)"
    # The step is done again because of the link (the first retry says so; a loaded machine
    # may add a later one, which a full suite run once showed).
    redo = [ln for ln in logged(d, "step failed, retrying", bid) if ln["step"] == "crosscheck"]
    assert redo, "the cross-check was never done again"
    assert f"missing or rewritten after the step: ['{model}']" in str(redo[0]["error"])
    assert listing(outside) == before
