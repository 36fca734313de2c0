"""The decoded-image cache (cache.DecodedCache) and train.py's --cache-size."""
import json
import os
import pickle
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

import cache
import data
import transforms
from conftest import TINY_TRAIN, run_script
from utils import UserError

SIZE = 64


@pytest.fixture(scope="module")
def train_paths(demo_dir):
    return data.load_split(demo_dir, "train")[0][:40]


def test_cached_size_keeps_the_aspect_and_never_enlarges():
    assert cache.cached_size(1000, 750, 448) == (597, 448)
    assert cache.cached_size(750, 1000, 448) == (448, 597)
    assert cache.cached_size(300, 200, 448) == (300, 200)
    assert cache.cached_size(5000, 10, 4) == (2000, 4)


def test_cache_holds_each_image_decoded_and_resized(train_paths, tmp_path):
    decoded = cache.DecodedCache.build(train_paths, tmp_path, SIZE, progress=False)
    assert len(decoded) == len(train_paths)
    formats = set()
    for index, path in enumerate(train_paths):
        with Image.open(path) as img:
            original, formats = img.size, formats | {img.format}
        expected = cache.decode_resized(path, cache.cached_size(*original, SIZE))
        got = decoded.image(index)
        assert got.mode == "RGB" and got.size == expected.size
        assert min(got.size) == min(SIZE, *original)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert {"JPEG", "PNG"} <= formats
    # a pickled cache (as DataLoader workers get it) maps the file again, without carrying the pixels
    copy = pickle.loads(pickle.dumps(decoded))
    assert len(pickle.dumps(decoded)) < 10_000
    np.testing.assert_array_equal(np.asarray(copy.image(3)), np.asarray(decoded.image(3)))


def test_cache_is_reused_and_rebuilt_when_a_file_changes(demo_dir, tmp_path, monkeypatch):
    folder = tmp_path / "train"
    shutil.copytree(demo_dir / "train" / "3", folder)
    paths = data.list_images(folder)
    first = cache.DecodedCache.build(paths, tmp_path / "cache", SIZE, progress=False)

    def no_decode(path, size):
        raise AssertionError("a complete cache was decoded again")

    with monkeypatch.context() as m:
        m.setattr(cache, "decode_resized", no_decode)
        again = cache.DecodedCache.build(paths, tmp_path / "cache", SIZE, progress=False)
    assert again.pixels_path == first.pixels_path
    # another size, or a file rewritten (new mtime), is another cache
    assert cache.DecodedCache.files(paths, tmp_path / "cache", SIZE + 1)[0] != first.pixels_path
    Image.new("RGB", (60, 50), (200, 10, 10)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    changed = cache.DecodedCache.build(paths, tmp_path / "cache", SIZE, progress=False)
    assert changed.pixels_path != first.pixels_path
    np.testing.assert_array_equal(np.asarray(changed.image(0)), np.asarray(data.load_rgb(paths[0])))
    assert changed.image(0).size == (60, 50)
    np.testing.assert_array_equal(np.asarray(changed.image(1)), np.asarray(first.image(1)))


def test_an_incomplete_cache_is_rebuilt(train_paths, tmp_path):
    decoded = cache.DecodedCache.build(train_paths[:5], tmp_path, SIZE, progress=False)
    pixels, index = cache.DecodedCache.files(train_paths[:5], tmp_path, SIZE)
    reference = pixels.read_bytes()
    with open(pixels, "r+b") as f:  # a pixels file cut short: no index may make it look complete
        f.truncate(len(reference) // 2)
    assert cache.DecodedCache.load(train_paths[:5], tmp_path, SIZE) is None
    index.unlink()
    stale = tmp_path / f".{pixels.name}.x1y2.tmp"  # what a build killed mid-write leaves
    stale.write_bytes(b"partial")
    decoded = cache.DecodedCache.build(train_paths[:5], tmp_path, SIZE, progress=False)
    assert pixels.read_bytes() == reference and not stale.exists() and len(decoded) == 5


def test_cache_errors_name_the_cause_and_leave_nothing(train_paths, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(cache.shutil, "disk_usage", lambda path: Usage(2**30, 2**30 - 1000, 1000))
        with pytest.raises(UserError, match=rf"--cache-dir {tmp_path} has 0.0 GiB free, but 40 images at "
                                            rf"--cache-size {SIZE} need 0.0 GiB; free some space"):
            cache.DecodedCache.build(train_paths, tmp_path, SIZE, progress=False)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [shutil.copy(p, folder) for p in train_paths[:6]]
    paths[4] = shutil.copy(train_paths[4], folder / "broken.jpg")
    good = (folder / "broken.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[:len(good) // 3])  # truncated after the scan
    with pytest.raises(UserError, match=r"image .*broken.jpg can no longer be read \(.*\); check it and run again"):
        cache.DecodedCache.build(paths, tmp_path / "cache", SIZE, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_dataset_items_come_from_the_cache(train_paths, tmp_path):
    decoded = cache.DecodedCache.build(train_paths, tmp_path, SIZE, progress=False)
    labels = list(range(len(train_paths)))
    for aug in ("report", "fused"):
        transform = transforms.train_transform(32, aug=aug)
        dataset = pickle.loads(pickle.dumps(data.ImageDataset(train_paths, labels, transform, decoded)))
        image, label = dataset[(7, 99)]
        torch.manual_seed(99)
        assert label == 7 and torch.equal(image, transform(decoded.image(7)))
    with pytest.raises(ValueError, match="the cache holds 40 images, not the dataset's 3"):
        data.ImageDataset(train_paths[:3], [0, 1, 2], transform, decoded)


def test_train_with_a_cache(demo_dir, tmp_path):
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    flags = ("train.py", "--model", "resnext", "--data-dir", demo_dir, "--out-dir", out, "--epochs", "1",
             "--cache-dir", cache_dir, *TINY_TRAIN)
    result = run_script(*flags, "--cache-size", "16", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --cache-size 16 is below --img-size 32, so every crop would be enlarged; use 0 (no cache) "
        "or at least 32 (2x keeps most crops sharp)")
    run_script(*flags, "--cache-size", "48", "--aug", "fused")
    n_train = len(data.load_split(demo_dir, "train")[0])
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".npz", ".u8"]
    assert cache.DecodedCache.load(data.load_split(demo_dir, "train")[0], cache_dir, 48) is not None
    assert f"-48px-{n_train}-" in next(cache_dir.iterdir()).name
    assert json.loads((out / "config.json").read_text())["cache_size"] == 48
