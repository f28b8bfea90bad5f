"""Drop-in config and reload against the real daemon: SIGHUP, `coordinatorctl reload` and a change
under conf.d all re-read coordinator.toml + conf.d/*.toml; a valid result is used by the next
batch (batches in flight keep theirs), an invalid one leaves the old config running and shows
the error, with file and line, in status."""

from __future__ import annotations

import datetime as dt
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from agents import slm
from tests.conftest import MODELS, Daemon, Env, wait_until
from tests.system.test_cli import ctl
from tests.system.test_flow import tables


def confd(env: Env) -> Path:
    return env.config.parent / "conf.d"


@pytest.fixture(autouse=True)
def _confd_exists(env: Env) -> None:
    # As installed: conf.d is there before the daemon starts (tmpfiles.d makes it).
    confd(env).mkdir()


def drop_in(env: Env, name: str, text: str) -> Path:
    """Write a drop-in atomically (as a config manager would), so no reload sees half a file."""
    path = confd(env) / name
    tmp = path.parent / f".{name}.tmp"  # not *.toml: never read, never triggers a reload
    tmp.write_text(text)
    tmp.rename(path)
    return path


def config_of(d: Daemon) -> dict[str, Any]:
    return d.status()["config"]  # type: ignore[no-any-return]


def wait_generation(d: Daemon, generation: int, what: str = "") -> dict[str, Any]:
    return wait_until(  # type: ignore[no-any-return]
        lambda: (c := config_of(d))["generation"] >= generation and c,
        30,
        what or f"config generation {generation}",
    )


def wait_rejected(d: Daemon, after: float, what: str) -> dict[str, Any]:
    def rejected() -> dict[str, Any] | None:
        lr = config_of(d)["last_reload"]
        return lr if lr["at"] and lr["at"] >= after and not lr["ok"] else None

    return wait_until(rejected, 30, what)  # type: ignore[no-any-return]


def publish(env: Env, batch_id: str, models: list[str], seed: int = 1) -> None:
    t = tables(seed, rows=20)
    for m in models:
        slm.publish(env.staging, batch_id, m, t[m])


def in_flight(d: Daemon, batch_id: str) -> dict[str, Any] | None:
    return next((b for b in d.status()["batches"] if b["batch_id"] == batch_id), None)


def ledger_deadline_s(d: Daemon, batch_id: str) -> float:
    row = d.show(batch_id)
    assert row is not None
    first = dt.datetime.fromisoformat(row["first_seen"])
    return (dt.datetime.fromisoformat(row["deadline_at"]) - first).total_seconds()


def test_drop_in_quorum_and_deadline_are_used_by_the_next_batch_not_the_one_in_flight(env, daemon):
    d = daemon(with_agents=False).start()
    publish(env, "before", MODELS[:5])
    wait_until(lambda: in_flight(d, "before"), 30, "batch 'before' to be seen")

    drop_in(env, "50-batch.toml", "[batch]\nquorum = 5\ndeadline_s = 2\n")
    c = wait_generation(d, 2, "the conf.d change to be reloaded")
    assert (c["quorum"], c["deadline_s"], c["last_reload"]["ok"]) == (5, 2.0, True)

    publish(env, "after", MODELS[:5])
    # 5 of 7 models and quorum 5: at its 2 s deadline the new batch goes on, degraded.
    b = wait_until(
        lambda: (x := in_flight(d, "after")) and x["degraded"] and x, 30, "'after' to go on"
    )
    assert b["state"] != "failed" and b["missing"] == MODELS[5:]
    assert ledger_deadline_s(d, "after") == pytest.approx(2.0)
    # The batch seen before the reload keeps its 120 s deadline and quorum 7: still waiting.
    old = in_flight(d, "before")
    assert old is not None and old["state"] == "waiting" and old["deadline_in_s"] > 60
    assert ledger_deadline_s(d, "before") == pytest.approx(120.0)


def test_sighup_reloads(env, daemon):
    d = daemon(with_agents=False).start()
    assert config_of(d)["generation"] == 1
    t0 = time.time()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    c = wait_generation(d, 2, "SIGHUP to reload")
    assert c["last_reload"]["ok"] is True and c["last_reload"]["at"] >= t0


def test_coordinatorctl_reload_returns_once_the_reload_is_applied(env, daemon):
    d = daemon(with_agents=False).start()
    before = config_of(d)["generation"]
    code, out, err = ctl("reload", "--config", str(env.config))
    assert code == 0, err
    assert "reloaded" in out
    # No waiting here: when reload has returned, the new generation is in force.
    assert config_of(d)["generation"] == before + 1


def test_a_change_under_conf_d_reloads_without_a_signal_and_other_files_do_not(env, daemon):
    d = daemon(with_agents=False).start()
    (confd(env) / "README").write_text("notes, not a drop-in\n")
    drop_in(env, "50-quorum.toml", "[batch]\nquorum = 6\n")
    c = wait_generation(d, 2, "the new drop-in to be picked up")
    assert c["quorum"] == 6
    assert c["files"] == [str(env.config), str(confd(env) / "50-quorum.toml")]
    generation = c["generation"]
    (confd(env) / "README").write_text("changed notes\n")
    (confd(env) / "50-quorum.toml.bak").write_text("[batch]\nquorum = 1\n")
    # A real change after them: once it is in force, the watcher has seen the two files
    # before it, and they must have caused no reload of their own (one generation more).
    drop_in(env, "60-deadline.toml", "[batch]\ndeadline_s = 33\n")
    c = wait_until(lambda: (c := config_of(d))["deadline_s"] == 33 and c, 30, "the later drop-in")
    assert c["generation"] == generation + 1
    assert c["quorum"] == 6
    assert str(confd(env) / "50-quorum.toml.bak") not in c["files"]


def test_of_two_drop_ins_setting_one_key_the_later_wins(env, daemon):
    d = daemon(with_agents=False).start()
    drop_in(env, "20-b.toml", "[batch]\nquorum = 6\n")
    drop_in(env, "10-a.toml", "[batch]\nquorum = 4\ndeadline_s = 30\n")
    wait_until(lambda: config_of(d)["quorum"] == 6 and config_of(d)["deadline_s"] == 30, 30, "both")
    c = config_of(d)
    assert c["files"] == [
        str(env.config),
        *(str(confd(env) / f) for f in ("10-a.toml", "20-b.toml")),
    ]
    code, out, _ = ctl("check-config", "--config", str(env.config), "--explain")
    assert code == 0
    assert re.search(rf"^batch\.quorum\s+{re.escape(str(confd(env)))}/20-b\.toml:2$", out, re.M)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[batch]\nquorum = = 5\n", ":2: TOML syntax error: Invalid value"),
        ("[batch]\nqorum = 5\n", ":2: unknown key batch.qorum"),
        ('[batch]\nquorum = "five"\n', ":2: batch.quorum: expected an integer"),
    ],
    ids=["syntax", "unknown-key", "wrong-type"],
)
def test_a_broken_drop_in_keeps_the_old_config_and_status_names_its_file_and_line(
    env, daemon, text, error
):
    d = daemon(with_agents=False).start()
    drop_in(env, "50-ok.toml", "[batch]\nquorum = 5\n")
    good = wait_generation(d, 2, "the good drop-in")
    t0 = time.time()
    bad = drop_in(env, "60-bad.toml", text)
    lr = wait_rejected(d, t0, "the broken drop-in to be rejected")
    assert f"{bad}{error}" in lr["error"]
    c = config_of(d)
    assert (c["generation"], c["quorum"], c["files"]) == (good["generation"], 5, good["files"])

    # coordinatorctl finds the daemon through the broken config, and shows the error.
    code, human, _ = ctl("status", "--config", str(env.config))
    assert code == 0
    assert "REJECTED" in human and f"! {bad}{error}" in human
    code, _, err = ctl("reload", "--config", str(env.config))
    assert code == 1 and f"{bad}{error}" in err

    bad.unlink()
    wait_generation(d, good["generation"] + 1, "the reload after the fix")
    assert config_of(d)["last_reload"]["ok"] is True


def test_a_runtime_dir_change_is_rejected_as_restart_only_naming_key_and_file(env, daemon):
    d = daemon(with_agents=False).start()
    t0 = time.time()
    f = drop_in(env, "50-run.toml", f'[paths]\nruntime_dir = "{env.run}-other"\n')
    lr = wait_rejected(d, t0, "the runtime_dir change to be rejected")
    assert "cannot change without a restart" in lr["error"]
    assert config_of(d)["generation"] == 1  # and the old socket still answers
    assert f"{f}:2: paths.runtime_dir cannot change without a restart" in lr["error"]


def test_a_runtime_dir_change_is_rejected_and_the_old_socket_keeps_answering(env, daemon):
    d = daemon(with_agents=False).start()
    t0 = time.time()
    drop_in(env, "50-run.toml", f'[paths]\nruntime_dir = "{env.run}-other"\n')
    lr = wait_rejected(d, t0, "the runtime_dir change to be rejected")
    assert "cannot change without a restart" in lr["error"]
    assert config_of(d)["generation"] == 1
    assert not Path(f"{env.run}-other").exists()


def test_a_model_set_change_is_accepted_when_idle_and_rejected_while_a_batch_is_in_flight(
    env, daemon
):
    six = MODELS[:6]
    six_models = (
        f"[batch]\nmodels = {six!r}\nquorum = 6\n\n[[node]]\nid = 0\nmodels = {six!r}\n"
    ).replace("'", '"')
    d = daemon(with_agents=False).start()
    drop_in(env, "50-models.toml", six_models)
    c = wait_generation(d, 2, "the idle model change")
    assert c["models"] == six and c["last_reload"]["ok"]

    publish(env, "b-flight", six[:2])
    wait_until(lambda: in_flight(d, "b-flight"), 30, "the batch to be in flight")
    t0 = time.time()
    (confd(env) / "50-models.toml").unlink()  # back to seven models
    lr = wait_rejected(d, t0, "the model change to be rejected")
    assert "batch.models cannot change while batches are in flight (b-flight)" in lr["error"]
    assert config_of(d)["models"] == six
