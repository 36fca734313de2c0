"""A real-image benchmark in the competition's layout, from Debian's dataset-fashion-mnist (70k 28 x 28
photos of garments, 10 classes): `apt-get install dataset-fashion-mnist`. bench.py accuracy uses it."""
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from utils import UserError, atomic_write_text

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = 10


def read_idx(path):
    """The array of one gzipped IDX file (the MNIST format: magic, dimensions, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(source_dir=DEFAULT_DIR):
    """(train images, train labels, test images, test labels) of the original split."""
    source_dir = Path(source_dir)
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")
    missing = [name for name in names if not (source_dir / name).is_file()]
    if missing:
        raise UserError(f"{source_dir / missing[0]} is missing: install Debian's dataset-fashion-mnist "
                        "(apt-get install dataset-fashion-mnist) or point --fashion-mnist at its folder")
    return tuple(read_idx(source_dir / name) for name in names)


def pick(labels, per_class, rng):
    """Indices of `per_class` images of each class, drawn without replacement, in a shuffled order."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(CLASSES)]
    return rng.permutation(np.concatenate(chosen))


def write_layout(out_dir, *, train_per_class, val_per_class, test_per_class, seed=0, source_dir=DEFAULT_DIR):
    """train/<class>/, val/<class>/ (both from the original train split, disjoint), test/ (flat, from the
    original test split) and test_labels.csv, as PNGs; the same files for the same arguments."""
    out_dir = Path(out_dir)
    train_images, train_labels, test_images, test_labels = load(source_dir)
    rng = np.random.default_rng(seed)
    pool = pick(train_labels, train_per_class + val_per_class, rng)
    counts = {c: 0 for c in range(CLASSES)}
    for index in pool:
        label = int(train_labels[index])
        split = "train" if counts[label] < train_per_class else "val"
        counts[label] += 1
        folder = out_dir / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train_images[index]).save(folder / f"{index:05d}.png")
    (out_dir / "test").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in pick(test_labels, test_per_class, rng):
        name = f"t{index:05d}"
        Image.fromarray(test_images[index]).save(out_dir / "test" / f"{name}.png")
        rows.append(f"{name},{int(test_labels[index])}")
    atomic_write_text(out_dir / "test_labels.csv", "image_name,label\n" + "\n".join(sorted(rows)) + "\n")
    return out_dir
