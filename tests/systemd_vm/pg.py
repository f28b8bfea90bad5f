"""An external PostgreSQL for the systemd guest: a throwaway server on the host's 127.0.0.1
with password (SCRAM) authentication, run from the pgserver package's binaries as `nobody`.
The guest reaches it through QEMU's user network at 10.0.2.2."""

from __future__ import annotations

import contextlib
import importlib.util
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def server() -> Iterator[dict[str, Any]]:
    """Yield {host, port, user, password, database, local_dsn} of a running server."""
    spec = importlib.util.find_spec("pgserver")  # not imported: it warns at import
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pgserver package is not installed")
    bindir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
    base = Path(tempfile.mkdtemp(prefix="nc-sdvm-pg-"))
    base.chmod(0o755)
    data, sockdir = base / "data", base / "sock"
    for d in (data, sockdir):
        d.mkdir()
        shutil.chown(d, "nobody")
    user = "nobody" if _is_root() else None
    password = secrets.token_urlsafe(18)
    port = free_port()

    def as_pg(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cmd, check=True, capture_output=True, text=True, user=user, timeout=120, **kw
        )

    as_pg(
        str(bindir / "initdb"),
        *("-D", str(data), "-U", "postgres", "--auth-local=trust"),
        "--auth-host=scram-sha-256",
        cwd=base,
    )
    log = sockdir / "log"
    as_pg(
        str(bindir / "pg_ctl"),
        *("-D", str(data), "-l", str(log), "-w", "-t", "60", "start"),
        "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {sockdir}",
        cwd=base,
    )
    try:
        psql = [str(bindir / "psql"), "-h", str(sockdir), "-p", str(port), "-U", "postgres"]
        as_pg(*psql, "-v", "ON_ERROR_STOP=1", "-c",
              f"CREATE ROLE coordinator LOGIN PASSWORD '{password}'", cwd=base)  # fmt: skip
        as_pg(*psql, "-c", "CREATE DATABASE ensemble OWNER coordinator", cwd=base)
        yield {
            "host": "10.0.2.2",
            "port": port,
            "user": "coordinator",
            "password": password,
            "database": "ensemble",
            "local_dsn": f"postgresql://coordinator:{password}@127.0.0.1:{port}/ensemble",
            "nopassword_dsn": f"postgresql://coordinator@127.0.0.1:{port}/ensemble",
        }
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            user=user,
            cwd=base,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0
