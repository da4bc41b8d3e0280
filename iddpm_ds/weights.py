"""Trained weights: find them in a run dir, load them (ours or the reference's files),
and the model/diffusion specs that describe them. Used by iddpm-sample, iddpm-evaluate
and anything else that needs a trained model.

Public API::

    from iddpm_ds.weights import WeightsChoice, load_weights, respaced
    loaded = load_weights(WeightsChoice(run_dir=Path("runs/demo"), ema_rate=0.9999),
                          device=placement.device())
    loaded.model, loaded.model_spec, loaded.diffusion_spec, loaded.source, loaded.step
    diffusion = respaced(loaded.diffusion_spec, "ddim50")

A run dir gives its newest complete checkpoint (or `step`), EMA weights (the job's first
rate unless `ema_rate` says) or the raw ones; a plain state-dict file (the reference's
model/ema .pt files or our exports) needs the specs from a job file or reference flags,
unless it lies inside one of our checkpoint directories.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .diffusion import SpacedDiffusion, build_diffusion
from .models import build_model
from .spec.diffusion import DiffusionSpec
from .spec.model import ModelSpec
from .train import checkpoint as ckpt


class SamplingError(ValueError):
    """Bad input for sampling or evaluation; the message says what is wrong and what exists."""


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with its weights, and the specs it was built from."""

    model: torch.nn.Module
    model_spec: ModelSpec
    diffusion_spec: DiffusionSpec
    source: Path
    """The weights file."""
    weights: str
    """"model" or "ema_<rate>" (from the reference's file names), else "file"."""
    step: Optional[int] = None
    """Training step of the checkpoint (None for a file outside a run dir)."""


def find_checkpoint(run_dir: Path, step: Optional[int] = None) -> Path:
    """The tag directory of the newest complete checkpoint of run_dir, or the one at `step`."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise SamplingError(f"run directory {run_dir} does not exist")
    tags = ckpt.complete_tags(ckpt_dir)
    if not tags:
        raise SamplingError(f"{run_dir} has no complete checkpoint (looked in {ckpt_dir})")
    if step is None:
        tag, _ = ckpt.find_resume_tag(ckpt_dir)
        return ckpt_dir / tag
    if ckpt.tag_for(step) not in tags:
        steps = [ckpt.step_of(t) for t in tags]
        raise SamplingError(f"{run_dir} has no complete checkpoint at step {step}; "
                            f"available steps: {steps}")
    return ckpt_dir / ckpt.tag_for(step)


def available_ema_rates(tag_dir: Path) -> list[str]:
    """EMA rates (as written in the file names) exported in one checkpoint directory."""
    suffix = f"_{ckpt.step_of(tag_dir.name):06d}.pt"
    names = [p.name for p in tag_dir.glob(f"ema_*{suffix}")]
    return sorted((n[len("ema_"):-len(suffix)] for n in names), key=float)


def weights_path(tag_dir: Path, weights: str = "ema", ema_rate: Optional[float] = None) -> Path:
    """The exported weights file of a checkpoint: the raw model or the EMA at `ema_rate`
    (default: the job's first rate, the one its sample grids use)."""
    step = ckpt.step_of(tag_dir.name)
    if weights == "model":
        return tag_dir / ckpt.export_name_model(step)
    if weights != "ema":
        raise SamplingError(f"weights must be 'ema' or 'model', got {weights!r}")
    rates = available_ema_rates(tag_dir)
    if not rates:
        raise SamplingError(f"{tag_dir} holds no EMA weights; use weights 'model'")
    if ema_rate is None:
        job_rates = _trainer_state(tag_dir).get("ema_rates") or []
        first = next((r for r in rates if job_rates and float(r) == float(job_rates[0])), rates[0])
        return tag_dir / f"ema_{first}_{step:06d}.pt"
    match = [r for r in rates if float(r) == float(ema_rate)]
    if not match:
        raise SamplingError(f"no EMA weights at rate {ema_rate} in {tag_dir}; available rates: "
                            f"{', '.join(rates)} (or use the raw weights: weights 'model')")
    return tag_dir / f"ema_{match[0]}_{step:06d}.pt"


def _trainer_state(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's trainer state with "spec" and "ema_rates" at the top: the trainer
    keeps them under "meta" (the resolved spec), older files at the top."""
    path = tag_dir / "trainer_state.pt"
    state = ckpt.load_plain(path) if path.is_file() else {}
    spec = state.get("spec") or (state.get("meta") or {}).get("spec")
    rates = state.get("ema_rates") or ((spec or {}).get("train") or {}).get("ema_rate")
    return {**state, "spec": spec, "ema_rates": rates}


def run_specs(run_dir: Path, tag_dir: Optional[Path] = None) -> tuple[ModelSpec, DiffusionSpec]:
    """Model and diffusion specs a run trained with: the checkpoint's resolved spec, else
    run_dir/job.yaml. Only those two sections are read, so other sections may have changed."""
    raw = _trainer_state(tag_dir).get("spec") if tag_dir is not None else None
    if raw is None:
        path = Path(run_dir) / "job.yaml"
        if not path.is_file():
            raise SamplingError(f"{run_dir} has neither a checkpoint spec nor job.yaml; "
                                "give the model spec (a job file or reference flags)")
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
    return specs_from_sections(raw, f"the spec stored in {run_dir}")


def load_from_run(run_dir: Path, *, step: Optional[int] = None, weights: str = "ema",
                  ema_rate: Optional[float] = None, model_spec: Optional[ModelSpec] = None,
                  diffusion_spec: Optional[DiffusionSpec] = None,
                  device: torch.device = torch.device("cpu")) -> LoadedModel:
    """Weights of a run dir's checkpoint (newest complete, or `step`), EMA or raw.

    The specs default to the ones the run trained with; passing others checks the weights
    against them (a mismatch is a SamplingError naming the differing keys)."""
    tag_dir = find_checkpoint(Path(run_dir), step)
    path = weights_path(tag_dir, weights, ema_rate)
    if model_spec is None or diffusion_spec is None:
        stored_model, stored_diffusion = run_specs(Path(run_dir), tag_dir)
        model_spec = model_spec or stored_model
        diffusion_spec = diffusion_spec or stored_diffusion
    model = build_checked(model_spec, _load_state(path), str(path), device)
    return LoadedModel(model, model_spec, diffusion_spec, path, _weights_label(path),
                       ckpt.step_of(tag_dir.name))


def load_from_file(path: Path, model_spec: Optional[ModelSpec] = None,
                   diffusion_spec: Optional[DiffusionSpec] = None,
                   device: torch.device = torch.device("cpu")) -> LoadedModel:
    """A plain state-dict file: the reference's model/ema .pt files or one of our exports.

    Without specs, a file inside one of our checkpoint directories takes its run's specs."""
    path = Path(path)
    if not path.is_file():
        raise SamplingError(f"weights file {path} does not exist")
    step = None
    if (path.parent / "trainer_state.pt").is_file() and ckpt.TAG_RE.match(path.parent.name):
        step = ckpt.step_of(path.parent.name)
        if model_spec is None or diffusion_spec is None:
            stored = run_specs(path.parent.parent.parent, path.parent)
            model_spec, diffusion_spec = model_spec or stored[0], diffusion_spec or stored[1]
    if model_spec is None or diffusion_spec is None:
        raise SamplingError(f"{path} is not inside a run's checkpoint: give the model spec "
                            "(a job file, or the reference flags it was trained with)")
    model = build_checked(model_spec, _load_state(path), str(path), device)
    return LoadedModel(model, model_spec, diffusion_spec, path, _weights_label(path), step)


def _weights_label(path: Path) -> str:
    """"model" / "ema_<rate>" for files named as the reference names them, else "file"."""
    match = re.match(r"^(model|ema_[0-9.eE+-]+)_?\d+\.pt$", path.name)
    return match.group(1) if match else "file"


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SamplingError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors come in many types; any means unreadable
        raise SamplingError(f"cannot read {path} as a state dict: "
                            f"{type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SamplingError(f"{path} is not a plain state dict (name -> tensor); for a DeepSpeed "
                            "checkpoint use the exported model/ema files next to it")
    return state


def build_checked(model_spec: ModelSpec, state: dict[str, torch.Tensor], source: str,
                  device: torch.device) -> torch.nn.Module:
    """The model of model_spec with `state` loaded strictly, in eval mode on `device`."""
    model = build_model(model_spec)
    check_state_dict(model, state, source)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """SamplingError naming missing/unexpected keys and shape mismatches, if there are any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (file vs model)", shapes)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:5])}{more}")
    raise SamplingError(f"{source} does not match the requested model spec "
                        "(image_size, num_channels, num_res_blocks, channel_mult, "
                        "attention_resolutions, learn_sigma, class_cond ...): " + "; ".join(parts))


def parse_reference_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """Reference flags as the reference's scripts take them ("--image_size 64 --learn_sigma
    True", shell-split) or as key=value pairs, to a flag dict for `specs_from_flags`.
    Values are read as YAML scalars (True/False, numbers); "" stays an empty string."""
    import shlex

    import yaml

    words = [w for token in tokens for w in shlex.split(token)]
    flags: dict[str, Any] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if "=" in word:
            key, raw = word.split("=", 1)
            i += 1
        elif word.startswith("--") and i + 1 < len(words):
            key, raw = word, words[i + 1]
            i += 2
        else:
            raise SamplingError(f"model flag {word!r} has no value: use key=value or --key value")
        key = key.lstrip("-").replace("-", "_")
        flags[key] = yaml.safe_load(raw) if raw != "" else ""
    return flags


def specs_from_reference_flags(tokens: Sequence[str]) -> tuple[ModelSpec, DiffusionSpec]:
    """(ModelSpec, DiffusionSpec) of reference flags (see parse_reference_flags)."""
    from .spec.flags import specs_from_flags

    try:
        return specs_from_flags(parse_reference_flags(tokens))
    except ValueError as err:
        raise SamplingError(f"bad model flags: {_one_line(err)}") from None


def specs_from_job_file(path: Path) -> tuple[ModelSpec, DiffusionSpec]:
    """The model and diffusion sections of a job YAML (other sections are not needed and
    not checked); learn_sigma set in either section applies to both, as in a JobSpec."""
    from .spec.errors import JobError
    from .spec.job import read_job_yaml

    try:
        raw = read_job_yaml(path)[0] or {}
    except JobError as err:  # missing file, YAML syntax (with line and column)
        raise SamplingError(str(err)) from None
    if not isinstance(raw, dict):
        raise SamplingError(f"{path}: a job file is a mapping of sections, got {type(raw).__name__}")
    return specs_from_sections(raw, str(path))


def specs_from_sections(raw: dict[str, Any], where: str) -> tuple[ModelSpec, DiffusionSpec]:
    """(ModelSpec, DiffusionSpec) of a job mapping's model and diffusion sections; learn_sigma
    set in either applies to both, as in a JobSpec. `where` names the source in errors."""
    from .spec.job import share_learn_sigma

    sections = {name: raw.get(name) or {} for name in ("model", "diffusion")}
    if not all(isinstance(v, dict) for v in sections.values()):
        raise SamplingError(f"{where}: the model and diffusion sections must be mappings")
    try:
        sections = share_learn_sigma(sections)
        specs = (ModelSpec.model_validate(sections["model"]),
                 DiffusionSpec.model_validate(sections["diffusion"]))
    except ValueError as err:
        raise SamplingError(f"{where}: invalid model/diffusion section: {_one_line(err)}") from None
    if specs[0].learn_sigma != specs[1].learn_sigma:
        raise SamplingError(f"{where}: model.learn_sigma contradicts diffusion.learn_sigma")
    return specs


def _one_line(err: ValueError) -> str:
    """A pydantic ValidationError as 'field: message; ...', any other error as its text."""
    from pydantic import ValidationError

    from .spec.errors import describe

    return describe(err) if isinstance(err, ValidationError) else str(err)


def respaced(spec: DiffusionSpec, respacing: Optional[str]) -> SpacedDiffusion:
    """The diffusion of `spec` at another respacing (None keeps the spec's own)."""
    if respacing is None:
        return build_diffusion(spec)
    try:
        return build_diffusion(spec.with_respacing(respacing))
    except ValueError as err:
        raise SamplingError(f"respacing {respacing!r} cannot be used with "
                            f"diffusion_steps={spec.diffusion_steps}: {_one_line(err)}") from None


# --------------------------------------------------------------------- one entry point
@dataclass(frozen=True)
class WeightsChoice:
    """Which weights to load and which specs describe them: the command lines' --run-dir,
    --checkpoint, --step, --weights, --ema-rate, --job and --model-flags."""

    run_dir: Optional[Path] = None
    """A run directory (its checkpoints/ and job spec); exclusive with checkpoint."""
    checkpoint: Optional[Path] = None
    """A plain state-dict .pt file (reference or ours); exclusive with run_dir."""
    step: Optional[int] = None
    """With run_dir: the checkpoint's training step (None: the newest complete one)."""
    weights: str = "ema"
    """With run_dir: "ema" or "model" (the raw weights)."""
    ema_rate: Optional[float] = None
    """With run_dir and weights "ema": the rate (None: the job's first, as its sample grids)."""
    job: Optional[Path] = None
    """A job YAML whose model/diffusion sections describe the weights."""
    model_flags: tuple[str, ...] = ()
    """Reference flags describing the weights (see parse_reference_flags)."""

    def __post_init__(self) -> None:
        if (self.run_dir is None) == (self.checkpoint is None):
            raise SamplingError("give exactly one of a run directory and a weights file")
        if self.job is not None and self.model_flags:
            raise SamplingError("give the model spec with a job file or with reference flags, "
                                "not both")


def load_weights(choice: WeightsChoice, device: torch.device = torch.device("cpu")) -> LoadedModel:
    """The model chosen by `choice`, in eval mode on `device`, with its specs; the specs of
    choice.job / choice.model_flags, when given, override (and are checked against) the run's."""
    specs: tuple[Optional[ModelSpec], Optional[DiffusionSpec]] = (None, None)
    if choice.job is not None:
        specs = specs_from_job_file(choice.job)
    elif choice.model_flags:
        specs = specs_from_reference_flags(choice.model_flags)
    if choice.run_dir is not None:
        return load_from_run(choice.run_dir, step=choice.step, weights=choice.weights,
                             ema_rate=choice.ema_rate, model_spec=specs[0],
                             diffusion_spec=specs[1], device=device)
    return load_from_file(choice.checkpoint, specs[0], specs[1], device=device)
