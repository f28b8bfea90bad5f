"""The lake on an object store: `Lake` with an `s3://` URI, through pyarrow's S3 filesystem, against
a real S3 API (a local moto server on 127.0.0.1; nothing else is contacted).

What the lake promises there (docs/protocol.md §6): each file appears whole under its final name
(written as `.<name>.tmp`, then moved by the store), in the given order so `aggregates.parquet`
last says the folder is complete; a re-archive rewrites the same objects; a failed write leaves
no temp object behind; `list_batch` names the archived files. The objects are read back with
boto3, a client independent of the code under test, and the order of the server-side moves is
taken from moto's request recorder."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.lake import CHUNK, Lake
from coordinator.core.errors import LakeError
from tests.unit.test_lake import aggregates, write_batch_files

DATE = "2024-05-01"
HOST = "127.0.0.1"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Moto:
    """A moto server process on 127.0.0.1 and a boto3 client for it."""

    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port = port
        self.proc = proc
        self.log = log
        self.endpoint = f"http://{HOST}:{port}"
        self.s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def api(self, path: str, method: str = "POST") -> bytes:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/{path}", method=method, data=b"")
        with urllib.request.urlopen(req, timeout=10) as r:
            return bytes(r.read())

    def recording(self) -> list[dict[str, Any]]:
        """The S3 requests made since the last `reset-recording`, in the order they came."""
        text = self.api("recorder/download-recording", method="GET").decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def keys(self, bucket: str) -> dict[str, bytes]:
        """Every object in the bucket with its content (read with boto3, not pyarrow), less
        the empty `folder/` markers pyarrow's create_dir leaves."""
        out: dict[str, bytes] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/") and obj["Size"] == 0:
                    continue
                body = self.s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                out[obj["Key"]] = body
        return out


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """`python -m moto.server` on a free port of 127.0.0.1, recording every request."""
    folder = tmp_path_factory.mktemp("moto")
    log = folder / "moto.log"
    port = _free_port()
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(folder / "recording.jsonl")}
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Moto(port, proc, log)
    try:
        t_end = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                server.api("recorder/start-recording")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > t_end:
                    pytest.fail(f"moto server did not answer on port {port} within 60 s")
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def bucket(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; dummy credentials in the environment (where pyarrow's S3 client looks),
    and the EC2 metadata lookup off, so no address but 127.0.0.1 is ever contacted."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", HOST)
    name = f"lake-{uuid.uuid4().hex[:12]}"
    moto.s3.create_bucket(Bucket=name)
    moto.api("recorder/reset-recording")
    return name


def lake_for(moto: Moto, bucket: str) -> Lake:
    return Lake(
        f"s3://{bucket}/lake?endpoint_override={HOST}:{moto.port}&scheme=http&region={REGION}"
    )


@pytest.fixture
def batch_files(tmp_path: Path) -> list[Path]:
    """Model files (one empty, one spanning two of the lake's read chunks), a cross-check file,
    then the aggregates.parquet, which comes last."""
    return write_batch_files(tmp_path, large=CHUNK + 123_457)


def prefix(bucket: str, batch: str = "b1", date: str = DATE) -> str:
    return f"lake/batches/date={date}/batch={batch}/"


def copies(recording: list[dict[str, Any]], bucket: str) -> list[tuple[str, str]]:
    """The server-side copies (pyarrow's move is CopyObject, then DeleteObject) in the order the
    server received them: (source key, target key)."""
    out = []
    for req in recording:
        headers = {k.lower(): v for k, v in req["headers"].items()}
        if req["method"] == "PUT" and "x-amz-copy-source" in headers:
            target = unquote(urlsplit(req["url"]).path).removeprefix(f"/{bucket}/")
            source = unquote(headers["x-amz-copy-source"]).lstrip("/").removeprefix(f"{bucket}/")
            out.append((source.split("?")[0], target))
    return out


def direct_writes(recording: list[dict[str, Any]], bucket: str) -> list[str]:
    """Keys written with a body (PutObject, UploadPart, CompleteMultipartUpload)."""
    out = []
    for req in recording:
        headers = {k.lower(): v for k, v in req["headers"].items()}
        if req["method"] in {"PUT", "POST"} and "x-amz-copy-source" not in headers:
            path = unquote(urlsplit(req["url"]).path).removeprefix(f"/{bucket}/")
            if path and path != f"/{bucket}":
                out.append(path)
    return out


def test_archive_writes_every_file_whole_under_date_and_batch(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    lake = lake_for(moto, bucket)
    assert not lake.local
    folder, written = lake.archive("b1", DATE, batch_files)
    assert folder == f"{bucket}/{prefix(bucket).rstrip('/')}"
    objects = moto.keys(bucket)
    assert sorted(objects) == sorted(prefix(bucket) + p.name for p in batch_files)
    for src in batch_files:
        assert objects[prefix(bucket) + src.name] == src.read_bytes(), src.name
    assert written == sum(p.stat().st_size for p in batch_files)
    got = pa.BufferReader(objects[prefix(bucket) + "aggregates.parquet"])
    assert pq.read_table(got).equals(aggregates())


def test_each_file_is_moved_into_place_from_its_temp_in_the_given_order(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    """No final name is ever written directly (a reader sees it whole or not at all), and the
    moves come in the order given, aggregates.parquet last."""
    lake_for(moto, bucket).archive("b1", DATE, batch_files)
    rec = moto.recording()
    p = prefix(bucket)
    assert copies(rec, bucket) == [(f"{p}.{f.name}.tmp", f"{p}{f.name}") for f in batch_files]
    finals = {p + f.name for f in batch_files}
    assert [k for k in direct_writes(rec, bucket) if k in finals] == []
    temps_written = {k for k in direct_writes(rec, bucket) if k.startswith(f"{p}.")}
    assert temps_written == {f"{p}.{f.name}.tmp" for f in batch_files}


def test_the_agents_descriptor_path_archives_the_same_bytes(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    """archive_fds, what the aggregating agent calls with the descriptors it verified; the copy
    reads from the descriptor's start whatever its position."""
    fds = [(p.name, os.open(p, os.O_RDONLY)) for p in batch_files]
    try:
        os.lseek(fds[0][1], 500, os.SEEK_SET)
        folder, written = lake_for(moto, bucket).archive_fds("b1", DATE, fds)
        assert folder.endswith("/batch=b1")
    finally:
        for _, fd in fds:
            os.close(fd)
    objects = moto.keys(bucket)
    assert {k.rsplit("/", 1)[1]: v for k, v in objects.items()} == {
        p.name: p.read_bytes() for p in batch_files
    }
    assert written == sum(p.stat().st_size for p in batch_files)


def test_rerunning_an_archive_rewrites_the_same_objects(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    lake = lake_for(moto, bucket)
    first = lake.archive("b1", DATE, batch_files)
    before = moto.keys(bucket)
    moto.api("recorder/reset-recording")
    second = lake.archive("b1", DATE, batch_files)
    assert second == first
    assert moto.keys(bucket) == before
    # It really wrote again (not skipped): every file was moved into place a second time.
    assert [t for _, t in copies(moto.recording(), bucket)] == [
        prefix(bucket) + f.name for f in batch_files
    ]


def test_a_rerun_replaces_an_object_left_incomplete_and_a_stale_temp(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    lake = lake_for(moto, bucket)
    lake.archive("b1", DATE, batch_files)
    p = prefix(bucket)
    moto.s3.put_object(Bucket=bucket, Key=p + "slm-2.parquet", Body=b"half")
    moto.s3.put_object(Bucket=bucket, Key=p + ".slm-2.parquet.tmp", Body=b"leftover")
    lake.archive("b1", DATE, batch_files)
    objects = moto.keys(bucket)
    assert objects[p + "slm-2.parquet"] == batch_files[1].read_bytes()
    assert p + ".slm-2.parquet.tmp" not in objects


def test_a_source_that_cannot_be_read_leaves_no_temp_object_and_no_complete_folder(
    moto: Moto, bucket: str, batch_files: list[Path], tmp_path: Path
) -> None:
    """The third file's read fails (a directory where a file was expected): a LakeError, no
    temp object anywhere, and neither that file nor the later aggregates.parquet in place."""
    bad = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    fds = [(p.name, os.open(p, os.O_RDONLY)) for p in batch_files]
    try:
        sources = [*fds[:2], ("slm-3.parquet", bad), *fds[3:]]
        with pytest.raises(LakeError, match=r"lake .*batch=b1"):
            lake_for(moto, bucket).archive_fds("b1", DATE, sources)
    finally:
        for fd in [bad, *(fd for _, fd in fds)]:
            os.close(fd)
    names = [k.rsplit("/", 1)[1] for k in moto.keys(bucket)]
    assert [n for n in names if n.startswith(".")] == []
    assert "slm-3.parquet" not in names and "aggregates.parquet" not in names
    assert sorted(names) == ["slm-1.parquet", "slm-2.parquet"]


def test_a_write_that_fails_midway_leaves_no_temp_object(moto: Moto, bucket: str) -> None:
    """_put with a writer that has sent more than a multipart part when it fails: the error
    reaches the caller, and neither the temp object nor the final one is there."""
    lake = lake_for(moto, bucket)
    folder = lake.batch_path("b1", DATE)
    lake.fs.create_dir(folder, recursive=True)
    sent = 0

    def write(out: pa.NativeFile) -> int:
        nonlocal sent
        block = os.urandom(1 << 20)
        for _ in range(12):  # 12 MiB: past pyarrow's first multipart part
            out.write(block)
            sent += len(block)
        raise OSError("the source went away")

    with pytest.raises(OSError, match="the source went away"):
        lake._put(folder, "slm-1.parquet", write)
    assert sent == 12 << 20
    assert moto.keys(bucket) == {}
    assert moto.s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_list_batch_names_the_archived_files_without_temps(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    lake = lake_for(moto, bucket)
    lake.archive("b1", DATE, batch_files)
    moto.s3.put_object(Bucket=bucket, Key=prefix(bucket) + ".stray.tmp", Body=b"x")
    assert lake.list_batch("b1", DATE) == sorted(p.name for p in batch_files)
    assert lake.list_batch("b2", DATE) == []
    assert lake.list_batch("b1", "2024-05-02") == []


def test_batches_on_different_dates_are_kept_apart(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    lake = lake_for(moto, bucket)
    a, _ = lake.archive("b1", "2024-05-01", [batch_files[0], batch_files[-1]])
    b, _ = lake.archive("b1", "2024-05-02", [batch_files[3], batch_files[-1]])
    assert a != b
    assert lake.list_batch("b1", "2024-05-01") == ["aggregates.parquet", "slm-1.parquet"]
    assert lake.list_batch("b1", "2024-05-02") == ["aggregates.parquet", "crosscheck_slm-1.parquet"]


def test_a_bucket_that_does_not_exist_is_a_lake_error(
    moto: Moto, bucket: str, batch_files: list[Path]
) -> None:
    missing = f"{bucket}-gone"
    with pytest.raises(LakeError, match=missing):
        lake_for(moto, missing).archive("b1", DATE, batch_files)
    assert missing not in {b["Name"] for b in moto.s3.list_buckets()["Buckets"]}


def test_the_recorder_sees_the_lake_s_requests(moto: Moto, bucket: str) -> None:
    """The order test above reads moto's recording: it must hold this test's requests (so an
    empty recording cannot make that test pass vacuously)."""
    lake_for(moto, bucket).list_batch("b1", DATE)
    moto.s3.put_object(Bucket=bucket, Key="probe", Body=b"probe")
    rec = moto.recording()
    bodies = [
        base64.b64decode(r["body"]) if r.get("body_encoded") else (r.get("body") or "").encode()
        for r in rec
        if r["method"] == "PUT"
    ]
    assert b"probe" in bodies


def test_iceberg_data_files_are_put_once_and_an_existing_key_is_never_replaced(
    moto: Moto, bucket: str
) -> None:
    """The Iceberg lake's data files go to their final key with If-None-Match: * (no temp
    object, no rename); a second PUT of the key is refused by the store and the first object
    stays as it was."""
    from agents.iceberg import put_once

    props = {"s3.endpoint": moto.endpoint, "s3.region": REGION}
    put_once(props, bucket, "lake/numa/t/data/day=2024-05-01/b1-a.parquet", b"first")
    with pytest.raises(LakeError, match="exists already: refused to replace it"):
        put_once(props, bucket, "lake/numa/t/data/day=2024-05-01/b1-a.parquet", b"second")
    assert moto.keys(bucket) == {"lake/numa/t/data/day=2024-05-01/b1-a.parquet": b"first"}
    puts = [r for r in moto.recording() if r["method"] == "PUT"]
    assert [{k.lower(): v for k, v in r["headers"].items()}.get("if-none-match") for r in puts] == [
        "*",
        "*",
    ]
