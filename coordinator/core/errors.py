"""One error hierarchy for the whole project.

    CoordinatorError
    ├── ConfigError          bad or unreadable configuration (names file and key)
    ├── TopologyError        the NUMA layout does not fit the config, or sysfs is unreadable
    ├── LayoutError          a machine layout plan that over-subscribes or contradicts itself
    ├── BindingError         an agent's memory policy or CPU mask is not what it was told
    ├── StagingError         a batch could not be copied to node-local memory
    │   └── NoSpaceError     the node-local tmpfs has too little free space
    ├── ParquetError         a file that should be Parquet is not readable as Parquet
    ├── BatchFinishedError   a publish into a batch whose folder the coordinator removed
    ├── ProtocolError        a malformed message on the agent or control socket
    ├── AgentError           an agent reported an error or went away mid-step
    ├── RowsRefused          the rows file to COPY is not the agent's (a link, a rewrite)
    ├── DatabaseError        PostgreSQL is unreachable or refused a write
    │   ├── NotLeaderError   another coordinator holds the leader lock
    │   │   └── FencedError  another coordinator of this host took over (a newer epoch)
    │   └── BatchOfAnotherHost  the batch id is another host's in the shared ledger
    ├── LakeError            the data lake refused a write
    └── ControlError         the control socket could not be reached or answered with an error
        ├── DaemonNotRunning nothing listens on the control socket
        └── StateUnknown     the daemon did not (fully) answer: its state is unknown

    LinkRefused (an OSError, ELOOP)  a symbolic link where a file or folder was expected

Each class says with `retryable` whether trying the same step again, later, can help: a full
tmpfs or an agent that went away can pass, a batch whose data is unusable cannot.

An agent reports a failed step with a `code` (docs/protocol.md §3, "Error codes"), and the
coordinator raises an error for it: `ERROR_CODES` is that mapping, used in both directions
(`error_code` on the agent's side, `error_for_code` on the coordinator's).

Only the CLI maps these to exit codes.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


class CoordinatorError(Exception):
    """Base of every error this project raises on purpose."""

    # Whether the same step, tried again later, can succeed; False: the cause stays.
    retryable: bool = False


class ConfigError(CoordinatorError):
    """The configuration is unreadable or invalid; the message names file and key."""


class TopologyError(CoordinatorError):
    """The NUMA topology could not be read or does not fit the configuration."""


class LayoutError(CoordinatorError):
    """A machine layout plan is inconsistent or over-subscribed."""


class BindingError(CoordinatorError):
    """A process is not bound to the NUMA node (memory or CPUs) it was told to use."""


class StagingError(CoordinatorError):
    """Copying a batch into node-local memory failed."""

    retryable = True


class NoSpaceError(StagingError):
    """The node-local tmpfs lacks the free space a batch needs."""

    retryable = True  # once space returns: the coordinator waits for it


class ParquetError(CoordinatorError):
    """A file is not a readable Parquet file."""

    retryable = False  # the batch's data: reading it again gives the same answer


class BatchFinishedError(CoordinatorError):
    """A model published into a batch that had finished: the coordinator removed its folder
    while the file was being written, so the result was not taken."""


class ProtocolError(CoordinatorError):
    """A message on a socket is malformed, too large or of an unknown type."""


class AgentError(CoordinatorError):
    """A staging agent reported an error or disconnected during a step."""

    retryable = True


class RowsRefused(CoordinatorError):
    """The aggregated rows file the coordinator is about to COPY is not the one its agent wrote
    and reported: a link, another file, or other bytes (`coordinator.core.rowsfile`). Nothing
    of it is committed; aggregating again writes a fresh file, so it is retried once."""

    retryable = True


class DatabaseError(CoordinatorError):
    """PostgreSQL is unreachable or a write failed."""

    retryable = True


class NotLeaderError(DatabaseError):
    """Another coordinator holds the leader lock on this database."""


class FencedError(NotLeaderError):
    """Another coordinator of this host took leadership after us (the host's epoch moved on):
    nothing of ours may be written any more; the daemon stops."""

    retryable = False


class BatchOfAnotherHost(DatabaseError):
    """The batch id is already another host's in the shared ledger: refused, never written."""

    retryable = False


class LakeError(CoordinatorError):
    """Writing to the data lake failed."""

    retryable = True


class ControlError(CoordinatorError):
    """The daemon's control socket answered with an error or not at all."""


class DaemonNotRunning(ControlError):
    """No daemon is listening on the control socket."""


class StateUnknown(ControlError):
    """The daemon accepted the connection but gave no whole answer in time."""


class LinkRefused(OSError):
    """A symbolic link where a file or folder was expected; it is never followed."""

    def __init__(self, where: str) -> None:
        super().__init__(errno.ELOOP, f"{where} is a symbolic link (links are never followed)")
        self.where = where


@dataclass(frozen=True)
class ErrorCode:
    """One `code` of an agent's `error` reply: what the agent sends it for, and what the
    coordinator raises when it reads it."""

    code: str
    raised_as: type[CoordinatorError]  # on the coordinator's side
    sent_for: tuple[type[BaseException], ...]  # on the agent's side


# The one table of error codes; the first row whose `sent_for` matches an exception wins, and
# anything unmatched (or a code not in the table) is `failed`.
ERROR_CODES: tuple[ErrorCode, ...] = (
    # The node's tmpfs is too full: wait for space, then try again.
    ErrorCode("nospace", NoSpaceError, (NoSpaceError,)),
    # The batch's data cannot be used (not Parquet, or a link planted in staging): final.
    ErrorCode("invalid", ParquetError, (ParquetError, LinkRefused)),
    # Anything else: tried again a few times.
    ErrorCode("failed", AgentError, (AgentError,)),
)
FALLBACK_CODE = "failed"
_BY_CODE = {row.code: row for row in ERROR_CODES}


def error_code(e: BaseException) -> str:
    """The code an agent replies with when a step raised `e`."""
    for row in ERROR_CODES:
        if isinstance(e, row.sent_for):
            return row.code
    return FALLBACK_CODE


def error_for_code(code: str) -> type[CoordinatorError]:
    """The error the coordinator raises for an agent's `error` reply with `code`."""
    return _BY_CODE.get(code, _BY_CODE[FALLBACK_CODE]).raised_as
