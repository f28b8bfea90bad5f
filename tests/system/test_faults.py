"""Fault injection against the real thing (issue 3, items 1-9 and 12): a real coordinatord with its
agents under numactl, real folders, a real PostgreSQL; faults are injected from outside (files
written badly, events lost, processes killed, a full tmpfs, SIGTERM) or through the test hooks of
coordinator/hooks.py ($NUMA_COORDINATOR_TEST_HOOKS, read by the daemon and its agents).

Every test ends on outcomes: ledger states, rows in PostgreSQL exactly once, lake files exactly
once (with the bytes that were published), nothing left in staging or node-local tmpfs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents import slm
from coordinator.core.errors import BatchFinishedError
from tests.conftest import MODELS, ROOT, Env, mounted_tmpfs, wait_until
from tests.faultlib import (
    FINAL,
    assert_exactly_once,
    db_rows,
    files_under,
    hooks,
    lake_dirs,
    ledger,
    ledger_ids,
    looked_again,
    parquet_bytes,
    place,
    publish,
    publish_all,
    quarantined,
    reconciled,
    row_counts,
    sdk_writes,
    staging_leftovers,
    tables,
)


def in_flight(d, batch_id: str) -> dict | None:
    """The status entry of a batch the daemon is waiting on / working on."""
    return next((b for b in d.status()["batches"] if b["batch_id"] == batch_id), None)


# -- 1. files written in place; dot files ---------------------------------------------------------


def test_file_written_in_place_counts_only_when_complete_and_dot_files_never(env, daemon):
    env.write_config(barrier={"reconcile_s": 0.5, "settle_s": 2.0})
    d = daemon().start()
    t = tables(101)
    published = {m: publish(env, "inplace", m, t[m]) for m in MODELS[:5]}
    folder = env.staging / "inplace"
    # A complete, valid result under a dot name never counts (neither .x nor .x.tmp).
    pq.write_table(t["slm-6"], folder / ".slm-6.parquet")
    pq.write_table(t["slm-6"], folder / ".slm-6.parquet.tmp")
    wait_until(lambda: in_flight(d, "inplace"), 20, "the batch to be seen")
    # slm-7 is written in place: the final name is opened and filled chunk by chunk.
    data = parquet_bytes(t["slm-7"])
    step = len(data) // 5 + 1
    with open(folder / "slm-7.parquet", "wb") as f:
        for i in range(0, len(data) - step, step):
            f.write(data[i : i + step])
            f.flush()
            looked_again(d, "inplace")  # the daemon looks at the half-written file
            b = in_flight(d, "inplace")
            assert b is not None and b["state"] == "waiting"
            assert b["missing"] == ["slm-6", "slm-7"], f"counted with {f.tell()} of {len(data)}"
        f.write(data[f.tell() :])
    # Complete now: slm-7 counts; the dot files still do not.
    wait_until(
        lambda: in_flight(d, "inplace")["missing"] == ["slm-6"], 10, "the complete file to count"
    )
    looked_again(d, "inplace")
    assert d.show("inplace")["state"] == "waiting"
    assert in_flight(d, "inplace")["missing"] == ["slm-6"]
    assert not (env.staging / ".quarantine").exists(), "a file being written was quarantined"
    published["slm-7"] = data
    published["slm-6"] = publish(env, "inplace", "slm-6", t["slm-6"])
    assert d.wait_state("inplace", FINAL)["state"] == "done"
    assert_exactly_once(env, "inplace", published=published)
    assert staging_leftovers(env) == []


# -- 2. files that arrive while the daemon is down or starting -----------------------------------


def test_files_arriving_while_down_and_during_start_are_processed_exactly_once(env, daemon):
    d = daemon().start()
    first = publish_all(env, "down-0", seed=201)
    assert d.wait_state("down-0", FINAL)["state"] == "done"
    finished_at = ledger(env, "down-0")["finished_at"]
    assert d.stop() == 0
    # While it is down: a whole batch, half of another.
    pub = {"down-1": publish_all(env, "down-1", seed=202)}
    t = tables(203)
    pub["down-2"] = {m: publish(env, "down-2", m, t[m]) for m in MODELS[:4]}
    # While it starts (arming the watcher, first listing, resuming): more arrive.
    d2 = daemon().start(wait=False)
    for m in MODELS[4:]:
        pub["down-2"][m] = publish(env, "down-2", m, t[m])
        time.sleep(0.1)
    for i in range(3, 6):
        pub[f"down-{i}"] = publish_all(env, f"down-{i}", seed=200 + i)
        time.sleep(0.15)
    d2.wait_ready()
    for b in pub:
        assert d2.wait_state(b, FINAL)["state"] == "done"
    for b, files in pub.items():
        assert_exactly_once(env, b, published=files)
    # The batch finished before the restart was not touched again.
    assert_exactly_once(env, "down-0", published=first)
    assert ledger(env, "down-0")["finished_at"] == finished_at
    assert staging_leftovers(env) == []
    assert files_under(env.tmpfs) == []


# -- 3. lost events ----------------------------------------------------------------------------

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


@pytest.fixture
def inotify_queue():
    """Lower fs.inotify.max_queued_events for inotify instances created meanwhile; the value is
    read when an instance is created, so it is restored as soon as the daemon has armed its
    watcher (other processes on the machine keep the normal queue), and again at teardown."""
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip("machine fact: this user may not lower fs.inotify.max_queued_events")
    old = MAX_QUEUED.read_text()

    class Q:
        def lower(self, n: int) -> None:
            MAX_QUEUED.write_text(str(n))

        def restore(self) -> None:
            MAX_QUEUED.write_text(old)

    q = Q()
    try:
        yield q
    finally:
        q.restore()


def test_burst_larger_than_the_inotify_queue_loses_no_batch(env, daemon, inotify_queue):
    inotify_queue.lower(16)
    try:
        d = daemon().start()
    finally:
        inotify_queue.restore()
    n_batches = 6
    ts = {f"burst-{i}": tables(300 + i) for i in range(n_batches)}
    pub = {b: {"slm-1": publish(env, b, "slm-1", t["slm-1"])} for b, t in ts.items()}
    # The batch folders exist and are watched...
    wait_until(
        lambda: all((b := in_flight(d, x)) and len(b["present"]) == 1 for x in ts),
        20,
        "every batch folder to be seen",
    )
    events0 = d.status()["watcher"]["events"]
    # ...then the daemon (its event thread too) is frozen while 30 files are published into
    # them: the kernel queue of 16 overflows and most of these events are lost for good.
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for b, t in ts.items():
            for m in MODELS[1:-1]:
                pub[b][m] = publish(env, b, m, t[m])
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    wait_until(
        lambda: all(in_flight(d, b)["missing"] == ["slm-7"] for b in ts),
        20,
        "reconciliation to find every file of the burst",
    )
    w = d.status()["watcher"]
    # Each published file is at least one distinct change (its final name): far fewer arrived.
    assert w["events"] - events0 < n_batches * 5, "no events were lost: the test proves nothing"
    assert w["reconcile_scans"] > 0
    for b, t in ts.items():
        pub[b]["slm-7"] = publish(env, b, "slm-7", t["slm-7"])
    for b in pub:
        assert d.wait_state(b, FINAL)["state"] == "done"
    for b, files in pub.items():
        assert_exactly_once(env, b, published=files)
    assert staging_leftovers(env) == []


def test_non_utf8_name_is_rejected_and_does_not_stop_the_batch_or_the_watcher(env, daemon):
    # Reconciliation is slow here, so only a working (or re-created) watcher finishes in time.
    env.write_config(barrier={"reconcile_s": 60.0})
    d = daemon().start()
    t = tables(401)
    pub = {m: publish(env, "utf", m, t[m]) for m in MODELS[:-1]}
    fd = os.open(bytes(env.staging / "utf") + b"/\xff\xfe-slm-7.parquet", os.O_CREAT | os.O_WRONLY)
    os.write(fd, parquet_bytes(t["slm-7"]))
    os.close(fd)
    pub["slm-7"] = publish(env, "utf", "slm-7", t["slm-7"])
    assert d.wait_state("utf", FINAL, timeout=20)["state"] == "done"
    assert_exactly_once(env, "utf", published=pub)
    wait_until(lambda: d.status()["watcher"]["armed"], 10, "the watcher to be armed")
    w = d.status()["watcher"]
    # Whatever the backend makes of such a name, a watcher failure is counted and re-created.
    assert w["watcher_restarts"] == d.log.read_text().count("watcher failed, re-creating it")
    assert w["rejected"].get("name does not match <model>.parquet", 0) >= 1, w["rejected"]
    # The watcher still works after the bad name: a new batch completes on events alone.
    pub2 = publish_all(env, "utf-2", seed=402)
    assert d.wait_state("utf-2", FINAL, timeout=20)["state"] == "done"
    assert_exactly_once(env, "utf-2", published=pub2)


# -- 4. bad names, symlinks, hard links, folders ----------------------------------------------


def test_bad_names_links_and_folders_are_rejected_never_followed_or_copied(env, daemon):
    d = daemon().start()
    elsewhere = env.root / "elsewhere"
    elsewhere.mkdir()
    t = tables(501)
    other = tables(599)
    pub = {m: publish(env, "names", m, t[m]) for m in ("slm-1", "slm-2", "slm-4", "slm-5")}
    folder = env.staging / "names"
    # slm-7: a symlink to a valid Parquet file elsewhere.
    target = elsewhere / "slm-7-elsewhere.parquet"
    target.write_bytes(parquet_bytes(other["slm-7"]))
    target_bytes = target.read_bytes()
    os.symlink(target, folder / "slm-7.parquet")
    # slm-6: a valid file with a second (hard) link elsewhere.
    pub["slm-6"] = publish(env, "names", "slm-6", t["slm-6"])
    os.link(folder / "slm-6.parquet", elsewhere / "hardlink.parquet")
    # slm-3: a folder where the file belongs.
    (folder / "slm-3.parquet").mkdir()
    (folder / "slm-3.parquet" / "x.parquet").write_bytes(parquet_bytes(t["slm-3"]))
    # Names that match nothing.
    (folder / "notes.txt").write_text("not a result")
    place(folder / "slm-9.parquet", parquet_bytes(t["slm-1"]))
    place(folder / "crosscheck_slm-9.parquet", parquet_bytes(t["slm-1"]))
    place(folder / ("x" * 196 + ".txt"), b"long")
    place(folder / ("y" * 192 + ".parquet"), parquet_bytes(t["slm-1"]))
    # A folder that is not a batch folder, and a file where a batch folder belongs.
    place(env.staging / "stray.parquet", parquet_bytes(t["slm-1"]))
    reconciled(d)  # the events, and two whole reconciliation passes since

    b = in_flight(d, "names")
    assert b is not None and b["state"] == "waiting"
    assert b["missing"] == ["slm-3", "slm-6", "slm-7"]
    assert ledger_ids(env) == {"names"}
    rejected = d.status()["watcher"]["rejected"]
    reasons = " | ".join(rejected)
    for what in (
        "symlink",
        "hard link",
        "not a regular file",
        "does not match",
        "unknown model",
        "not a folder",
    ):
        assert what in reasons, f"no rejection counted for {what!r}: {rejected}"
    assert files_under(env.tmpfs) == [], "something was copied to tmpfs"

    # Put things right: the batch completes with the proper files only.
    (folder / "slm-7.parquet").unlink()
    pub["slm-7"] = publish(env, "names", "slm-7", t["slm-7"])
    (elsewhere / "hardlink.parquet").unlink()  # slm-6 has one link now
    (folder / "slm-3.parquet" / "x.parquet").unlink()
    (folder / "slm-3.parquet").rmdir()
    pub["slm-3"] = publish(env, "names", "slm-3", t["slm-3"])
    assert d.wait_state("names", FINAL)["state"] == "done"
    assert_exactly_once(env, "names", published=pub)
    # Never followed, never copied, never removed.
    assert target.read_bytes() == target_bytes
    assert ledger_ids(env) == {"names"}
    assert files_under(env.tmpfs) == []
    assert staging_leftovers(env) == ["stray.parquet"]


def test_symlinked_and_badly_named_batch_folders_are_never_taken(env, daemon):
    d = daemon().start()
    elsewhere = env.root / "elsewhere"
    other = tables(598)
    for m in MODELS:
        slm.publish(elsewhere, "symtarget", m, other[m])
    target_files = {p.name: p.read_bytes() for p in (elsewhere / "symtarget").iterdir()}
    # Created while the daemon runs (so the watcher reports them), each with seven valid files.
    os.symlink(elsewhere / "symtarget", env.staging / "sym-batch")
    for bad in ("bad name!", "z" * 200):
        (env.staging / bad).mkdir()
        for m in MODELS:
            place(env.staging / bad / f"{m}.parquet", parquet_bytes(other[m]))
    pub = publish_all(env, "good", seed=597)  # a proper batch alongside goes through
    assert d.wait_state("good", FINAL)["state"] == "done"
    reconciled(d)  # the events, and two whole reconciliation passes since
    try:
        assert ledger_ids(env) == {"good"}, "a symlinked or badly named batch folder was taken"
        reasons = " | ".join(d.status()["watcher"]["rejected"])
        assert "bad batch folder name" in reasons and "not a folder" in reasons, reasons
        assert lake_dirs(env, "sym-batch") == []
        assert files_under(env.tmpfs) == [], "something was copied to tmpfs"
        # The target of the symlink is untouched: nothing written into it, nothing removed.
        assert {p.name: p.read_bytes() for p in (elsewhere / "symtarget").iterdir()} == (
            target_files
        )
        assert (env.staging / "sym-batch").is_symlink()
        assert_exactly_once(env, "good", published=pub)
    finally:
        d.stop()


# -- 5. corrupt, truncated, rewritten, republished -------------------------------------------


def test_corrupt_and_truncated_files_are_quarantined_and_the_batch_waits_for_good_ones(env, daemon):
    env.write_config(barrier={"reconcile_s": 0.5, "settle_s": 1.0})
    d = daemon().start()
    t = tables(601)
    pub = {m: publish(env, "corrupt", m, t[m]) for m in MODELS[:5]}
    folder = env.staging / "corrupt"
    garbage = b"PAR1" + os.urandom(3000) + b"PAR1"
    truncated = parquet_bytes(t["slm-6"])[: len(parquet_bytes(t["slm-6"])) // 2]
    place(folder / "slm-7.parquet", garbage)
    place(folder / "slm-6.parquet", truncated)
    q = wait_until(lambda: len(quarantined(env, "corrupt")) == 2, 15, "both files quarantined")
    q = quarantined(env, "corrupt")
    by_content = {data: (name, reason) for name, (data, reason) in q.items()}
    assert set(by_content) == {garbage, truncated}
    for _name, reason in by_content.values():
        assert reason.startswith("corrupt"), reason
    assert by_content[garbage][0].startswith("slm-7.parquet")
    assert by_content[truncated][0].startswith("slm-6.parquet")
    assert not (folder / "slm-6.parquet").exists() and not (folder / "slm-7.parquet").exists()
    looked_again(d, "corrupt")
    assert d.show("corrupt")["state"] == "waiting"
    assert in_flight(d, "corrupt")["missing"] == ["slm-6", "slm-7"]
    assert d.status()["watcher"]["quarantined"].get("corrupt") == 2
    pub["slm-6"] = publish(env, "corrupt", "slm-6", t["slm-6"])
    pub["slm-7"] = publish(env, "corrupt", "slm-7", t["slm-7"])
    assert d.wait_state("corrupt", FINAL)["state"] == "done"
    assert_exactly_once(env, "corrupt", published=pub)
    assert staging_leftovers(env) == []
    assert len(quarantined(env, "corrupt")) == 2  # the evidence stays for the operator


def test_counted_file_rewritten_mid_flight_is_quarantined_and_the_original_archived(env, daemon):
    d = daemon(extra_env=hooks(stage_pause_s=0.5)).start()
    pub = publish_all(env, "rewrite", seed=701)
    # Once slm-1 is staged (the agent copies in model order, pausing after each file), the
    # producer publishes slm-1 again with other content.
    wait_until(
        lambda: (env.tmpfs / "node0" / "rewrite" / "slm-1.parquet").exists(),
        20,
        "slm-1 to be staged",
    )
    assert in_flight(d, "rewrite")["state"] == "staging"
    newer = publish(env, "rewrite", "slm-1", tables(799)["slm-1"])
    assert newer != pub["slm-1"]
    assert d.wait_state("rewrite", FINAL)["state"] == "done"
    assert_exactly_once(env, "rewrite", published=pub)  # the lake holds the ORIGINAL bytes
    [(name, (data, reason))] = quarantined(env, "rewrite").items()
    assert name.startswith("slm-1.parquet") and data == newer
    assert reason.startswith("rewritten"), reason
    assert staging_leftovers(env) == []


def test_file_rewritten_before_the_agent_copies_it_is_never_staged(env, daemon):
    """The agent checks the counted (inode, size, mtime) on the descriptor it copies from, so
    content published after the barrier counted the batch never reaches node memory."""
    # The agent holds after its copy of each file until the gate opens (at once afterwards).
    gate = env.root / "gate"
    d = daemon(extra_env=hooks(stage_pause_s=50, stage_pause_until=str(gate))).start()
    publish_all(env, "late-rewrite", seed=702)
    wait_until(
        lambda: (env.tmpfs / "node0" / "late-rewrite" / ".slm-1.parquet.tmp").exists(),
        20,
        "the agent to hold at its copy of slm-1",
    )
    assert in_flight(d, "late-rewrite")["state"] == "staging"
    # slm-7 is copied last: rewrite it while the agent holds after slm-1, then let it go on.
    newer = publish(env, "late-rewrite", "slm-7", tables(798)["slm-7"])
    gate.touch()
    row = d.wait_state("late-rewrite", FINAL, timeout=120)
    assert row["state"] == "failed"
    assert "rewritten" in row["error"], row["error"]
    assert row["rows"] is None
    # The newer content was quarantined, never staged, and nothing is left in node memory.
    assert any(data == newer for data, _ in quarantined(env, "late-rewrite").values())
    assert not (env.tmpfs / "node0" / "late-rewrite").exists()


def test_file_rewritten_while_the_daemon_is_down_after_counting_is_never_staged(env, daemon):
    """The barrier's count (inode, size, mtime per file) is in the ledger with `ready`, so a
    daemon killed once the count is written still refuses content published before it
    restarts. (The agents' copies are held mid-way, so nothing counted is in node memory.)"""
    d = daemon(extra_env=hooks(stage_pause_s=5.0)).start()
    publish_all(env, "down-rewrite", seed=703)
    wait_until(
        lambda: len(json.loads(ledger(env, "down-rewrite")["counted"] or "{}")) == len(MODELS),
        30,
        "the count to be in the ledger",
    )
    d.kill9()
    newer = publish(env, "down-rewrite", "slm-4", tables(799)["slm-4"])
    d2 = daemon().start()
    row = d2.wait_state("down-rewrite", FINAL, timeout=120)
    assert row["state"] == "failed"
    assert "rewritten" in row["error"] and "slm-4" in row["error"], row["error"]
    assert row["rows"] is None
    assert any(data == newer for data, _ in quarantined(env, "down-rewrite").values())
    wait_until(lambda: files_under(env.tmpfs) == [], 10, "the node-local copies to go")


def test_a_count_lost_to_a_crash_is_taken_again_from_what_staging_holds_at_restart(env, daemon):
    """What the write-behind ledger can lose (docs/reliability.md): killed right after the
    barrier fired, before `ready` reached the ledger, the restarted daemon finds the batch
    `waiting` and counts it again, so a file rewritten meanwhile is the batch's content, used
    everywhere (rows, lake), exactly once."""
    d = daemon(extra_env=hooks(crash_at="ready")).start()
    first = publish_all(env, "lost-count", seed=704)
    assert d.proc.wait(30) == -signal.SIGKILL, d.tail()
    row = ledger(env, "lost-count")
    assert (row["state"], json.loads(row["counted"] or "{}")) == ("waiting", {}), row
    own = tables(704)["slm-4"]  # the same items, every prediction changed
    i = own.schema.get_field_index("prediction")
    rewrite = own.set_column(i, "prediction", pa.array(["rewritten"] * own.num_rows, pa.string()))
    newer = publish(env, "lost-count", "slm-4", rewrite)
    d2 = daemon().start()
    assert d2.wait_state("lost-count", FINAL, timeout=120)["state"] == "done"
    assert_exactly_once(env, "lost-count", published={**first, "slm-4": newer})
    agreement = db_rows(
        env,
        "SELECT agreement FROM {s}.model_agreement WHERE batch_id = $1 AND model_a = 'slm-3'"
        " AND model_b = 'slm-4'",
        "lost-count",
    )
    # The rewritten predictions were the ones voted on: no other model agrees with them.
    assert agreement == [{"agreement": 0.0}]
    assert quarantined(env, "lost-count") == {}


def _republish_finished(env, d, bid, first):
    # The daemon quarantines each file as it lands and removes the folder. A publish that
    # meets that removal says the batch is finished: its file is in the quarantine when the
    # folder went after its rename, and was never written when it went before. Which one
    # happens is a race the daemon may win every time, so both are accepted here.
    t = tables(899)
    taken, refused = {}, {}
    for m in MODELS:
        # The bytes the SDK wrote, refused or not: its footer records its CPU seconds, so
        # writing the table again would give other bytes.
        with sdk_writes() as written:
            try:
                slm.publish(env.staging, bid, m, t[m])
                [taken[m]] = written
            except BatchFinishedError as e:
                assert f"batch {bid} is finished" in str(e)
                if written:  # none when the folder went before the write
                    refused[m] = written[0]
    wait_until(lambda: not (env.staging / bid).exists(), 15, f"the republished {bid} removed")
    # A producer that writes the whole folder aside and renames it in cannot lose that race:
    # its files land for certain, and each must reach the quarantine too.
    again = tables(898)
    aside = env.staging / f".aside-{bid}"
    aside.mkdir()
    moved_in = {}
    for m in MODELS[:3]:
        moved_in[m] = parquet_bytes(again[m])
        (aside / f"{m}.parquet").write_bytes(moved_in[m])
    os.rename(aside, env.staging / bid)

    def in_quarantine() -> set[bytes]:
        return {data for data, _ in quarantined(env, bid).values()}

    wait_until(
        lambda: (
            set(taken.values()) | set(moved_in.values()) <= in_quarantine()
            and not (env.staging / bid).exists()
        ),
        15,
        f"the republished {bid} to be quarantined",
    )
    q = quarantined(env, bid)
    assert in_quarantine() <= set(taken.values()) | set(refused.values()) | set(moved_in.values())
    for _, reason in q.values():
        assert reason.startswith("finished"), reason
    assert ledger(env, bid)["state"] == "done"
    assert_exactly_once(env, bid, published=first)  # rows not written twice, lake untouched
    assert staging_leftovers(env) == []


def test_finished_batch_published_again_while_running_is_quarantined(env, daemon):
    d = daemon().start()
    first = publish_all(env, "again", seed=801)
    assert d.wait_state("again", FINAL)["state"] == "done"
    _republish_finished(env, d, "again", first)


def test_finished_batch_published_again_while_down_is_quarantined(env, daemon):
    d = daemon().start()
    first = publish_all(env, "again2", seed=802)
    assert d.wait_state("again2", FINAL)["state"] == "done"
    assert d.stop() == 0
    again = publish_all(env, "again2", seed=899)
    d2 = daemon().start()
    wait_until(
        lambda: (
            len(quarantined(env, "again2")) == len(MODELS) and not (env.staging / "again2").exists()
        ),
        15,
        "the republished batch to be quarantined",
    )
    q = quarantined(env, "again2")
    assert sorted(data for data, _ in q.values()) == sorted(again.values())
    assert all(reason.startswith("finished") for _, reason in q.values())
    assert d2.show("again2")["state"] == "done"
    assert_exactly_once(env, "again2", published=first)


# -- 6. deadline and quorum -------------------------------------------------------------------


def test_deadline_goes_on_degraded_with_a_quorum_and_fails_below_it(env, daemon):
    env.write_config(batch={"deadline_s": 3.0, "quorum": 5})
    d = daemon().start()
    t5, t3 = tables(1001), tables(1002)
    pub5 = {m: publish(env, "quorum-5", m, t5[m]) for m in MODELS[:5]}
    pub3 = {m: publish(env, "quorum-3", m, t3[m]) for m in MODELS[:3]}
    row5 = d.wait_state("quorum-5", FINAL, timeout=30)
    row3 = d.wait_state("quorum-3", FINAL, timeout=30)

    assert row5["state"] == "degraded", row5["error"]
    assert row5["degraded"] is True
    assert sorted(row5["models_present"]) == MODELS[:5]
    assert sorted(row5["models_missing"]) == ["slm-6", "slm-7"]
    # Going on at the deadline counts the files it goes on with, as the barrier does.
    assert sorted(json.loads(ledger(env, "quorum-5")["counted"])) == MODELS[:5]
    assert_exactly_once(env, "quorum-5", models=MODELS[:5], state="degraded", published=pub5)

    assert row3["state"] == "failed"
    assert "quorum" in row3["error"] and "slm-4" in row3["error"], row3["error"]
    assert sorted(row3["models_missing"]) == MODELS[3:]
    assert row_counts(env, "quorum-3") == (0, 0, 0, 0)
    assert lake_dirs(env, "quorum-3") == []
    assert "aggregate_ms" not in (row3["timings"] or {})
    # A failed batch's files stay in staging for the operator; nothing was staged to tmpfs.
    assert sorted(os.listdir(env.staging / "quorum-3")) == sorted(f"{m}.parquet" for m in pub3)
    assert files_under(env.tmpfs) == []

    out = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "batches", "--socket", str(env.socket)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines()[1:] if ln.strip()}
    assert re.search(r"\bdegraded\b", lines["quorum-5"]) and "slm-6, slm-7" in lines["quorum-5"]
    assert re.search(r"\bfailed\b", lines["quorum-3"]) and "quorum" in lines["quorum-3"]
    finished = {b["batch_id"]: b for b in d.status()["finished"]}
    assert finished["quorum-5"]["state"] == "degraded"
    assert sorted(finished["quorum-5"]["missing"]) == ["slm-6", "slm-7"]
    assert finished["quorum-3"]["state"] == "failed" and "quorum" in finished["quorum-3"]["error"]
    st = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", "status", "--socket", str(env.socket)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert st.returncode == 0, st.stderr
    assert re.search(r"quorum-5\s+degraded", st.stdout), st.stdout
    assert re.search(r"quorum-3\s+failed.*quorum", st.stdout), st.stdout


# -- 7. kill -9 of the daemon at every phase --------------------------------------------------

PHASES = [
    "ready",
    "staging",
    "staged",
    "crosschecking",
    "crosschecked",
    "aggregating",
    "committed",
    "archived",
]


@pytest.mark.parametrize("phase", PHASES)
def test_daemon_killed_at_every_phase_resumes_and_lands_exactly_once(env, daemon, phase):
    d = daemon(extra_env=hooks(crash_at=phase)).start()
    pub = publish_all(env, f"crash-{phase}", seed=1100 + PHASES.index(phase))
    assert d.proc.wait(30) == -signal.SIGKILL, d.tail()
    bid = f"crash-{phase}"
    # It died in that phase: the ledger is there or (write-behind of the steps before the
    # commit) a little behind, never ahead and never final.
    state = ledger(env, bid)["state"]
    assert state in ["waiting", *PHASES[: PHASES.index(phase) + 1]], state
    if phase in ("committed", "archived"):
        assert state == phase  # recorded durably before going on
    d2 = daemon().start()
    assert d2.wait_state(bid, FINAL)["state"] == "done"
    assert_exactly_once(env, bid, published=pub)
    assert staging_leftovers(env) == []
    assert files_under(env.tmpfs) == []


# -- 8. kill -9 of an agent mid-copy and mid-cross-check --------------------------------------


def _kill_agent_when(d, env: Env, seen, what: str) -> int:
    [agent] = d.status()["agents"]
    pid = agent["pid"]
    wait_until(seen, 30, what)
    os.kill(pid, signal.SIGKILL)
    return pid


def _agent_came_back(d, old_pid: int) -> None:
    def back():
        [a] = d.status()["agents"]
        return a["connected"] and a["pid"] != old_pid and a["restarts"] >= 1

    wait_until(back, 30, "the supervisor to restart the agent")


def test_agent_killed_mid_copy_is_restarted_partials_removed_and_the_step_retried(env, daemon):
    # The agent holds after its copy of a file until the gate opens; its restarted copy
    # inherits the hook and finds the gate open.
    gate = env.root / "gate"
    d = daemon(extra_env=hooks(stage_pause_s=50, stage_pause_until=str(gate))).start()
    local = env.tmpfs / "node0" / "midcopy"
    pub = publish_all(env, "midcopy", seed=1201)
    # The agent copies a file to its dot-temp name and pauses there: kill it with the partial.
    old = _kill_agent_when(
        d,
        env,
        lambda: local.is_dir() and any(p.name.endswith(".tmp") for p in local.iterdir()),
        "a partial copy in tmpfs",
    )
    gate.touch()
    _agent_came_back(d, old)
    assert d.wait_state("midcopy", FINAL)["state"] == "done"
    assert_exactly_once(env, "midcopy", published=pub)
    assert files_under(env.tmpfs) == []
    log = d.log.read_text()
    assert "removed partial copies left by a previous agent" in log
    retried = [ln for ln in log.splitlines() if "step failed, retrying" in ln]
    assert any('"step": "stage"' in ln for ln in retried), "the stage step was not retried"


def test_agent_killed_mid_crosscheck_is_restarted_and_the_step_retried(env, daemon):
    d = daemon(extra_env=hooks(crosscheck_pause_s=0.5)).start()
    pub = publish_all(env, "midcc", seed=1202)
    old = _kill_agent_when(
        d,
        env,
        lambda: (env.staging / "midcc" / "crosscheck_slm-1.parquet").exists(),
        "the first cross-check file",
    )
    assert in_flight(d, "midcc")["state"] == "crosschecking"
    _agent_came_back(d, old)
    assert d.wait_state("midcc", FINAL)["state"] == "done"
    assert_exactly_once(env, "midcc", published=pub)
    retried = [ln for ln in d.log.read_text().splitlines() if "step failed, retrying" in ln]
    assert any('"step": "crosscheck"' in ln for ln in retried), "the cross-check was not retried"
    assert files_under(env.tmpfs) == []
    assert staging_leftovers(env) == []


def test_agent_killed_mid_aggregate_is_restarted_and_the_step_retried(env, daemon):
    """Killed with its node-local files written but before it replied: the retry writes them
    again and the batch commits once, from the second attempt's files."""
    gate = env.root / "gate"  # holds the agent at the pause; its restarted copy passes
    d = daemon(extra_env=hooks(aggregate_pause_s=50, aggregate_pause_until=str(gate))).start()
    pub = publish_all(env, "midagg", seed=1203)
    local = env.tmpfs / "node0" / "midagg"
    old = _kill_agent_when(
        d, env, lambda: (local / "aggregates.parquet").exists(), "the aggregate's files"
    )
    gate.touch()
    assert in_flight(d, "midagg")["state"] == "aggregating"
    _agent_came_back(d, old)
    assert d.wait_state("midagg", FINAL)["state"] == "done"
    assert_exactly_once(env, "midagg", published=pub)
    retried = [ln for ln in d.log.read_text().splitlines() if "step failed, retrying" in ln]
    assert any('"step": "aggregate"' in ln for ln in retried), "the aggregate was not retried"
    assert files_under(env.tmpfs) == []


def test_crosscheck_output_that_cannot_be_aggregated_fails_the_batch_at_once(env, daemon):
    """A plug-in cross-check wrote a model's item twice: the aggregating agent names the model
    and the duplicate; the batch fails without retries, nothing is written anywhere."""
    env.write_config(crosscheck={"function": "tests.plugins:crosscheck_duplicating_slm3"})
    d = daemon().start()
    publish_all(env, "dupagg", seed=1204)
    row = d.wait_state("dupagg", FINAL, timeout=60)
    assert row["state"] == "failed"
    assert "slm-3" in row["error"] and "duplicates" in row["error"], row["error"]
    assert row_counts(env, "dupagg") == (0, 0, 0, 0) and lake_dirs(env, "dupagg") == []
    log = d.log.read_text()
    assert not [ln for ln in log.splitlines() if '"step": "aggregate"' in ln and "retrying" in ln]
    assert (env.staging / "dupagg" / "slm-3.parquet").exists()  # kept for the operator
    wait_until(lambda: files_under(env.tmpfs) == [], 10, "the node-local copies to go")


def test_aggregates_lost_from_node_memory_before_the_archive_are_made_again(env, daemon):
    """The lake is down after the commit, and meanwhile the node-local aggregates vanish (a
    tmpfs wiped by hand, a reboot of the agent's node): the archive aggregates the batch
    again from its cross-check files in staging and the lake gets the same rows."""
    env.lake.mkdir(parents=True, exist_ok=True)
    blocker = env.lake / "batches"
    blocker.write_text("not a folder")
    d = daemon().start()
    publish_all(env, "lostagg", seed=1205)
    wait_until(
        lambda: (
            (d.show("lostagg") or {}).get("state") == "committed"
            and "archive failed" in (in_flight(d, "lostagg") or {}).get("error", "")
        ),
        60,
        "the batch to be committed with the archive failing",
    )
    local = env.tmpfs / "node0" / "lostagg"
    for name in ("aggregates.parquet", "aggregates.csv"):
        (local / name).unlink()
    blocker.unlink()
    done = d.wait_state("lostagg", FINAL, timeout=90)
    assert done["state"] == "done"
    assert "aggregating again" in d.log.read_text()
    lake = pq.read_table(Path(done["lake_path"]) / "aggregates.parquet")
    assert lake.num_rows == done["rows"] > 0
    in_db = db_rows(
        env, "SELECT item_id, consensus FROM {s}.aggregates WHERE batch_id = $1", "lostagg"
    )
    in_lake = zip(
        lake.column("item_id").to_pylist(), lake.column("consensus").to_pylist(), strict=True
    )
    assert {r["item_id"]: r["consensus"] for r in in_db} == dict(in_lake)


def test_batch_failing_after_staging_leaves_no_node_local_copies(env, daemon):
    import pyarrow as pa

    d = daemon().start()
    t = tables(1501)
    for m in MODELS[:-1]:
        publish(env, "noschema", m, t[m])
    # Readable Parquet (so it counts), but without item_id/prediction: the cross-check fails.
    place(env.staging / "noschema" / "slm-7.parquet", parquet_bytes(pa.table({"x": [1, 2, 3]})))
    row = d.wait_state("noschema", FINAL, timeout=60)
    assert row["state"] == "failed"
    assert "slm-7" in row["error"] and "item_id" in row["error"], row["error"]
    assert row_counts(env, "noschema") == (0, 0, 0, 0) and lake_dirs(env, "noschema") == []
    assert len(os.listdir(env.staging / "noschema")) == 7  # left in staging for the operator
    # The copies are purged before `failed` is written, so they are gone already.
    assert files_under(env.tmpfs) == [], "a failed batch's copies stay in node-local tmpfs"


# -- 9. tmpfs full ------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs():
    """A real tmpfs with room for ~1 MiB of batch data beyond the agent's free-space headroom."""
    from agents import staging

    with mounted_tmpfs((staging.HEADROOM + (1 << 20)) // 1024, prefix="nc-full-") as mnt:
        yield mnt


def test_batch_larger_than_the_tmpfs_fails_with_the_reason_and_never_aggregates(
    env, daemon, small_tmpfs
):
    env.write_config(paths={"node_tmpfs": f"{small_tmpfs}/node{{node}}"}, batch={"deadline_s": 4.0})
    d = daemon().start()
    pub = publish_all(env, "toobig", seed=1301, rows=20_000)  # ~1.7 MB: more than fits
    assert sum(map(len, pub.values())) > 1 << 20
    row = d.wait_state("toobig", FINAL, timeout=40)
    assert row["state"] == "failed"
    assert re.search(r"space|full", row["error"]) and "tmpfs" in row["error"], row["error"]
    assert "aggregate_ms" not in row["timings"] and "crosscheck_ms" not in row["timings"]
    assert row_counts(env, "toobig") == (0, 0, 0, 0)
    assert lake_dirs(env, "toobig") == []
    assert files_under(small_tmpfs) == [], "a partial copy was left in tmpfs"
    # The batch's files stay in staging, untouched, for the operator.
    assert {p.name: p.read_bytes() for p in (env.staging / "toobig").iterdir()} == {
        f"{m}.parquet": b for m, b in pub.items()
    }


def test_batch_waits_for_tmpfs_space_and_completes_when_it_returns(env, daemon, small_tmpfs):
    env.write_config(paths={"node_tmpfs": f"{small_tmpfs}/node{{node}}"})
    d = daemon().start()
    blocker = small_tmpfs / "blocker"
    blocker.write_bytes(b"\0" * (900 << 10))
    pub = publish_all(env, "waitspace", seed=1302, rows=4_000)  # ~330 KB
    wait_until(
        lambda: (b := in_flight(d, "waitspace")) and b["state"] == "staging",
        20,
        "staging to start",
    )
    # The stage step is refused (tmpfs full) and retried, twice at least: still not staged.
    wait_until(
        lambda: d.log.read_text().count("tmpfs full, waiting for space") >= 2,
        20,
        "two refused stage attempts",
    )
    assert in_flight(d, "waitspace")["state"] == "staging", "staged although the tmpfs was full"
    assert files_under(small_tmpfs / "node0") == []
    blocker.unlink()
    assert d.wait_state("waitspace", FINAL, timeout=30)["state"] == "done"
    assert_exactly_once(env, "waitspace", rows=4_000, published=pub, tmpfs=small_tmpfs)
    assert files_under(small_tmpfs) == []


# -- 12. SIGTERM during a slow step ------------------------------------------------------------


def test_sigterm_mid_step_exits_in_bounded_time_and_the_batch_resumes_exactly_once(env, daemon):
    d = daemon(extra_env=hooks(stage_pause_s=2.0)).start()
    pub = publish_all(env, "term", seed=1401)
    local = env.tmpfs / "node0" / "term"
    wait_until(
        lambda: local.is_dir() and any(p.name.endswith(".tmp") for p in local.iterdir()),
        20,
        "the agent to be mid-copy",
    )
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(30)
    took = time.monotonic() - t0
    assert rc == 0, d.tail()
    assert took < 30
    state = ledger(env, "term")["state"]
    assert state in ("waiting", "ready", "staging", "staged"), state  # resumable, not failed
    d2 = daemon().start()
    assert d2.wait_state("term", FINAL)["state"] == "done"
    assert_exactly_once(env, "term", published=pub)
    assert files_under(env.tmpfs) == []
    assert staging_leftovers(env) == []


def test_lake_refusing_writes_after_the_commit_is_retried_until_it_accepts(env, daemon):
    """The rows are committed first; a lake that refuses the archive keeps the batch in
    flight (error in status, staging kept) and the archive lands once the lake is back."""
    from tests.system.test_flow import ROWS, publish_all

    # A plain file where the lake's batches/ folder belongs makes every archive fail.
    env.lake.mkdir(parents=True, exist_ok=True)
    blocker = env.lake / "batches"
    blocker.write_text("not a folder")
    d = daemon().start()
    publish_all(env, "lake-down", seed=900)

    def stuck() -> dict | None:
        row = d.show("lake-down")
        batch = [b for b in d.status()["batches"] if b["batch_id"] == "lake-down"]
        if row and row["state"] == "committed" and batch and "archive failed" in batch[0]["error"]:
            return row
        return None

    row = wait_until(stuck, 60, "the batch to be committed with the archive failing")
    assert row["rows"] == ROWS
    assert (env.staging / "lake-down").is_dir()  # kept until the lake has it
    blocker.unlink()
    done = d.wait_state("lake-down", {"done", "failed"}, timeout=90)
    assert done["state"] == "done"
    files = sorted(p.name for p in Path(done["lake_path"]).iterdir())
    assert len(files) == 2 * len(MODELS) + 1
    assert not (env.staging / "lake-down").exists()


def test_node_local_copies_of_batches_not_in_flight_are_purged_when_the_agent_says_hello(
    env, daemon
):
    """A purge lost to a crash leaves copies in node RAM; the next hello lists them and the
    daemon purges every batch that is not in flight."""
    leftover = env.tmpfs / "node0" / "gone-batch"
    leftover.mkdir(parents=True)
    (leftover / "slm-1.parquet").write_bytes(b"x" * 4096)
    d = daemon().start()
    wait_until(lambda: not leftover.exists(), 30, "the leftover copies to be purged")
    # Batches in flight keep theirs: a fresh batch still completes normally.
    from tests.system.test_flow import publish_all

    publish_all(env, "after-purge", seed=901)
    assert d.wait_state("after-purge", {"done", "failed"})["state"] == "done"
