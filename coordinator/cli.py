"""coordinatorctl: inspect and steer a running coordinatord, check configs, run the demo.

Exit codes (DESIGN.md): 0 ok, 1 error, 2 usage, 3 daemon not running, 4 state unknown.
This is the only place that maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from coordinator import __version__
from coordinator.config import load_config, redact_dsn
from coordinator.errors import ConfigError, ControlError, CoordinatorError, DaemonNotRunning

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 1, 2, 3, 4
DEFAULT_CONFIG = "/etc/numa-coordinator/coordinator.toml"


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket named by --socket, or the one the config implies."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    return load_config(args.config or DEFAULT_CONFIG).paths.control_socket


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    return f"{time.time() - ts:.1f}s ago"


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{v:.1f} {unit}" if unit != "B" else f"{int(v)} B"
        v /= 1024
    return str(n)


def render_status(s: dict[str, Any]) -> str:
    """A `systemctl status`-like view of the daemon."""
    d, c, w, db = s["daemon"], s["config"], s["watcher"], s["database"]
    mark = "●" if d["state"] == "running" else "○"
    lr = c["last_reload"]
    reload_txt = (
        "never"
        if not lr.get("at")
        else (
            f"{dt.datetime.fromtimestamp(lr['at']).isoformat(timespec='seconds')} "
            + ("ok" if lr["ok"] else f"FAILED: {lr['error']}")
        )
    )
    lines = [
        f"{mark} coordinatord — {d['state']}",
        f"     PID: {d['pid']}   uptime: {d['uptime_s']:.0f}s   version: {d['version']}",
        f"  Config: generation {c['generation']}; last reload: {reload_txt}",
        *[f"          {f}" for f in c["files"]],
        f"          models {', '.join(c['models'])}; quorum {c['quorum']}; "
        f"deadline {c['deadline_s']:.0f}s",
        f" Watcher: {'armed' if w['armed'] else 'NOT ARMED'}; {w['events']} events, last "
        f"{_ago(w['last_event'])}; reconciliation scans {w['reconcile_scans']}, last "
        f"{_ago(w['last_reconcile'])}",
    ]
    if w["rejected"]:
        lines.append(
            "          rejected: " + ", ".join(f"{k}={v}" for k, v in w["rejected"].items())
        )
    lines.append(
        f"Database: {'embedded' if db['embedded'] else 'external'} {db['dsn']} schema "
        f"{db['schema']}; connected={db['connected']} leader={db['leader']}"
        + (f"; error: {db['last_error']}" if db["last_error"] else "")
    )
    lines.append("  Agents:")
    lines.append(
        "    NODE  PID      CONNECTED  POLICY  MEMS  CPUS              HEARTBEAT  TMPFS USED / FREE"
    )
    for a in s["agents"]:
        if not a["connected"]:
            lines.append(
                f"    {a['node']:<5} -        no         -       -     -                 "
                f"-          -   (restarts {a.get('restarts', 0)})"
            )
            continue
        cpus = ",".join(str(x) for x in (a.get("cpus") or []))
        lines.append(
            f"    {a['node']:<5} {a['pid']!s:<8} yes        {a.get('policy') or '-':<7} "
            f"{','.join(str(x) for x in a.get('mems') or []):<5} {cpus[:17]:<17} "
            f"{a['last_heartbeat_age_s']:>5.1f}s ago  {_bytes(a.get('tmpfs_used'))} / "
            f"{_bytes(a.get('tmpfs_free'))}"
        )
    lines.append(f" Batches in flight: {len(s['batches'])}")
    if s["batches"]:
        lines.append("    BATCH                          STATE          AGE     DEADLINE  MISSING")
        for b in s["batches"]:
            lines.append(
                f"    {b['batch_id'][:30]:<30} {b['state']:<14} {b['age_s']:>6.1f}s "
                f"{b['deadline_in_s']:>8.1f}s  {', '.join(b['missing']) or '-'}"
            )
    if s["finished"]:
        lines.append(" Recently finished:")
        for b in s["finished"]:
            lines.append(
                f"    {b['batch_id'][:30]:<30} {b['state']:<10}"
                + (f" {b['error']}" if b.get("error") else "")
            )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    sock = socket_path(args)
    while True:
        data = _call(sock, "status")
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render_status(data))
        if not args.watch:
            return EXIT_OK
        time.sleep(args.interval)


def _call(sock: Path, cmd: str, **kw: Any) -> Any:
    from coordinator.control import call

    return call(sock, cmd, **kw)


def cmd_reload(args: argparse.Namespace) -> int:
    result = _call(socket_path(args), "reload", timeout=60)
    if result["ok"]:
        print("reloaded")
        return EXIT_OK
    print(f"coordinatorctl: reload rejected: {result['error']}", file=sys.stderr)
    return EXIT_ERROR


def cmd_check_config(args: argparse.Namespace) -> int:
    from agents.crosscheck import load_crosscheck

    cfg = load_config(args.config or DEFAULT_CONFIG)
    load_crosscheck(cfg.crosscheck_function)  # fails here, not in an agent at run time
    if args.explain:
        for key, src in sorted(cfg.provenance.items()):
            print(f"{key:<32} {src}")
    print(f"configuration ok: {', '.join(cfg.sources)}")
    print(
        f"  models {', '.join(cfg.batch.models)}; nodes "
        + "; ".join(f"{n.id}: {', '.join(n.models)}" for n in cfg.nodes)
        + f"; database {'embedded' if cfg.database.embedded else redact_dsn(cfg.database.dsn)}"
    )
    return EXIT_OK


def cmd_batches(args: argparse.Namespace) -> int:
    rows = _call(socket_path(args), "batches", limit=args.limit, state=args.state)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    print(f"{'BATCH':<32} {'STATE':<14} {'ROWS':>8} {'KAPPA':>7}  MISSING / ERROR")
    for r in rows:
        kappa = f"{r['fleiss_kappa']:.3f}" if r["fleiss_kappa"] is not None else "-"
        note = ", ".join(r["models_missing"]) if r["models_missing"] else ""
        if r["error"]:
            note = (note + "; " if note else "") + r["error"]
        print(
            f"{r['batch_id'][:32]:<32} {r['state']:<14} {r['rows'] or 0:>8} {kappa:>7}  "
            f"{note or '-'}"
        )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    row = _call(socket_path(args), "show", batch_id=args.batch)
    if args.json:
        print(json.dumps(row, indent=2, default=str))
        return EXIT_OK
    for key in (
        "batch_id",
        "state",
        "degraded",
        "rows",
        "fleiss_kappa",
        "models_present",
        "models_missing",
        "first_seen",
        "ready_at",
        "finished_at",
        "lake_path",
        "error",
    ):
        print(f"{key + ':':<16} {row.get(key)}")
    print(
        "timings (ms):   "
        + "  ".join(f"{k.removesuffix('_ms')}={v}" for k, v in row["timings"].items())
    )
    print("staged bytes:   " + "  ".join(f"node{k}={v}" for k, v in row["staged_bytes"].items()))
    if row["placement"]:
        print("placement:      " + json.dumps(row["placement"]))
    if row["consensus_agreement"]:
        print(
            "agreement with consensus: "
            + "  ".join(f"{m}={v:.3f}" for m, v in sorted(row["consensus_agreement"].items()))
        )
    if row["agreement"]:
        models = sorted(
            {p["model_a"] for p in row["agreement"]} | {p["model_b"] for p in row["agreement"]}
        )
        pair = {(p["model_a"], p["model_b"]): p["agreement"] for p in row["agreement"]}
        print("pairwise agreement:")
        print(" " * 10 + "".join(f"{m[:8]:>9}" for m in models))
        for a in models:
            cells = []
            for b in models:
                v = 1.0 if a == b else pair.get((a, b), pair.get((b, a)))
                cells.append(f"{v:>9.3f}" if v is not None else f"{'-':>9}")
            print(f"{a[:10]:<10}" + "".join(cells))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from coordinator.demo import render, run_demo

    summary = run_demo(batches=args.batches, rows=args.rows, state_dir=args.state_dir)
    print(json.dumps(summary, indent=2, default=str) if args.json else render(summary))
    return EXIT_OK if summary["ok"] else EXIT_ERROR


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    p = argparse.ArgumentParser(prog="coordinatorctl", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", help="the daemon's control socket")
    common.add_argument("--config", help=f"coordinator.toml (default {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", parents=[common], help="what the daemon is doing")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="refresh until interrupted")
    s.add_argument("--interval", type=float, default=2.0)
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("reload", parents=[common], help="re-read the config; wait for the outcome")
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("check-config", parents=[common], help="validate a config (no daemon)")
    s.add_argument("--explain", action="store_true", help="show which file set each key")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("batches", parents=[common], help="recent batches from the ledger")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_batches)

    s = sub.add_parser("show", parents=[common], help="one batch from the ledger")
    s.add_argument("batch")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("demo", help="run the whole flow on the embedded default")
    s.add_argument("--batches", type=int, default=3)
    s.add_argument("--rows", type=int, default=10_000)
    s.add_argument("--state-dir", help="keep lake, staging and database here afterwards")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)

    for mod in ("coordinator.topology", "coordinator.plan"):
        try:
            module = __import__(mod, fromlist=["register_cli"])
        except ImportError:
            continue
        register = getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coordinatorctl`."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    try:
        return int(args.func(args))
    except DaemonNotRunning as e:
        print(f"coordinatorctl: daemon not running: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ConfigError as e:
        print(f"coordinatorctl: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except ControlError as e:
        print(f"coordinatorctl: error: {e}", file=sys.stderr)
        return EXIT_UNKNOWN if "no answer" in str(e) else EXIT_ERROR
    except CoordinatorError as e:
        print(f"coordinatorctl: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
