"""Configuration: `coordinator.toml`, then `conf.d/*.toml` in lexical order, later wins key by key.

Everything here is pure over plain values except `load_config`, which reads the files. The merged
result is validated into frozen dataclasses; every error names the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.core.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

DEFAULTS: dict[str, Any] = {
    "paths": {
        "staging": "/data/hot/staging",
        "lake": "/data/lake",
        "node_tmpfs": "/dev/shm/numa-coordinator/node{node}",
        "state_dir": "/var/lib/numa-coordinator",
        "runtime_dir": "/run/numa-coordinator",
    },
    "batch": {
        "models": ["slm-1", "slm-2", "slm-3", "slm-4", "slm-5", "slm-6", "slm-7"],
        "deadline_s": 600.0,
        "quorum": 7,
        "max_in_flight": 4,
    },
    "node": [
        {"id": 0, "models": ["slm-1", "slm-2", "slm-3", "slm-4"]},
        {"id": 1, "models": ["slm-5", "slm-6", "slm-7"]},
    ],
    "database": {
        "dsn": "",
        "schema": "numa_coordinator",
        "password_file": "",
        "retry_max_s": 30.0,
    },
    "parquet": {"compression": "zstd", "level": 3},
    "barrier": {
        "backend": "inotify",
        "debounce_ms": 20,
        "step_ms": 2,
        "reconcile_s": 5.0,
        "settle_s": 5.0,
    },
    "crosscheck": {"function": "agents.crosscheck:crosscheck"},
    "agents": {"heartbeat_s": 2.0, "step_timeout_s": 300.0, "numactl": "numactl"},
    "log": {"level": "info", "format": "auto"},
    "placement": {"min_fraction": 0.99},
    "metrics": {"listen": "", "loop_lag_interval_ms": 0},
}

# Keys of a [[node]] table and their defaults.
NODE_DEFAULTS: dict[str, Any] = {"id": None, "models": [], "cpus": ""}

_PATH_KEYS = ("staging", "lake", "node_tmpfs", "state_dir", "runtime_dir")


@dataclass(frozen=True)
class Paths:
    """Where the daemon reads, stages, archives and keeps its state."""

    staging: Path
    lake: str  # a local path or a pyarrow.fs URI (s3://...)
    node_tmpfs: str  # template with {node}
    state_dir: Path
    runtime_dir: Path

    def tmpfs_for(self, node: int) -> Path:
        """The node-local tmpfs folder of `node`."""
        return Path(self.node_tmpfs.format(node=node))

    @property
    def agent_socket(self) -> Path:
        """The Unix socket the agents connect to."""
        return self.runtime_dir / "agents.sock"

    @property
    def control_socket(self) -> Path:
        """The Unix socket `coordinatorctl` talks to."""
        return self.runtime_dir / "control.sock"


@dataclass(frozen=True)
class BatchConfig:
    """Which models make a batch, and how long to wait for them."""

    models: tuple[str, ...]
    deadline_s: float
    quorum: int
    max_in_flight: int = 4  # batches between ready and committed at once


@dataclass(frozen=True)
class NodeConfig:
    """One NUMA node: the models cross-checked there and, optionally, the CPUs its agent uses."""

    id: int
    models: tuple[str, ...]
    cpus: str = ""  # empty: all CPUs of the node


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL: a DSN, or empty for the embedded server under state_dir."""

    dsn: str
    schema: str
    password_file: str
    retry_max_s: float

    @property
    def embedded(self) -> bool:
        """True when no DSN is configured and the daemon runs its own PostgreSQL."""
        return not self.dsn


@dataclass(frozen=True)
class ParquetConfig:
    """How result files are compressed."""

    compression: str
    level: int | None


@dataclass(frozen=True)
class BarrierConfig:
    """Watcher tuning and the reconciliation scan period."""

    debounce_ms: int
    step_ms: int
    reconcile_s: float
    settle_s: float  # an unreadable file unchanged this long is quarantined
    backend: str = "inotify"  # or "watchfiles"


@dataclass(frozen=True)
class AgentsConfig:
    """Agent heartbeats and step limits."""

    heartbeat_s: float
    step_timeout_s: float
    numactl: str


@dataclass(frozen=True)
class LogConfig:
    """Log level and format (auto: JSON when stdout is not a terminal)."""

    level: str
    format: str


@dataclass(frozen=True)
class Config:
    """The validated, merged configuration."""

    paths: Paths
    batch: BatchConfig
    nodes: tuple[NodeConfig, ...]
    database: DatabaseConfig
    parquet: ParquetConfig
    barrier: BarrierConfig
    crosscheck_function: str
    agents: AgentsConfig
    log: LogConfig
    placement_min_fraction: float = 0.99
    metrics_listen: str = ""  # host:port of the Prometheus endpoint; empty: off
    loop_lag_interval_ms: int = 0  # event-loop lag sampler period; 0: off
    sources: tuple[str, ...] = ()
    provenance: Mapping[str, str] = field(default_factory=dict)

    def node(self, node_id: int) -> NodeConfig:
        """The config of node `node_id`; ConfigError if it is not configured."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ConfigError(f"node {node_id} is not configured (configured: {self.node_ids})")

    @property
    def node_ids(self) -> tuple[int, ...]:
        """The configured NUMA node ids, in config order."""
        return tuple(n.id for n in self.nodes)

    def node_of_model(self, model: str) -> int:
        """The node where `model` is cross-checked."""
        for n in self.nodes:
            if model in n.models:
                return n.id
        raise ConfigError(f"model {model!r} is assigned to no [[node]]")


def config_files(path: Path) -> list[Path]:
    """The main file, then every `conf.d/*.toml` beside it in lexical order."""
    confd = path.parent / "conf.d"
    files = [path]
    if confd.is_dir():
        files += sorted(p for p in confd.iterdir() if p.suffix == ".toml" and p.is_file())
    return files


def read_toml(path: Path) -> dict[str, Any]:
    """Parse one TOML file; syntax errors name the file, line and column."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        where = f"{path}:{m.group(1)}" if m else str(path)
        text = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
        col = f" (column {m.group(2)})" if m else ""
        raise ConfigError(f"{where}: TOML syntax error: {text}{col}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def merge(layers: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge (source, table) layers key by key, later wins; return the result and key provenance.

    Tables merge recursively; arrays (such as `[[node]]`) are replaced whole.
    """
    merged: dict[str, Any] = {}
    prov: dict[str, str] = {}

    def walk(dst: dict[str, Any], src: Mapping[str, Any], prefix: str, source: str) -> None:
        for key, value in src.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                walk(dst[key], value, dotted + ".", source)
            elif isinstance(value, dict):
                dst[key] = {}
                walk(dst[key], value, dotted + ".", source)
            else:
                dst[key] = value
                for k in [k for k in prov if k.startswith(dotted + ".")]:
                    del prov[k]
                prov[dotted] = source

    for source, table in layers:
        walk(merged, table, "", source)
    return merged, prov


def load_config(path: str | os.PathLike[str], *, base: Mapping[str, Any] | None = None) -> Config:
    """Read, merge and validate the config at `path` and its conf.d drop-ins."""
    main = Path(path).resolve()
    if not main.is_file():
        raise ConfigError(f"{main}: config file not found")
    layers: list[tuple[str, dict[str, Any]]] = [("<defaults>", _deepcopy(base or DEFAULTS))]
    files = config_files(main)
    layers.extend((str(f), read_toml(f)) for f in files)
    _check_unknown(layers)
    merged, prov = merge(layers)
    return validate(merged, prov, base_dir=main.parent, sources=tuple(str(f) for f in files))


def line_of(path: str, dotted: str) -> int | None:
    """The line of `path` that sets `dotted` (e.g. 'batch.quorum', 'node[1].models'), if any."""
    m = re.fullmatch(r"(?P<sec>[A-Za-z_]+)(?:\[(?P<idx>\d+)\])?(?:\.(?P<key>\w+))?", dotted)
    if m is None:
        return None
    sec, idx, key = m.group("sec"), m.group("idx"), m.group("key")
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    current, count = "", -1
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        header = re.fullmatch(r"\[\[?\s*([\w.]+)\s*\]\]?", stripped.split("#")[0].strip())
        if header:
            current = header.group(1)
            if stripped.startswith("[[") and current == sec:
                count += 1
            if key is None and current == sec and (idx is None or int(idx) == count):
                return n
            continue
        if key and current == sec and (idx is None or int(idx) == count):
            if re.match(rf"{re.escape(key)}\s*=", stripped):
                return n
    return None


def locate(source: str, dotted: str) -> str:
    """'file:line' for a key when the line can be found, else the file."""
    if source.startswith("<"):
        return source
    line = line_of(source, dotted)
    return f"{source}:{line}" if line else source


def _deepcopy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy(v) for v in value]
    return value


def _check_unknown(layers: list[tuple[str, dict[str, Any]]]) -> None:
    for source, table in layers[1:]:
        for section, body in table.items():
            if section not in DEFAULTS:
                raise ConfigError(f"{locate(source, section)}: unknown section [{section}]")
            if section == "node":
                if not isinstance(body, list):
                    raise ConfigError(f"{source}: node: expected an array of tables [[node]]")
                for i, entry in enumerate(body):
                    if not isinstance(entry, dict):
                        raise ConfigError(f"{source}: node[{i}]: expected a table")
                    for key in entry:
                        if key not in NODE_DEFAULTS:
                            raise ConfigError(
                                f"{locate(source, f'node[{i}].{key}')}: unknown key node[{i}].{key}"
                            )
                continue
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: {section}: expected a table [{section}]")
            for key in body:
                if key not in DEFAULTS[section]:
                    raise ConfigError(
                        f"{locate(source, f'{section}.{key}')}: unknown key {section}.{key}"
                    )


class _Reader:
    """Typed access to the merged dict; errors name the file that set the key."""

    def __init__(self, merged: dict[str, Any], prov: Mapping[str, str]) -> None:
        self.merged = merged
        self.prov = prov

    def where(self, dotted: str) -> str:
        head = dotted.split("[")[0]
        source = self.prov.get(dotted) or self.prov.get(head) or "<defaults>"
        return locate(source, dotted)

    def fail(self, dotted: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"{self.where(dotted)}: {dotted}: expected {expected}, found {found!r}")

    def get(self, section: str, key: str) -> Any:
        return self.merged[section][key]

    def str_(self, section: str, key: str) -> str:
        v = self.get(section, key)
        if not isinstance(v, str):
            raise self.fail(f"{section}.{key}", "a string", v)
        return v

    def num(self, section: str, key: str, *, positive: bool = True) -> float:
        v = self.get(section, key)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(f"{section}.{key}", "a number", v)
        if positive and v <= 0:
            raise self.fail(f"{section}.{key}", "a number > 0", v)
        return float(v)

    def int_(self, section: str, key: str, lo: int, hi: int) -> int:
        v = self.get(section, key)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(f"{section}.{key}", f"an integer in {lo}..{hi}", v)
        return v


def _names(r: _Reader, dotted: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise r.fail(dotted, "an array of model names", value)
    for m in value:
        if not NAME_RE.fullmatch(m):
            raise r.fail(dotted, f"model names matching {NAME_RE.pattern}", m)
    if len(set(value)) != len(value):
        raise r.fail(dotted, "distinct model names", value)
    return tuple(value)


def validate(
    merged: dict[str, Any],
    prov: Mapping[str, str],
    *,
    base_dir: Path,
    sources: tuple[str, ...] = (),
) -> Config:
    """Turn a merged config dict into a `Config`, or raise ConfigError naming file and key."""
    r = _Reader(merged, prov)

    def path_of(key: str) -> str:
        raw = r.str_("paths", key)
        if not raw:
            raise r.fail(f"paths.{key}", "a non-empty path", raw)
        if key == "lake" and "://" in raw:
            return raw
        p = Path(raw)
        return str(p if p.is_absolute() else (base_dir / p))

    tmpfs = path_of("node_tmpfs")
    if "{node}" not in tmpfs:
        raise r.fail("paths.node_tmpfs", "a template containing {node}", tmpfs)
    paths = Paths(
        staging=Path(path_of("staging")),
        lake=path_of("lake"),
        node_tmpfs=tmpfs,
        state_dir=Path(path_of("state_dir")),
        runtime_dir=Path(path_of("runtime_dir")),
    )
    # A Unix socket path is limited to 107 bytes; say so now rather than at bind time.
    if len(str(paths.control_socket).encode()) > 107:
        raise r.fail("paths.runtime_dir", "a path short enough for a Unix socket", str(paths))

    models = _names(r, "batch.models", r.get("batch", "models"))
    if not models:
        raise r.fail("batch.models", "at least one model", [])
    quorum = r.int_("batch", "quorum", 1, len(models))
    batch = BatchConfig(
        models=models,
        deadline_s=r.num("batch", "deadline_s"),
        quorum=quorum,
        max_in_flight=r.int_("batch", "max_in_flight", 1, 1000),
    )

    raw_nodes = merged.get("node")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise r.fail("node", "at least one [[node]] table", raw_nodes)
    nodes: list[NodeConfig] = []
    seen_models: dict[str, int] = {}
    for i, entry in enumerate(raw_nodes):
        where = f"node[{i}]"
        nid = entry.get("id")
        if isinstance(nid, bool) or not isinstance(nid, int) or not 0 <= nid < 1024:
            raise r.fail(f"{where}.id", "a NUMA node number 0..1023", nid)
        if nid in [n.id for n in nodes]:
            raise r.fail(f"{where}.id", "a node id not used by another [[node]]", nid)
        nmodels = _names(r, f"{where}.models", entry.get("models", []))
        for m in nmodels:
            if m not in models:
                raise r.fail(f"{where}.models", f"models listed in batch.models {list(models)}", m)
            if m in seen_models:
                raise r.fail(f"{where}.models", "each model on one node only", m)
            seen_models[m] = nid
        cpus = entry.get("cpus", "")
        if not isinstance(cpus, str) or (cpus and not re.fullmatch(r"[0-9,\-]+", cpus)):
            raise r.fail(f"{where}.cpus", "a CPU list such as '0-1,36-37'", cpus)
        nodes.append(NodeConfig(id=nid, models=nmodels, cpus=cpus))
    unassigned = [m for m in models if m not in seen_models]
    if unassigned:
        raise r.fail(
            "node",
            f"every model of batch.models assigned to a node; missing {unassigned}",
            [list(n.models) for n in nodes],
        )

    dsn = r.str_("database", "dsn")
    schema = r.str_("database", "schema")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise r.fail("database.schema", "a lower-case SQL identifier", schema)
    database = DatabaseConfig(
        dsn=dsn,
        schema=schema,
        password_file=r.str_("database", "password_file"),
        retry_max_s=r.num("database", "retry_max_s"),
    )

    compression = r.str_("parquet", "compression")
    if compression not in ("zstd", "snappy", "gzip", "brotli", "lz4", "none"):
        raise r.fail(
            "parquet.compression", "one of zstd, snappy, gzip, brotli, lz4, none", compression
        )
    level_raw = r.get("parquet", "level")
    if compression in ("zstd", "gzip", "brotli"):
        level: int | None = r.int_("parquet", "level", 1, 22)
    else:
        level = None if level_raw in (None, 0) else r.int_("parquet", "level", 0, 22)

    barrier = BarrierConfig(
        debounce_ms=r.int_("barrier", "debounce_ms", 1, 60_000),
        step_ms=r.int_("barrier", "step_ms", 1, 10_000),
        reconcile_s=r.num("barrier", "reconcile_s"),
        settle_s=r.num("barrier", "settle_s"),
        backend=r.str_("barrier", "backend"),
    )
    if barrier.backend not in ("inotify", "watchfiles"):
        raise r.fail("barrier.backend", "inotify or watchfiles", barrier.backend)
    fn = r.str_("crosscheck", "function")
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", fn):
        raise r.fail("crosscheck.function", "an import path 'module:function'", fn)
    agents = AgentsConfig(
        heartbeat_s=r.num("agents", "heartbeat_s"),
        step_timeout_s=r.num("agents", "step_timeout_s"),
        numactl=r.str_("agents", "numactl"),
    )
    level_name = r.str_("log", "level").lower()
    if level_name not in ("debug", "info", "warning", "error"):
        raise r.fail("log.level", "one of debug, info, warning, error", level_name)
    fmt = r.str_("log", "format")
    if fmt not in ("auto", "json", "console"):
        raise r.fail("log.format", "one of auto, json, console", fmt)
    min_fraction = r.num("placement", "min_fraction")
    if not 0 < min_fraction <= 1:
        raise r.fail("placement.min_fraction", "a fraction in (0, 1]", min_fraction)
    listen = r.str_("metrics", "listen")
    if listen and not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", listen):
        raise r.fail("metrics.listen", "host:port such as 127.0.0.1:9464", listen)
    return Config(
        paths=paths,
        batch=batch,
        nodes=tuple(nodes),
        database=database,
        parquet=ParquetConfig(compression=compression, level=level),
        barrier=barrier,
        crosscheck_function=fn,
        agents=agents,
        log=LogConfig(level=level_name, format=fmt),
        placement_min_fraction=min_fraction,
        metrics_listen=listen,
        loop_lag_interval_ms=r.int_("metrics", "loop_lag_interval_ms", 0, 60_000),
        sources=sources,
        provenance=dict(prov),
    )


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by '***', safe to log and show."""
    if not dsn:
        return ""
    out = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
    # key=value form: the value may be quoted (with spaces inside) and '=' may have spaces.
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", out)
