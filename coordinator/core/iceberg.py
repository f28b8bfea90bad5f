"""The lake as Apache Iceberg tables (`lake.format = "iceberg"`, docs/lake.md): the tables, their
schemas and partitioning, the catalog (pyiceberg's SQL catalog in the ledger's PostgreSQL, in a
schema of its own) and the warehouse (the configured lake: a local path or `s3://`).

Shared by the three parties: the coordinator creates the tables and commits each batch's
snapshots in its ledger transaction (`coordinator.daemon.ledger`), the aggregating agent writes
the data and metadata files (`agents.iceberg`), `coordinatorctl lake` reads and maintains them.
pyiceberg is imported here only when a function needs it, so the parquet lake never loads it.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.core.errors import ConfigError

if TYPE_CHECKING:
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.partitioning import PartitionSpec
    from pyiceberg.schema import Schema

    from coordinator.core.config import Config

__all__ = [
    "BATCH_PROPERTY",
    "CATALOG_NAME",
    "TABLES",
    "LakeSpec",
    "catalog_schema",
    "ensure_tables",
    "lake_spec",
    "open_catalog",
    "partition_spec",
    "table_schema",
    "warehouse_and_properties",
]

# The snapshot summary property that names the batch a snapshot appended (exactly once: a retry
# finds it and appends nothing).
BATCH_PROPERTY = "numa.batch-id"
CATALOG_NAME = "numa"
# The tables, in the order a batch is committed to them.
TABLES = ("results", "crosschecks", "aggregates", "agreement")


@dataclass(frozen=True)
class LakeSpec:
    """Where the Iceberg lake is: the catalog's database URL (SQLAlchemy form, its schema
    pinned by search_path), the schema's name, the namespace, the warehouse URI and the
    FileIO properties (S3 endpoint, region, credentials)."""

    catalog_url: str
    schema: str
    namespace: str
    warehouse: str
    io_properties: dict[str, str]

    def identifier(self, table: str) -> str:
        return f"{self.namespace}.{table}"


def catalog_schema(ledger_schema: str) -> str:
    """The catalog's own schema next to the ledger's: `<ledger schema>_lake`."""
    return f"{ledger_schema}_lake"


def sqlalchemy_url(dsn: str, schema: str, password: str = "") -> str:
    """The libpq URL `dsn` as a SQLAlchemy URL for psycopg2, its search_path pinned to
    `schema` (pyiceberg's catalog names its tables without a schema). ConfigError for a DSN in
    the key=value form, which has no URL to carry."""
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"lake.format = 'iceberg' needs database.dsn as a URL (postgresql://...), not {dsn!r}"
        )
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != "options"]
    query.append(("options", f"-csearch_path={schema}"))
    netloc = parts.netloc
    if password and "@" in netloc:
        user = netloc.split("@", 1)[0].split(":", 1)[0]
        host = netloc.split("@", 1)[1]
        netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(
        ("postgresql+psycopg2", netloc, parts.path, urllib.parse.urlencode(query), "")
    )


def read_credentials(path: str) -> dict[str, str]:
    """An S3 credentials file: `access_key_id = ...`, `secret_access_key = ...` and optionally
    `session_token = ...`, one a line (# comments); as pyiceberg FileIO properties. The keys
    stay out of the config (docs/lake.md)."""
    names = {
        "access_key_id": "s3.access-key-id",
        "secret_access_key": "s3.secret-access-key",
        "session_token": "s3.session-token",
    }
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"lake.credentials_file {path}: cannot read: {e.strerror}") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ConfigError(
                f"{path}:{n}: expected one of {', '.join(names)} = VALUE, found {line!r}"
            )
        out[names[key]] = value.strip()
    for need in ("access_key_id", "secret_access_key"):
        if names[need] not in out:
            raise ConfigError(f"{path}: {need} is missing")
    return out


def warehouse_and_properties(lake: str, credentials_file: str = "") -> tuple[str, dict[str, str]]:
    """The warehouse URI pyiceberg writes under and its FileIO properties, from the configured
    lake (`paths.lake`): a local path becomes file://PATH; `s3://bucket/prefix?endpoint_override=
    HOST:PORT&scheme=http&region=R` (pyarrow's form) becomes s3://bucket/prefix with s3.endpoint
    and s3.region."""
    props: dict[str, str] = {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"}
    if "://" not in lake:
        return f"file://{Path(lake).resolve()}", props
    parts = urllib.parse.urlsplit(lake)
    if parts.scheme != "s3":
        raise ConfigError(f"paths.lake {lake!r}: an Iceberg lake is a local path or s3://")
    q = dict(urllib.parse.parse_qsl(parts.query))
    if "endpoint_override" in q:
        props["s3.endpoint"] = f"{q.get('scheme', 'https')}://{q['endpoint_override']}"
    if "region" in q:
        props["s3.region"] = q["region"]
    if credentials_file:
        props |= read_credentials(credentials_file)
    return f"s3://{parts.netloc}{parts.path.rstrip('/')}", props


def lake_spec(cfg: Config, dsn: str, password: str = "") -> LakeSpec:
    """The Iceberg lake of a config, its catalog on the ledger's database `dsn` (the
    configured one, or the embedded server's)."""
    schema = catalog_schema(cfg.database.schema)
    warehouse, props = warehouse_and_properties(cfg.paths.lake, cfg.lake.credentials_file)
    return LakeSpec(
        catalog_url=sqlalchemy_url(dsn, schema, password),
        schema=schema,
        namespace=cfg.lake.namespace,
        warehouse=warehouse,
        io_properties=props,
    )


def table_schema(table: str) -> Schema:
    """The Iceberg schema of one of TABLES."""
    from pyiceberg.schema import Schema
    from pyiceberg.types import (
        DateType,
        DoubleType,
        IntegerType,
        ListType,
        NestedField,
        StringType,
    )

    key = [
        NestedField(1, "batch_id", StringType(), required=True),
        NestedField(2, "day", DateType(), required=True),
    ]
    if table == "results":
        rest = [
            NestedField(3, "model", StringType(), required=True),
            NestedField(4, "item_id", StringType(), required=True),
            NestedField(5, "prediction", StringType(), required=False),
            NestedField(6, "score", DoubleType(), required=False),
        ]
    elif table == "crosschecks":
        rest = [
            NestedField(3, "model", StringType(), required=True),
            NestedField(4, "item_id", StringType(), required=True),
            NestedField(5, "prediction", StringType(), required=False),
            NestedField(6, "score", DoubleType(), required=False),
            NestedField(7, "n_others", IntegerType(), required=False),
            NestedField(8, "n_agree", IntegerType(), required=False),
            NestedField(
                9, "agree_models", ListType(10, StringType(), element_required=False), False
            ),
        ]
    elif table == "aggregates":
        rest = [
            NestedField(3, "item_id", StringType(), required=True),
            NestedField(4, "consensus", StringType(), required=False),
            NestedField(5, "votes", IntegerType(), required=True),
            NestedField(6, "n_models", IntegerType(), required=True),
            NestedField(7, "confidence", DoubleType(), required=False),
        ]
    elif table == "agreement":
        rest = [
            NestedField(3, "model_a", StringType(), required=True),
            NestedField(4, "model_b", StringType(), required=True),
            NestedField(5, "agreement", DoubleType(), required=False),
            NestedField(6, "n_common", IntegerType(), required=True),
            NestedField(7, "fleiss_kappa", DoubleType(), required=False),
        ]
    else:
        raise ValueError(f"no lake table {table!r} (tables: {', '.join(TABLES)})")
    return Schema(*key, *rest)


def arrow_schema(table: str) -> Any:
    """The table's schema as pyarrow's, without field ids (the files are registered by name:
    the table's name mapping)."""
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(table_schema(table), include_field_ids=False)


def partition_spec() -> PartitionSpec:
    """Every table: by day (an identity transform of the `day` column; paths day=YYYY-MM-DD).
    A batch's rows are found by the batch_id bounds each manifest keeps per file, so a read of
    one batch opens only its files; a day's batches can be compacted into larger files."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import IdentityTransform

    return PartitionSpec(PartitionField(2, 1000, IdentityTransform(), "day"))


def open_catalog(spec: LakeSpec) -> SqlCatalog:
    """pyiceberg's SQL catalog on the lake's schema (created if absent, with its tables)."""
    import sqlalchemy
    from pyiceberg.catalog.sql import SqlCatalog

    engine = sqlalchemy.create_engine(spec.catalog_url)
    try:
        with engine.begin() as c:
            c.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{spec.schema}"'))
    finally:
        engine.dispose()
    return SqlCatalog(
        CATALOG_NAME, uri=spec.catalog_url, warehouse=spec.warehouse, **spec.io_properties
    )


def ensure_tables(spec: LakeSpec) -> dict[str, str]:
    """Create the namespace and TABLES where absent; return each table's metadata location."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError

    catalog = open_catalog(spec)
    try:
        try:
            catalog.create_namespace(spec.namespace)
        except NamespaceAlreadyExistsError:
            pass
        out: dict[str, str] = {}
        for name in TABLES:
            schema = table_schema(name)
            ident = spec.identifier(name)
            if not catalog.table_exists(ident):
                try:
                    catalog.create_table(
                        ident,
                        schema,
                        partition_spec=partition_spec(),
                        properties={
                            "schema.name-mapping.default": schema.name_mapping.model_dump_json(),
                            "write.parquet.compression-codec": "zstd",
                        },
                    )
                except TableAlreadyExistsError:
                    pass  # another coordinator made it meanwhile
            out[name] = str(catalog.load_table(ident).metadata_location)
        return out
    finally:
        catalog.engine.dispose()
