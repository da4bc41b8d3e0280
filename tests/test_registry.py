"""The registry of checkpointed state and the resume-time spec comparison (unit level; the
registry's save/resume round trips run in test_train.py and test_resume_world_size.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from iddpm_ds.spec.job import JobSpec
from iddpm_ds.testing import tiny_job
from iddpm_ds.train.registry import Policy, StateRegistry
from iddpm_ds.train.resume import ResumeError, check_compatible, spec_diff
from iddpm_ds.train.states import TrainCounters


def _job(tmp_path: Path, **train) -> JobSpec:
    return tiny_job(tmp_path / "run", None, **{f"train.{key}": value for key, value in train.items()})


class _NoState:
    pass


def test_registry_keeps_order_and_checks_protocols():
    registry = StateRegistry()
    counters = TrainCounters()
    registry.register("counters", counters, Policy.REPLICATED)
    registry.register("other", TrainCounters(), Policy.PER_RANK)
    assert [e.name for e in registry] == ["counters", "other"]
    assert registry["counters"] is counters and registry.names(Policy.PER_RANK) == ["other"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("counters", TrainCounters(), Policy.REPLICATED)
    with pytest.raises(ValueError, match="reserved"):
        registry.register("meta", TrainCounters(), Policy.REPLICATED)
    with pytest.raises(TypeError, match="sharded"):  # a plain Stateful cannot be SHARDED
        registry.register("engine", TrainCounters(), Policy.SHARDED)
    with pytest.raises(TypeError, match="replicated"):
        registry.register("x", _NoState(), Policy.REPLICATED)


def test_spec_diff_names_fields_by_dotted_path():
    old = {"train": {"lr": 1e-4, "schedule_sampler": {"name": "uniform"}, "seed": 0}}
    new = {"train": {"lr": 2e-4, "schedule_sampler": {"name": "loss-second-moment"}, "seed": 0,
                     "max_steps": 10}}
    assert spec_diff(old, new) == {
        "train.lr": (1e-4, 2e-4),
        "train.max_steps": ("<absent>", 10),
        "train.schedule_sampler.name": ("uniform", "loss-second-moment"),
    }


def test_resume_logs_changed_fields_with_old_and_new_values(tmp_path, capsys):
    saved = _job(tmp_path, lr=1e-4).model_dump(mode="json")
    check_compatible(_job(tmp_path, lr=2e-4, log_interval=7), saved)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "resume_spec_changed" in line]
    assert lines and lines[0]["fields"] == {
        "train.lr": {"old": 1e-4, "new": 2e-4}, "train.log_interval": {"old": 5, "new": 7}}


def test_resume_refuses_another_model_naming_the_field(tmp_path):
    saved = _job(tmp_path).model_dump(mode="json")
    saved["model"]["num_channels"] = 64
    with pytest.raises(ResumeError, match=r"model\.num_channels: 64 -> 32"):
        check_compatible(_job(tmp_path), saved)
