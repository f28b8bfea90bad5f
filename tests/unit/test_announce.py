"""Publish announcements: the channel of a schema, the payload encoded and decoded, and what
`publish(notify=)` accepts (coordinator/core/announce.py, agents/notifier.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pytest

from agents import notifier, slm
from coordinator.core.announce import Announcement, channel, decode, encode


def result(n: int = 3) -> pa.Table:
    return pa.table(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "prediction": ["cat"] * n,
            "score": [0.5] * n,
        }
    )


# -- the channel -------------------------------------------------------------------------------


def test_channel_is_the_schema_with_a_suffix() -> None:
    assert channel("numa_coordinator") == "numa_coordinator_published"
    assert channel("t_0123456789ab") == "t_0123456789ab_published"


def test_a_long_schema_gets_a_channel_within_postgres_limit_that_tells_prefixes_apart() -> None:
    a, b = "s" * 60 + "_a", "s" * 60 + "_b"  # 62 characters, the same first 60
    ca, cb = channel(a), channel(b)
    assert len(ca) == len(cb) == 63
    assert ca != cb
    assert ca.endswith("_published") and ca.startswith("s" * 44 + "_")
    assert channel(a) == ca  # stable
    # The longest schema that keeps the plain form: 53 characters.
    assert channel("x" * 53) == "x" * 53 + "_published"
    assert channel("x" * 54) != "x" * 54 + "_published"


# -- the payload -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "model", "size"),
    [("b-001", "slm-1", 12345), ("2026.12.02_a", "m.v2-x", 0), ("B" * 128, "m" * 128, 2**40)],
)
def test_encode_then_decode_gives_the_announcement_back(batch: str, model: str, size: int) -> None:
    payload = encode(batch, model, size)
    assert payload == f"{batch}/{model}/{size}"
    assert decode(payload) == Announcement(batch, model, size)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("", "slm-1", 1), "batch_id ''"),
        ((".quarantine", "slm-1", 1), "batch_id '.quarantine'"),
        (("a/b", "slm-1", 1), "batch_id 'a/b'"),
        (("b1", "slm 1", 1), "model 'slm 1'"),
        (("b1", "slm-1", -1), "size -1"),
        (("b1", "slm-1", 1.5), "size 1.5"),
        (("b1", "slm-1", True), "size True"),
    ],
)
def test_encode_refuses_what_would_not_decode(args: tuple, names: str) -> None:
    with pytest.raises(ValueError, match=names.replace(".", r"\.")):
        encode(*args)


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ("", "not <batch_id>/<model>/<size> (1 part"),
        ("b1/slm-1", "not <batch_id>/<model>/<size> (2 part"),
        ("b1/slm-1/10/x", "(4 part"),
        ("../slm-1/10", "batch_id '..'"),
        (".quarantine/slm-1/10", "batch_id '.quarantine'"),
        ("b1//10", "model ''"),
        ("b1/slm-1/", "size '' is not a byte count"),
        ("b1/slm-1/-5", "size '-5' is not a byte count"),
        ("b1/slm-1/1e3", "size '1e3'"),
        ("b1/slm-1/\u0663", "is not a byte count"),  # an Arabic-Indic digit
        ("b1/slm-1/ 7", "size ' 7'"),
        ("x" * 8001, "too long"),
    ],
)
def test_decode_names_what_is_wrong_with_a_bad_payload(payload: str, says: str) -> None:
    with pytest.raises(ValueError, match="announcement") as e:
        decode(payload)
    assert says in str(e.value)


# -- publish(notify=) --------------------------------------------------------------------------


def test_publish_calls_a_callback_after_the_file_is_in_place(tmp_path: Path) -> None:
    seen: list[tuple[str, str, int, bool]] = []

    def cb(batch: str, model: str, size: int) -> None:
        path = tmp_path / batch / f"{model}.parquet"
        seen.append((batch, model, size, path.is_file() and path.stat().st_size == size))

    path = slm.publish(tmp_path, "b1", "slm-1", result(), notify=cb)
    assert seen == [("b1", "slm-1", path.stat().st_size, True)]


def test_a_failing_callback_is_logged_and_the_publish_stands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def cb(batch: str, model: str, size: int) -> None:
        raise ConnectionRefusedError("no database here")

    with caplog.at_level(logging.WARNING, logger="agents.slm"):
        path = slm.publish(tmp_path, "b1", "slm-1", result(), notify=cb)
    assert path.is_file()
    assert "announcing b1/slm-1 failed" in caplog.text
    assert "ConnectionRefusedError: no database here" in caplog.text


@pytest.mark.parametrize(
    ("notify", "error"),
    [
        (True, TypeError),
        (42, TypeError),
        ("", ValueError),
        (notifier.PgNotifier, TypeError),  # the class, not a notifier
    ],
)
def test_a_bad_notify_argument_fails_before_anything_is_written(
    tmp_path: Path, notify: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="notify"):
        slm.publish(tmp_path, "b1", "slm-1", result(), notify=notify)  # type: ignore[arg-type]
    assert not (tmp_path / "b1").exists()


def test_without_notify_and_without_the_environment_nothing_is_announced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(notifier.DSN_ENV, raising=False)
    assert notifier.resolve(None) is None
    assert notifier.resolve(False) is None


def test_the_environment_names_the_database_and_the_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(notifier.DSN_ENV, "postgresql://nobody@127.0.0.1:1/x")
    monkeypatch.setenv(notifier.SCHEMA_ENV, "prod_a")
    n = notifier.resolve(None)
    assert isinstance(n, notifier.PgNotifier)
    assert n.channel == "prod_a_published"
    assert notifier.resolve(None) is n  # one per process and (dsn, schema)
    assert notifier.resolve(False) is None  # False wins over the environment
    monkeypatch.setenv(notifier.SCHEMA_ENV, "Prod-A")
    with pytest.raises(ValueError, match=r"\$NUMA_COORDINATOR_NOTIFY_SCHEMA='Prod-A'"):
        notifier.resolve(None)


def test_a_notifier_refuses_a_schema_the_daemon_would_refuse() -> None:
    with pytest.raises(ValueError, match="schema 'a;drop'"):
        notifier.PgNotifier("postgresql://x@127.0.0.1:1/x", "a;drop")
    with pytest.raises(ValueError, match="dsn"):
        notifier.PgNotifier("", "ok")


def test_an_unreachable_database_costs_one_try_then_nothing_until_retry_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Port 1 on the loopback: refused at once.
    n = notifier.PgNotifier("postgresql://nobody@127.0.0.1:1/x", "s", retry_after_s=3600)
    try:
        with caplog.at_level(logging.WARNING, logger="agents.notifier"):
            for m in ("slm-1", "slm-2", "slm-3"):
                assert slm.publish(tmp_path, "b1", m, result(), notify=n).is_file()
        assert (n.sent, n.failed) == (0, 3)
        assert n.last_error
        # One warning: the first failure; the others were skipped while it is away.
        assert caplog.text.count("could not announce") == 1
        assert "b1/slm-1/" in caplog.text
    finally:
        n.close()
    with pytest.raises(ValueError, match="after close"):
        n("b1", "slm-1", 1)
