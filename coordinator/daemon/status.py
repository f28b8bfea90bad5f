"""What the daemon is doing, as one typed snapshot: `coordinatorctl status` shows its JSON form
(docs/operations.md lists every field), and the metrics collector reads the same snapshot at
each scrape (`coordinator.daemon.metrics`), so the two never disagree.

Pure data: the daemon builds a `Status` from its parts (`Daemon.status`); `to_json` gives the
control socket's form. A few fields are for the metrics only and are not in the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.core.batch import State


@dataclass(frozen=True)
class DaemonInfo:
    state: str  # starting, connecting, standby, running, degraded, stopping, stopped
    ready: bool
    pid: int
    uptime_s: float
    version: str
    with_agents: bool
    started_at: float  # Unix time (metrics only)
    host: str = ""  # [host] id: whose batches this coordinator works on in the shared ledger

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "state": self.state,
            "ready": self.ready,
            "pid": self.pid,
            "uptime_s": self.uptime_s,
            "version": self.version,
            "with_agents": self.with_agents,
        }


@dataclass(frozen=True)
class ReloadInfo:
    at: float | None  # the last reload tried (Unix time), None when none was
    ok: bool
    error: str
    last_success_at: float | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReloadInfo:
        return cls(d["at"], bool(d["ok"]), str(d["error"]), d.get("last_success_at"))

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "ok": self.ok,
            "error": self.error,
            "last_success_at": self.last_success_at,
        }


@dataclass(frozen=True)
class ConfigInfo:
    generation: int
    files: tuple[str, ...]
    last_reload: ReloadInfo
    models: tuple[str, ...]
    quorum: int
    deadline_s: float
    placement_min_fraction: float  # metrics only
    staging: str  # metrics only: the filesystem whose free space is reported

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "files": list(self.files),
            "last_reload": self.last_reload.to_json(),
            "models": list(self.models),
            "quorum": self.quorum,
            "deadline_s": self.deadline_s,
        }


@dataclass(frozen=True)
class WatcherInfo:
    armed: bool
    events: int
    last_event: float | None
    reconcile_scans: int
    reconciled: int
    last_reconcile: float | None
    watcher_restarts: int
    rejected: Mapping[str, int]
    quarantined: Mapping[str, int]
    quarantine_failed: int
    quarantine_refused: str | None
    scan_errors: int
    recovered_by_reconcile: int  # metrics only

    def to_json(self) -> dict[str, Any]:
        return {
            "armed": self.armed,
            "events": self.events,
            "last_event": self.last_event,
            "reconcile_scans": self.reconcile_scans,
            "reconciled": self.reconciled,
            "last_reconcile": self.last_reconcile,
            "watcher_restarts": self.watcher_restarts,
            "rejected": dict(self.rejected),
            "quarantined": dict(self.quarantined),
            "quarantine_failed": self.quarantine_failed,
            "quarantine_refused": self.quarantine_refused,
            "scan_errors": self.scan_errors,
        }


@dataclass(frozen=True)
class AgentInfo:
    """One configured node's agent; the fields after `last_placement` only while connected."""

    node: int
    connected: bool
    restarts: int
    last_placement: float | None  # fraction of the last staged batch on the node's memory
    pid: int | None = None
    cpus: str | None = None
    mems: str | None = None
    policy: str | None = None
    connected_at: float | None = None
    last_heartbeat_age_s: float | None = None
    tmpfs_used: int | None = None
    tmpfs_free: int | None = None

    @classmethod
    def from_hub(cls, d: Mapping[str, Any], last_placement: float | None) -> AgentInfo:
        """From the hub's description of a node's agent (`Hub.describe`)."""
        return cls(
            node=int(d["node"]),
            connected=bool(d["connected"]),
            restarts=int(d.get("restarts", 0)),
            last_placement=last_placement,
            pid=d.get("pid"),
            cpus=d.get("cpus"),
            mems=d.get("mems"),
            policy=d.get("policy"),
            connected_at=d.get("connected_at"),
            last_heartbeat_age_s=d.get("last_heartbeat_age_s"),
            tmpfs_used=d.get("tmpfs_used"),
            tmpfs_free=d.get("tmpfs_free"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node}
        if self.connected:
            out |= {
                "pid": self.pid,
                "cpus": self.cpus,
                "mems": self.mems,
                "policy": self.policy,
                "connected": True,
                "connected_at": self.connected_at,
                "last_heartbeat_age_s": self.last_heartbeat_age_s,
                "tmpfs_used": self.tmpfs_used,
                "tmpfs_free": self.tmpfs_free,
            }
        else:
            out["connected"] = False
        out["restarts"] = self.restarts
        out["last_placement"] = self.last_placement
        return out


@dataclass(frozen=True)
class DatabaseInfo:
    embedded: bool
    dsn: str  # the password redacted
    schema: str
    connected: bool
    leader: bool
    last_error: str
    queued_writes: int  # metrics only: state changes waiting to be written
    epoch: int | None = None  # the host's leader epoch this process leads with (None: never led)

    def to_json(self) -> dict[str, Any]:
        return {
            "embedded": self.embedded,
            "dsn": self.dsn,
            "schema": self.schema,
            "connected": self.connected,
            "leader": self.leader,
            "epoch": self.epoch,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class Status:
    """Everything `coordinatorctl status` shows, and what the metrics read at a scrape."""

    daemon: DaemonInfo
    config: ConfigInfo
    watcher: WatcherInfo
    agents: tuple[AgentInfo, ...]
    database: DatabaseInfo
    # A batch in flight as `BatchRun.describe` gives it; the finished ones also carry
    # finished_at and timings.
    batches: tuple[Mapping[str, Any], ...] = ()
    finished: tuple[Mapping[str, Any], ...] = ()
    # Connections refused before they became an agent, by reason (hub.Hub.refused).
    agents_refused: Mapping[str, int] = field(default_factory=dict)

    def in_flight_by_state(self) -> dict[State, int]:
        """How many batches in flight are in each state."""
        out: dict[State, int] = {}
        for b in self.batches:
            s = State(b["state"])
            out[s] = out.get(s, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "daemon": self.daemon.to_json(),
            "config": self.config.to_json(),
            "watcher": self.watcher.to_json(),
            "agents": [a.to_json() for a in self.agents],
            "database": self.database.to_json(),
            "batches": [dict(b) for b in self.batches],
            "finished": [dict(b) for b in self.finished],
            "agents_refused": dict(self.agents_refused),
        }
