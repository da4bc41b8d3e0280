"""The image sampler and weight loading: the loops are the diffusion's own with per-image
noise, per-image determinism (batch size, global RNG, 1 vs 2 real ranks), weights from run
dirs and reference-format files, the npz layout, the error messages for bad input (library
and command line), and the command line's stdout (one JSON object, nothing else)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iddpm_ds import DiffusionSpec, ModelSpec, build_diffusion, build_model, specs_from_flags
from iddpm_ds.image_sampler import (PerImageNoise, SampleOptions, check_labels, image_seeds,
                                    rank_batches, sample, sample_batch, write_samples)
from iddpm_ds.weights import (SamplingError, WeightsChoice, load_from_file, load_from_run,
                              load_weights, respaced, specs_from_job_file,
                              specs_from_reference_flags)
from iddpm_ds.spec.data import DataSpec
from iddpm_ds.spec.job import JobSpec, OutputSpec, TrainSpec, dump_job
from iddpm_ds.train import checkpoint as ckpt
from mp_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
KEY_FILE = Path(__file__).resolve().parent / "data" / "unet_state_dict_keys.txt"

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
            attention_resolutions=(4,), learn_sigma=True)
TINY_FLAGS = "--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 " \
             "--attention_resolutions 4 --learn_sigma True --diffusion_steps 40"


def tiny_specs(**model: object) -> tuple[ModelSpec, DiffusionSpec]:
    return (ModelSpec(**{**TINY, **model}),
            DiffusionSpec(learn_sigma=True, diffusion_steps=40, noise_schedule="cosine"))


def tiny_model(model_spec: ModelSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(model_spec).eval()


def make_run(run_dir: Path, model_spec: ModelSpec, diffusion_spec: DiffusionSpec,
             rates: tuple[float, ...] = (0.9999, 0.999), steps: tuple[int, ...] = (10,),
             data: DataSpec = DataSpec()) -> Path:
    """A run dir in the trainer's checkpoint layout, with distinct weights per file."""
    job = JobSpec(model=model_spec, diffusion=diffusion_spec, data=data,
                  train=TrainSpec(batch_size=2, ema_rate=rates, sample_respacing="ddim10",
                                  eval_respacing="10"), output=OutputSpec(run_dir=run_dir))
    ckpt_dir = run_dir / "checkpoints"
    for step in steps:
        tag_dir = ckpt_dir / ckpt.tag_for(step)
        tag_dir.mkdir(parents=True)
        torch.save(tiny_model(model_spec, seed=step).state_dict(),
                   tag_dir / ckpt.export_name_model(step))
        for i, rate in enumerate(rates):
            torch.save(tiny_model(model_spec, seed=step * 100 + i).state_dict(),
                       tag_dir / ckpt.export_name_ema(rate, step))
        torch.save({"step": step, "ema_rates": list(rates), "spec": job.model_dump(mode="json")},
                   tag_dir / "trainer_state.pt")
        ckpt.mark_complete(ckpt_dir, ckpt.tag_for(step), {"step": step}, keep=10)
    (run_dir / "job.yaml").write_text(dump_job(job))
    return run_dir


# ------------------------------------------------------------ the diffusion's own loops
@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 0.7)])
def test_batch_is_the_diffusion_loop_with_per_image_noise(use_ddim: bool, eta: float) -> None:
    model_spec, diffusion_spec = tiny_specs()
    diffusion = respaced(diffusion_spec, "ddim6" if use_ddim else "6")
    model = tiny_model(model_spec)
    opts = SampleOptions(num_samples=3, batch_size=3, use_ddim=use_ddim, eta=eta, seed=4,
                         progress=False)
    got, _ = sample_batch(model, diffusion, model_spec, opts, range(3), CPU)
    seeds = image_seeds(4, range(3))
    x_T = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s[1]))
                       for s in seeds])
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    kwargs = {"eta": eta} if use_ddim else {}
    noise_fn = PerImageNoise([s[2] for s in seeds], CPU)
    expected = loop(model, x_T.shape, noise=x_T, noise_fn=noise_fn, **kwargs)
    assert torch.equal(got, expected)


def test_per_image_noise_depends_on_the_image_not_its_batch() -> None:
    like = torch.empty(5, 3, 8, 8)
    seeds = [s[2] for s in image_seeds(9, range(5))]
    whole = PerImageNoise(seeds, CPU)
    first, second = whole(like), whole(like)                                 # two steps
    part = PerImageNoise(seeds[2:4], CPU)
    assert torch.equal(part(like[2:4]), first[2:4]) and torch.equal(part(like[2:4]), second[2:4])
    assert not torch.equal(first, second) and not torch.equal(first[0], first[1])


def test_ddim_eta0_loop_equals_ddim_sample_loop_from_the_same_x_T() -> None:
    model_spec, diffusion_spec = tiny_specs()
    diffusion = respaced(diffusion_spec, "ddim8")
    model = tiny_model(model_spec)
    opts = SampleOptions(num_samples=3, batch_size=3, use_ddim=True, seed=4, progress=False)
    got, _ = sample_batch(model, diffusion, model_spec, opts, range(3), CPU)
    # x_T of image i is the first draw of its x_T generator: rebuild it and run the reference loop
    x_T = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s[1]))
                       for s in image_seeds(4, range(3))])
    expected = diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T, eta=0.0)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------- determinism
def test_ddim_eta0_is_deterministic_and_independent_of_global_rng() -> None:
    model_spec, diffusion_spec = tiny_specs()
    model, diffusion = tiny_model(model_spec), respaced(diffusion_spec, "ddim6")
    opts = SampleOptions(num_samples=4, batch_size=4, use_ddim=True, seed=11, progress=False)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = sample(model, diffusion, model_spec, opts, CPU).images
    assert torch.equal(torch.get_rng_state(), state), "sampling must not draw from the global RNG"
    torch.manual_seed(2)
    second = sample(model, diffusion, model_spec, opts, CPU).images
    other = sample(model, diffusion, model_spec, SampleOptions(
        num_samples=4, batch_size=4, use_ddim=True, seed=12, progress=False), CPU).images
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)
    assert len({first[i].tobytes() for i in range(4)}) == 4  # each image its own noise


@pytest.mark.parametrize("use_ddim,eta", [(False, 0.0), (True, 1.0)])
def test_images_do_not_depend_on_batch_size(use_ddim: bool, eta: float) -> None:
    model_spec, diffusion_spec = tiny_specs(class_cond=True, num_classes=5)
    model, diffusion = tiny_model(model_spec), respaced(diffusion_spec, "6")
    results = [sample(model, diffusion, model_spec, SampleOptions(
        num_samples=5, batch_size=b, use_ddim=use_ddim, eta=eta, seed=3, progress=False), CPU)
        for b in (1, 2, 5)]
    for other in results[1:]:
        assert np.array_equal(other.labels, results[0].labels)
        # per-image results agree up to float rounding of batched convolutions
        assert np.abs(other.images.astype(int) - results[0].images).max() <= 1
    assert results[0].labels.dtype == np.int64 and results[0].labels.shape == (5,)
    assert ((0 <= results[0].labels) & (results[0].labels < 5)).all()


def test_rank_batches_cover_every_image_once() -> None:
    for n, b, world in [(5, 2, 2), (7, 3, 3), (1, 4, 2), (16, 4, 4)]:
        seen = sorted(i for r in range(world)
                      for batch in rank_batches(n, b, r, world) for i in batch)
        assert seen == list(range(n))
    assert rank_batches(5, 2, 1, 2) == [range(2, 4)]


def _sample_on_ranks(rank: int, world_size: int, run_dir: str, options: list[dict]) -> list:
    loaded = load_weights(WeightsChoice(run_dir=Path(run_dir), ema_rate=0.999))
    out = []
    for kw in options:
        respacing = kw.pop("respacing")
        result = sample(loaded.model, respaced(loaded.diffusion_spec, respacing),
                        loaded.model_spec, SampleOptions(progress=False, **kw), CPU)
        out.append((result.images, result.labels))
    return out


@pytest.mark.slow
def test_same_seed_same_images_on_one_and_two_ranks(tmp_path: Path) -> None:
    model_spec, diffusion_spec = tiny_specs(class_cond=True, num_classes=10)
    run_dir = make_run(tmp_path / "run", model_spec, diffusion_spec)
    # 5 images in batches of 2: rank 1 idles in the second round; 7 in batches of 2: both work
    options = [dict(num_samples=5, batch_size=2, seed=9, respacing="5"),
               dict(num_samples=7, batch_size=2, seed=9, respacing="ddim5", use_ddim=True,
                    eta=0.5, class_labels=(3, 1))]
    single = _sample_on_ranks(0, 1, str(run_dir), [dict(o) for o in options])
    ranks = run_ranks(_sample_on_ranks, 2, str(run_dir), [dict(o) for o in options])
    assert ranks[1] == [(None, None), (None, None)]
    for (images, labels), (images1, labels1) in zip(ranks[0], single):
        assert images.shape == images1.shape and images.dtype == np.uint8
        assert np.array_equal(images, images1)
        assert np.array_equal(labels, labels1)
    assert ranks[0][1][1].tolist() == [3, 1, 3, 1, 3, 1, 3]


# ------------------------------------------------------------------------------ loading
def test_load_from_run_picks_latest_step_and_rate(tmp_path: Path) -> None:
    model_spec, diffusion_spec = tiny_specs()
    run_dir = make_run(tmp_path / "run", model_spec, diffusion_spec, steps=(5, 10))
    default = load_from_run(run_dir)
    assert default.step == 10 and default.weights == "ema_0.9999"  # the job's first rate
    assert default.model_spec == model_spec and default.diffusion_spec == diffusion_spec
    chosen = load_from_run(run_dir, step=5, ema_rate=0.999)
    raw = load_from_run(run_dir, step=5, weights="model")
    assert chosen.source.name == "ema_0.999_000005.pt" and raw.source.name == "model000005.pt"
    expected = tiny_model(model_spec, seed=5 * 100 + 1).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in chosen.model.state_dict().items())
    assert not chosen.model.training


def test_reference_format_state_dict_loads_and_samples(tmp_path: Path) -> None:
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                 attention_resolutions="4", learn_sigma=True, class_cond=True,
                 diffusion_steps=40, noise_schedule="cosine")
    model_spec, diffusion_spec = specs_from_flags(flags)
    reference = tiny_model(model_spec, seed=3)
    torch.save(reference.state_dict(), tmp_path / "ema_0.9999_000100.pt")  # an OrderedDict
    loaded = load_from_file(tmp_path / "ema_0.9999_000100.pt", model_spec, diffusion_spec)
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
    result = sample(loaded.model, respaced(diffusion_spec, "ddim4"), model_spec, SampleOptions(
        num_samples=3, batch_size=3, use_ddim=True, class_labels=(7,), progress=False), CPU)
    assert result.images.shape == (3, 8, 8, 3) and result.labels.tolist() == [7, 7, 7]
    # the reference's flag string form gives the same specs
    flag_specs = specs_from_reference_flags([TINY_FLAGS + " --class_cond True",
                                             "noise_schedule=cosine"])
    assert flag_specs == (model_spec, diffusion_spec)


def test_state_dict_with_the_reference_key_file_loads(tmp_path: Path) -> None:
    """A state dict made from the reference's own key/shape list (not from our UNet)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for line in KEY_FILE.read_text().splitlines():
        if line.strip():
            key, shape = line.split(" ", 1)
            dims = tuple(int(d) for d in shape.strip("() ").split(",") if d.strip())
            state[key] = torch.randn(dims, generator=gen) * 0.05
    torch.save(state, tmp_path / "model.pt")
    model_spec, diffusion_spec = specs_from_reference_flags([
        "--image_size 32 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16,8 "
        "--num_heads 4 --learn_sigma True --use_scale_shift_norm True"])
    loaded = load_from_file(tmp_path / "model.pt", model_spec, diffusion_spec)
    result = sample(loaded.model, respaced(diffusion_spec, "ddim2"), model_spec, SampleOptions(
        num_samples=1, batch_size=1, use_ddim=True, progress=False), CPU)
    assert result.images.shape == (1, 32, 32, 3)


def test_job_file_specs_share_learn_sigma(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: {image_size: 8, channel_mult: [1, 2], attention_resolutions: [4], "
                    "num_channels: 32, learn_sigma: true}\ndiffusion: {diffusion_steps: 40}\n")
    model_spec, diffusion_spec = specs_from_job_file(path)
    assert model_spec.learn_sigma and diffusion_spec.learn_sigma
    path.write_text("model: {learn_sigma: true}\ndiffusion: {learn_sigma: false}\n")
    with pytest.raises(SamplingError, match="contradicts"):
        specs_from_job_file(path)
    path.write_text("model: {diffusion_steps: 40}\n")  # strict sections, as in a JobSpec
    with pytest.raises(SamplingError, match="invalid model/diffusion section: diffusion_steps"):
        specs_from_job_file(path)


# ------------------------------------------------------------------------------- output
@pytest.mark.parametrize("class_cond", [True, False])
def test_npz_layout_is_the_references(tmp_path: Path, class_cond: bool) -> None:
    model_spec, diffusion_spec = tiny_specs(class_cond=class_cond, num_classes=4)
    model = tiny_model(model_spec)
    result = sample(model, respaced(diffusion_spec, "3"), model_spec, SampleOptions(
        num_samples=5, batch_size=2, seed=1, progress=False), CPU)
    npz, png = write_samples(result.images, result.labels, tmp_path)
    assert npz.name == "samples_5x8x8x3.npz" and png.is_file()
    with np.load(npz) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
        assert np.array_equal(data["arr_0"], result.images)
        if class_cond:
            assert sorted(data.files) == ["arr_0", "arr_1"]
            assert data["arr_1"].dtype == np.int64 and data["arr_1"].shape == (5,)
        else:
            assert data.files == ["arr_0"]
    # uint8 is the reference's ((x + 1) * 127.5).clamp(0, 255) truncation of the samples
    x, _ = sample_batch(model, respaced(diffusion_spec, "3"), model_spec, SampleOptions(
        num_samples=5, seed=1, progress=False), range(2), CPU)
    expected = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(result.images[:2], expected)


# -------------------------------------------------------------------------------- errors
def test_mismatched_spec_names_the_keys(tmp_path: Path) -> None:
    model_spec, diffusion_spec = tiny_specs()
    torch.save(tiny_model(model_spec).state_dict(), tmp_path / "w.pt")
    with pytest.raises(SamplingError, match=r"out\.2\.weight \(6, 32, 3, 3\) vs \(3, 32, 3, 3\)"):
        load_from_file(tmp_path / "w.pt", ModelSpec(**{**TINY, "learn_sigma": False}),
                       diffusion_spec)
    with pytest.raises(SamplingError, match=r"1 missing keys: label_emb\.weight"):
        load_from_file(tmp_path / "w.pt", ModelSpec(**{**TINY, "class_cond": True}), diffusion_spec)
    with pytest.raises(SamplingError, match="give the model spec"):
        load_from_file(tmp_path / "w.pt")


def test_unknown_ema_rate_and_step_list_what_exists(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", *tiny_specs(), steps=(5, 10))
    with pytest.raises(SamplingError, match=r"rate 0\.5 .* available rates: 0\.999, 0\.9999"):
        load_from_run(run_dir, ema_rate=0.5)
    with pytest.raises(SamplingError, match=r"step 7; available steps: \[5, 10\]"):
        load_from_run(run_dir, step=7)
    with pytest.raises(SamplingError, match="does not exist"):
        load_from_run(tmp_path / "nope")


def test_bad_respacing_and_labels_are_clear() -> None:
    model_spec, diffusion_spec = tiny_specs(class_cond=True, num_classes=10)
    with pytest.raises(SamplingError, match=r"'ddim17' cannot be used with diffusion_steps=40: "
                                            r".*exactly 17 steps"):
        respaced(diffusion_spec, "ddim17")
    with pytest.raises(SamplingError, match="cannot take 50 steps"):
        respaced(diffusion_spec, "50")
    with pytest.raises(SamplingError,
                       match=r"\[10\] out of range.*num_classes=10 \(labels 0\.\.9\)"):
        check_labels(model_spec, (3, 10))
    with pytest.raises(SamplingError, match="not class-conditional"):
        check_labels(tiny_specs()[0], (1,))
    with pytest.raises(SamplingError, match="DDIM only"):
        SampleOptions(num_samples=1, eta=0.5)


# --------------------------------------------------------------------------- command line
def _cli(script: str, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "launch" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def _sample_on_one_and_two_ranks(common: list[str], out_dir: Path) -> tuple[dict, dict]:
    """`iddpm-sample` with the same arguments in 1 process and under torchrun with 2, into
    out_dir/one.npz and out_dir/two.npz; returns both JSON reports."""
    one = _cli("sample.py", *common, "--out", str(out_dir / "one.npz"))
    two = _cli("sample.py", *common, "--out", str(out_dir / "two.npz"),
               launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", "2"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    return json.loads(one.stdout), json.loads(two.stdout)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_cli_sample_writes_npz_and_grid_and_reports_speed(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", *tiny_specs(class_cond=True, num_classes=3))
    proc = _cli("sample.py", "--run-dir", str(run_dir), "--num-samples", "5", "--batch-size", "2",
                "--respacing", "ddim4", "--class-labels", "2,0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)  # the whole stdout: DeepSpeed's lines went to stderr
    assert report["sampler"] == "ddim" and report["steps"] == 4 and report["img_per_s"] > 0
    assert report["weights"] == "ema_0.9999" and report["step"] == 10
    with np.load(report["npz"]) as data:
        assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_1"].tolist() == [2, 0, 2, 0, 2]
    assert Path(report["grid"]).is_file()
    assert Path(report["npz"]).parent.parent == run_dir / "samples"


def test_json_stdout_sends_everything_else_to_stderr() -> None:
    """The CLIs' stdout contract, against writers like DeepSpeed's: a logger bound to
    sys.stdout at import, print, C-level writes to fd 1, and child processes."""
    code = """if True:
        import json, logging, os, subprocess, sys
        from json_stdout import json_stdout
        print("before")
        with json_stdout() as out:
            handler = logging.StreamHandler(stream=sys.stdout)  # as deepspeed.utils.logging
            logging.getLogger("x").addHandler(handler)
            logging.getLogger("x").warning("a logger line")
            print("a print")
            os.write(1, b"an fd-1 write\\n")
            subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
            print(json.dumps({"ok": 1}), file=out, flush=True)
        print("after")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT / "launch", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == 'before\n{"ok": 1}\nafter\n'
    for line in ("a logger line", "a print", "an fd-1 write", "a child process"):
        assert line in proc.stderr.splitlines()


def test_cli_sample_bad_input_exits_2_with_one_message(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", *tiny_specs(class_cond=True, num_classes=3))
    proc = _cli("sample.py", "--run-dir", str(run_dir), "--ema-rate", "0.5", "--class-labels", "1")
    assert proc.returncode == 2 and proc.stdout == ""
    assert _errors(proc) == ["error: no EMA weights at rate 0.5 in "
                             f"{run_dir}/checkpoints/step0000010; available rates: 0.999, 0.9999 "
                             "(or use the raw weights: weights 'model')"]
    torch.save(tiny_model(tiny_specs()[0]).state_dict(), tmp_path / "ref.pt")
    proc = _cli("sample.py", "--checkpoint", str(tmp_path / "ref.pt"), "--model-flags",
                TINY_FLAGS.replace("--learn_sigma True", "--learn_sigma False"))
    assert proc.returncode == 2 and len(_errors(proc)) == 1
    assert "out.2.weight (6, 32, 3, 3) vs (3, 32, 3, 3)" in _errors(proc)[0]


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", *tiny_specs(class_cond=True, num_classes=6))
    common = ["--run-dir", str(run_dir), "--num-samples", "5", "--batch-size", "2",
              "--respacing", "5", "--seed", "4", "--no-progress"]
    one, two = _sample_on_one_and_two_ranks(common, tmp_path)
    assert two["world_size"] == 2 and one["world_size"] == 1
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["arr_0"].shape == (5, 8, 8, 3) and np.array_equal(a["arr_0"], b["arr_0"])
        assert np.array_equal(a["arr_1"], b["arr_1"])


def test_default_ema_rate_is_the_jobs_first_in_a_trainer_layout(tmp_path: Path) -> None:
    """The trainer keeps the resolved spec under trainer_state["meta"]: the default EMA
    weights are then still the job's first rate, not the smallest one on disk."""
    run_dir = make_run(tmp_path / "run", *tiny_specs(), rates=(0.9999, 0.999))
    state_path = run_dir / "checkpoints" / ckpt.tag_for(10) / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({"meta": {"spec": state["spec"]}}, state_path)
    ckpt.mark_complete(state_path.parents[1], ckpt.tag_for(10), {"step": 10}, keep=10)  # its new size
    assert load_weights(WeightsChoice(run_dir=run_dir)).weights == "ema_0.9999"
