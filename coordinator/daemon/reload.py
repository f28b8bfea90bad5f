"""Config reloads: SIGHUP, `coordinatorctl reload`, or a change to the config file or a drop-in.

A reload reads the whole config again and swaps it in only when it is valid and changes no key
that needs a restart; otherwise the old config stays and the error (file and line) is kept for
status. New batches use the new config; batches in flight keep the one they started with.
systemd hears RELOADING=1 and READY=1 around it once the daemon is ready (Type=notify-reload).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from coordinator.core.config import Config, load_config, locate, restart_changes
from coordinator.core.errors import ConfigError
from coordinator.daemon import notify

log = structlog.get_logger("coordinator.daemon.reload")


class Reloader:
    """Holds the config's generation and the last reload's outcome; `reload` swaps a new
    config in through `apply` when it is acceptable."""

    def __init__(
        self,
        config_path: Path,
        current: Callable[[], Config],
        apply: Callable[[Config], None],
        in_flight: Callable[[], list[str]],
        ready: Callable[[], bool],
    ) -> None:
        self.config_path = config_path
        self._current = current
        self._apply = apply
        self._in_flight = in_flight
        self._ready = ready
        self.generation = 1
        self.last_reload: dict[str, Any] = {
            "at": None,
            "ok": True,
            "error": "",
            "last_success_at": time.time(),
        }

    async def reload(self) -> dict[str, Any]:
        """Re-read the config; swap it in only if valid. New batches use it, running ones not."""
        # Before READY=1, systemd is still waiting for start-up: no RELOADING/READY then.
        if self._ready():
            notify.notify("RELOADING=1", f"MONOTONIC_USEC={notify.monotonic_usec()}")
        now = time.time()
        try:
            new = await anyio.to_thread.run_sync(load_config, self.config_path)
            self.check_reloadable(self._current(), new)
        except ConfigError as e:
            self.last_reload = {
                "at": now,
                "ok": False,
                "error": str(e),
                "last_success_at": self.last_reload.get("last_success_at"),
            }
            log.error("reload rejected; old config kept", error=str(e))
            self._notify_reloaded(f"STATUS=reload rejected: {e}")
            return self.last_reload
        self._apply(new)
        self.generation += 1
        self.last_reload = {"at": now, "ok": True, "error": "", "last_success_at": now}
        log.info("config reloaded", generation=self.generation, sources=list(new.sources))
        self._notify_reloaded("STATUS=running: config reloaded")
        return self.last_reload

    def _notify_reloaded(self, status: str) -> None:
        if self._ready():
            notify.notify("READY=1", status)
        else:
            notify.notify(status)

    def check_reloadable(self, old: Config, new: Config) -> None:
        """ConfigError, naming the file and line, when `new` changes what needs a restart."""

        def where(key: str) -> str:
            return locate(new.provenance.get(key, "<defaults>"), key)

        # The restart-only keys are marked on their config fields (`restart`).
        for key, a, b in restart_changes(old, new):
            if key == "node.id":
                raise ConfigError(
                    f"{where('node')}: the [[node]] ids cannot change without a restart "
                    f"({a!r} -> {b!r})"
                )
            raise ConfigError(
                f"{where(key)}: {key} cannot change without a restart ({a!r} -> {b!r})"
            )
        in_flight = self._in_flight()
        if in_flight and set(old.batch.models) != set(new.batch.models):
            raise ConfigError(
                f"{where('batch.models')}: batch.models cannot change while batches are in "
                f"flight ({', '.join(in_flight)})"
            )

    async def watch(self) -> None:
        """Reload when the main file or a conf.d/*.toml drop-in changes (as on SIGHUP)."""
        import watchfiles

        folder = self.config_path.parent

        def relevant(_change: watchfiles.Change, path: str) -> bool:
            p = Path(path)
            # conf.d itself too: a drop-in written right after the folder is created can land
            # before the folder is watched.
            return (
                p == self.config_path
                or p == folder / "conf.d"
                or (p.parent.name == "conf.d" and p.suffix == ".toml")
            )

        # Not recursive: the config's folder may also hold data (a demo's state dir holds
        # staging, the lake and PostgreSQL's files), whose every write would wake the watcher.
        # The folder itself and conf.d are watched, each one level deep; when conf.d appears
        # or goes, the watch starts again with the new set.
        confd = folder / "conf.d"
        while True:
            watched = [folder, confd] if confd.is_dir() else [folder]
            async for _changes in watchfiles.awatch(
                *watched,
                watch_filter=relevant,
                debounce=300,
                rust_timeout=500,  # bounds how long a stop waits for the watcher thread
                step=500,  # the watcher thread wakes this often even when nothing changes
                recursive=False,
                ignore_permission_denied=True,
            ):
                log.info("config files changed; reloading")
                await self.reload()
                if (confd in watched) != confd.is_dir():
                    break
