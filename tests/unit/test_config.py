"""Config loading: defaults, conf.d merging and provenance, validation errors, DSN redaction."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from coordinator.core import config
from coordinator.core.config import (
    DEFAULTS,
    SETTINGS,
    Config,
    NodeConfig,
    Setting,
    explain,
    load_config,
    redact_dsn,
    restart_changes,
)
from coordinator.core.errors import ConfigError
from coordinator.ctl import main as cli

REPO = Path(__file__).resolve().parents[2]

SEVEN = ["slm-1", "slm-2", "slm-3", "slm-4", "slm-5", "slm-6", "slm-7"]


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An empty config folder with an empty coordinator.toml and a conf.d beside it."""
    folder = tmp_path / "etc"
    (folder / "conf.d").mkdir(parents=True)
    (folder / "coordinator.toml").write_text("")
    return folder


def main_file(etc: Path, text: str = "") -> Path:
    path = etc / "coordinator.toml"
    path.write_text(text)
    return path


def dropin(etc: Path, name: str, text: str) -> Path:
    path = etc / "conf.d" / name
    path.write_text(text)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


# --- defaults ------------------------------------------------------------------------------


def test_an_empty_config_file_loads_the_documented_defaults(etc: Path) -> None:
    cfg = load_config(etc / "coordinator.toml")
    assert cfg.paths.staging == Path("/data/hot/staging")
    assert cfg.paths.lake == "/data/lake"
    assert cfg.paths.tmpfs_for(1) == Path("/dev/shm/numa-coordinator/node1")
    assert cfg.paths.state_dir == Path("/var/lib/numa-coordinator")
    assert cfg.paths.runtime_dir == Path("/run/numa-coordinator")
    assert cfg.batch.models == tuple(SEVEN)
    assert cfg.batch.deadline_s == 600.0
    assert cfg.batch.quorum == 7
    assert cfg.node_ids == (0, 1)
    assert cfg.node(0).models == ("slm-1", "slm-2", "slm-3", "slm-4")
    assert cfg.node(1).models == ("slm-5", "slm-6", "slm-7")
    assert cfg.database.dsn == "" and cfg.database.embedded
    assert cfg.database.schema == "numa_coordinator"
    assert (cfg.parquet.compression, cfg.parquet.level) == ("zstd", 3)


def test_with_no_drop_ins_every_key_comes_from_the_defaults(etc: Path) -> None:
    cfg = load_config(etc / "coordinator.toml")
    assert cfg.sources == (str((etc / "coordinator.toml").resolve()),)
    assert cfg.provenance["batch.quorum"] == "<defaults>"
    assert set(cfg.provenance.values()) == {"<defaults>"}


def test_a_missing_config_file_is_an_error_naming_it(tmp_path: Path) -> None:
    assert "nowhere.toml" in load_error(tmp_path / "nowhere.toml")


def test_node_of_model_and_an_unconfigured_node(etc: Path) -> None:
    cfg = load_config(etc / "coordinator.toml")
    assert cfg.node_of_model("slm-6") == 1
    with pytest.raises(ConfigError, match="node 5"):
        cfg.node(5)
    with pytest.raises(ConfigError, match="slm-99"):
        cfg.node_of_model("slm-99")


# --- merging -------------------------------------------------------------------------------


def test_drop_ins_override_the_main_file_key_by_key(etc: Path) -> None:
    main = main_file(etc, "[batch]\ndeadline_s = 100\nquorum = 5\n")
    dropin(etc, "50-deadline.toml", "[batch]\ndeadline_s = 42\n")
    cfg = load_config(main)
    assert cfg.batch.deadline_s == 42.0
    assert cfg.batch.quorum == 5  # untouched by the drop-in, kept from the main file
    assert cfg.batch.models == tuple(SEVEN)  # untouched by both, kept from the defaults


def test_drop_ins_apply_in_lexical_not_numeric_order(etc: Path) -> None:
    dropin(etc, "9-late.toml", "[batch]\ndeadline_s = 9\n")
    dropin(etc, "10-early.toml", "[batch]\ndeadline_s = 10\n")
    cfg = load_config(etc / "coordinator.toml")
    # "10-early.toml" sorts before "9-late.toml", so the 9 file is applied last and wins.
    assert cfg.batch.deadline_s == 9.0
    assert [Path(s).name for s in cfg.sources] == [
        "coordinator.toml",
        "10-early.toml",
        "9-late.toml",
    ]


def test_non_toml_files_in_conf_d_are_ignored(etc: Path) -> None:
    dropin(etc, "50-off.toml.disabled", "[batch]\ndeadline_s = 1\n")
    dropin(etc, "50-backup.toml~", "this is not toml at all [[[")
    dropin(etc, "README", "[bogus]\n")
    (etc / "conf.d" / "60-dir.toml").mkdir()  # a folder with a .toml name is not a file
    cfg = load_config(etc / "coordinator.toml")
    assert cfg.batch.deadline_s == 600.0
    assert len(cfg.sources) == 1


def test_provenance_names_the_file_that_last_set_each_key(etc: Path) -> None:
    main = main_file(etc, "[batch]\ndeadline_s = 100\nquorum = 5\n")
    late = dropin(etc, "50-deadline.toml", "[batch]\ndeadline_s = 42\n")
    cfg = load_config(main)
    assert cfg.provenance["batch.deadline_s"] == str(late.resolve())
    assert cfg.provenance["batch.quorum"] == str(main.resolve())
    assert cfg.provenance["paths.staging"] == "<defaults>"


def test_a_node_array_in_a_drop_in_replaces_the_whole_array(etc: Path) -> None:
    models = '["slm-1", "slm-2", "slm-3", "slm-4", "slm-5", "slm-6", "slm-7"]'
    late = dropin(etc, "50-one-node.toml", f"[[node]]\nid = 0\nmodels = {models}\n")
    cfg = load_config(etc / "coordinator.toml")
    assert cfg.node_ids == (0,)
    assert cfg.node(0).models == tuple(SEVEN)
    assert cfg.provenance["node"] == str(late.resolve())


def test_node_cpus_are_read_from_the_node_table(etc: Path) -> None:
    main = main_file(
        etc,
        '[[node]]\nid = 0\nmodels = ["slm-1", "slm-2", "slm-3", "slm-4"]\ncpus = "0-1,36-37"\n'
        '[[node]]\nid = 1\nmodels = ["slm-5", "slm-6", "slm-7"]\n',
    )
    cfg = load_config(main)
    assert cfg.node(0).cpus == "0-1,36-37"
    assert cfg.node(1).cpus == ""


# --- unknown keys and syntax errors --------------------------------------------------------


def test_an_unknown_section_is_an_error_naming_file_and_section(etc: Path) -> None:
    bad = dropin(etc, "50-bad.toml", "[bogus]\nx = 1\n")
    msg = load_error(etc / "coordinator.toml")
    assert str(bad.resolve()) in msg
    assert "bogus" in msg


def test_an_unknown_key_is_an_error_naming_file_and_key(etc: Path) -> None:
    bad = dropin(etc, "50-bad.toml", "[batch]\ndeadlin_s = 10\n")
    msg = load_error(etc / "coordinator.toml")
    assert str(bad.resolve()) in msg
    assert "batch.deadlin_s" in msg


def test_an_unknown_key_in_a_node_table_is_an_error(etc: Path) -> None:
    main = main_file(etc, '[[node]]\nid = 0\nmodels = ["slm-1"]\ncores = 3\n')
    msg = load_error(main)
    assert str(main.resolve()) in msg
    assert "node[0].cores" in msg


def test_a_toml_syntax_error_names_file_and_line(etc: Path) -> None:
    bad = dropin(etc, "50-broken.toml", "[batch]\ndeadline_s = 10\nquorum = = 3\n")
    msg = load_error(etc / "coordinator.toml")
    assert f"{bad.resolve()}:3: TOML syntax error" in msg


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[batch]\ndeadline_s = "ten"\n', "batch.deadline_s"),
        ("[batch]\ndeadline_s = true\n", "batch.deadline_s"),
        ("[batch]\ndeadline_s = -1\n", "batch.deadline_s"),
        ("[paths]\nstaging = 5\n", "paths.staging"),
        ('[paths]\nstaging = ""\n', "paths.staging"),
        ('[batch]\nmodels = "slm-1"\n', "batch.models"),
        ("[batch]\nquorum = 2.5\n", "batch.quorum"),
        ('[database]\nschema = "Bad-Schema"\n', "database.schema"),
        ('[parquet]\ncompression = "lzma"\n', "parquet.compression"),
        ("[parquet]\nlevel = 99\n", "parquet.level"),
        ('[log]\nlevel = "loud"\n', "log.level"),
        ('[crosscheck]\nfunction = "no colon here"\n', "crosscheck.function"),
        ('[lake]\nformat = "delta"\n', "lake.format"),
        ('[lake]\nnamespace = "Bad Name"\n', "lake.namespace"),
        ("[agents]\nthreads = -1\n", "agents.threads"),
        ("[agents]\nthreads = 1.5\n", "agents.threads"),
        ('[agents]\nmemory_budget = "4 parsecs"\n', "agents.memory_budget"),
        ('[agents]\nmemory_budget = "63M"\n', "agents.memory_budget"),
        ("[agents]\nmemory_budget = 1000\n", "agents.memory_budget"),
        ("[agents]\nmemory_budget = true\n", "agents.memory_budget"),
        ("[agents]\nmemory_budget = 4.5\n", "agents.memory_budget"),
    ],
)
def test_a_wrong_type_or_value_names_the_file_and_key(etc: Path, text: str, key: str) -> None:
    bad = dropin(etc, "50-bad.toml", text)
    msg = load_error(etc / "coordinator.toml")
    assert str(bad.resolve()) in msg
    assert key in msg


@pytest.mark.parametrize("quorum", [0, 8, -1])
def test_a_quorum_outside_one_to_the_model_count_is_an_error(etc: Path, quorum: int) -> None:
    main = main_file(etc, f"[batch]\nquorum = {quorum}\n")
    msg = load_error(main)
    assert "batch.quorum" in msg and "1..7" in msg


@pytest.mark.parametrize("quorum", [1, 7])
def test_a_quorum_at_either_end_of_the_range_is_accepted(etc: Path, quorum: int) -> None:
    assert load_config(main_file(etc, f"[batch]\nquorum = {quorum}\n")).batch.quorum == quorum


def nodes_toml(*nodes: tuple[int, list[str]]) -> str:
    out = []
    for nid, models in nodes:
        listed = ", ".join(f'"{m}"' for m in models)
        out.append(f"[[node]]\nid = {nid}\nmodels = [{listed}]\n")
    return "\n".join(out)


def test_a_model_assigned_to_two_nodes_is_an_error(etc: Path) -> None:
    main = main_file(etc, nodes_toml((0, SEVEN[:4]), (1, ["slm-4", *SEVEN[4:]])))
    msg = load_error(main)
    assert str(main.resolve()) in msg
    assert "node[1].models" in msg and "slm-4" in msg


def test_a_model_assigned_to_no_node_is_an_error(etc: Path) -> None:
    main = main_file(etc, nodes_toml((0, SEVEN[:4]), (1, SEVEN[4:6])))
    msg = load_error(main)
    assert str(main.resolve()) in msg
    assert "slm-7" in msg


def test_a_node_model_not_in_batch_models_is_an_error(etc: Path) -> None:
    main = main_file(etc, nodes_toml((0, SEVEN[:4]), (1, [*SEVEN[4:], "slm-8"])))
    msg = load_error(main)
    assert "node[1].models" in msg and "slm-8" in msg


def test_two_nodes_with_the_same_id_are_an_error(etc: Path) -> None:
    main = main_file(etc, nodes_toml((0, SEVEN[:4]), (0, SEVEN[4:])))
    assert "node[1].id" in load_error(main)


def test_no_node_at_all_is_an_error(etc: Path) -> None:
    # An empty array of nodes written inline.
    assert "[[node]]" in load_error(main_file(etc, "node = []\n"))


@pytest.mark.parametrize("name", ["-slm", ".slm", "slm 1", "slm/1", "", "x" * 129, "slm\u00e9"])
def test_a_bad_model_name_is_an_error_naming_it(etc: Path, name: str) -> None:
    main = main_file(etc, f'[batch]\nmodels = ["slm-1", "{name}"]\nquorum = 1\n')
    msg = load_error(main)
    assert "batch.models" in msg
    assert repr(name) in msg


def test_a_model_name_of_128_characters_is_accepted(etc: Path) -> None:
    name = "m" * 128
    main = main_file(etc, f'[batch]\nmodels = ["{name}"]\nquorum = 1\n' + nodes_toml((0, [name])))
    assert load_config(main).batch.models == (name,)


def test_duplicate_model_names_are_an_error(etc: Path) -> None:
    main = main_file(etc, '[batch]\nmodels = ["slm-1", "slm-1"]\nquorum = 1\n')
    assert "distinct" in load_error(main)


def test_node_tmpfs_without_a_node_placeholder_is_an_error(etc: Path) -> None:
    bad = dropin(etc, "50-tmpfs.toml", '[paths]\nnode_tmpfs = "/dev/shm/nc"\n')
    msg = load_error(etc / "coordinator.toml")
    assert str(bad.resolve()) in msg
    assert "paths.node_tmpfs" in msg and "{node}" in msg


def test_relative_paths_are_resolved_against_the_config_folder(etc: Path) -> None:
    main = main_file(
        etc,
        '[paths]\nstaging = "hot/staging"\nlake = "lake"\nnode_tmpfs = "shm/node{node}"\n'
        'state_dir = "state"\nruntime_dir = "run"\n',
    )
    cfg = load_config(main)
    base = etc.resolve()
    assert cfg.paths.staging == base / "hot/staging"
    assert cfg.paths.lake == str(base / "lake")
    assert cfg.paths.tmpfs_for(3) == base / "shm/node3"
    assert cfg.paths.state_dir == base / "state"
    assert cfg.paths.runtime_dir == base / "run"
    assert cfg.paths.control_socket == base / "run/control.sock"


def test_an_absolute_path_and_an_object_store_lake_are_kept_as_written(etc: Path) -> None:
    main = main_file(etc, '[paths]\nstaging = "/srv/staging"\nlake = "s3://bucket/lake"\n')
    cfg = load_config(main)
    assert cfg.paths.staging == Path("/srv/staging")
    assert cfg.paths.lake == "s3://bucket/lake"


def test_a_runtime_dir_too_long_for_a_unix_socket_is_an_error(etc: Path) -> None:
    main = main_file(etc, f'[paths]\nruntime_dir = "/run/{"r" * 120}"\n')
    assert "paths.runtime_dir" in load_error(main)


# --- DSN redaction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("", ""),
        ("postgresql://app@db.example/batches", "postgresql://app@db.example/batches"),
        ("postgresql://app:s3cret@db.example:5432/x", "postgresql://app:***@db.example:5432/x"),
        ("postgres://app:p%40ss@/x?host=/run/pg", "postgres://app:***@/x?host=/run/pg"),
        ("host=db user=app password=s3cret dbname=x", "host=db user=app password=*** dbname=x"),
        ("postgresql://app@db/x?password=s3cret", "postgresql://app@db/x?password=***"),
    ],
)
def test_redact_dsn_hides_the_password(dsn: str, expected: str) -> None:
    out = redact_dsn(dsn)
    assert out == expected
    assert "s3cret" not in out and "p%40ss" not in out


def test_redact_dsn_hides_a_quoted_password_with_spaces() -> None:
    out = redact_dsn("host=db password='my s3cret phrase' user=app")
    assert "s3cret" not in out and "phrase" not in out


def test_redact_dsn_hides_a_password_with_spaces_around_the_equals_sign() -> None:
    assert "s3cret" not in redact_dsn("host=db password = s3cret user=app")


# --- one definition: the keys come from the dataclass fields -------------------------------

TOP = [s for s in SETTINGS if not s.in_table]  # every key but those of each [[node]]
SCALARS = [s for s in TOP if s.key != "node"]

# The built-in defaults as the hand-written DEFAULTS dict had them before they were derived
# from the fields (plus cpus = "" spelled out in each [[node]]).
DEFAULTS_BEFORE: dict[str, Any] = {
    "paths": {
        "staging": "/data/hot/staging",
        "lake": "/data/lake",
        "node_tmpfs": "/dev/shm/numa-coordinator/node{node}",
        "state_dir": "/var/lib/numa-coordinator",
        "runtime_dir": "/run/numa-coordinator",
    },
    "batch": {"models": SEVEN, "deadline_s": 600.0, "quorum": 7, "max_in_flight": 4},
    "node": [
        {
            "id": 0,
            "models": ["slm-1", "slm-2", "slm-3", "slm-4"],
            "cpus": "",
            "remote": False,
            "staging": "",
            "tmpfs": "",
            "lake": "",
        },
        {
            "id": 1,
            "models": ["slm-5", "slm-6", "slm-7"],
            "cpus": "",
            "remote": False,
            "staging": "",
            "tmpfs": "",
            "lake": "",
        },
    ],
    "database": {
        "dsn": "",
        "schema": "numa_coordinator",
        "password_file": "",
        "retry_max_s": 30.0,
    },
    "host": {"id": "", "lease_s": 10.0},
    "parquet": {"compression": "zstd", "level": 3},
    "lake": {"format": "parquet", "namespace": "numa", "credentials_file": ""},
    "barrier": {
        "backend": "inotify",
        "debounce_ms": 20,
        "step_ms": 2,
        "reconcile_s": 5.0,
        "poll_s": 1.0,
        "settle_s": 5.0,
    },
    "crosscheck": {"function": "agents.crosscheck:crosscheck"},
    "agents": {
        "heartbeat_s": 2.0,
        "step_timeout_s": 300.0,
        "numactl": "numactl",
        "listen": "unix",
        "tls_cert": "",
        "tls_key": "",
        "tls_ca": "",
        "agent_tls_cert": "",
        "agent_tls_key": "",
        "cluster": "numa",
        "dead_after_s": 10.0,
        "reconnect_max_s": 5.0,
        "threads": 0,
        "memory_budget": 4 << 30,
    },
    "log": {"level": "info", "format": "auto"},
    "placement": {"min_fraction": 0.99},
    "metrics": {"listen": "", "loop_lag_interval_ms": 0},
}

# The keys coordinatord rejected a reload for before restart_changes was derived from the fields.
RESTART_KEYS = [
    "paths.staging",
    "paths.lake",
    "paths.node_tmpfs",
    "paths.state_dir",
    "paths.runtime_dir",
    "database.dsn",
    "database.schema",
    "host.id",
    "host.lease_s",
    "lake.format",
    "lake.namespace",
    "lake.credentials_file",
    "agents.listen",
    "metrics.listen",
    "node.id",
    "node.remote",
    "node.staging",
    "node.tmpfs",
    "node.lake",
]

CHOICES = {
    "parquet.compression": ("zstd", "snappy", "gzip", "brotli", "lz4", "none"),
    "lake.format": ("parquet", "iceberg"),
    "barrier.backend": ("inotify", "watchfiles", "notify", "poll"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("auto", "json", "console"),
}


def setting(key: str) -> Setting:
    return next(s for s in SETTINGS if s.key == key)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string, for the plain values used here
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def toml_text(tables: dict[str, Any]) -> str:
    out = []
    for section, body in tables.items():
        for table in body if isinstance(body, list) else [body]:
            out.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def config_classes() -> list[type[Any]]:
    return [Config, NodeConfig, *config._SECTION_TYPES.values()]


def test_every_field_is_a_key_with_one_line_of_help_or_a_section() -> None:
    not_keys = {(Config, "sources"), (Config, "provenance")}
    for cls in config_classes():
        for f in dataclasses.fields(cls):
            if (cls, f.name) in not_keys or (cls is Config and f.name in config._SECTION_TYPES):
                continue
            m = f.metadata.get("config")
            assert isinstance(m, config.Meta), f"{cls.__name__}.{f.name} has no meta(...)"
            assert m.help.strip() and "\n" not in m.help, f"{cls.__name__}.{f.name}"


def test_every_setting_has_help_and_every_key_appears_once() -> None:
    keys = [s.key for s in SETTINGS]
    assert len(keys) == len(set(keys))
    for s in SETTINGS:
        assert s.meta.help.strip(), s.key
        assert "\n" not in s.describe()


def test_the_derived_defaults_equal_the_hand_written_ones() -> None:
    assert DEFAULTS == DEFAULTS_BEFORE


def test_an_empty_config_is_config_with_every_default(etc: Path) -> None:
    cfg = load_config(etc / "coordinator.toml")
    assert dataclasses.replace(cfg, sources=(), provenance={}) == Config()


def test_the_example_config_sets_only_default_values() -> None:
    """docs/config.md: config/coordinator.toml has the same values as the defaults."""
    example = REPO / "config" / "coordinator.toml"
    raw = tomllib.loads(example.read_text())
    for section, body in raw.items():
        if isinstance(body, list):
            rows = [{**DEFAULTS[section][0], **row} for row in body]
            assert rows == DEFAULTS[section], section
            continue
        for key, value in body.items():
            assert value == DEFAULTS[section][key], f"{section}.{key}"
    cfg = load_config(example)
    assert dataclasses.replace(cfg, sources=(), provenance={}) == Config()


def doc_tables() -> dict[str, str]:
    """docs/config.md's key tables: dotted key -> the default column, as written."""
    out: dict[str, str] = {}
    section = ""
    for line in (REPO / "docs" / "config.md").read_text().splitlines():
        heading = re.fullmatch(r"### `\[\[?(\w+)\]\]?`.*", line)
        if heading:
            section = heading.group(1)
            continue
        row = re.fullmatch(r"\| `(\w+)` \| (.*)", line)
        if section and row:
            cells = [c.strip() for c in row.group(2).split(" | ")]
            out[f"{section}.{row.group(1)}"] = cells[1]
    return out


def doc_default(value: Any) -> str:
    if value is None:
        return "(required)"
    if isinstance(value, bool):
        return f"`{toml_value(value)}`"
    if isinstance(value, list):
        return f"`{value[0]}` … `{value[-1]}`" if len(value) > 2 else f"`{toml_value(value)}`"
    if isinstance(value, int):
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`" if value else '`""`'


def test_docs_list_every_key_with_the_default_of_its_field() -> None:
    documented = doc_tables()
    assert set(documented) == {s.key for s in SETTINGS if s.key != "node"}
    for s in SETTINGS:
        if s.key == "node":
            continue
        expected = doc_default(s.raw_default)
        cell = documented[s.key]
        assert cell == expected or cell.startswith(expected + " "), (s.key, cell, expected)


def test_every_default_key_is_accepted_in_a_drop_in(etc: Path) -> None:
    dropin(etc, "50-all.toml", toml_text(DEFAULTS))
    cfg = load_config(etc / "coordinator.toml")
    assert dataclasses.replace(cfg, sources=(), provenance={}) == Config()
    assert "<defaults>" not in cfg.provenance.values()


@pytest.mark.parametrize("section", sorted(s for s in DEFAULTS if s != "node"))
def test_an_unknown_key_in_any_section_names_file_line_and_key(etc: Path, section: str) -> None:
    bad = dropin(etc, "50-bad.toml", f"[{section}]\nnope = 1\n")
    assert load_error(etc / "coordinator.toml") == f"{bad.resolve()}:2: unknown key {section}.nope"


@pytest.mark.parametrize("s", SCALARS, ids=lambda s: s.key)
def test_a_wrong_type_for_any_key_names_file_line_key_and_value(etc: Path, s: Setting) -> None:
    section, key = s.key.split(".")
    bad = dropin(etc, "50-bad.toml", f"[{section}]\n{key} = true\n")
    msg = load_error(etc / "coordinator.toml")
    assert msg.startswith(f"{bad.resolve()}:2: {s.key}: expected ")
    assert msg.endswith(", found True")


@pytest.mark.parametrize("key", ["id", "models", "cpus"])
def test_a_wrong_type_in_a_node_table_names_the_key(etc: Path, key: str) -> None:
    row = {"id": 0, "models": SEVEN} | {key: True}
    text = "[[node]]\n" + "".join(f"{k} = {str(v).lower()}\n" for k, v in row.items())
    bad = dropin(etc, "50-bad.toml", text.replace("'", '"'))
    msg = load_error(etc / "coordinator.toml")
    assert msg.startswith(f"{bad.resolve()}:")
    assert f": node[0].{key}: expected " in msg and msg.endswith(", found True")


# --- choices -------------------------------------------------------------------------------


def test_the_choice_keys_are_literals_with_these_values() -> None:
    assert {s.key: s.choices for s in SETTINGS if s.choices} == CHOICES


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_wrong_choice_names_file_key_value_and_the_allowed_values(etc: Path, key: str) -> None:
    section, name = key.split(".")
    bad = dropin(etc, "50-bad.toml", f'[{section}]\n{name} = "bogus"\n')
    msg = load_error(etc / "coordinator.toml")
    allowed = CHOICES[key]
    listed = " or ".join(allowed) if len(allowed) == 2 else "one of " + ", ".join(allowed)
    assert msg == f"{bad.resolve()}:2: {key}: expected {listed}, found 'bogus'"


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in CHOICES.items() for v in vs])
def test_every_allowed_choice_is_accepted(etc: Path, key: str, value: str) -> None:
    section, name = key.split(".")
    cfg = load_config(main_file(etc, f'[{section}]\n{name} = "{value}"\n'))
    assert setting(key).value(cfg) == value


def test_log_level_is_a_choice_in_any_case_kept_in_lower_case(etc: Path) -> None:
    assert load_config(main_file(etc, '[log]\nlevel = "WARNING"\n')).log.level == "warning"
    main = main_file(etc, '[log]\nformat = "JSON"\n')
    assert load_error(main).endswith(
        "log.format: expected one of auto, json, console, found 'JSON'"
    )


# --- restart-only keys ---------------------------------------------------------------------


def test_the_restart_only_keys_are_those_the_daemon_rejected_a_reload_for() -> None:
    assert [s.key for s in SETTINGS if s.meta.restart] == RESTART_KEYS


def test_no_change_needs_no_restart(etc: Path) -> None:
    assert restart_changes(Config(), Config()) == []
    assert restart_changes(load_config(etc / "coordinator.toml"), Config()) == []


def changed(value: Any) -> Any:
    """Some other value of the same type."""
    if isinstance(value, Path):
        return value / "other"
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, tuple):
        return value[:-1]
    if value is None:
        return 1
    return value + 1


def with_value(cfg: Config, s: Setting, value: Any) -> Config:
    if len(s.attr) == 1:
        return dataclasses.replace(cfg, **{s.attr[0]: value})
    section = dataclasses.replace(getattr(cfg, s.attr[0]), **{s.attr[1]: value})
    return dataclasses.replace(cfg, **{s.attr[0]: section})


@pytest.mark.parametrize("s", SCALARS, ids=lambda s: s.key)
def test_restart_changes_lists_a_key_exactly_when_it_is_restart_only(s: Setting) -> None:
    old = Config()
    new = with_value(old, s, changed(s.value(old)))
    assert s.value(new) != s.value(old)
    expected = [(s.key, s.value(old), s.value(new))] if s.key in RESTART_KEYS else []
    assert restart_changes(old, new) == expected


def test_node_ids_need_a_restart_and_node_models_and_cpus_do_not() -> None:
    old = Config()
    n0, n1 = old.nodes
    same_ids = (dataclasses.replace(n0, cpus="0-1"), dataclasses.replace(n1, models=("slm-5",)))
    assert restart_changes(old, dataclasses.replace(old, nodes=same_ids)) == []
    new = dataclasses.replace(old, nodes=(n0, dataclasses.replace(n1, id=2)))
    assert restart_changes(old, new) == [("node.id", [0, 1], [0, 2])]
    reordered = dataclasses.replace(old, nodes=(n1, n0))
    assert restart_changes(old, reordered) == [("node.id", [0, 1], [1, 0])]


def test_restart_changes_between_two_loaded_configs_in_settings_order(etc: Path) -> None:
    old = load_config(etc / "coordinator.toml")
    dropin(
        etc,
        "50-changes.toml",
        '[metrics]\nlisten = "127.0.0.1:9464"\n[paths]\nruntime_dir = "/run/nc-other"\n'
        '[batch]\ndeadline_s = 10\n[database]\nschema = "other"\n'
        '[[node]]\nid = 0\nmodels = ["slm-1", "slm-2", "slm-3", "slm-4", "slm-5", "slm-6", '
        '"slm-7"]\n',
    )
    new = load_config(etc / "coordinator.toml")
    assert restart_changes(old, new) == [
        ("paths.runtime_dir", Path("/run/numa-coordinator"), Path("/run/nc-other")),
        ("database.schema", "numa_coordinator", "other"),
        ("metrics.listen", "", "127.0.0.1:9464"),
        ("node.id", [0, 1], [0]),
        # The node array is replaced whole: each of its restart-only keys changes with it.
        ("node.remote", [False, False], [False]),
        ("node.staging", ["", ""], [""]),
        ("node.tmpfs", ["", ""], [""]),
        ("node.lake", ["", ""], [""]),
    ]


# --- check-config --explain ----------------------------------------------------------------


def explained(lines: list[str]) -> dict[str, list[str]]:
    return {line.split()[0]: line.split(None, 2)[1:] for line in lines}


def test_explain_lists_every_key_with_the_file_that_set_it(etc: Path) -> None:
    late = dropin(etc, "50-quorum.toml", "[batch]\nquorum = 5\n")
    cfg = load_config(etc / "coordinator.toml")
    lines = explain(cfg)
    rows = explained(lines)
    node_keys = [f"node[{i}].{s.name}" for i in (0, 1) for s in SETTINGS if s.in_table]
    assert sorted(rows) == sorted([s.key for s in TOP] + node_keys)
    assert len(lines) == len(rows)
    assert all(re.fullmatch(r"\S+ +\S+", line) for line in lines)  # key, file: nothing more
    assert rows["batch.quorum"] == [f"{late.resolve()}:2"]
    assert rows["batch.deadline_s"] == ["<defaults>"]
    assert rows["node"] == ["<defaults>"]


def test_explain_describe_adds_the_help_of_every_key(etc: Path) -> None:
    late = dropin(etc, "50-quorum.toml", "[batch]\nquorum = 5\n")
    cfg = load_config(etc / "coordinator.toml")
    plain = explained(explain(cfg))
    rows = explained(explain(cfg, describe=True))
    assert sorted(rows) == sorted(plain)
    assert rows["batch.quorum"] == [f"{late.resolve()}:2", setting("batch.quorum").describe()]
    for s in SETTINGS:
        key = f"node[1].{s.name}" if s.in_table else s.key
        assert rows[key] == [*plain[key], s.describe()]
        assert s.describe().startswith(s.meta.help)


def test_explain_describe_marks_the_restart_only_keys_and_shows_the_choices(etc: Path) -> None:
    rows = explained(explain(load_config(etc / "coordinator.toml"), describe=True))
    restart = {k for k, (_, text) in rows.items() if text.endswith(" [restart]")}
    per_node = {k.removeprefix("node.") for k in RESTART_KEYS if k.startswith("node.")}
    assert per_node == {"id", "remote", "staging", "tmpfs", "lake"}
    assert restart == {k for k in RESTART_KEYS if not k.startswith("node.")} | {
        f"node[{i}].{k}" for i in (0, 1) for k in per_node
    }
    assert "(one of inotify, watchfiles, notify, poll)" in rows["barrier.backend"][1]
    assert "(one of debug, info, warning, error)" in rows["log.level"][1]


@pytest.mark.parametrize("flags", [["--explain"], ["--explain", "--describe"], ["--describe"]])
def test_check_config_explain_prints_every_key(
    etc: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    main = etc / "coordinator.toml"
    assert cli.main(["check-config", "--config", str(main), *flags]) == 0
    out = capsys.readouterr().out
    lines = explain(load_config(main), describe="--describe" in flags)
    assert out.startswith("\n".join(lines) + "\nconfiguration ok: ")
    for s in TOP:
        assert re.search(rf"^{re.escape(s.key)}  ", out, re.MULTILINE), s.key
    assert "\nnode[1].cpus " in out


def test_an_iceberg_lake_refuses_a_node_that_sees_the_lake_elsewhere(etc: Path) -> None:
    """A snapshot names its files by absolute location: every agent must write the same lake."""
    nodes = (
        '[[node]]\nid = 0\nmodels = ["slm-1", "slm-2", "slm-3", "slm-4"]\n'
        '[[node]]\nid = 1\nmodels = ["slm-5", "slm-6", "slm-7"]\nlake = "/mnt/lake"\n'
    )
    main = main_file(etc, '[paths]\nlake = "/data/lake"\n' + nodes)
    assert load_config(main).lake.format == "parquet"  # the plain lake allows it
    dropin(etc, "50-iceberg.toml", '[lake]\nformat = "iceberg"\n')
    msg = load_error(main)
    assert "node[1].lake" in msg and "'/mnt/lake'" in msg and "absolute location" in msg
    main_file(
        etc,
        '[paths]\nlake = "/data/lake"\n'
        + nodes.replace('lake = "/mnt/lake"', 'lake = "/data/lake"'),
    )
    assert load_config(main).lake.format == "iceberg"


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ('"4GiB"', 4 << 30),
        ('"4G"', 4 << 30),
        ('"512M"', 512 << 20),
        ('"512 mib"', 512 << 20),
        ('"1.5G"', 3 << 29),
        ('"1T"', 1 << 40),
        ("67108864", 64 << 20),
    ],
)
def test_a_memory_budget_is_bytes_or_a_size_with_a_binary_unit(
    etc: Path, value: str, size: int
) -> None:
    dropin(etc, "50-budget.toml", f"[agents]\nmemory_budget = {value}\n")
    assert load_config(etc / "coordinator.toml").agents.memory_budget == size
