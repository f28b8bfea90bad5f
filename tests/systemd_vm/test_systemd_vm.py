"""The units of systemd/ under a real systemd: PID 1 of a two-node QEMU guest (vm.py), which
installs them as docs/operations.md §1 tells an operator to and exercises them (guest.py).

One boot for the module (about 3 to 6 minutes under TCG on 2 cores): an external PostgreSQL with
a password runs on the host's 127.0.0.1 (pg.py), reached from the guest through QEMU's user
network; the guest's root is an overlay over the host's, read-only, so the host is not changed.

Needs qemu-system-x86_64 (Debian: qemu-system-x86) and a static busybox (busybox-static); the
first run fetches the Debian kernel package with apt-get download and caches it under
tests/systemd_vm/.cache/. systemd itself comes from the host's root (Debian: systemd).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests import early
from tests.systemd_vm import pg, vm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        shutil.which(vm.QEMU) is None,
        reason=f"{vm.QEMU} not installed (Debian package qemu-system-x86)",
    ),
    pytest.mark.skipif(
        not Path("/lib/systemd/systemd").exists(),
        reason="/lib/systemd/systemd not installed (Debian package systemd)",
    ),
]

ROWS = 2000
PAGE_KB = 4
SLACK_KB = 64
MAX_EXPOSURE = 2.5
SERVICE = "numa-coordinator.service"
AGENTS = ("numa-staging-agent@0.service", "numa-staging-agent@1.service")


async def ledger_rows(dsn: str) -> dict[str, dict[str, Any]]:
    """The ledger as the external server holds it, read from the host."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT batch_id, state, rows FROM numa_coordinator.batches")
    finally:
        await conn.close()
    return {r["batch_id"]: dict(r) for r in rows}


async def refused_without_password(dsn: str) -> str:
    """The server's answer to a connection without a password."""
    try:
        conn = await asyncpg.connect(dsn, password="")
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    await conn.close()
    return ""


def boot() -> dict[str, Any]:
    """The guest's findings, plus the host's view of the external database afterwards."""
    with pg.server() as server:
        result = vm.boot({"pg": server, "rows": ROWS}, timeout=840)
        result["host_ledger"] = asyncio.run(ledger_rows(server["local_dsn"]))
        result["host_no_password"] = asyncio.run(refused_without_password(server["nopassword_dsn"]))
        result["pg_password"] = server["password"]
        return result


early.register(__name__, boot)  # boots while the rest of the suite runs


@pytest.fixture(scope="module")
def guest() -> dict[str, Any]:
    """One boot for the whole module (see boot)."""
    try:
        result: dict[str, Any] = early.result(__name__)
    except vm.VMError as e:
        pytest.fail(str(e))
    return result


def step(guest: dict[str, Any], name: str) -> dict[str, Any]:
    """One group of the guest's findings; fails with the guest's error if it had one."""
    assert name not in guest["errors"], guest["errors"][name]
    found: dict[str, Any] = guest["steps"][name]
    return found


def test_systemd_is_pid_1_and_every_step_ran(guest: dict[str, Any]) -> None:
    assert guest["pid1"] == "systemd"
    assert "fatal" not in guest["errors"], guest["errors"]["fatal"] + guest["console"]


def test_sysusers_makes_the_service_user(guest: dict[str, Any]) -> None:
    found = step(guest, "sysusers")
    assert found["sysusers"]["rc"] == 0, found["sysusers"]
    name, _, _, _, _, home, shell = found["passwd"].split(":")
    assert (name, home, shell) == (
        "numa-coordinator",
        "/var/lib/numa-coordinator",
        "/usr/sbin/nologin",
    )


@pytest.mark.parametrize("node", [0, 1])
def test_the_mount_unit_mounts_a_tmpfs_bound_to_its_node(guest: dict[str, Any], node: int) -> None:
    found = step(guest, "mounts")
    assert found["enable"]["rc"] == 0, found["enable"]
    assert found[f"active{node}"] == {"ActiveState": "active", "SubState": "mounted"}
    target, fstype, options = found[f"findmnt{node}"].split()
    assert (target, fstype) == (f"/dev/shm/numa-coordinator/node{node}", "tmpfs")
    assert f"mpol=bind:{node}" in options.split(","), options


@pytest.mark.parametrize("node", [0, 1])
def test_a_file_written_into_the_node_tmpfs_lands_on_that_node(
    guest: dict[str, Any], node: int
) -> None:
    """Written by root, whose own policy is the default (local to the CPU it runs on): the
    mount's mpol=bind:N alone puts the pages on node N (the kernel's per-node Shmem)."""
    probe = step(guest, "mounts")[f"probe{node}"]
    kb, delta, freed = probe["kb"], probe["delta"], probe["freed"]
    assert abs(delta[str(node)] - kb) <= SLACK_KB, delta
    assert abs(delta[str(1 - node)]) <= SLACK_KB, delta
    assert abs(freed[str(node)] + kb) <= SLACK_KB, freed


def test_tmpfiles_makes_the_folders_with_the_documented_owners_and_modes(
    guest: dict[str, Any],
) -> None:
    found = step(guest, "tmpfiles")
    assert found["tmpfiles"]["rc"] == 0, found["tmpfiles"]
    nc = "numa-coordinator"
    assert found["stat"] == {
        "/etc/numa-coordinator": f"root:{nc} 750",
        "/data/hot/staging": f"{nc}:{nc} 2770",
        "/data/lake": f"{nc}:{nc} 750",
        "/var/lib/numa-coordinator": f"{nc}:{nc} 750",
        "/dev/shm/numa-coordinator/node0": f"{nc}:{nc} 750",
        "/dev/shm/numa-coordinator/node1": f"{nc}:{nc} 750",
    }


def test_check_config_accepts_the_installed_config(guest: dict[str, Any]) -> None:
    found = step(guest, "config")
    assert found["check_config"]["rc"] == 0, found["check_config"]
    assert "configuration ok" in found["check_config"]["out"]


def test_the_coordinator_is_active_only_after_it_says_ready(guest: dict[str, Any]) -> None:
    """Type=notify: while another session holds the leader lock the daemon answers `standby`
    and systemd keeps the unit `activating`; once the lock is free the daemon sends READY=1 and
    only then is the unit `active (running)`."""
    found = step(guest, "start")
    assert found["enable"]["rc"] == 0, found["enable"]
    samples = found["samples"]
    standby = [s for s in samples if s.get("daemon_state") == "standby"]
    assert standby, samples
    assert all(s["ActiveState"] == "activating" and not s["daemon_ready"] for s in standby)
    assert max(s["t"] for s in standby) - min(s["t"] for s in standby) >= 3.0, standby
    assert any("standby" in s["StatusText"] for s in standby), standby
    active = [s for s in samples if s["ActiveState"] == "active"]
    assert active, samples
    # systemd was asked first in each sample, so active implies the daemon was ready already.
    assert all(s.get("daemon_ready") is True for s in active), active
    assert samples.index(active[0]) > samples.index(standby[-1])
    show = found["show"]
    assert show["Type"] == "notify"
    assert int(show["ActiveEnterTimestampMonotonic"]) >= int(found["lock_released_usec"])
    assert found["ready_logged"], "no 'coordinator ready' line in the unit's journal"
    assert "active (running)" in found["status_text"]


@pytest.mark.parametrize("node", [0, 1])
def test_each_agent_runs_bound_to_its_node(guest: dict[str, Any], node: int) -> None:
    found = step(guest, "agents")
    agent = next(a for a in found["agents"] if a["node"] == node)
    assert (agent["connected"], agent["policy"], agent["mems"], agent["cpus"]) == (
        True,
        "bind",
        [node],
        [node],
    )
    proc = found[f"node{node}"]
    assert (proc["ActiveState"], proc["SubState"]) == ("active", "running")
    assert proc["user"] == "numa-coordinator"
    assert f"--node {node}" in proc["cmdline"]
    # The kernel's word: the CPUs it may run on, and the memory policy of its mappings.
    assert proc["cpus_allowed"] == str(node)
    assert f"bind:{node}" in proc["numa_policies"], proc["numa_policies"]
    assert f"bind:{1 - node}" not in proc["numa_policies"], proc["numa_policies"]
    assert (proc["no_new_privs"], proc["seccomp"], proc["cap_eff"]) == ("1", "2", "0" * 16)


def test_a_batch_of_seven_models_completes(guest: dict[str, Any]) -> None:
    found = step(guest, "batch")
    assert found["models"] == [f"slm-{i}" for i in range(1, 8)]
    batch = found["batch"]
    assert (batch["state"], batch["rows"]) == ("done", ROWS), batch
    assert batch["placement"]["0"]["fraction"] == 1.0, batch["placement"]
    assert batch["placement"]["1"]["fraction"] == 1.0, batch["placement"]
    assert any(p.endswith("aggregates.parquet") for p in found["lake"]), found["lake"]
    assert guest["host_ledger"]["sd-batch-1"]["state"] == "done", guest["host_ledger"]


def test_the_sdk_makes_batch_folders_the_service_can_write_into(guest: dict[str, Any]) -> None:
    """A producer in the group publishes with the SDK into staging as tmpfiles makes it; the
    agents, as the service user, write their cross-check files into that batch folder."""
    found = step(guest, "sdk_folder")
    assert found["publish"]["rc"] == 0, found["publish"]
    assert found["service_writes"]["rc"] == 0, (
        f"the batch folder the SDK made is {found['folder']}: the service user cannot write "
        f"into it ({found['service_writes']['out'].strip()})"
    )


def test_reload_applies_a_good_drop_in(guest: dict[str, Any]) -> None:
    found = step(guest, "reload")
    assert found["good"]["rc"] == 0, found["good"]
    before, after = found["before"], found["after_good"]
    assert after["deadline_s"] == 900 and before["deadline_s"] == 600
    assert after["generation"] > before["generation"]
    assert "/etc/numa-coordinator/conf.d/50-deadline.toml" in after["files"]


def test_reload_refuses_a_broken_drop_in_keeps_the_config_and_names_file_and_line(
    guest: dict[str, Any],
) -> None:
    found = step(guest, "reload")
    assert found["broken"]["rc"] != 0, found["broken"]
    good, after = found["after_good"], found["after_broken"]
    assert (after["generation"], after["deadline_s"]) == (good["generation"], 900)
    assert after["last_reload"]["ok"] is False
    where = "/etc/numa-coordinator/conf.d/60-broken.toml:2"
    assert where in found["unit_status"], found["unit_status"]
    assert where in found["show"]["StatusText"]
    assert found["show"]["ActiveState"] == "active"
    assert found["show"]["MainPID"] == found["pid_before"]
    assert found["fixed"]["rc"] == 0, found["fixed"]


def test_the_watchdog_kills_a_frozen_daemon_and_systemd_restarts_it(guest: dict[str, Any]) -> None:
    found = step(guest, "watchdog")
    before, after = found["before"], found["after"]
    assert before["NRestarts"] == "0"  # no watchdog kill before the daemon was frozen
    assert "Watchdog timeout" in found["watchdog_line"]
    assert any("Killing process" in m and "SIGABRT" in m for m in found["journal"])
    assert any("Failed with result 'watchdog'" in m for m in found["journal"])
    assert after["NRestarts"] == "1" and after["MainPID"] != before["MainPID"]
    # The agents, BindsTo= and wanted by the coordinator, came back with it and reconnected.
    for unit, (old, new) in found["agent_pids"].items():
        assert new not in ("0", old), unit
    assert all(a["connected"] for a in found["agents"])


def test_an_agent_killed_in_a_batch_is_restarted_and_the_batch_completes(
    guest: dict[str, Any],
) -> None:
    found = step(guest, "agent_kill")
    assert found["state_at_kill"] not in ("done", "degraded", "failed"), found
    assert found["kill"]["rc"] == 0, found["kill"]
    after = found["after"]
    assert int(after["NRestarts"]) >= 1 and after["MainPID"] != found["before"]["MainPID"]
    assert (found["batch"]["state"], found["batch"]["rows"]) == ("done", ROWS), found["batch"]
    assert guest["host_ledger"]["sd-batch-2"]["state"] == "done", guest["host_ledger"]


def test_load_credential_gives_the_daemon_the_database_password(guest: dict[str, Any]) -> None:
    found = step(guest, "credential")
    assert found["credential"] == {"exists": True, "stat": "numa-coordinator 400"}
    db = found["database"]
    assert (db["embedded"], db["connected"], db["leader"]) == (False, True, True), db
    assert db["dsn"].startswith("postgresql://coordinator@10.0.2.2:"), db
    assert not found["password_in_journal"] and not found["password_in_config"]
    assert guest["pg_password"] not in db["dsn"]
    # The server does want the password: without it, a connection is refused.
    assert "password authentication failed" in guest["host_no_password"]


def test_the_hardening_is_in_force_on_the_running_daemon(guest: dict[str, Any]) -> None:
    found = step(guest, "hardening")
    d = found["daemon"]
    assert (d["NoNewPrivs"], d["Seccomp"], d["CapEff"], d["CapBnd"]) == (
        "1",
        "2",
        "0" * 16,
        "0" * 16,
    )
    assert found["user"] == "numa-coordinator"
    for unit in (SERVICE, AGENTS[0]):
        assert found[f"exposure {unit}"] <= MAX_EXPOSURE, found
    # Only the credential and the test's shorter watchdog were added to the shipped units.
    assert found["dropins"] == ["50-test-watchdog.conf", "override.conf"]


def test_stopping_the_coordinator_stops_its_agents(guest: dict[str, Any]) -> None:
    found = step(guest, "stop")
    assert found["stop"]["rc"] == 0, found["stop"]
    assert set(found["after"].values()) == {"inactive"}, found["after"]
