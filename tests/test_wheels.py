"""The wheel folder a GPU machine without network needs (bench/build_wheels.sh, pins in
bench/gpu_wheels.txt) is complete: installed with --no-index into a fresh venv that holds
only torch, by bench/gpu_check.sh's own install step, it runs the project."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "bench" / "gpu_wheels.txt"
PAPER_JOB = ROOT / "launch" / "jobs" / "paper" / "imagenet64_hybrid_cosine.yaml"


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            assert canonicalize_name(name) not in out, f"{name} pinned twice"
            out[canonicalize_name(name)] = version
    return out


def project_dependencies() -> list[Requirement]:
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [Requirement(r) for r in listed if Requirement(r).name != "torch"]


def test_every_project_dependency_is_pinned_at_a_version_it_accepts():
    pinned = pins()
    for requirement in project_dependencies():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in {PINS.name}"
        assert requirement.specifier.contains(pinned[name]), (str(requirement), pinned[name])


def installed_in(venv: Path) -> dict[str, str]:
    sites = [str(p) for p in venv.glob("lib/python*/site-packages")]
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=sites)}


def _run(cmd: list[str], env: dict[str, str], timeout: int = 600) -> tuple[str, float]:
    began = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, time.perf_counter() - began


@pytest.mark.slow
def test_wheel_folder_installs_offline_into_a_torch_only_venv(tmp_path, digits_shards):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "DS_ACCELERATOR", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    timings = {}
    # .whl/ (kept between runs: wheels already there are not fetched again)
    _, timings["build_wheels"] = _run(["bash", "bench/build_wheels.sh"], {**env, "PYTHON": sys.executable})
    # a venv holding torch and nothing else (torch's own dependencies come with it)
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    torch_version = importlib.metadata.version("torch").split("+")[0]
    _, timings["venv + torch"] = _run([sys.executable, "-m", "venv", str(venv)], env)
    _, seconds = _run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}"], env)
    timings["venv + torch"] += seconds
    with_torch = installed_in(venv)
    # gpu_check.sh's own install step: .whl/ only (--no-index, no pip configuration)
    _, timings["install .whl"] = _run(["bash", "bench/gpu_check.sh", "--install-only"], {**env, "PYTHON": python})
    installed = installed_in(venv)
    for name, version in pins().items():  # every pin went in at its version, or came with torch
        assert installed.get(name) == version or name in with_torch, (name, installed.get(name), version)
    # the project, from this checkout, with those wheels: imports and a paper job's --check
    run_env = {**env, "PYTHONPATH": str(ROOT)}
    out, timings["imports"] = _run([python, "-c", "import deepspeed, webdataset, iddpm_ds, "
                                    "iddpm_ds.train.trainer; print(deepspeed.__file__)"], run_env)
    assert out.strip().splitlines()[-1].startswith(str(venv)), out  # DeepSpeed came from the wheels, not from elsewhere
    index = digits_shards / "index.json"
    out, timings["--check"] = _run([python, "launch/train.py", "--job", str(PAPER_JOB), "--check",
                                    "--set", f"data.shards={index}#train",
                                    "--set", f"data.eval_shards={index}#eval"], run_env)
    assert "# parameters: 121,063,942" in out, out[-2000:]
    print("wheel-folder test timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
