"""Malformed job files: each one exits 2 with ONE `error:` line that names the field (or the
file, line and column), prints no traceback and writes nothing.

The table runs in-process through launch/train.py's main() (with and without --check); a
few cases run as real `python launch/train.py` processes to prove the exit status. The
last tests show that the spec holds every constraint the UNet and the diffusion enforce:
a spec that validates always builds, and one that does not names a field.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from pydantic import ValidationError

from iddpm_ds.diffusion import build_diffusion
from iddpm_ds.models import build_model
from iddpm_ds.models.nn import GROUPS
from iddpm_ds.spec.diffusion import DiffusionSpec
from iddpm_ds.spec.errors import error_field
from iddpm_ds.spec.model import NORM_GROUPS, ModelSpec
from iddpm_ds.testing import tiny_job_dict
from iddpm_ds_launch.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
DROP = object()  # marks a key to remove from the base job


def base_job(shards: Path, run_dir: Path) -> dict[str, Any]:
    """A valid job (real shards, so a --check that opens the data still passes them)."""
    return tiny_job_dict(run_dir, shards, **{"data.num_workers": 0, "data.eval_shards": None,
                                             "train.max_steps": 2})


@dataclass(frozen=True)
class Case:
    """One malformed job: `change` edits the base job ({"section.key": value} or
    {"section": value}), or `text` replaces the file; `needle` must be in the error line."""

    needle: str
    change: dict[str, Any] = field(default_factory=dict)
    text: Optional[str] = None
    sets: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    launch_time: bool = False  # a fact of the launch (world size): only --check can show it


CASES: dict[str, Case] = {
    # --- the file itself
    "missing file": Case("does not exist", text=None, args=("--job", "{tmp}/nope.yaml")),
    "directory": Case("not a file", args=("--job", "{tmp}")),
    "empty file": Case("bad.yaml: the job file is empty", text=""),
    "only comments": Case("bad.yaml: the job file is empty", text="# nothing here\n\n"),
    "a list": Case("mapping of sections", text="- model\n- train\n"),
    "a scalar": Case("bad.yaml: a job file is a mapping of sections (model:, train:, ...), got a str", text="just words\n"),
    "yaml bad indent": Case("bad.yaml:3:2: invalid YAML", text="train:\n  batch_size: 8\n lr: 1\n"),
    "yaml tab": Case("bad.yaml:2:1: invalid YAML", text="train:\n\tbatch_size: 8\n"),
    "yaml unclosed quote": Case("bad.yaml:3:1: invalid YAML: found unexpected end of stream "
                                "(while scanning a quoted scalar at line 2, column 12)",
                                text='output:\n  run_dir: "runs/x\n'),
    "yaml unclosed bracket": Case("bad.yaml:2:6: invalid YAML: expected ',' or '}', but got ':' "
                                  "(while parsing a flow mapping at line 1, column 8)",
                                  text="model: {image_size: 32\ntrain: {}\n"),
    "yaml duplicate key": Case("bad.yaml:4:1: invalid YAML: duplicate key 'train'",
                               text="train: {batch_size: 8}\ndata: {}\noutput: {run_dir: r}\n"
                                    "train: {lr: 1}\n"),
    "yaml python tag": Case("bad.yaml:1:8: invalid YAML: could not determine a constructor", text="train: !!python/object:os.system {}\n"),
    # --- sections
    "unknown section": Case("traning: unknown key; did you mean 'train'?",
                            change={"traning": {"lr": 1}}),
    "missing section": Case("output: is required", change={"output": DROP}),
    "section not a mapping": Case("model: must be a mapping of fields (got 5)", change={"model": 5}),
    "bad precision": Case("precision: Input should be", change={"precision": "fp8"}),
    # --- model
    "num_channels 48": Case("model.num_channels: 48 is not a multiple of 32",
                            change={"model.num_channels": 48}),
    "num_channels 48 with mult 2": Case("model.num_channels: 48",
                                        change={"model.num_channels": 48, "model.channel_mult": [2, 2]}),
    "num_channels text": Case("model.num_channels: Input should be a valid integer",
                              change={"model.num_channels": "many"}),
    "num_channels typo": Case("model.num_chanels: unknown key; did you mean 'num_channels'",
                              change={"model.num_chanels": 64}),
    "num_heads": Case("model.num_heads: 3 heads do not divide", change={"model.num_heads": 3}),
    "num_heads_upsample": Case("model.num_heads_upsample: 5 heads",
                               change={"model.num_heads": 1, "model.num_heads_upsample": 5}),
    "num_heads_upsample zero": Case("model.num_heads_upsample: must be -1",
                                    change={"model.num_heads_upsample": 0}),
    "attention unreachable": Case("model.attention_resolutions: 4 px is not a resolution",
                                  change={"model.attention_resolutions": "4"}),
    "attention not ints": Case("model.attention_resolutions: expected comma-separated integers",
                               change={"model.attention_resolutions": "a,b"}),
    "image_size without default mult": Case("model.channel_mult: image_size=48 has no default",
                                            change={"model.image_size": 48, "model.channel_mult": DROP}),
    "image_size too small for levels": Case("model.image_size: 12 is not divisible by 2**3",
                                            change={"model.image_size": 12,
                                                    "model.channel_mult": [1, 1, 2, 2],
                                                    "model.attention_resolutions": ""}),
    "channel_mult empty": Case("model.channel_mult: needs one or more", change={"model.channel_mult": []}),
    "channel_mult zero": Case("model.channel_mult: needs one or more positive",
                              change={"model.channel_mult": [1, 0]}),
    "dropout 1": Case("model.dropout: Input should be less than 1", change={"model.dropout": 1.0}),
    "super-resolution not smaller": Case("model.small_size: 16 must be below image_size=16",
                                         change={"model.small_size": 16}),
    "misplaced key": Case("model.diffusion_steps: unknown key; it belongs in diffusion.diffusion_steps",
                          change={"model.diffusion_steps": 50}),
    # --- diffusion
    "learn_sigma sometimes": Case("diffusion.learn_sigma: Input should be a valid boolean",
                                  change={"model.learn_sigma": DROP, "diffusion.learn_sigma": "sometimes"}),
    "learn_sigma sometimes both": Case("diffusion.learn_sigma: Input should be a valid boolean",
                                       change={"diffusion.learn_sigma": "sometimes"}),
    "learn_sigma contradiction": Case("diffusion.learn_sigma: False contradicts model.learn_sigma=True",
                                      change={"diffusion.learn_sigma": False}),
    "respacing too many": Case("diffusion.timestep_respacing: cannot take 500 steps",
                               change={"diffusion.timestep_respacing": "500"}),
    "respacing unparsable": Case("diffusion.timestep_respacing: bad DDIM respacing 'ddimx'",
                                 change={"diffusion.timestep_respacing": "ddimx"}),
    "respacing zero": Case("diffusion.timestep_respacing: timestep respacing '0' keeps no step",
                           change={"diffusion.timestep_respacing": 0}),
    "linear too few steps": Case("diffusion.diffusion_steps: 10 steps with noise_schedule: linear",
                                 change={"diffusion.diffusion_steps": 10,
                                         "diffusion.noise_schedule": "linear"}),
    "unknown schedule": Case("diffusion.noise_schedule: Input should be 'linear' or 'cosine'",
                             change={"diffusion.noise_schedule": "quadratic"}),
    "zero steps": Case("diffusion.diffusion_steps: Input should be greater than or equal to 1",
                       change={"diffusion.diffusion_steps": 0}),
    # --- train
    "batchsize typo": Case("train.batchsize: unknown key; did you mean 'batch_size'",
                           change={"train.batchsize": 8, "train.batch_size": DROP}),
    "both batch sizes": Case("train.batch_size: set exactly one of", change={"train.global_batch_size": 16}),
    "no batch size": Case("train.batch_size: set exactly one of", change={"train.batch_size": DROP}),
    "batch_size zero": Case("train.batch_size: Input should be greater than or equal to 1",
                            change={"train.batch_size": 0}),
    "microbatch not dividing": Case("train.microbatch: 3 does not divide train.batch_size=8",
                                    change={"train.microbatch": 3}),
    "microbatch not dividing global": Case("train.microbatch: 5 does not divide train.global_batch_size=12",
                                           change={"train.batch_size": DROP, "train.global_batch_size": 12,
                                                   "train.microbatch": 5}),
    "microbatch zero": Case("train.microbatch: must be -1 (off) or a positive", change={"train.microbatch": 0}),
    "ema rate 1.5": Case("train.ema_rate: values must lie in (0, 1)", change={"train.ema_rate": 1.5}),
    "ema rate text": Case("train.ema_rate: expected comma-separated rates", change={"train.ema_rate": "fast"}),
    "ema rate twice": Case("train.ema_rate: has duplicates", change={"train.ema_rate": "0.99,0.99"}),
    "lr negative": Case("train.lr: Input should be greater than 0 (got -1)", change={"train.lr": -1}),
    "lr infinite": Case("train.lr: Input should be a finite number", change={"train.lr": float("inf")}),
    "log_interval zero": Case("train.log_interval: Input should be greater than or equal to 1",
                              change={"train.log_interval": 0}),
    "save_interval negative": Case("train.save_interval:", change={"train.save_interval": -5}),
    "save_interval_minutes zero": Case("train.save_interval_minutes: Input should be greater than 0",
                                       change={"train.save_interval_minutes": 0}),
    "warmup past anneal": Case("train.warmup_steps: 50 reaches train.lr_anneal_steps=40",
                               change={"train.warmup_steps": 50, "train.lr_anneal_steps": 40,
                                       "train.max_steps": DROP}),
    "max_steps past anneal": Case("train.max_steps: 100 goes past train.lr_anneal_steps=40",
                                  change={"train.lr_anneal_steps": 40, "train.max_steps": 100}),
    "sample respacing": Case("train.sample_respacing: 'ddim70'", change={"train.sample_respacing": "ddim70"}),
    "eval respacing": Case("train.eval_respacing: '500'", change={"train.eval_respacing": "500"}),
    "eval without shards": Case("train.eval_interval: needs data.eval_shards",
                                change={"train.eval_interval": 10}),
    "unknown sampler": Case("train.schedule_sampler.name: Input should be 'uniform'",
                            change={"train.schedule_sampler": "importance"}),
    "sampler option": Case("train.schedule_sampler.uniform_prob: Input should be less than or equal to 1",
                           change={"train.schedule_sampler": {"name": "loss-second-moment",
                                                              "uniform_prob": 2}}),
    "seed negative": Case("train.seed: Input should be greater than or equal to 0", change={"train.seed": -1}),
    # --- data
    "shards a number": Case("data.shards: a shard source must be", change={"data.shards": 5}),
    "shards empty": Case("data.shards: a shard source must be", change={"data.shards": ""}),
    "shards empty list": Case("data.shards: a shard source must be", change={"data.shards": []}),
    "shards pipe": Case("data.shards: shard url 'pipe:cat x.tar' runs a shell command",
                        change={"data.shards": "pipe:cat x.tar"}),
    "num_workers negative": Case("data.num_workers:", change={"data.num_workers": -1}),
    # --- deepspeed
    "zero stage 4": Case("deepspeed.zero_stage: Input should be 0, 1, 2 or 3",
                         change={"deepspeed": {"zero_stage": 4}}),
    "offload_param stage 1": Case("deepspeed.offload_param: needs deepspeed.zero_stage: 3",
                                  change={"deepspeed": {"zero_stage": 1, "offload_param": True}}),
    "offload_optimizer stage 0": Case("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1",
                                      change={"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}),
    "override owned key": Case("deepspeed.overrides.optimizer: is owned by the job spec: set train.lr",
                               change={"deepspeed": {"overrides": {"optimizer": {"type": "SGD"}}}}),
    "override owned nested": Case("deepspeed.overrides.zero_optimization.stage: is owned",
                                  change={"deepspeed": {"overrides": {"zero_optimization": {"stage": 3}}}}),
    # --- output
    "run_dir empty": Case("output.run_dir: is empty", change={"output.run_dir": ""}),
    "keep_checkpoints zero": Case("output.keep_checkpoints: Input should be greater than or equal to 1",
                                  change={"output.keep_checkpoints": 0}),
    # --- --set overrides
    "set bad value": Case("train.lr: Input should be a valid number", sets=("train.lr=fast",)),
    "set typo": Case("train.batchsize: unknown key; did you mean 'batch_size'", sets=("train.batchsize=4",)),
    "set no equals": Case("--set expects key.path=value, got 'train.lr'", sets=("train.lr",)),
    "set empty part": Case("--set 'train..lr=1': the key path 'train..lr' has an empty part",
                           sets=("train..lr=1",)),
    "set bad yaml": Case("--set 'model.attention_resolutions=[8': the value is not valid YAML",
                         sets=("model.attention_resolutions=[8",)),
    "set section scalar": Case("train: must be a mapping of fields (got 5)", sets=("train=5",)),
    "set conflicting": Case("--set 'train.lr.x=1' conflicts with another --set",
                            sets=("train.lr=1", "train.lr.x=1")),
    "set unknown section": Case("modle: unknown key; did you mean 'model'?", sets=("modle.dropout=0.1",)),
    # --- facts of the launch (world size, files named by the spec), checked before any write
    "global batch vs world": Case("train.global_batch_size=12 is not divisible by the world size 5",
                                  change={"train.batch_size": DROP, "train.global_batch_size": 12},
                                  args=("--world-size", "5"), launch_time=True),
    "world size zero": Case("--world-size must be >= 1, got 0", args=("--world-size", "0"),
                            launch_time=True),
    "template missing": Case("deepspeed.template 'nope.json' not found",
                             change={"deepspeed": {"template": "nope.json"}}, launch_time=True),
    "template not json": Case("deepspeed.template '{tmp}/t.json': {tmp}/t.json is not readable JSON",
                              change={"deepspeed": {"template": "{tmp}/t.json"}}, launch_time=True),
}


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def write_case(case: Case, tmp: Path, shards: Path) -> tuple[list[str], set[str]]:
    """Write the case's files into tmp; return (argv, names of the files written)."""
    path = tmp / "bad.yaml"
    if case.text is not None:
        path.write_text(case.text)
    elif "--job" not in case.args:
        job = base_job(shards, tmp / "run")
        for dotted, value in _fill(case.change, tmp).items():
            section, _, key = dotted.partition(".")
            target = job if not key else job.setdefault(section, {})
            name = key or section
            if value is DROP:
                target.pop(name, None)
            else:
                target[name] = value
        path.write_text(yaml.safe_dump(job, sort_keys=False))
    (tmp / "t.json").write_text("{not json")
    args = [_fill(a, tmp) for a in case.args]
    argv = ([] if "--job" in args else ["--job", str(path)]) + args
    argv += [a for s in case.sets for a in ("--set", s)]
    return argv, {p.name for p in tmp.iterdir()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_rejected(code: int, stderr: str, case: Case, tmp: Path, written: set[str]) -> None:
    assert code == 2, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert _fill(case.needle, tmp) in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert {p.name for p in tmp.iterdir()} == written  # nothing written: no run dir, no file


def test_the_table_is_big_enough():
    assert len(CASES) >= 40


# every case with --check; without it too, except launch-time facts (in-process, a job
# that passes the spec would start training in the test process)
IN_PROCESS = [pytest.param(name, check, id=f"{name}-{'check' if check else 'train'}")
              for name in sorted(CASES) for check in (True, False)
              if check or not CASES[name].launch_time]


@pytest.mark.parametrize("name,check", IN_PROCESS)
def test_bad_job_in_process(name, check, tmp_path, digits_shards, capsys, monkeypatch):
    case = CASES[name]
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # this process is rank 0 of 1
        monkeypatch.delenv(var, raising=False)
    argv, written = write_case(case, tmp_path, digits_shards)
    code = train_main(argv + (["--check"] if check else []))
    captured = capsys.readouterr()
    assert_rejected(code, captured.err, case, tmp_path, written)
    assert captured.out == ""


def test_valid_base_job_passes_check(tmp_path, digits_shards, capsys):
    """The table's base job is valid: every case fails for its own change only."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base_job(digits_shards, tmp_path / "run")))
    assert train_main(["--job", str(path), "--check"]) == 0
    assert error_lines(capsys.readouterr().err) == []
    assert not (tmp_path / "run").exists()


def test_error_names_the_yaml_line(tmp_path, digits_shards, capsys):
    job = base_job(digits_shards, tmp_path / "run")
    job["model"]["num_channels"] = 48
    text = yaml.safe_dump(job, sort_keys=False)
    line = text.splitlines().index("  num_channels: 48") + 1
    (tmp_path / "bad.yaml").write_text(text)
    assert train_main(["--job", str(tmp_path / "bad.yaml"), "--check"]) == 2
    assert f"bad.yaml:{line}: model.num_channels: 48" in capsys.readouterr().err
    # given by --set, the file's line would mislead: no line then
    assert train_main(["--job", str(tmp_path / "bad.yaml"), "--check",
                       "--set", "model.num_channels=40"]) == 2
    assert "bad.yaml: model.num_channels: 40" in capsys.readouterr().err


def test_empty_section_means_defaults(tmp_path, digits_shards, capsys):
    job = base_job(digits_shards, tmp_path / "run")
    job["deepspeed"] = None  # `deepspeed:` with every line commented out
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert train_main(["--job", str(tmp_path / "job.yaml"), "--check"]) == 0
    capsys.readouterr()


SUBPROCESS_CASES = ["yaml tab", "num_channels 48", "learn_sigma sometimes", "batchsize typo",
                    "respacing too many"]


@pytest.mark.parametrize("check", [True, False], ids=["check", "train"])
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_job_real_process(name, check, tmp_path, digits_shards):
    """`python launch/train.py --job bad.yaml [--check]` as a user runs it."""
    case = CASES[name]
    argv, written = write_case(case, tmp_path, digits_shards)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *argv,
                           *(["--check"] if check else [])],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert_rejected(proc.returncode, proc.stderr, case, tmp_path, written)


# ------------------------------------------------- the spec holds the model's constraints
def _model_outcome(**fields: Any) -> Optional[str]:
    """None if ModelSpec accepts the fields, else the field it names."""
    try:
        spec = ModelSpec(**fields)
    except ValidationError as err:
        return ".".join(str(p) for p in error_field(err.errors()[0]))
    with torch.device("meta"):  # shapes only: every layer is built, nothing is allocated
        build_model(spec)
    return None


def test_groups_constant_matches_the_model():
    assert NORM_GROUPS == GROUPS


GRID = list(itertools.product(
    (16, 32, 48, 64, 96),              # num_channels
    ((1, 2), (2, 2), (1, 3), (1, 2, 2), (3, 1, 2)),  # channel_mult (32 px: 2 or 3 levels)
    (1, 2, 3, 4, 6),                   # num_heads
    (-1, 5),                           # num_heads_upsample
    ((), (16,), (8,), (16, 8), (4,)),  # attention_resolutions (px)
))


def test_every_valid_model_spec_builds():
    """Over a grid of widths, levels, heads and attention placements: ModelSpec either
    accepts and the UNet builds, or it rejects naming a model field (never a build error)."""
    accepted = rejected = 0
    fields_named = set()
    for channels, mult, heads, heads_up, attention in GRID:
        named = _model_outcome(image_size=32, num_channels=channels, channel_mult=mult,
                               num_heads=heads, num_heads_upsample=heads_up,
                               attention_resolutions=attention, num_res_blocks=1)
        if named is None:
            accepted += 1
        else:
            rejected += 1
            fields_named.add(named)
    assert accepted > 50 and rejected > 50, (accepted, rejected)
    assert fields_named == {"num_channels", "num_heads", "num_heads_upsample",
                            "attention_resolutions"}, fields_named


def test_rejected_widths_would_fail_the_build():
    """The spec's checks are not stricter than the model: what it rejects, the UNet rejects."""
    from iddpm_ds.models.unet import UNetModel

    for channels, mult, heads, heads_up in [(48, (2, 2), 4, -1), (32, (1, 2), 3, -1),
                                            (32, (1, 2), 1, 5)]:
        ds = (2,)  # attention at the second level (16 px of 32)
        assert _model_outcome(image_size=32, num_channels=channels, channel_mult=mult,
                              num_heads=heads, num_heads_upsample=heads_up,
                              attention_resolutions=(16,)) is not None
        with pytest.raises(ValueError), torch.device("meta"):
            UNetModel(3, channels, 3, 1, ds, channel_mult=mult, num_heads=heads,
                      num_heads_upsample=heads_up)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_valid_diffusion_spec_builds(schedule):
    """DiffusionSpec accepts exactly the (T, respacing) pairs build_diffusion can build."""
    for steps, respacing in itertools.product(
            (1, 2, 10, 19, 20, 21, 50), ("", "1", "5", "10", "20", "25", "0", "3,2", "5,0",
                                         "ddim1", "ddim5", "ddim7", "ddim0", "ddim", "x", "-1")):
        try:
            spec = DiffusionSpec(diffusion_steps=steps, noise_schedule=schedule,
                                 timestep_respacing=respacing)
        except ValidationError as err:
            loc = ".".join(str(p) for p in error_field(err.errors()[0]))
            assert loc in ("diffusion_steps", "timestep_respacing"), loc
            with pytest.raises(ValueError):
                build_diffusion(DiffusionSpec.model_construct(
                    diffusion_steps=steps, noise_schedule=schedule, timestep_respacing=respacing,
                    learn_sigma=False, sigma_small=False, use_kl=False, predict_xstart=False,
                    rescale_timesteps=True, rescale_learned_sigmas=True))
            continue
        assert build_diffusion(spec).num_timesteps >= 1


def test_sampling_job_files_get_the_same_errors(tmp_path):
    """iddpm-sample / iddpm-evaluate read --job through the same YAML and learn_sigma rules."""
    from iddpm_ds.weights import SamplingError, specs_from_job_file

    path = tmp_path / "bad.yaml"
    path.write_text("model:\n\tnum_channels: 32\n")
    with pytest.raises(SamplingError, match=r"bad\.yaml:2:1: invalid YAML"):
        specs_from_job_file(path)
    path.write_text("model: {learn_sigma: true}\ndiffusion: {learn_sigma: sometimes}\n")
    with pytest.raises(SamplingError, match=r"learn_sigma: Input should be a valid boolean"):
        specs_from_job_file(path)
    path.write_text("model: {num_channels: 48}\n")
    with pytest.raises(SamplingError, match=r"num_channels: 48 is not a multiple of 32"):
        specs_from_job_file(path)
    path.write_text("model: 5\n")
    with pytest.raises(SamplingError, match="must be mappings"):
        specs_from_job_file(path)
