"""kill -9 soak: training is killed (the launcher and every process under it) at random
points, seven times: during start-up, mid-training (three times, each past a new
checkpoint), during a checkpoint save and during a universal-checkpoint conversion from 2
ranks to 1 and from 1 to 2 (the world size alternates, so most restarts reshape). Each time the same command is restarted. A kill counts only where it
landed, judged from what it left (a partial checkpoint directory, a partial conversion
output, ...); one that missed (the save or conversion had finished, the process had
ended) is tried again, up to TRIES starts. In the end the run completes, every checkpoint
`latest` ever pointed to loads, and no kill lost more than save_interval steps. (A kill
during DeepSpeed's first-use JIT build is in tests/test_no_hangs.py: the training path
builds no op any more unless optimizer offload is on.)"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch

from iddpm_ds.train import checkpoint as ckpt
from iddpm_ds.train.universal import UNIVERSAL
from train_utils import ROOT, tiny_job, train_cmd

SAVE_INTERVAL = 4
MAX_STEPS = 24  # the kills end by step 16 (three train kills, each just past one save)
# (kill point, world size): each point at least once, the conversion in both directions;
# every kill is a start (~2 s of CPU per process before the first step), so no more than
# that: the three train kills are the three checkpoints `latest` names before the last
SCHEDULE = [("train", 2), ("save", 2), ("universal", 1), ("train", 1), ("universal", 2),
            ("train", 2), ("startup", 1)]
TRIES = 4  # starts per scheduled kill at most, until it lands where it says


def _start(job: Path, world: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(train_cmd(world, "--job", str(job), launcher="torchrun"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it at once, as a dead node would: the
    launcher's workers may sit in sessions of their own, so the process tree, not the
    process group, says who belongs to the run."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for victim in [proc, *tree]:
        try:
            victim.send_signal(signal.SIGKILL) if isinstance(victim, subprocess.Popen) \
                else victim.kill()
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _latest_step(ckpt_dir: Path) -> int:
    tag = ckpt.find_resume_tag(ckpt_dir)[0] if ckpt_dir.is_dir() else None
    return ckpt.step_of(tag) if tag else 0


def _saved_world(ckpt_dir: Path) -> int | None:
    tag = ckpt.find_resume_tag(ckpt_dir)[0] if ckpt_dir.is_dir() else None
    return json.loads((ckpt_dir / tag / ckpt.COMPLETE).read_text())["world_size"] if tag else None


def _partial_save(ckpt_dir: Path, since: float) -> bool:
    """A save of this process in progress (an earlier kill's partial directory is older)."""
    return ckpt_dir.is_dir() and any(d.is_dir() and ckpt.TAG_RE.match(d.name) and not ckpt.is_complete(d)
                                     and d.stat().st_mtime >= since for d in ckpt_dir.iterdir())


def _partial_conversion(ckpt_dir: Path, since: float) -> bool:
    """A conversion of this process in progress: its output is renamed from .universal.tmp
    to universal/ only once complete."""
    return ckpt_dir.is_dir() and any(tmp.is_dir() and tmp.stat().st_mtime >= since
                                     for tmp in ckpt_dir.glob(f"*/.{UNIVERSAL}.tmp"))


def _wait_for(proc: subprocess.Popen, predicate, timeout: float = 120.0) -> bool:
    """Poll fast (a save or a conversion of the tiny model lasts well under a second) until
    the predicate holds; False when the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the kill point was not reached")


def _kill_point(proc: subprocess.Popen, point: str, run_dir: Path, rng: random.Random) -> bool:
    """Kill at `point`; True only if the kill landed there, judged from what the kill left
    (the processes are dead, so the files show the moment of the kill): a process that was
    still alive, and for a save a partial checkpoint directory, for a conversion a partial
    conversion output, for start-up no step trained, for training a step past the newest
    checkpoint of this process."""
    ckpt_dir = run_dir / "checkpoints"
    since = time.time() - 1.0  # coarse file-system timestamps
    trained, saved = _logged_step(run_dir), _latest_step(ckpt_dir)
    reached = True
    if point == "startup":
        time.sleep(rng.uniform(0.5, 4.0))  # imports, process groups, engine, resume
    elif point == "train":  # past the next complete checkpoint, then a few steps on
        reached = _wait_for(proc, lambda: _latest_step(ckpt_dir) > saved)
        goal = _logged_step(run_dir) + rng.randint(0, 3)
        reached = reached and _wait_for(proc, lambda: _logged_step(run_dir) >= goal)
    elif point == "save":
        reached = _wait_for(proc, lambda: _partial_save(ckpt_dir, since))
    elif point == "universal":
        reached = _wait_for(proc, lambda: _partial_conversion(ckpt_dir, since))
    _kill(proc)
    if not reached or proc.returncode != -signal.SIGKILL:  # it had ended by itself
        return False
    return {"startup": lambda: _logged_step(run_dir) == trained and _latest_step(ckpt_dir) == saved,
            "train": lambda: _latest_step(ckpt_dir) > saved,
            "save": lambda: _partial_save(ckpt_dir, since),
            "universal": lambda: _partial_conversion(ckpt_dir, since)}[point]()


def _check_latest(ckpt_dir: Path) -> str | None:
    """`latest` names a complete checkpoint whose files load with weights_only and hold
    finite weights."""
    tag = ckpt.find_resume_tag(ckpt_dir)[0] if ckpt_dir.is_dir() else None
    if tag is None:
        return None
    tag_dir = ckpt_dir / tag
    assert ckpt.is_complete(tag_dir)
    step = ckpt.step_of(tag)
    weights = torch.load(tag_dir / ckpt.export_name_model(step), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    ours = [p for p in tag_dir.glob("*.pt")  # DeepSpeed's own engine files are DeepSpeed's to load
            if not p.name.startswith(("mp_rank", "zero_pp", "bf16_zero", "expp")) and "optim_states" not in p.name]
    assert len(ours) >= 3  # exports, trainer state, per-rank state
    for path in ours:
        torch.load(path, map_location="cpu", weights_only=True)
    return tag


@pytest.mark.slow
def test_kill_9_soak(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{
        "train.save_interval": SAVE_INTERVAL, "train.max_steps": MAX_STEPS, "train.log_interval": 1,
        "output.keep_checkpoints": 2, "deepspeed.zero_stage": 2})
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    pointed: dict[str, int] = {}
    kills = []
    for point, world in SCHEDULE:
        if point == "universal":  # the schedule alternates worlds so that this restart reshapes
            assert _saved_world(run_dir / "checkpoints") not in (None, world), kills
        for _ in range(TRIES):  # a kill that missed its point is tried again
            kills.append(_kill_and_check(job, run_dir, point, world, rng))
            if kills[-1][-1]:
                break
            if point == "universal":  # it converted before the kill: convert again next start
                for done in (run_dir / "checkpoints").glob(f"*/{UNIVERSAL}"):
                    shutil.rmtree(done)
        else:
            pytest.fail(f"the {point} kill missed its point {TRIES} times: {kills}")
        if latest := _check_latest(run_dir / "checkpoints"):
            pointed[latest] = ckpt.step_of(latest)
    landed = Counter(point for point, *_, hit in kills if hit)
    assert landed == {"startup": 1, "train": 3, "save": 1, "universal": 2}, kills

    final = _start(job, 2)
    assert final.wait(timeout=600) == 0, f"the run did not complete after {kills}"
    assert _logged_step(run_dir) == MAX_STEPS
    assert _check_latest(run_dir / "checkpoints") == ckpt.tag_for(MAX_STEPS)
    pointed[ckpt.tag_for(MAX_STEPS)] = MAX_STEPS
    # pruning keeps 2, so the older checkpoints that latest named were checked when they were
    # named; those still on disk load again now
    for tag in pointed:
        if (run_dir / "checkpoints" / tag).is_dir():
            assert ckpt.is_complete(run_dir / "checkpoints" / tag)
    assert len(pointed) >= 4, f"too few checkpoints were ever complete: {kills}"


def _kill_and_check(job: Path, run_dir: Path, point: str, world: int, rng: random.Random) -> tuple:
    """One start and kill; latest still loads, never moved back, and lost at most
    save_interval steps. Returns (point, world, latest before, trained, saved, landed)."""
    before = _latest_step(run_dir / "checkpoints")
    landed = _kill_point(_start(job, world), point, run_dir, rng)
    trained = _logged_step(run_dir)
    latest = _check_latest(run_dir / "checkpoints")
    saved = ckpt.step_of(latest) if latest else 0
    kill = (point, world, before, trained, saved, landed)
    assert saved >= before, f"a kill moved latest backwards: {kill}"
    assert trained - saved <= SAVE_INTERVAL, f"a kill lost more than save_interval steps: {kill}"
    return kill
