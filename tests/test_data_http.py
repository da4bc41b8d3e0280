"""Shards over http(s), in one process against a real HTTP server on 127.0.0.1
(tests/http_faults.py): the index and shards come over the network, and each network fault
ends as data/http.py promises. A dropped connection or a server that is away and comes
back: retried with backoff, resumed at the byte (Range), each sample once. 404: missing at
once; 503 for good: missing after the retries; a stalled server: the read timeout ends
each try, then missing; missing data counts under data.max_corrupt_fraction. s3:// keeps
its `aws s3 cp` pipe. The multi-host runs against nginx are in test_storage_host.py."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from http_faults import FileServer
from iddpm_ds.data import TooManyCorruptError, build_train_stream, check_sources
from iddpm_ds.data.errors import DataError, ShardNotFoundError
from iddpm_ds.data.sources import openable_url
from iddpm_ds.spec.data import DataSpec
from test_data_helpers import id_shards

SIZES = [12, 12, 12, 12]  # 48 samples, 12 batches of 4 an epoch
FAST = {"http_retries": 3, "http_backoff_s": 0.2, "http_connect_timeout_s": 2,
        "http_read_timeout_s": 1, "num_workers": 0, "shuffle_buffer": 0}


def _index(folder: Path, sizes: list[int], name: str = "index.json") -> Path:
    shards = [{"url": f"s-{i:03d}.tar", "samples": n} for i, n in enumerate(sizes)]
    index = {"format": "iddpm_ds-shards-v1",
             "splits": {"train": {"samples": sum(sizes), "shards": shards}}}
    (folder / name).write_text(json.dumps(index))
    return folder / name


@pytest.fixture()
def server(tmp_path: Path):
    id_shards(tmp_path, SIZES)
    _index(tmp_path, SIZES)
    made = FileServer(tmp_path)
    yield made
    made.close()


def _epoch(spec: DataSpec, batches: int = 12):
    stream = build_train_stream(spec, image_size=8, class_cond=True, batch_size=4, rank=0,
                                world_size=1, seed=0)
    try:
        labels = [int(v) for _, (_, c) in zip(range(batches), stream) for v in c["y"]]
        return labels, stream.stats()["corrupt_samples"]
    finally:
        stream.close()


def _events(err: str, name: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if f'"event": "{name}"' in line]


def test_a_dropped_connection_resumes_at_the_byte_and_check_names_the_server(server, capfd) -> None:
    spec = DataSpec(shards=server.url("index.json#train"), **FAST)
    line = check_sources(spec, image_size=8, class_cond=True)[0]
    assert "48 samples in 4 shards" in line and f"= 127.0.0.1:{server.port})" in line
    capfd.readouterr()
    server.cut_after["s-002.tar"] = 5000  # mid-shard: a few samples in
    labels, corrupt = _epoch(spec)
    assert sorted(labels) == list(range(48)) and corrupt == 0  # each sample once
    retries = _events(capfd.readouterr().err, "data_http_retry")
    assert [(r["url"], r["retry"], r["at_byte"]) for r in retries] == [(server.url("s-002.tar"), 1, 5000)]
    assert ("s-002.tar", "bytes=5000-") in server.requests  # the rest, not the whole shard again


def test_a_server_away_for_a_while_is_waited_for_with_backoff(server, capfd) -> None:
    spec = DataSpec(shards=server.url("index.json"), **{**FAST, "http_retries": 5})
    stream = build_train_stream(spec, image_size=8, class_cond=True, batch_size=4, rank=0,
                                world_size=1, seed=0)
    labels = [int(v) for _, (_, c) in zip(range(4), stream) for v in c["y"]]  # 16 of 48 read
    server.stop()
    away = 1.2
    threading.Timer(away, server.start).start()  # back on the same port
    began = time.monotonic()
    labels += [int(v) for _, (_, c) in zip(range(8), stream) for v in c["y"]]
    took = time.monotonic() - began
    assert stream.stats()["corrupt_samples"] == 0
    stream.close()
    assert sorted(labels) == list(range(48))
    retries = _events(capfd.readouterr().err, "data_http_retry")
    # 0.2 + 0.4 + 0.8 s of backoff cover the 1.2 s: three retries of one shard, then on
    assert [r["retry"] for r in retries] == [1, 2, 3] and len({r["url"] for r in retries}) == 1
    assert [r["wait_s"] for r in retries] == [0.2, 0.4, 0.8]
    assert away <= took < away + 3, took


def test_404_is_missing_at_once_503_after_the_retries_under_the_corrupt_limit(server, capfd) -> None:
    server.status.update({"s-001.tar": 404, "s-003.tar": 503})
    spec = DataSpec(shards=server.url("index.json"), max_corrupt_fraction=0.6, **FAST)
    labels, corrupt = _epoch(spec)
    assert corrupt == 24 and len(labels) == 48  # batches stay whole: replacements
    err = capfd.readouterr().err
    damaged = {e["shard"]: e for e in _events(err, "data_shard_damaged")}
    assert set(damaged) == {server.url("s-001.tar"), server.url("s-003.tar")}
    assert "HTTP 404" in damaged[server.url("s-001.tar")]["reason"]
    assert "after 3 retries" in damaged[server.url("s-003.tar")]["reason"]
    retried = [e["url"] for e in _events(err, "data_http_retry")]
    assert retried == [server.url("s-003.tar")] * 3  # a 404 is not retried
    with pytest.raises(TooManyCorruptError, match="s-00[13].tar"):  # the same limit as damage
        _epoch(spec.model_copy(update={"max_corrupt_fraction": 0.2, "corrupt_window": 24}))


@pytest.mark.timeout(60)  # a reader without a read timeout would wait out the stall (60 s)
def test_a_stalled_server_times_out_each_try_then_the_shard_is_missing(server, capfd) -> None:
    server.stall.add("s-002.tar")
    spec = DataSpec(shards=server.url("index.json"), max_corrupt_fraction=0.5,
                    **{**FAST, "http_retries": 1})
    began = time.monotonic()
    labels, corrupt = _epoch(spec)
    took = time.monotonic() - began
    assert corrupt == 12 and len(labels) == 48
    # two tries of 1 s read timeout + 0.2 s backoff, plus the reading itself
    assert 2.0 <= took < 6, took
    err = capfd.readouterr().err
    assert [e["retry"] for e in _events(err, "data_http_retry")] == [1]
    assert "timed out" in _events(err, "data_shard_damaged")[0]["reason"]


def test_an_index_that_cannot_be_fetched_is_one_clear_error(server) -> None:
    with pytest.raises(ShardNotFoundError, match="HTTP 404"):
        _epoch(DataSpec(shards=server.url("nope.json"), **FAST))


def test_s3_urls_run_the_aws_cli_pipe_and_check_needs_the_cli(tmp_path: Path, monkeypatch) -> None:
    assert openable_url("s3://bucket/a b.tar", allow_pipe=True) == \
        "pipe:aws s3 cp --quiet 's3://bucket/a b.tar' -"
    shard = id_shards(tmp_path, [8])[0]
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "aws").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/argv\nexec cat {shard}\n')
    (fake / "aws").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    spec = DataSpec(shards="s3://bucket/digits/s-000.tar", allow_pipe=True, num_workers=0)
    with pytest.raises(DataError, match="no known sample count"):  # s3 needs an index
        _epoch(spec)
    entry = {"url": "s3://bucket/digits/s-000.tar", "samples": 8}
    (tmp_path / "s3.json").write_text(json.dumps(
        {"format": "iddpm_ds-shards-v1", "splits": {"train": {"samples": 8, "shards": [entry]}}}))
    spec = spec.model_copy(update={"shards": str(tmp_path / "s3.json")})
    labels, corrupt = _epoch(spec, batches=2)
    assert sorted(labels) == list(range(8)) and corrupt == 0
    assert (tmp_path / "argv").read_text().splitlines()[0] == \
        "s3 cp --quiet s3://bucket/digits/s-000.tar -"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(DataError, match=r"^data.shards: s3:// shards are read with the aws CLI"):
        check_sources(spec, image_size=8, class_cond=True)
