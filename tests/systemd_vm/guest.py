"""Runs inside the systemd guest that vm.py boots, as a service (nc-driver.service), as root.

    python guest.py JOB_DIR

It installs numa-coordinator as docs/operations.md §1 tells an operator to, then exercises the
units under the real systemd (PID 1 of the guest), recording what it observes into
JOB_DIR/result.json; the checks are test_systemd_vm.py's. Every wait polls an observable thing
(a unit property, the daemon's status over its control socket, a journal line, the kernel's
per-node counters) with a deadline. A step that fails records its error and the run goes on
with the next group of checks where it can.

JOB_DIR/job.json: {root, pg: {host, port, user, password, database}, rows}.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

JOB = Path(sys.argv[1])
SPEC = json.loads((JOB / "job.json").read_text())
ROOT = Path(SPEC["root"])
sys.path.insert(0, str(ROOT))

from coordinator.ctl.client import call  # noqa: E402

UNITS = ROOT / "systemd"
OPT = Path("/opt/numa-coordinator")
ETC = Path("/etc/numa-coordinator")
SYSTEM = Path("/etc/systemd/system")
SOCK = Path("/run/numa-coordinator/control.sock")
STAGING = Path("/data/hot/staging")
SERVICE = "numa-coordinator.service"
AGENTS = ("numa-staging-agent@0.service", "numa-staging-agent@1.service")
MOUNTS = (r"dev-shm-numa\x2dcoordinator-node0.mount", r"dev-shm-numa\x2dcoordinator-node1.mount")
PRODUCER = "slm-producer"
# The watchdog of the unit is 30 s; the test shortens it with a drop-in so that a frozen daemon
# is found in seconds (the mechanism is the same).
WATCHDOG_S = 10
PROBE_MIB = 16

result: dict[str, Any] = {"errors": {}, "steps": {}, "log": []}


def uptime() -> float:
    """Seconds since the guest booted."""
    return float(Path("/proc/uptime").read_text().split()[0])


def note(msg: str) -> None:
    """Progress on the console (the driver's stdout goes to the journal and the console)."""
    line = f"[{uptime():7.1f}] {msg}"
    result["log"].append(line)
    print(line, flush=True)


def sh(*cmd: str, check: bool = True, timeout: float = 120, **kw: Any) -> str:
    """Run a command; its stdout+stderr. RuntimeError naming it when it fails and `check`."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    out = p.stdout + p.stderr
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {out.strip()[-2000:]}")
    return out


def run(*cmd: str, timeout: float = 120) -> dict[str, Any]:
    """Run a command, returning its exit code and output (for checks on both)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return {"rc": p.returncode, "out": p.stdout + p.stderr}


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll `pred` until it returns something truthy; TimeoutError naming `what`."""
    t_end = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = pred()
        except Exception as e:  # the thing polled may not be there yet
            value, last = None, e
        if value:
            return value
        if time.monotonic() > t_end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} ({last!r})")
        time.sleep(every)


def show(unit: str, *props: str) -> dict[str, str]:
    """systemctl show UNIT -p PROP...: the properties as a dict."""
    out = sh("systemctl", "show", unit, *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status() -> dict[str, Any]:
    """The daemon's status over its control socket (as `coordinatorctl status --json`)."""
    reply: dict[str, Any] = call(SOCK, "status", timeout=10)
    return reply


def journal(unit: str, since_usec: int = 0) -> list[dict[str, Any]]:
    """The unit's journal entries (both the unit's own lines and systemd's about it)."""
    out = sh("journalctl", "--no-pager", "-o", "json", "-u", unit)
    entries = []
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            e = json.loads(line)
            if int(e.get("__MONOTONIC_TIMESTAMP", 0)) >= since_usec:
                msg = e.get("MESSAGE")
                if isinstance(msg, list):  # non-UTF-8 bytes
                    msg = bytes(msg).decode(errors="replace")
                entries.append({"mono": int(e["__MONOTONIC_TIMESTAMP"]), "msg": msg or ""})
    return entries


def mono_usec() -> int:
    """CLOCK_MONOTONIC in microseconds (the journal's __MONOTONIC_TIMESTAMP)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def shmem_kb() -> dict[str, int]:
    """Shmem per NUMA node in kB, folded first (vm/stat_refresh) so deltas are exact."""
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/stat_refresh").write_text("1")
    out = {}
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        for line in (d / "meminfo").read_text().splitlines():
            parts = line.split()
            if parts[2] == "Shmem:":
                out[parts[1]] = int(parts[3])
    return out


@contextlib.contextmanager
def step(name: str, *, fatal: bool = False) -> Iterator[dict[str, Any]]:
    """Record a group of checks: its findings, its wall time and any error."""
    found: dict[str, Any] = {}
    result["steps"][name] = found
    note(f"step {name}")
    t0 = time.monotonic()
    try:
        yield found
    except Exception as e:
        result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        note(f"step {name} FAILED: {e}")
        if fatal:
            raise
    finally:
        found["wall_s"] = round(time.monotonic() - t0, 2)


# -- §1 step 1: the program -------------------------------------------------------------------


def install_program() -> dict[str, Any]:
    """docs §1 step 1, without a network: a venv at /opt/numa-coordinator made with the system
    Python, whose site-packages name this checkout (bound read-only under /opt, so the units'
    ProtectHome=/PrivateTmp= cannot hide it) and the checkout's installed dependencies, and the
    three commands, linked into /usr/bin as the docs say."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = shutil.which(f"python{ver}", path="/usr/bin")
    if python is None:
        raise RuntimeError(f"/usr/bin/python{ver} is missing (the checkout's venv is {ver})")
    sh(python, "-m", "venv", "--without-pip", str(OPT))
    deps = Path(sysconfig.get_paths()["purelib"])
    for src, dest in ((ROOT, OPT / "src"), (deps, OPT / "deps")):
        dest.mkdir()
        sh("mount", "--bind", str(src), str(dest))
        sh("mount", "-o", "remount,bind,ro", str(dest))
    site = OPT / "lib" / f"python{ver}" / "site-packages"
    (site / "numa_coordinator.pth").write_text(f"{OPT / 'src'}\n{OPT / 'deps'}\n")
    for tool, module in (
        ("coordinatord", "coordinator.daemon.main"),
        ("coordinatorctl", "coordinator.ctl.main"),
        ("staging-agent", "agents.agent"),
    ):
        script = OPT / "bin" / tool
        script.write_text(
            f"#!{OPT / 'bin' / 'python'}\nimport sys\nfrom {module} import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)
        link = Path("/usr/bin") / tool
        link.unlink(missing_ok=True)
        link.symlink_to(script)
    return {"python": python, "version": sh("coordinatorctl", "--help").splitlines()[0]}


# -- the checks -------------------------------------------------------------------------------


def install_user(found: dict[str, Any]) -> None:
    """§1 step 2: sysusers."""
    sh(
        "install",
        "-m",
        "0644",
        str(UNITS / "sysusers.d" / "numa-coordinator.conf"),
        "/usr/lib/sysusers.d/",
    )
    found["sysusers"] = run("systemd-sysusers", "numa-coordinator.conf")
    found["passwd"] = sh("getent", "passwd", "numa-coordinator").strip()
    # An SLM producer in the group, as `usermod -aG numa-coordinator alice` would make one.
    sh("useradd", "--system", "--no-create-home", "-G", "numa-coordinator", PRODUCER)


def install_mounts(found: dict[str, Any]) -> None:
    """§1 step 3: the mount units, enabled and started; a file written into each lands on its
    node (per-node Shmem)."""
    for m in MOUNTS:
        shutil.copy(UNITS / m, SYSTEM / m)
    sh("systemctl", "daemon-reload")
    found["enable"] = run("systemctl", "enable", "--now", *MOUNTS)
    for node in (0, 1):
        where = f"/dev/shm/numa-coordinator/node{node}"
        found[f"findmnt{node}"] = sh(
            "findmnt", "-n", "-o", "TARGET,FSTYPE,OPTIONS", where, check=False
        ).strip()
        found[f"active{node}"] = show(MOUNTS[node], "ActiveState", "SubState")
        probe = Path(where) / "probe"
        before = shmem_kb()
        with open(probe, "wb") as f:
            for _ in range(PROBE_MIB):
                f.write(b"\xa5" * (1 << 20))
        after = shmem_kb()
        probe.unlink()
        freed = shmem_kb()
        found[f"probe{node}"] = {
            "kb": PROBE_MIB * 1024,
            "delta": {n: after[n] - before[n] for n in after},
            "freed": {n: freed[n] - after[n] for n in after},
        }


def install_folders(found: dict[str, Any]) -> None:
    """§1 step 4: tmpfiles."""
    sh(
        "install",
        "-m",
        "0644",
        str(UNITS / "tmpfiles.d" / "numa-coordinator.conf"),
        "/usr/lib/tmpfiles.d/",
    )
    found["tmpfiles"] = run("systemd-tmpfiles", "--create", "numa-coordinator.conf")
    found["stat"] = {
        p: sh("stat", "-c", "%U:%G %a", p).strip()
        for p in (
            "/etc/numa-coordinator",
            "/data/hot/staging",
            "/data/lake",
            "/var/lib/numa-coordinator",
            "/dev/shm/numa-coordinator/node0",
            "/dev/shm/numa-coordinator/node1",
        )
    }


def install_config(found: dict[str, Any]) -> None:
    """§1 step 5: the config (the example, with an external PostgreSQL and its password as a
    credential), and the drop-ins of the service."""
    pg = SPEC["pg"]
    text = (ROOT / "config" / "coordinator.toml").read_text()
    dsn = f"postgresql://{pg['user']}@{pg['host']}:{pg['port']}/{pg['database']}"
    text, n = re.subn(
        r'(?m)^dsn = "".*$',
        f'dsn = "{dsn}"\npassword_file = "/run/credentials/{SERVICE}/db-password"',
        text,
    )
    if n != 1:
        raise RuntimeError("config/coordinator.toml has no 'dsn = \"\"' line to replace")
    tmp = JOB / "coordinator.toml"
    tmp.write_text(text)
    sh("install", "-m", "0640", "-g", "numa-coordinator", str(tmp), str(ETC) + "/")
    found["check_config"] = run(
        "coordinatorctl", "check-config", "--config", str(ETC / "coordinator.toml")
    )
    # install -m 0600 /dev/stdin /etc/numa-coordinator/db-password <<< 'the-password'
    sh("install", "-m", "0600", "/dev/stdin", str(ETC / "db-password"), input=pg["password"] + "\n")
    dropins = SYSTEM / f"{SERVICE}.d"
    dropins.mkdir(parents=True, exist_ok=True)
    # What `systemctl edit numa-coordinator` writes.
    (dropins / "override.conf").write_text(
        f"[Service]\nLoadCredential=db-password:{ETC / 'db-password'}\n"
    )
    (dropins / "50-test-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}s\n")


def start_units(found: dict[str, Any]) -> None:
    """§1 step 6: the units; the coordinator's start is watched until active, sampling
    systemd's state and the daemon's own `ready` together."""
    for unit in ("numa-coordinator.service", "numa-staging-agent@.service"):
        shutil.copy(UNITS / unit, SYSTEM / unit)
    sh("systemctl", "daemon-reload")
    found["enable"] = run("systemctl", "enable", SERVICE, *AGENTS)
    samples: list[dict[str, Any]] = []
    found["samples"] = samples
    lock = hold_leader_lock()
    t0 = time.monotonic()
    sh("systemctl", "start", "--no-block", SERVICE)

    def sample() -> bool:
        s = show(SERVICE, "ActiveState", "SubState", "StatusText")
        entry: dict[str, Any] = {"t": round(time.monotonic() - t0, 2), **s}
        try:
            st = status()["daemon"]
            entry["daemon_state"], entry["daemon_ready"] = st["state"], st["ready"]
        except Exception as e:
            entry["daemon"] = type(e).__name__
        samples.append(entry)
        if s["ActiveState"] == "failed":
            out = sh("systemctl", "status", SERVICE, check=False)
            raise RuntimeError(f"{SERVICE} failed: {out}")
        return s["ActiveState"] == "active"

    def standby_for_3_s() -> bool:
        sample()
        standby = [s["t"] for s in samples if s.get("daemon_state") == "standby"]
        return bool(standby) and standby[-1] - standby[0] >= 3.0

    try:
        wait_for(standby_for_3_s, 240, f"{SERVICE} in standby for 3 s", every=0.1)
    finally:
        found["lock_released_usec"] = mono_usec()
        release_leader_lock(lock)
    wait_for(sample, 120, f"{SERVICE} active", every=0.1)
    found["start_s"] = round(time.monotonic() - t0, 2)
    found["show"] = show(
        SERVICE,
        "Type",
        "MainPID",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
        "NRestarts",
        "StatusText",
        "WatchdogUSec",
    )
    found["status_text"] = sh("systemctl", "status", "--no-pager", "-n", "0", SERVICE, check=False)
    found["ready_logged"] = [e["msg"] for e in journal(SERVICE) if "coordinator ready" in e["msg"]]


def hold_leader_lock() -> subprocess.Popen[str]:
    """Another session holding the daemon's leader lock on the external server (psql of the
    pgserver package), so that the daemon stays in standby, without READY=1, until it ends."""
    import importlib.util

    from coordinator.daemon.ledger import lock_key

    pkg = importlib.util.find_spec("pgserver")
    assert pkg is not None and pkg.submodule_search_locations
    psql = Path(pkg.submodule_search_locations[0]) / "pginstall" / "bin" / "psql"
    pg = SPEC["pg"]
    p = subprocess.Popen(
        [
            str(psql),
            "-h",
            pg["host"],
            "-p",
            str(pg["port"]),
            "-U",
            pg["user"],
            "-d",
            pg["database"],
            "-qAtX",
            "-v",
            "ON_ERROR_STOP=1",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PGPASSWORD": pg["password"]},
    )
    assert p.stdin is not None and p.stdout is not None
    key = lock_key("numa_coordinator", socket.gethostname())  # the daemon's [host] id default
    p.stdin.write(f"SELECT 'locked', pg_advisory_lock({key});\n")
    p.stdin.flush()
    ready, _, _ = select.select([p.stdout], [], [], 120)
    line = p.stdout.readline() if ready else ""
    if not line.startswith("locked"):
        p.kill()
        raise RuntimeError(f"psql did not take the leader lock: {line!r}")
    return p


def release_leader_lock(p: subprocess.Popen[str]) -> None:
    """End the session that holds the leader lock."""
    assert p.stdin is not None
    with contextlib.suppress(OSError):
        p.stdin.write("\\q\n")
        p.stdin.close()
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()


def agents_ok() -> list[dict[str, Any]] | None:
    """The agents as status shows them, once both are connected."""
    agents = status()["agents"]
    return agents if agents and all(a.get("connected") for a in agents) else None


def check_agents(found: dict[str, Any]) -> None:
    """@0 and @1 run, connect and are bound to their nodes (their word and the kernel's)."""
    found["agents"] = wait_for(agents_ok, 180, "both agents connected")
    for unit in AGENTS:
        node = unit.split("@")[1].split(".")[0]
        s = show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
        pid = s["MainPID"]
        proc = Path("/proc") / pid
        policies = {
            line.split()[1]
            for line in (proc / "numa_maps").read_text().splitlines()
            if len(line.split()) > 1
        }
        fields = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines())
        found[f"node{node}"] = {
            **s,
            "cmdline": (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip(),
            "numa_policies": sorted(policies),
            "cpus_allowed": fields["Cpus_allowed_list"].strip(),
            "mems_allowed": fields["Mems_allowed_list"].strip(),
            "no_new_privs": fields["NoNewPrivs"].strip(),
            "seccomp": fields["Seccomp"].strip(),
            "cap_eff": fields["CapEff"].strip(),
            "user": sh("ps", "-o", "user=", "-p", pid).strip(),
        }


def publish(batch: str, models: list[str], seed: int) -> None:
    """The SLMs publish their results with the SDK, as a producer in the service's group.

    The batch folder is made first, group-writable (setgid comes from staging): the SDK makes
    it 0755, which the service user cannot write into (check_sdk_folder shows it). Where the
    SDK already makes it so, this changes nothing."""
    code = (
        "import os\n"
        "from agents.slm import publish\n"
        "from coordinator.ctl.demo import synthetic_batch\n"
        f"folder = os.path.join({str(STAGING)!r}, {batch!r})\n"
        "os.mkdir(folder, 0o770)\n"
        "os.chmod(folder, 0o2770)\n"
        f"_, tables = synthetic_batch({SPEC['rows']}, seed={seed})\n"
        f"for m in {models!r}:\n"
        f"    publish({str(STAGING)!r}, {batch!r}, m, tables[m])\n"
    )
    sh("runuser", "-u", PRODUCER, "--", str(OPT / "bin" / "python"), "-c", code, timeout=300)


def check_sdk_folder(found: dict[str, Any]) -> None:
    """docs §1: a producer in the group publishes into a staging folder made as tmpfiles makes
    it (2770 numa-coordinator); the agents (the service user) must then be able to write the
    cross-check files into the batch folder the SDK made. Done in a folder the daemon does not
    watch."""
    probe = Path("/data/hot/probe-staging")
    probe.mkdir()
    shutil.chown(probe, "numa-coordinator", "numa-coordinator")
    probe.chmod(0o2770)
    code = (
        "import pyarrow as pa\n"
        "from agents.slm import publish\n"
        "t = pa.table({'item_id': ['a'], 'prediction': ['x']})\n"
        f"publish({str(probe)!r}, 'probe-batch', 'slm-1', t)\n"
    )
    found["publish"] = run("runuser", "-u", PRODUCER, "--", str(OPT / "bin" / "python"), "-c", code)
    folder = probe / "probe-batch"
    found["folder"] = sh("stat", "-c", "%U:%G %a", str(folder), check=False).strip()
    found["service_writes"] = run(
        "runuser", "-u", "numa-coordinator", "--", "touch", str(folder / ".crosscheck-probe")
    )
    shutil.rmtree(probe, ignore_errors=True)


def ledger_state(batch: str) -> str | None:
    """The batch's state in the ledger (coordinatorctl show BATCH)."""
    try:
        row = call(SOCK, "show", batch_id=batch, timeout=10)
    except Exception:
        return None
    return str(row.get("state")) if isinstance(row, dict) else None


def wait_done(batch: str, timeout: float) -> dict[str, Any]:
    """Wait for the batch to be final in the ledger; its row and `coordinatorctl show`."""
    wait_for(
        lambda: ledger_state(batch) in ("done", "degraded", "failed"),
        timeout,
        f"batch {batch} final in the ledger",
        every=0.5,
    )
    row = call(SOCK, "show", batch_id=batch, timeout=10)
    return {
        "state": row.get("state"),
        "rows": row.get("rows"),
        "error": row.get("error"),
        "placement": row.get("placement"),
    }


def check_batch(found: dict[str, Any]) -> None:
    """A whole batch: 7 models published, the ledger says done."""
    models = status()["config"]["models"]
    found["models"] = models
    t0 = time.monotonic()
    publish("sd-batch-1", models, seed=11)
    found["publish_s"] = round(time.monotonic() - t0, 2)
    found["batch"] = wait_done("sd-batch-1", 300)
    found["batch_s"] = round(time.monotonic() - t0, 2)
    found["status"] = sh("coordinatorctl", "status", check=False)[-4000:]
    found["lake"] = sorted(str(p.relative_to("/data/lake")) for p in Path("/data/lake").rglob("*"))


def write_dropin(name: str, text: str) -> None:
    """A conf.d file, written under a temporary name and renamed into place (docs §3)."""
    confd = ETC / "conf.d"
    tmp = confd / f".{name}.tmp"
    tmp.write_text(text)
    os.chown(tmp, 0, int(sh("getent", "group", "numa-coordinator").split(":")[2]))
    tmp.chmod(0o640)
    tmp.rename(confd / name)


def check_reload(found: dict[str, Any]) -> None:
    """systemctl reload with a good drop-in (applied) and a broken one (refused, old config
    kept, the unit's status names the file and line)."""
    pid = show(SERVICE, "MainPID")["MainPID"]
    before = status()["config"]
    found["before"] = before
    write_dropin("50-deadline.toml", "[batch]\ndeadline_s = 900\n")
    found["good"] = run("systemctl", "reload", SERVICE)
    found["after_good"] = status()["config"]
    write_dropin("60-broken.toml", "[batch]\nqorum = 3\n")
    found["broken"] = run("systemctl", "reload", SERVICE)
    found["after_broken"] = status()["config"]
    found["unit_status"] = sh(
        "systemctl", "status", "--no-pager", "-l", "-n", "30", SERVICE, check=False
    )
    found["show"] = show(SERVICE, "ActiveState", "SubState", "MainPID", "StatusText")
    found["pid_before"] = pid
    (ETC / "conf.d" / "60-broken.toml").unlink()
    found["fixed"] = run("systemctl", "reload", SERVICE)


def check_watchdog(found: dict[str, Any]) -> None:
    """SIGSTOP the daemon: systemd's watchdog kills it and Restart= starts it again, with its
    agents."""
    s = show(SERVICE, "MainPID", "NRestarts", "WatchdogUSec")
    found["before"] = s
    agent_pids = {u: show(u, "MainPID")["MainPID"] for u in AGENTS}
    since = mono_usec()
    t0 = time.monotonic()
    os.kill(int(s["MainPID"]), 19)  # SIGSTOP: the event loop is frozen
    found["watchdog_line"] = wait_for(
        lambda: [e for e in journal(SERVICE, since) if "atchdog timeout" in e["msg"]],
        WATCHDOG_S * 3 + 30,
        "systemd's 'Watchdog timeout' line",
        every=0.5,
    )[0]["msg"]
    found["watchdog_after_s"] = round(time.monotonic() - t0, 2)

    def restarted() -> dict[str, str] | None:
        now = show(SERVICE, "MainPID", "NRestarts", "ActiveState", "SubState")
        ok = now["ActiveState"] == "active" and now["MainPID"] not in ("0", s["MainPID"])
        return now if ok else None

    found["after"] = wait_for(restarted, 240, f"{SERVICE} restarted and active")
    found["active_again_s"] = round(time.monotonic() - t0, 2)
    found["journal"] = [e["msg"] for e in journal(SERVICE, since) if not e["msg"].startswith("{")]
    found["agents"] = wait_for(agents_ok, 180, "both agents connected after the restart")
    found["agent_pids"] = {u: (agent_pids[u], show(u, "MainPID")["MainPID"]) for u in AGENTS}


def check_agent_kill(found: dict[str, Any]) -> None:
    """SIGKILL an agent while a batch is in flight: systemd restarts it and the batch completes."""
    unit = AGENTS[1]
    before = show(unit, "MainPID", "NRestarts")
    found["before"] = before
    models = status()["config"]["models"]
    publish("sd-batch-2", models, seed=12)

    def in_flight() -> str | None:
        state = ledger_state("sd-batch-2")
        return state if state not in (None, "waiting") else None

    found["state_at_kill"] = wait_for(in_flight, 120, "sd-batch-2 past waiting", every=0.1)
    found["kill"] = run("systemctl", "kill", "--signal=SIGKILL", unit)

    def restarted() -> dict[str, str] | None:
        now = show(unit, "MainPID", "NRestarts", "ActiveState", "Result")
        ok = now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])
        return now if ok else None

    found["after"] = wait_for(restarted, 120, f"{unit} restarted")
    found["batch"] = wait_done("sd-batch-2", 300)
    found["journal"] = [e["msg"] for e in journal(unit) if not e["msg"].startswith("{")][-20:]


def check_credential(found: dict[str, Any]) -> None:
    """The password came as a credential: the file is where the config says, the daemon is
    connected to the external server, and the password is in no log line."""
    cred = Path(f"/run/credentials/{SERVICE}/db-password")
    found["credential"] = {
        "exists": cred.is_file(),
        "stat": sh("stat", "-c", "%U %a", str(cred), check=False).strip(),
    }
    found["database"] = status()["database"]
    text = "\n".join(e["msg"] for u in (SERVICE, *AGENTS) for e in journal(u))
    found["password_in_journal"] = SPEC["pg"]["password"] in text
    found["password_in_config"] = SPEC["pg"]["password"] in (ETC / "coordinator.toml").read_text()


def check_hardening(found: dict[str, Any]) -> None:
    """What the kernel says of the running daemon, and systemd-analyze security online."""
    pid = show(SERVICE, "MainPID")["MainPID"]
    fields = dict(
        line.split(":\t", 1) for line in (Path("/proc") / pid / "status").read_text().splitlines()
    )
    found["daemon"] = {
        k: fields[k].strip() for k in ("NoNewPrivs", "Seccomp", "CapEff", "CapBnd", "Uid")
    }
    found["user"] = sh("ps", "-o", "user=", "-p", pid).strip()
    for unit in (SERVICE, AGENTS[0]):
        out = sh("systemd-analyze", "security", "--no-pager", unit, check=False)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out)
        found[f"exposure {unit}"] = float(m.group(1)) if m else out[-1000:]
    found["dropins"] = sorted(
        p.name for p in SYSTEM.glob("*.d/*.conf") if p.parent.name.startswith("numa-")
    )


def check_stop(found: dict[str, Any]) -> None:
    """systemctl stop of the coordinator stops the agents (BindsTo=)."""
    found["stop"] = run("systemctl", "stop", SERVICE, timeout=120)
    found["after"] = {u: show(u, "ActiveState")["ActiveState"] for u in (SERVICE, *AGENTS)}


def main() -> int:
    """Every group in turn; result.json is written whatever happens."""
    result["started_s"] = uptime()
    result["pid1"] = Path("/proc/1/comm").read_text().strip()
    try:
        with step("install_program", fatal=True) as found:
            found.update(install_program())
        with step("sysusers", fatal=True) as found:
            install_user(found)
        with step("mounts") as found:
            install_mounts(found)
        with step("tmpfiles", fatal=True) as found:
            install_folders(found)
        with step("config", fatal=True) as found:
            install_config(found)
        with step("start", fatal=True) as found:
            start_units(found)
        with step("agents") as found:
            check_agents(found)
        with step("batch") as found:
            check_batch(found)
        with step("sdk_folder") as found:
            check_sdk_folder(found)
        with step("reload") as found:
            check_reload(found)
        with step("credential") as found:
            check_credential(found)
        with step("hardening") as found:
            check_hardening(found)
        with step("watchdog") as found:
            check_watchdog(found)
        with step("agent_kill") as found:
            check_agent_kill(found)
        with step("stop") as found:
            check_stop(found)
    except Exception as e:
        result["errors"].setdefault("fatal", f"{type(e).__name__}: {e}")
    finally:
        result["finished_s"] = uptime()
        for unit in (SERVICE, *AGENTS):
            result.setdefault("journals", {})[unit] = [e["msg"][:400] for e in journal(unit)][-60:]
        tmp = JOB / ".result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.rename(JOB / "result.json")
        note("result written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
