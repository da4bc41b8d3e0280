"""Helpers for tests that run the real training service in real processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from iddpm_ds.testing import tiny_job_dict
from mp_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


def tiny_job(tmp_path: Path, shards_dir: Path, **overrides) -> Path:
    """iddpm_ds.testing's tiny job as tmp_path/job.yaml, run dir tmp_path/run (what the
    launchers read); overrides: {"train.lr": 1e-3, "precision": "bf16", ...}."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job_dict(tmp_path / "run", shards_dir, **overrides)))
    return path


# torchrun is the default: its first step comes ~4 s sooner than the deepspeed launcher's
# (which imports DeepSpeed in its runner and again in launch.py, and polls its children
# once a second). A test that reads a rank's exit status or the run's one error line
# through the launcher names launcher="deepspeed": it passes the rank's status on, where
# torchrun exits 1 for any failed worker and prints its own report. The deepspeed launcher
# itself is covered by those tests, test_launchers.py and the multi-host tests.
def train_cmd(nprocs: int, *args: str, launcher: str = "torchrun") -> list[str]:
    if nprocs == 1 and launcher == "python":
        return [sys.executable, str(TRAIN), *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                "--master_port", str(free_port()), str(TRAIN), *args]
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nprocs), "--no_local_rank",
            "--master_port", str(free_port()), str(TRAIN), *args]


def run_train(nprocs: int, job: Path, *sets: str, launcher: str = "torchrun", timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    args = ["--job", str(job)] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(train_cmd(nprocs, *args, launcher=launcher), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"loss"' in line]


def events(proc: subprocess.CompletedProcess, name: str) -> list[dict]:
    out = []
    for line in (proc.stderr + proc.stdout).splitlines():
        start = line.find('{"event"')
        if start >= 0 and f'"event": "{name}"' in line:
            out.append(json.loads(line[start:]))
    return out


# One 2-rank run per (ZeRO stage, precision), trained once per test session and shared by
# the files that used to train the same grid each on their own (test_train: the loss falls,
# a resume is bitwise; test_resume_world_size: the source of the 1- and 3-rank resumes).
# Readers never write into it: a test that resumes copies the run dir first.
DEMO_STEPS, DEMO_SAVED = 30, 25  # checkpoints at DEMO_SAVED (save_interval) and DEMO_STEPS
DEMO_RUN = {"train.max_steps": DEMO_STEPS, "train.log_interval": 5,
            "train.save_interval": DEMO_SAVED}


def demo_job(tmp_path: Path, shards_dir: Path, stage: int, precision: str) -> Path:
    """The shared run's job: tiny_job, DEMO_RUN's steps and saves, the given stage/precision."""
    return tiny_job(tmp_path, shards_dir, **DEMO_RUN, **{"precision": precision,
                                                         "deepspeed.zero_stage": stage})


class DemoRuns:
    """Trains a (stage, precision) run on first request; later requests get the same one."""

    def __init__(self, base: Path, shards_dir: Path) -> None:
        self.base, self.shards_dir = base, shards_dir
        self._done: dict[tuple[int, str], tuple[Path, subprocess.CompletedProcess]] = {}

    def get(self, stage: int, precision: str) -> tuple[Path, subprocess.CompletedProcess]:
        """(run dir, the launcher's completed process) of the shared 2-rank run."""
        key = (stage, precision)
        if key not in self._done:
            where = self.base / f"zero{stage}_{precision}"
            proc = run_train(2, demo_job(where, self.shards_dir, stage, precision))
            self._done[key] = (where / "run", proc)
        return self._done[key]

    def stopped_at_saved(self, stage: int, precision: str, dest: Path) -> Path:
        """A copy of the shared run dir as a run stopped after DEMO_SAVED steps leaves it:
        the later checkpoint and the metrics gone, `latest` on DEMO_SAVED, job.yaml pointing
        at the copy. Returns the copy's job.yaml (the command that resumes it)."""
        shutil.copytree(self.get(stage, precision)[0], dest)
        for late in (dest / "checkpoints").glob("step*"):
            if int(late.name[4:]) > DEMO_SAVED:
                shutil.rmtree(late)
        (dest / "checkpoints" / "latest").write_text(f"step{DEMO_SAVED:07d}")
        (dest / "metrics.jsonl").unlink()
        spec = yaml.safe_load((dest / "job.yaml").read_text())
        spec["output"]["run_dir"] = str(dest)
        (dest / "job.yaml").write_text(yaml.safe_dump(spec))
        return dest / "job.yaml"
