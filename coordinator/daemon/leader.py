"""The database and the leader lock: one coordinator writes per host (`[host] id`) on a schema,
the others of that host wait.

`open_ledger` connects (the embedded server started first where configured), retrying with
backoff while PostgreSQL is away, then waits in standby until it holds the host's leader lock
(taking over from a leader silent past its lease). `keep_leadership` renews the lease on the
lock's connection for as long as the daemon runs: after an outage it takes the lock again, and
if another coordinator took it meanwhile (or the host's epoch moved on: fenced) the daemon stops
(systemd restarts it into standby). See docs/reliability.md, "Fencing".
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import structlog

from coordinator.core.config import Config
from coordinator.core.errors import ConfigError, DatabaseError
from coordinator.daemon import embedded_pg
from coordinator.daemon.ledger import Ledger, renew_every

log = structlog.get_logger("coordinator.daemon.leader")


async def open_ledger(
    cfg: Config,
    say: Callable[[str], None],
    set_state: Callable[[str], None],
    made: Callable[[Ledger, str], None],
) -> bool:
    """Connect and take the leader lock; return whether this daemon started the embedded
    server (and so stops it on a clean stop). `made(ledger, dsn)` gets the ledger as soon as
    it exists (a stop while connecting or in standby closes it), `say` reports progress
    (systemd STATUS= and the log), `set_state` the daemon's state ("standby" while waiting)."""
    started = False
    if cfg.database.embedded:
        dsn, _ = await anyio.to_thread.run_sync(embedded_pg.start, cfg.paths.state_dir)
        started = True  # the daemon owns the embedded server: it stops it on a clean stop
    else:
        dsn = cfg.database.dsn
    password = None
    if cfg.database.password_file:
        try:
            password = (await anyio.Path(cfg.database.password_file).read_text()).strip()
        except OSError as e:
            raise ConfigError(
                f"database.password_file {cfg.database.password_file}: {e.strerror}"
            ) from None
    ledger = Ledger(
        dsn,
        cfg.database.schema,
        host_id=cfg.host.id,
        lease_s=cfg.host.lease_s,
        retry_max_s=cfg.database.retry_max_s,
        password=password,
    )
    made(ledger, dsn)
    delay = 0.2
    while True:
        try:
            await ledger.connect()
            break
        except DatabaseError as e:
            say(f"database unreachable, retrying in {delay:.1f} s: {e}")
            await anyio.sleep(delay)
            delay = min(delay * 2, cfg.database.retry_max_s)
    while not await ledger.acquire_leadership():
        set_state("standby")
        say(f"standby: another coordinator of host {cfg.host.id} holds the leader lock")
        await anyio.sleep(min(2.0, cfg.host.lease_s / 2))
    set_state("starting")
    return started


async def keep_leadership(ledger: Ledger, lost_to_another: Callable[[], None]) -> None:
    """Renew the lease and check the lock's connection; re-take the lock after an outage. If
    another coordinator took it meanwhile (or fenced this one), call `lost_to_another` and
    return."""
    while True:
        await anyio.sleep(renew_every(ledger.lease_s))
        if await ledger.check_leadership():
            continue
        if ledger.fenced:
            lost_to_another()
            return
        log.warning("leader lock connection lost; writes wait until it is re-taken")
        while not await ledger.acquire_leadership():
            if ledger.held_elsewhere or ledger.fenced:
                log.error("another coordinator holds the leader lock; stopping")
                lost_to_another()
                return
            await anyio.sleep(1.0)
        log.info("leader lock re-taken")
