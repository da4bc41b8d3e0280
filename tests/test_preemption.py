"""Preemption and crash safety with real processes: signals, SIGKILL mid-save, restart."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from iddpm_ds.train import checkpoint as ckpt
from mp_utils import run_ranks
from train_utils import ROOT, events, run_train, tiny_job, train_cmd

PREEMPTED_EXIT = 75


@pytest.fixture
def start():
    """Start a 2-rank training in its own process group; whatever happens in the test,
    nothing of it outlives the test."""
    started: list[subprocess.Popen] = []

    def _start(job: Path, *sets: str) -> subprocess.Popen:
        args = ["--job", str(job)] + [a for s in sets for a in ("--set", s)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(train_cmd(2, *args, launcher="deepspeed"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, cwd=ROOT, start_new_session=True)
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_trainer(process: psutil.Process) -> bool:
    try:
        cmdline = process.cmdline()
        return any("launch/train.py" in part for part in cmdline) \
            and not any("deepspeed" in part for part in cmdline)  # the launcher's own processes
    except psutil.Error:
        return False


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training ranks: train.py processes whose parent is not one (that would be a
    data-loader worker forked by a rank)."""
    children = psutil.Process(proc.pid).children(recursive=True)
    return sorted((c for c in children if _is_trainer(c) and not _is_trainer(c.parent())),
                  key=lambda c: c.pid)


def _wait_for(predicate, timeout: float, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("condition not reached")


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in lines), default=0)


def _finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_on_one_rank_checkpoints_all_and_exits_75(tmp_path, digits_shards, signum, start):
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 500, "train.log_interval": 2,
                                               "train.save_interval": 1000})
    run_dir = tmp_path / "run"
    proc = start(job)
    _wait_for(lambda: _logged_step(run_dir) >= 4, timeout=180)
    ranks = _wait_for(lambda: _ranks(proc), timeout=10)
    assert len(ranks) == 2
    # one rank only: the others learn it at the next step. SIGTERM goes to its loader
    # worker too, as Slurm (every process of the step) and torchrun's agent (the rank's
    # process group, at a membership change) send it: the worker must not die of it
    workers = ranks[-1].children() if signum == signal.SIGTERM else []
    assert len(workers) == (1 if signum == signal.SIGTERM else 0)  # data.num_workers: 1
    for target in [ranks[-1], *workers]:
        target.send_signal(signum)
    code, out = _finish(proc)
    assert code == PREEMPTED_EXIT, out[-3000:]
    preempted = [json.loads(line[line.find("{"):]) for line in out.splitlines() if '"event": "preempted"' in line]
    step = preempted[0]["step"]
    tag = ckpt.tag_for(step)
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert ckpt.is_complete(run_dir / "checkpoints" / tag)
    assert step < 500
    # the requeued command resumes from the preemption checkpoint and finishes
    again = run_train(2, job, f"train.max_steps={step + 2}")
    assert events(again, "resumed")[0]["step"] == step
    assert events(again, "train_done")[0]["step"] == step + 2


@pytest.mark.slow
def test_a_pending_stop_checkpoints_before_a_sample_grid(tmp_path, digits_shards):
    """A preemption's notice (Slurm's --signal lead time, KillWait after a scancel) is for
    the checkpoint, not for a sample grid or an eval (minutes on a paper model; the skipped
    one is not redone, the next comes at its interval). With the cross-rank check only every
    1000 steps, a signalled run still stops at the first grid step, before drawing it."""
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 300, "train.log_interval": 1,
                                               "train.sample_interval": 5, "train.save_interval": 1000,
                                               "train.preempt_check_interval": 1000})
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(train_cmd(1, "--job", str(job), launcher="python"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        _wait_for(lambda: _logged_step(run_dir) >= 7, timeout=180)  # a grid at 5 is drawn
        signalled_after = _logged_step(run_dir)
        proc.send_signal(signal.SIGUSR1)
    finally:
        code, out = _finish(proc)
    assert code == PREEMPTED_EXIT, out[-3000:]
    step = [json.loads(line[line.find("{"):]) for line in out.splitlines() if '"event": "preempted"' in line][0]["step"]
    grids = sorted(int(p.stem.rsplit("_", 1)[1]) for p in (run_dir / "samples").glob("ema_*.png"))
    assert step % 5 == 0 and signalled_after <= step < 300, (signalled_after, step)
    assert grids == list(range(5, step, 5)), (grids, step)  # every grid before the stop, not its own
    assert (run_dir / "checkpoints" / "latest").read_text() == ckpt.tag_for(step)


@pytest.mark.slow
def test_sigkill_mid_save_never_leaves_latest_on_a_partial_checkpoint(tmp_path, digits_shards, start):
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 500, "train.save_interval": 1,
                                               "output.keep_checkpoints": 3})
    ckpt_dir = tmp_path / "run" / "checkpoints"
    proc = start(job)

    def partial_tag():
        if not ckpt_dir.is_dir():
            return None
        for entry in ckpt_dir.iterdir():
            if ckpt.TAG_RE.match(entry.name) and ckpt.step_of(entry.name) >= 3 \
                    and not ckpt.is_complete(entry) and any(entry.iterdir()):
                return entry.name
        return None

    try:
        partial = _wait_for(partial_tag, timeout=180, poll=0.003)
        _ranks(proc)[-1].send_signal(signal.SIGKILL)  # one rank, in the middle of a save
    finally:
        code, out = _finish(proc)
    assert code != 0
    assert not ckpt.is_complete(ckpt_dir / partial), "the kill came too late to test anything"
    latest = (ckpt_dir / "latest").read_text()
    assert ckpt.is_complete(ckpt_dir / latest) and ckpt.step_of(latest) < ckpt.step_of(partial)
    again = run_train(2, job, f"train.max_steps={ckpt.step_of(partial) + 1}")
    assert events(again, "resumed")[0]["tag"] == latest
    assert ckpt.is_complete(ckpt_dir / ckpt.tag_for(ckpt.step_of(partial) + 1))


def _touch_tag(ckpt_dir: Path, step: int, complete: bool) -> str:
    tag = ckpt.tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (ckpt_dir / tag / ckpt.COMPLETE).write_text("{}")
    return tag


def test_resume_choice_skips_incomplete_checkpoints(tmp_path):
    assert ckpt.find_resume_tag(tmp_path)[0] is None
    _touch_tag(tmp_path, 10, True)
    _touch_tag(tmp_path, 20, True)
    _touch_tag(tmp_path, 30, False)
    (tmp_path / "latest").write_text(ckpt.tag_for(20))
    assert ckpt.find_resume_tag(tmp_path)[0] == ckpt.tag_for(20)
    # a latest that names a partial checkpoint (written by another tool) is not trusted
    (tmp_path / "latest").write_text(ckpt.tag_for(30))
    tag, why = ckpt.find_resume_tag(tmp_path)
    assert tag == ckpt.tag_for(20) and "incomplete" in why and ckpt.tag_for(20) in why
    (tmp_path / "latest").unlink()
    assert ckpt.find_resume_tag(tmp_path)[0] == ckpt.tag_for(20)


def test_resume_choice_passes_a_damaged_checkpoint_to_the_newest_intact_one(tmp_path):
    """A complete checkpoint that later lost or cut a file (a copy, a filesystem fault) would
    crash every restart, and a requeued job would loop on it; resume takes the newest intact
    one, and refuses (naming each) when none is left."""
    for step in (10, 20):
        tag_dir = tmp_path / ckpt.tag_for(step)
        tag_dir.mkdir()
        (tag_dir / "trainer_state.pt").write_bytes(b"s" * 100)
        (tag_dir / "model").mkdir()
        (tag_dir / "model" / "shard0.pt").write_bytes(b"m" * 50)
        ckpt.mark_complete(tmp_path, ckpt.tag_for(step), {"step": step}, keep=5)
    assert ckpt.find_resume_tag(tmp_path) == (ckpt.tag_for(20), f"resuming from {ckpt.tag_for(20)} (latest)")
    (tmp_path / ckpt.tag_for(20) / "trainer_state.pt").write_bytes(b"s" * 99)  # cut short
    tag, why = ckpt.find_resume_tag(tmp_path)
    assert tag == ckpt.tag_for(10), why
    assert "trainer_state.pt is 99 bytes, the save wrote 100" in why and ckpt.tag_for(20) in why
    (tmp_path / ckpt.tag_for(10) / "model" / "shard0.pt").unlink()
    with pytest.raises(ckpt.DamagedCheckpoints, match="model/shard0.pt is missing"):
        ckpt.find_resume_tag(tmp_path)


def _choose_on_every_rank(rank: int, world_size: int, ckpt_dir: str):
    from iddpm_ds.train import resume

    signal.alarm(60)  # a rank left waiting for rank 0's broadcast fails the test, not CI
    try:
        return resume._choose_tag(Path(ckpt_dir))
    except resume.ResumeError as err:
        return f"ResumeError: {err}"


def test_every_rank_gets_rank_0s_choice_and_its_refusal(tmp_path):
    """Rank 0 alone reads the run dir; its refusal (every checkpoint damaged) must reach the
    other ranks too, which would otherwise wait for its broadcast: real ranks over gloo."""
    tag_dir = tmp_path / ckpt.tag_for(10)
    tag_dir.mkdir()
    (tag_dir / "trainer_state.pt").write_bytes(b"s" * 10)
    ckpt.mark_complete(tmp_path, ckpt.tag_for(10), {"step": 10}, keep=5)
    chosen = (ckpt.tag_for(10), f"resuming from {ckpt.tag_for(10)} (latest)")
    assert [tuple(c) for c in run_ranks(_choose_on_every_rank, 2, str(tmp_path))] == [chosen, chosen]
    (tag_dir / "trainer_state.pt").unlink()
    got = run_ranks(_choose_on_every_rank, 2, str(tmp_path))
    assert all(g.startswith("ResumeError: every checkpoint") and "trainer_state.pt is missing" in g
               for g in got), got


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{"train.max_steps": 6, "train.save_interval": 3})
    run_train(1, job, launcher="python")
    state = tmp_path / "run" / "checkpoints" / ckpt.tag_for(6) / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # what a torn copy leaves
    again = run_train(1, job, "train.max_steps=8", launcher="python")
    assert events(again, "resumed")[0]["step"] == 3
    assert "is damaged: trainer_state.pt is 1000 bytes" in events(again, "resume_check")[0]["decision"]
    assert events(again, "train_done")[0]["step"] == 8


def test_mark_complete_prunes_old_and_debris(tmp_path):
    for step in (1, 2, 3):
        _touch_tag(tmp_path, step, True)
    _touch_tag(tmp_path, 4, False)  # debris of a crash before step 5's save
    _touch_tag(tmp_path, 5, False)
    ckpt.mark_complete(tmp_path, ckpt.tag_for(5), {"step": 5}, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == [ckpt.tag_for(3), ckpt.tag_for(5)]
    assert (tmp_path / "latest").read_text() == ckpt.tag_for(5)
