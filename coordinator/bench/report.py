"""The benchmark's rows and their rendering: pure functions over the measured figures.

Every row holds our figure, the anchor measured in the same run, their ratio, the target and
whether it is met. `met` is None when the row has no target, when the run is a quick one (the
smoke test: no thresholds), or when a figure could not be measured (the note says why).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Check = Callable[[float, float | None, float | None], bool]


@dataclass
class Row:
    """One line of the table."""

    key: str
    figure: str
    unit: str
    ours: float | None
    anchor: float | None
    anchor_label: str
    target: str
    check: Check | None = field(default=None, repr=False)
    note: str = ""
    ratio: float | None = None
    met: bool | None = None

    def evaluate(self, *, thresholds: bool) -> Row:
        """Fill in the ratio and, with thresholds, whether the target is met."""
        if self.ours is not None and self.anchor:
            self.ratio = self.ours / self.anchor
        if thresholds and self.check is not None and self.ours is not None:
            self.met = bool(self.check(self.ours, self.anchor, self.ratio))
        return self

    def as_dict(self) -> dict[str, Any]:
        """The row as results.json stores it."""
        d = asdict(self)
        d.pop("check")
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, like numpy's default."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float | None:
    """The median, or None for no values."""
    xs = list(values)
    return statistics.median(xs) if xs else None


def _num(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if unit == "%":
        return f"{v:.2f} %"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f} M{unit}" if unit.endswith("/s") else f"{v:,.0f} {unit}"
    if abs(v) >= 100:
        return f"{v:,.0f} {unit}"
    if abs(v) >= 10:
        return f"{v:.1f} {unit}"
    return f"{v:.3g} {unit}" if abs(v) >= 0.01 else f"{v:.3f} {unit}"


def _met(row: Row) -> str:
    if row.met is None:
        return "—" if not row.target or row.target == "—" else "n/a"
    return "yes" if row.met else "NO"


def table_cells(rows: Sequence[Row]) -> list[list[str]]:
    """Rows as text cells: figure, ours, anchor, ratio, target, met?"""
    out = []
    for r in rows:
        anchor = _num(r.anchor, r.unit)
        if r.anchor_label:
            anchor = f"{anchor} ({r.anchor_label})" if r.anchor is not None else r.anchor_label
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "—"
        out.append([r.figure, _num(r.ours, r.unit), anchor, ratio, r.target or "—", _met(r)])
    return out


HEADER = ["figure", "ours", "anchor (same run)", "ratio", "target", "met?"]


def render_text(rows: Sequence[Row]) -> str:
    """The table for a terminal, with the notes under it."""
    cells = [HEADER, *table_cells(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    widths = [min(w, 60) for w in widths]
    lines = []
    for i, c in enumerate(cells):
        lines.append("  ".join(c[j][: widths[j]].ljust(widths[j]) for j in range(len(c))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"[{r.key}] {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row]) -> str:
    """The table as Markdown (docs/benchmarks.md)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(x.replace("|", "\\|") for x in c) + " |" for c in table_cells(rows)]
    notes = [f"- **{r.figure}**: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import importlib.metadata as md

    cpu = re.search(r"model name\s*:\s*(.+)", _read("/proc/cpuinfo"))
    versions: dict[str, str | None] = {}
    for pkg in (
        "pyarrow",
        "asyncpg",
        "watchfiles",
        "anyio",
        "uvloop",
        "numpy",
        "pgserver",
        "duckdb",
    ):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    nodes = sorted(
        int(m.group(1))
        for p in Path("/sys/devices/system/node").glob("node*")
        if (m := re.fullmatch(r"node(\d+)", p.name))
    )
    mem = re.search(r"MemTotal:\s+(\d+) kB", _read("/proc/meminfo"))
    return {
        "cpu": cpu.group(1).strip() if cpu else platform.processor(),
        "cores": os.cpu_count(),
        "numa_nodes": nodes,
        "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "load_avg_at_start": list(os.getloadavg()),
    }


def write_results(path: Path, doc: dict[str, Any]) -> None:
    """Write results.json (atomically, so a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def rows_from_results(doc: dict[str, Any]) -> list[Row]:
    """Rebuild the rows of a results.json (for rendering the docs page from it)."""
    keep = {f for f in Row.__dataclass_fields__ if f != "check"}
    return [Row(**{k: v for k, v in r.items() if k in keep}) for r in doc["rows"]]


def render_docs(doc: dict[str, Any]) -> str:
    """The machine block and the table of one run, for docs/benchmarks.md."""
    m = doc["machine"]
    v = m["versions"]
    lines = [
        f"Run: `{doc['command']}` on {doc['finished_at']} ({doc['duration_s']:.0f} s).",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, NUMA nodes {m['numa_nodes']}, {m['mem_gib']} GiB",
        f"- kernel {m['kernel']}, Python {m['python']}, PostgreSQL {doc.get('postgres', '?')}, "
        f"psql {str(doc.get('psql') or '?').removeprefix('psql (PostgreSQL) ')}",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- load average at start: {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}",
        f"- batches: {doc['params']['barrier_batches']} barrier batches of 7 small files; "
        f"{doc['params']['full_batches']} full batches of 7 files of "
        f"{doc['params']['file_mb']:.1f} MB ({doc['params']['rows']:,} rows each)",
        "",
        render_markdown(rows_from_results(doc)),
    ]
    return "\n".join(lines)


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The results of a partial run (`--only`) laid over an earlier results file: the rows the
    new run measured replace those of the same key and the others stay, each row naming the
    command that measured it; the raw figures of the phases the new run measured replace the
    old ones."""
    if old.get("quick") != new.get("quick"):
        return new  # a quick run's figures mean nothing next to a real run's
    before = {r["key"]: {"command": old.get("command", ""), **r} for r in old.get("rows", [])}
    before.pop("errors", None)
    rows = []
    for r in new["rows"]:  # a row the partial run did not measure keeps the earlier figures
        unmeasured = r["ours"] is None and r["anchor"] is None and r["key"] != "errors"
        if unmeasured and r["key"] in before:
            rows.append(before.pop(r["key"]))
        else:
            before.pop(r["key"], None)
            rows.append({**r, "command": new.get("command", "")})
    rows += before.values()  # rows this version no longer makes
    raw = {**old.get("raw", {}), **{k: v for k, v in new.get("raw", {}).items() if v}}
    return {**new, "rows": rows, "raw": raw}
