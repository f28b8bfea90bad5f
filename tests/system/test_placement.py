"""Page placement: counting and numa_maps parsing (pure), the kernel's answer through
move_pages(2) and numa_maps on real tmpfs files, and the `placement` field of the agent's
`staged` reply. The two-node proof (pages really on node 1) is tests/numa_vm/."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agents import placement
from agents.agent import Agent
from coordinator.core.config import load_config
from coordinator.core.messages import Purge, Stage
from tests.conftest import agent_config

PAGE = placement.PAGE
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


@pytest.fixture
def shm() -> Iterator[Path]:
    """A private folder on tmpfs (node-local copies live on tmpfs)."""
    d = Path(tempfile.mkdtemp(prefix="nc-placement-", dir=SHM))
    try:
        yield d
    finally:
        shutil.rmtree(d)


def write(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


# --- tally (pure) ---------------------------------------------------------------------------


def test_tally_counts_only_pages_on_the_wanted_node_as_local() -> None:
    fp = placement.tally({0: 6, 1: 2}, node=0, pages=8)
    assert (fp.pages, fp.local_pages, fp.fraction) == (8, 6, 0.75)
    assert fp.nodes == {0: 6, 1: 2}


def test_tally_counts_pages_with_an_errno_as_not_local() -> None:
    # -ENOENT: not present; -EFAULT: no page there. They are pages of the file, not local ones.
    fp = placement.tally({0: 5, -errno.ENOENT: 3, -errno.EFAULT: 2}, node=0, pages=10)
    assert (fp.pages, fp.local_pages, fp.fraction) == (10, 5, 0.5)
    assert fp.nodes == {0: 5}


def test_tally_counts_pages_without_any_status_as_not_local() -> None:
    # numa_maps lists only mapped pages: the rest of the file is unaccounted for, not local.
    fp = placement.tally({1: 3}, node=1, pages=4)
    assert (fp.local_pages, fp.fraction) == (3, 0.75)


def test_tally_refuses_more_placed_pages_than_the_file_has() -> None:
    with pytest.raises(ValueError, match="5 pages placed but the file has only 4"):
        placement.tally({0: 5}, node=0, pages=4)


def test_an_empty_file_is_fully_local() -> None:
    assert placement.tally({}, node=0, pages=0).fraction == 1.0


def test_batch_fraction_weighs_files_by_pages_not_by_count() -> None:
    bp = placement.BatchPlacement(
        node=1,
        method="move_pages",
        files={
            "a.parquet": placement.tally({1: 99}, node=1, pages=99),
            "b.parquet": placement.tally({0: 1}, node=1, pages=1),
        },
    )
    assert (bp.pages, bp.local_pages, bp.fraction) == (100, 99, 0.99)
    assert bp.nodes() == {0: 1, 1: 99}


def test_as_dict_is_the_staged_reply_shape() -> None:
    bp = placement.BatchPlacement(
        node=0,
        method="numa_maps",
        files={
            "slm-2.parquet": placement.tally({0: 3, 1: 1}, node=0, pages=4),
            "slm-1.parquet": placement.tally({0: 4}, node=0, pages=4),
        },
        seconds=0.25,
    )
    assert bp.as_dict() == {
        "fraction": 0.875,
        "pages": 8,
        "local_pages": 7,
        "node": 0,
        "method": "numa_maps",
        "nodes": {"0": 7, "1": 1},
        "seconds": 0.25,
        "files": {
            "slm-1.parquet": {"fraction": 1.0, "pages": 4},
            "slm-2.parquet": {"fraction": 0.75, "pages": 4},
        },
    }


def test_as_dict_never_rounds_a_fraction_up_to_the_threshold() -> None:
    fp = placement.tally({0: 9_899_999, 1: 100_001}, node=0, pages=10_000_000)
    d = placement.BatchPlacement(node=0, method="move_pages", files={"f": fp}).as_dict()
    assert d["fraction"] < 0.99
    assert d["files"]["f"]["fraction"] < 0.99


# --- numa_maps (pure) -----------------------------------------------------------------------

NUMA_MAPS = """\
55d0c0a00000 default file=/usr/bin/python3.11 mapped=300 N0=300 kernelpagesize_kB=4
7f3a2c000000 bind:1 file=/dev/shm/numa-coordinator/node1/b1/slm-1.parquet mapped=16 N0=4 N1=12 \
kernelpagesize_kB=4
7f3a2d000000 bind:1 file=/dev/shm/numa-coordinator/node1/b1/slm-1.parquet mapped=2 N1=2 \
kernelpagesize_kB=4
7f3a2e000000 default file=/dev/shm/with\\040space mapped=1 N3=1 kernelpagesize_kB=4
7ffd5c5f2000 default stack anon=3 dirty=3 N0=3 kernelpagesize_kB=4
"""


def test_numa_maps_finds_the_mapping_by_its_start_address() -> None:
    # The same file mapped twice: only the line at the given address counts.
    assert placement.numa_maps_nodes(NUMA_MAPS, 0x7F3A2C000000) == {0: 4, 1: 12}
    assert placement.numa_maps_nodes(NUMA_MAPS, 0x7F3A2D000000) == {1: 2}
    assert placement.numa_maps_nodes(NUMA_MAPS, 0x7F3A2E000000) == {3: 1}


def test_numa_maps_without_the_mapping_gives_no_pages() -> None:
    assert placement.numa_maps_nodes(NUMA_MAPS, 0x1000) == {}
    assert placement.numa_maps_nodes("garbage line\n\n", 0x1000) == {}


def test_numa_maps_of_a_mapping_with_no_resident_pages_gives_none() -> None:
    text = "7f0000000000 default file=/dev/shm/x\n"
    assert placement.numa_maps_nodes(text, 0x7F0000000000) == {}


# --- the kernel (this machine) --------------------------------------------------------------


def host_node_of_fresh_memory() -> int:
    """The node that holds a page this process writes now (the only node on a one-node host)."""
    buf = ctypes.create_string_buffer(3 * PAGE)
    addr = (ctypes.addressof(buf) + PAGE - 1) // PAGE * PAGE
    ctypes.memset(addr, 1, PAGE)
    [node] = placement.page_nodes(addr, 1)
    assert node >= 0, os.strerror(-node)
    return node


def test_move_pages_is_usable_on_this_machine() -> None:
    assert placement.usable_method() == "move_pages"


def test_page_nodes_reports_pages_not_mapped_in_as_negative_errno(shm: Path) -> None:
    # Without MAP_POPULATE the pages of a fresh mapping are not in this process's page tables:
    # the kernel answers -ENOENT, which must never be mistaken for a node.
    path = write(shm / "f", 8 * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = placement._libc.mmap(None, 8 * PAGE, 0x1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
        try:
            assert placement.page_nodes(addr, 8) == [-errno.ENOENT] * 8
        finally:
            placement._libc.munmap(addr, 8 * PAGE)
    finally:
        os.close(fd)


@pytest.mark.parametrize("method", ["move_pages", "numa_maps"])
def test_measure_finds_every_page_of_a_tmpfs_file_on_the_node_that_wrote_it(
    shm: Path, method: placement.Method
) -> None:
    node = host_node_of_fresh_memory()
    files = {"a.parquet": write(shm / "a.parquet", 10 * PAGE + 1), "b": write(shm / "b", 100)}
    bp = placement.measure(files, node, method)
    assert bp.method == method
    assert {n: (f.pages, f.local_pages) for n, f in bp.files.items()} == {
        "a.parquet": (11, 11),
        "b": (1, 1),
    }
    assert bp.fraction == 1.0
    assert bp.nodes() == {node: 12}


def test_measure_reports_pages_on_another_node_as_remote(shm: Path) -> None:
    node = host_node_of_fresh_memory()
    bp = placement.measure({"a": write(shm / "a", 4 * PAGE)}, node + 1)
    assert (bp.pages, bp.local_pages, bp.fraction) == (4, 0, 0.0)
    assert bp.nodes() == {node: 4}


@pytest.mark.parametrize("method", ["move_pages", "numa_maps"])
def test_measure_covers_every_page_across_windows_and_syscall_batches(
    shm: Path, method: placement.Method, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small windows and batches so a 23-page file spans 6 mappings and several calls.
    monkeypatch.setattr(placement, "WINDOW", 4 * PAGE)
    monkeypatch.setattr(placement, "STAT_BATCH", 3)
    node = host_node_of_fresh_memory()
    counts, pages = placement.file_nodes(write(shm / "f", 22 * PAGE + 5), method)
    assert pages == 23
    assert counts == Counter({node: 23})


def test_measure_does_not_follow_a_symlink(shm: Path) -> None:
    write(shm / "real", PAGE)
    (shm / "link").symlink_to(shm / "real")
    with pytest.raises(OSError) as e:
        placement.measure({"link": shm / "link"}, 0)
    assert e.value.errno == errno.ELOOP


def test_measure_leaves_no_mapping_behind(shm: Path) -> None:
    path = write(shm / "f", 3 * PAGE)
    placement.measure({"f": path}, 0)
    placement.measure({"f": path}, 0, "numa_maps")
    assert str(path) not in Path("/proc/self/maps").read_text()


# --- the agent's staged reply ---------------------------------------------------------------

MODELS = ["m1", "m2", "m3"]


def agent_for(tmp_path: Path, shm: Path, node: int) -> Agent:
    """An Agent for `node` with a batch `b1` of MODELS in its staging (2, 3 and 4 pages)."""
    cfg = agent_config(tmp_path, f"{shm}/node{{node}}", node, MODELS)
    agent = Agent(load_config(cfg), node)
    agent.tmpfs.mkdir(parents=True)
    batch = agent.config.paths.staging / "b1"
    batch.mkdir(parents=True)
    for i, m in enumerate(MODELS):
        write(batch / f"{m}.parquet", (2 + i) * PAGE)
    return agent


@pytest.fixture
def agent(tmp_path: Path, shm: Path) -> Iterator[Agent]:
    """An agent for the node this process's memory is on (so its copies are local)."""
    a = agent_for(tmp_path, shm, host_node_of_fresh_memory())
    yield a
    a.purge(Purge(batch_id="b1"))
    a.tmpfs.rmdir()


def test_staged_reply_carries_the_placement_of_every_copy(agent: Agent) -> None:
    reply = agent.stage(Stage(batch_id="b1", files=tuple(f"{m}.parquet" for m in MODELS)))
    p = reply.placement
    assert p is not None
    assert p["node"] == agent.node
    assert p["method"] == "move_pages"
    assert p["files"] == {
        "m1.parquet": {"fraction": 1.0, "pages": 2},
        "m2.parquet": {"fraction": 1.0, "pages": 3},
        "m3.parquet": {"fraction": 1.0, "pages": 4},
    }
    assert (p["pages"], p["local_pages"], p["fraction"], p["nodes"]) == (
        9,
        9,
        1.0,
        {str(agent.node): 9},
    )


def test_staged_reply_measures_copies_staged_by_an_earlier_request_too(agent: Agent) -> None:
    files = tuple(f"{m}.parquet" for m in MODELS)
    agent.stage(Stage(batch_id="b1", files=files))
    again = agent.stage(Stage(batch_id="b1", files=files))
    assert again.bytes == 0  # nothing copied this time ...
    assert again.placement is not None
    assert again.placement["pages"] == 9  # ... but every copy is measured
    assert set(again.placement["files"]) == set(files)


# --- the cross-check reads only node-local copies -------------------------------------------
#
# Two observers, because neither alone sees everything: a Python audit hook on `open` in the
# agent process sees every open made from Python (a cross-check plug-in's open(), the SDK's
# writes), and inotify on the staging batch folder sees every open the kernel performs there,
# including pyarrow's C++ opens, which raise no audit event at all.

IN_ACCESS = 0x1
IN_OPEN = 0x20
IN_Q_OVERFLOW = 0x4000
IN_ISDIR = 0x40000000


class Inotify:
    """The open/read events of the entries of one folder (ctypes; inotify(7))."""

    def __init__(self, folder: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN | IN_ACCESS)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> list[tuple[int, str]]:
        """(mask, name) of every event so far; name is '' for the folder itself."""
        import struct

        out: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            off = 0
            while off < len(data):
                _wd, mask, _cookie, n = struct.unpack_from("iIII", data, off)
                name = data[off + 16 : off + 16 + n].rstrip(b"\0").decode()
                assert not mask & IN_Q_OVERFLOW, "inotify queue overflowed: events were lost"
                out.append((mask, name))
                off += 16 + n

    def close(self) -> None:
        os.close(self.fd)


# Runs in a child so the audit hook (which cannot be removed) dies with it. The child stages
# batch b1 like the agent does, says "staged", waits for a line on stdin (the parent arms
# inotify meanwhile), then runs the agent's cross-check under the hook and prints what it saw.
CHILD = r"""
import json, os, sys
from pathlib import Path
from agents.agent import Agent
from coordinator.core.config import load_config
from coordinator.core.messages import Crosscheck, Stage, to_dict

cfg, node, variant, models = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
agent = Agent(load_config(cfg), node)
staging = agent.config.paths.staging
agent.stage(Stage(batch_id="b1", files=tuple(f"{m}.parquet" for m in models)))
if variant == "reader-on-staging":
    # Controls: a reader pointed at staging instead of the node-local copies ...
    from coordinator.core.roots import Root
    agent.local = Root(staging)
elif variant == "plugin-opens-staging":
    # ... or a cross-check plug-in that peeks at a staging file with open().
    real = agent.crosscheck_fn
    def peeking(model, tables):
        with open(staging / "b1" / f"{model}.parquet", "rb") as f:
            f.read(4)
        return real(model, tables)
    agent.crosscheck_fn = peeking
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        opened.append([os.fsdecode(args[0]), args[1], args[2]])
print("staged", flush=True)
sys.stdin.readline()
sys.addaudithook(hook)
reply = agent.crosscheck(Crosscheck(batch_id="b1", models=tuple(models)))
print(json.dumps({"reply": to_dict(reply), "opened": opened}), flush=True)
"""


def python_reads_under(folder: Path, opened: list[list[object]]) -> list[str]:
    """Opens (from the audit hook) of files under `folder` that are not the cross-check's own
    temp output opened for writing; opening the folder itself (to fsync it) is allowed."""
    bad = []
    for path, mode, flags in opened:
        p = Path(str(path))
        if p == folder or folder not in p.parents:
            continue
        writing = (isinstance(mode, str) and "w" in mode) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        )
        if not (writing and p.name.startswith(".crosscheck_") and p.name.endswith(".tmp")):
            bad.append(p.name)
    return sorted(bad)


def kernel_reads(events: list[tuple[int, str]]) -> list[str]:
    """Files of the folder the kernel saw opened or read, other than the cross-check temps."""
    return sorted(
        {
            name
            for mask, name in events
            if name and not mask & IN_ISDIR and not name.startswith(".crosscheck_")
        }
    )


CC_MODELS = ["m1", "m2", "m3"]


@dataclass
class Seen:
    """What a cross-check did, as its reply says and as the two observers saw it."""

    reply: dict[str, Any]
    python: list[str]  # files under staging opened from Python, other than its own output
    kernel: list[str]  # files under staging the kernel saw opened or read, other than that
    events: list[tuple[int, str]]  # inotify's (mask, name), all of them
    opened: list[str]  # every path the audit hook saw opened


def crosscheck_in_child(tmp_path: Path, shm: Path, variant: str) -> Seen:
    """Stage a real batch and run the agent's cross-check in a child with both observers on;
    return the child's reply, its Python opens under staging and the kernel's."""
    import json
    import subprocess
    import sys

    from agents import slm
    from coordinator.ctl.demo import synthetic_batch

    agent = agent_for(tmp_path, shm, host_node_of_fresh_memory())
    batch = agent.config.paths.staging / "b1"
    tables = synthetic_batch(50, seed=7, accuracy=dict.fromkeys(CC_MODELS, 0.8))[1]
    for m in CC_MODELS:
        slm.publish(agent.config.paths.staging, "b1", m, tables[m])
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [
            *(sys.executable, "-c", CHILD),
            *(str(tmp_path / "coordinator.toml"), str(agent.node), variant, json.dumps(CC_MODELS)),
        ],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "staged", child.stderr
        watch = Inotify(batch)
        try:
            out, err = child.communicate("go\n", timeout=120)
            events = watch.events()
        finally:
            watch.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    return Seen(
        result["reply"],
        python_reads_under(batch, result["opened"]),
        kernel_reads(events),
        events,
        [str(o[0]) for o in result["opened"]],
    )


def test_crosscheck_opens_no_staging_file_but_its_own_output(tmp_path: Path, shm: Path) -> None:
    seen = crosscheck_in_child(tmp_path, shm, "node-local")
    assert seen.reply["outputs"] == {m: f"crosscheck_{m}.parquet" for m in CC_MODELS}
    assert seen.python == []
    assert seen.kernel == []
    # The observers were live: both saw the cross-check write its outputs into the folder.
    temps = {f".crosscheck_{m}.parquet.tmp" for m in CC_MODELS}
    assert temps <= {name for mask, name in seen.events if mask & IN_OPEN}
    assert temps <= {Path(p).name for p in seen.opened}


def test_a_crosscheck_reading_staging_through_pyarrow_is_caught(tmp_path: Path, shm: Path) -> None:
    # The control for the test above: pyarrow's C++ opens raise no audit event; inotify sees them.
    seen = crosscheck_in_child(tmp_path, shm, "reader-on-staging")
    assert seen.kernel == [f"{m}.parquet" for m in CC_MODELS]


def test_a_crosscheck_plugin_opening_a_staging_file_is_caught(tmp_path: Path, shm: Path) -> None:
    seen = crosscheck_in_child(tmp_path, shm, "plugin-opens-staging")
    assert seen.python == [f"{m}.parquet" for m in CC_MODELS]
    assert seen.kernel == [f"{m}.parquet" for m in CC_MODELS]


# --- the operator's spot check --------------------------------------------------------------


def run_cli(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "agents.placement", *args],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_cli_prints_the_placement_and_exits_1_below_the_minimum(shm: Path) -> None:
    import json

    node = host_node_of_fresh_memory()
    f = write(shm / "f", 3 * PAGE)
    rc, out = run_cli("--node", str(node), str(f))
    assert rc == 0, out
    assert json.loads(out)["files"] == {str(f): {"fraction": 1.0, "pages": 3}}
    rc, out = run_cli("--node", str(node + 1), str(f))
    assert rc == 1, out
    assert json.loads(out)["fraction"] == 0.0


def test_cli_names_a_missing_file_and_exits_2(shm: Path) -> None:
    rc, out = run_cli("--node", "0", str(shm / "nope"))
    assert (rc, out.strip()) == (2, f"placement: {shm / 'nope'}: No such file or directory")
