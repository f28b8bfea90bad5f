"""The embedded PostgreSQL: a server under `state_dir/pgdata`, started when no DSN is configured.

It uses the binaries the `pgserver` package ships. The server outlives a crashed daemon (so a
restart finds it and resumes), and is stopped by the daemon that started it on a clean shutdown.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from coordinator.core.errors import DatabaseError

# pgserver logs every step at INFO through the root logger; keep our output readable.
logging.getLogger("pgserver").setLevel(logging.WARNING)


def pgdata_dir(state_dir: Path) -> Path:
    """Where the embedded server keeps its data."""
    return state_dir / "pgdata"


def start(state_dir: Path) -> tuple[str, bool]:
    """Start (or find running) the embedded server; return its DSN and whether we started it."""
    from pgserver.postgres_server import PostgresServer, get_server
    from pgserver.utils import PostmasterInfo

    pgdata = pgdata_dir(state_dir)
    pgdata.mkdir(parents=True, exist_ok=True)
    info = PostmasterInfo.read_from_pgdata(pgdata)
    was_running = info is not None and info.is_running()
    last: BaseException | None = None
    for _attempt in range(3):
        try:
            cached = PostgresServer._instances.get(pgdata.resolve())
            if cached is not None:
                # pgserver caches one handle per folder; after a stop, start it again.
                with PostgresServer._lock:
                    cached.ensure_postgres_running()
                server = cached
            else:
                # cleanup_mode=None: the server must survive this process (kill -9 of the
                # daemon): a restarted daemon finds it running and goes on.
                server = get_server(pgdata, cleanup_mode=None)
            return server.get_uri(), not was_running
        except (subprocess.SubprocessError, OSError, AssertionError) as e:
            # pg_ctl -w sometimes misses a server that is already up (seen under load):
            # trust postmaster.pid when it says the server is ready.
            info = PostmasterInfo.read_from_pgdata(pgdata)
            if info is not None and info.is_running() and info.status == "ready":
                return info.get_uri(), not was_running
            last = e
            time.sleep(0.5)
    log_file = pgdata / "log"
    tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
    raise DatabaseError(f"embedded PostgreSQL under {pgdata} did not start: {last}\n{tail}")


def stop(state_dir: Path, *, mode: str = "fast") -> None:
    """Stop the embedded server under `state_dir` if it runs (pg_ctl stop -m MODE)."""
    from pgserver.utils import PostmasterInfo

    pgdata = pgdata_dir(state_dir)
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return
    pg_ctl(pgdata, ["-w", "-m", mode, "stop"])


def pg_ctl(pgdata: Path, args: list[str]) -> None:
    """Run pgserver's pg_ctl on `pgdata` as the user that owns it."""
    from pgserver import _commands

    user = "pgserver" if _is_root() else None
    # pg_ctl is generated at import time in pgserver._commands, so it is untyped.
    getattr(_commands, "pg_ctl")(args, pgdata=pgdata, user=user, timeout=60)  # noqa: B009


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
