"""Data module, single process: preprocessing vs the reference algorithm, corrupt input,
source errors, the pipe opt-in, the data-position arithmetic and the shard writer."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from iddpm_ds.data import (AllCorruptError, EmptySourceError, PipeNotAllowedError,
                           ShardNotFoundError, build_eval_stream, build_train_stream)
from iddpm_ds.data.position import (Layout, RankPlan, replay,
                                    shard_pieces, shard_order)
from iddpm_ds.data.samples import read_pieces
from iddpm_ds.data.shards import (Item, OutputExistsError, WriteOptions, array_items, folder_items,
                                  write_items)
from iddpm_ds.spec.data import DataSpec
from iddpm_ds.testing import reference_preprocess, reference_scale
from test_data_helpers import first_difference, id_shards, png_bytes, resume_chain, write_tar


def reference(data: bytes, size: int) -> np.ndarray:
    """What the reference loader yields for these encoded bytes: float32 [C, H, W]."""
    return reference_scale(reference_preprocess(Image.open(io.BytesIO(data)), size))


def _encoded(rng: np.random.Generator, width: int, height: int, kind: str) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[: height // 2] //= 3  # some structure so resampling differences would show
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    if kind == "jpg":
        image.save(buf, format="JPEG", quality=90)
    elif kind == "gif":
        image.convert("P").save(buf, format="GIF")
    elif kind == "L":
        image.convert("L").save(buf, format="PNG")
    elif kind == "RGBA":
        image.putalpha(128)
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


ODD_IMAGES = [(37, 53, "png"), (130, 67, "jpg"), (201, 200, "gif"), (65, 129, "L"),
              (33, 33, "RGBA"), (16, 40, "png"), (255, 97, "jpg")]


def _stream(spec: DataSpec, size: int = 8, batch: int = 4, world: int = 1, rank: int = 0,
            seed: int = 0, class_cond: bool = True):
    return build_train_stream(spec, image_size=size, class_cond=class_cond, batch_size=batch,
                              rank=rank, world_size=world, seed=seed)


def test_preprocessing_matches_reference_on_odd_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    encoded = [_encoded(rng, w, h, kind) for w, h, kind in ODD_IMAGES]
    ext = {"jpg": "jpg", "gif": "gif"}
    samples = [(f"{i:04d}", {ext.get(k, "png"): data, "cls": str(i).encode()})
               for i, ((_, _, k), data) in enumerate(zip(ODD_IMAGES, encoded))]
    shard = write_tar(tmp_path / "odd.tar", samples)
    for size in (16, 32):
        spec = DataSpec(shards=str(shard), num_workers=0, shuffle_buffer=0)
        stream = _stream(spec, size=size, batch=len(ODD_IMAGES))
        x, cond = next(iter(stream))
        assert x.dtype == torch.float32 and x.shape == (len(ODD_IMAGES), 3, size, size)
        for row, label in enumerate(cond["y"].tolist()):
            expected = reference(encoded[label], size)
            np.testing.assert_array_equal(x[row].numpy(), expected)  # bit-identical
        assert stream.stats()["corrupt_samples"] == 0


def test_random_flip_mirrors_some_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    encoded = [_encoded(rng, 20, 24, "png") for _ in range(32)]
    shard = write_tar(tmp_path / "f.tar", [(f"{i:04d}", {"png": d, "cls": str(i).encode()})
                                           for i, d in enumerate(encoded)])
    spec = DataSpec(shards=str(shard), num_workers=0, random_flip=True)
    stream = _stream(spec, size=16, batch=32)
    x, cond = next(iter(stream))
    flipped = 0
    for row, label in enumerate(cond["y"].tolist()):
        ref = reference(encoded[label], 16)
        same = np.array_equal(x[row].numpy(), ref)
        mirrored = np.array_equal(x[row].numpy(), ref[:, :, ::-1])
        assert same or mirrored
        flipped += mirrored and not same
    assert 4 <= flipped <= 28


def test_corrupt_samples_are_logged_counted_and_replaced(tmp_path: Path, capfd) -> None:
    good = png_bytes(np.full((8, 8, 3), 7, dtype=np.uint8))
    samples = [(f"{i:04d}", {"png": good, "cls": str(i).encode()}) for i in range(12)]
    samples[3] = ("0003", {"png": b"not an image at all", "cls": b"3"})
    samples[5] = ("0005", {"png": good})  # missing label
    samples[8] = ("0008", {"png": good[: len(good) // 2], "cls": b"8"})  # truncated PNG
    shard = write_tar(tmp_path / "c.tar", samples)
    stream = _stream(DataSpec(shards=str(shard), num_workers=0, shuffle_buffer=0), batch=4)
    batches = [next(iter(stream)) for _ in range(3)]
    assert all(x.shape[0] == 4 for x, _ in batches)
    assert stream.stats()["corrupt_samples"] == 3
    labels = sorted(int(v) for _, c in batches for v in c["y"])
    assert not {3, 5, 8} & set(labels) and len(labels) == 12  # replaced by earlier good ones
    err = capfd.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if '"data_corrupt_sample"' in line]
    expected = {(k, str(shard)) for k in ("0003", "0005", "0008")}
    assert {(e["key"], e["shard"]) for e in events} == expected
    assert any("missing label" in e["reason"] for e in events)


def test_truncated_tar_counts_missing_samples_and_goes_on(tmp_path: Path, capfd) -> None:
    whole = id_shards(tmp_path, [10, 10])
    raw = Path(whole[0]).read_bytes()
    Path(whole[0]).write_bytes(raw[: len(raw) // 2 + 100])  # cut inside a member
    index = {"format": "iddpm_ds-shards-v1", "splits": {"train": {"samples": 20, "shards": [
        {"url": Path(p).name, "samples": 10} for p in whole]}}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    stream = _stream(DataSpec(shards=str(tmp_path / "index.json"), num_workers=1), batch=5)
    assert stream.batches_per_epoch == 4
    seen = [int(v) for _, (x, c) in zip(range(4), stream) for v in c["y"]]
    lost = stream.stats()["corrupt_samples"]
    assert 1 <= lost <= 6 and len(seen) == 20 and set(range(10, 20)) <= set(seen)
    assert '"data_shard_damaged"' in capfd.readouterr().err
    stream.close()


def test_source_errors_stop_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="non-empty"):
        DataSpec(shards=[])
    (tmp_path / "empty.json").write_text(json.dumps({"splits": {"train": {"shards": []}}}))
    with pytest.raises(EmptySourceError, match="lists no shards"):
        _stream(DataSpec(shards=str(tmp_path / "empty.json")))
    with pytest.raises(ShardNotFoundError) as missing:
        _stream(DataSpec(shards=str(tmp_path / "s-{000..002}.tar")))
    assert isinstance(missing.value, FileNotFoundError) and "3 of 3" in str(missing.value)
    with pytest.raises(ShardNotFoundError):
        _stream(DataSpec(shards=str(tmp_path / "index.json")))
    junk = [(f"{k}", {"png": b"junk", "cls": b"0"}) for k in range(3)]
    bad = [write_tar(tmp_path / f"bad{i}.tar", junk) for i in range(2)]
    with pytest.raises(AllCorruptError, match="no usable sample"):
        _stream(DataSpec(shards=[str(p) for p in bad]))
    (tmp_path / "garbage.tar").write_bytes(b"\x01" * 4000)
    with pytest.raises(EmptySourceError, match="no samples"):
        _stream(DataSpec(shards=str(tmp_path / "garbage.tar")))
    small = id_shards(tmp_path, [3])
    with pytest.raises(ValueError, match="one global batch"):
        _stream(DataSpec(shards=small), batch=4)


def test_pipe_needs_the_opt_in(tmp_path: Path) -> None:
    shard = id_shards(tmp_path, [6])[0]
    for url in (f"pipe:cat {shard}", "s3://bucket/a.tar"):  # http(s) runs no command
        with pytest.raises(ValidationError, match="allow_pipe"):
            DataSpec(shards=url)
    entry = {"url": f"pipe:cat {shard}", "samples": 6}
    index = {"format": "iddpm_ds-shards-v1", "splits": {"train": {"samples": 6, "shards": [entry]}}}
    (tmp_path / "remote.json").write_text(json.dumps(index))
    with pytest.raises(PipeNotAllowedError):  # urls inside an index are checked too
        _stream(DataSpec(shards=str(tmp_path / "remote.json")))
    spec = DataSpec(shards=str(tmp_path / "remote.json"), allow_pipe=True, num_workers=0)
    stream = _stream(spec, batch=3)
    labels = sorted(int(v) for _, (_, c) in zip(range(2), stream) for v in c["y"])
    assert labels == list(range(6))


@pytest.mark.parametrize("world,workers,batch,buffer", [(2, 2, 4, 10), (3, 1, 5, 0), (1, 3, 7, 50)])
def test_plan_serves_each_position_once_across_chained_resumes(world, workers, batch,
                                                               buffer) -> None:
    total, seed, epoch = 311, 5, 2
    layouts = [Layout(world, workers, batch, buffer), Layout(world + 1, 2, batch + 1, 7, 0, 1),
               Layout(1, 1, 3, 4, 0, 2)]
    history, seen = [], []
    for stage, layout in enumerate(layouts):
        pool = replay(total, history, seed, epoch)
        plans = [RankPlan(pool, layout, r, seed, epoch) for r in range(layout.world_size)]
        assert len({p.batches for p in plans}) == 1  # equal batch counts on every rank
        done = plans[0].batches if stage == len(layouts) - 1 else plans[0].batches // 2
        for plan in plans:
            seen += [p for a, b in plan.consumed(done).tolist() for p in range(a, b)]
        history.append({**layout.__dict__, "batches_done": [done] * layout.world_size})
    assert len(seen) == len(set(seen))  # nothing twice
    dropped = set(range(total)) - set(seen)
    assert len(dropped) < 3  # only the final remainder of the last layout (global batch 1 x 3)


def test_shard_order_is_a_seeded_permutation() -> None:
    orders = {tuple(shard_order(10, 7, e, True)) for e in range(5)}
    assert len(orders) > 1 and all(sorted(o) == list(range(10)) for o in orders)
    assert tuple(shard_order(10, 7, 3, True)) == tuple(shard_order(10, 7, 3, True))
    assert shard_pieces(np.array([[5, 15], [17, 20]]), np.array([2, 0, 1]), [10, 0, 10]) == [
        (2, 5, 10), (0, 0, 5), (0, 7, 10)]


def test_writer_folder_npz_and_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "dogs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(0, 256, (2, 9, 11, 3), dtype=np.uint8)
        Image.fromarray(pixels[0]).save(src / f"cat_{i}.png")
        Image.fromarray(pixels[1]).save(src / "sub" / "dogs" / f"dog_{i}.JPG", format="JPEG")
    (src / "notes.txt").write_text("not an image")
    items = folder_items(src)
    assert len(items) == 12 and {it.class_name for it in items} == {"cat", "dog"}
    assert {it.class_name for it in folder_items(src, labels="folder")} == {"src", "dogs"}
    options = WriteOptions(shard_size=5, eval_count=2, progress=False)
    index = write_items(items, tmp_path / "out", options, "t")
    assert index["class_names"] == ["cat", "dog"]
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == [5, 5]
    assert index["splits"]["eval"]["samples"] == 2
    with tarfile.open(tmp_path / "out" / "eval-000000.tar") as tar:
        classes = sorted(tar.extractfile(m).read() for m in tar.getmembers()
                         if m.name.endswith(".cls"))
    assert classes == [b"0", b"1"]  # stratified hold-out: one of each class
    with pytest.raises(OutputExistsError):
        write_items(items, tmp_path / "out", WriteOptions(progress=False), "t")
    index = write_items(items, tmp_path / "out", WriteOptions(max_shard_bytes=3000, overwrite=True,
                                                              progress=False), "t")
    assert len(index["splits"]["train"]["shards"]) > 2
    assert not (tmp_path / "out" / "eval-000000.tar").exists()
    arrays = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    labels = np.array([0, 4, 4, 0, 4, 0, 4])
    index = write_items(array_items(arrays, labels), tmp_path / "npz",
                        WriteOptions(shuffle=False, progress=False), "t")
    assert index["class_names"] == ["0", "1", "2", "3", "4"]  # labels kept as given
    spec = DataSpec(shards=str(tmp_path / "npz" / "index.json"), num_workers=0, shuffle_buffer=0,
                    shuffle_shards=False)
    x, cond = next(iter(build_train_stream(spec, image_size=5, class_cond=True, batch_size=7,
                                           rank=0, world_size=1, seed=0)))
    assert cond["y"].tolist() == labels.tolist()
    expected = torch.from_numpy(arrays[:, :5, :5]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(x, expected)


def test_digits_writer_counts_and_eval_stream(tmp_path: Path) -> None:
    from iddpm_ds_launch.make_shards import main

    out = tmp_path / "digits"
    assert main(["digits", "-o", str(out), "--quiet"]) == 0
    assert main(["digits", "-o", str(out), "--quiet"]) == 2  # refuses to overwrite
    index = json.loads((out / "index.json").read_text())
    assert index["image_size"] == 32 and index["class_names"] == [str(d) for d in range(10)]
    train, held = index["splits"]["train"], index["splits"]["eval"]
    assert (train["samples"], held["samples"]) == (1597, 200)
    assert sum(s["samples"] for s in train["shards"]) == 1597 and len(train["shards"]) == 8
    spec = DataSpec(shards=str(out / "index.json"), eval_shards=str(out / "index.json"),
                    num_workers=0)
    ev = build_eval_stream(spec, image_size=32, class_cond=True, batch_size=64, rank=0,
                           world_size=1)
    labels = torch.cat([c["y"] for _, c in ev])
    assert ev.batches == 4 and labels.bincount().tolist() == [20] * 10
    stream = build_train_stream(spec, image_size=32, class_cond=True, batch_size=100, rank=0,
                                world_size=1, seed=0)
    assert stream.batches_per_epoch == 15 and stream.class_names == tuple(index["class_names"])
    x, _ = next(iter(stream))
    assert x.shape == (100, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.3


def test_state_roundtrip_single_process(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [13, 9, 20])
    spec = DataSpec(shards=shards, num_workers=2, shuffle_buffer=8)
    first = _stream(spec, batch=3, seed=11)
    seen = [int(v) for _, (_, c) in zip(range(5), first) for v in c["y"]]
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    first.close()
    second = _stream(spec, batch=3, seed=11)
    second.load_state_dict([state])
    left = second.batches_left_in_epoch
    seen += [int(v) for _, (_, c) in zip(range(left), second) for v in c["y"]]
    assert sorted(seen) == list(range(42)) and second.stats()["epoch"] == 1
    bigger = _stream(spec, batch=40, seed=11)  # 27 left < one batch of 40: that epoch is over
    bigger.load_state_dict([state])
    assert bigger.stats()["epoch"] == 1 and bigger.batches_left_in_epoch == 1
    with pytest.raises(ValueError, match="other shards or another seed"):
        _stream(spec, batch=3, seed=12).load_state_dict([state])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_the_same_layout_yields_the_uninterrupted_batches(tmp_path: Path,
                                                                   workers: int) -> None:
    # 59 samples, batch 3: 19 batches per epoch. Resumes after 5, 12 and 25 batches (chained)
    # land on both loader workers, in both epochs; the resumed pieces cross both epoch ends.
    shards = id_shards(tmp_path, [13, 9, 20, 17], corrupt=(7, 40))
    spec = DataSpec(shards=shards, num_workers=workers, shuffle_buffer=8, random_flip=True)
    chain = resume_chain(spec, [5, 12, 25], 41, lambda state: [state], image_size=8,
                         class_cond=True, batch_size=3, rank=0, world_size=1, seed=4)
    assert first_difference(chain) is None
    assert chain["states"][0] == chain["states"][1]
    epochs = [[int(v) for _, y in chain["straight"][e * 19:(e + 1) * 19] for v in y]
              for e in range(2)]
    assert epochs[0] != epochs[1] and not {7, 40} & set(epochs[0] + epochs[1])  # replaced


def test_exact_resume_after_a_resume_at_another_layout(tmp_path: Path) -> None:
    shards = id_shards(tmp_path, [13, 9, 20, 17])
    spec = DataSpec(shards=shards, num_workers=2, shuffle_buffer=8, random_flip=True)
    args = {"image_size": 8, "class_cond": True, "rank": 0, "world_size": 1, "seed": 4}
    first = build_train_stream(spec, batch_size=3, **args)
    seen = [int(v) for _, (_, c) in zip(range(4), first) for v in c["y"]]
    saved = [json.loads(json.dumps(first.state_dict()))]
    first.close()
    # batch 2 re-splits the 47 samples left (23 batches), then resumes keep that new plan
    chain = resume_chain(spec, [5, 12], 30, lambda state: [state], start=saved, batch_size=2,
                         **args)
    assert first_difference(chain) is None and chain["states"][0] == chain["states"][1]
    seen += [int(v) for _, y in chain["resumed"][:23] for v in y]
    assert len(seen) == len(set(seen)) == 58  # 59 - 1 dropped (the new layout's remainder)


def test_tar_select_reads_scattered_pieces_and_marks_the_damaged_ones(tmp_path: Path,
                                                                      capfd) -> None:
    shard = Path(id_shards(tmp_path, [10])[0])
    pieces = [(0, 1, 3), (0, 5, 7), (0, 8, 10)]
    raws = list(read_pieces(pieces, [str(shard)], ["s"]))
    assert [r.index for r in raws] == [r.key and int(r.key) for r in raws] == [1, 2, 5, 6, 8, 9]
    data = shard.read_bytes()
    shard.write_bytes(data[: data.index(b"000006.png") + 600])  # cut inside sample 6's image
    raws = list(read_pieces(pieces, [str(shard)], ["s"]))
    assert [r.index for r in raws] == [1, 2, 5, 6, 8, 9]
    assert [r.fields is None for r in raws] == [False, False, False, True, True, True]
    err = capfd.readouterr().err
    damaged = [json.loads(line) for line in err.splitlines() if "data_shard_damaged" in line]
    assert [(d["first_sample"], d["missing"]) for d in damaged] == [(6, 1), (8, 2)]


def test_resume_replaces_corrupt_samples_as_the_uninterrupted_run(tmp_path: Path) -> None:
    # No shuffling: the batch after the cut is [6, 7, 8]; 6 and 5 are corrupt, so a run that
    # never stopped fills 6's slot with sample 4, which the resumed worker skipped.
    shards = id_shards(tmp_path, [12], corrupt=(5, 6))
    spec = DataSpec(shards=shards, num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    chain = resume_chain(spec, [2], 4, lambda state: [state], image_size=8, class_cond=True,
                         batch_size=3, rank=0, world_size=1, seed=0)
    assert first_difference(chain) is None
    x, y = chain["resumed"][2]
    assert y.tolist() == [4, 7, 8] and torch.equal(x[0], chain["resumed"][1][0][1])


@pytest.mark.parametrize("raw", [False, True])
def test_presized_shards_equal_reference_preprocessing_of_originals(tmp_path: Path,
                                                                    raw: bool) -> None:
    rng = np.random.default_rng(2)
    originals = [_encoded(rng, w, h, kind) for w, h, kind in ODD_IMAGES]
    items = [Item(lambda d=data: ("png", d), str(i), f"#{i}", i)
             for i, data in enumerate(originals)]
    index = write_items(items, tmp_path, WriteOptions(image_size=16, raw=raw, shuffle=False,
                                                       progress=False), "t")
    assert index["raw"] is raw and index["image_size"] == 16
    spec = DataSpec(shards=str(tmp_path / "index.json"), num_workers=0, shuffle_buffer=0)
    x, cond = next(iter(_stream(spec, size=16, batch=len(originals))))
    for row, label in enumerate(cond["y"].tolist()):
        np.testing.assert_array_equal(x[row].numpy(), reference(originals[label], 16))


@pytest.mark.parametrize("raw", [False, True])
def test_writer_output_reads_with_ours_and_with_webdataset(tmp_path: Path, raw: bool) -> None:
    import webdataset as wds

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (11, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(11) % 3
    options = WriteOptions(shard_size=4, image_size=6, raw=raw, shuffle=False, progress=False)
    index = write_items(array_items(pixels, labels), tmp_path / "a", options, "t")
    write_items(array_items(pixels, labels), tmp_path / "b", options, "t")
    urls = [str(tmp_path / "a" / s["url"]) for s in index["splits"]["train"]["shards"]]
    assert [s["samples"] for s in index["splits"]["train"]["shards"]] == [4, 4, 3]
    for url in urls:  # the same input gives the same bytes (fixed mtime and owner)
        assert Path(url).read_bytes() == (tmp_path / "b" / Path(url).name).read_bytes()
    field = "npy" if raw else "png"
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(11)]
    for i, sample in enumerate(samples):
        payload = {k for k in sample if not k.startswith("__")}
        assert payload == {field, "cls"} and sample["cls"] == str(labels[i]).encode()
        got = (np.load(io.BytesIO(sample["npy"]), allow_pickle=False) if raw
               else np.asarray(Image.open(io.BytesIO(sample["png"]))))
        np.testing.assert_array_equal(got, pixels[i])
    spec = DataSpec(shards=str(tmp_path / "a" / "index.json"), num_workers=0, shuffle_buffer=0,
                    shuffle_shards=False)
    x, cond = next(iter(_stream(spec, size=6, batch=8)))
    assert cond["y"].tolist() == labels[:8].tolist()
    expected = torch.from_numpy(pixels[:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(x, expected)


def test_npy_payloads_refuse_pickles_and_archives() -> None:
    from iddpm_ds.data.preprocess import decode_npy, encode_npy

    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert np.array_equal(decode_npy(encode_npy(pixels)), pixels)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        decode_npy(pickled.getvalue())
    archive = io.BytesIO()
    np.savez(archive, pixels=pixels)
    with pytest.raises(ValueError, match="not .npy"):
        decode_npy(archive.getvalue())
