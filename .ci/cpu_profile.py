"""Where the suite's CPU goes: every Python process of a `bash .ci/test.sh` run, by kind and
by test (docs/development.md, "Where the CPU goes").

    python .ci/cpu_profile.py [PYTEST_ARGS]      # from the checkout, after bash launch/setup_env.sh

For the run's length only, a .pth hook in .venv makes each Python process append, at exit,
its own CPU seconds, argv and the test that started it (PYTEST_CURRENT_TEST, inherited by
its subprocesses; ranks started over ssh or by slurmd have none) to one file. The
namespace hosts and slurmd share this machine's file system and venv, so they record too.
Processes that end by SIGKILL or os._exit (fork-server ranks, loader workers, xdist
workers) are not counted, nor is anything not Python (g++ for inductor, sshd, slurmd): the
/proc/stat line says how much that leaves.
"""
from __future__ import annotations

import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOOK = """import os, sys, atexit, json
def _record():
    t = os.times()
    with open({log!r}, "a") as f:
        f.write(json.dumps({{"argv": sys.argv[:4], "cpu": t.user + t.system,
            "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
            "engine": "torch._dynamo" in sys.modules}}) + "\\n")
atexit.register(_record)
"""


def busy_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / 100, (fields[3] + fields[4]) / 100


def kind(record: dict) -> str:
    first = (record["argv"] or [""])[0]
    if first.endswith("launch/train.py"):  # a rank; one refused at the spec never builds an engine
        return "train.py rank" + ("" if record["engine"] else " (no engine)")
    return Path(first).name or " ".join(record["argv"][:2])[:40]


def main(pytest_args: list[str]) -> int:
    venv_python = ROOT / ".venv/bin/python"
    site = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    log = Path(tempfile.mkdtemp()) / "cpu.jsonl"
    hook, pth = Path(site) / "_iddpm_cpu_profile.py", Path(site) / "_iddpm_cpu_profile.pth"
    hook.write_text(HOOK.format(log=str(log)))
    pth.write_text("import _iddpm_cpu_profile\n")
    before = busy_seconds()
    try:
        code = subprocess.run(["bash", ".ci/test.sh", *pytest_args], cwd=ROOT).returncode
    finally:  # the hook lives only as long as this run
        pth.unlink()
        hook.unlink()
    busy, idle = (a - b for a, b in zip(busy_seconds(), before))
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    untested = "(no test: pytest itself, or started over ssh or by slurmd)"
    for title, key in (("kind", kind), ("test", lambda r: r["test"] or untested)):
        totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
        for record in records:
            totals[key(record)][0] += 1
            totals[key(record)][1] += record["cpu"]
        print(f"\nCPU-s by {title} (count, CPU-s, mean):")
        for name, (count, cpu) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:25]:
            print(f"{cpu:8.0f} {count:5d} {cpu / count:6.1f}  {name}")
    print(f"\n{len(records)} Python processes counted: {sum(r['cpu'] for r in records):.0f} CPU-s; "
          f"the machine: {busy:.0f} CPU-s busy, {idle:.0f} idle")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
