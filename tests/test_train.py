"""The training service end to end, in real processes (torchrun, gloo, 2 ranks)."""
from __future__ import annotations

import pytest
import torch

from iddpm_ds.spec.job import load_job
from iddpm_ds.train.flops import train_flops_per_image
from train_utils import DEMO_SAVED, DEMO_STEPS, events, metrics, run_train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loss_falls_on_demo_data(demo_runs, stage, precision):
    run_dir, proc = demo_runs.get(stage, precision)  # 2 ranks, DEMO_STEPS steps, shared
    logs = metrics(run_dir)
    assert [r["step"] for r in logs] == [5, 10, 15, 20, 25, 30]
    first, last = logs[0], logs[-1]
    assert last["mse"] < 0.6 * first["mse"], (first, last)
    assert last["loss"] < first["loss"]
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in logs)
    assert len(logs[-1]["memory_mb_per_rank"]) == 2
    # utilisation at every log: the job's FLOPs per image, the rate they make at the logged
    # img/s over 2 ranks, no MFU on CPU (no data-sheet peak), max RSS named as the memory
    flops = train_flops_per_image(load_job(run_dir / "job.yaml"))
    for r in logs:
        assert r["flops_per_image"] == flops and r["mfu"] is None and r["memory_kind"] == "cpu_max_rss"
        assert r["tflops_per_s_per_rank"] == pytest.approx(flops * r["img_per_s"] / 2 / 1e12)
        assert all(100 < mb < 64_000 for mb in r["memory_mb_per_rank"]), r["memory_mb_per_rank"]
    assert events(proc, "train_done")[0]["step"] == DEMO_STEPS
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step0000030"
    exported = torch.load(ckpt / "step0000030" / "ema_0.9_000030.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in exported.values())


def _state(run_dir, step):
    tag = run_dir / "checkpoints" / f"step{step:07d}"
    load = lambda name: torch.load(tag / name, weights_only=True)  # noqa: E731
    state = {"model": load(f"model{step:06d}.pt"), "ema": load(f"ema_0.9_{step:06d}.pt"),
             "sampler": load("trainer_state.pt")["timestep_sampler"]}
    # DeepSpeed's own optimizer files (pickled by DeepSpeed; loaded the way it does)
    optim = sorted(tag.glob("*optim_states.pt"))
    state["optim"] = [torch.load(p, weights_only=False, map_location="cpu")["optimizer_state_dict"]
                      for p in optim]
    state["rank_files"] = [torch.load(p, weights_only=True) for p in sorted(tag.glob("rank*.pt"))]
    for rank_file in state["rank_files"]:
        # Python's own `random` feeds nothing in training; library code (multiprocessing)
        # draws from it at process start, so only its presence is checked
        assert "python" in rank_file["rng"]
        del rank_file["rng"]["python"]
    return state


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__"):  # DeepSpeed objects inside its optimizer state (loss scaler)
        _assert_same(vars(a), vars(b), path)
    else:
        assert a == b, path


@pytest.mark.parametrize("stage,precision", [(2, "bf16"), (3, "fp32")])
def test_resume_continues_with_identical_state(tmp_path, demo_runs, stage, precision):
    """DEMO_STEPS straight steps (the shared run) == DEMO_SAVED steps, stop, restart the same
    command to DEMO_STEPS (bitwise). The stopped run is the shared run's dir as it stood at
    its DEMO_SAVED checkpoint (a copy): nothing a restart reads is written after it."""
    straight, _ = demo_runs.get(stage, precision)
    split = demo_runs.stopped_at_saved(stage, precision, tmp_path / "b")
    proc = run_train(2, split)  # the same command again: resumes by itself
    resumed = events(proc, "resumed")
    assert resumed and resumed[0]["step"] == DEMO_SAVED and resumed[0]["tag"] == f"step{DEMO_SAVED:07d}"
    a, b = _state(straight, DEMO_STEPS), _state(tmp_path / "b", DEMO_STEPS)
    _assert_same(a, b)
    # and training did move the weights between the two checkpoints
    saved = _state(straight, DEMO_SAVED)
    assert not torch.equal(next(iter(saved["model"].values())), next(iter(a["model"].values())))
