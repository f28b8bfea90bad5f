"""The Iceberg lake's plumbing without a database: the catalog's URL (its schema pinned), the
warehouse and FileIO properties from the configured lake, the credentials file, and the tables'
schemas and partitioning. Every bad input is an error naming what and where."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from coordinator.core.errors import ConfigError
from coordinator.core.iceberg import (
    TABLES,
    arrow_schema,
    catalog_schema,
    partition_spec,
    read_credentials,
    sqlalchemy_url,
    table_schema,
    warehouse_and_properties,
)


def test_the_catalog_url_is_psycopg2_with_the_lake_schema_on_the_search_path() -> None:
    url = sqlalchemy_url("postgresql://app@db.example:5433/ledger?sslmode=require", "x_lake")
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "postgresql+psycopg2"
    assert parts.netloc == "app@db.example:5433" and parts.path == "/ledger"
    query = dict(urllib.parse.parse_qsl(parts.query))
    assert query == {"sslmode": "require", "options": "-csearch_path=x_lake"}


def test_a_password_from_the_password_file_goes_into_the_url_quoted() -> None:
    url = sqlalchemy_url("postgresql://app@db/ledger", "s_lake", password="p@ss:w/rd")
    assert urllib.parse.urlsplit(url).netloc == "app:p%40ss%3Aw%2Frd@db"


def test_a_key_value_dsn_is_refused_naming_what_to_write() -> None:
    with pytest.raises(ConfigError, match=r"database.dsn as a URL .*'host=/run dbname=x'"):
        sqlalchemy_url("host=/run dbname=x", "s_lake")


def test_the_catalog_schema_sits_next_to_the_ledgers() -> None:
    assert catalog_schema("numa_coordinator") == "numa_coordinator_lake"


def test_a_local_lake_is_a_file_warehouse_and_an_s3_uri_keeps_its_endpoint(tmp_path: Path) -> None:
    wh, props = warehouse_and_properties(str(tmp_path / "lake"))
    assert wh == f"file://{tmp_path / 'lake'}"
    assert "s3.endpoint" not in props
    wh, props = warehouse_and_properties(
        "s3://bkt/some/prefix?endpoint_override=127.0.0.1:9000&scheme=http&region=eu-west-1"
    )
    assert wh == "s3://bkt/some/prefix"
    assert props["s3.endpoint"] == "http://127.0.0.1:9000"
    assert props["s3.region"] == "eu-west-1"
    assert "s3.access-key-id" not in props  # from the environment, then


def test_another_scheme_is_refused_naming_the_lake() -> None:
    with pytest.raises(ConfigError, match=r"paths.lake 'gs://b/l'.*local path or s3://"):
        warehouse_and_properties("gs://b/l")


def test_the_credentials_file_gives_the_keys_and_never_the_config(tmp_path: Path) -> None:
    f = tmp_path / "s3.keys"
    f.write_text("# the lake's keys\naccess_key_id = AKIA1\nsecret_access_key = s3cr3t\n")
    _, props = warehouse_and_properties("s3://b/l", str(f))
    assert props["s3.access-key-id"] == "AKIA1"
    assert props["s3.secret-access-key"] == "s3cr3t"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("access_key_id = a\n", r"secret_access_key is missing"),
        ("access_key_id = a\nsecret = b\n", r":2: expected one of access_key_id"),
        ("just a line\n", r":1: expected one of"),
    ],
)
def test_a_bad_credentials_file_is_an_error_naming_file_and_line(
    tmp_path: Path, text: str, expected: str
) -> None:
    f = tmp_path / "s3.keys"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expected) as e:
        read_credentials(str(f))
    assert str(f) in str(e.value)


def test_a_missing_credentials_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lake.credentials_file .*nope: cannot read"):
        read_credentials(str(tmp_path / "nope"))


def test_every_table_carries_its_batch_and_day_and_is_partitioned_by_day() -> None:
    spec = partition_spec()
    assert [f.name for f in spec.fields] == ["day"]
    for t in TABLES:
        schema = table_schema(t)
        assert schema.find_field("batch_id").required and schema.find_field("day").required
        assert spec.fields[0].source_id == schema.find_field("day").field_id
        arrow = arrow_schema(t)
        assert arrow.names[:2] == ["batch_id", "day"]
        assert all(b"PARQUET:field_id" not in (f.metadata or {}) for f in arrow)  # by name
    with pytest.raises(ValueError, match="no lake table 'nope'"):
        table_schema("nope")
