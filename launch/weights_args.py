"""Command-line options that choose trained weights, shared by iddpm-sample and
iddpm-evaluate: the weights (--run-dir or --checkpoint, --step, --weights, --ema-rate) and
the specs that describe them (--job or --model-flags). Both tools load through
iddpm_ds.weights.load_weights(weights_choice(args)).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from iddpm_ds.weights import WeightsChoice

JOB_HELP = "job YAML whose model/diffusion sections describe the weights"


def add_weights_args(parser: argparse.ArgumentParser, job_help: str = JOB_HELP) -> None:
    """Add the weight-selection options (a required --run-dir / --checkpoint pair and the rest)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", dest="run", type=Path,
                        help="run directory (its checkpoints/ and job spec)")
    source.add_argument("--checkpoint", type=Path, help="plain state-dict .pt (reference or ours)")
    add = parser.add_argument
    add("--step", type=int, help="with --run-dir: checkpoint step (default: latest complete)")
    add("--weights", choices=("ema", "model"), default="ema",
        help="with --run-dir: EMA weights (default) or the raw model weights")
    add("--ema-rate", type=float, help="with --run-dir: EMA rate (default: the job's first)")
    add("--job", type=Path, help=job_help)
    add("--model-flags", nargs="+", action="extend", default=[], metavar="FLAGS",
        help='reference flags: "--image_size 64 --learn_sigma True" or image_size=64 ...')
    add("--precision", choices=("fp32", "bf16", "bf16-mixed"), default="fp32",
        help="fp32 (default); bf16: weights cast to bf16; bf16-mixed: fp32 weights, autocast "
             "(the UNet's embeddings and output layer in fp32). Diffusion math stays fp32")


def check_weights_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2, one message) for option combinations that cannot work."""
    if args.run is None and (args.step is not None or args.ema_rate is not None):
        parser.error("--step and --ema-rate need --run-dir")
    if args.job and args.model_flags:
        parser.error("give the model spec with --job or with --model-flags, not both")


def weights_choice(args: argparse.Namespace) -> "WeightsChoice":
    """The parsed options as the package's typed WeightsChoice."""
    from iddpm_ds.weights import WeightsChoice

    return WeightsChoice(run_dir=args.run, checkpoint=args.checkpoint, step=args.step,
                         weights=args.weights, ema_rate=args.ema_rate, job=args.job,
                         model_flags=tuple(args.model_flags))
