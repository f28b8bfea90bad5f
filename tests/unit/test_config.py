"""Config loading: defaults, conf.d merging and provenance, validation errors, DSN redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.core.config import load_config, redact_dsn
from coordinator.core.errors import ConfigError

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
