"""daemon.status: the typed snapshot and the JSON that `coordinatorctl status` shows."""

from __future__ import annotations

import dataclasses

from coordinator.core.batch import State
from coordinator.daemon.status import (
    AgentInfo,
    ConfigInfo,
    DaemonInfo,
    DatabaseInfo,
    ReloadInfo,
    Status,
    WatcherInfo,
)

RELOAD = {"at": None, "ok": True, "error": "", "last_success_at": 1.0}


def snapshot(batches: tuple[dict[str, object], ...] = ()) -> Status:
    return Status(
        daemon=DaemonInfo("running", True, 42, 1.5, "0.1.0", False, started_at=100.0),
        config=ConfigInfo(
            3, ("/etc/c.toml",), ReloadInfo.from_json(RELOAD), ("a", "b"), 2, 60.0, 0.9, "/s"
        ),
        watcher=WatcherInfo(
            True, 5, 2.0, 1, 1, 3.0, 0, {"x": 1}, {"y": 2}, 0, None, 0, recovered_by_reconcile=7
        ),
        agents=(
            AgentInfo.from_hub({"node": 0, "connected": False, "restarts": 2}, None),
            AgentInfo.from_hub(
                {
                    "node": 1,
                    "connected": True,
                    "restarts": 0,
                    "pid": 9,
                    "cpus": "1",
                    "mems": "1",
                    "policy": "bind",
                    "connected_at": 4.0,
                    "last_heartbeat_age_s": 0.5,
                    "tmpfs_used": 10,
                    "tmpfs_free": 20,
                },
                0.99,
            ),
        ),
        database=DatabaseInfo(True, "postgresql://u:***@h/db", "nc", True, True, "", 4),
        batches=batches,
    )


def test_the_json_has_exactly_the_documented_fields_and_no_metrics_only_ones() -> None:
    got = snapshot().to_json()
    assert set(got) == {
        "daemon", "config", "watcher", "agents", "database", "batches", "finished",
        "agents_refused",
    }  # fmt: skip
    assert got["agents_refused"] == {}
    assert set(got["daemon"]) == {
        "host", "state", "ready", "pid", "uptime_s", "version", "with_agents"
    }  # fmt: skip
    assert set(got["config"]) == {
        "generation", "files", "last_reload", "models", "quorum", "deadline_s"
    }  # fmt: skip
    assert got["config"]["last_reload"] == RELOAD
    assert set(got["watcher"]) == {
        "armed", "events", "last_event", "reconcile_scans", "reconciled", "last_reconcile",
        "watcher_restarts", "rejected", "quarantined", "quarantine_failed",
        "quarantine_refused", "scan_errors",
    }  # fmt: skip
    assert set(got["database"]) == {
        "embedded", "dsn", "schema", "connected", "leader", "epoch", "last_error"
    }  # fmt: skip


def test_refused_agent_connections_show_as_a_count_per_reason() -> None:
    st = dataclasses.replace(snapshot(), agents_refused={"certificate": 2, "name": 1})
    assert st.to_json()["agents_refused"] == {"certificate": 2, "name": 1}


def test_an_agent_shows_its_process_only_while_connected() -> None:
    gone, here = snapshot().to_json()["agents"]
    assert gone == {"node": 0, "connected": False, "restarts": 2, "last_placement": None}
    assert here["connected"] is True and here["pid"] == 9 and here["last_placement"] == 0.99
    assert set(here) == {
        "node", "pid", "cpus", "mems", "policy", "connected", "connected_at",
        "last_heartbeat_age_s", "tmpfs_used", "tmpfs_free", "restarts", "last_placement",
    }  # fmt: skip


def test_batches_in_flight_are_counted_by_state() -> None:
    st = snapshot(({"state": "staging"}, {"state": "waiting"}, {"state": "staging"}))
    assert st.in_flight_by_state() == {State.STAGING: 2, State.WAITING: 1}
    assert snapshot().in_flight_by_state() == {}
