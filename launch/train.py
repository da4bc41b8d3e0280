#!/usr/bin/env python
"""Train an IDDPM model from one job file.

    deepspeed --num_gpus N launch/train.py --job job.yaml [--set train.lr=2e-4 ...]
    deepspeed --hostfile hosts launch/train.py --job job.yaml
    torchrun --nproc_per_node N launch/train.py --job job.yaml
    srun python launch/train.py --job job.yaml        (ranks from SLURM_* variables)
    python launch/train.py --job job.yaml --check     (validate, print, exit; trains nothing)

Restarting the same command resumes from the run dir's newest complete checkpoint.
Exit status (what each leaves behind: README's table): 0 done; 2 bad job/config/data or
machine set-up (one message; nothing written when found before training, which is all but
too many corrupt samples met during training); 3 diverged (train.max_nonfinite_steps
non-finite steps in a row; one message, latest checkpoint finite); 4 a collective timed out
or lost a rank (one line per rank left; see distributed.collective_timeout_s); 5 a checkpoint
write failed on some rank (disk full, quota: one message naming the path and errno; the
failed checkpoint removed, latest unchanged; rerun once there is space); 75 preempted after
a checkpoint (requeue to resume).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iddpm_ds.exits import BAD_JOB as EXIT_BAD_JOB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", type=Path, help="job spec YAML")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.lr=2e-4 (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="validate; print resolved spec, DeepSpeed config, parameter count and "
                             "memory estimate; exit without training or writing")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: world size to render for (default: the launcher's, else 1)")
    parser.add_argument("--schema", type=Path, metavar="PATH",
                        help="write the job spec's JSON schema (for editors) to PATH and exit; "
                             "a .md PATH writes the Markdown field reference instead")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job is None and args.schema is None:
        parser.error("--job is required")
    return args


def fail(message: str) -> int:
    from iddpm_ds.dist import output

    output.error0(message)
    return EXIT_BAD_JOB


def load(args: argparse.Namespace):
    """(job, None) or (None, one-line message naming the file and field)."""
    from iddpm_ds.spec.errors import JobError
    from iddpm_ds.spec.job import load_job

    try:
        return load_job(args.job, args.sets), None
    except JobError as err:  # missing file, YAML errors, bad --set, invalid fields
        return None, str(err)


def check(job, world_size: int) -> int:
    """--check: everything a user wants to see before spending GPU-hours."""
    from iddpm_ds import placement
    from iddpm_ds.data import check_sources
    from iddpm_ds.spec.job import dump_job
    from iddpm_ds.train.ds_config import render_ds_config
    from iddpm_ds.train.memory import count_parameters, model_state_bytes

    model = job.model  # the data must exist, decode and carry labels the model can embed
    data_lines = check_sources(job.data, image_size=model.image_size,
                               class_cond=model.class_cond, num_classes=model.num_classes)
    config = render_ds_config(job, world_size, placement.has_gpu(), placement.fp16_capable())
    layout = placement.layout(world_size)  # PlacementError: a local rank without a GPU
    num_params = count_parameters(job.model)  # meta device: no weights are allocated
    memory = model_state_bytes(num_params, job, world_size)
    print("# resolved job spec\n" + dump_job(job))
    print(f"# DeepSpeed config at world size {world_size}\n" + json.dumps(config, indent=2))
    print("# layout: " + "\n#   ".join(layout.describe()))
    print(f"# parameters: {num_params:,}")
    print(f"# model-state memory per rank (ZeRO-{job.deepspeed.zero_stage}, {job.precision}, "
          f"world {world_size}; activations not included):")
    for key, value in memory.items():
        print(f"#   {key:<18} {value / 2**20:10.1f} MiB")
    print(f"#   {'total':<18} {sum(v for k, v in memory.items() if 'cpu' not in k) / 2**20:10.1f} MiB")
    for line in data_lines:
        print(f"# {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from iddpm_ds.dist import env
    from iddpm_ds.spec.job import JobSpec

    if args.schema:
        try:
            if args.schema.suffix == ".md":  # the human reference, docs/job_file.md
                from iddpm_ds.spec.markdown import job_reference_markdown

                args.schema.write_text(job_reference_markdown())
            else:
                args.schema.write_text(json.dumps(JobSpec.model_json_schema(), indent=2))
        except OSError as err:
            return fail(f"--schema {args.schema}: {err.strerror or err}")
        return 0
    if args.world_size is not None and args.world_size < 1:
        return fail(f"--world-size must be >= 1, got {args.world_size}")
    job, error = load(args)
    if error:
        return fail(error)
    from iddpm_ds.data.errors import DataError
    from iddpm_ds.placement import PlacementError
    from iddpm_ds.train.ds_config import ConfigError

    if args.check:
        try:
            return check(job, args.world_size if args.world_size is not None else env.world_size())
        except (ConfigError, DataError, PlacementError) as err:
            return fail(str(err))
    return train(job)


def train(job) -> int:
    from iddpm_ds.dist import group, output
    from iddpm_ds.data.errors import DataError
    from iddpm_ds.train.ds_config import ConfigError
    from iddpm_ds.train.resume import ResumeError
    from iddpm_ds.train.saver import CHECKPOINT_WRITE_FAILED_EXIT, CheckpointWriteError
    from iddpm_ds.train.trainer import Trainer

    with group.session(job.distributed):  # a rank that stops answering ends the job, one line
        try:
            trainer = Trainer(job)
        except (ConfigError, DataError, ResumeError) as err:
            return fail(str(err))
        try:
            return trainer.run()
        except DataError as err:  # too many corrupt samples: any rank, so that rank tells
            output.error_line(str(err))
            return EXIT_BAD_JOB
        except CheckpointWriteError as err:  # every rank, agreed: one line from rank 0
            output.error0(str(err))
            return CHECKPOINT_WRITE_FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
