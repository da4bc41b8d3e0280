"""The GPU check: `pytest -m gpu` printed as one Markdown table (docs/benchmarks.md); exit
status 1 if a row fails.

    python -m bench.gpu_check [--dry-run] [-- PYTEST_ARGS]   # bash bench/gpu_check.sh on a GPU machine
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from bench.common import ROOT, cli, table

DASH = "—"
VERDICT = {"failure": "FAIL", "error": "FAIL", "skipped": "SKIP"}  # a junit-xml outcome's tag


def run_pytest(gpu: bool, extra: list[str], xml: Path) -> int:
    env = dict(os.environ)  # python -m pytest from ROOT: this checkout's iddpm_ds, tests and bench
    if not gpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           "-o", "junit_family=xunit1", f"--junitxml={xml}", "tests", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def row(case: ElementTree.Element) -> list[str]:
    """One junit-xml test case as the table's cells (its properties: what report() recorded)."""
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    outcome = next((c for c in case if c.tag in VERDICT), None)
    status = VERDICT[outcome.tag] if outcome is not None else "PASS"
    detail = props.get("detail", "") if outcome is None else (outcome.get("message") or "")
    budget = f" ({float(props['budget_s']):.0f})" if "budget_s" in props else ""
    memory = DASH
    if "peak_bytes" in props:
        cpu_note = " (CPU max RSS)" if props.get("memory_kind") == "cpu_max_rss" else ""
        memory = f"{int(props['peak_bytes']) / 2**30:.2f} GiB{cpu_note}"
    mfu = props.get("mfu")
    return [props.get("row", case.get("name")), status,
            f"{float(case.get('time', 0)):.0f}{budget}", memory,
            f"{float(props['img_s']):.1f}" if "img_s" in props else DASH,
            f"{float(mfu):.1%}" if mfu not in (None, "None") else DASH,
            (detail.splitlines() or [""])[0][:300].replace("|", "/")]


def main(argv: list[str] | None = None) -> int:
    parser = cli(__doc__, threads=None)
    parser.add_argument("--dry-run", action="store_true", help="CPU: the GPU-only rows skip with the reason")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry_run
    if not args.dry_run and not gpu:
        print("error: no GPU visible; use --dry-run for the CPU run", file=sys.stderr)
        return 2
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        code = run_pytest(gpu, args.pytest_args, Path(tmp) / "gpu.xml")
        if not (Path(tmp) / "gpu.xml").is_file():
            return code or 1
        rows = [row(case) for case in ElementTree.parse(Path(tmp) / "gpu.xml").iter("testcase")]
    import deepspeed

    device = f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}" if gpu else "CPU (dry run)"
    print(f"\ngpu_check on {device}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}: "
          f"{time.perf_counter() - began:.0f} s in all\n")
    print(table("check | result | s (budget): | peak memory: | img/s: | MFU: | detail", rows))
    return 1 if any(r[1] == "FAIL" for r in rows) or code not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
