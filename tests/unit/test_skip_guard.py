"""The skip guard of tests/conftest.py: under CI=true a skip fails the run unless its reason is a
machine fact; every skip is listed with its reason either way. Each case runs a small pytest
session of its own (in a child, so its skips are not this session's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MACHINE_FACT, ROOT

RUNS = """
def test_runs():
    assert True
"""
FACT = f'''
def test_fact():
    pytest.skip("{MACHINE_FACT} fewer than two CPUs")
'''
FIXABLE = """
@pytest.mark.skipif(True, reason="frobnicator not installed (Debian frobnicator)")
def test_fixable():
    pass
"""
XFAIL = """
@pytest.mark.xfail(reason="a known bug, not a skip")
def test_known_bug():
    assert False
"""


def session(tmp_path: Path, source: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    # The guard comes in as the project's conftest registers it: through pytest_configure.
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_configure  # noqa\n")
    (tmp_path / "test_cases.py").write_text("import pytest\n" + source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_under_ci_a_fixable_skip_fails_the_run_and_is_named(tmp_path: Path) -> None:
    done = session(tmp_path, RUNS + FACT + FIXABLE + XFAIL, ci="true")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    out = done.stdout
    assert "2 skipped, 1 of them machine facts" in out
    assert "test_cases.py::test_fixable: frobnicator not installed (Debian frobnicator)" in out
    assert f"test_cases.py::test_fact: {MACHINE_FACT} fewer than two CPUs" in out
    assert "CI=true: 1 skip(s) above are not machine facts" in out
    # The xfail is not counted as a skip.
    assert "test_known_bug" not in out.split("machine facts", 1)[1].split("CI=true")[0]


def test_under_ci_machine_facts_alone_pass(tmp_path: Path) -> None:
    done = session(tmp_path, RUNS + FACT + XFAIL, ci="true")
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "1 skipped, 1 of them machine facts" in done.stdout
    assert "not machine facts" not in done.stdout


def test_outside_ci_skips_are_listed_but_do_not_fail(tmp_path: Path) -> None:
    done = session(tmp_path, RUNS + FACT + FIXABLE, ci=None)
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "2 skipped, 1 of them machine facts" in done.stdout
    assert "test_cases.py::test_fixable: frobnicator not installed" in done.stdout


def test_a_failing_test_still_fails_with_its_own_status(tmp_path: Path) -> None:
    failing = RUNS.replace("assert True", "assert False")
    done = session(tmp_path, failing + FACT, ci="true")
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    assert "1 failed" in done.stdout
    assert "not machine facts" not in done.stdout
