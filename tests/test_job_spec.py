"""Job spec validation, batch triangle and DeepSpeed config rendering (fast, no engine)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from iddpm_ds.spec.errors import describe
from iddpm_ds.spec.job import JobSpec, load_job, parse_overrides
from iddpm_ds.testing import tiny_job_dict
from iddpm_ds.train.ds_config import ConfigError, render_ds_config, resolve_batch

ROOT = Path(__file__).resolve().parents[1]


def job_dict(tmp_path: Path, **sections) -> dict:
    """iddpm_ds.testing's tiny job (shards that do not exist: nothing here opens them),
    `sections` merged field by field: job_dict(tmp_path, train={"batch_size": 12})."""
    return tiny_job_dict(tmp_path / "run", None, **{f"{section}.{key}": value
                                                     for section, fields in sections.items()
                                                     for key, value in fields.items()})


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_triangle_per_rank_policy(tmp_path, world):
    job = JobSpec.model_validate(job_dict(tmp_path, train={"batch_size": 12, "microbatch": 4}))
    sizes = resolve_batch(job.train, world)
    assert (sizes.per_rank, sizes.micro, sizes.accumulation) == (12, 4, 3)
    assert sizes.global_batch == 12 * world == sizes.micro * sizes.accumulation * world
    config = render_ds_config(job, world, has_gpu=False)
    assert config["train_batch_size"] == sizes.global_batch
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3


@pytest.mark.parametrize("world,micro,per_rank,accum", [(1, 4, 12, 3), (2, 2, 6, 3), (3, 4, 4, 1)])
def test_batch_triangle_global_policy(tmp_path, world, micro, per_rank, accum):
    train = {"batch_size": None, "global_batch_size": 12, "microbatch": micro}
    job = JobSpec.model_validate(job_dict(tmp_path, train=train))
    sizes = resolve_batch(job.train, world)
    assert (sizes.global_batch, sizes.per_rank, sizes.micro, sizes.accumulation) == (12, per_rank, micro, accum)


def test_global_batch_not_divisible_by_world(tmp_path):
    job = JobSpec.model_validate(job_dict(tmp_path, train={"batch_size": None, "global_batch_size": 10}))
    with pytest.raises(ConfigError, match="global_batch_size=10 is not divisible by the world size 3"):
        resolve_batch(job.train, 3)


def test_exactly_one_batch_knob(tmp_path):
    with pytest.raises(ValidationError, match="exactly one of train.batch_size"):
        JobSpec.model_validate(job_dict(tmp_path, train={"global_batch_size": 16}))


def test_learn_sigma_is_one_knob(tmp_path):
    d = job_dict(tmp_path)
    job = JobSpec.model_validate(d)
    assert job.model.learn_sigma and job.diffusion.learn_sigma
    d["diffusion"]["learn_sigma"] = False
    with pytest.raises(ValidationError, match="contradicts"):
        JobSpec.model_validate(d)


def test_overrides_cannot_touch_spec_owned_keys(tmp_path):
    # rejected when the spec is validated, before any config is rendered
    d = job_dict(tmp_path, deepspeed={"overrides": {"optimizer": {"type": "SGD"}}})
    with pytest.raises(ValidationError, match="set train.lr / train.weight_decay instead"):
        JobSpec.model_validate(d)
    d = job_dict(tmp_path, deepspeed={"overrides": {"zero_optimization": {"stage": 3}}})
    with pytest.raises(ValidationError, match="deepspeed.zero_stage"):
        JobSpec.model_validate(d)


def test_templates_cannot_touch_spec_owned_keys(tmp_path):
    template = tmp_path / "mine.json"
    template.write_text('{"gradient_clipping": 2.0}')
    job = JobSpec.model_validate(job_dict(tmp_path, deepspeed={"template": str(template)}))
    with pytest.raises(ConfigError, match="set train.grad_clip instead"):
        render_ds_config(job, 1, has_gpu=False)


def test_fp16_refused_without_gpu(tmp_path):
    job = JobSpec.model_validate({**job_dict(tmp_path), "precision": "fp16"})
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        render_ds_config(job, 1, has_gpu=False)
    assert render_ds_config(job, 1, has_gpu=True)["fp16"]["enabled"] is True


def test_templates_and_overrides_merge(tmp_path):
    d = job_dict(tmp_path, deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_param": True,
                                       "overrides": {"zero_optimization": {"reduce_bucket_size": 123}}},
                 train={"lr": 3e-4, "weight_decay": 0.01, "grad_clip": 1.0})
    config = render_ds_config(JobSpec.model_validate({**d, "precision": "bf16"}), 2, has_gpu=False)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 123
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["pin_memory"] is False
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"]
    assert config["optimizer"]["params"]["lr"] == 3e-4 and config["gradient_clipping"] == 1.0


def test_set_overrides_and_yaml_roundtrip(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(tmp_path)))
    job = load_job(path, ["train.lr=2e-4", "model.dropout=0.1", "train.ema_rate=0.9999,0.99"])
    assert job.train.lr == 2e-4 and job.model.dropout == 0.1 and job.train.ema_rate == (0.9999, 0.99)
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}
    from iddpm_ds.spec.job import dump_job

    again = JobSpec.model_validate(yaml.safe_load(dump_job(job)))
    assert again == job


def test_distributed_timeout_default_and_override(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(tmp_path)))
    assert load_job(path).distributed.collective_timeout_s == 600
    assert load_job(path, ["distributed.collective_timeout_s=20"]).distributed.collective_timeout_s == 20
    with pytest.raises(ValidationError) as err:
        JobSpec.model_validate(job_dict(tmp_path, distributed={"timeout": 5}))
    assert describe(err.value).startswith("distributed.timeout: unknown key"), describe(err.value)


def test_json_schema_exports(tmp_path):
    out = tmp_path / "schema.json"
    subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--schema", str(out)], check=True)
    text = out.read_text()
    assert '"global_batch_size"' in text and "stays fixed when the number of GPUs changes" in text


MALFORMED = {
    "unknown key": ({"train": {"batch_size": 8, "learning_rate": 1}}, "train.learning_rate"),
    "wrong type": ({"model": {"num_channels": "many"}}, "model.num_channels"),
    "bad value": ({"train": {"batch_size": 8, "lr": -1}}, "train.lr"),
    "impossible combination": ({"deepspeed": {"zero_stage": 1, "offload_param": True}}, "offload_param"),
    "bad attention": ({"model": {"attention_resolutions": "12"}}, "model.attention_resolutions: 12"),
    "bad respacing": ({"diffusion": {"timestep_respacing": "500"}}, "500"),
    "zero timeout": ({"distributed": {"collective_timeout_s": 0}}, "distributed.collective_timeout_s"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_job_exits_2_with_one_message(tmp_path, case):
    change, needle = MALFORMED[case]
    d = job_dict(tmp_path)
    for section, values in change.items():
        d[section] = {**d.get(section, {}), **values}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--job", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_data_exits_2_and_writes_nothing(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict(tmp_path)))
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--job", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing-000000.tar" in errors[0], proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "launch" / "jobs").glob("*.yaml")))
def test_bundled_jobs_validate(name):
    """The demo jobs (the paper's are in test_paper_jobs.py) load and pass every check."""
    job = load_job(ROOT / "launch" / "jobs" / name)
    assert job.model.image_size == 32
