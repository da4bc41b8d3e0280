#!/usr/bin/env python
"""Negative log-likelihood in bits/dim on held-out shards (the reference's image_nll.py).

    iddpm-evaluate --run-dir runs/demo              # the job's data.eval_shards, all of them
    iddpm-evaluate --run-dir runs/demo --num-samples 256 --respacing 100 --out nll.json
    iddpm-evaluate --checkpoint model500000.pt --eval-shards data/cifar/index.json \\
        --model-flags "--image_size 32 --num_channels 128 --learn_sigma True" \\
        --model-flags "--diffusion_steps 4000 --noise_schedule cosine"
    deepspeed --num_gpus 8 launch/evaluate.py --run-dir runs/demo   |   torchrun / srun likewise

Every held-out sample is evaluated by exactly one rank; results are reduced once. stdout
(rank 0) is one compact JSON object: bpd (total), prior_bpd, vb_bpd, mse, xstart_mse,
num_samples, the weights and respacing; everything else goes to stderr. --out writes the
full result: that object plus the per-step terms {"vb", "mse", "xstart_mse"} for
"timesteps" (ascending, one entry per diffusion step). The full bound uses every
diffusion step (the default); --respacing gives a cheaper, looser estimate. Exit status 2
on bad input (one message).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

if __package__:  # the console script: launch/ is installed as the package iddpm_ds_launch
    from .json_stdout import run_json_tool
    from .weights_args import add_weights_args, check_weights_args, weights_choice
else:  # python launch/evaluate.py (also under deepspeed/torchrun): launch/ is sys.path[0]
    from json_stdout import run_json_tool
    from weights_args import add_weights_args, check_weights_args, weights_choice

EXIT_BAD_INPUT = 2
PER_STEP_KEYS = ("timesteps", "terms")
"""Keys of the full result left out of stdout: lists with one entry per diffusion step."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weights_args(parser, job_help="job YAML: model/diffusion sections describe the weights; "
                                      "its data.eval_shards are the default held-out data")
    add = parser.add_argument
    add("--eval-shards", help="held-out shards: index.json (its eval split), a brace pattern "
                              "or a list with commas (default: the job's)")
    add("--num-samples", type=int, help="evaluate only the first N held-out samples")
    add("--batch-size", type=int, default=16, help="images per forward pass per rank")
    add("--respacing", help='"" (default: every step, the full bound) or e.g. "100"')
    add("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    add("--seed", type=int, default=0, help="seed of the x_t noise (with the rank)")
    add("--num-workers", type=int, help="data loader workers per rank")
    add("--out", type=Path, help="write the full JSON, with the per-step terms, to this file")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_weights_args(parser, args)
    if args.num_samples is not None and args.num_samples < 1:
        parser.error("--num-samples must be positive")
    return args


def data_spec(args: argparse.Namespace):
    """Held-out data: --eval-shards, else the data section of --job, else of the run's job.yaml."""
    import yaml

    from iddpm_ds.spec.data import DataSpec
    from iddpm_ds.weights import SamplingError

    section: dict = {}
    job_file = args.job or (args.run / "job.yaml" if args.run else None)
    if job_file is not None and job_file.is_file():
        raw = yaml.safe_load(job_file.read_text()) or {}  # already parsed once by load()
        section = (raw.get("data") or {}) if isinstance(raw, dict) else {}
        if not isinstance(section, dict):
            raise SamplingError(f"{job_file}: the data section must be a mapping")
        section = dict(section)
    if args.eval_shards:
        # commas separate a list, except inside a brace pattern such as {000..009}
        listed = "," in args.eval_shards and "{" not in args.eval_shards
        section["eval_shards"] = args.eval_shards.split(",") if listed else args.eval_shards
    if args.num_workers is not None:
        section["num_workers"] = args.num_workers
    if not section.get("eval_shards"):
        raise SamplingError("no held-out data: give --eval-shards (or a job with data.eval_shards)")
    try:
        return DataSpec.model_validate(section)
    except ValueError as err:
        raise SamplingError(f"bad held-out data settings: {err}") from None


def main(argv: list[str] | None = None) -> int:
    return run_json_tool(parse_args(argv), run)


def run(args: argparse.Namespace, result_out: TextIO) -> int:
    from iddpm_ds import placement
    from iddpm_ds.dist import env, output
    from iddpm_ds.bpd import evaluate_shards
    from iddpm_ds.models import at_precision
    from iddpm_ds.data import DataError
    from iddpm_ds.weights import SamplingError, load_weights, respaced

    try:
        loaded = load_weights(weights_choice(args), placement.device())
        diffusion = respaced(loaded.diffusion_spec, args.respacing)
        data = data_spec(args)
        output.log0("evaluate_start", source=str(loaded.source), weights=loaded.weights,
                    step=loaded.step, steps=diffusion.num_timesteps, world_size=env.world_size())
        result = evaluate_shards(at_precision(loaded.model, args.precision), diffusion,
                                 loaded.model_spec, data,
                                 batch_size=args.batch_size, device=placement.device(),
                                 num_samples=args.num_samples, clip_denoised=not args.no_clip,
                                 seed=args.seed, progress=not args.no_progress)
    except (SamplingError, DataError, OSError) as err:
        output.error0(str(err))
        return EXIT_BAD_INPUT
    result = {"source": str(loaded.source), "weights": loaded.weights, "step": loaded.step,
              "precision": args.precision,
              "respacing": args.respacing if args.respacing is not None
              else loaded.diffusion_spec.timestep_respacing, **result}
    if env.is_main():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(compact(result)), file=result_out, flush=True)
    return 0


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its per-step lists (1,000+ entries each at full length)."""
    return {k: v for k, v in result.items() if k not in PER_STEP_KEYS}


if __name__ == "__main__":
    sys.exit(main())
