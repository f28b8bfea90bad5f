"""The test hooks' pauses: inert without the variable, limited to one batch when asked, and
ended early by a gate file (what tests/system/test_hostile.py holds a batch with)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.core import hooks


@pytest.fixture
def set_hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def set_(**kw: object) -> None:
        monkeypatch.setenv(hooks.ENV, json.dumps(kw))
        hooks.hooks.cache_clear()

    yield set_
    hooks.hooks.cache_clear()


def test_no_variable_no_pause(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv(hooks.ENV, raising=False)
    hooks.hooks.cache_clear()
    hooks.pause("aggregate", "b1")
    assert capsys.readouterr().err == ""


@pytest.mark.timeout(30)
def test_a_pause_for_one_batch_lets_the_others_pass(set_hooks, tmp_path: Path, capsys) -> None:
    gate = tmp_path / "gate"
    # Without the gate this would hold for an hour: the test would time out, not pass.
    set_hooks(aggregate_pause_s=3600, aggregate_pause_batch="b1", aggregate_pause_until=str(gate))
    hooks.pause("aggregate", "b2")
    hooks.pause("aggregate")
    assert capsys.readouterr().err == ""
    gate.touch()
    hooks.pause("aggregate", "b1")  # held, then released by the gate at once
    assert "test hook: pausing at aggregate for 3600 s" in capsys.readouterr().err
