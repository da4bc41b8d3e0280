#!/usr/bin/env python
"""Negative log-likelihood in bits/dim on held-out shards (the reference's image_nll.py).

    iddpm-evaluate --run-dir runs/demo              # the job's data.eval_shards, all of them
    iddpm-evaluate --run-dir runs/demo --num-samples 256 --respacing 100 --out nll.json
    iddpm-evaluate --checkpoint model500000.pt --eval-shards data/cifar/index.json \\
        --model-flags "--image_size 32 --num_channels 128 --learn_sigma True" \\
        --model-flags "--diffusion_steps 4000 --noise_schedule cosine"
    deepspeed --num_gpus 8 launch/evaluate.py --run-dir runs/demo   |   torchrun / srun likewise

Every held-out sample is evaluated by exactly one rank; results are reduced once and
printed (rank 0) as one JSON object: bpd (total), prior_bpd, vb_bpd, mse, xstart_mse,
num_samples, and per-step terms {"vb", "mse", "xstart_mse"} for "timesteps" (ascending).
The full bound uses every diffusion step (the default); --respacing gives a cheaper,
looser estimate. Exit status 2 on bad input (one message).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", dest="run", type=Path,
                        help="run directory (its checkpoints/ and job spec)")
    source.add_argument("--checkpoint", type=Path, help="plain state-dict .pt (reference or ours)")
    add = parser.add_argument
    add("--step", type=int, help="with --run-dir: checkpoint step (default: latest complete)")
    add("--weights", choices=("ema", "model"), default="ema",
        help="with --run-dir: EMA weights (default) or the raw model weights")
    add("--ema-rate", type=float, help="with --run-dir: EMA rate (default: the job's first)")
    add("--job", type=Path, help="job YAML: model/diffusion sections describe the weights; "
                                 "its data.eval_shards are the default held-out data")
    add("--model-flags", nargs="+", action="extend", default=[], metavar="FLAGS",
        help='reference flags: "--image_size 64 --learn_sigma True" or image_size=64 ...')
    add("--eval-shards", help="held-out shards: index.json (its eval split), a brace pattern "
                              "or a list with commas (default: the job's)")
    add("--num-samples", type=int, help="evaluate only the first N held-out samples")
    add("--batch-size", type=int, default=16, help="images per forward pass per rank")
    add("--respacing", help='"" (default: every step, the full bound) or e.g. "100"')
    add("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    add("--seed", type=int, default=0, help="seed of the x_t noise (with the rank)")
    add("--num-workers", type=int, help="data loader workers per rank")
    add("--out", type=Path, help="also write the JSON to this file")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is None and (args.step is not None or args.ema_rate is not None):
        parser.error("--step and --ema-rate need --run-dir")
    if args.job and args.model_flags:
        parser.error("give the model spec with --job or with --model-flags, not both")
    if args.num_samples is not None and args.num_samples < 1:
        parser.error("--num-samples must be positive")
    return args


def fail(message: str) -> int:
    from iddpm_ds import dist

    if dist.is_main():
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def load(args: argparse.Namespace, device):
    from iddpm_ds import sampling

    specs = (None, None)
    if args.job:
        specs = sampling.specs_from_job_file(args.job)
    elif args.model_flags:
        specs = sampling.specs_from_reference_flags(args.model_flags)
    if args.run:
        return sampling.load_from_run(args.run, step=args.step, weights=args.weights,
                                      ema_rate=args.ema_rate, model_spec=specs[0],
                                      diffusion_spec=specs[1], device=device)
    return sampling.load_from_file(args.checkpoint, specs[0], specs[1], device=device)


def data_spec(args: argparse.Namespace):
    """Held-out data: --eval-shards, else the data section of --job, else of the run's job.yaml."""
    import yaml

    from iddpm_ds.sampling import SamplingError
    from iddpm_ds.spec.data import DataSpec

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
    args = parse_args(argv)
    from iddpm_ds import dist

    dist.init()
    try:
        return run(args)
    finally:
        dist.shutdown()


def run(args: argparse.Namespace) -> int:
    from iddpm_ds import dist
    from iddpm_ds.data import DataError
    from iddpm_ds.evaluation import evaluate_shards
    from iddpm_ds.sampling import SamplingError, respaced

    try:
        loaded = load(args, dist.device())
        diffusion = respaced(loaded.diffusion_spec, args.respacing)
        data = data_spec(args)
        dist.log0("evaluate_start", source=str(loaded.source), weights=loaded.weights,
                  step=loaded.step, steps=diffusion.num_timesteps, world_size=dist.world_size())
        result = evaluate_shards(loaded.model, diffusion, loaded.model_spec, data,
                                 batch_size=args.batch_size, device=dist.device(),
                                 num_samples=args.num_samples, clip_denoised=not args.no_clip,
                                 seed=args.seed, progress=not args.no_progress)
    except (SamplingError, DataError, OSError) as err:
        return fail(str(err))
    result = {"source": str(loaded.source), "weights": loaded.weights, "step": loaded.step,
              "respacing": args.respacing if args.respacing is not None
              else loaded.diffusion_spec.timestep_respacing, **result}
    if dist.is_main():
        text = json.dumps(result)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
