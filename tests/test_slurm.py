"""launch/slurm/* on a real one-node Slurm cluster (tests/slurm_cluster.py starts it).

Each test submits the real scripts with sbatch and trains the tiny demo job; progress is
read from the run dir's metrics.jsonl and the jobs' output files (every start, the
trainer's JSON events). Preemption is sent exactly as Slurm delivers its --signal=B:USR1
lead-time warning: to the batch shell (`scancel --signal=USR1 --batch`), which forwards it.

The two-node tests run on `slurm_two_nodes`: each slurmd in its own network namespace
(tests/hosts_harness.py), so ranks on different nodes talk over the hosts' network, with
GLOO_SOCKET_IFNAME exported at submission as a user would. tests/probe records each
rank's node, rank and batches (sample keys).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from hosts_harness import IFACE, PROBE, assert_each_sample_once_per_epoch, id_job, probe_batches
from slurm_cluster import SlurmCluster, slurm_cluster, slurm_two_nodes  # noqa: F401  (session fixtures)
from test_data_helpers import id_shards
from train_utils import ROOT, metrics, tiny_job

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SLURM = ROOT / "launch" / "slurm"
PREEMPTED_EXIT = 75


def log_events(out: Path, name: str) -> list[dict]:
    """The trainer's structured events `name` in a job's output file (all restarts)."""
    found = []
    for line in out.read_text(errors="replace").splitlines():
        start = line.find('{"event"')
        if start >= 0 and f'"event": "{name}"' in line:
            found.append(json.loads(line[start:]))
    return found


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [m["step"] for m in metrics(run_dir)] if path.exists() else []


def wait_for_step(cluster: SlurmCluster, job_id: str, run_dir: Path, step: int, out: Path,
                  timeout: float = 120) -> None:
    """Until the run has logged `step` (log_interval=1); fails if the job ends first."""
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in steps_logged(run_dir)):
        if not cluster.active(job_id) or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached step {step}:\n{tail(out)}")
        time.sleep(0.25)


def preempt(cluster: SlurmCluster, job_id: str) -> None:
    cluster.run(["scancel", "--signal=USR1", "--batch", job_id])


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def latest_tag(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def ckpt_step(tag: str) -> int:
    return int(tag.removeprefix("step"))


def test_sweep_array_trains_each_variant_in_its_own_run_dir(slurm_cluster, tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 3, "train.log_interval": 1})
    sweep = tmp_path / "lr.txt"
    sweep.write_text("# learning-rate sweep\n--set train.lr=1e-3\n\n"
                     "train.lr=3e-3 --set 'train.ema_rate=0.99'\n")
    start = time.monotonic()
    array = slurm_cluster.sbatch("--array=0-1", "--ntasks=1", "-o", str(tmp_path / "sweep-%A_%a.out"),
                                 str(SLURM / "sweep.sbatch"), str(sweep), str(job), cwd=tmp_path)
    slurm_cluster.wait_done(array, timeout=180)
    print(f"sweep of 2 variants: {time.monotonic() - start:.1f} s")
    outs = sorted(tmp_path.glob("sweep-*.out"))
    tasks = slurm_cluster.job_infos(array)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), \
        "\n".join(tail(o) for o in outs)
    for index, (lr, ema) in enumerate([(1e-3, [0.9, 0.5]), (3e-3, [0.99])]):
        run_dir = tmp_path / "runs" / "lr" / str(index)  # default: runs/<sweep name>/<index>
        resolved = yaml.safe_load((run_dir / "job.yaml").read_text())
        assert resolved["train"]["lr"] == lr and resolved["train"]["ema_rate"] == ema
        assert resolved["output"]["run_dir"] == f"runs/lr/{index}"  # relative to the submit dir
        assert latest_tag(run_dir) == "step0000003"
        assert steps_logged(run_dir) == [1, 2, 3]


def test_chain_segment_resumes_from_the_previous_one(slurm_cluster, tmp_path, digits_shards):
    total = 150  # margin: the signal takes ~0.2 s to arrive, a step here ~0.05 s
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": total, "train.log_interval": 1})
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(SLURM / "chain.sh"), "--segments", "2", "--time=5", "--ntasks=2",
         "-o", str(tmp_path / "seg-%j.out"), "--", str(job)],
        env=slurm_cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split()
    out1, out2 = tmp_path / f"seg-{first}.out", tmp_path / f"seg-{second}.out"
    assert slurm_cluster.job_info(second)["Dependency"].startswith(f"afterany:{first}")
    start = time.monotonic()
    wait_for_step(slurm_cluster, first, run_dir, 3, out1)
    preempt(slurm_cluster, first)  # what the time limit's --signal=B:USR1@120 delivers
    slurm_cluster.wait_done(second, timeout=180)
    print(f"chain of 2 segments after the first's step 3: {time.monotonic() - start:.1f} s")

    one, two = slurm_cluster.job_info(first), slurm_cluster.job_info(second)
    assert one["ExitCode"] == f"{PREEMPTED_EXIT}:0" and one["Restarts"] == "0", tail(out1)
    assert two["JobState"] == "COMPLETED" and two["ExitCode"] == "0:0", tail(out2)
    stopped = log_events(out1, "preempted")[0]["step"]
    assert 3 <= stopped < total
    assert log_events(out1, "checkpoint_saved")[-1]["step"] == stopped
    resumed = log_events(out2, "resumed")
    assert [r["step"] for r in resumed] == [stopped], tail(out2)
    assert resumed[0]["tag"] == f"step{stopped:07d}" and resumed[0]["world_size"] == 2
    assert log_events(out2, "train_done")[0]["step"] == total
    assert latest_tag(run_dir) == f"step{total:07d}"
    assert steps_logged(run_dir) == list(range(1, total + 1))  # each step once: no replay, no gap


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, digits_shards):
    total = 150  # margin: the signal takes ~0.2 s to arrive, a step here ~0.05 s
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": total, "train.log_interval": 1})
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    job_id = slurm_cluster.sbatch("--ntasks=2", "-o", str(out), str(SLURM / "train.sbatch"), str(job),
                                  cwd=tmp_path)
    start = time.monotonic()
    wait_for_step(slurm_cluster, job_id, run_dir, 3, out)
    preempted_at = time.monotonic()
    preempt(slurm_cluster, job_id)
    slurm_cluster.wait_done(job_id, timeout=180)
    done = time.monotonic()
    print(f"preempt -> requeue -> finish: {done - preempted_at:.1f} s (job {done - start:.1f} s)")

    info = slurm_cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(out)
    assert info["Restarts"] == "1", tail(out)
    text = out.read_text()
    assert "restart_count=0" in text and "restart_count=1" in text  # SLURM_RESTART_COUNT
    assert "exited with status 75 after SIGUSR1" in text
    stopped = log_events(out, "preempted")[0]["step"]
    assert 3 <= stopped < total
    assert log_events(out, "checkpoint_saved")[0]["step"] == stopped
    resumed = log_events(out, "resumed")
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumed] == [(stopped, 2, 2)]
    starts = log_events(out, "train_start")
    assert [(s["step"], s["world_size"]) for s in starts] == [(0, 2), (stopped, 2)]
    assert log_events(out, "train_done")[0]["step"] == total
    assert steps_logged(run_dir) == list(range(1, total + 1))


def test_usr1_to_every_process_of_the_step_checkpoints(slurm_cluster, tmp_path, digits_shards):
    """`scancel --signal=USR1 JOBID` (the documented way to preempt by hand, straight to the
    ranks) signals every process of the step, the ranks' loader workers too: the workers
    survive it (they inherit the rank's handler: USR1's default would kill them), and the
    ranks save and exit 75."""
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 1_000_000, "train.log_interval": 1,
                                               "data.num_workers": 2})
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    job_id = slurm_cluster.sbatch("--ntasks=2", "-o", str(out), str(SLURM / "train.sbatch"), str(job),
                                  cwd=tmp_path, env={"IDDPM_REQUEUE": "0"})
    wait_for_step(slurm_cluster, job_id, run_dir, 3, out)
    slurm_cluster.run(["scancel", "--signal=USR1", job_id])
    slurm_cluster.wait_done(job_id, timeout=60)
    info = slurm_cluster.job_info(job_id)
    assert info["ExitCode"] == f"{PREEMPTED_EXIT}:0", tail(out)
    assert "DataLoader worker" not in out.read_text(), tail(out)
    stopped = log_events(out, "preempted")[0]["step"]
    assert latest_tag(run_dir) == f"step{stopped:07d}"


def test_scancel_checkpoints_and_stops_without_a_requeue(slurm_cluster, tmp_path, digits_shards):
    """A plain `scancel JOBID` sends SIGTERM to the batch shell and to every process of the
    step, loader workers included, then SIGKILL KillWait (here Slurm's default, 30 s) later.
    Within that grace the ranks agree on a step, save it and exit 75: their loader workers
    no longer die of the SIGTERM and crash them (iddpm_ds/data/worker_signals.py). And a
    cancel means stop: train.sbatch does not requeue (it used to: the 75 looked like a
    preemption, and the cancelled job came back by itself)."""
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 1_000_000, "train.log_interval": 1,
                                               "data.num_workers": 2})
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    job_id = slurm_cluster.sbatch("--ntasks=2", "-o", str(out), str(SLURM / "train.sbatch"), str(job),
                                  cwd=tmp_path)
    wait_for_step(slurm_cluster, job_id, run_dir, 3, out)
    slurm_cluster.run(["scancel", job_id])
    slurm_cluster.wait_done(job_id, timeout=60)  # a requeued job would be pending, then training
    time.sleep(3)  # and a requeue issued at the very end would show by now
    info = slurm_cluster.job_info(job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", tail(out)
    text = out.read_text()
    assert "DataLoader worker" not in text, tail(out)
    assert "ended by SIGTERM" in text and "requeueing job" not in text, tail(out)
    stopped = log_events(out, "preempted")[0]["step"]
    assert stopped >= 3 and latest_tag(run_dir) == f"step{stopped:07d}", tail(out)


def test_time_limit_warning_checkpoints_before_the_limit(slurm_cluster, tmp_path, digits_shards):
    """The real timer: --time=1 with a 10 s warning. Slurm checks limits every 30 s and
    sends a warning up to one period early, so 20-50 s after the start (measured: @40 came
    after 5-9 s, @55 after 5-25 s): after the trainer is up, well before the limit."""
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 1_000_000, "train.log_interval": 50})
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    start = time.monotonic()
    job_id = slurm_cluster.sbatch("--ntasks=1", "--time=1", "--signal=B:USR1@10", "-o", str(out),
                                  str(SLURM / "train.sbatch"), str(job), cwd=tmp_path,
                                  env={"IDDPM_REQUEUE": "0"})
    slurm_cluster.wait_done(job_id, timeout=120)
    print(f"time-limited job ended after {time.monotonic() - start:.1f} s")
    info = slurm_cluster.job_info(job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{PREEMPTED_EXIT}:0", tail(out)
    assert "received SIGUSR1" in out.read_text() and "requeue disabled" in out.read_text()
    stopped = log_events(out, "preempted")[0]["step"]
    assert latest_tag(run_dir) == f"step{stopped:07d}"
    assert info["Restarts"] == "0"


def test_preemption_during_startup_still_requeues(slurm_cluster, tmp_path, digits_shards):
    """A warning that lands while the ranks are still importing loses nothing either way
    (killed before the trainer's handler, or caught and checkpointed at once): requeue."""
    total = 5
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": total, "train.log_interval": 1})
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    job_id = slurm_cluster.sbatch("--ntasks=1", "-o", str(out), str(SLURM / "train.sbatch"), str(job),
                                  cwd=tmp_path)
    deadline = time.monotonic() + 60
    while "restart_count=0" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, tail(out)
        time.sleep(0.1)
    preempt(slurm_cluster, job_id)
    slurm_cluster.wait_done(job_id, timeout=180)
    info = slurm_cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", tail(out)
    assert "requeueing job" in out.read_text()
    assert log_events(out, "train_done")[0]["step"] == total
    assert steps_logged(run_dir)[-1] == total


# ------------------------------------------------------------------------ two nodes
SAMPLES = 64  # 4 ranks x batch 4: 4 steps an epoch


@pytest.fixture(scope="module")
def id_data(tmp_path_factory) -> list[str]:
    return id_shards(tmp_path_factory.mktemp("ids"), [20, 27, 17], side=16)


def two_node_submit(cluster: SlurmCluster, tmp_path: Path, job: Path) -> tuple[str, Path, Path]:
    """`sbatch -N 2 --ntasks-per-node=2 launch/slurm/train.sbatch JOB` from the login node."""
    probe, out = tmp_path / "probe", tmp_path / "train.out"
    probe.mkdir()
    env = {"GLOO_SOCKET_IFNAME": IFACE, "PYTHONPATH": str(PROBE), "IDDPM_PROBE_DIR": str(probe)}
    job_id = cluster.sbatch("-N", "2", "--ntasks-per-node=2", "-o", str(out), str(SLURM / "train.sbatch"),
                            str(job), cwd=tmp_path, env=env)
    return job_id, probe, out


def check_placement(cluster: SlurmCluster, by_rank: dict[int, list[dict]]) -> None:
    """Ranks 0-1 on the first node, 2-3 on the second; MASTER_ADDR is the first node."""
    (first, _), (second, _) = cluster.nodes
    placement = {r: (recs[0]["host"], recs[0]["SLURM_NODEID"], recs[0]["local_rank"])
                 for r, recs in by_rank.items()}
    assert placement == {0: (first, "0", 0), 1: (first, "0", 1), 2: (second, "1", 0), 3: (second, "1", 1)}
    assert {r["MASTER_ADDR"] for recs in by_rank.values() for r in recs} == {first}


def test_two_nodes_train_across_both(slurm_two_nodes, tmp_path, id_data):
    cluster, steps = slurm_two_nodes, 8
    job = id_job(tmp_path, id_data, SAMPLES, **{"train.max_steps": steps, "train.batch_size": 4})
    start = time.monotonic()
    job_id, probe, out = two_node_submit(cluster, tmp_path, job)
    cluster.wait_done(job_id, timeout=400)
    print(f"sbatch -N 2 --ntasks-per-node=2, {steps} steps: {time.monotonic() - start:.1f} s")
    info = cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(out)
    assert info["NumNodes"] == "2" and info["NumTasks"] == "4"
    by_rank = probe_batches(probe)
    check_placement(cluster, by_rank)
    assert_each_sample_once_per_epoch(by_rank, SAMPLES, epochs=2)
    run_dir = tmp_path / "run"
    assert steps_logged(run_dir) == list(range(1, steps + 1))  # rank 0 alone writes metrics
    assert [s["world_size"] for s in log_events(out, "train_start")] == [4]
    assert latest_tag(run_dir) == f"step{steps:07d}"
    saved = run_dir / "checkpoints" / f"step{steps:07d}"
    assert sorted(p.name for p in saved.glob("rank*.pt")) == [f"rank{r:05d}.pt" for r in range(4)]


def test_two_node_job_preempted_requeues_and_resumes(slurm_two_nodes, tmp_path, id_data):
    cluster, total = slurm_two_nodes, 60  # the signal needs a few steps to arrive
    job = id_job(tmp_path, id_data, SAMPLES, **{"train.max_steps": total, "train.batch_size": 4})
    run_dir = tmp_path / "run"
    job_id, probe, out = two_node_submit(cluster, tmp_path, job)
    wait_for_step(cluster, job_id, run_dir, 3, out, timeout=300)
    preempted_at = time.monotonic()
    preempt(cluster, job_id)
    cluster.wait_done(job_id, timeout=400)
    print(f"two nodes: preempt -> requeue -> finish at {total}: {time.monotonic() - preempted_at:.1f} s")

    info = cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(out)
    assert info["Restarts"] == "1" and info["NumNodes"] == "2", tail(out)
    assert "exited with status 75 after SIGUSR1" in out.read_text()
    stopped = log_events(out, "preempted")[0]["step"]
    assert 3 <= stopped < total
    resumed = log_events(out, "resumed")
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumed] == [(stopped, 4, 4)]
    assert steps_logged(run_dir) == list(range(1, total + 1))
    by_rank = probe_batches(probe)  # both starts: every rank took one batch per step, on both nodes
    check_placement(cluster, by_rank)
    assert {r: len(recs) for r, recs in by_rank.items()} == {r: total for r in range(4)}


# ------------------------------------------------------------------------ node range
def wait_requeued(cluster: SlurmCluster, job_id: str, out: Path, timeout: float) -> float:
    """Until Slurm has requeued the job (Restarts=1: pending for cred_expire, then running
    again; the new run saves no checkpoint in its first seconds); returns time.time()."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job_info(job_id)
        if info["Restarts"] == "1":
            return time.time()
        if not cluster.active(job_id) or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not requeued after the node loss: {info['JobState']} "
                                 f"Restarts={info['Restarts']} Reason={info['Reason']}\n{tail(out)}")
        time.sleep(0.25)


def test_node_range_job_losing_a_node_is_requeued_and_resumes_on_the_node_left(
        slurm_two_nodes, tmp_path, id_data):
    """`sbatch -N 1-2 --exclusive --requeue` with IDDPM_TASKS_PER_NODE=2: 2 nodes x 2 ranks.
    Node 2 dies (every process on its host SIGKILLed: slurmd, slurmstepd, ranks). The
    survivors exit 4; slurmctld finds the node silent (SlurmdTimeout, tests/slurm_cluster.py),
    sets it DOWN and requeues the job itself (NODE_FAIL + --requeue); the requeued job gets
    the one node left, 2 ranks, and resumes from the newest complete checkpoint (saved by 4
    ranks: universal conversion) to the end. Nobody types a command."""
    cluster, total, every = slurm_two_nodes, 60, 8
    (first, _), (second, _) = cluster.nodes
    job = id_job(tmp_path, id_data, SAMPLES, **{"train.max_steps": total, "train.batch_size": 4,
                                                "train.save_interval": every})
    run_dir, out = tmp_path / "run", tmp_path / "train.out"
    start = time.monotonic()
    job_id = cluster.sbatch("-N", "1-2", "--exclusive", "--requeue", "-o", str(out), str(SLURM / "train.sbatch"),
                            str(job), cwd=tmp_path, env={"GLOO_SOCKET_IFNAME": IFACE, "IDDPM_TASKS_PER_NODE": "2"})
    try:
        wait_for_step(cluster, job_id, run_dir, every + every // 2, out, timeout=300)  # mid-interval
        killed_at = cluster.kill_node(second)
        requeued_at = wait_requeued(cluster, job_id, out, timeout=120)
        saved_before = ckpt_step(latest_tag(run_dir))  # what the first run left, read before the restart
        cluster.wait_done(job_id, timeout=300)
    finally:
        cluster.revive_node(second)  # the session's two-node cluster stays whole for later tests
    wall = time.monotonic() - start

    info = cluster.job_info(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(out)
    assert info["Restarts"] == "1" and info["NodeList"] == first and info["NumNodes"] == "1", tail(out)
    text = out.read_text()
    # the fault landed: both survivors took the peer-loss exit, slurmctld failed node 2 and
    # cancelled the job for it
    assert sorted(re.findall(r"^error: (rank \d): ", text, re.M)) == ["rank 0", "rank 1"], tail(out)
    assert "Exited with exit code 4" in text
    # srun names the dead node; slurmstepd's "CANCELLED ... DUE TO NODE FAILURE" line is
    # printed only when the cancel reaches the batch script before it exits (a race: CI)
    assert f"Node failure on {second}" in text, tail(out)
    # Slurm requeued it, not the script (which never requeues after a SIGTERM: the cancel
    # for the failed node may reach the batch shell before it exits, a race)
    assert "requeueing job" not in text, tail(out)
    starts = log_events(out, "train_start")
    assert [(s["step"], s["world_size"]) for s in starts] == [(0, 4), (saved_before, 2)], tail(out)
    resumed = log_events(out, "resumed")
    assert [(r["step"], r["saved_world_size"], r["world_size"]) for r in resumed] == [(saved_before, 4, 2)]
    assert log_events(out, "train_done")[-1]["step"] == total

    # split by run, not by the kill's time: node 1 may finish a step while node 2 is killed
    rows, restarted_at = metrics(run_dir), starts[1]["time"]
    before = [r["step"] for r in rows if r["time"] < restarted_at]
    after = [r for r in rows if r["time"] > restarted_at]
    assert before == list(range(1, len(before) + 1)) and saved_before <= before[-1] < saved_before + every + 4
    assert [r["step"] for r in after] == list(range(saved_before + 1, total + 1))  # no step twice, no gap
    saves = {e["step"]: e["time"] for e in log_events(out, "checkpoint_saved")}
    lost = killed_at - saves[saved_before]
    first_small = after[0]["time"] - killed_at
    print(f"node range: node lost -> requeued {requeued_at - killed_at:.1f} s -> first step at world size 2 "
          f"{first_small:.1f} s; lost work {lost:.1f} s ({before[-1] - saved_before} steps); test {wall:.1f} s")
    assert first_small < 120, "recovery bound: node DOWN ~15 s + requeue delay ~11 s + start-up"

    final = run_dir / "checkpoints" / f"step{total:07d}"
    assert latest_tag(run_dir) == final.name
    assert sorted(p.name for p in final.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
    state = torch.load(final / "trainer_state.pt", weights_only=True)
    assert (state["meta"]["step"], state["meta"]["world_size"]) == (total, 2)
    weights = torch.load(final / f"model{total:06d}.pt", weights_only=True)
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
