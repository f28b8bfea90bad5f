"""The error codes of the agent socket, one table both ways, and whether a retry can help."""

from __future__ import annotations

import errno

import pytest

from coordinator.core import errors, roots
from coordinator.core.errors import (
    ERROR_CODES,
    AgentError,
    BatchFinishedError,
    ConfigError,
    CoordinatorError,
    DatabaseError,
    LakeError,
    LinkRefused,
    NoSpaceError,
    NotLeaderError,
    ParquetError,
    ProtocolError,
    StagingError,
    error_code,
    error_for_code,
)

ROWS = {row.code: row for row in ERROR_CODES}


def test_the_table_has_the_codes_the_protocol_documents() -> None:
    # docs/protocol.md §3, "Error codes": exactly these, each once.
    assert [row.code for row in ERROR_CODES] == ["nospace", "invalid", "failed"]
    assert ROWS["nospace"].raised_as is NoSpaceError
    assert ROWS["invalid"].raised_as is ParquetError
    assert ROWS["failed"].raised_as is AgentError


@pytest.mark.parametrize("code", [row.code for row in ERROR_CODES])
def test_a_code_read_back_is_the_code_sent(code: str) -> None:
    raised = error_for_code(code)
    assert error_code(raised("x")) == code
    for cls in ROWS[code].sent_for:
        sent = LinkRefused("x") if cls is LinkRefused else cls("x")
        assert error_code(sent) == code
        assert error_for_code(error_code(sent)) is raised


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NoSpaceError("full"), "nospace"),  # a StagingError, but the more specific row wins
        (StagingError("vanished"), "failed"),
        (ParquetError("no item_id"), "invalid"),
        (LinkRefused("staging/b1"), "invalid"),
        (OSError(errno.ELOOP, "a loop, but not a refused link"), "failed"),
        (ValueError("bad name"), "failed"),
        (CoordinatorError("anything"), "failed"),
        (KeyError("batch_id"), "failed"),
    ],
)
def test_what_an_agent_replies_for_an_exception(exc: BaseException, code: str) -> None:
    assert error_code(exc) == code


@pytest.mark.parametrize("code", ["", "oops", "NOSPACE", "None"])
def test_an_unknown_code_is_an_agent_error(code: str) -> None:
    assert error_for_code(code) is AgentError


@pytest.mark.parametrize(
    ("cls", "retryable"),
    [
        (NoSpaceError, True),
        (AgentError, True),
        (StagingError, True),
        (DatabaseError, True),
        (NotLeaderError, True),
        (LakeError, True),
        (ParquetError, False),
        (ProtocolError, False),
        (ConfigError, False),
        (BatchFinishedError, False),
        (CoordinatorError, False),
    ],
)
def test_each_error_says_whether_a_retry_can_help(
    cls: type[CoordinatorError], retryable: bool
) -> None:
    assert cls.retryable is retryable
    assert cls("x").retryable is retryable


def test_the_codes_retried_are_the_retryable_ones() -> None:
    assert {row.code for row in ERROR_CODES if row.raised_as.retryable} == {"nospace", "failed"}


def test_link_refused_is_one_class_wherever_it_is_imported_from() -> None:
    assert roots.LinkRefused is errors.LinkRefused
    e = LinkRefused("staging/b1")
    assert isinstance(e, OSError) and not isinstance(e, CoordinatorError)
    assert e.errno == errno.ELOOP and e.where == "staging/b1"
    assert "staging/b1 is a symbolic link" in str(e)
