"""coordinatorctl: status/batches/show against a real daemon, check-config without one, and the
exit codes of docs/operations.md (0 ok, 1 error, 2 usage, 3 daemon not running, 4 state unknown)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from coordinator.ctl import main as cli
from coordinator.daemon.control import ControlServer
from tests.conftest import MODELS, ROOT, Env
from tests.system.test_control import FakeDaemon
from tests.system.test_flow import publish_all


def ctl(*argv: str) -> tuple[int, str, str]:
    """coordinatorctl as a user runs it: a process of its own."""
    r = subprocess.run(
        [sys.executable, "-m", "coordinator.ctl", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    return r.returncode, r.stdout, r.stderr


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fake() -> Iterator[tuple[Path, FakeDaemon]]:
    """A control server in-process, answering for a stand-in daemon."""
    run = Path(tempfile.mkdtemp(prefix="nc-cli-", dir="/tmp"))
    path = run / "control.sock"
    d = FakeDaemon()
    with start_blocking_portal("asyncio") as portal:
        task, _ = portal.start_task(ControlServer(d).serve, path)  # type: ignore[arg-type]
        try:
            yield path, d
        finally:
            task.cancel()
            path.unlink(missing_ok=True)
            run.rmdir()


# --- against the real daemon -----------------------------------------------------------------


def test_status_batches_and_show_print_what_their_json_holds(env, daemon):
    d = daemon().start()
    publish_all(env, "b-cli", seed=21)
    d.wait_state("b-cli", {"done", "failed"})
    sock = ("--socket", str(env.socket))

    code, out, _ = ctl("status", "--json", *sock)
    assert code == 0
    s = json.loads(out)
    code, human, _ = ctl("status", *sock)
    assert code == 0
    assert human.splitlines()[0].startswith("● coordinatord — running")
    assert f"host: {socket.gethostname()}" in human.splitlines()[1]
    assert f"PID: {s['daemon']['pid']}" in human
    assert f"version: {s['daemon']['version']}" in human
    assert f"generation {s['config']['generation']}; never reloaded" in human
    for f in s["config"]["files"]:
        assert f"          {f}" in human
    assert " Watcher: armed;" in human
    assert f"schema {env.schema}; connected, leader" in human
    [agent] = s["agents"]
    [row] = [line.split() for line in human.splitlines() if line.startswith("    0 ")]
    assert row[:6] == [
        "0",
        str(agent["pid"]),
        "yes",
        "bind",
        "0",
        cli._ranges(agent["cpus"]),
    ]
    assert s["finished"][0]["batch_id"] == "b-cli"
    assert re.search(r"^    b-cli\s+done\s", human, re.M), human

    code, out, _ = ctl("batches", "--json", "--limit", "5", *sock)
    assert code == 0
    [b] = json.loads(out)
    assert (b["batch_id"], b["state"], b["rows"]) == ("b-cli", "done", 300)
    code, out, _ = ctl("batches", *sock)
    assert re.search(rf"^b-cli\s+done\s+300\s+{b['fleiss_kappa']:.3f}\s", out, re.M), out
    code, out, _ = ctl("batches", "--state", "failed", "--json", *sock)
    assert (code, json.loads(out)) == (0, [])

    code, out, _ = ctl("show", "b-cli", "--json", *sock)
    row = json.loads(out)
    assert row["state"] == "done" and len(row["agreement"]) == 21
    code, out, _ = ctl("show", "b-cli", *sock)
    assert code == 0
    assert f"lake_path:       {row['lake_path']}" in out
    timings = out.split("timings:\n")[1].split("staged:")[0].split()
    phases = timings[::3]
    assert sorted(f"{p}_ms" for p in phases) == sorted(row["timings"])
    assert phases[:3] == ["barrier_wait", "staging", "staging_node0"]  # pipeline order
    assert phases[-6:] == [
        "aggregate",
        "aggregate_node0",
        "commit",
        "archive",
        "archive_node0",
        "cleanup",
    ]
    if "0" in row["placement"]:
        frac = 100 * row["placement"]["0"]["fraction"]
        assert re.search(rf"^    node0\s+{frac:.1f}% node-local", out, re.M), out
    header = out.split("pairwise agreement:\n")[1].splitlines()[0].split()
    assert header == MODELS
    pair = row["agreement"][0]
    [line] = [x for x in out.splitlines() if x.split()[:1] == [pair["model_a"]] and "." in x]
    cells = line.split()[1:]
    assert cells[MODELS.index(pair["model_b"])] == f"{pair['agreement']:.3f}"

    code, _, err = ctl("show", "nope", *sock)
    assert code == 1 and "no batch 'nope' in the ledger" in err


def test_dsn_password_is_never_shown_in_status_check_config_or_the_log(env, daemon):
    if ":@" not in env.dsn:
        pytest.skip("machine fact: the server in TEST_DSN has a password this test cannot replace")
    secret, file_secret = "s3cr3t-DSN-pw", "s3cr3t-FILE-pw"
    pw_file = env.root / "db-password"
    pw_file.write_text(file_secret + "\n")
    # The test server trusts local connections, so any password gets in.
    env.write_config(
        database={
            "dsn": env.dsn.replace(":@", f":{secret}@"),
            "schema": env.schema,
            "password_file": str(pw_file),
        }
    )
    code, out, err = ctl("check-config", "--config", str(env.config), "--explain")
    assert code == 0, err
    assert "postgres:***@" in out
    d = daemon(with_agents=False).start()
    s = d.status()
    assert s["database"]["dsn"].startswith("postgresql://postgres:***@")
    _, human, _ = ctl("status", "--socket", str(env.socket))
    d.stop()
    everything = out + json.dumps(s) + human + d.log.read_text()
    assert secret not in everything
    assert file_secret not in everything


# --- check-config (no daemon) ----------------------------------------------------------------


def test_check_config_explains_which_file_set_each_key(env: Env, capsys):
    confd = env.config.parent / "conf.d"
    confd.mkdir()
    (confd / "50-quorum.toml").write_text("[batch]\nquorum = 5\n")
    (confd / "60-deadline.toml").write_text("[batch]\ndeadline_s = 30\n")
    (confd / "README").write_text("not a drop-in")
    code, out, _ = run_main(capsys, "check-config", "--config", str(env.config), "--explain")
    assert code == 0
    explain = {line.split()[0]: line.split()[1] for line in out.splitlines() if "  " in line}
    assert explain["batch.quorum"] == f"{confd / '50-quorum.toml'}:2"
    assert explain["batch.deadline_s"] == f"{confd / '60-deadline.toml'}:2"
    assert explain["batch.models"].startswith(f"{env.config}:")
    assert explain["barrier.settle_s"] == "<defaults>"
    files = [str(env.config), str(confd / "50-quorum.toml"), str(confd / "60-deadline.toml")]
    assert f"configuration ok: {', '.join(files)}" in out
    assert "quorum 5; deadline 30s" in out


def test_check_config_fails_with_exit_1_naming_the_broken_file(env: Env, capsys):
    confd = env.config.parent / "conf.d"
    confd.mkdir()
    (confd / "70-bad.toml").write_text("[batch]\nqorum = 5\n")
    code, out, err = run_main(capsys, "check-config", "--config", str(env.config))
    assert code == 1 and out == ""
    assert f"{confd / '70-bad.toml'}:2: unknown key batch.qorum" in err
    assert "configuration test failed" in err


def test_check_config_without_config_reads_the_default_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "nope.toml"))
    code, _, err = run_main(capsys, "check-config")
    assert code == 1
    assert f"{tmp_path / 'nope.toml'}: config file not found" in err


# --- exit codes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["batches", "--limit", "0"],
        ["batches", "--limit", "x"],
        ["batches", "--state", "nope"],
        ["show"],
        ["status", "--interval", "0"],
        ["status", "--timeout", "-1"],
    ],
)
def test_exit_2_on_a_usage_error(capsys, argv):
    code, _, err = run_main(capsys, *argv)
    assert code == 2, err
    assert "usage:" in err


def test_exit_0_for_help(capsys):
    code, out, _ = run_main(capsys, "status", "--help")
    assert code == 0 and "--watch" in out


def test_exit_3_when_no_daemon_listens(capsys, tmp_path):
    code, _, err = run_main(capsys, "status", "--socket", str(tmp_path / "absent.sock"))
    assert code == 3 and "daemon not running" in err
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    code, _, err = run_main(capsys, "reload", "--socket", str(stale))
    assert code == 3 and "daemon not running" in err


def test_exit_3_with_the_socket_found_through_the_config(capsys, env: Env):
    # No --socket: the config names runtime_dir; nothing listens there.
    code, _, err = run_main(capsys, "status", "--config", str(env.config))
    assert code == 3 and str(env.socket) in err


def test_exit_4_when_the_daemon_takes_the_request_but_never_answers(capsys, tmp_path):
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        code, _, err = run_main(capsys, "status", "--socket", str(path), "--timeout", "0.3")
    assert code == 4 and "state unknown" in err


def test_exit_1_when_the_daemon_answers_with_an_error(capsys, fake):
    path, _ = fake
    code, _, err = run_main(capsys, "show", "b9", "--socket", str(path))
    assert code == 1 and "no batch 'b9' in the ledger" in err


def test_exit_1_when_an_explicit_config_is_missing(capsys, tmp_path):
    code, _, err = run_main(capsys, "status", "--config", str(tmp_path / "none.toml"))
    assert code == 1 and "config file not found" in err


def test_reload_exits_0_when_applied_and_1_with_the_error_when_rejected(capsys, fake):
    path, d = fake
    code, out, _ = run_main(capsys, "reload", "--socket", str(path))
    assert code == 0 and "reloaded" in out and d.reloads == 1

    async def rejected() -> dict[str, Any]:
        return {"at": time.time(), "ok": False, "error": "/etc/x/conf.d/9.toml: unknown key a.b"}

    d.reload = rejected  # type: ignore[method-assign]
    code, _, err = run_main(capsys, "reload", "--socket", str(path))
    assert code == 1
    assert "reload rejected, the old config stays: /etc/x/conf.d/9.toml: unknown key a.b" in err


def test_status_watch_refreshes_until_interrupted_and_rides_out_a_missing_daemon(
    capsys, fake, monkeypatch, tmp_path
):
    path, _ = fake
    sleeps = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        # time.sleep is the process's: the guests' runs in the background (tests/early.py)
        # sleep in their own threads, and must neither be counted nor interrupted.
        if threading.current_thread() is not threading.main_thread():
            real_sleep(seconds)
            return
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", sleep)
    code, out, _ = run_main(
        capsys, "status", "--watch", "--json", "--interval", "0.5", "--socket", str(path)
    )
    assert code == 0 and sleeps == [0.5, 0.5, 0.5]
    assert [json.loads(line) for line in out.splitlines()] == [{"daemon": {"state": "running"}}] * 3

    sleeps.clear()
    code, out, _ = run_main(capsys, "status", "--watch", "--socket", str(tmp_path / "gone.sock"))
    assert code == 0 and len(sleeps) == 3
    assert out.count("daemon listening") == 3  # each frame says why, and the watch goes on


# --- the human layout (pure) -----------------------------------------------------------------


def status_sample() -> dict[str, Any]:
    now = 1_800_000_000.0
    return {
        "daemon": {
            "state": "degraded",
            "ready": True,
            "pid": 4711,
            "uptime_s": 7_380.0,
            "version": "0.1.0",
            "with_agents": False,
        },
        "config": {
            "generation": 3,
            "files": ["/etc/nc/coordinator.toml", "/etc/nc/conf.d/50-quorum.toml"],
            "last_reload": {
                "at": now - 12,
                "ok": False,
                "error": "/etc/nc/conf.d/60-x.toml:2: TOML syntax error: Expected '='",
            },
            "models": ["a", "b", "c"],
            "quorum": 2,
            "deadline_s": 600.0,
        },
        "watcher": {
            "armed": True,
            "events": 10,
            "last_event": now - 2,
            "reconcile_scans": 4,
            "last_reconcile": now - 1,
            "watcher_restarts": 0,
            "rejected": {"hard link (more than one link)": 1},
            "quarantined": {"corrupt": 2},
        },
        "agents": [
            {
                "node": 0,
                "connected": True,
                "restarts": 0,
                "pid": 100,
                "cpus": [0, 1, 2, 3, 36, 37],
                "mems": [0],
                "policy": "bind",
                "last_heartbeat_age_s": 0.4,
                "tmpfs_used": 1536,
                "tmpfs_free": 64 * 2**30,
                "last_placement": 0.995,
            },
            {"node": 1, "connected": False, "restarts": 2},
        ],
        "database": {
            "embedded": False,
            "dsn": "postgresql://coord:***@db/ens",
            "schema": "numa_coordinator",
            "connected": False,
            "leader": True,
            "last_error": "connection refused",
        },
        "batches": [
            {
                "batch_id": "b-1",
                "state": "waiting",
                "present": ["a", "b"],
                "missing": ["c"],
                "age_s": 75.0,
                "deadline_in_s": 525.0,
                "degraded": False,
                "error": "",
                "placement": {},
                "placement_flag": "",
            }
        ],
        "finished": [
            {"batch_id": "b-0", "state": "failed", "finished_at": now - 30, "error": "deadline"}
        ],
    }


def test_render_status_shows_every_section_with_the_reload_error_and_the_file():
    text = cli.render_status(status_sample(), now=1_800_000_000.0)
    lines = text.splitlines()
    assert lines[0] == "◐ coordinatord — degraded (ready)"
    assert "PID: 4711   uptime: 2h 3min   version: 0.1.0" in lines[1]
    assert "generation 3; last reload" in lines[2] and "(12.0s ago): REJECTED" in lines[2]
    assert "          ! /etc/nc/conf.d/60-x.toml:2: TOML syntax error: Expected '='" in lines
    assert "          /etc/nc/conf.d/50-quorum.toml" in lines
    assert "          models a, b, c; quorum 2; deadline 600s" in lines
    assert "          rejected: hard link (more than one link) 1" in lines
    assert "          quarantined: corrupt 2" in lines
    db = "Database: external postgresql://coord:***@db/ens; schema numa_coordinator;"
    assert f"{db} NOT CONNECTED, leader" in lines
    assert "          last error: connection refused" in lines
    assert "  Agents: 1 of 2 up" in lines
    agent0 = next(x for x in lines if x.startswith("    0 "))
    assert agent0.split() == [
        "0",
        "100",
        "yes",
        "bind",
        "0",
        "0-3,36-37",
        "0.4s",
        "ago",
        "1.5",
        "KiB",
        "64.0",
        "GiB",
        "99.5%",
    ]
    agent1 = next(x for x in lines if x.startswith("    1 "))
    assert agent1.split()[:4] == ["1", "-", "no", "(2"]
    batch = next(x for x in lines if x.startswith("    b-1 "))
    assert batch.split() == ["b-1", "waiting", "2/3", "c", "1min", "15s", "8min", "45s", "-"]
    assert any(x.split()[:2] == ["b-0", "failed"] and x.endswith("deadline") for x in lines)


def test_cpu_lists_are_printed_as_kernel_ranges():
    assert cli._ranges([0, 1, 2, 3, 36, 37, 38, 39]) == "0-3,36-39"
    assert cli._ranges([5]) == "5"
    assert cli._ranges([1, 3, 5]) == "1,3,5"
    assert cli._ranges([]) == "-"
