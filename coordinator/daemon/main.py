"""`coordinatord`: read the config, check the machine's NUMA nodes, run the daemon until it stops.

Exit codes (docs/operations.md): 0 after a clean stop, 1 on a bad config, a missing node or a
fatal error (the message names it on stderr and in the log).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio
import structlog

from coordinator.core import topology
from coordinator.core.config import check_host_id, load_config
from coordinator.core.errors import ConfigError, CoordinatorError
from coordinator.core.logs import configure
from coordinator.daemon.service import Daemon

log = structlog.get_logger("coordinator.daemon.main")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coordinatord`."""
    p = argparse.ArgumentParser(prog="coordinatord", description="NUMA-aware batch coordinator")
    p.add_argument("--config", required=True, help="path to coordinator.toml")
    p.add_argument(
        "--with-agents",
        action="store_true",
        help="start and supervise one staging-agent per configured node",
    )
    args = p.parse_args(argv)
    path = Path(args.config).resolve()
    try:
        config = load_config(path)
        check_host_id(config)
    except ConfigError as e:
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    configure(config.log.level, config.log.format, role="coordinator")
    try:
        # An agent in another kernel ([[node]] remote) checks its node where it runs.
        local = [n.id for n in config.nodes if not n.remote]
        topology.check_nodes(topology.read_topology(), local)
    except CoordinatorError as e:
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    try:
        # Over TCP this reads the TLS files: a key others may read is refused here.
        daemon = Daemon(config, path, with_agents=args.with_agents)
    except CoordinatorError as e:
        log.error("refusing to start", error=str(e))
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    try:
        anyio.run(daemon.run, backend="asyncio", backend_options={"use_uvloop": True})
    except CoordinatorError as e:
        log.error("coordinator failed", error=str(e))
        print(f"coordinatord: error: {e}", file=sys.stderr)
        return 1
    return daemon.exit_code


if __name__ == "__main__":
    sys.exit(main())
