"""Run the real coordinatord with several `[[node]]`s on a host with fewer NUMA nodes.

Every node's agent is bound (for real, with numactl) to one node the host has, `HOST_NODE`; the
code under test is unchanged except for the two checks that compare the config with the
hardware, which would (rightly) refuse to start:

- the daemon's start-up check that every configured node is online (`topology.check_nodes`)
  is made for the configured nodes the host has;
- each agent's binding check (`binding.check(node)`: memory bound to exactly its node) is made
  against `HOST_NODE` instead.

Used as:
    python -m tests.one_host --config FILE --with-agents           (conftest's Daemon.module)
    python -m tests.one_host agent --node N --config FILE ...      (from the numactl wrapper)
and, as `[crosscheck] function = "tests.one_host:recording_crosscheck"`, a cross-check that
appends one JSON line per call (pid, node, model) to $NC_TEST_CROSSCHECK_LOG, then runs the
default cross-check: the record of which agent cross-checked which model.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa

HOST_NODE = 0
RECORD_ENV = "NC_TEST_CROSSCHECK_LOG"

NUMACTL = f"""#!/bin/sh
# numactl for a one-node host (tests/one_host.py): the daemon asks for
#   numactl --membind=N --cpunodebind=N PYTHON -m agents.agent ARGS...
# This binds to node {HOST_NODE} instead and runs the agent through tests.one_host.
shift 2
py="$1"
shift 3
exec numactl --membind={HOST_NODE} --cpunodebind={HOST_NODE} "$py" -m tests.one_host agent "$@"
"""


def write_numactl(folder: Path) -> Path:
    """Write the numactl wrapper into `folder` (for `[agents] numactl`); return its path."""
    path = folder / "one-host-numactl"
    path.write_text(NUMACTL)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _node_from_argv() -> int:
    argv = sys.argv
    return int(argv[argv.index("--node") + 1]) if "--node" in argv else -1


def recording_crosscheck(model: str, tables: Mapping[str, pa.Table]) -> pa.Table:
    """The default cross-check, recorded: which process, as which node, checked `model`."""
    from agents.crosscheck import crosscheck

    out = crosscheck(model, tables)
    record = os.environ.get(RECORD_ENV)
    if record:
        line = json.dumps({"pid": os.getpid(), "node": _node_from_argv(), "model": model})
        with open(record, "a") as f:
            f.write(line + "\n")
    return out


def _daemon(argv: list[str]) -> int:
    from coordinator.core import topology
    from coordinator.daemon import main as daemon

    real = topology.check_nodes

    def check_nodes(topo: topology.Topology, node_ids: Iterable[int]) -> None:
        real(topo, [n for n in node_ids if n in topo.node_ids])

    topology.check_nodes = check_nodes
    return daemon.main(argv)


def _agent(argv: list[str]) -> int:
    from agents import agent, binding

    real = binding.check

    def check(node: int, *, cpus: str = "", sysfs_root: str | Path = "/") -> binding.Binding:
        return real(HOST_NODE, cpus=cpus, sysfs_root=sysfs_root)

    binding.check = check
    return agent.main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        sys.exit(_agent(sys.argv[2:]))
    sys.exit(_daemon(sys.argv[1:]))
