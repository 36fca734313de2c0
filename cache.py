"""Decoded-image cache (train.py --cache-size): train images decoded once, then memory-mapped by every
DataLoader worker and rank."""
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from data import default_workers, load_rgb
from utils import UserError, atomic_save_npz, atomic_write, check_writable, remove_stale_temps
from utils import progress as progress_bar


def cached_size(width, height, size):
    """The cached size of a width x height image: shorter side `size`, never enlarged."""
    short = min(width, height)
    if short <= size:
        return width, height
    return max(1, round(width * size / short)), max(1, round(height * size / short))


def image_size(path):
    with Image.open(path) as img:
        return img.size


def decode_resized(path, size):
    """The image at `path` as RGB at exactly `size` (width, height), from a reduced JPEG decode where
    one keeps at least that size, then PIL's antialiased bilinear resize."""
    size = tuple(int(v) for v in size)
    try:
        rgb = load_rgb(path, size)
    except OSError as error:  # the scan read it: it changed since
        raise UserError(f"image {path} can no longer be read ({error}); check it and run again") from error
    return rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BILINEAR)


class DecodedCache:
    """RGB uint8 copies of images, shorter side at most `size` px, in one file that each process
    memory-maps (the OS shares its pages between workers and ranks): epochs after the build decode
    nothing. Files are named by a hash of `size` and of the images' paths, byte sizes and mtimes, so
    a changed data folder gets a new cache; an old one can be deleted at any time."""

    def __init__(self, pixels_path, offsets, sizes):
        self.pixels_path, self.offsets, self.sizes = str(pixels_path), offsets, sizes
        self._pixels = None

    def __len__(self):
        return len(self.sizes)

    def __getstate__(self):  # each worker maps the file itself: a pickled np.memmap would copy every byte
        return {**self.__dict__, "_pixels": None}

    def image(self, index):
        """Image `index` as a read-only PIL RGB image over the mapped bytes (no copy)."""
        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r")
        width, height = (int(v) for v in self.sizes[index])
        start = int(self.offsets[index])
        return Image.frombuffer("RGB", (width, height), self._pixels[start:start + width * height * 3],
                                "raw", "RGB", 0, 1)

    @staticmethod
    def files(paths, cache_dir, size):
        """(pixels file, index file) of this set of images at this size."""
        stats = [os.stat(p) for p in paths]
        listing = [size] + [[str(Path(p).resolve()), st.st_size, st.st_mtime_ns] for p, st in zip(paths, stats)]
        key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        stem = Path(cache_dir) / f"images-{size}px-{len(paths)}-{key}"
        return stem.with_suffix(".u8"), stem.with_suffix(".npz")

    @classmethod
    def load(cls, paths, cache_dir, size):
        """The cache of these images at this size, or None when it has not been built (completely)."""
        return cls.open(*cls.files(paths, cache_dir, size), len(paths))

    @classmethod
    def open(cls, pixels_path, index_path, count):
        """The cache in these files if they are complete and hold `count` images, else None."""
        if not (pixels_path.is_file() and index_path.is_file()):
            return None
        with np.load(index_path) as index:
            offsets, sizes = index["offsets"], index["sizes"]
        if len(sizes) != count or pixels_path.stat().st_size != offsets[-1]:
            return None
        return cls(pixels_path, offsets[:-1], sizes)

    @classmethod
    def build(cls, paths, cache_dir, size, workers=None, progress=True):
        """Load the cache, or decode every image into a new one (a thread pool: PIL releases the GIL).
        The pixels are written to a temp file renamed into place, then the index, so that a killed
        build leaves no cache that looks complete."""
        pixels_path, index_path = cls.files(paths, cache_dir, size)
        cached = cls.open(pixels_path, index_path, len(paths))
        if cached is not None:
            return cached
        cache_dir = Path(cache_dir)
        check_writable(cache_dir, "--cache-dir")
        remove_stale_temps(cache_dir, [pixels_path.name, index_path.name])
        with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
            sizes = np.array([cached_size(w, h, size) for w, h in pool.map(image_size, paths)], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1] * 3)])
        free = shutil.disk_usage(cache_dir).free
        if free < offsets[-1] * 1.05:
            raise UserError(f"--cache-dir {cache_dir} has {free / 2**30:.1f} GiB free, but {len(paths)} images at "
                            f"--cache-size {size} need {offsets[-1] / 2**30:.1f} GiB; free some space, choose "
                            "another folder or a smaller --cache-size, or leave --cache-size 0 (no cache)")

        def write(f):
            with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool, \
                    progress_bar(desc=f"cache {size}px", total=len(paths), enabled=progress, unit="img") as bar:
                for start in range(0, len(paths), 256):  # in chunks: finished images never pile up in memory
                    chunk = range(start, min(start + 256, len(paths)))
                    for img in pool.map(decode_resized, [paths[i] for i in chunk], [sizes[i] for i in chunk]):
                        f.write(img.tobytes())
                        bar.update()

        atomic_write(pixels_path, write)
        atomic_save_npz(index_path, offsets=offsets, sizes=sizes)
        return cls(pixels_path, offsets[:-1], sizes)
