"""Nothing lost on a failing disk: a checkpoint write that fails on a rank of two (a real,
size-limited tmpfs that fills during a save) is agreed by both ranks, ends the run with
exit 5 and one line naming the path and errno, leaves `latest` and no partial directory,
and the same command resumes once there is space; durable atomic writes; a restart that
resume refuses leaves job.yaml alone; Python's `random` reseeded at a new world size; the
console line says what eval_bpd is."""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import psutil
import pytest
import torch

from iddpm_ds.train import checkpoint as ckpt
from iddpm_ds.train.saver import CHECKPOINT_WRITE_FAILED_EXIT
from iddpm_ds.train.states import ProcessRNG, TrainCounters
from train_utils import ROOT, events, run_train, tiny_job, train_cmd

MiB = 2**20


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: float) -> Iterator[Path]:
    """A real size-limited file system at `path` (root and mount(8) needed; else skip)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount): {proc.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:  # a process left behind
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def _resize(path: Path, size_mb: float) -> None:
    subprocess.run(["mount", "-o", f"remount,size={int(size_mb * 1024)}k", str(path)], check=True)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------- atomic writes
def test_atomic_torch_save_on_a_full_disk_names_errno_and_keeps_the_old_file(tmp_path):
    with tmpfs(tmp_path / "disk", 1) as disk:
        target = disk / "state.pt"
        ckpt.atomic_torch_save({"w": torch.ones(4)}, target)
        with pytest.raises(OSError) as info:
            ckpt.atomic_torch_save({"w": torch.zeros(600_000)}, target)  # 2.4 MB into 1 MiB
        assert info.value.errno == 28 and info.value.filename == str(target)
        assert [p.name for p in disk.iterdir()] == ["state.pt"]  # no temp file left
        assert torch.equal(ckpt.load_plain(target)["w"], torch.ones(4))
        with pytest.raises(OSError) as info:
            ckpt.atomic_write_bytes(disk / "latest", b"x" * (2 * MiB))
        assert info.value.errno == 28 and not (disk / "latest").exists()


def test_atomic_writes_fsync_the_file_and_its_directory(tmp_path, monkeypatch):
    """Observed, not mocked: os.fsync still runs; we record which file each call synced.
    (That the data would survive a power cut cannot be shown without cutting power.)"""
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ckpt.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "a.pt")
    assert synced == [str(tmp_path / ".a.pt.tmp0"), str(tmp_path)]
    synced.clear()
    ckpt.atomic_write_bytes(tmp_path / "latest", b"step0000004")
    assert synced == [str(tmp_path / ".latest.tmp0"), str(tmp_path)]


# ------------------------------------------------------------------ RNG at a new world size
def test_python_random_is_reseeded_at_a_new_world_size_and_restored_at_the_same():
    """At another world size the saved streams belong to no rank: Python's `random` must
    then start from the run's seed and step (as torch's does), not go on from whatever
    this process drew or was seeded with at start-up."""
    counters = TrainCounters(step=40)
    rng = ProcessRNG(counters, seed=7)
    saved = []
    for r in range(2):  # two old ranks' states, each far into its own stream
        random.seed(1000 + r)
        torch.manual_seed(1000 + r)
        saved.append(rng.state_dict())
    draws = []
    for noise in (1, 2):  # two processes that start with different Python states
        random.seed(noise)
        rng.load_state_dict(saved[:1] + saved[:1] + saved)  # 4 saved ranks != world size 1
        draws.append((random.random(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    for r in range(2):
        random.seed(1000 + r)
        assert draws[0][0] != random.random()
    counters.step = 44  # another resume step: another stream
    rng.load_state_dict(saved + saved)
    assert random.random() != draws[0][0]
    # the same world size (1 saved rank) continues the saved stream exactly
    random.seed(1000)
    expected = random.random()
    rng.load_state_dict(saved[:1])
    assert random.random() == expected


# ------------------------------------------------------------------- the console line
def test_console_line_says_what_eval_bpd_is(tmp_path):
    from iddpm_ds.train.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, tensorboard=False, total_steps=1100)
    record = {"eval_bpd": 16.078, "eval_bpd_model": 16.2, "eval_steps": 50, "eval_variances": "fixed"}
    line = writer._console(1100, record)
    assert "eval_bpd 16.078" in line
    assert "eval_bpd: NLL upper bound over 50 steps; loose with fixed variances (can exceed raw pixels' 8)" in line
    learned = writer._console(1100, {**record, "eval_bpd": 3.9, "eval_variances": "learned"})
    assert "NLL upper bound over 50 steps" in learned and "loose" not in learned
    assert "bound" not in writer._console(10, {"loss": 0.1})
    writer.close()


# ------------------------------------------------------------- a refused restart, in full
@pytest.mark.slow
def test_refused_restart_leaves_job_yaml_and_eval_line_reads_right(tmp_path, digits_shards):
    job = tiny_job(tmp_path, digits_shards, **{
        "train.max_steps": 2, "train.save_interval": 2, "train.log_interval": 2,
        "train.eval_interval": 2, "train.eval_samples": 4, "train.eval_respacing": "5",
        "model.learn_sigma": False})
    first = run_train(1, job, launcher="python")
    console = [line for line in first.stdout.splitlines() if "eval_bpd " in line]
    assert len(console) == 1 and "NLL upper bound over 5 steps; loose with fixed variances" in console[0]
    run_dir = tmp_path / "run"
    before = (run_dir / "job.yaml").read_bytes()
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    proc = run_train(1, job, "model.num_channels=64", "train.max_steps=4", launcher="python",
                     check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.num_channels: 32 -> 64" in errors[0], proc.stderr[-3000:]
    assert (run_dir / "job.yaml").read_bytes() == before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before


# --------------------------------------------------------- disk full at world size 2
SAVE_EVERY, STEPS = 4, 12
FAIL_BOUND_S = 120  # the failing run, start-up included (16 s measured); the collective timeout is 600 s


@pytest.mark.slow
def test_disk_full_during_a_save_at_world_size_2(tmp_path, digits_shards):
    """Two runs of the same command on a tmpfs whose size is set from the first checkpoint
    (measured): the first fits, the second (step 8) does not."""
    disk = tmp_path / "disk"
    job = tiny_job(tmp_path, digits_shards, **{
        "output.run_dir": str(disk / "run"), "train.max_steps": STEPS,
        "train.save_interval": SAVE_EVERY, "train.log_interval": SAVE_EVERY,
        "output.keep_checkpoints": 3, "distributed": {"collective_timeout_s": 600}})
    ckpt_dir = disk / "run" / "checkpoints"
    with tmpfs(disk, 256):
        # the first checkpoint, with room to spare; then the disk is cut to hold it and
        # half of another
        run_train(2, job, f"train.max_steps={SAVE_EVERY}")
        size = _tree_bytes(ckpt_dir / ckpt.tag_for(SAVE_EVERY))
        _resize(disk, (_used(disk) + size // 2) / MiB)
        code, out = _run_bounded(job, FAIL_BOUND_S)
        assert code == CHECKPOINT_WRITE_FAILED_EXIT, out[-5000:]
        assert "Traceback" not in out, out[-5000:]
        failed_tag = ckpt.tag_for(2 * SAVE_EVERY)
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out[-5000:]
        assert re.search(rf"checkpoint {failed_tag} not written: rank [01]: "
                         rf"{re.escape(str(ckpt_dir / failed_tag))}/\S+: errno 28 ENOSPC "
                         rf"\(No space left on device\)", errors[0]), errors
        assert f"latest still names {ckpt.tag_for(SAVE_EVERY)}" in errors[0]
        # the fault landed in step 8's save, of a run resumed from step 4
        assert events(SimpleNamespace(stdout=out, stderr=""), "resumed")[0]["step"] == SAVE_EVERY
        assert (ckpt_dir / "latest").read_text() == ckpt.tag_for(SAVE_EVERY)
        assert sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) == [ckpt.tag_for(SAVE_EVERY)]
        assert not list(ckpt_dir.rglob(".*.tmp*"))
        _load_all(ckpt_dir / ckpt.tag_for(SAVE_EVERY))
        # space is back: the same command resumes from latest and finishes
        _resize(disk, 256)
        proc = run_train(2, job)
        assert events(proc, "resumed")[0]["step"] == SAVE_EVERY
        assert (ckpt_dir / "latest").read_text() == ckpt.tag_for(STEPS)
        assert ckpt.is_complete(ckpt_dir / failed_tag)
        shutil.rmtree(disk / "run")  # before the unmount


def _run_bounded(job: Path, bound: float) -> tuple[int, str]:
    """The command run_train(2, job) runs, through the deepspeed launcher (it passes the
    ranks' exit status on); a run past `bound` seconds (a rank left
    waiting for another) fails the test, and its whole process tree is killed, so that no
    rank keeps the tmpfs busy."""
    proc = subprocess.Popen(train_cmd(2, "--job", str(job), launcher="deepspeed"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        out, _ = proc.communicate(timeout=bound)
    except subprocess.TimeoutExpired:
        tree = psutil.Process(proc.pid).children(recursive=True)
        for victim in [psutil.Process(proc.pid), *tree]:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        out, _ = proc.communicate()
        psutil.wait_procs(tree, timeout=30)
        pytest.fail(f"the failing run did not end within {bound} s (a rank waited):\n{out[-4000:]}")
    return proc.returncode, out


def _load_all(tag_dir: Path) -> None:
    """Every file of the kept checkpoint loads (ours with weights_only)."""
    assert ckpt.is_complete(tag_dir)
    for path in tag_dir.glob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=not path.name.startswith(("mp_rank", "zero_pp")))
