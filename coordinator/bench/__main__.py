"""`python -m coordinator.bench [options]`: the same as `coordinatorctl bench [options]`."""

from __future__ import annotations

import argparse
import sys

from coordinator.bench import register_cli


def main(argv: list[str] | None = None) -> int:
    """Parse the bench options and run it."""
    p = argparse.ArgumentParser(prog="coordinatorctl")
    register_cli(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
