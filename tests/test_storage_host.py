"""Training hosts that read their shards from a storage host over HTTP (real nginx).

tests/storage_harness.py adds a "storage" namespace to the hosts of hosts_harness.py and
serves one folder with Debian's nginx; the jobs name `http://storage:8080/ids/index.json`
and every rank fetches the index and its shards over the bridge. One storage host (and
one nginx) serves every test of this module. The shards label sample i with class i and
tests/probe records every batch's labels, as in test_multihost.py, whose checks these
tests reuse: each sample once per epoch, metrics written once, a resume at another world
size that holds the saved state and continues the data position. The faults are real:
nginx stopped for 5 s mid-epoch, shards that answer 404 and 503 for good, a server that
accepts and never answers, and a rate-limited link behind a delaying proxy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hosts_harness import Hosts, assert_each_sample_once_per_epoch
from storage_harness import NAME, PORT, STALL_PORT, Storage, require_nginx
from test_data_helpers import id_shards
from test_multihost import BATCH, SAMPLES, Run, assert_equal, events, saved_state
from train_utils import ROOT, TRAIN, metrics, tiny_job

pytestmark = pytest.mark.slow

SHARD = 4
GOOD = [SHARD] * (SAMPLES // SHARD)  # 16 shards of 4: a rank opens a new shard every step or two
LINK_FACTORS = [float(f) for f in os.environ.get("IDDPM_LINK_FACTORS", "1.5").split(",")]
"""Link rates to try, as multiples of what training consumes (CI: 1.5; a bench: more)."""


def _index(folder: Path, name: str, entries: list[tuple[str, int]]) -> None:
    index = {"format": "iddpm_ds-shards-v1",
             "splits": {"train": {"samples": sum(n for _, n in entries),
                                  "shards": [{"url": u, "samples": n} for u, n in entries]}}}
    (folder / name).write_text(json.dumps(index))


@pytest.fixture(scope="module")
def store(hosts, tmp_path_factory, digits_shards):
    """nginx on the storage host over ids/ (16 id shards; index.json, and index-faults.json
    with a 503 shard, a 404 shard and one on the stalled server) and digits/."""
    require_nginx()
    root = tmp_path_factory.mktemp("store")
    root.chmod(0o755)
    ids = root / "ids"
    ids.mkdir()
    id_shards(ids, GOOD, side=16)
    good = [(f"s-{i:03d}.tar", n) for i, n in enumerate(GOOD)]
    _index(ids, "index.json", good)
    stall = f"http://{NAME}:{STALL_PORT}/ids/stalled.tar"
    _index(ids, "index-faults.json",
           good[:8] + [("busy.tar", SHARD)] + good[8:] + [("missing.tar", SHARD), (stall, SHARD)])
    (root / "digits").symlink_to(digits_shards)
    made = Storage(hosts, root)
    try:
        made.start()
        made.start_stall()
        yield made
    finally:
        made.stop()


@pytest.fixture(autouse=True)
def no_strays(hosts):
    yield
    hosts.kill_strays()


def _env() -> dict:
    """Environment of a command run on a host: this checkout first on the path."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1"}


def test_two_hosts_stream_over_http_then_resume_on_one_host_of_three(hosts, store, tmp_path):
    url = store.url("ids/index.json#train")
    run = Run(hosts, tmp_path, url, **{"train.max_steps": 6, "train.save_interval": 3,
                                       "deepspeed.zero_stage": 2, "data.http_read_timeout_s": 10})
    # --check on a training host: the index and a shard come over the network
    check = hosts.run(hosts.hosts[1], [sys.executable, str(TRAIN), "--job", str(run.job), "--check"],
                      timeout=120, env=_env(), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"64 samples in 16 shards; first sample {store.url('ids/s-000.tar')}" in check.stdout
    assert f"(over http from {NAME}:{PORT} = {store.addr}:{PORT})" in check.stdout

    code, out, wall = run.finish(run.launch({0: 2, 1: 2}), timeout=300)
    print(f"2 hosts x 2 ranks over http, 6 steps: {wall:.1f} s")
    assert code == 0, out[-6000:]
    first = run.batches()
    assert sorted(first) == [0, 1, 2, 3] and all(len(r) == 6 for r in first.values())
    assert {recs[0]["host"] for recs in first.values()} == {hosts.hosts[0].name, hosts.hosts[1].name}
    assert_each_sample_once_per_epoch(first, SAMPLES, epochs=1)  # steps 1-4: epoch 0
    assert run.steps_logged() == list(range(1, 7))  # metrics written once, by rank 0
    assert len(events(out, "train_start")) == 1

    # resumed on the third host with 3 ranks, from the same http urls
    code, out, wall = run.finish(run.launch({2: 3}, "--set", "train.max_steps=8", probe_state=True),
                                 timeout=300)
    print(f"resume over http on 1 host x 3 ranks, 2 steps: {wall:.1f} s")
    assert code == 0, out[-6000:]
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in events(out, "resumed")] == \
        [(6, 4, 3)]
    got = torch.load(run.probe / "resumed-step0000006.pt", weights_only=True)
    saved = saved_state(run.run_dir / "checkpoints" / "step0000006", 6, rates=(0.9, 0.5))
    for key in ("model", "ema", "sampler", "exp_avg", "exp_avg_sq"):
        assert_equal(got[key], saved[key], key)
    # the data position: epoch 1 had 2 of 4 steps (32 samples) done; the 32 left are
    # re-split over 3 ranks x 4 (2 steps, 24 samples; 8 fall to drop_last): none twice
    (position,) = [e for e in events(out, "data_resume")]
    assert (position["epoch"], position["batches_left"], position["samples_left"]) == (1, 2, 24)
    third = {r: recs for r, recs in run.batches().items()}
    resumed = [recs[-2:] for r, recs in third.items() if recs[-1]["host"] == hosts.hosts[2].name]
    assert len(resumed) == 3 and all(len(r) == 2 for r in resumed)
    epoch1 = [label for recs in first.values() for rec in recs[4:6] for label in rec["labels"]]
    epoch1 += [label for recs in resumed for rec in recs for label in rec["labels"]]
    assert len(epoch1) == 56 and len(set(epoch1)) == 56, sorted(epoch1)
    assert run.steps_logged() == list(range(1, 9))


@pytest.mark.timeout(300)  # the run must never hang on a stalled server; this bounds the test
def test_a_restart_404_503_and_a_stall_in_one_epoch(hosts, store, tmp_path):
    """One epoch of 19 steps (76 planned samples, 12 of them in unusable shards) on 1 host
    x 2 ranks; nginx is stopped for 5 s once step 2 is logged."""
    retries, backoff, read_timeout = 4, 0.5, 0.5  # backoff 0.5+1+2+4 = 7.5 s > the 5 s away
    run = Run(hosts, tmp_path, store.url("ids/index-faults.json"), **{
        "model.num_classes": SAMPLES + 3 * SHARD, "train.batch_size": 2, "train.max_steps": 19,
        "data.shuffle_shards": False, "data.shuffle_buffer": 0, "data.max_corrupt_fraction": 0.5,
        "data.http_retries": retries, "data.http_backoff_s": backoff,
        "data.http_read_timeout_s": read_timeout, "data.http_connect_timeout_s": 2})
    proc = run.launch({0: 2})
    run.wait_for_step(proc, 2, timeout=120)
    stopped = time.time()
    store.stop_nginx()
    time.sleep(5)
    restarted = time.time()
    store.start_nginx()
    code, out, wall = run.finish(proc, timeout=150)
    print(f"1 host x 2 ranks, one epoch with a restart, 404, 503, stall: {wall:.1f} s")
    assert code == 0, out[-6000:]

    # the restart: retried with backoff; each shard it hit went on once nginx was back
    retried = events(out, "data_http_retry")
    by_url: dict[str, list[dict]] = {}
    for event in retried:
        by_url.setdefault(event["url"], []).append(event)
    hit = {u: e for u, e in by_url.items() if "/ids/s-" in u}
    assert hit, out[-6000:]  # the fault landed mid-epoch, on good shards
    for url, tries in hit.items():
        assert [t["retry"] for t in tries] == list(range(1, len(tries) + 1))
        assert [t["wait_s"] for t in tries] == [backoff * 2 ** k for k in range(len(tries))]
        assert all(stopped <= t["time"] <= restarted + 1 for t in tries)
        back = tries[-1]["time"] + tries[-1]["wait_s"]  # the try that worked
        assert restarted <= back <= restarted + backoff * 2 ** (retries - 1) + 1, (url, back - restarted)

    # no good sample lost or doubled: 64 distinct labels; the 12 slots of unusable shards
    # hold replacements (copies of good samples), so 76 labels with 12 repeats
    served = [label for recs in run.batches().values() for rec in recs for label in rec["labels"]]
    assert len(served) == SAMPLES + 3 * SHARD and set(served) == set(range(SAMPLES))

    damaged = {e["shard"]: e for e in events(out, "data_shard_damaged")}
    busy, missing = store.url("ids/busy.tar"), store.url("ids/missing.tar")
    stall = f"http://{NAME}:{STALL_PORT}/ids/stalled.tar"
    assert set(damaged) == {busy, missing, stall}, damaged
    assert "HTTP 404" in damaged[missing]["reason"] and missing not in by_url  # not retried
    for url, cause in ((busy, "503"), (stall, "timed out")):
        assert f"gave up after {retries} retries" in damaged[url]["reason"] and cause in damaged[url]["reason"]
    # the stall: every try ended at the read timeout; the shard was given up on in time
    first_try = by_url[stall][0]["time"] - read_timeout
    budget = (retries + 1) * read_timeout + sum(backoff * 2 ** k for k in range(retries))
    assert budget - 0.5 <= damaged[stall]["time"] - first_try <= budget + 2


def _last(run_dir: Path, after: int) -> list[dict]:
    return [m for m in metrics(run_dir) if m["step"] > after] if (run_dir / "metrics.jsonl").exists() else []


def _wait_metrics(proc: subprocess.Popen, run_dir: Path, after: int, count: int, out: Path,
                  timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(got := _last(run_dir, after)) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no metrics after step {after}:\n{out.read_text()[-4000:]}")
        time.sleep(0.2)
    return got[:count]


@pytest.mark.timeout(300)
def test_a_slow_link_with_latency_does_not_starve_training(hosts, store, tmp_path, digits_shards):
    """Digits over a tc-paced link behind a proxy adding 50 ms per connection and request:
    at 1.5x the bytes/s training consumes, the reader's prefetch keeps training fed (data
    wait at most a quarter of the step; the shards are shown to pass the pacer)."""
    store.start_proxy(0.05)
    interval = 10
    job = tiny_job(tmp_path, digits_shards, **{
        "data.shards": store.url("digits/index.json#train", port=8081), "data.eval_shards": None,
        "data.num_workers": 2, "train.log_interval": interval, "train.max_steps": 100_000})
    shards = json.loads((digits_shards / "index.json").read_text())["splits"]["train"]["shards"]
    per_sample = sum((digits_shards / s["url"]).stat().st_size for s in shards) / \
        sum(s["samples"] for s in shards)
    out = tmp_path / "train.out"
    with open(out, "w") as log:
        proc = hosts.popen(hosts.hosts[0], [sys.executable, str(TRAIN), "--job", str(job)],
                           env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        free = _wait_metrics(proc, tmp_path / "run", interval, 2, out)  # past the warm-up window
        consumed = free[-1]["img_per_s"] * per_sample  # bytes/s training takes off the link
        step = free[-1]["step"]
        for factor in LINK_FACTORS:
            store.rate_limit(factor * consumed)
            began = time.time()
            paced = _wait_metrics(proc, tmp_path / "run", step + interval, 3, out)  # a window to settle
            # the shards came through the pacer, no faster than its rate (16 kB burst)
            sent, window = store.paced_bytes(), paced[-1]["time"] - began
            assert sent is not None and sent >= 0.3 * consumed * window, (sent, consumed, window)
            assert sent <= factor * consumed * (time.time() - began) + 16e3, (sent, consumed)
            step = paced[-1]["step"]
            wait = sum(m["data_wait_frac"] for m in paced) / len(paced)
            rate = sum(m["img_per_s"] for m in paced) / len(paced)
            print(f"link {factor:.2f}x of {consumed / 1e3:.0f} kB/s ({per_sample:.0f} B/sample, "
                  f"{free[-1]['img_per_s']:.0f} img/s free): {rate:.0f} img/s, data_wait_frac {wait:.1%}, "
                  f"{sent / window / 1e3:.0f} kB/s through the pacer")
            if factor >= 1.5:  # the link is not what limits: training does not wait for data
                # (the bound is loose because the other CI workers share the 2 cores with the
                # loader's decode: 14% measured once under load, 1.7% alone; img/s is not
                # compared, as it follows the other workers' load: 68% of the unpaced rate was
                # measured with 6% data wait; docs/benchmarks.md has the quiet-machine table)
                assert wait <= 0.25, (factor, paced)
    finally:
        store.rate_limit(None)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
