"""Configuration: `coordinator.toml`, then `conf.d/*.toml` in lexical order, later wins key by key.

The dataclasses below are the one definition of the configuration. Each field that is a config
key carries `field(metadata=meta(...))`: its help text, whether it needs a restart, and how it
is checked; its type says what it holds (a `Literal` lists the allowed values) and its default
is the built-in default. `SETTINGS`, `DEFAULTS`, the unknown-key checks, the type checks,
`explain` and `restart_changes` are all derived from those fields.

Everything here is pure over plain values except `load_config`, which reads the files. The merged
result is validated into frozen dataclasses; every error names the file and the key.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from coordinator.core.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

BarrierBackend = Literal["inotify", "watchfiles", "notify", "poll"]
Compression = Literal["zstd", "snappy", "gzip", "brotli", "lz4", "none"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
LakeFormat = Literal["parquet", "iceberg"]

# A hook of a key: (reader, dotted key as the error names it, value, the keys read so far).
Hook = Callable[["_Reader", str, Any, Mapping[str, Any]], Any]


@dataclass(frozen=True)
class Meta:
    """What one config field means in TOML; kept in `field(metadata=meta(...))`."""

    help: str  # one line, shown by `coordinatorctl check-config --explain --describe`
    name: str = ""  # the TOML key if not the field name; "section.key" on Config's own fields
    restart: bool = False  # a reload that changes it is rejected (see `restart_changes`)
    range: tuple[int, int] | None = None  # integers: the inclusive bounds
    expect: str = ""  # what a type or range error says is expected, if not derived from the type
    # A path (as every `Path`-typed field is): a non-empty string, resolved against the folder of
    # the main file; with `uri`, a value containing :// (a pyarrow.fs URI) is kept as written.
    path: bool = False
    uri: bool = False
    lower: bool = False  # a choice matched in any case and kept in lower case
    parse: Hook | None = None  # replaces the check derived from the type; returns the value
    check: Hook | None = None  # runs after it; raises `reader.fail(...)` when the value is wrong


def meta(help: str, **kw: Any) -> dict[str, Meta]:
    """The `metadata=` of a config field; see `Meta` for the keywords."""
    return {"config": Meta(help, **kw)}


def _matching(pattern: str, expected: str, *, empty_ok: bool = False) -> Hook:
    """A check: the whole string matches `pattern` (or is empty, with `empty_ok`)."""

    def check(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> None:
        if (value or not empty_ok) and not re.fullmatch(pattern, value):
            raise r.fail(dotted, expected, value)

    return check


def _optional_path(*, uri: bool) -> Hook:
    """A parse hook: a path resolved as `path=True` keys are, or empty (not set)."""

    def parse(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> str:
        return r.optional_path(dotted, value, uri=uri)

    return parse


def _has_node_placeholder(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> None:
    if "{node}" not in value:
        raise r.fail(dotted, "a template containing {node}", value)


def _fits_a_unix_socket(r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]) -> None:
    # A Unix socket path is limited to 107 bytes; say so now rather than at bind time.
    paths = _section("paths", {**values, dotted: value})
    if len(str(paths.control_socket).encode()) > 107:
        raise r.fail(dotted, "a path short enough for a Unix socket", str(paths))


@dataclass(frozen=True)
class Paths:
    """Where the daemon reads, stages, archives and keeps its state."""

    staging: Path = field(
        default=Path("/data/hot/staging"),
        metadata=meta("hot staging folder: <batch>/<model>.parquet", restart=True),
    )
    lake: str = field(  # a local path or a pyarrow.fs URI (s3://...)
        default="/data/lake",
        metadata=meta(
            "cold tier the aggregating agent writes; a path or a pyarrow.fs URI (s3://...)",
            restart=True,
            path=True,
            uri=True,
        ),
    )
    node_tmpfs: str = field(  # template with {node}
        default="/dev/shm/numa-coordinator/node{node}",
        metadata=meta(
            "the node-local tmpfs folder of each node; must contain {node}",
            restart=True,
            path=True,
            check=_has_node_placeholder,
        ),
    )
    state_dir: Path = field(
        default=Path("/var/lib/numa-coordinator"),
        metadata=meta(
            "daemon state; the embedded PostgreSQL lives in state_dir/pgdata", restart=True
        ),
    )
    runtime_dir: Path = field(
        default=Path("/run/numa-coordinator"),
        metadata=meta(
            "holds control.sock and agents.sock; runtime_dir/control.sock must fit in 107 bytes",
            restart=True,
            check=_fits_a_unix_socket,
        ),
    )

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


def _model_list(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> tuple[str, ...]:
    models = _names(r, dotted, value)
    if not models:
        raise r.fail(dotted, "at least one model", [])
    return models


def _quorum(r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]) -> int:
    return r.integer(dotted, value, 1, len(values["batch.models"]))


@dataclass(frozen=True)
class BatchConfig:
    """Which models make a batch, and how long to wait for them."""

    models: tuple[str, ...] = field(
        default=("slm-1", "slm-2", "slm-3", "slm-4", "slm-5", "slm-6", "slm-7"),
        metadata=meta("the models a batch waits for; distinct names", parse=_model_list),
    )
    deadline_s: float = field(
        default=600.0,
        metadata=meta("seconds from first sight of a batch folder to its deadline"),
    )
    quorum: int = field(
        default=7,
        metadata=meta(
            "the fewest present models with which a batch goes on (degraded) at the deadline",
            parse=_quorum,
        ),
    )
    max_in_flight: int = field(  # batches between ready and committed at once
        default=4,
        metadata=meta("the most batches between ready and committed at once", range=(1, 1000)),
    )


@dataclass(frozen=True)
class NodeConfig:
    """One NUMA node: the models cross-checked there and, optionally, the CPUs its agent uses."""

    id: int = field(
        metadata=meta(
            "NUMA node number, unique among the [[node]] tables",
            restart=True,
            range=(0, 1023),
            expect="a NUMA node number 0..1023",
        )
    )
    models: tuple[str, ...] = field(
        default=(), metadata=meta("the models cross-checked on this node")
    )
    cpus: str = field(  # empty: all CPUs of the node
        default="",
        metadata=meta(
            "CPUs of this node's agent, such as '0-1,36-37'; empty: all CPUs of the node",
            expect="a CPU list such as '0-1,36-37'",
            check=_matching(r"[0-9,\-]+", "a CPU list such as '0-1,36-37'", empty_ok=True),
        ),
    )
    remote: bool = field(
        default=False,
        metadata=meta(
            "the agent runs in another kernel (a VM, another host): the coordinator neither "
            "checks this node on its own host nor reads the node's tmpfs (the aggregated rows "
            "come through the batch's staging folder)",
            restart=True,
        ),
    )
    staging: str = field(
        default="",
        metadata=meta(
            "the staging folder as this node's agent sees it; empty: paths.staging",
            restart=True,
            parse=_optional_path(uri=False),
        ),
    )
    tmpfs: str = field(
        default="",
        metadata=meta(
            "this node's tmpfs folder as its agent sees it; empty: paths.node_tmpfs",
            restart=True,
            parse=_optional_path(uri=False),
        ),
    )
    lake: str = field(
        default="",
        metadata=meta(
            "the lake as this node's agent sees it (a path or a pyarrow.fs URI); empty: paths.lake",
            restart=True,
            parse=_optional_path(uri=True),
        ),
    )


@dataclass(frozen=True)
class AgentPaths:
    """The folders as one node's agent sees them (`Config.agent_paths`)."""

    staging: Path
    tmpfs: Path
    lake: str


@dataclass(frozen=True)
class DatabaseConfig:
    """PostgreSQL: a DSN, or empty for the embedded server under state_dir."""

    dsn: str = field(
        default="",
        metadata=meta(
            "PostgreSQL DSN; empty runs the embedded PostgreSQL under state_dir/pgdata",
            restart=True,
        ),
    )
    schema: str = field(
        default="numa_coordinator",
        metadata=meta(
            "schema of the tables; also keys the leader lock",
            restart=True,
            check=_matching(r"[a-z_][a-z0-9_]{0,62}", "a lower-case SQL identifier"),
        ),
    )
    password_file: str = field(
        default="",
        metadata=meta("file whose stripped content is the database password; empty: none"),
    )
    retry_max_s: float = field(
        default=30.0, metadata=meta("the largest backoff between database retries")
    )

    @property
    def embedded(self) -> bool:
        """True when no DSN is configured and the daemon runs its own PostgreSQL."""
        return not self.dsn


HOST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")


def _host_id(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> str:
    """host.id: a name of letters, digits, '.', '-', '_' (1..63); empty means the hostname."""
    # Empty stays empty here (HostConfig takes the hostname): only the coordinator needs a host
    # id, and checks the hostname at start (check_host_id); an agent in a guest whose hostname
    # is "(none)" reads the same file.
    v = r.string(dotted, value)
    if v and not HOST_ID_RE.fullmatch(v):
        raise r.fail(dotted, _HOST_ID_EXPECTED, v)
    return v


_HOST_ID_EXPECTED = "a name of letters, digits, '.', '-' and '_', 1..63 characters"


def check_host_id(cfg: Config) -> None:
    """The coordinator's check at start: its host id is a name. A configured one was checked
    when read; the hostname that an empty one takes may not be (ConfigError naming host.id)."""
    if not HOST_ID_RE.fullmatch(cfg.host.id):
        where = locate(cfg.provenance.get("host.id", "<defaults>"), "host.id")
        raise ConfigError(
            f"{where}: host.id: expected {_HOST_ID_EXPECTED} (empty takes the machine's "
            f"hostname, which is not one: set host.id), found {cfg.host.id!r}"
        )


def _lease(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> None:
    if value < 1.0:
        raise r.fail(dotted, "a number of seconds >= 1", value)


@dataclass(frozen=True)
class HostConfig:
    """This coordinator's host among several sharing one PostgreSQL database and schema."""

    id: str = field(
        default="",
        metadata=meta(
            "this host's name in the shared ledger (its batches, its leader); empty: the hostname",
            restart=True,
            parse=_host_id,
        ),
    )
    lease_s: float = field(
        default=10.0,
        metadata=meta(
            "the leader's lease: a standby of the same host takes over a leader silent this long",
            restart=True,
            check=_lease,
        ),
    )

    def __post_init__(self) -> None:
        if not self.id:  # the built-in default, Config(): the machine's hostname
            object.__setattr__(self, "id", socket.gethostname())


def _parquet_level(r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]) -> int | None:
    if values["parquet.compression"] in ("zstd", "gzip", "brotli"):
        return r.integer(dotted, value, 1, 22)
    return None if value in (None, 0) else r.integer(dotted, value, 0, 22)


def _one_lake_for_iceberg(r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]) -> None:
    """An Iceberg lake is the same place for every agent: a snapshot names its files by
    absolute location, so a [[node]] lake elsewhere would name files others cannot read."""
    if value != "iceberg":
        return
    for i, n in enumerate(values.get("node", ())):
        if n.lake and n.lake != values["paths.lake"]:
            raise r.fail(
                f"node[{i}].lake",
                f"empty or paths.lake ({values['paths.lake']!r}) with lake.format = 'iceberg' "
                "(a snapshot names its files by absolute location)",
                n.lake,
            )


@dataclass(frozen=True)
class LakeConfig:
    """What the lake is: plain Parquet folders, or Apache Iceberg tables (docs/lake.md)."""

    format: LakeFormat = field(
        default="parquet",
        metadata=meta(
            "parquet: a folder of files per batch; iceberg: tables in the ledger's PostgreSQL"
            " catalog, committed with the ledger",
            restart=True,
            lower=True,
            check=_one_lake_for_iceberg,
        ),
    )
    namespace: str = field(
        default="numa",
        metadata=meta(
            "the Iceberg namespace of the lake's tables",
            restart=True,
            check=_matching(r"[a-z_][a-z0-9_]{0,62}", "a lower-case identifier"),
        ),
    )
    credentials_file: str = field(
        default="",
        metadata=meta(
            "file of S3 keys (access_key_id = ..., secret_access_key = ...) for an s3:// Iceberg"
            " lake; empty: the environment's (AWS_ACCESS_KEY_ID, ...)",
            restart=True,
        ),
    )


@dataclass(frozen=True)
class ParquetConfig:
    """How result files are compressed."""

    compression: Compression = field(
        default="zstd",
        metadata=meta("codec of the cross-check files and of the lake's aggregates.parquet"),
    )
    level: int | None = field(
        default=3,
        metadata=meta(
            "1..22 for zstd, gzip and brotli; accepted (0..22) and unused by the other codecs",
            parse=_parquet_level,
        ),
    )


@dataclass(frozen=True)
class BarrierConfig:
    """Watcher tuning and the reconciliation scan period."""

    debounce_ms: int = field(
        default=20,
        metadata=meta(
            "watchfiles backend only: the longest it groups events before reporting",
            range=(1, 60_000),
        ),
    )
    step_ms: int = field(
        default=2,
        metadata=meta(
            "watchfiles backend only: how long without new events ends a group",
            range=(1, 10_000),
        ),
    )
    reconcile_s: float = field(
        default=5.0, metadata=meta("period of the full reconciliation scan of staging")
    )
    poll_s: float = field(
        default=1.0, metadata=meta("poll backend only: the period of its scan of staging")
    )
    settle_s: float = field(  # an unreadable file unchanged this long is quarantined
        default=5.0,
        metadata=meta("an unreadable file unchanged this long is quarantined as corrupt"),
    )
    backend: BarrierBackend = field(default="inotify", metadata=meta("how staging is watched"))


# Where the agents connect: "unix" or tcp://HOST:PORT (a name, an IPv4 address or [IPv6]).
LISTEN_RE = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})")


def _agent_listen(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> None:
    m = LISTEN_RE.fullmatch(value)
    if value != "unix" and (m is None or not 1 <= int(m.group("port")) <= 65535):
        raise r.fail(dotted, "unix or tcp://HOST:PORT with a port 1..65535", value)


def _tls_file(what: str, *, required: bool = True) -> Hook:
    """A parse hook: an optional file path (relative: against the config's folder); with
    `required`, one must be set when agents.listen is tcp://, as plaintext TCP is never offered."""

    def parse(r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]) -> str:
        raw = r.string(dotted, value, "a file path")
        if not raw:
            listen = values["agents.listen"]
            if required and listen != "unix":
                raise ConfigError(
                    f"{r.where('agents.listen')}: agents.listen = {listen!r} needs {dotted} "
                    f"({what}): plaintext TCP is never offered"
                )
            return ""
        return r.path(dotted, raw, uri=False)

    return parse


_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_MEMORY_BUDGET = 64 << 20


def _memory_size(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> int:
    """A parse hook: bytes, as an integer or a string with a binary unit ("4G", "4GiB",
    "512M"), of at least MIN_MEMORY_BUDGET."""
    expected = "bytes, or a size such as '4GiB' or '512M' (K, M, G, T: powers of 1024), >= 64M"
    if isinstance(value, bool):
        raise r.fail(dotted, expected, value)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.fullmatch(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    else:
        raise r.fail(dotted, expected, value)
    if size < MIN_MEMORY_BUDGET:
        raise r.fail(dotted, expected, value)
    return size


def _longer_than_heartbeat(r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]) -> None:
    beat = values["agents.heartbeat_s"]
    if value <= beat:
        raise r.fail(dotted, f"a number > agents.heartbeat_s ({beat:g})", value)


@dataclass(frozen=True)
class AgentsConfig:
    """Agent heartbeats, step limits, and how agents reach the coordinator (Unix or TCP+TLS)."""

    heartbeat_s: float = field(default=2.0, metadata=meta("the agents' heartbeat period"))
    step_timeout_s: float = field(
        default=300.0,
        metadata=meta("how long a step waits for a node's agent to connect, then for its reply"),
    )
    numactl: str = field(
        default="numactl", metadata=meta("the numactl binary --with-agents starts agents with")
    )
    # The agent protocol over TCP with mutual TLS (docs/protocol.md §3, "TCP transport").
    listen: str = field(
        default="unix",
        metadata=meta(
            "where agents connect: unix (runtime_dir/agents.sock) or tcp://HOST:PORT (mutual TLS)",
            restart=True,
            check=_agent_listen,
        ),
    )
    tls_cert: str = field(
        default="",
        metadata=meta(
            "the coordinator's certificate (PEM); required with a tcp:// listen",
            parse=_tls_file("the coordinator's certificate file"),
        ),
    )
    tls_key: str = field(
        default="",
        metadata=meta(
            "the coordinator's private key (PEM, mode 0600 or 0640); required with a tcp:// listen",
            parse=_tls_file("the coordinator's key file"),
        ),
    )
    tls_ca: str = field(
        default="",
        metadata=meta(
            "the CA certificate(s) both sides trust (PEM); required with a tcp:// listen",
            parse=_tls_file("the CA certificate file"),
        ),
    )
    agent_tls_cert: str = field(
        default="",
        metadata=meta(
            "staging-agent's certificate (PEM), naming node-<N>.<cluster>; {node} is replaced",
            parse=_tls_file("", required=False),
        ),
    )
    agent_tls_key: str = field(
        default="",
        metadata=meta(
            "staging-agent's private key (PEM, mode 0600 or 0640); {node} is replaced",
            parse=_tls_file("", required=False),
        ),
    )
    cluster: str = field(
        default="numa",
        metadata=meta(
            "the name in certificates: node-<N>.<cluster> (agents), coordinator.<cluster>",
            check=_matching(
                r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*",
                "a DNS name in lower case such as 'numa' or 'prod.example'",
            ),
        ),
    )
    dead_after_s: float = field(
        default=10.0,
        metadata=meta(
            "a TCP connection on which nothing arrived for this long is closed (either side)",
            check=_longer_than_heartbeat,
        ),
    )
    reconnect_max_s: float = field(
        default=5.0,
        metadata=meta("the longest backoff (exponential, with jitter) of an agent's reconnects"),
    )
    threads: int = field(
        default=0,
        metadata=meta(
            "threads of an agent's cross-check and aggregation; 0: one per CPU it may run on",
            range=(0, 1024),
        ),
    )
    memory_budget: int = field(
        default=4 << 30,
        metadata=meta(
            "the memory an agent's cross-check and aggregation may use (bytes, or '4GiB', "
            "'512M'); a larger batch is worked on in ranges of item ids",
            parse=_memory_size,
        ),
    )


@dataclass(frozen=True)
class LogConfig:
    """Log level and format (auto: JSON when stdout is not a terminal)."""

    level: LogLevel = field(default="info", metadata=meta("log level, in any case", lower=True))
    format: LogFormat = field(
        default="auto", metadata=meta("log format; auto: JSON when stdout is not a terminal")
    )


def _fraction(r: _Reader, dotted: str, value: Any, _: Mapping[str, Any]) -> None:
    if not 0 < value <= 1:
        raise r.fail(dotted, "a fraction in (0, 1]", value)


def _nodes(
    r: _Reader, dotted: str, value: Any, values: Mapping[str, Any]
) -> tuple[NodeConfig, ...]:
    """The [[node]] array: each table's keys as declared by NodeConfig, then the rules across
    the tables and batch.models."""
    if not isinstance(value, list) or not value:
        raise r.fail(dotted, "at least one [[node]] table", value)
    models = values["batch.models"]
    nodes: list[NodeConfig] = []
    seen_models: dict[str, int] = {}
    for i, entry in enumerate(value):
        row = {
            s.attr[1]: r.parse(
                s, f"{dotted}[{i}].{s.name}", entry.get(s.name, s.raw_default), values
            )
            for s in SETTINGS
            if s.in_table and s.table == dotted
        }
        node = NodeConfig(**row)
        if node.id in [n.id for n in nodes]:
            raise r.fail(f"{dotted}[{i}].id", "a node id not used by another [[node]]", node.id)
        for m in node.models:
            if m not in models:
                raise r.fail(
                    f"{dotted}[{i}].models", f"models listed in batch.models {list(models)}", m
                )
            if m in seen_models:
                raise r.fail(f"{dotted}[{i}].models", "each model on one node only", m)
            seen_models[m] = node.id
        nodes.append(node)
    unassigned = [m for m in models if m not in seen_models]
    if unassigned:
        raise r.fail(
            dotted,
            f"every model of batch.models assigned to a node; missing {unassigned}",
            [list(n.models) for n in nodes],
        )
    return tuple(nodes)


@dataclass(frozen=True)
class Config:
    """The validated, merged configuration. `Config()` is the built-in default."""

    paths: Paths = field(default_factory=Paths)
    batch: BatchConfig = field(default_factory=BatchConfig)
    nodes: tuple[NodeConfig, ...] = field(
        default=(
            NodeConfig(id=0, models=("slm-1", "slm-2", "slm-3", "slm-4")),
            NodeConfig(id=1, models=("slm-5", "slm-6", "slm-7")),
        ),
        metadata=meta(
            "the NUMA nodes; every model of batch.models on exactly one", name="node", parse=_nodes
        ),
    )
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    host: HostConfig = field(default_factory=HostConfig)
    parquet: ParquetConfig = field(default_factory=ParquetConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    barrier: BarrierConfig = field(default_factory=BarrierConfig)
    crosscheck_function: str = field(
        default="agents.crosscheck:crosscheck",
        metadata=meta(
            "the cross-check function the agents call, as 'module:function'",
            name="crosscheck.function",
            check=_matching(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", "an import path 'module:function'"),
        ),
    )
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    placement_min_fraction: float = field(
        default=0.99,
        metadata=meta(
            "a batch with less than this fraction of its staged pages on a node is flagged",
            name="placement.min_fraction",
            check=_fraction,
        ),
    )
    metrics_listen: str = field(  # host:port of the Prometheus endpoint; empty: off
        default="",
        metadata=meta(
            "host:port of the Prometheus endpoint (GET /metrics); empty: off",
            name="metrics.listen",
            restart=True,
            check=_matching(
                r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}",
                "host:port such as 127.0.0.1:9464",
                empty_ok=True,
            ),
        ),
    )
    loop_lag_interval_ms: int = field(  # event-loop lag sampler period; 0: off
        default=0,
        metadata=meta(
            "period of the event-loop lag sampler; 0: off",
            name="metrics.loop_lag_interval_ms",
            range=(0, 60_000),
        ),
    )
    # Not config keys: what was read, and which file set each key.
    sources: tuple[str, ...] = ()
    provenance: Mapping[str, str] = field(default_factory=dict)

    def node(self, node_id: int) -> NodeConfig:
        """The config of node `node_id`; ConfigError if it is not configured."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise ConfigError(f"node {node_id} is not configured (configured: {self.node_ids})")

    def agent_paths(self, node_id: int) -> AgentPaths:
        """The folders as node `node_id`'s agent sees them: its [[node]] staging, tmpfs and
        lake where set, the [paths] otherwise."""
        n = self.node(node_id)
        return AgentPaths(
            staging=Path(n.staging) if n.staging else self.paths.staging,
            tmpfs=Path(n.tmpfs) if n.tmpfs else self.paths.tmpfs_for(node_id),
            lake=n.lake or self.paths.lake,
        )

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


# --- the keys, derived from the fields ---------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One config key, read off a dataclass field."""

    key: str  # dotted: "batch.quorum"; "node" is the array, "node.id" a key of each [[node]]
    meta: Meta
    hint: Any  # the field's type
    default: Any  # the field's default (MISSING for a key a table must set)
    attr: tuple[str, ...]  # where it lives in Config: ("batch", "quorum"); ("nodes", "id")
    table: str = ""  # for a key of an array of tables: the array ("node")

    @property
    def in_table(self) -> bool:
        """True for a key of each table of an array of tables, such as node.id."""
        return bool(self.table)

    @property
    def name(self) -> str:
        """The key within its section or table: "quorum", "id"."""
        return self.key.rpartition(".")[2]

    @property
    def choices(self) -> tuple[str, ...]:
        """The allowed values of a `Literal` key; () for any other."""
        return get_args(self.hint) if get_origin(self.hint) is Literal else ()

    @property
    def raw_default(self) -> Any:
        """The default as TOML would write it (None for a key without a default)."""
        return None if self.default is MISSING else _to_toml(self.default)

    def value(self, cfg: Config) -> Any:
        """The key's value in `cfg`; for a key of [[node]], the list over the nodes."""
        if self.in_table:
            return [getattr(row, self.attr[1]) for row in getattr(cfg, self.attr[0])]
        obj: Any = cfg
        for a in self.attr:
            obj = getattr(obj, a)
        return obj

    def describe(self) -> str:
        """The help line, with the allowed values and whether a change needs a restart."""
        out = self.meta.help
        if self.choices:
            out += f" ({_one_of(self.choices)})"
        return out + (" [restart]" if self.meta.restart else "")


def _one_of(choices: tuple[str, ...]) -> str:
    if len(choices) == 2:
        return f"{choices[0]} or {choices[1]}"
    return "one of " + ", ".join(choices)


def _to_toml(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_to_toml(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.metadata["config"].name or f.name: _to_toml(getattr(value, f.name))
            for f in fields(value)
        }
    return value


def _default_of(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


_HINTS = get_type_hints(Config)
# Config's fields that are sections ([paths], [batch], ...): field name -> dataclass.
_SECTION_TYPES: dict[str, type[Any]] = {
    f.name: hint
    for f in fields(Config)
    if isinstance(hint := _HINTS[f.name], type) and is_dataclass(hint)
}


def _settings() -> tuple[Setting, ...]:
    """Every key, in the order they are checked: the sections' and Config's own keys in field
    order, then the keys of each array of tables. A field that is neither a section nor
    carries `meta(...)` is not a key (Config.sources, Config.provenance)."""
    keys: list[Setting] = []
    table_keys: list[Setting] = []
    for f in fields(Config):
        hint = _HINTS[f.name]
        if f.name in _SECTION_TYPES:
            inner = get_type_hints(hint)
            for g in fields(hint):
                m = g.metadata["config"]  # every field of a section is a key
                dotted = f"{f.name}.{m.name or g.name}"
                keys.append(Setting(dotted, m, inner[g.name], _default_of(g), (f.name, g.name)))
            continue
        if "config" not in f.metadata:
            continue
        m = f.metadata["config"]
        dotted = m.name or f.name
        keys.append(Setting(dotted, m, hint, _default_of(f), (f.name,)))
        if get_origin(hint) is tuple and is_dataclass(row := get_args(hint)[0]):
            inner = get_type_hints(row)
            for g in fields(row):
                sub = g.metadata["config"]
                table_keys.append(
                    Setting(
                        f"{dotted}.{sub.name or g.name}",
                        sub,
                        inner[g.name],
                        _default_of(g),
                        (f.name, g.name),
                        table=dotted,
                    )
                )
    return (*keys, *table_keys)


SETTINGS: tuple[Setting, ...] = _settings()


def _defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in SETTINGS:
        if s.in_table:
            continue
        section, _, key = s.key.partition(".")
        if key:
            out.setdefault(section, {})[key] = s.raw_default
        else:
            out[section] = s.raw_default
    return out


# The built-in defaults as TOML would write them: the bottom layer of every merge.
DEFAULTS: dict[str, Any] = _defaults()
# Section -> its keys; an array of tables -> the keys of each of its tables.
_SECTIONS: dict[str, set[str]] = {
    sec: set(body) for sec, body in DEFAULTS.items() if isinstance(body, dict)
}
_ARRAYS: dict[str, set[str]] = {
    sec: {s.name for s in SETTINGS if s.table == sec}
    for sec, body in DEFAULTS.items()
    if isinstance(body, list)
}


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
            if section in _ARRAYS:
                if not isinstance(body, list):
                    raise ConfigError(
                        f"{source}: {section}: expected an array of tables [[{section}]]"
                    )
                for i, entry in enumerate(body):
                    if not isinstance(entry, dict):
                        raise ConfigError(f"{source}: {section}[{i}]: expected a table")
                    for key in entry:
                        if key not in _ARRAYS[section]:
                            dotted = f"{section}[{i}].{key}"
                            raise ConfigError(f"{locate(source, dotted)}: unknown key {dotted}")
                continue
            if section not in _SECTIONS:
                raise ConfigError(f"{locate(source, section)}: unknown section [{section}]")
            if not isinstance(body, dict):
                raise ConfigError(f"{source}: {section}: expected a table [{section}]")
            for key in body:
                if key not in _SECTIONS[section]:
                    raise ConfigError(
                        f"{locate(source, f'{section}.{key}')}: unknown key {section}.{key}"
                    )


class _Reader:
    """Typed access to the merged dict; errors name the file that set the key."""

    def __init__(self, merged: dict[str, Any], prov: Mapping[str, str], base_dir: Path) -> None:
        self.merged = merged
        self.prov = prov
        self.base_dir = base_dir

    def where(self, dotted: str) -> str:
        head = dotted.split("[")[0]
        source = self.prov.get(dotted) or self.prov.get(head) or "<defaults>"
        return locate(source, dotted)

    def fail(self, dotted: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"{self.where(dotted)}: {dotted}: expected {expected}, found {found!r}")

    def raw(self, s: Setting) -> Any:
        section, _, key = s.key.partition(".")
        return self.merged[section][key] if key else self.merged.get(section)

    def string(self, dotted: str, v: Any, expected: str = "") -> str:
        if not isinstance(v, str):
            raise self.fail(dotted, expected or "a string", v)
        return v

    def number(self, dotted: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(dotted, "a number", v)
        if v <= 0:
            raise self.fail(dotted, "a number > 0", v)
        return float(v)

    def integer(self, dotted: str, v: Any, lo: int, hi: int, expected: str = "") -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(dotted, expected or f"an integer in {lo}..{hi}", v)
        return v

    def optional_path(self, dotted: str, v: Any, *, uri: bool) -> str:
        """A path as `path` reads it, or the empty string (not set)."""
        return "" if self.string(dotted, v) == "" else self.path(dotted, v, uri=uri)

    def path(self, dotted: str, v: Any, *, uri: bool) -> str:
        raw = self.string(dotted, v)
        if not raw:
            raise self.fail(dotted, "a non-empty path", raw)
        if uri and "://" in raw:
            return raw
        p = Path(raw)
        return str(p if p.is_absolute() else (self.base_dir / p))

    def parse(self, s: Setting, dotted: str, v: Any, values: Mapping[str, Any]) -> Any:
        """Check and convert the value `v` of key `s` (named `dotted` in errors) by its type."""
        m, hint = s.meta, s.hint
        value: Any
        if m.parse is not None:
            value = m.parse(self, dotted, v, values)
        elif s.choices:
            value = self.string(dotted, v, m.expect)
            value = value.lower() if m.lower else value
            if value not in s.choices:
                raise self.fail(dotted, _one_of(s.choices), value)
        elif hint is Path or m.path:
            value = self.path(dotted, v, uri=m.uri)
            value = Path(value) if hint is Path else value
        elif hint is bool:
            if not isinstance(v, bool):
                raise self.fail(dotted, m.expect or "true or false", v)
            value = v
        elif hint is str:
            value = self.string(dotted, v, m.expect)
        elif hint is float:
            value = self.number(dotted, v)
        elif hint is int and m.range is not None:
            value = self.integer(dotted, v, *m.range, m.expect)
        elif hint == tuple[str, ...]:
            value = _names(self, dotted, v)
        else:  # a new kind of key needs a branch here, or a parse hook
            raise TypeError(f"{s.key}: no check for a field of type {hint!r}")
        if m.check is not None:
            m.check(self, dotted, value, values)
        return value


def _names(r: _Reader, dotted: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise r.fail(dotted, "an array of model names", value)
    for m in value:
        if not NAME_RE.fullmatch(m):
            raise r.fail(dotted, f"model names matching {NAME_RE.pattern}", m)
    if len(set(value)) != len(value):
        raise r.fail(dotted, "distinct model names", value)
    return tuple(value)


def _section(name: str, values: Mapping[str, Any]) -> Any:
    """Section `name` of Config ("paths": a Paths) from the values read so far."""
    keys = [s for s in SETTINGS if not s.in_table and len(s.attr) == 2 and s.attr[0] == name]
    return _SECTION_TYPES[name](**{s.attr[1]: values[s.key] for s in keys})


def validate(
    merged: dict[str, Any],
    prov: Mapping[str, str],
    *,
    base_dir: Path,
    sources: tuple[str, ...] = (),
) -> Config:
    """Turn a merged config dict into a `Config`, or raise ConfigError naming file and key.

    Keys are checked in field order, each by its type and `meta`, so a key may depend on the
    keys before it (batch.quorum on batch.models, the [[node]] tables on both)."""
    r = _Reader(merged, prov, base_dir)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if not s.in_table:  # the keys of each [[node]] are read by the node array's hook
            values[s.key] = r.parse(s, s.key, r.raw(s), values)
    kwargs: dict[str, Any] = {name: _section(name, values) for name in _SECTION_TYPES}
    for s in SETTINGS:
        if len(s.attr) == 1:
            kwargs[s.attr[0]] = values[s.key]
    return Config(**kwargs, sources=sources, provenance=dict(prov))


def explain(cfg: Config, *, describe: bool = False) -> list[str]:
    """One line per key, sorted: the key and the file (and line) that set it, or `<defaults>`;
    the keys of each [[node]] follow the node array as node[i].key. With `describe`, each line
    ends with the key's help, its allowed values and [restart] if a reload may not change it."""
    rows: list[tuple[str, str, str]] = []
    for s in sorted((s for s in SETTINGS if not s.in_table), key=lambda s: s.key):
        source = cfg.provenance.get(s.key, "<defaults>")
        rows.append((s.key, locate(source, s.key), s.describe()))
        for i in range(len(s.value(cfg)) if s.key in _ARRAYS else 0):
            for t in (t for t in SETTINGS if t.table == s.key):
                dotted = f"{s.key}[{i}].{t.name}"
                rows.append((dotted, locate(source, dotted), t.describe()))
    kw = max(len(k) for k, _, _ in rows)
    if not describe:
        return [f"{k:<{kw}}  {w}" for k, w, _ in rows]
    ww = max(len(w) for _, w, _ in rows)
    return [f"{k:<{kw}}  {w:<{ww}}  {d}" for k, w, d in rows]


def restart_changes(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """The keys marked `restart` whose values differ: (key, old value, new value), in the order
    of SETTINGS. A key of [[node]] compares the list over the nodes: ("node.id", [0, 1], [0])."""
    out: list[tuple[str, object, object]] = []
    for s in SETTINGS:
        if s.meta.restart:
            a, b = s.value(old), s.value(new)
            if a != b:
                out.append((s.key, a, b))
    return out


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by '***', safe to log and show."""
    if not dsn:
        return ""
    out = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
    # key=value form: the value may be quoted (with spaces inside) and '=' may have spaces.
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", out)
