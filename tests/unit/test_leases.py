"""Several hosts, the pure parts: the [host] keys, and the lease and epoch rules of the fence
(coordinator/daemon/ledger.py; docs/reliability.md, "Fencing")."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from coordinator.core.config import Config, check_host_id, load_config
from coordinator.core.errors import ConfigError
from coordinator.daemon.ledger import lock_ids, lock_key, may_take_over, next_epoch, renew_every


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return str(e.value)


# --- [host] ----------------------------------------------------------------------------------


def test_the_host_id_defaults_to_the_hostname(tmp_path: Path) -> None:
    assert Config().host.id == socket.gethostname()
    assert load_config(write(tmp_path, "")).host.id == socket.gethostname()
    assert load_config(write(tmp_path, '[host]\nid = ""\n')).host.id == socket.gethostname()
    assert Config().host.lease_s == 10.0


@pytest.mark.parametrize("name", ["a", "node-b.example.com", "H_1", "x" * 63, "0.1"])
def test_a_host_id_of_letters_digits_dots_dashes_underscores_is_taken(
    tmp_path: Path, name: str
) -> None:
    assert load_config(write(tmp_path, f'[host]\nid = "{name}"\n')).host.id == name


@pytest.mark.parametrize("name", ["x" * 64, "a b", "a/b", "é", "a:b", "a\\\\b"])
def test_a_bad_host_id_names_file_line_and_key(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[host]\nid = "{name}"\n')
    msg = error_of(path)
    assert msg.startswith(f"{path.resolve()}:2: host.id: expected a name of letters, digits")
    assert "1..63 characters" in msg


def test_a_hostname_that_is_no_host_id_asks_for_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "bad host")
    cfg = load_config(write(tmp_path, ""))  # an agent reads it: it needs no host id
    assert cfg.host.id == "bad host"
    with pytest.raises(ConfigError) as e:
        check_host_id(cfg)  # the coordinator does, at start
    msg = str(e.value)
    assert msg.startswith("<defaults>: host.id: expected a name")
    assert "the machine's hostname, which is not one: set host.id" in msg
    assert msg.endswith("found 'bad host'")


@pytest.mark.parametrize("value", ["0.5", "0", "-1", '"10"', "true"])
def test_a_lease_under_a_second_or_not_a_number_names_the_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"[host]\nlease_s = {value}\n")
    assert error_of(path).startswith(f"{path.resolve()}:2: host.lease_s: expected ")


# --- the epoch ---------------------------------------------------------------------------------


def test_a_first_take_bumps_the_hosts_epoch() -> None:
    assert next_epoch(None, None) == 1  # the host's first leader
    assert next_epoch(None, 7) == 8


def test_a_re_take_keeps_the_epoch_only_when_nobody_led_meanwhile() -> None:
    assert next_epoch(3, 3) == 3
    assert next_epoch(3, 4) is None  # another leader came: fenced
    assert next_epoch(3, None) is None  # the row is gone: nothing vouches for us


# --- the lease -------------------------------------------------------------------------------


def test_the_recorded_holder_is_taken_over_once_its_lease_has_run_out() -> None:
    assert may_take_over(expired_s=0.1, lease_s=10, lock_pid=42, holder_pid=42)
    assert not may_take_over(expired_s=-0.1, lease_s=10, lock_pid=42, holder_pid=42)
    assert not may_take_over(expired_s=0.0, lease_s=10, lock_pid=42, holder_pid=42)


def test_a_free_lock_or_a_host_without_leader_row_is_never_a_takeover() -> None:
    assert not may_take_over(expired_s=100, lease_s=10, lock_pid=None, holder_pid=42)
    assert not may_take_over(expired_s=100, lease_s=10, lock_pid=43, holder_pid=None)


def test_a_coordinator_not_recorded_as_holder_gets_one_more_lease() -> None:
    # It took the lock but has not written its epoch yet (or is stuck before it).
    app = "numa-coordinator-leader:s:h"
    assert not may_take_over(expired_s=5, lease_s=10, lock_pid=43, holder_pid=42, lock_app=app)
    assert not may_take_over(expired_s=10, lease_s=10, lock_pid=43, holder_pid=42, lock_app=app)
    assert may_take_over(expired_s=10.5, lease_s=10, lock_pid=43, holder_pid=42, lock_app=app)


def test_a_session_of_anything_but_a_coordinator_is_never_ended() -> None:
    for app in ("", "psql", "numa-coordinator:abc"):
        assert not may_take_over(
            expired_s=1000, lease_s=10, lock_pid=43, holder_pid=42, lock_app=app
        )


def test_the_lease_is_renewed_at_least_three_times_per_lease_and_every_second() -> None:
    assert renew_every(10) == 1.0
    assert renew_every(1.5) == 0.5


def test_the_lock_key_is_per_schema_and_host_and_fits_a_bigint() -> None:
    keys = {lock_key(s, h) for s in ("a", "b") for h in ("h1", "h2")}
    assert len(keys) == 4
    assert all(-(2**63) <= k < 2**63 for k in keys)
    assert lock_key("a", "h1") == lock_key("a", "h1")
    classid, objid = lock_ids(-1)
    assert (classid, objid) == (0xFFFF_FFFF, 0xFFFF_FFFF)
