"""A batch's phase durations, in the form the ledger's `timings` column holds them.

The ledger stores one flat JSON object of milliseconds (docs/protocol.md §2): `<phase>_ms` for
a whole phase as the coordinator timed it (`staging_ms`), and `<phase>_node<N>_ms` for the part
that node N's agent reported (`staging_node0_ms`). `Phase.key` is the one place that spells
those keys, and `Timings` the one place that reads them back, so the pipeline, the metrics and
`coordinatorctl show` agree on them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping
from enum import StrEnum

__all__ = ["Phase", "Timings", "parse_key"]


class Phase(StrEnum):
    """The timed phases of a batch, in pipeline order."""

    BARRIER_WAIT = "barrier_wait"
    STAGING = "staging"
    CROSSCHECK = "crosscheck"
    AGGREGATE = "aggregate"
    COMMIT = "commit"
    ARCHIVE = "archive"
    CLEANUP = "cleanup"

    def key(self, node: int | None = None) -> str:
        """The ledger's key for this phase as a whole, or for node `node`'s part of it."""
        return f"{self.value}_ms" if node is None else f"{self.value}_node{node}_ms"


_ORDER = {p: i for i, p in enumerate(Phase)}
_NAMES = frozenset(p.value for p in Phase)
_KEY_RE = re.compile(r"(?P<phase>[a-z_]+?)(?:_node(?P<node>0|[1-9][0-9]*))?_ms")


def parse_key(key: str) -> tuple[Phase, int | None] | None:
    """The phase and node (None for the whole phase) of a ledger key, or None for a key that
    `Phase.key` does not make."""
    m = _KEY_RE.fullmatch(key)
    if m is None or m["phase"] not in _NAMES:
        return None
    return Phase(m["phase"]), None if m["node"] is None else int(m["node"])


class Timings:
    """A batch's durations in milliseconds: a whole phase, or one node's part of it.

    `to_json` gives the ledger's flat object, keys in the order they were set; `from_json` reads
    one back. A key that `Phase.key` does not make (written by another version) is kept as it is
    and shown last, never dropped.
    """

    def __init__(self) -> None:
        self._ms: dict[str, float] = {}

    def set(self, phase: Phase, ms: float, node: int | None = None) -> Timings:
        """Record `phase` (node `node`'s part of it when given) as `ms` milliseconds, kept to
        the microsecond; return self, so that calls chain."""
        self._ms[phase.key(node)] = round(float(ms), 3)
        return self

    def since(self, phase: Phase, t0: float, node: int | None = None) -> Timings:
        """Record `phase` as the time since `t0`, a `time.perf_counter()` reading."""
        return self.set(phase, (time.perf_counter() - t0) * 1000, node)

    def merge(self, flat: Mapping[str, object]) -> Timings:
        """Take in what the ledger already holds for the batch (a resumed run), read as
        `from_json` reads it; what this run sets later wins."""
        self._ms.update(Timings.from_json(flat).to_json())
        return self

    def has(self, phase: Phase, node: int | None = None) -> bool:
        """Whether `phase` (node `node`'s part of it when given) is recorded."""
        return phase.key(node) in self._ms

    def to_json(self) -> dict[str, float]:
        """The ledger's flat object: {"staging_ms": 12.5, "staging_node0_ms": 11.0, ...}."""
        return dict(self._ms)

    @classmethod
    def from_json(cls, flat: Mapping[str, object]) -> Timings:
        """Read the ledger's flat object; ValueError naming the key whose value is not a
        finite number of milliseconds."""
        t = cls()
        for key, ms in flat.items():
            if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms):
                raise ValueError(f"timings: {key!r} is {ms!r}, expected milliseconds")
            t._ms[str(key)] = float(ms)
        return t

    def phases(self) -> Iterator[tuple[Phase, float]]:
        """(phase, ms) of each whole phase recorded, in pipeline order."""
        for phase in Phase:
            ms = self._ms.get(phase.key())
            if ms is not None:
                yield phase, ms

    def nodes(self) -> Iterator[tuple[Phase, int, float]]:
        """(phase, node, ms) of each node's part recorded, in pipeline order, then by node."""
        parts = []
        for key, ms in self._ms.items():
            parsed = parse_key(key)
            if parsed is not None and parsed[1] is not None:
                parts.append((_ORDER[parsed[0]], parsed[1], parsed[0], ms))
        for _, node, phase, ms in sorted(parts, key=lambda p: (p[0], p[1])):
            yield phase, node, ms

    def in_order(self) -> list[tuple[str, float]]:
        """(key, ms) of everything recorded, for reading: each phase in pipeline order with
        its nodes' parts after it (by node), then any key `Phase.key` does not make, by name."""

        def rank(key: str) -> tuple[int, int, int, str]:
            parsed = parse_key(key)
            if parsed is None:
                return len(Phase), 0, 0, key
            phase, node = parsed
            return _ORDER[phase], node is not None, node or 0, key

        return [(k, self._ms[k]) for k in sorted(self._ms, key=rank)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Timings) and self._ms == other._ms

    def __repr__(self) -> str:
        return f"Timings({self._ms!r})"
