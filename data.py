"""The data folders, decoding, datasets, samplers and loaders.

Layout: DATA/train/<class>/*, DATA/val/<class>/*, DATA/test/* (flat).
    python data.py make-demo OUT   # a small synthetic dataset in that layout (demo_data.py)
    python data.py scan DATA       # check every image and list the unreadable ones

The pipelines that turn images into tensors are in transforms.py (and fused.py), the decoded-image
cache in cache.py.
"""
import argparse
import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

import demo_data
from utils import HelpFormatter, UserError, run_main

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------
# reading the folders

def is_image_file(path):
    return not path.name.startswith(".") and path.suffix.lower() in IMG_EXTENSIONS and path.is_file()


def list_images(folder):
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p))


def class_sort_key(names):
    """Numeric order when every class name is an integer (0, 1, 2, ..., 10), else lexicographic."""
    # isdecimal, not isdigit: int() refuses digits such as "²"; the name breaks ties such as "1" and "01"
    if all(name.lstrip("-").isdecimal() for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def find_classes(split_dir):
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UserError(f"folder {split_dir} does not exist; expected one sub-folder per class")
    names = [p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not names:
        raise UserError(f"folder {split_dir} has no class sub-folders")
    return class_sort_key(names)


def check_image(path):
    """Decode the file (JPEGs at 1/8 scale, which is cheap) and return None or the reason it is bad."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            img.load()
        return None
    except Exception as error:  # PIL raises many types for corrupt files
        return f"{type(error).__name__}: {error}"


def scan_images(paths, strict=False, workers=None, skip_hint="run without --strict to skip them", warn=True):
    """Return the readable paths and the (path, reason) of the rest; warn about (or, with strict, refuse)
    those, by path. skip_hint: how the calling script skips them, for the error."""
    # PIL releases the GIL while decoding, so threads scale without the cost of spawning processes
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        reasons = list(pool.map(check_image, paths))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad and strict:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"unreadable image {bad[0][0]} ({bad[0][1]}){more}; "
                        f"remove them or {skip_hint}")
    for path, reason in bad if warn else ():
        warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=2)
    bad_paths = {p for p, _ in bad}
    return [p for p in paths if p not in bad_paths], bad


def list_split(data_dir, split, class_names=None):
    """Return (paths, labels, class_names) of the image files of DATA/split, unchecked; class_names
    defaults to the split's own."""
    split_dir = Path(data_dir) / split
    found = find_classes(split_dir)
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise UserError(f"{split_dir} has classes not in the training classes: {', '.join(unknown[:5])}"
                            f"{' ...' if len(unknown) > 5 else ''}; remove them or add them to train/")
    index = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    for name in found:
        for path in list_images(split_dir / name):
            paths.append(path)
            labels.append(index[name])
    if not paths:
        raise UserError(f"folder {split_dir} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return paths, labels, class_names


def load_split(data_dir, split, class_names=None, strict=False):
    """Return (paths, labels, class_names) of the readable images of DATA/split (list_split, then
    scan_images)."""
    paths, labels, class_names = list_split(data_dir, split, class_names)
    good, bad = scan_images(paths, strict=strict)
    bad_paths = {p for p, _ in bad}
    labels = [label for p, label in zip(paths, labels) if p not in bad_paths]
    if not good:
        raise UserError(f"folder {Path(data_dir) / split} holds no readable images")
    return good, labels, class_names


def fold_split(names, labels, folds, fold, seed):
    """Stratified K-fold split of a pool of images: each class's images are shuffled by `seed` and dealt
    round-robin into `folds` folds (each class starting where the previous one ended, so fold sizes differ
    by at most one). Returns (train indices, held-out indices of fold `fold`, 0-based), the same for the
    same pool and seed, and the SHA-256 of the held-out images' names (e.g. paths relative to the data
    folder), sorted, that a resumed run checks."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    labels = np.asarray(labels)
    start = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (start + np.arange(len(members))) % folds
        start = (start + len(members)) % folds
    held_out = np.flatnonzero(assignment == fold)
    train = np.flatnonzero(assignment != fold)
    digest = hashlib.sha256("\n".join(sorted(names[i] for i in held_out)).encode()).hexdigest()
    return train.tolist(), held_out.tolist(), digest


def load_test(test_dir, strict=True, skip_hint="pass --skip-bad to predict nothing for them"):
    """Return the test images, sorted by name; two files with one stem would collide in the CSV."""
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        raise UserError(f"test folder {test_dir} does not exist")
    paths = list_images(test_dir)
    if not paths:
        raise UserError(f"test folder {test_dir} holds no images ({', '.join(IMG_EXTENSIONS)})")
    seen = {}
    for path in paths:
        if path.stem in seen:
            raise UserError(f"test images {seen[path.stem].name} and {path.name} in {test_dir} share the "
                            f"name '{path.stem}' and would collide in the CSV; rename one")
        seen[path.stem] = path
    good, bad = scan_images(paths, strict=strict, skip_hint=skip_hint)
    return sorted(good, key=lambda p: p.stem), bad


# ----------------------------------------------------------------------------
# decoding

def load_rgb(path, draft_size=None):
    """Open any PIL mode as RGB; transparency is composited on white. draft_size (px, or (width, height)):
    a JPEG is decoded at the smallest DCT scale that keeps at least that size."""
    with Image.open(path) as img:
        if draft_size is not None:
            img.draft("RGB", (draft_size, draft_size) if isinstance(draft_size, int) else draft_size)
        img.load()
        return to_rgb(img)


def to_rgb(img):
    """A loaded PIL image of any mode as RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        img = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8))
    if img.mode == "P" or img.mode in ("LA", "PA", "RGBA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# ----------------------------------------------------------------------------
# datasets

class ImageDataset(Dataset):
    """Images with labels (-1 for test). An item is an index, or (index, seed) to make the
    augmentation of that sample a pure function of the seed: the same under any number of
    workers, ranks or resumes. cache: a DecodedCache of `paths` to read instead of the files."""

    def __init__(self, paths, labels, transform, cache=None):
        self.paths = [str(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform, self.cache = transform, cache
        if cache is not None and len(cache) != len(self.paths):
            raise ValueError(f"the cache holds {len(cache)} images, not the dataset's {len(self.paths)}")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        # a transform with reads_path (EvalTransform, FusedTrainTransform) decodes the file itself, at the
        # size it needs
        reads_path = getattr(self.transform, "reads_path", False)
        with nullcontext() if seed is None else torch.random.fork_rng(devices=[]):
            if seed is not None:  # the CPU generator only: torch.manual_seed also queues CUDA seeding, slowly
                torch.default_generator.manual_seed(seed)
            for offset in range(len(self.paths)):
                index_read = (index + offset) % len(self.paths)
                path = self.paths[index_read]
                try:
                    if self.cache is not None:
                        sample = self.transform(self.cache.image(index_read))
                    else:
                        sample = self.transform(path) if reads_path else self.transform(load_rgb(path))
                    break
                except OSError as error:  # the file changed after the scan: never end an epoch for it
                    warnings.warn(f"skipping unreadable image {path} ({error})", stacklevel=2)
            else:
                raise UserError(f"none of the {len(self.paths)} images can be read any more "
                                f"(e.g. {self.paths[index]})")
        # the label goes with the image actually read, never with the one skipped
        return sample, self.labels[index_read]


# ----------------------------------------------------------------------------
# sampling and loading

def sample_seed(seed, epoch, index):
    # torch seeds are 64-bit: without the modulo, seeds above ~900000 (e.g. a date) overflow
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63


class TrainBatchSampler:
    """Shuffled global batches, identical at any world size: step s of epoch e uses the same
    `batch_size` images whether one process takes all of them or N ranks take batch_size/N each.
    The remainder of an epoch (len % batch_size) is dropped; `start_step` resumes mid-epoch."""

    def __init__(self, num_samples, batch_size, seed, rank=0, world_size=1):
        if batch_size % world_size:
            raise UserError(f"--batch-size {batch_size} is the global batch and must divide by "
                            f"the {world_size} processes")
        if num_samples < batch_size:
            raise UserError(f"the train split has {num_samples} images, fewer than --batch-size {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self):
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        local = self.batch_size // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            begin = step * self.batch_size + self.rank * local
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in order[begin:begin + local]]


def shard(dataset, rank=0, world_size=1):
    """A contiguous, unpadded slice per rank, so gathering the ranks in order gives every item once."""
    n = len(dataset)
    return Subset(dataset, range(rank * n // world_size, (rank + 1) * n // world_size))


def default_workers(local_world_size=1):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus // local_world_size))


def loader_workers(flag, device, local_world_size=1):
    """--workers: the value given, or for -1 default_workers() beside an accelerator and 0 on the CPU,
    where the model already uses every core and workers would only compete with it (BENCHMARKS.md:
    training 0.85x with 2 workers on 2 cores, 1.17x with none, against the report's loop)."""
    if flag >= 0:
        return flag
    return 0 if device.type == "cpu" else default_workers(local_world_size)


def make_loader(dataset, *, device, workers, batch_size=None, batch_sampler=None):
    """Train loaders take a batch_sampler; evaluation loaders a batch_size (in order, no shuffle)."""
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    return DataLoader(dataset, **batching, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the synthetic demo dataset",
                          formatter_class=HelpFormatter)
    demo.add_argument("out", type=Path, help="output folder (gets train/, val/, test/, test_labels.csv)")
    demo.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    demo.add_argument("--train-per-class", type=int, default=40, help="train images per class")
    demo.add_argument("--val-per-class", type=int, default=20, help="val images per class")
    demo.add_argument("--test-per-class", type=int, default=20, help="test images per class")
    scan = sub.add_parser("scan", help="check every image of a data folder and list the unreadable ones",
                          formatter_class=HelpFormatter)
    scan.add_argument("data_dir", type=Path, help="data folder with train/, val/ and test/")
    scan.add_argument("--strict", action="store_true", help="exit with an error when any image is unreadable")
    args = parser.parse_args(argv)
    if args.command == "make-demo":
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise UserError(f"{args.out} exists and is not an empty folder; choose a new folder")
        demo_data.make_demo(args.out, args.seed, args.train_per_class, args.val_per_class, args.test_per_class)
        print(f"wrote the demo dataset ({demo_data.DEMO_CLASSES} classes) to {args.out}")
    else:
        train_paths, _, class_names = list_split(args.data_dir, "train")
        splits = {"train": train_paths, "val": list_split(args.data_dir, "val", class_names)[0]}
        if (args.data_dir / "test").is_dir():
            splits["test"] = list_images(args.data_dir / "test")
        counts, unreadable = [], []
        for split, paths in splits.items():
            good, bad = scan_images(paths, warn=False)
            counts.append(f"{split} {len(good)}")
            unreadable += bad
        for path, reason in unreadable:
            print(f"unreadable: {path} ({reason})")
        print(f"{len(class_names)} classes; readable images: {', '.join(counts)}; unreadable: {len(unreadable)}")
        if unreadable and args.strict:
            raise UserError(f"{len(unreadable)} unreadable image{'s' if len(unreadable) > 1 else ''} (listed "
                            "above); remove or replace them, or train without --strict to leave them out")


if __name__ == "__main__":
    run_main(main)
