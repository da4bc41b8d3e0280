"""Data faults: the corrupt-sample limit (data.max_corrupt_fraction over data.corrupt_window),
labels outside [0, num_classes), the pre-flight check of `launch/train.py --check`
(check_sources), source folders, and both as the user sees them: exit 2 and one line."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from iddpm_ds.data import (DataError, EmptySourceError, ShardNotFoundError, TooManyCorruptError,
                           build_train_stream, check_sources)
from iddpm_ds.data.shards import WriteOptions, array_items, write_items
from iddpm_ds.spec.data import DataSpec
from test_data_helpers import id_shards
from train_utils import ROOT, tiny_job, train_cmd


def _stream(spec: DataSpec, num_classes: int | None = None, batch: int = 4, class_cond=True):
    return build_train_stream(spec, image_size=8, class_cond=class_cond, batch_size=batch,
                              rank=0, world_size=1, seed=0, num_classes=num_classes)


def _labelled(folder: Path, n: int = 40, classes: int = 10, eval_count: int = 10) -> Path:
    """An iddpm-shards folder of n 16 px images with labels i % classes; returns its index."""
    pixels = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    write_items(array_items(pixels, np.arange(n) % classes), folder,
                WriteOptions(shard_size=8, eval_count=eval_count, progress=False), "test")
    return folder / "index.json"


def _events(err: str, name: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if f'"{name}"' in line]


# ------------------------------------------------------------------ the corrupt-sample limit
def test_mostly_corrupt_shards_abort_naming_them_through_loader_workers(tmp_path: Path) -> None:
    # s-001 and s-002 hold no image at all (a lost mount reads like this): 40 of 60 samples
    shards = id_shards(tmp_path, [20, 20, 20], corrupt=range(20, 60))
    spec = DataSpec(shards=shards, num_workers=2, max_corrupt_fraction=0.3, corrupt_window=20)
    stream = _stream(spec)
    with pytest.raises(TooManyCorruptError) as raised:
        for _ in zip(range(15), stream):  # one epoch is 15 batches
            pass
    stream.close()
    message = str(raised.value)
    assert isinstance(raised.value, DataError) and "\n" not in message
    assert "data.max_corrupt_fraction=0.3" in message and "data.corrupt_window=20" in message
    assert ("s-001.tar" in message or "s-002.tar" in message) and "s-000.tar" not in message


def test_a_fraction_of_one_turns_the_limit_off(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [20, 20, 20], corrupt=range(20, 60))
    spec = DataSpec(shards=shards, num_workers=0, max_corrupt_fraction=1, corrupt_window=4)
    stream = _stream(spec)
    batches = [y for _, (_, y) in zip(range(30), stream)]  # two whole epochs
    assert len(batches) == 30 and stream.stats()["corrupt_samples"] == 80


def test_the_limit_counts_a_sliding_window_not_the_whole_run(tmp_path: Path) -> None:
    # 3 corrupt samples in each epoch of 60 (ids 1, 30, 59), no shuffling: 5 consecutive
    # batches never hold more than 2 = 0.1 x 20, though the run's total passes 2 at once
    spec = DataSpec(shards=id_shards(tmp_path, [30, 30], corrupt=(1, 30, 59)), num_workers=0,
                    shuffle_shards=False, shuffle_buffer=0, max_corrupt_fraction=0.1,
                    corrupt_window=20)
    stream = _stream(spec)
    assert len([y for _, (_, y) in zip(range(45), stream)]) == 45
    assert stream.stats()["corrupt_samples"] == 9
    # the same share in a burst (ids 1, 2, 3) passes it in the first batch
    burst = spec.model_copy(update={"shards": id_shards(tmp_path, [30, 30], prefix="b",
                                                        corrupt=(1, 2, 3))})
    with pytest.raises(TooManyCorruptError, match="3 of the last 4 training samples of rank 0"):
        next(iter(_stream(burst)))


def test_labels_outside_num_classes_are_corrupt_and_replaced(tmp_path: Path, capfd) -> None:
    shards = id_shards(tmp_path, [12])  # labels 0..11
    stream = _stream(DataSpec(shards=shards, num_workers=0, shuffle_buffer=0), num_classes=10)
    labels = [int(v) for _, (_, c) in zip(range(3), stream) for v in c["y"]]
    assert len(labels) == 12 and max(labels) < 10 and stream.stats()["corrupt_samples"] == 2
    reasons = {e["key"]: e["reason"] for e in _events(capfd.readouterr().err,
                                                     "data_corrupt_sample")}
    assert set(reasons) == {"000010", "000011"} and "outside [0, 10)" in reasons["000010"]


def test_labels_outside_num_classes_abort_past_the_fraction(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [40])  # labels 0..39: with 4 classes, 36 of 40 are corrupt
    spec = DataSpec(shards=shards, num_workers=0, max_corrupt_fraction=0.5, corrupt_window=8)
    stream = _stream(spec, num_classes=4)
    with pytest.raises(TooManyCorruptError, match=r"s-000\.tar \(\d+\)"):
        for _ in zip(range(10), stream):
            pass


def test_an_index_naming_more_classes_than_the_model_has_is_refused(tmp_path: Path) -> None:
    index = _labelled(tmp_path / "d", classes=10)
    with pytest.raises(DataError, match="data.shards: .* 10 classes .* model.num_classes is 8"):
        _stream(DataSpec(shards=str(index)), num_classes=8)
    _stream(DataSpec(shards=str(index)), num_classes=8, class_cond=False)  # labels unused


# ------------------------------------------------------------------ pre-flight check
def test_check_sources_opens_every_source(tmp_path: Path) -> None:
    index = _labelled(tmp_path / "d")
    spec = DataSpec(shards=f"{index}#train", eval_shards=f"{index}#eval")
    lines = check_sources(spec, image_size=16, class_cond=True, num_classes=10)
    assert len(lines) == 2 and lines[0].startswith("data.shards: 30 samples in 4 shards")
    assert lines[1].startswith("data.eval_shards: 10 samples in 2 shards") and "label" in lines[1]
    with pytest.raises(ShardNotFoundError, match=r"^data\.eval_shards: .*missing"):
        check_sources(spec.model_copy(update={"eval_shards": str(tmp_path / "e-{0..1}.tar")}),
                      image_size=16, class_cond=True, num_classes=10)
    with pytest.raises(DataError, match="model.num_classes is 5"):
        check_sources(spec, image_size=16, class_cond=True, num_classes=5)


def test_check_sources_decodes_the_first_sample_and_its_label(tmp_path: Path) -> None:
    bad_image = id_shards(tmp_path, [4], prefix="a", corrupt=(0,))
    with pytest.raises(DataError, match=r"data.shards: the first sample of .*a-000\.tar is "
                                        r"unusable: undecodable image"):
        check_sources(DataSpec(shards=bad_image), image_size=8, class_cond=True)
    late = id_shards(tmp_path, [4, 4], prefix="c")  # the second shard starts at label 4
    with pytest.raises(DataError, match=r"label 4 outside \[0, 4\)"):
        check_sources(DataSpec(shards=late[1]), image_size=8, class_cond=True, num_classes=4)
    lines = check_sources(DataSpec(shards=late[1]), image_size=8, class_cond=True, num_classes=5)
    assert lines == [f"data.shards: 4 samples in 1 shards; first sample {late[1]} key 000004 "
                     "decodes, label 4"]


def test_a_folder_as_source_says_what_to_name_instead(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptySourceError) as raised:
        _stream(DataSpec(shards=str(empty)))
    message = str(raised.value)
    assert message.startswith("data.shards: no .tar shards in folder") and "iddpm-shards" in message
    assert "missing" not in message
    index = _labelled(tmp_path / "written")
    with pytest.raises(EmptySourceError, match=f"name its index file instead: {index}"):
        _stream(DataSpec(shards=str(index.parent)))
    loose = tmp_path / "loose"
    loose.mkdir()
    id_shards(loose, [3, 3])
    with pytest.raises(EmptySourceError, match=r"folder of 2 \.tar files .*iddpm-shards index"):
        _stream(DataSpec(shards=str(loose)))


# ------------------------------------------------------------------ as the user sees them
def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(train_cmd(1, *args, launcher="python"), capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_check_opens_the_data(tmp_path: Path) -> None:
    index = _labelled(tmp_path / "d")
    good = _cli("--job", str(tiny_job(tmp_path / "good", index.parent)), "--check")
    assert good.returncode == 0, good.stderr[-3000:]
    assert "# data.shards: 30 samples in 4 shards" in good.stdout
    assert "# data.eval_shards: 10 samples" in good.stdout
    job = tiny_job(tmp_path / "gone", tmp_path / "nowhere")
    gone = _cli("--job", str(job), "--check")
    assert gone.returncode == 2 and "# resolved job spec" not in gone.stdout
    assert _error_lines(gone) == [f"error: data.shards: index file "
                                  f"'{tmp_path}/nowhere/index.json' does not exist (write one "
                                  "with iddpm-shards)"]
    few = _cli("--job", str(tiny_job(tmp_path / "few", index.parent, **{"model.num_classes": 3})),
               "--check")
    lines = _error_lines(few)
    assert few.returncode == 2 and len(lines) == 1 and "model.num_classes is 3" in lines[0]


@pytest.mark.slow
def test_training_on_mostly_corrupt_data_exits_2_with_one_line(tmp_path: Path) -> None:
    # shard 1 of 2 is all unreadable images; two loader workers decode them
    shards = id_shards(tmp_path, [16, 48], corrupt=range(16, 64))
    job = tiny_job(tmp_path, tmp_path, **{
        "model.class_cond": False, "train.eval_interval": 0,
        "data.shards": shards, "data.eval_shards": None, "data.num_workers": 2,
        "data.max_corrupt_fraction": 0.3, "data.corrupt_window": 32})
    proc = _cli("--job", str(job), timeout=600)
    lines = _error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: data: ") and "s-001.tar" in lines[0]
    assert "data.max_corrupt_fraction=0.3" in lines[0]
