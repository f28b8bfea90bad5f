"""A batch's accounting per node: the bytes its agent moved and read by where their pages were,
the CPU seconds it spent decoding, its peak memory; and the batch's compression.

The agents report these in their `staged`, `crosschecked` and `aggregated` replies
(docs/protocol.md §3); `NodeUsage.add` folds a reply in (every attempt's bytes count: a retried
copy moves its bytes again), and `NodeUsage.as_row` is the ledger's `node_usage` row
(docs/numa.md §2). `FIELDS` spells the columns once for the ledger, `show` and the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from coordinator.core.messages import Aggregated, Crosschecked, Staged

__all__ = ["FIELDS", "BatchCompression", "NodeUsage"]


@dataclass
class NodeUsage:
    """One node's figures for one batch (None: never reported)."""

    # The stage's copies from staging: all, those whose source pages were on another node,
    # those whose source pages were not in memory.
    stage_copied_bytes: int | None = None
    stage_remote_bytes: int | None = None
    stage_absent_bytes: int | None = None
    # The cross-check's reads of the node-local copies, and of them the bytes not local.
    crosscheck_read_bytes: int | None = None
    crosscheck_remote_bytes: int | None = None
    # The aggregation's copies of the cross-check files (the other nodes' files are remote by
    # design) and its reads of those copies (expected all local).
    aggregate_copied_bytes: int | None = None
    aggregate_copied_remote_bytes: int | None = None
    aggregate_copied_absent_bytes: int | None = None
    aggregate_read_bytes: int | None = None
    aggregate_remote_bytes: int | None = None
    # CPU seconds of the cross-check's read of the models' files (zstd and Parquet decoding).
    decode_cpu_s: float | None = None
    # The agent's peak resident set over the batch's steps on it, in bytes.
    peak_rss_bytes: int | None = None
    # The most ranges of item ids a step worked in (1: the whole batch at once; more when the
    # batch did not fit the agent's memory budget, agents.ranges).
    work_ranges: int | None = None

    def add(self, reply: Staged | Crosschecked | Aggregated) -> None:
        """Fold in one reply: bytes and CPU seconds add up, the peak is the highest."""
        if isinstance(reply, Staged):
            self._sum("stage_copied_bytes", reply.bytes)
            self._sum("stage_remote_bytes", reply.copied_remote)
            self._sum("stage_absent_bytes", reply.copied_absent)
        elif isinstance(reply, Crosschecked):
            self._sum("crosscheck_read_bytes", reply.read_bytes)
            self._sum("crosscheck_remote_bytes", reply.read_remote)
            self._sum("decode_cpu_s", reply.decode_cpu_s)
        else:
            self._sum("aggregate_copied_bytes", reply.copied_bytes)
            self._sum("aggregate_copied_remote_bytes", reply.copied_remote)
            self._sum("aggregate_copied_absent_bytes", reply.copied_absent)
            self._sum("aggregate_read_bytes", reply.read_bytes)
            self._sum("aggregate_remote_bytes", reply.read_remote)
        if reply.peak_rss is not None:
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, reply.peak_rss)
        if not isinstance(reply, Staged) and reply.ranges is not None:
            self.work_ranges = max(self.work_ranges or 0, reply.ranges)

    def _sum(self, name: str, value: float | None) -> None:
        if value is not None:
            setattr(self, name, (getattr(self, name) or 0) + value)

    @property
    def remote_bytes(self) -> int:
        """All bytes this node's agent read from another node's pages for the batch."""
        return sum(
            getattr(self, f) or 0
            for f in (
                "stage_remote_bytes",
                "crosscheck_remote_bytes",
                "aggregate_copied_remote_bytes",
                "aggregate_remote_bytes",
            )
        )

    def as_row(self) -> dict[str, Any]:
        """The ledger's columns, None for what was never reported."""
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> NodeUsage:
        """Read a ledger row (other keys are ignored)."""
        return cls(**{f: row.get(f) for f in FIELDS})


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(NodeUsage))


@dataclass(frozen=True)
class BatchCompression:
    """A batch's models' files as their footers tell (the `staged` reply's fields)."""

    compressed_bytes: int
    decoded_bytes: int
    encode_cpu_s: float | None  # the SDK's CPU seconds writing them; None unless all recorded

    @property
    def ratio(self) -> float | None:
        """decoded / compressed."""
        return self.decoded_bytes / self.compressed_bytes if self.compressed_bytes else None

    @classmethod
    def from_reply(cls, reply: Staged) -> BatchCompression | None:
        """The figures of a `staged` reply, None when it has none."""
        if reply.compressed_bytes is None or reply.decoded_bytes is None:
            return None
        return cls(reply.compressed_bytes, reply.decoded_bytes, reply.encode_cpu_s)
