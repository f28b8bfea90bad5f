"""Runs inside the two-node guest for test_remote_agents.py: the real staging agents of nodes 0
and 1, each connected over TCP (+TLS) to the real coordinator on the host.

    python remote_guest.py JOB_DIR

JOB_DIR (a writable 9p share) holds job.json, written by the host:

- probe: {port, token}: first, before any agent, the guest opens a plain TCP connection to
  10.0.2.2:port (QEMU's user-mode network maps it to the host's 127.0.0.1:port), sends the
  token and reads the host's answer: the network, proved on its own;
- agents: null, or {connect, config, tls_cert: {node: path}, tls_key: {node: path}, tls_ca,
  wait_s}: start, as the daemon does, `numactl --membind=N --cpunodebind=N python -m
  agents.agent --node N --config CONFIG --connect URL --tls-cert ... --tls-key ... --tls-ca
  ...` for N = 0 and 1 (node 0's tmpfs a plain tmpfs, placed by the agent's bound policy;
  node 1's mounted with mpol=bind:1, as the systemd units do), then wait until the host writes
  JOB_DIR/stop (or both agents have exited, or wait_s has passed) and stop them with SIGTERM;
  agents.k8s: null, or {node: argv}: then, in the same guest, the agent command lines of the
  k8s DaemonSets (`plan --k8s`), run as given until the host writes JOB_DIR/stop2
  (run_k8s_agents), their logs JOB_DIR/k8s-agent-node<N>.log.

Meanwhile a sampler reads the kernel's per-node Shmem four times a second: what the batch's
copies took on each node, seen from inside the guest. Everything goes to JOB_DIR/result.json:
{net, probe, topology, exit, shmem_kb: {baseline, peak, last}, k8s?: {exit, stopped_by,
shmem_kb}, error?}. The agents' logs are
JOB_DIR/agent-node<N>.log.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

JOB = Path(sys.argv[1])
SPEC = json.loads((JOB / "job.json").read_text())
ROOT = Path(SPEC["root"])
WORK = Path("/run/nvm")
from guestlib import mount_tmpfs, shmem_kb, topology, uptime  # noqa: E402

HOST = "10.0.2.2"  # the host's loopback, as QEMU's user-mode network presents it


def network() -> dict[str, Any]:
    """eth0's IPv4 address and the default gateway, from the kernel's tables."""
    routes = Path("/proc/net/route").read_text().splitlines()[1:]
    gateway = ""
    for line in routes:
        f = line.split()
        if f[1] == "00000000":  # the default route; the gateway in little-endian hex
            gateway = socket.inet_ntoa(int(f[2], 16).to_bytes(4, "little"))
    return {"interfaces": sorted(os.listdir("/sys/class/net")), "gateway": gateway}


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One plain TCP exchange with the host's loopback listener."""
    t0 = time.monotonic()
    with socket.create_connection((HOST, spec["port"]), timeout=60) as s:
        s.sendall(spec["token"].encode() + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        return {
            "local": s.getsockname()[0],
            "answer": answer.decode().strip(),
            "seconds": round(time.monotonic() - t0, 3),
        }


class Sampler(threading.Thread):
    """Per-node Shmem, sampled until stopped: the baseline, the peak and the last reading."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.baseline = shmem_kb()
        self.peak = dict(self.baseline)
        self.last = dict(self.baseline)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.last = shmem_kb()
            self.peak = {n: max(self.peak[n], kb) for n, kb in self.last.items()}

    def stop(self) -> dict[str, dict[str, int]]:
        self.done.set()
        self.join()
        # The per-node counters lag a little behind the per-CPU ones; fold them for the last.
        try:
            Path("/proc/sys/vm/stat_refresh").write_text("1")
        except OSError:
            time.sleep(2.0)
        self.last = shmem_kb()
        return {"baseline": self.baseline, "peak": self.peak, "last": self.last}


def start_agent(node: int, spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    """The real staging agent for `node` under numactl bound to that node, connected to the
    host's coordinator over TCP+TLS with the node's own certificate; logs to the job."""
    log = open(JOB / f"agent-node{node}.log", "wb")
    cmd = ["numactl", f"--membind={node}", f"--cpunodebind={node}", sys.executable]
    cmd += ["-m", "agents.agent", "--node", str(node), "--config", spec["config"]]
    cmd += ["--connect", spec["connect"], "--tls-ca", spec["tls_ca"]]
    cmd += ["--tls-cert", spec["tls_cert"][str(node)], "--tls-key", spec["tls_key"][str(node)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def run_agents(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """Start both agents, wait for the host's word to stop (or for both to have exited), stop
    them; their exit statuses go to result["exit"]."""
    mount_tmpfs(WORK / "n0", "size=256m,mode=0750")
    mount_tmpfs(WORK / "n1", "size=256m,mode=0750,mpol=bind:1")
    sampler = Sampler()
    sampler.start()
    procs = {str(n): start_agent(n, spec) for n in (0, 1)}
    result["agents_started_s"] = uptime()
    serve_until(procs, JOB / "stop", float(spec["wait_s"]), sampler, result)


def serve_until(
    procs: dict[str, subprocess.Popen[bytes]],
    stop: Path,
    wait_s: float,
    sampler: Sampler,
    out: dict[str, Any],
) -> None:
    """Let the agents run until the host writes `stop` (or `wait_s` passed, or all exited),
    then SIGTERM them: how it stopped, their exit statuses and the Shmem samples go to `out`."""
    try:
        t_end = time.monotonic() + wait_s
        while time.monotonic() < t_end and not stop.exists():
            if all(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.2)
        out["stopped_by"] = "host" if stop.exists() else "timeout or exits"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for n, p in procs.items():
            try:
                out["exit"][n] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out["exit"][n] = "killed after 30 s"
        out["shmem_kb"] = sampler.stop()


def run_k8s_agents(spec: dict[str, Any], result: dict[str, Any]) -> None:
    """The second phase: the k8s DaemonSets' agent command lines as the host hands them over
    ({node: argv}: numactl ... staging-agent ..., run as they are), `staging-agent` found on
    PATH in the venv and importing this checkout. Each node's tmpfs is a plain tmpfs again,
    mounted over the first phase's (what `emptyDir: {medium: Memory}` gives a pod). Runs until
    the host writes JOB/stop2; exits, Shmem and how it stopped go to result["k8s"]."""
    out: dict[str, Any] = {"exit": {}}
    result["k8s"] = out
    for n in (0, 1):
        mount_tmpfs(WORK / f"n{n}", "size=256m,mode=0750")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    sampler = Sampler()
    sampler.start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for node, argv in spec.items():
        with open(JOB / f"k8s-agent-node{node}.log", "wb") as log:
            procs[node] = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
    out["started_s"] = uptime()
    serve_until(procs, JOB / "stop2", float(SPEC["agents"]["wait_s"]), sampler, out)


def main() -> int:
    """The whole guest job; result.json is written whatever happens."""
    result: dict[str, Any] = {"started_s": uptime(), "exit": {}}
    try:
        result["topology"] = topology()
        result["net"] = network()
        result["probe"] = probe(SPEC["probe"])
        if SPEC.get("agents"):
            run_agents(SPEC["agents"], result)
            if SPEC["agents"].get("k8s"):
                run_k8s_agents(SPEC["agents"]["k8s"], result)
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    finally:
        result["finished_s"] = uptime()
        tmp = JOB / ".result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(JOB / "result.json")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
