"""JobSpec: one validated YAML file describes a whole training job.

Sections: model, diffusion (reference flags), data, train, precision, deepspeed (engine
settings only), distributed (timeouts), output. Batch sizes, lr and precision live here
and nowhere else; the DeepSpeed config is rendered from this spec by
`iddpm_ds.train.ds_config`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator

from .base import Spec
from .data import DataSpec
from .diffusion import DiffusionSpec, check_respacing
from .errors import FieldError, JobError, describe, error_message
from .distributed import DistributedSpec
from .model import ModelSpec
from .sampler import SamplerSpec

# DeepSpeed config keys the job spec owns: deepspeed.overrides (and templates) must not set them.
SPEC_OWNED = {
    "train_batch_size": "train.batch_size / train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.microbatch",
    "gradient_accumulation_steps": "train.microbatch",
    "optimizer": "train.lr / train.weight_decay",
    "scheduler": "train.lr_anneal_steps / train.warmup_steps",
    "gradient_clipping": "train.grad_clip",
    "bf16.enabled": "precision",
    "fp16.enabled": "precision",
    "amp": "precision",
    "torch_autocast.enabled": "precision",
    "torch_autocast.dtype": "precision",
    "zero_optimization.stage": "deepspeed.zero_stage",
}


def owned_keys_in(config: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted SPEC_OWNED keys that a raw DeepSpeed config sets."""
    found = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if dotted in SPEC_OWNED:
            found.append(dotted)
        elif isinstance(value, dict):
            found += owned_keys_in(value, dotted + ".")
    return found


class TrainSpec(Spec):
    """Optimisation, batch sizes and intervals."""

    batch_size: Optional[int] = Field(None, ge=1)
    """Per-rank batch (the reference's meaning). Set this OR global_batch_size: whichever is set
    stays fixed when the number of GPUs changes."""
    global_batch_size: Optional[int] = Field(None, ge=1)
    """Batch over all ranks per optimizer step; per-rank batch = global / world size (must divide)."""
    microbatch: int = -1
    """Per-rank micro-batch for gradient accumulation; -1 disables accumulation (reference)."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    lr_anneal_steps: int = Field(0, ge=0)
    """Anneal the lr linearly to 0 at this step (0: constant lr) and stop there, as the reference."""
    warmup_steps: int = Field(0, ge=0)
    """Linear lr warm-up over this many optimizer steps (0: none, as the reference)."""
    ema_rate: tuple[float, ...] = (0.9999,)
    """EMA decay rates, "0.9999,0.999" or a list; one EMA copy of the fp32 weights per rate."""
    grad_clip: float = Field(0.0, ge=0)
    """Clip the global gradient norm to this value (0: no clipping, as the reference)."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Stop after this many optimizer steps (default: lr_anneal_steps, else run until stopped)."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seed for model init (same on all ranks) and, offset by rank, for noise, t and data order."""
    compile: bool = False
    """torch.compile the model through DeepSpeed's engine (`engine.compile()`, inductor
    backend): forward and backward run as generated fused kernels. The first steps are slow
    while it compiles (minutes for large models); weights, checkpoints and numerics
    (up to kernel rounding) are unchanged."""
    channels_last: bool = False
    """Run the model's activations channels_last (NHWC), the layout GPU tensor cores and
    CPU oneDNN convolutions run fastest on; weights keep their layout (DeepSpeed needs
    contiguous parameters). Same results."""
    adamw_kernel: Literal["fused", "foreach", "loop"] = "fused"
    """torch AdamW implementation: "fused" (one kernel for all tensors; the only one that
    lets the divergence guard skip a step on the device, the others make it read its
    verdict on the host every step), "foreach" (batched ops) or "loop" (one tensor at a
    time). Same update. Not with deepspeed.offload_optimizer (DeepSpeed's CPU Adam)."""
    attention_kernel: Literal["sdpa", "math"] = "sdpa"
    """Self-attention kernel: "sdpa" (torch's scaled_dot_product_attention, flash /
    memory-efficient kernels where the device has them) or "math" (the reference's explicit
    q k^T, float32 softmax, times v). Same result up to rounding. "math" was faster in bf16
    on an AVX-512-bf16 CPU, whose bf16 flash backward is slow (docs/benchmarks.md)."""
    schedule_sampler: SamplerSpec = SamplerSpec()
    """Timestep sampler: "uniform" or "loss-second-moment" (or a mapping with its options)."""
    log_interval: int = Field(10, ge=1)
    """Optimizer steps between metric logs (the only time metrics are read from the device)."""
    save_interval: int = Field(10000, ge=1)
    """Optimizer steps between checkpoints (one is also written at the end)."""
    save_interval_minutes: Optional[float] = Field(None, gt=0)
    """Also checkpoint once this many minutes of wall time have passed since the last save
    (or the start), so that a failure loses a bounded amount of work whatever the step time
    (null: the step interval only, as the reference). Rank 0's clock decides at log steps
    and every rank follows, so a time save lands on a multiple of train.log_interval;
    either interval's save restarts the clock."""
    sample_interval: int = Field(0, ge=0)
    """Optimizer steps between EMA sample grids (0: only at evaluations, see eval_interval)."""
    sample_count: int = Field(16, ge=1)
    """Images in each sample grid."""
    sample_respacing: str = "ddim25"
    """Respacing for sample grids (DDIM when it starts with "ddim")."""
    eval_interval: int = Field(0, ge=0)
    """Optimizer steps between held-out bits/dim evaluations, each with a sample grid
    (0: never; needs data.eval_shards)."""
    eval_samples: int = Field(64, ge=1)
    """Held-out images per evaluation (over all ranks)."""
    eval_respacing: str = "50"
    """Respacing used for the bits/dim estimate during training (full T is slow)."""
    preempt_check_interval: int = Field(1, ge=1)
    """Optimizer steps between the cross-rank check for a preemption signal (one tiny collective)."""
    max_nonfinite_steps: int = Field(10, ge=1)
    """Stop the run (exit status 3) after this many optimizer steps in a row with a non-finite
    loss or gradient norm; each such step is skipped (weights, Adam moments, EMA and sampler
    history unchanged). Checked at log intervals and before every checkpoint."""

    @field_validator("ema_rate", mode="before")
    @classmethod
    def _rates(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(float(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise ValueError(f"expected comma-separated rates such as \"0.9999,0.999\", "
                                 f"got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value),)
        return value

    @field_validator("schedule_sampler", mode="before")
    @classmethod
    def _sampler_shorthand(cls, value: object) -> object:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if (self.batch_size is None) == (self.global_batch_size is None):
            raise FieldError("batch_size", (
                "set exactly one of train.batch_size (per rank, fixed when the GPU count "
                "changes) or train.global_batch_size (fixed over all ranks)"))
        if self.microbatch == 0 or self.microbatch < -1:
            raise FieldError("microbatch", f"must be -1 (off) or a positive per-rank size, "
                                           f"got {self.microbatch}")
        batch_name, batch = (("batch_size", self.batch_size) if self.batch_size is not None
                             else ("global_batch_size", self.global_batch_size))
        if self.microbatch > 0 and batch % self.microbatch:
            # a global batch that is no multiple of the micro-batch gives no per-rank
            # batch that is one, at any world size
            raise FieldError("microbatch", f"{self.microbatch} does not divide "
                                           f"train.{batch_name}={batch}")
        if not self.ema_rate or any(not 0.0 < r < 1.0 for r in self.ema_rate):
            raise FieldError("ema_rate", f"values must lie in (0, 1), got {list(self.ema_rate)}")
        if len(set(self.ema_rate)) != len(self.ema_rate):
            raise FieldError("ema_rate", f"has duplicates: {list(self.ema_rate)}")
        self._check_schedule()
        return self

    def _check_schedule(self) -> None:
        anneal = self.lr_anneal_steps
        if anneal and self.warmup_steps >= anneal:
            raise FieldError("warmup_steps", (
                f"{self.warmup_steps} reaches train.lr_anneal_steps={anneal}: the lr would be "
                "annealed to 0 before the warm-up ends"))
        if anneal and self.max_steps is not None and self.max_steps > anneal:
            raise FieldError("max_steps", (
                f"{self.max_steps} goes past train.lr_anneal_steps={anneal}, where the lr "
                "reaches 0; raise lr_anneal_steps or lower max_steps"))

    @property
    def total_steps(self) -> Optional[int]:
        return self.max_steps or (self.lr_anneal_steps or None)


class DeepSpeedSpec(Spec):
    """Engine settings: which ZeRO stage and offloads, from which template, plus raw overrides.
    Batch sizes, lr, optimizer and precision are NOT set here (they are the train/precision
    sections' knobs); overrides that try are rejected."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    """ZeRO stage: 0 (data parallel), 1 (optimizer states sharded), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states (and fp32 masters) in CPU memory (ZeRO-Offload; stage >= 1)."""
    offload_param: bool = False
    """Keep parameters in CPU memory (ZeRO-Infinity; stage 3 only)."""
    template: Optional[str] = None
    """Extra engine template: a file name in ds_configs/ or a path, merged over the built-in ones."""
    overrides: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged last (engine settings only, e.g. communication tuning)."""

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedSpec":
        if self.offload_param and self.zero_stage != 3:
            raise FieldError("offload_param", "needs deepspeed.zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise FieldError("offload_optimizer", "needs deepspeed.zero_stage >= 1")
        if self.template is not None and not self.template.strip():
            raise FieldError("template", "is empty; name a file in ds_configs/ or a path, or "
                                         "leave it out")
        owned = owned_keys_in(self.overrides)
        if owned:
            raise FieldError(f"overrides.{owned[0]}", (
                f"is owned by the job spec: set {SPEC_OWNED[owned[0]]} instead"))
        return self


class OutputSpec(Spec):
    """Where the run writes, and how much it keeps."""

    run_dir: Path
    """Run directory: resolved spec, checkpoints, metrics (JSONL, TensorBoard), sample grids.
    Restarting a job with the same run_dir resumes from its latest complete checkpoint."""
    keep_checkpoints: int = Field(3, ge=1)
    """Keep this many most recent checkpoints; older ones are deleted after a save completes."""
    tensorboard: bool = True
    """Also write TensorBoard event files (metrics/ and sample grids)."""

    @field_validator("run_dir", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; name the run directory")
        return value


class JobSpec(Spec):
    """A complete training job."""

    model: ModelSpec = ModelSpec()
    """The UNet (reference flags)."""
    diffusion: DiffusionSpec = DiffusionSpec()
    """The Gaussian diffusion (reference flags)."""
    data: DataSpec
    """Training (and held-out) WebDataset shards."""
    train: TrainSpec
    """Optimisation, batch sizes, intervals."""
    precision: Literal["fp32", "bf16", "bf16-mixed", "fp16"] = "fp32"
    """Training precision. bf16/fp16 store the model's weights in 16 bit and keep fp32 master
    weights; the timestep MLP, embedding projections, GroupNorm and output head still
    compute in fp32, as the reference's fp16. fp16 uses the reference's dynamic loss scale
    (2^20, halved on overflow, doubled after 1,000 clean steps) and needs a GPU. bf16-mixed:
    fp32 weights, the UNet torso's convolutions and attention autocast to bf16."""
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """Engine settings."""
    distributed: DistributedSpec = DistributedSpec()
    """Timeouts on waiting for other ranks (no silent hangs)."""
    output: OutputSpec
    """Run directory and retention."""

    @model_validator(mode="before")
    @classmethod
    def _sections(cls, data: Any) -> Any:
        """An empty section (`model:` with every line commented out) means its defaults; a
        key that belongs to another section is named with where it belongs."""
        if not isinstance(data, dict):
            return data
        data = {k: ({} if v is None and _section_fields(k) is not None else v)
                for k, v in data.items()}
        for name, section in data.items():
            if not isinstance(section, dict):
                continue
            own = _section_fields(name)
            for key in section:
                if own is None or key in own:
                    continue  # an unknown section, or a known key: the section reports
                home = [s for s in cls.model_fields if key in (_section_fields(s) or ())]
                if home:
                    raise FieldError(f"{name}.{key}", f"unknown key; it belongs in "
                                                      f"{home[0]}.{key}")
        return share_learn_sigma(data)

    @model_validator(mode="after")
    def _check(self) -> "JobSpec":
        if self.model.learn_sigma != self.diffusion.learn_sigma:
            raise FieldError("diffusion.learn_sigma", (
                f"{self.diffusion.learn_sigma} contradicts model.learn_sigma="
                f"{self.model.learn_sigma}: one flag drives both; set it in one section"))
        if self.train.eval_interval and not self.data.eval_shards:
            raise FieldError("train.eval_interval", "needs data.eval_shards")
        if self.deepspeed.offload_optimizer and "adamw_kernel" in self.train.model_fields_set:
            raise FieldError("train.adamw_kernel", (
                "does not apply with deepspeed.offload_optimizer (DeepSpeed's CPU Adam steps "
                "the optimizer); remove one of them"))
        for field in ("sample_respacing", "eval_respacing"):
            value = getattr(self.train, field)
            try:
                check_respacing(self.diffusion.diffusion_steps, value)
            except ValueError as err:
                raise FieldError(f"train.{field}", f"{value!r}: {err}") from None
        return self


def _section_fields(name: str) -> Optional[set[str]]:
    field = JobSpec.model_fields.get(name)
    model = getattr(field, "annotation", None) if field else None
    return set(model.model_fields) if isinstance(model, type) and issubclass(model, Spec) else None


def share_learn_sigma(data: dict[str, Any]) -> dict[str, Any]:
    """learn_sigma is one reference flag used by model and diffusion: set in one section,
    it is copied to the other. Set in both, each is validated and they must agree (a value
    is never dropped, so a typo such as "sometimes" is an error, not an override)."""
    model, diffusion = data.get("model", {}), data.get("diffusion", {})
    if not isinstance(model, dict) or not isinstance(diffusion, dict):
        return data
    if ("learn_sigma" in model) == ("learn_sigma" in diffusion):
        return data
    side = "model" if "learn_sigma" in model else "diffusion"
    try:  # validated where it was written, so an error names that section
        value = TypeAdapter(bool).validate_python(data[side]["learn_sigma"])
    except ValidationError as err:
        raise FieldError(f"{side}.learn_sigma", error_message(err.errors()[0])) from None
    return {**data, "model": {**model, "learn_sigma": value},
            "diffusion": {**diffusion, "learn_sigma": value}}


def parse_overrides(sets: list[str]) -> dict[str, Any]:
    """`["train.lr=2e-4", "model.dropout=0.1"]` -> nested dict; values parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        path, raw = item.split("=", 1)
        keys = [k.strip() for k in path.split(".")]
        if not all(keys):
            raise ValueError(f"--set {item!r}: the key path {path!r} has an empty part")
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r} conflicts with another --set")
        if isinstance(node.get(keys[-1]), dict):
            raise ValueError(f"--set {item!r} conflicts with another --set")
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML "
                             f"({getattr(err, 'problem', None) or err})") from None
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable: SafeLoader reports it with its position
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_job_yaml(path: Path | str) -> tuple[Any, Optional[yaml.Node]]:
    """(data, node tree) of a job file; JobError (with file:line:column) if it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise JobError(f"{path}: job file does not exist")
    if not path.is_file():
        raise JobError(f"{path}: not a file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise JobError(f"{path}: cannot read the job file ({err})") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    except yaml.MarkedYAMLError as err:
        raise JobError(_yaml_error_line(path, err)) from None
    except yaml.YAMLError as err:
        raise JobError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def _yaml_error_line(path: Path, err: yaml.MarkedYAMLError) -> str:
    """`file:LINE:COL: invalid YAML: problem (context at line L, column C)`."""
    mark = err.problem_mark or err.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    text = f"{where}: invalid YAML: {err.problem or err.context}"
    if err.context and err.problem:
        at = err.context_mark
        # an unclosed quote or bracket is reported where the stream ends: say where it opened
        text += (f" ({err.context} at line {at.line + 1}, column {at.column + 1})"
                 if at and at is not mark else f" ({err.context})")
    return text


def _line_finder(node: Optional[yaml.Node], overrides: dict[str, Any]):
    """loc -> 1-based line of the deepest YAML key on that path (None where --set gave it)."""

    def line_of(loc: tuple[Any, ...]) -> Optional[int]:
        current, line, set_here = node, None, overrides
        for part in loc:
            if isinstance(set_here, dict) and part in set_here:
                set_here = set_here[part]
                if not isinstance(set_here, dict):
                    return None
            else:
                set_here = None
            if not isinstance(current, yaml.MappingNode):
                break
            match = [(k, v) for k, v in current.value if getattr(k, "value", None) == str(part)]
            if not match:
                break
            line, current = match[-1][0].start_mark.line + 1, match[-1][1]
        return line

    return line_of


def load_job(path: Path | str, sets: list[str] | None = None) -> JobSpec:
    """Read a job YAML, apply `--set` overrides, validate. Relative data paths stay as
    written (relative to the working directory, like every CLI path). Any problem is a
    JobError whose message is one line naming the file (and line) and the field."""
    raw, node = read_job_yaml(path)
    if raw is None:
        raise JobError(f"{path}: the job file is empty; it needs at least the data, train "
                       "and output sections")
    if not isinstance(raw, dict):
        raise JobError(f"{path}: a job file is a mapping of sections (model:, train:, ...), "
                       f"got a {type(raw).__name__}")
    try:
        overrides = parse_overrides(sets or [])
    except ValueError as err:
        raise JobError(str(err)) from None
    try:
        return JobSpec.model_validate(deep_merge(raw, overrides))
    except ValidationError as err:
        raise JobError(describe(err, str(path), _line_finder(node, overrides))) from None


def dump_job(job: JobSpec) -> str:
    """The resolved spec as YAML (every default spelled out), as written to the run dir."""
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
