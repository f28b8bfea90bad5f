"""The batch state machine and the file barrier's decision, as pure functions over plain values.

A batch moves waiting → ready → staging → staged → crosschecking → crosschecked → aggregating →
committed → archived → done. A batch that went on with a quorum after its deadline ends `degraded`
instead of `done`; one that cannot go on ends `failed` with a reason.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from coordinator.core.config import NAME_RE


class State(StrEnum):
    """Ledger states, in pipeline order."""

    WAITING = "waiting"
    READY = "ready"
    STAGING = "staging"
    STAGED = "staged"
    CROSSCHECKING = "crosschecking"
    CROSSCHECKED = "crosschecked"
    AGGREGATING = "aggregating"
    COMMITTED = "committed"
    ARCHIVED = "archived"
    DONE = "done"
    DEGRADED = "degraded"
    FAILED = "failed"


ORDER = {s: i for i, s in enumerate(State)}
FINAL = frozenset({State.DONE, State.DEGRADED, State.FAILED})
# States after which the batch's rows are in the database.
COMMITTED_OR_LATER = frozenset({State.COMMITTED, State.ARCHIVED, State.DONE, State.DEGRADED})

_RESULT_RE = re.compile(rf"(?P<cc>crosscheck_)?(?P<model>{NAME_RE.pattern})\.parquet")


PRE_COMMIT = frozenset(
    {
        State.WAITING,
        State.READY,
        State.STAGING,
        State.STAGED,
        State.CROSSCHECKING,
        State.CROSSCHECKED,
        State.AGGREGATING,
    }
)


def may_move(current: State, new: State) -> bool:
    """The one rule for a batch's states: the ledger's UPDATE allows exactly these moves, and
    the pipeline checks each step against it.

    - Nothing moves out of a final state (done, degraded, failed).
    - `failed` is reachable from every state before the commit; a committed batch never fails
      (its rows are in: it is archived and cleaned up, if need be after a restart).
    - Before the commit a step may be redone after a retry or a restart, so any state up to
      `aggregating` may follow any other (staging again after crosschecked), but nothing goes
      back to `waiting`.
    - Only the commit leads past the steps: `committed` may follow any state before it.
    - After the commit, only forward: committed, archived, then done or degraded.
    - Staying in a state (to record more of it) is a move too, except in a final state.
    """
    if current in FINAL:
        return False
    if new is current:
        return True
    if new is State.FAILED:
        return current in PRE_COMMIT
    if current in PRE_COMMIT:
        if new in PRE_COMMIT:
            return new is not State.WAITING
        return new is State.COMMITTED
    return ORDER[new] > ORDER[current]


def moves_into(new: State) -> frozenset[State]:
    """The states a batch may be in for `may_move(state, new)`: the ledger's guard."""
    return frozenset(s for s in State if may_move(s, new))


class Step(StrEnum):
    """Where a batch's run starts: the barrier, or a step of the pipeline (`Pipeline.run`).

    A StrEnum, so a step compares equal to its name ("stage") and logs as it.
    """

    BARRIER = "barrier"  # wait for the files (a batch still `waiting`)
    STAGE = "stage"  # stage, cross-check, aggregate, commit, then archive and clean up
    ARCHIVE = "archive"  # the rows are committed: archive, then clean up
    CLEANUP = "cleanup"  # archived: only the clean-up is left
    NONE = "none"  # finished: nothing to run


def resume_step(state: State) -> Step:
    """Which step a restarted daemon runs first for a batch found in `state`.

    Everything before the commit is redone from the staged files (all steps are idempotent);
    after the commit only archiving and clean-up remain.
    """
    if state in FINAL:
        return Step.NONE
    if state is State.ARCHIVED:
        return Step.CLEANUP
    if state is State.COMMITTED:
        return Step.ARCHIVE
    if state is State.WAITING:
        return Step.BARRIER
    return Step.STAGE


@dataclass(frozen=True)
class FileEntry:
    """One candidate file in a batch folder, as the scanner saw it."""

    name: str
    valid: bool  # a regular, singly-linked, readable Parquet file under a final name
    size: int = 0
    reason: str = ""  # why it is not valid
    ident: tuple[int, int, int] = (0, 0, 0)  # (inode, size, mtime_ns) when checked


@dataclass(frozen=True)
class Classified:
    """A batch folder's files sorted by role."""

    results: Mapping[str, FileEntry]  # model -> its result file
    crosschecks: Mapping[str, FileEntry]  # model -> its crosscheck file
    ignored: tuple[tuple[str, str], ...]  # (name, reason)


def classify(
    names: Iterable[str], models: Iterable[str]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Map file names in a batch folder to roles: {name: 'result'|'crosscheck'}, plus ignored ones.

    Temp files (leading '.') are silently skipped; unknown names are ignored with a reason.
    """
    wanted = set(models)
    roles: dict[str, str] = {}
    ignored: list[tuple[str, str]] = []
    for name in names:
        if name.startswith("."):
            continue
        m = _RESULT_RE.fullmatch(name)
        if m is None:
            ignored.append((name, "name does not match <model>.parquet"))
            continue
        model = m.group("model")
        if m.group("cc"):
            if model in wanted:
                roles[name] = "crosscheck"
            else:
                ignored.append((name, f"cross-check of unknown model {model!r}"))
        elif model in wanted:
            roles[name] = "result"
        else:
            ignored.append((name, f"unknown model {model!r}"))
    return roles, ignored


@dataclass(frozen=True)
class Barrier:
    """The barrier's verdict for one batch."""

    present: tuple[str, ...]
    missing: tuple[str, ...]
    complete: bool


def barrier(expected: Iterable[str], valid: Iterable[str]) -> Barrier:
    """Complete when every expected model has a valid file."""
    exp = tuple(expected)
    have = set(valid)
    present = tuple(m for m in exp if m in have)
    missing = tuple(m for m in exp if m not in have)
    return Barrier(present=present, missing=missing, complete=not missing)


def deadline_verdict(present: int, quorum: int) -> State:
    """At the deadline: go on `degraded` with a quorum, else `failed`."""
    return State.DEGRADED if present >= quorum else State.FAILED


def aggregate_node(batch_id: str, nodes: Sequence[int], attempt: int = 0) -> int:
    """The node whose agent aggregates a batch: spread over the nodes by the batch id (the same
    node for the same batch, so a resumed batch finds its files), the next node on each retry."""
    if not nodes:
        raise ValueError("no nodes to aggregate on")
    return nodes[(zlib.crc32(batch_id.encode()) + attempt) % len(nodes)]
