"""Mutant check: small breaks of the README's rows, each of which its own test must catch.

Every entry of MUTANTS is one edit (file, exact original text, replacement) and the fast
test(s) that must FAIL once the edit is in. The runner copies the repository's files
(git ls-files: tracked plus untracked-but-not-ignored) into a temporary directory, writes
the digits shards once for all its runs, checks that the copy works (smoke: a fast test
that trains real rank processes, and a spec test, pass there as they are), then applies
each edit alone, runs its tests against the copy (PYTHONPATH and cwd point at the copy,
so every process the tests start, training launchers included, imports the copy's
iddpm_ds) and puts the file back. Each edit is reported killed or SURVIVED (its tests
passed), with its time; an edit whose tests all skip on this machine (GPU-only) is
reported skipped and does not fail the run. A kill counts only as a test failure: pytest
names a listed test FAILED (not an ERROR in a fixture, not a collection error), for a
reason other than an import error, so a copy that cannot run its tests never passes for
a kill. That the listed tests pass unedited is what the main suite proves on the same
code; `--baseline` checks it here too (one pytest run of them all, about 2 min of CPU). Exit status 1 when an edit survived, when
an original text is not found exactly once (the list went stale: re-anchor it on the new
text), or when a test cannot run (not found, collection error, failing smoke/baseline).

    python tests/mutants.py                 # smoke + every edit (CI: tests/test_mutants.py)
    python tests/mutants.py --list          # the entries
    python tests/mutants.py lr-anneal ema-rate --baseline   # some edits, their tests unedited first

Adding an entry: one Mutant(...) below; `original` must occur exactly once in the file
(include enough context), and `tests` names pytest node ids or "file -k expr" selections
that run in seconds. Check it with `python tests/mutants.py <name>`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    row: str               # the README promise it breaks
    file: str              # relative to the repository root
    original: str          # exact text, found exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # pytest selections, each "node_id" or "path -k expr"


MUTANTS: tuple[Mutant, ...] = (
    Mutant("fp16-zero0-loss-scale", "fp16 loss scaling",
           "iddpm_ds/train/loss_scale.py",
           "self._unscaled_backward = self.active and not engine.zero_optimization()",
           "self._unscaled_backward = False",
           ("tests/test_fp16.py::test_zero0_fp16_gradient_reaches_adamw_unscaled",)),
    Mutant("fp16-overflow-not-divergence", "fp16 loss scaling",
           "iddpm_ds/train/guard.py",
           "bad = (self._loss_bad if self.fp16 else ~self.applied).long()",
           "bad = (~self.applied).long()",
           ("tests/test_fp16.py::test_overflow_skips_are_counted_not_divergence_and_scale_survives_resume",)),
    Mutant("importance-weights", "importance weights",
           "iddpm_ds/train/trainer.py",
           'loss = self.guard.poison((losses["loss"] * weights).mean())',
           'loss = self.guard.poison((losses["loss"]).mean())',
           ("tests/test_train_math.py::test_importance_weights_scale_each_sample_gradient",)),
    Mutant("lr-anneal", "lr anneal",
           "iddpm_ds/train/engine.py",
           "value *= max(0.0, 1.0 - k / anneal)",
           "value *= max(0.0, 1.0 - k / (2 * anneal))",
           ("tests/test_train_math.py::test_importance_weights_and_lr_schedule_past_warm_up",)),
    Mutant("bf16-mixed-autocast", "bf16-mixed",
           "iddpm_ds/train/ds_config.py",
           'out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}',
           "pass",
           ("tests/test_train_math.py::test_bf16_mixed_autocasts_the_torso_inside_the_engine_forward",)),
    Mutant("ema-rate", "EMA rate",
           "iddpm_ds/train/ema.py",
           "torch._foreach_add_(ema, source, alpha=1.0 - rate)",
           "torch._foreach_add_(ema, source, alpha=rate)",
           ("tests/test_ema.py::test_ema_matches_hand_computation[0-fp32]",)),
    Mutant("grad-clip", "grad clip",
           "iddpm_ds/train/ds_config.py",
           '"gradient_clipping": train.grad_clip,',
           '"gradient_clipping": 0.0,',
           ("tests/test_train_math.py::test_grad_clip_bounds_the_norm_the_optimizer_sees",)),
    Mutant("sampler-warm-up", "sampler warm-up",
           "iddpm_ds/diffusion/timestep_sampler.py",
           "return (self._total[: self.num_timesteps] >= self.history_per_term).all()",
           "return (self._total[: self.num_timesteps] >= self.history_per_term).any()",
           ("tests/test_timestep_sampler.py::test_warmup_is_uniform_until_every_timestep_is_full",)),
    Mutant("sampler-all-gather", "the sampler's all-gather",
           "iddpm_ds/diffusion/timestep_sampler.py",
           "        if world == 1:\n            return None, packed.unsqueeze(0)",
           "        if world >= 1:\n            return None, packed.unsqueeze(0)",
           ("tests/test_timestep_sampler.py::test_two_ranks_unequal_batches_one_collective_match_reference",)),
    Mutant("data-exactly-once", "exactly-once data",
           "iddpm_ds/data/position.py",
           "self.part = take(pool, rank * self.batches * bsz, (rank + 1) * self.batches * bsz)",
           "self.part = take(pool, 0, self.batches * bsz)",
           ("tests/test_data.py::test_plan_serves_each_position_once_across_chained_resumes",)),
    Mutant("data-position-resume", "data-position resume",
           "iddpm_ds/data/reader.py",
           'self._offset, self._done = saved["worker_offset"], saved["batches_done"][cfg.rank]',
           'self._offset, self._done = saved["worker_offset"], 0',
           ("tests/test_data.py::test_resume_at_the_same_layout_yields_the_uninterrupted_batches[0]",)),
    Mutant("http-retry", "shards over http: retried, resumed at the byte",
           "iddpm_ds/data/http.py",
           'if getattr(err, "permanent", False) or failures >= self.options.retries:',
           "if True:",
           ("tests/test_data_http.py::test_a_dropped_connection_resumes_at_the_byte_and_check_names_the_server",)),
    Mutant("http-404-is-missing", "shards over http: 404 missing at once",
           "iddpm_ds/data/http.py",
           "permanent=resp.status not in TRANSIENT_STATUS)",
           "permanent=False)",
           ("tests/test_data_http.py::test_404_is_missing_at_once_503_after_the_retries_under_the_corrupt_limit",)),
    Mutant("guard-refuses-non-finite-save", "divergence guard's save refusal",
           "iddpm_ds/train/trainer.py",
           'raise Diverged("training diverged: non-finite fp32 master or EMA weights")',
           "pass",
           ("tests/test_rows_fast.py::test_save_is_refused_once_diverged",)),
    Mutant("guard-refuses-save-after-streak", "divergence guard's save refusal",
           "iddpm_ds/train/guard.py",
           "        if self.longest >= self.limit:\n",
           "        if self.longest > 10 ** 9:\n",
           ("tests/test_rows_fast.py::test_save_is_refused_once_diverged",)),
    Mutant("universal-conversion", "universal conversion",
           "iddpm_ds/train/states.py",
           "if saved_world_size != env.world_size() and sharded:",
           "if False:",
           ("tests/test_rows_fast.py::test_zero1_checkpoint_of_2_ranks_resumes_on_1_rank",)),
    Mutant("universal-load-flag", "universal conversion",
           "iddpm_ds/train/universal.py",
           "engine._config.load_universal_checkpoint = True",
           "engine._config.load_universal_checkpoint = False",
           ("tests/test_rows_fast.py::test_zero1_checkpoint_of_2_ranks_resumes_on_1_rank",)),
    Mutant("gpu-placement", "GPU placement",
           "iddpm_ds/placement.py",
           "    return local_rank\n",
           "    return 0\n",
           ("tests/test_placement.py::test_launcher_with_all_devices_visible_uses_local_rank",)),
    Mutant("spec-refusal", "spec refusal (a validator)",
           "iddpm_ds/spec/job.py",
           "if (self.batch_size is None) == (self.global_batch_size is None):",
           "if False:",
           ("tests/test_job_spec.py::test_exactly_one_batch_knob",)),
    Mutant("preemption-signal", "preemption save",
           "iddpm_ds/train/preempt.py",
           "        self.received = signum\n",
           "        pass\n",
           ("tests/test_rows_fast.py::test_preemption_signal_saves_and_exits_75",)),
    Mutant("preemption-save", "preemption save",
           "iddpm_ds/train/trainer.py",
           '                    output.log0("preempted", step=self.step)\n'
           '                    self.checkpoints.save(self.step, last=True)\n',
           '                    output.log0("preempted", step=self.step)\n',
           ("tests/test_rows_fast.py::test_preemption_signal_saves_and_exits_75",)),
    Mutant("save-time-interval", "time-based checkpoint interval",
           "iddpm_ds/train/checkpointer.py",
           "self.clock() - self.since >= self.minutes * 60.0",
           "self.clock() - self.since >= self.minutes * 600.0",
           ("tests/test_checkpointer.py::test_schedule_saves_on_steps_and_on_time_at_check_steps_only",)),
    Mutant("compile-lever", "speed levers: train.compile compiles",
           "iddpm_ds/train/engine.py",
           "    if job.train.compile:  # compiles engine.module in place",
           "    if False:  # compiles engine.module in place",
           ("tests/test_speed_levers.py::test_service_trains_with_every_lever[0-1]",)),
    Mutant("elastic-no-restart-on-bad-job", "elastic restarts: 2/3/5/75 never restarted",
           "iddpm_ds/exits.py",
           "return exitcode != DONE and exitcode not in NEVER_RESTARTED",
           "return exitcode != DONE",
           ("tests/test_elastic.py::test_a_bad_job_under_the_elastic_agent_exits_2_once",)),
)

PYTEST = ("-q", "-x", "-rf", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header")
EDIT_TIMEOUT_S = 300


def selections(tests: tuple[str, ...]) -> list[list[str]]:
    """Each test string as pytest arguments: "path::node" or "path -k expr"."""
    return [shlex.split(test) for test in tests]


def repo_files(root: Path) -> list[str]:
    """The files a clean clone would hold, plus untracked ones not ignored (work in progress)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=root, capture_output=True, check=True).stdout.decode()
        return [f for f in out.split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree minus caches
        skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
        return [str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(root).parts)]


def copy_repo(root: Path, dest: Path) -> None:
    for rel in repo_files(root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)


def stale(mutant: Mutant, root: Path) -> str | None:
    """Why the edit cannot be applied to `root`'s copy of its file, or None."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    count = path.read_text().count(mutant.original)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        return f"original text {where} in {mutant.file}: {mutant.original!r}"
    return None


def digits_of(copy: Path) -> Path:
    """Where the runner keeps the digits shards that every run of the copy reads."""
    return copy.parent / "digits"


def write_digits(copy: Path) -> None:
    """The digits shards, written once by the copy's own launch/make_shards.py (no edit
    touches it) for every pytest run of the copy (tests/conftest.py: DIGITS_ENV)."""
    subprocess.run([sys.executable, str(copy / "launch" / "make_shards.py"), "digits", "--out",
                    str(digits_of(copy)), "--overwrite", "--quiet"], cwd=copy, env=copy_env(copy),
                   check=True, capture_output=True)


def copy_env(copy: Path) -> dict[str, str]:
    """The environment of every test run: the copy first on PYTHONPATH (before the venv's
    editable install), no bytecode written (an edit of the same size within a second
    must not be served from a stale .pyc), wide lines (pytest's failure summary whole),
    the shared digits shards once written."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT]
    digits = {"IDDPM_TEST_DIGITS": str(digits_of(copy))} if digits_of(copy).is_dir() else {}
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy), *keep]),
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400",
            "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), **digits}


def run_pytest(copy: Path, args: list[str], basetemp: Path, timeout: float) -> tuple[int | None, str]:
    """pytest in the copy; (exit status or None on timeout, its output)."""
    cmd = [sys.executable, "-m", "pytest", *PYTEST, f"--basetemp={basetemp}", *args]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=copy_env(copy), capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, out
    return proc.returncode, proc.stdout + proc.stderr


def check_imports_copy(copy: Path) -> None:
    code = "import iddpm_ds; print(iddpm_ds.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=copy_env(copy),
                         capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"mutants: the copy's tests would import {out}, not the copy in {copy}")


# the copy works: real rank processes import the copy's iddpm_ds, read the shared digits
# shards (write_digits), train, save and exit (about 15 s); a spec test in-process
SMOKE = ("tests/test_rows_fast.py::test_preemption_signal_saves_and_exits_75",
         "tests/test_job_spec.py::test_exactly_one_batch_knob")
# a failure for one of these reasons says the copy cannot run the test, not that it caught
# the edit
ENVIRONMENT_ERRORS = ("ModuleNotFoundError", "ImportError")


def smoke(copy: Path, tmp: Path) -> bool:
    """The SMOKE tests pass on the unedited copy, so a failure on an edit is the edit's."""
    start = time.perf_counter()
    code, out = run_pytest(copy, list(SMOKE), tmp / "smoke", EDIT_TIMEOUT_S)
    if code != 0:
        print(f"SMOKE FAILED ({_status(code)}): {' '.join(SMOKE)}\n{out[-3000:]}", flush=True)
    print(f"smoke: {'the copy runs its tests' if code == 0 else 'FAILED'} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return code == 0


def baseline(copy: Path, mutants: list[Mutant], tmp: Path) -> bool:
    """Every listed test passes on the unedited copy (else a kill would mean nothing)."""
    start = time.perf_counter()
    ok = True
    for args in _distinct(mutants):
        code, out = run_pytest(copy, args, tmp / "baseline", EDIT_TIMEOUT_S)
        if code != 0:
            print(f"BASELINE FAILED ({_status(code)}): {' '.join(args)}\n{out[-3000:]}", flush=True)
            ok = False
    print(f"baseline: {'all listed tests pass' if ok else 'FAILED'} unedited "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return ok


def _distinct(mutants: list[Mutant]) -> list[list[str]]:
    """The listed selections in as few pytest runs as possible: every node id in one run
    (one start-up, one session fixture), each "-k" selection on its own."""
    nodes: list[str] = []
    separate: list[list[str]] = []
    for mutant in mutants:
        for args in selections(mutant.tests):
            if len(args) > 1:
                if args not in separate:
                    separate.append(args)
            elif args[0] not in nodes:
                nodes.append(args[0])
    return ([nodes] if nodes else []) + separate


def _status(code: int | None) -> str:
    return {None: "timeout", 0: "passed", 1: "failed", 2: "interrupted/collection error",
            3: "internal error", 4: "usage error (test not found?)",
            5: "no tests collected"}.get(code, f"exit {code}")


def _reason(out: str) -> str:
    """pytest's one-line failure summary ("FAILED node - AssertionError: ..."), shortened."""
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("FAILED ")]
    if not failed:
        return ""
    reason = failed[0][:240]
    if reason.rstrip().endswith("ProcessRaisedException:"):  # a rank raised: say what
        raised = [line for line in lines if line.startswith("E ") and line[1:].strip()]
        reason += raised[-1][1:].strip()[:200] if raised else ""
    return f"\n    {reason}"


def _failed_for_the_edit(out: str, args: list[str]) -> str | None:
    """Why a failing run (exit status 1) is no kill, or None: pytest must name a selected
    test FAILED (a fixture or set-up failure is an ERROR line instead), for a reason other
    than an import error (the copy, not the edit)."""
    lines = out.splitlines()
    failed = [line for line in lines if line.startswith("FAILED ")]
    if not failed:  # e.g. only "ERROR node - ..." lines: a fixture or set-up failed
        errors = [line for line in lines if line.startswith("ERROR ")]
        return "no test FAILED" + (f" ({errors[0][:240]})" if errors else "")
    if not any(line.split()[1].startswith(args[0].split("::")[0]) for line in failed):
        return f"the failure is not a selected test: {failed[0][:240]}"
    env = [line for line in lines if line.startswith("E ") and any(e in line for e in ENVIRONMENT_ERRORS)]
    if env:
        return f"the copy could not run it: {env[0][:240]}"
    return None


def _all_skipped(out: str) -> bool:
    """pytest's last line says only "N skipped in ..." (nothing ran, nothing passed)."""
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return "skipped" in last and "passed" not in last and "failed" not in last


def run_mutant(mutant: Mutant, copy: Path, tmp: Path) -> str:
    """Apply one edit to the copy, run its tests, restore the file; killed/SURVIVED/ERROR."""
    why = stale(mutant, copy)
    if why:
        return f"STALE ({why})"
    path = copy / mutant.file
    text = path.read_text()
    path.write_text(text.replace(mutant.original, mutant.replacement))
    ran = False
    try:
        for args in selections(mutant.tests):
            code, out = run_pytest(copy, args, tmp / mutant.name, EDIT_TIMEOUT_S)
            if code is None:  # the test hung: the break was seen
                return "killed (timeout)" + _reason(out)
            if code == 1:  # a test failed: the break was seen, if the failure is the test's
                why_not = _failed_for_the_edit(out, args)
                if why_not:
                    return f"ERROR ({why_not}: {' '.join(args)})\n{out[-3000:]}"
                return "killed" + _reason(out)
            if code != 0:
                return f"ERROR ({_status(code)}: {' '.join(args)})\n{out[-3000:]}"
            ran = ran or not _all_skipped(out)  # a GPU-only test skips on a CPU machine
        return "SURVIVED" if ran else "skipped (its tests skip on this machine)"
    finally:
        path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these entries (default: all)")
    parser.add_argument("--list", action="store_true", help="print the entries and exit")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the listed tests unedited first (the main suite does)")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:32} {m.row:34} {m.file}  ->  {'; '.join(m.tests)}")
        return 0
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown entries: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="iddpm-mutants-") as tmp_dir:
        tmp = Path(tmp_dir)
        copy = tmp / "repo"
        copy_repo(ROOT, copy)
        check_imports_copy(copy)
        write_digits(copy)
        failed = not smoke(copy, tmp) or (args.baseline and not baseline(copy, chosen, tmp))
        verdicts: dict[str, int] = {}
        for mutant in chosen:
            t0 = time.perf_counter()
            result = run_mutant(mutant, copy, tmp)
            head, _, detail = result.partition("\n")
            print(f"{mutant.name:32} {head:10} {time.perf_counter() - t0:6.1f} s"
                  f"   [{mutant.row}] {mutant.file}", flush=True)
            if detail:
                print(detail, flush=True)
            verdict = head.split()[0]
            verdicts[verdict] = verdicts.get(verdict, 0) + 1
            failed = failed or verdict not in ("killed", "skipped")
    counts = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    print(f"mutants: {len(chosen)} edits ({counts}): {'FAILED' if failed else 'ok'}, "
          f"{time.perf_counter() - start:.0f} s in all", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
