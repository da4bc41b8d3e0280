#!/usr/bin/env python
"""The golden loss: the first 200 steps of the tiny digits job, pinned.

Parity tests pin single calls (a loss term, a kernel, a schedule); this pins what a short
training run does with all of them together. The tiny digits job (tests/train_utils.py
`tiny_job`: 16 px, L_hybrid, loss-aware sampler, lr 2e-3 with warm-up, seed 0) trains 200
steps on one rank in fp32 and in bf16; every 20-step window's mean loss, mse, vb and
gradient norm is compared with tests/data/golden_loss.json. The gradient norm is there
because AdamW is blind to a constant factor on the loss: a step that scales its loss by
1.01 leaves the loss curve alone but moves every window's grad_norm by 1%.

    python tests/golden_loss.py            # train, print stored vs now with relative diffs
    python tests/golden_loss.py --refresh  # train and rewrite tests/data/golden_loss.json

Refresh only on purpose, in its own commit whose message says why the curve moved: a
deliberate change of numerics (a new kernel, a fixed bug in the step, a changed default
in the tiny job, another torch or DeepSpeed version). A diff nobody can explain is a bug
in the step; that is what this file is for.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN = HERE / "data" / "golden_loss.json"
KEYS = ("loss", "mse", "vb", "grad_norm")
PRECISIONS = ("fp32", "bf16")
STEPS, WINDOW = 200, 20
RTOL = 2e-3  # run to run on one machine kind the curve is bitwise equal; 1% must fail

from train_utils import metrics, run_train, tiny_job  # noqa: E402 - tests/ is sys.path[0] (script) or on it (pytest)


def train_windows(shards: Path, out: Path, precision: str) -> list[dict[str, float]]:
    """One 1-rank run of the real launcher; the logged window means of KEYS."""
    job = tiny_job(out / precision, shards, **{
        "precision": precision, "train.max_steps": STEPS, "train.log_interval": WINDOW,
        "train.save_interval": 10 * STEPS, "data.num_workers": 0})
    run_train(1, job, launcher="python")
    return [{k: r[k] for k in ("step", *KEYS)} for r in metrics(out / precision / "run")]


def current(shards: Path | None = None) -> dict[str, list[dict[str, float]]]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if shards is None:
            shards = tmp / "digits"
            subprocess.run([sys.executable, str(ROOT / "launch/make_shards.py"), "digits", "--out",
                            str(shards), "--quiet"], check=True, cwd=ROOT)
        return {p: train_windows(shards, tmp, p) for p in PRECISIONS}


def compare(stored: dict, now: dict) -> tuple[list[str], list[str]]:
    """(table lines, mismatches): every window's KEYS, stored vs now, relative diff."""
    lines, bad = ["precision step key stored now rel_diff"], []
    for precision in PRECISIONS:
        if len(stored[precision]) != len(now[precision]):
            bad.append(f"{precision}: {len(now[precision])} windows, stored {len(stored[precision])}")
            continue
        for old, new in zip(stored[precision], now[precision]):
            for key in KEYS:
                rel = abs(new[key] - old[key]) / max(abs(old[key]), 1e-12)
                line = f"{precision} {old['step']} {key} {old[key]:.6f} {new[key]:.6f} {rel:.2e}"
                lines.append(line + ("  <-- differs" if rel > RTOL else ""))
                if rel > RTOL or old["step"] != new["step"]:
                    bad.append(line)
    return lines, bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="rewrite " + str(GOLDEN))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    now = current()
    if args.refresh:
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    lines, bad = compare(json.loads(GOLDEN.read_text()), now)
    print("\n".join(lines))
    print(f"{len(bad)} window values differ by more than {RTOL:.0e}" if bad else "matches the golden loss")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
