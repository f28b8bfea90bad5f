"""The embedded PostgreSQL: a server under `state_dir/pgdata`, started when no DSN is configured.

It uses the binaries the `pgserver` package ships. The server outlives a crashed daemon (so a
restart finds it and resumes), and is stopped by the daemon that started it on a clean shutdown.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from coordinator.errors import DatabaseError

# pgserver logs every step at INFO through the root logger; keep our output readable.
logging.getLogger("pgserver").setLevel(logging.WARNING)


def pgdata_dir(state_dir: Path) -> Path:
    """Where the embedded server keeps its data."""
    return state_dir / "pgdata"


def start(state_dir: Path) -> tuple[str, bool]:
    """Start (or find running) the embedded server; return its DSN and whether we started it."""
    import pgserver
    from pgserver.utils import PostmasterInfo

    pgdata = pgdata_dir(state_dir)
    pgdata.mkdir(parents=True, exist_ok=True)
    info = PostmasterInfo.read_from_pgdata(pgdata)
    was_running = info is not None and info.is_running()
    try:
        # cleanup_mode=None: the server must survive this process (a kill -9 of the daemon).
        server = pgserver.get_server(pgdata, cleanup_mode=None)
    except (subprocess.SubprocessError, OSError, AssertionError) as e:
        log_file = pgdata / "log"
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise DatabaseError(f"embedded PostgreSQL under {pgdata} did not start: {e}\n{tail}") from e
    return server.get_uri(), not was_running


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
    _commands.pg_ctl(args, pgdata=pgdata, user=user, timeout=60)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
