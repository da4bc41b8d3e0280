#!/usr/bin/env python
"""Sample images from a trained model (DDPM or DDIM), split across ranks, into one .npz.

    iddpm-sample --run-dir runs/demo --num-samples 64 --respacing ddim50
    iddpm-sample --run-dir runs/demo --step 20000 --weights model --respacing 250 --seed 3
    iddpm-sample --checkpoint ema_0.9999_500000.pt --num-samples 16 \\
        --model-flags "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True" \\
        --model-flags "--diffusion_steps 4000 --noise_schedule cosine" --respacing 100
    iddpm-sample --run-dir runs/sr --base-samples runs/base/samples/.../samples_Nx64x64x3.npz
    deepspeed --num_gpus 8 launch/sample.py --run-dir runs/demo --num-samples 50000 --batch-size 64
    torchrun --nproc_per_node 8 launch/sample.py ...   |   srun python launch/sample.py ...

(--run-dir, which also works abbreviated as --run outside torchrun; torchrun itself would
take a bare --run for its own --run-path.)

Weights: a run dir's newest complete checkpoint (or --step), EMA (--ema-rate, default the
job's first rate) or raw (--weights model); or a plain state-dict file (--checkpoint, the
reference's files too) with the spec from --job or --model-flags (a file inside a run's
checkpoint needs neither). The same --seed gives the same images on any number of ranks.

A super-resolution model (model.small_size) upsamples --base-samples: an npz of
low-resolution images (arr_0 uint8 [N, small, small, 3], arr_1 labels if class-conditional),
such as a base run's own output (a two-stage cascade); image i is conditioned on base image
i, and --num-samples defaults to all of them.

Writes samples_NxHxWx3.npz (arr_0 uint8 [N, H, W, 3], arr_1 int64 labels when
class-conditional: the reference layout) and a PNG grid of the first images next to it;
stdout is one JSON object (paths, img/s), everything else goes to stderr. Exit status 2
on bad input (one message).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

if __package__:  # the console script: launch/ is installed as the package iddpm_ds_launch
    from .json_stdout import run_json_tool
    from .weights_args import add_weights_args, check_weights_args, weights_choice
else:  # python launch/sample.py (also under deepspeed/torchrun): launch/ is sys.path[0]
    from json_stdout import run_json_tool
    from weights_args import add_weights_args, check_weights_args, weights_choice

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weights_args(parser)
    add = parser.add_argument
    add("--num-samples", type=int, default=None,
        help="images over all ranks (default 16; with --base-samples, all of them)")
    add("--base-samples", type=Path,
        help="super-resolution: npz of low-resolution images (arr_0 uint8 [N, h, w, 3], "
             "arr_1 labels if class-conditional)")
    add("--batch-size", type=int, default=16, help="images per forward pass per rank")
    add("--respacing", help='"250", "10,10,10", "ddim50"; default: the spec\'s (all steps)')
    add("--sampler", choices=("auto", "ddpm", "ddim"), default="auto",
        help="auto: DDIM when the respacing starts with 'ddim', else DDPM")
    add("--eta", type=float, default=0.0, help="DDIM noise scale (0: deterministic)")
    add("--class-labels", help="comma list cycled over the images (default: random)")
    add("--no-clip", action="store_true", help="do not clip predicted x_0 to [-1, 1]")
    add("--seed", type=int, default=0, help="fixes every image (with its index)")
    add("--out", type=Path, help="output folder, or a path ending in .npz")
    add("--grid-count", type=int, default=64, help="images in the PNG grid")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_weights_args(parser, args)
    return args


def parse_labels(text: str | None) -> tuple[int, ...] | None:
    from iddpm_ds.weights import SamplingError

    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SamplingError(f"--class-labels must be comma-separated integers, got {text!r}") \
            from None


def default_out(args: argparse.Namespace, loaded, respacing: str, sampler: str) -> Path:
    step = f"_{loaded.step:06d}" if loaded.step is not None else ""
    name = f"{loaded.weights}{step}_{respacing or 'full'}_{sampler}_seed{args.seed}"
    name = name.replace(",", "-")
    base = args.run / "samples" if args.run else Path("samples")
    return base / name


def main(argv: list[str] | None = None) -> int:
    return run_json_tool(parse_args(argv), run)


def run(args: argparse.Namespace, result_out: TextIO) -> int:
    from iddpm_ds import placement
    from iddpm_ds.dist import env, output
    from iddpm_ds.image_sampler import (SampleOptions, check_labels, load_base_samples, sample,
                                        write_samples)
    from iddpm_ds.models import at_precision
    from iddpm_ds.weights import SamplingError, load_weights, respaced

    try:
        loaded = load_weights(weights_choice(args), placement.device())
        diffusion = respaced(loaded.diffusion_spec, args.respacing)
        respacing = (args.respacing if args.respacing is not None
                     else loaded.diffusion_spec.timestep_respacing)
        use_ddim = args.sampler == "ddim" or (args.sampler == "auto"
                                              and respacing.startswith("ddim"))
        base = (load_base_samples(args.base_samples, loaded.model_spec)
                if args.base_samples is not None else None)
        num_samples = (args.num_samples if args.num_samples is not None
                       else len(base) if base is not None else 16)
        opts = SampleOptions(num_samples=num_samples, batch_size=args.batch_size,
                             use_ddim=use_ddim, eta=args.eta, clip_denoised=not args.no_clip,
                             seed=args.seed, class_labels=parse_labels(args.class_labels),
                             progress=not args.no_progress, base_samples=base)
        check_labels(loaded.model_spec, opts.class_labels, base)
    except (SamplingError, OSError) as err:
        output.error0(str(err))
        return EXIT_BAD_INPUT
    sampler = "ddim" if use_ddim else "ddpm"
    output.log0("sampling_start", source=str(loaded.source), weights=loaded.weights, step=loaded.step,
                respacing=respacing, steps=diffusion.num_timesteps, sampler=sampler, eta=opts.eta,
                precision=args.precision,
                num_samples=opts.num_samples, world_size=env.world_size())
    model = at_precision(loaded.model, args.precision)
    result = sample(model, diffusion, loaded.model_spec, opts, placement.device())
    if env.is_main():
        out = args.out or default_out(args, loaded, respacing, sampler)
        npz, png = write_samples(result.images, result.labels, out, grid_count=args.grid_count)
        print(json.dumps({"npz": str(npz), "grid": str(png), "num_samples": opts.num_samples,
                          "shape": list(result.images.shape), "sampler": sampler,
                          "respacing": respacing, "steps": diffusion.num_timesteps,
                          "precision": args.precision,
                          "weights": loaded.weights, "step": loaded.step, "seed": opts.seed,
                          "world_size": env.world_size(), "seconds": round(result.seconds, 3),
                          "img_per_s": round(result.img_per_s, 3)}), file=result_out,
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
