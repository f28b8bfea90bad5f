"""Shared fixtures: one embedded PostgreSQL for the session, a config per test, a real daemon.

Each test gets its own schema, staging folder, lake, tmpfs folder and runtime folder, so tests
never see each other's batches even though they share the PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from coordinator.core.errors import ControlError
from coordinator.ctl.client import call
from tests import early

ROOT = Path(__file__).resolve().parent.parent
MODELS = [f"slm-{i}" for i in range(1, 8)]

# -- Skips under CI ------------------------------------------------------------------------------
# `make test` installs every Debian package the suite uses, so on CI (CI=true) a skipped test is
# one that did not run for a reason someone could fix: the run fails, naming each such skip. The
# exception is a fact of the machine that no install can change (not root, a single CPU, no right
# to mount a tmpfs): such a skip's reason starts with MACHINE_FACT, e.g.
#     pytest.skip(f"{MACHINE_FACT} this user may not mount a tmpfs: {err}")
# A missing command is never a machine fact; its skip names the Debian package instead. Outside
# CI every skip is listed with its reason at the end of the run, and none fails it.
MACHINE_FACT = "machine fact:"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skipped report gives (pytest's "Skipped: " prefix dropped)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text.removeprefix("Skipped: ")


class SkipGuard:
    """Counts the session's skips, lists them with their reasons, and under CI fails the run
    when one of them is not a machine fact."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skips: list[tuple[str, str]] = []

    def _note(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skips.append((report.nodeid, skip_reason(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._note(report)

    def unexcused(self) -> list[tuple[str, str]]:
        return [(n, r) for n, r in self.skips if not r.startswith(MACHINE_FACT)]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.strict and self.unexcused() and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.skips:
            return
        bad = self.unexcused()
        tr = terminalreporter
        tr.section(f"{len(self.skips)} skipped, {len(self.skips) - len(bad)} of them machine facts")
        for nodeid, reason in self.skips:
            tr.line(f"{nodeid}: {reason}")
        if self.strict and bad:
            tr.line(
                f"CI=true: {len(bad)} skip(s) above are not machine facts, so this run fails. "
                "Install what they name (make test does, as root), or, for what no install "
                f"can change, start the skip reason with {MACHINE_FACT!r} (tests/conftest.py).",
                red=True,
                bold=True,
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipGuard(strict=in_ci()), "numa-coordinator-skip-guard")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of modules with early work (tests/early.py: the QEMU guests) go last, and that work
    starts now, so that it runs while the rest of the suite does."""
    late = [i for i in items if early.registered(module_name(i))]
    items[:] = [i for i in items if not early.registered(module_name(i))] + late
    early.start({module_name(i) for i in late})


def module_name(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else ""


def agent_config(root: Path, node_tmpfs: str, node: int, models: list[str]) -> Path:
    """A coordinator.toml under `root` for one agent on `node` that cross-checks `models`
    (for tests that call an Agent's handlers directly, without a daemon)."""
    path = root / "coordinator.toml"
    path.write_text(
        f"""
[paths]
staging = "{root / "staging"}"
lake = "{root / "lake"}"
node_tmpfs = "{node_tmpfs}"
state_dir = "{root / "state"}"
runtime_dir = "{root / "run"}"

[batch]
models = {models}
quorum = {len(models)}

[[node]]
id = {node}
models = {models}
"""
    )
    return path


@contextlib.contextmanager
def mounted_tmpfs(size_k: int, prefix: str = "nc-tmpfs-") -> Iterator[Path]:
    """A real tmpfs of `size_k` KiB on a fresh folder, unmounted and removed afterwards; the
    test is skipped, with mount's own words, where this machine does not let us mount one."""
    mnt = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        mnt.rmdir()
        pytest.skip(f"{MACHINE_FACT} this user may not mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy; fail the test naming `what` on timeout."""
    t_end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > t_end:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL server for the whole session: $TEST_DSN, or an embedded one."""
    if os.environ.get("TEST_DSN"):
        yield os.environ["TEST_DSN"]
        return
    from coordinator.daemon import embedded_pg

    state = Path(tempfile.mkdtemp(prefix="nc-pg-"))
    dsn, _ = embedded_pg.start(state)
    try:
        yield dsn
    finally:
        embedded_pg.stop(state, mode="immediate")
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def schema() -> str:
    """A schema name of this test's own on the session's PostgreSQL."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def admin(pg_dsn: str, schema: str, anyio_backend: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for looking at (and meddling with) the database behind a ledger on
    `schema`; the schema is dropped afterwards."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


@dataclass
class Env:
    """Folders and config of one test's coordinator."""

    root: Path
    staging: Path
    lake: Path
    tmpfs: Path
    run: Path
    state: Path
    schema: str
    dsn: str
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.run / "control.sock"

    def write_config(
        self, nodes: dict[int, list[str]] | None = None, **sections: dict[str, Any]
    ) -> Path:
        """(Re)write coordinator.toml; `sections` override keys, e.g. batch={'quorum': 5};
        `nodes` maps each [[node]] id to its models (default: node 0 with every model)."""
        base: dict[str, dict[str, Any]] = {
            "paths": {
                "staging": str(self.staging),
                "lake": str(self.lake),
                "node_tmpfs": f"{self.tmpfs}/node{{node}}",
                "state_dir": str(self.state),
                "runtime_dir": str(self.run),
            },
            "batch": {"models": MODELS, "deadline_s": 120.0, "quorum": 7},
            "database": {"dsn": self.dsn, "schema": self.schema},
            "barrier": {"reconcile_s": 1.0},
            "agents": {"heartbeat_s": 0.5, "step_timeout_s": 60.0},
            "log": {"level": "debug", "format": "json"},
        }
        for sec, vals in sections.items():
            base.setdefault(sec, {}).update(vals)
        lines = []
        for sec, vals in base.items():
            lines.append(f"[{sec}]")
            lines += [f"{k} = {_toml(v)}" for k, v in vals.items()]
            lines.append("")
        for node, models in (nodes or {0: MODELS}).items():
            lines += ["[[node]]", f"id = {node}", f"models = {_toml(models)}", ""]
        self.config.write_text("\n".join(lines))
        return self.config

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


@pytest.fixture
def env(tmp_path: Path, pg_dsn: str) -> Iterator[Env]:
    """A fresh set of folders, a schema of its own, and a config pointing at them."""
    run = Path(tempfile.mkdtemp(prefix="nc-run-", dir="/tmp"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    tmpfs = Path(tempfile.mkdtemp(prefix="nc-test-", dir=shm))
    # The embedded PostgreSQL runs as another user, so its folder must not sit under pytest's
    # 0700 tmp root (which a concurrent pytest session re-locks).
    state = Path(tempfile.mkdtemp(prefix="nc-state-", dir="/tmp"))
    state.chmod(0o755)
    e = Env(
        root=tmp_path,
        staging=tmp_path / "staging",
        lake=tmp_path / "lake",
        tmpfs=tmpfs,
        run=run,
        state=state,
        schema=f"t_{uuid.uuid4().hex[:12]}",
        dsn=pg_dsn,
        config=tmp_path / "etc" / "coordinator.toml",
    )
    e.staging.mkdir()
    e.config.parent.mkdir()
    e.write_config()
    try:
        yield e
    finally:
        shutil.rmtree(tmpfs, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        _stop_pg_and_remove(state)


def _stop_pg_and_remove(state: Path) -> None:
    from coordinator.daemon import embedded_pg

    with contextlib.suppress(Exception):
        embedded_pg.stop(state, mode="immediate")
    shutil.rmtree(state, ignore_errors=True)


class Daemon:
    """A real coordinatord process (with its agents) for one test."""

    module = "coordinator.daemon"  # what `python -m` runs (a launcher may wrap the daemon)

    def __init__(
        self, env: Env, *, with_agents: bool = True, extra_env: dict[str, str] | None = None
    ):
        self.env = env
        self.with_agents = with_agents
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = env.root / "coordinatord.log"

    def start(self, *, wait: bool = True) -> Daemon:
        cmd = [sys.executable, "-m", self.module, "--config", str(self.env.config)]
        if self.with_agents:
            cmd.append("--with-agents")
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **self.extra_env},
            start_new_session=True,
        )
        logf.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"coordinatord exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                return bool(call(self.env.socket, "status", timeout=5)["daemon"]["ready"])
            except ControlError:
                return False

        wait_until(up, timeout, "coordinatord to answer on its control socket")
        if self.with_agents:
            wait_until(
                lambda: all(a["connected"] for a in self.status()["agents"]),
                timeout,
                "agents to connect",
            )

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def status(self) -> dict[str, Any]:
        return call(self.env.socket, "status")  # type: ignore[no-any-return]

    def show(self, batch_id: str) -> dict[str, Any] | None:
        try:
            return call(self.env.socket, "show", batch_id=batch_id)  # type: ignore[no-any-return]
        except ControlError:
            return None

    def wait_state(self, batch_id: str, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            row = self.show(batch_id)
            return row if row and row["state"] in states else None

        try:
            return wait_until(reached, timeout, f"batch {batch_id} to reach {sorted(states)}")
        except pytest.fail.Exception:
            print(self.tail())
            raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        """kill -9 the daemon alone (its agents notice the closed socket and reconnect later)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture
def daemon(env: Env) -> Iterator[Callable[..., Daemon]]:
    """Factory for real daemons; every one is stopped at the end of the test."""
    made: list[Daemon] = []

    def make(**kw: Any) -> Daemon:
        d = Daemon(env, **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()
