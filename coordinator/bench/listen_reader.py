"""The notify barrier's anchor: a bare LISTEN client, in a process of its own.

`python -m coordinator.bench.listen_reader DSN CHANNEL MODEL,MODEL,...` LISTENs on CHANNEL with
a plain asyncpg connection on asyncio's own event loop. Each notification's payload is
`<batch_id>/<model>/<size>` (docs/protocol.md, "Announcing a publish"); when every model of a
batch has been announced it prints `<batch_id> <unix time>` (the moment the callback ran for the
last one). It validates nothing and looks at no folder: it is the floor any barrier that hears
announcements pays. It prints `ready asyncpg` once its LISTEN is in place, and runs until it is
terminated.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import asyncpg


async def listen(dsn: str, channel: str, wanted: set[str]) -> None:
    """LISTEN until cancelled; print each batch once all of `wanted` were announced."""
    seen: dict[str, set[str]] = {}
    done: set[str] = set()
    out = sys.stdout

    def heard(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
        t = time.time()
        batch, _, rest = str(payload).partition("/")
        model = rest.partition("/")[0]
        have = seen.setdefault(batch, set())
        have.add(model)
        if batch not in done and wanted <= have:
            done.add(batch)
            out.write(f"{batch} {t:.6f}\n")
            out.flush()

    conn = await asyncpg.connect(dsn)
    try:
        await conn.add_listener(channel, heard)
        out.write("ready asyncpg\n")
        out.flush()
        await asyncio.Event().wait()
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module docstring)."""
    args = sys.argv[1:] if argv is None else argv
    dsn, channel, models = args[0], args[1], set(args[2].split(","))
    asyncio.run(listen(dsn, channel, models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
