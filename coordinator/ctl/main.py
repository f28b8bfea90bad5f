"""coordinatorctl: inspect and steer a running coordinatord, check configs, run the demo.

Exit codes (docs/operations.md, "Exit codes"): 0 ok, 1 error, 2 usage, 3 daemon not running,
4 state unknown.
This is the only place that maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from coordinator import __version__, bench
from coordinator.core import topology
from coordinator.core.batch import State
from coordinator.core.config import DEFAULTS, config_files, explain, load_config, redact_dsn
from coordinator.core.errors import ConfigError, ControlError, CoordinatorError, DaemonNotRunning
from coordinator.core.timings import Timings
from coordinator.ctl import lake
from coordinator.planner import render

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_UNKNOWN = 0, 1, 2, 3, 4
DEFAULT_CONFIG = "/etc/numa-coordinator/coordinator.toml"
STATES = tuple(s.value for s in State)

# -- which daemon -----------------------------------------------------------------------------


def socket_path(args: argparse.Namespace) -> Path:
    """The control socket named by --socket, or the one the config implies.

    A config that does not validate (a broken drop-in, say) still names its runtime_dir: the
    daemon keeps running on its old config, and `status` is how one sees the error.
    """
    if getattr(args, "socket", None):
        return Path(args.socket)
    explicit = getattr(args, "config", None)
    path = Path(explicit or DEFAULT_CONFIG)
    try:
        return load_config(path).paths.control_socket
    except ConfigError:
        if explicit and not path.is_file():
            raise
    return _runtime_dir_leniently(path) / "control.sock"


def _runtime_dir_leniently(main: Path) -> Path:
    """paths.runtime_dir from whichever config files parse, later winning; else the default."""
    value = str(DEFAULTS["paths"]["runtime_dir"])
    try:
        main = main.resolve()
        files = config_files(main) if main.is_file() else []
    except OSError:
        files = []
    for f in files:
        try:
            with f.open("rb") as fh:
                paths = tomllib.load(fh).get("paths", {})
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(paths, dict) and isinstance(paths.get("runtime_dir"), str):
            value = paths["runtime_dir"]
    p = Path(value)
    return p if p.is_absolute() else main.parent / p


def _call(args: argparse.Namespace, cmd: str, **kw: Any) -> Any:
    from coordinator.ctl.client import call

    return call(socket_path(args), cmd, timeout=args.timeout, **kw)


# -- formatting -------------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    return f"{_duration(now - ts)} ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = abs(seconds)
    if s < 60:
        text = f"{s:.1f}s"
    elif s < 3600:
        text = f"{int(s // 60)}min {int(s % 60)}s"
    elif s < 86400:
        text = f"{int(s // 3600)}h {int(s % 3600 // 60)}min"
    else:
        text = f"{int(s // 86400)}d {int(s % 86400 // 3600)}h"
    return f"-{text}" if seconds < 0 else text


def _when(ts: float | None) -> str:
    if not ts:
        return "never"
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds")


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(n)


def _ranges(ids: list[int] | None) -> str:
    """[0, 1, 2, 3, 36, 37] -> '0-3,36-37' (the kernel's list format)."""
    if not ids:
        return "-"
    out: list[str] = []
    nums = sorted(set(ids))
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def _table(rows: list[list[str]], indent: str = "    ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def _note(batch: dict[str, Any]) -> str:
    """A batch's error and placement flag, on one line."""
    notes = [str(batch.get(k) or "").replace("\n", " ") for k in ("error", "placement_flag")]
    return "; ".join(n for n in notes if n) or "-"


def render_status(s: dict[str, Any], *, now: float | None = None) -> str:
    """A `systemctl status`-like view of the daemon; every value `status --json` has."""
    now = time.time() if now is None else now
    d, c, w, db = s["daemon"], s["config"], s["watcher"], s["database"]
    state = d["state"]
    mark = {"running": "●", "degraded": "◐", "stopping": "○"}.get(state, "○")
    ready = d.get("ready")
    head = f"{mark} coordinatord — {state}"
    if ready is not None:
        head += " (ready)" if ready else " (not ready)"
    lines = [
        head,
        f"     PID: {d['pid']}   uptime: {_duration(d['uptime_s'])}   version: {d['version']}"
        + (f"   host: {d['host']}" if d.get("host") else "")
        + ("   agents: supervised (--with-agents)" if d.get("with_agents") else ""),
    ]

    lr = c.get("last_reload") or {}
    if not lr.get("at"):
        reload_txt = "never reloaded"
    elif lr.get("ok"):
        reload_txt = f"last reload {_when(lr['at'])} ({_ago(lr['at'], now)}): ok"
    else:
        reload_txt = f"last reload {_when(lr['at'])} ({_ago(lr['at'], now)}): REJECTED"
    lines.append(f"  Config: generation {c['generation']}; {reload_txt}")
    if lr.get("at") and not lr.get("ok"):
        lines += [f"          ! {line}" for line in str(lr.get("error", "")).splitlines()]
        lines.append("          (the config above the error is still in force)")
    lines += [f"          {f}" for f in c["files"]]
    lines.append(
        f"          models {', '.join(c['models'])}; quorum {c['quorum']}; "
        f"deadline {c['deadline_s']:g}s"
    )

    lines.append(
        f" Watcher: {'armed' if w['armed'] else 'NOT ARMED'}; {w['events']} events, last "
        f"{_ago(w['last_event'], now)}; reconciliation scans {w['reconcile_scans']}, last "
        f"{_ago(w['last_reconcile'], now)}; restarts {w.get('watcher_restarts', 0)}"
    )
    for label in ("rejected", "quarantined"):
        if w.get(label):
            lines.append(
                f"          {label}: " + ", ".join(f"{k} {v}" for k, v in sorted(w[label].items()))
            )
    if w.get("quarantine_refused"):
        lines.append(f"          QUARANTINE REFUSED: {w['quarantine_refused']}")
    trouble = [
        f"{w[k]} {text}"
        for k, text in (
            ("quarantine_failed", "files could not be quarantined"),
            ("scan_errors", "batch looks failed"),
        )
        if w.get(k)
    ]
    if trouble:
        lines.append(f"          {'; '.join(trouble)} (see the log)")

    where = "embedded" if db["embedded"] else "external"
    flags = [
        "connected" if db["connected"] else "NOT CONNECTED",
        "leader" if db["leader"] else "NOT LEADER",
    ]
    if db.get("epoch") is not None:
        flags.append(f"epoch {db['epoch']}")
    lines.append(f"Database: {where} {db['dsn'] or '-'}; schema {db['schema']}; {', '.join(flags)}")
    if db.get("last_error"):
        lines.append(f"          last error: {db['last_error']}")

    agents = s.get("agents") or []
    lines.append(f"  Agents: {sum(1 for a in agents if a.get('connected'))} of {len(agents)} up")
    if agents:
        header = "NODE PID UP POLICY MEMS CPUS HEARTBEAT TMPFS_USED FREE LOCAL".split()
        rows = [[h.replace("_", " ") for h in header]]
        for a in agents:
            lp = a.get("last_placement")
            local = "-" if lp is None else f"{100 * float(lp):.1f}%"
            if not a.get("connected"):
                rows.append([str(a["node"]), "-", "no", "-", "-", "-", "-", "-", "-", local])
            else:
                rows.append(
                    [
                        str(a["node"]),
                        str(a.get("pid") or "-"),
                        "yes",
                        str(a.get("policy") or "-"),
                        _ranges(a.get("mems")),
                        _ranges(a.get("cpus")),
                        f"{_duration(a.get('last_heartbeat_age_s'))} ago",
                        _bytes(a.get("tmpfs_used")),
                        _bytes(a.get("tmpfs_free")),
                        local,
                    ]
                )
            if a.get("restarts"):
                rows[-1][2] += f" ({a['restarts']} restarts)"
        lines += _table(rows)

    batches = s.get("batches") or []
    lines.append(f" Batches: {len(batches)} in flight")
    if batches:
        rows = [["BATCH", "STATE", "PRESENT", "MISSING", "AGE", "DEADLINE IN", "NOTE"]]
        for b in batches:
            state_txt = b["state"] + (" (degraded)" if b.get("degraded") else "")
            rows.append(
                [
                    b["batch_id"],
                    state_txt,
                    f"{len(b.get('present') or [])}/"
                    f"{len(b.get('present') or []) + len(b.get('missing') or [])}",
                    ", ".join(b.get("missing") or []) or "-",
                    _duration(b.get("age_s")),
                    _duration(b.get("deadline_in_s")),
                    _note(b),
                ]
            )
        lines += _table(rows)
    finished = s.get("finished") or []
    if finished:
        lines.append(" Recently finished:")
        rows = [["BATCH", "STATE", "FINISHED", "NOTE"]]
        rows += [
            [b["batch_id"], b["state"], _ago(b.get("finished_at"), now), _note(b)] for b in finished
        ]
        lines += _table(rows)
    return "\n".join(lines)


# -- commands ---------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Print the daemon's status once, or every --interval seconds with --watch."""
    if not args.watch:
        data = _call(args, "status")
        print(json.dumps(data, indent=2, default=str) if args.json else render_status(data))
        return EXIT_OK
    while True:
        try:
            data = _call(args, "status")
        except ControlError as e:  # keep watching: the daemon may come (back)
            if args.json:
                print(json.dumps({"error": str(e)}), flush=True)
            else:
                print(f"\033[2J\033[H{_when(time.time())}\ncoordinatorctl: {e}", flush=True)
        else:
            if args.json:
                print(json.dumps(data, default=str), flush=True)  # one document per line
            else:
                print(f"\033[2J\033[H{render_status(data)}", flush=True)
        time.sleep(args.interval)


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask for a reload and wait for its outcome; exit 1 if the daemon rejected it."""
    result = _call(args, "reload")
    if result["ok"]:
        print("reloaded: the new config is in force")
        return EXIT_OK
    print(
        f"coordinatorctl: reload rejected, the old config stays: {result['error']}", file=sys.stderr
    )
    return EXIT_ERROR


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config like the daemon does (`nginx -t`); no daemon needed."""
    from agents.crosscheck import load_crosscheck

    path = args.config or DEFAULT_CONFIG
    try:
        cfg = load_config(path)
        load_crosscheck(cfg.crosscheck_function)  # fails here, not in an agent at run time
    except ConfigError as e:
        print(f"coordinatorctl: {e}", file=sys.stderr)
        print(f"configuration test failed: {path}", file=sys.stderr)
        return EXIT_ERROR
    if args.explain or args.describe:
        print("\n".join(explain(cfg, describe=args.describe)))
    print(f"configuration ok: {', '.join(cfg.sources)}")
    database = "embedded" if cfg.database.embedded else redact_dsn(cfg.database.dsn)
    print(
        f"  models {', '.join(cfg.batch.models)}; quorum {cfg.batch.quorum}; deadline "
        f"{cfg.batch.deadline_s:g}s; nodes "
        + "; ".join(f"{n.id}: {', '.join(n.models)}" for n in cfg.nodes)
        + f"; database {database}"
    )
    return EXIT_OK


def cmd_batches(args: argparse.Namespace) -> int:
    """Recent ledger rows, newest first."""
    rows = _call(args, "batches", limit=args.limit, state=args.state, host=args.host)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    table = [["BATCH", "STATE", "ROWS", "KAPPA", "FIRST SEEN", "MISSING / ERROR"]]
    for r in rows:
        kappa = f"{r['fleiss_kappa']:.3f}" if r.get("fleiss_kappa") is not None else "-"
        note = ", ".join(r.get("models_missing") or [])
        if r.get("error"):
            note = (note + "; " if note else "") + str(r["error"]).replace("\n", " ")
        table.append(
            [
                r["batch_id"],
                r["state"]
                + (" (degraded)" if r.get("degraded") and r["state"] != "degraded" else ""),
                str(r.get("rows") or 0),
                kappa,
                str(r.get("first_seen") or "-")[:19],
                note or "-",
            ]
        )
    print("\n".join(_table(table, indent="")))
    if not rows:
        where = f" of host {args.host}" if args.host else ""
        print(f"(no batches{where}" + (f" in state {args.state})" if args.state else ")"))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """One batch: its ledger row, timings, placement, agreement matrix and error."""
    row = _call(args, "show", batch_id=args.batch)
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
        "deadline_at",
        "finished_at",
        "lake_path",
        "error",
    ):
        value = row.get(key)
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        print(f"{key + ':':<16} {'-' if value is None else value}")
    timings = row.get("timings") or {}
    if timings:
        print("timings:")
        ordered = Timings.from_json(timings).in_order()  # pipeline order, nodes after phases
        print("\n".join(_table([[k.removesuffix("_ms"), f"{ms:.1f} ms"] for k, ms in ordered])))
    staged = row.get("staged_bytes") or {}
    if staged:
        print("staged:         " + "  ".join(f"node{k} {_bytes(v)}" for k, v in staged.items()))
    placement = row.get("placement") or {}
    if placement:
        print("placement:")
        rows = []
        for node, p in sorted(placement.items()):
            if isinstance(p, dict) and "fraction" in p:
                rows.append(
                    [
                        f"node{node}",
                        f"{100 * float(p['fraction']):.1f}% node-local",
                        f"{p.get('local_pages', '?')} of {p.get('pages', '?')} pages",
                        str(p.get("method", "")),
                    ]
                )
            else:
                rows.append([str(node), json.dumps(p, sort_keys=True), "", ""])
        print("\n".join(_table(rows)))
    for line in render_usage(row):
        print(line)
    if row.get("consensus_agreement"):
        print(
            "agreement with the consensus: "
            + "  ".join(f"{m} {v:.3f}" for m, v in sorted(row["consensus_agreement"].items()))
        )
    pairs = row.get("agreement") or []
    if pairs:
        models = sorted({p["model_a"] for p in pairs} | {p["model_b"] for p in pairs})
        pair = {(p["model_a"], p["model_b"]): p["agreement"] for p in pairs}
        print("pairwise agreement:")
        matrix = [["", *models]]
        for a in models:
            cells = [a]
            for b in models:
                v = 1.0 if a == b else pair.get((a, b), pair.get((b, a)))
                cells.append("-" if v is None else f"{v:.3f}")
            matrix.append(cells)
        print("\n".join(_table(matrix)))
    return EXIT_OK


def render_usage(row: dict[str, Any]) -> list[str]:
    """The lines of `show` about a batch's compression and its per-node accounting
    (docs/operations.md): the bytes each agent copied and read, with those from another
    node's memory (and, for copies, from no memory at all), its decoding CPU and peak RSS."""
    out: list[str] = []
    stored, decoded = row.get("compressed_bytes"), row.get("decoded_bytes")
    if stored is not None and decoded is not None:
        ratio = f"{decoded / stored:.2f}x" if stored else "-"
        cpu = row.get("encode_cpu_s")
        sdk = "not recorded" if cpu is None else f"{cpu:.3f} s CPU"
        out.append(
            f"{'compression:':<16} {ratio} ({_bytes(stored)} stored, {_bytes(decoded)} decoded;"
            f" SDK encode {sdk})"
        )
    usage = row.get("node_usage") or {}
    if not usage:
        return out
    out.append("per node:        from another node / all bytes (copies: + from no memory)")

    def part(u: dict[str, Any], total: str, remote: str, absent: str = "") -> str:
        if u.get(total) is None:
            return "-"
        text = f"{_bytes(u.get(remote))} / {_bytes(u[total])}"
        return text + (f" + {_bytes(u.get(absent))}" if absent else "")

    table = [["node", "stage", "cross-check", "aggregate copy", "aggregate", "decode", "peak RSS"]]
    for node, u in sorted(usage.items(), key=lambda kv: int(kv[0])):
        peak = u.get("peak_rss_bytes")
        rss = _bytes(peak) if peak is not None else "-"
        if peak is not None and stored and decoded:
            rss += f" ({peak / stored:.1f}x stored, {peak / decoded:.1f}x decoded)"
        if (u.get("work_ranges") or 1) > 1:
            rss += f", in {u['work_ranges']} ranges of item ids"
        cpu = u.get("decode_cpu_s")
        table.append(
            [
                f"node{node}",
                part(u, "stage_copied_bytes", "stage_remote_bytes", "stage_absent_bytes"),
                part(u, "crosscheck_read_bytes", "crosscheck_remote_bytes"),
                part(
                    u,
                    "aggregate_copied_bytes",
                    "aggregate_copied_remote_bytes",
                    "aggregate_copied_absent_bytes",
                ),
                part(u, "aggregate_read_bytes", "aggregate_remote_bytes"),
                "-" if cpu is None else f"{cpu:.3f} s",
                rss,
            ]
        )
    out += _table(table)
    return out


def cmd_metrics(args: argparse.Namespace) -> int:
    """The daemon's Prometheus exposition, as `GET /metrics` would give it."""
    print(_call(args, "metrics"), end="")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo end to end on the embedded default."""
    from coordinator.ctl.demo import render, run_demo

    summary = run_demo(
        batches=args.batches, rows=args.rows, state_dir=args.state_dir, lake_format=args.lake
    )
    print(json.dumps(summary, indent=2, default=str) if args.json else render(summary))
    return EXIT_OK if summary["ok"] else EXIT_ERROR


# -- the command line -------------------------------------------------------------------------


def _limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
    if not 1 <= n <= 10_000:
        raise argparse.ArgumentTypeError(f"expected 1..10000, found {n}")
    return n


def _host(text: str) -> str:
    from coordinator.core.config import HOST_ID_RE

    if not HOST_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected a host id (letters, digits, '.', '-', '_'; 1..63), found {text!r}"
        )
    return text


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, found {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, found {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    p = argparse.ArgumentParser(
        prog="coordinatorctl",
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 daemon not running, 4 state unknown",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def common(timeout: float) -> argparse.ArgumentParser:
        c = argparse.ArgumentParser(add_help=False)
        c.add_argument("--socket", help="the daemon's control socket")
        c.add_argument("--config", help=f"coordinator.toml (default {DEFAULT_CONFIG})")
        c.add_argument(
            "--timeout",
            type=_positive,
            default=timeout,
            help=f"seconds to wait for the daemon's answer before exit 4 (default {timeout:g})",
        )
        return c

    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", parents=[common(30)], help="what the daemon is doing")
    s.add_argument("--json", action="store_true", help="the same data as JSON")
    s.add_argument("--watch", action="store_true", help="refresh until interrupted")
    s.add_argument("--interval", type=_positive, default=2.0, help="seconds between refreshes")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser(
        "reload", parents=[common(60)], help="re-read the config; wait for the outcome"
    )
    s.set_defaults(func=cmd_reload)

    s = sub.add_parser("check-config", help="validate a config, like nginx -t (no daemon)")
    s.add_argument("--config", help=f"coordinator.toml (default {DEFAULT_CONFIG})")
    s.add_argument("--explain", action="store_true", help="show which file set each key")
    s.add_argument(
        "--describe",
        action="store_true",
        help="--explain, adding what each key is for, its allowed values, [restart]",
    )
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("batches", parents=[common(30)], help="recent batches from the ledger")
    s.add_argument("--limit", type=_limit, default=20, help="at most N rows (1..10000)")
    s.add_argument("--state", choices=STATES, help="only batches in this state")
    s.add_argument(
        "--host",
        type=_host,
        help="another host's batches from the shared ledger (default: the daemon's own host)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_batches)

    s = sub.add_parser("show", parents=[common(30)], help="one batch from the ledger")
    s.add_argument("batch")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("metrics", parents=[common(30)], help="the daemon's Prometheus metrics")
    s.set_defaults(func=cmd_metrics)

    s = sub.add_parser("demo", help="run the whole flow on the embedded default")
    s.add_argument("--batches", type=int, default=3)
    s.add_argument("--rows", type=int, default=10_000)
    s.add_argument("--state-dir", help="keep lake, staging and database here afterwards")
    s.add_argument(
        "--lake",
        choices=("parquet", "iceberg"),
        default="parquet",
        help="the lake's format (make demo: iceberg, and prints a query to paste)",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)

    # Commands that live with what they run. An import that fails here fails coordinatorctl
    # loudly: no command quietly disappears.
    topology.register_cli(sub)
    render.register_cli(sub)
    bench.register_cli(sub)
    lake.register_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `coordinatorctl`."""
    from coordinator.core.errors import StateUnknown

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version exit 0, a usage error 2
        return EXIT_OK if not e.code else EXIT_USAGE
    try:
        return int(args.func(args))
    except DaemonNotRunning as e:
        print(f"coordinatorctl: daemon not running: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except StateUnknown as e:
        print(f"coordinatorctl: state unknown: {e}", file=sys.stderr)
        return EXIT_UNKNOWN
    except CoordinatorError as e:
        print(f"coordinatorctl: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
