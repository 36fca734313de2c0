import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

import data
import demo_data
import transforms
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]


def noise_image(size=(40, 30), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def write_image(path, img=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or noise_image()).save(path, fmt)
    return path


def truncated_jpeg(path):
    """A JPEG cut in half: large enough that the scan decodes it at reduced (draft) scale."""
    write_image(path, noise_image((256, 256)), "JPEG")
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


BAD_FILES = {
    "truncated.jpg": truncated_jpeg,
    "empty.jpg": lambda path: path.write_bytes(b""),
    "text.jpg": lambda path: path.write_text("not an image\n"),
}


def make_split(root, classes, per_class=1):
    for name in classes:
        for i in range(per_class):
            write_image(root / name / f"{i}.png")


# ----------------------------------------------------------------------------
# class order and folder layout

def test_numeric_class_names_sort_as_numbers(tmp_path):
    names = [str(i) for i in range(12)]
    make_split(tmp_path / "train", names)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    paths, labels, classes = data.load_split(tmp_path, "train")
    assert classes == names
    assert [int(Path(p).parent.name) for p in paths] == labels


@pytest.mark.parametrize("names, expected", [
    (["1", "10", "2", "cat"], ["1", "10", "2", "cat"]),
    (["b", "a", "C"], ["C", "a", "b"]),
    (["-1", "3", "20"], ["-1", "3", "20"]),
    (["10", "01", "1", "2"], ["01", "1", "2", "10"]),
    (["1", "2", "\u00b2"], ["1", "2", "\u00b2"]),
])
def test_class_order_is_lexicographic_unless_all_integers(tmp_path, names, expected):
    for name in names:
        (tmp_path / name).mkdir()
    assert data.find_classes(tmp_path) == expected


def test_val_classes_follow_train_indices(tmp_path):
    make_split(tmp_path / "train", ["a", "b", "c"])
    make_split(tmp_path / "val", ["c", "a"])
    _, labels, classes = data.load_split(tmp_path, "val", ["a", "b", "c"])
    assert classes == ["a", "b", "c"] and labels == [0, 2]


def test_val_class_not_in_train_names_the_folder(tmp_path):
    make_split(tmp_path / "val", ["a", "zebra"])
    with pytest.raises(UserError, match="zebra") as error:
        data.load_split(tmp_path, "val", ["a", "b"])
    assert str(tmp_path / "val") in str(error.value)


@pytest.mark.parametrize("layout", ["missing", "no class folders", "class folders without images",
                                    "only unreadable images"])
def test_unusable_split_names_the_folder(tmp_path, layout):
    split_dir = tmp_path / "train"
    if layout != "missing":
        split_dir.mkdir()
    if layout == "class folders without images":
        (split_dir / "a").mkdir()
        (split_dir / "a" / "notes.txt").write_text("x")
    if layout == "only unreadable images":
        (split_dir / "a").mkdir()
        (split_dir / "a" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError) as error:
            data.load_split(tmp_path, "train")
    assert str(split_dir) in str(error.value)


def test_missing_or_empty_test_folder_names_the_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist") as error:
        data.load_test(tmp_path / "test")
    assert str(tmp_path / "test") in str(error.value)
    (tmp_path / "test").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        data.load_test(tmp_path / "test")


def test_duplicate_test_stems_are_refused(tmp_path):
    write_image(tmp_path / "test" / "a.jpg")
    write_image(tmp_path / "test" / "a.png")
    write_image(tmp_path / "test" / "b.png")
    with pytest.raises(UserError, match="a.jpg and a.png"):
        data.load_test(tmp_path / "test")


def test_upper_case_extensions_and_stray_files(tmp_path):
    cls = tmp_path / "train" / "a"
    write_image(cls / "one.JPG", fmt="JPEG")
    write_image(cls / "two.PNG", fmt="PNG")
    write_image(cls / "three.Jpeg", fmt="JPEG")
    for stray in ("Thumbs.db", ".DS_Store", "notes.txt", "._one.JPG"):
        (cls / stray).write_bytes(b"\x00\x01junk")
    (tmp_path / "train" / "README.txt").write_text("stray file beside the class folders")
    test_dir = tmp_path / "test"
    write_image(test_dir / "x.PNG", fmt="PNG")
    (test_dir / "Thumbs.db").write_bytes(b"junk")
    (test_dir / ".hidden.jpg").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stray files are ignored, not even warned about
        paths, labels, classes = data.load_split(tmp_path, "train")
        test_paths, bad = data.load_test(test_dir)
    assert classes == ["a"] and labels == [0, 0, 0]
    assert sorted(Path(p).name for p in paths) == ["one.JPG", "three.Jpeg", "two.PNG"]
    assert test_paths == [test_dir / "x.PNG"] and bad == []


# ----------------------------------------------------------------------------
# unreadable files

@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_image_is_skipped_with_a_warning(tmp_path, name):
    good = write_image(tmp_path / "train" / "a" / "good.jpg", fmt="JPEG")
    write_image(tmp_path / "train" / "b" / "good.png")
    bad = tmp_path / "train" / "b" / name
    BAD_FILES[name](bad)
    with pytest.warns(UserWarning) as record:
        paths, labels, classes = data.load_split(tmp_path, "train")
    assert [str(bad) in str(w.message) for w in record] == [True]
    assert paths == [good, tmp_path / "train" / "b" / "good.png"] and labels == [0, 1]

    test_dir = tmp_path / "test"
    write_image(test_dir / "good.png")
    BAD_FILES[name](test_dir / name)
    with pytest.warns(UserWarning, match=str(test_dir / name)):
        test_paths, bad_list = data.load_test(test_dir, strict=False)
    assert test_paths == [test_dir / "good.png"]
    assert [p for p, _ in bad_list] == [test_dir / name]


def test_scan_lists_and_counts_the_unreadable_and_strict_fails(tmp_path, capsys):
    make_split(tmp_path / "train", ["a", "b"], per_class=2)
    make_split(tmp_path / "val", ["a"])
    write_image(tmp_path / "test" / "t1.png")
    truncated_jpeg(tmp_path / "train" / "b" / "cut.jpg")
    (tmp_path / "test" / "t2.jpg").write_text("not an image\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scan lists them itself, no Python warnings
        data.main(["scan", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines[:2]] == [f"unreadable: {tmp_path / 'train' / 'b' / 'cut.jpg'}",
                                                           f"unreadable: {tmp_path / 'test' / 't2.jpg'}"]
    assert lines[2] == "2 classes; readable images: train 4, val 1, test 1; unreadable: 2"
    result = subprocess.run([sys.executable, "data.py", "scan", str(tmp_path), "--strict"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == ("error: 2 unreadable images (listed above); remove or "
                                                        "replace them, or train without --strict to leave them out\n")


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unreadable_image_with_strict_names_the_file(tmp_path, name):
    write_image(tmp_path / "train" / "a" / "good.png")
    bad = tmp_path / "train" / "a" / name
    BAD_FILES[name](bad)
    with pytest.raises(UserError, match="unreadable image") as error:
        data.load_split(tmp_path, "train", strict=True)
    assert str(error.value).startswith(f"unreadable image {bad} (") and "\n" not in str(error.value)
    assert str(error.value).endswith("); remove them or run without --strict to skip them")  # no "and 0 more"
    (tmp_path / "test").mkdir()
    BAD_FILES[name](tmp_path / "test" / name)
    with pytest.raises(UserError, match="unreadable image") as error:
        data.load_test(tmp_path / "test")  # strict by default: predictions must cover every file
    assert str(tmp_path / "test" / name) in str(error.value)


# ----------------------------------------------------------------------------
# decoding every PIL mode to RGB

def mode_image(mode):
    if mode == "I;16":
        return Image.fromarray(np.array([[0, 65535], [1000, 30000]], dtype=np.uint16))
    if mode == "P":
        img = Image.new("P", (2, 2), 1)
        img.putpalette([0, 0, 0, 200, 10, 10])
        img.putpixel((0, 0), 0)
        img.info["transparency"] = 0
        return img
    img = noise_image((2, 2), mode=mode)
    if mode in ("RGBA", "LA"):
        img.putpixel((0, 0), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    return img


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"),
                                       ("P", "PNG"), ("I;16", "PNG"), ("1", "BMP")])
def test_any_mode_loads_as_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    img = mode_image(mode)
    img.save(path, fmt, **({"transparency": 0} if mode == "P" else {}))
    with Image.open(path) as opened:
        assert opened.mode == mode
    assert data.check_image(path) is None
    rgb = data.load_rgb(path)
    assert rgb.mode == "RGB" and rgb.size == (2, 2)
    if mode in ("RGBA", "LA", "P"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white
    if mode == "P":
        assert rgb.getpixel((1, 1)) == (200, 10, 10)
    if mode == "I;16":
        assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------
# pipelines and datasets

def normalised(value, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD):
    return ((torch.full((3,), float(value)) - torch.tensor(mean)) / torch.tensor(std))


@pytest.mark.parametrize("pipeline", [transforms.train_transform, transforms.eval_transform])
def test_batch_shape_dtype_and_normalisation(tmp_path, pipeline):
    paths = [write_image(tmp_path / f"{i}.png", Image.new("RGB", (50 + 7 * i, 40), "white")) for i in range(4)]
    loader = DataLoader(data.ImageDataset(paths, [0, 1, 2, 3], pipeline(24)), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3]
    white = normalised(1.0)[None, :, None, None]
    if pipeline is transforms.eval_transform:
        torch.testing.assert_close(x, white.expand_as(x), rtol=0, atol=1e-6)
    else:  # the random affine / perspective fill with black: only white and black (and blends) occur
        torch.testing.assert_close(x.amax(dim=(0, 2, 3)), white.flatten(), rtol=0, atol=1e-6)
        assert (x >= normalised(0.0)[None, :, None, None] - 1e-6).all()


def test_eval_transform_uses_given_mean_and_std(tmp_path):
    path = write_image(tmp_path / "black.png", Image.new("RGB", (9, 9), "black"))
    x, label = data.ImageDataset([path], None, transforms.eval_transform(8, mean=(0.5,) * 3, std=(0.25,) * 3))[0]
    assert label == -1
    torch.testing.assert_close(x, torch.full((3, 8, 8), -2.0), rtol=0, atol=0)


def test_eval_transform_decodes_jpegs_at_reduced_size(tmp_path):
    path = write_image(tmp_path / "photo.jpg", noise_image((900, 500), seed=3).filter(ImageFilter.GaussianBlur(2)))
    transform = transforms.eval_transform(112)
    assert data.load_rgb(path, 112).size == (225, 125)  # 1/4: the largest DCT scale keeping 112 px each way
    from_path = transform(path)
    torch.testing.assert_close(from_path, transform.pipeline(data.load_rgb(path, 112)), rtol=0, atol=0)
    full = transform(data.load_rgb(path))  # a decoded image is used as it is
    assert from_path.shape == full.shape == (3, 112, 112)
    levels = (from_path - full).abs() * torch.tensor(transforms.IMAGENET_STD)[:, None, None] * 255
    assert levels.mean() < 1 and levels.max() < 16


def test_seeded_items_are_pure_functions_of_the_seed(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", noise_image((48, 40), seed=i)) for i in range(2)]
    dataset = data.ImageDataset(paths, [3, 4], transforms.train_transform(16))
    rng_before = torch.get_rng_state()
    a, label = dataset[(1, 123)]
    b, _ = dataset[(1, 123)]
    c, _ = dataset[(1, 124)]
    assert label == 4
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is left alone


def test_image_unreadable_after_the_scan_is_replaced_with_its_own_label(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", Image.new("RGB", (8, 8), (40 * i,) * 3)) for i in range(3)]
    dataset = data.ImageDataset(paths, [0, 1, 2], transforms.eval_transform(8))
    paths[1].unlink()
    with pytest.warns(UserWarning, match="1.png"):
        x, label = dataset[1]
    expected, _ = dataset[2]
    assert label == 2 and torch.equal(x, expected)
    for path in paths[::2]:
        path.unlink()
    with pytest.warns(UserWarning), pytest.raises(UserError, match="none of the 3 images"):
        dataset[0]


def test_dataset_is_picklable_and_loads_in_spawned_workers(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", noise_image((20, 20), seed=i)) for i in range(4)]
    dataset = data.ImageDataset(paths, [0, 1, 2, 3], transforms.eval_transform(16))
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert [y.tolist() for _, y in batches] == [[0, 1], [2, 3]]
    torch.testing.assert_close(batches[1][0][1], dataset[3][0])


# ----------------------------------------------------------------------------
# sampling

def batches(num_samples, batch_size, seed, epoch, world_size=1, rank=0, start_step=0):
    sampler = data.TrainBatchSampler(num_samples, batch_size, seed, rank=rank, world_size=world_size)
    sampler.set_epoch(epoch, start_step)
    out = list(sampler)
    assert len(out) == len(sampler)
    return out


def test_global_batches_do_not_depend_on_world_size():
    single = batches(50, 8, seed=3, epoch=2)
    assert len(single) == 6  # 50 // 8: the remainder of 2 is dropped
    indices = [i for batch in single for i, _ in batch]
    assert len(indices) == 48 == len(set(indices))
    assert all(s == data.sample_seed(3, 2, i) for batch in single for i, s in batch)
    rank0 = batches(50, 8, seed=3, epoch=2, world_size=2, rank=0)
    rank1 = batches(50, 8, seed=3, epoch=2, world_size=2, rank=1)
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == single
    assert batches(50, 8, seed=3, epoch=3) != single


def test_start_step_resumes_at_the_right_batch():
    full = batches(50, 8, seed=1, epoch=4)
    assert batches(50, 8, seed=1, epoch=4, start_step=4) == full[4:]
    assert batches(50, 8, seed=1, epoch=4, world_size=2, rank=1, start_step=5) == [full[5][4:]]


def test_large_seeds_work(tmp_path):
    (batch,) = batches(8, 8, seed=20240101, epoch=1)  # a date as seed: the raw sample seed exceeds 64 bits
    path = write_image(tmp_path / "a.png")
    dataset = data.ImageDataset([path] * 8, [0] * 8, transforms.train_transform(8))
    assert all(dataset[item][0].shape == (3, 8, 8) for item in batch)


def test_sampler_refuses_bad_batch_sizes():
    with pytest.raises(UserError, match="--batch-size 9"):
        data.TrainBatchSampler(100, 9, 0, world_size=2)
    with pytest.raises(UserError, match="fewer than --batch-size 32"):
        data.TrainBatchSampler(10, 32, 0)


@pytest.mark.parametrize("n, world_size", [(10, 1), (10, 3), (7, 2), (2, 3)])
def test_shard_gives_every_index_once(n, world_size):
    dataset = list(range(n))
    shards = [data.shard(dataset, rank, world_size) for rank in range(world_size)]
    assert [dataset[i] for s in shards for i in s.indices] == dataset
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_make_loader_with_batch_sampler(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", noise_image((20, 20), seed=i)) for i in range(6)]
    dataset = data.ImageDataset(paths, list(range(6)), transforms.train_transform(16))
    sampler = data.TrainBatchSampler(6, 4, seed=0)
    loader = data.make_loader(dataset, device=torch.device("cpu"), workers=0, batch_sampler=sampler)
    (x, y), = list(loader)
    assert x.shape == (4, 3, 16, 16) and sorted(y.tolist()) == sorted(i for i, _ in next(iter(sampler)))


# ----------------------------------------------------------------------------
# the demo dataset

def file_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_demo_is_deterministic(tmp_path):
    small = dict(train_per_class=1, val_per_class=1, test_per_class=1)
    a = file_bytes(demo_data.make_demo(tmp_path / "a", seed=5, **small))
    b = file_bytes(demo_data.make_demo(tmp_path / "b", seed=5, **small))
    c = file_bytes(demo_data.make_demo(tmp_path / "c", seed=6, **small))
    assert a == b
    assert a.keys() != c.keys() or a != c


def test_demo_layout_formats_and_labels(demo_dir):
    classes = [str(i) for i in range(16)]
    train, train_labels, train_classes = data.load_split(demo_dir, "train", strict=True)
    val, _, _ = data.load_split(demo_dir, "val", train_classes, strict=True)
    test, _ = data.load_test(demo_dir / "test")
    assert train_classes == classes and len(classes) >= 12
    assert len(train) == 16 * 40 and len(val) == 16 * 10 and len(test) == 96
    assert np.bincount(train_labels).tolist() == [40] * 16
    assert not [p for p in (demo_dir / "test").iterdir() if p.is_dir()]
    assert {p.suffix for p in train + val + test} >= {".jpg", ".png", ".JPEG", ".webp", ".bmp"}
    sizes = set()
    for path in test:
        with Image.open(path) as img:
            sizes.add(img.size)
    assert len(sizes) > 10
    lines = (demo_dir / "test_labels.csv").read_text().splitlines()
    assert lines[0] == "image_name,label"
    rows = dict(line.split(",") for line in lines[1:])
    assert sorted(rows) == [p.stem for p in test]
    assert np.bincount([int(v) for v in rows.values()]).tolist() == [6] * 16


def test_make_demo_cli_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = subprocess.run([sys.executable, str(ROOT / "data.py"), "make-demo", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(tmp_path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_make_demo_cli_refuses_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sys, "argv", ["data.py", "make-demo", str(tmp_path / "file")])
    with pytest.raises(UserError, match="file"):
        data.main()


def test_loader_workers_default_to_none_on_the_cpu(monkeypatch):
    monkeypatch.setattr(data, "default_workers", lambda local_world_size=1: 12 // local_world_size)
    assert data.loader_workers(-1, torch.device("cpu")) == 0
    assert data.loader_workers(-1, torch.device("cuda", 1), local_world_size=4) == 3
    assert data.loader_workers(-1, torch.device("mps")) == 12
    assert data.loader_workers(3, torch.device("cpu")) == 3 and data.loader_workers(0, torch.device("cuda")) == 0
