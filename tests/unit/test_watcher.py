"""The barrier's watcher: inotify on staging and its batch folders, read from the event loop."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from coordinator.core.config import BarrierConfig
from coordinator.daemon.scanner import Stats
from coordinator.daemon.watch import Inotify, watch

CFG = BarrierConfig(debounce_ms=20, step_ms=2, reconcile_s=5.0, settle_s=5.0)


def publish(folder: Path, name: str) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(b"x")
    os.rename(tmp, folder / name)


def test_a_file_renamed_into_a_batch_folder_marks_that_batch(tmp_path: Path) -> None:
    (tmp_path / "b1").mkdir()
    ino = Inotify(tmp_path)
    try:
        ino.add_existing()
        publish(tmp_path / "b1", "slm-1.parquet")
        assert ino.read()[0] == {"b1"}
    finally:
        ino.close()


def test_temp_files_mark_nothing(tmp_path: Path) -> None:
    (tmp_path / "b1").mkdir()
    ino = Inotify(tmp_path)
    try:
        ino.add_existing()
        (tmp_path / "b1" / ".slm-1.parquet.tmp").write_bytes(b"x")
        (tmp_path / ".quarantine").mkdir()
        ids, count = ino.read()
        assert ids == set() and count > 0
    finally:
        ino.close()


def test_a_new_batch_folder_marks_itself_and_is_watched_from_then_on(tmp_path: Path) -> None:
    ino = Inotify(tmp_path)
    try:
        (tmp_path / "b2").mkdir()
        assert ino.read()[0] == {"b2"}
        publish(tmp_path / "b2", "slm-1.parquet")
        assert ino.read()[0] == {"b2"}
    finally:
        ino.close()


def test_an_idle_watcher_reads_nothing(tmp_path: Path) -> None:
    ino = Inotify(tmp_path)
    try:
        assert ino.read() == (set(), 0)
    finally:
        ino.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_watch_reports_a_published_file_to_on_batches(tmp_path: Path) -> None:
    seen: list[set[str]] = []
    got = anyio.Event()

    def on_batches(ids: set[str]) -> None:
        seen.append(ids)
        got.set()

    (tmp_path / "b3").mkdir()
    async with anyio.create_task_group() as tg:
        await tg.start(watch, tmp_path, CFG, on_batches, Stats())
        await anyio.to_thread.run_sync(publish, tmp_path / "b3", "slm-2.parquet")
        with anyio.fail_after(5):
            await got.wait()
        assert {"b3"} in seen
        tg.cancel_scope.cancel()
