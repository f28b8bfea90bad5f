"""Where things are in the lake: its root from the configured URI, and a batch's folder in it.

The agent that archives a batch writes there (`agents.lake`); the coordinator checks that the
agent's reply names the same place before it records it in the ledger. A local path or an
object-store URI (`s3://bucket/prefix`), through pyarrow.fs.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def lake_root(uri: str) -> tuple[pafs.FileSystem, str]:
    """The lake's filesystem and its root in it: a local path resolved, or an object-store
    URI's bucket and prefix."""
    if "://" in uri:
        fs, root = pafs.FileSystem.from_uri(uri)
        return fs, root
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def batch_key(batch_id: str, date: str) -> str:
    """A batch's folder relative to the lake's root: batches/date=YYYY-MM-DD/batch=<batch_id>
    (what the agent's `archived` reply names: the agent may see the lake under another path)."""
    return f"batches/date={date}/batch={batch_id}"


def batch_path(root: str, batch_id: str, date: str) -> str:
    """Where a batch lives in the lake: ROOT/batches/date=YYYY-MM-DD/batch=<batch_id>."""
    return f"{root}/{batch_key(batch_id, date)}"
