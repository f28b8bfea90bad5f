"""A batch's aggregate as the coordinator holds it: the summary, and the files that carry the rows.

The per-item rows (two million a batch at the seed's sizes) never enter the coordinator: the
aggregating agent writes them, node-locally, as `aggregates.csv` (the COPY payload, batch_id
first) and `aggregates.parquet` (for the lake), and sends back only this summary and the two
paths. The coordinator streams the first into PostgreSQL and copies the second into the lake.

Pure: the wire form of the summary; the files (and the CSV encoding) are written by
`agents.aggregation`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.core.errors import ProtocolError
from coordinator.core.messages import Aggregated
from coordinator.core.rowsfile import RowsIdent

__all__ = [
    "COPY_COLUMNS",
    "CSV_NAME",
    "PARQUET_NAME",
    "ROWS_VIA",
    "STAGED_CSV_NAME",
    "AggregateFiles",
    "AggregateSummary",
    "PairAgreement",
    "rows_name",
]

# The columns of `aggregates`, in the order of the CSV the agent writes and COPY reads.
COPY_COLUMNS = ("batch_id", "item_id", "consensus", "votes", "n_models", "confidence")
# The aggregating agent's files, in its node-local folder of the batch.
CSV_NAME = "aggregates.csv"
PARQUET_NAME = "aggregates.parquet"
# The rows CSV of an agent in another kernel, in the batch's staging folder (a dot name: the
# barrier never counts it, and it goes with the folder at cleanup).
STAGED_CSV_NAME = ".aggregates.csv"
# The rows CSV's hash in an `aggregated` reply: a SHA-256 hex digest.
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Where the rows CSV goes (the `aggregate` request's rows_via).
ROWS_VIA = ("tmpfs", "staging")


def rows_name(via: str) -> str:
    """The rows CSV's name in the batch's folder of the root `via` names."""
    if via not in ROWS_VIA:
        raise ProtocolError(f"rows_via is {via!r}, expected one of {', '.join(ROWS_VIA)}")
    return CSV_NAME if via == "tmpfs" else STAGED_CSV_NAME


@dataclass(frozen=True)
class PairAgreement:
    """How often two models agree on the items both of them predicted."""

    model_a: str
    model_b: str
    agreement: float | None  # None when the two models share no predicted item
    n_common: int


@dataclass(frozen=True)
class AggregateSummary:
    """Everything of a batch's aggregate but its per-item rows."""

    rows: int
    agreement: tuple[PairAgreement, ...]
    fleiss_kappa: float | None
    consensus_agreement: dict[str, float | None]
    models: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        """The summary as JSON-able values (the agent's `aggregated` reply)."""
        return {
            "rows": self.rows,
            "agreement": [[p.model_a, p.model_b, p.agreement, p.n_common] for p in self.agreement],
            "fleiss_kappa": self.fleiss_kappa,
            "consensus_agreement": dict(self.consensus_agreement),
            "models": list(self.models),
        }

    @classmethod
    def from_wire(cls, msg: Mapping[str, Any]) -> AggregateSummary:
        """Parse `to_wire`'s form; ProtocolError naming the field when it is malformed."""
        try:
            rows = msg["rows"]
            if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
                raise ValueError(f"rows: expected a count, found {rows!r}")
            pairs = tuple(
                PairAgreement(str(a), str(b), _opt_float(agr, "agreement"), int(n))
                for a, b, agr, n in msg["agreement"]
            )
            shares = {
                str(m): _opt_float(v, "consensus_agreement")
                for m, v in dict(msg["consensus_agreement"]).items()
            }
            return cls(
                rows=rows,
                agreement=pairs,
                fleiss_kappa=_opt_float(msg["fleiss_kappa"], "fleiss_kappa"),
                consensus_agreement=shares,
                models=tuple(str(m) for m in msg["models"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed aggregate summary: {type(e).__name__}: {e}") from e


def _opt_float(value: object, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{field}: expected a finite number or null, found {value!r}")
    return float(value)


@dataclass(frozen=True)
class AggregateFiles:
    """A batch's aggregate after the agent's step: the summary, where the files are, and who
    wrote them."""

    summary: AggregateSummary
    node: int
    rows_csv: Path  # COPY payload, COPY_COLUMNS with a header
    parquet: Path  # aggregates.parquet for the lake
    seconds: float
    rows_ident: RowsIdent | None = None  # the rows CSV as its writer reported it
    ranges: int = 1  # the ranges of item ids the vote was taken in (agents.ranges)

    @classmethod
    def from_reply(
        cls,
        reply: Aggregated,
        node: int,
        batch_id: str,
        *,
        via: str,
        rows_root: Path,
        local_root: Path,
    ) -> AggregateFiles:
        """Check an agent's `aggregated` reply (its fields' types are checked when it is
        decoded). Its paths are relative, and must be the batch's own files: the rows CSV in
        the batch's folder under `rows_root` (the coordinator's view of the root `via` names),
        the Parquet file in the batch's folder under `local_root` (the node's tmpfs). The
        coordinator reads nothing else an agent names. ProtocolError naming the field
        otherwise, and when the summary is malformed."""
        batch = batch_id  # the request's, not what the reply says
        want_csv, want_parquet = f"{batch}/{rows_name(via)}", f"{batch}/{PARQUET_NAME}"
        for key, got, want in (
            ("rows_csv", reply.rows_csv, want_csv),
            ("parquet", reply.parquet, want_parquet),
        ):
            if got != want:
                raise ProtocolError(
                    f"agent on node {node}: aggregated reply: {key} is {got!r}, expected {want!r}"
                )
        if not _SHA256.fullmatch(reply.rows_sha256):
            raise ProtocolError(
                f"agent on node {node}: aggregated reply: rows_sha256 is "
                f"{reply.rows_sha256[:80]!r}, expected 64 lowercase hex digits"
            )
        rows_csv, parquet = rows_root / want_csv, local_root / want_parquet
        return cls(
            summary=AggregateSummary.from_wire(reply.summary),
            node=node,
            rows_csv=rows_csv,
            parquet=parquet,
            seconds=float(reply.seconds),
            rows_ident=RowsIdent(*reply.rows_ident, sha256=reply.rows_sha256),
        )
