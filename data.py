"""Datasets, augmentation pipelines, samplers and the built-in demo dataset.

Layout: DATA/train/<class>/*, DATA/val/<class>/*, DATA/test/* (flat).
`python data.py make-demo OUT` writes a small synthetic dataset in that layout.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from utils import (UserError, atomic_save_npz, atomic_write, atomic_write_text, check_writable,
                   remove_stale_temps, run_main)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def scan_images(paths, strict=False, workers=None, skip_hint="run without --strict to skip them"):
    """Return the readable paths; warn about (or, with strict, refuse) the rest, by path.
    skip_hint: how the calling script skips them, for the error."""
    # PIL releases the GIL while decoding, so threads scale without the cost of spawning processes
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        reasons = list(pool.map(check_image, paths))
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    if bad and strict:
        raise UserError(f"unreadable image {bad[0][0]} ({bad[0][1]}) and {len(bad) - 1} more; "
                        f"remove them or {skip_hint}")
    for path, reason in bad:
        warnings.warn(f"skipping unreadable image {path} ({reason})", stacklevel=2)
    bad_paths = {p for p, _ in bad}
    return [p for p in paths if p not in bad_paths], bad


def load_split(data_dir, split, class_names=None, strict=False):
    """Return (paths, labels, class_names) of DATA/split; class_names defaults to the split's own."""
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
    good, bad = scan_images(paths, strict=strict)
    bad_paths = {p for p, _ in bad}
    labels = [label for p, label in zip(paths, labels) if p not in bad_paths]
    if not good:
        raise UserError(f"folder {split_dir} holds no readable images")
    return good, labels, class_names


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
# pipelines (the report's, applied to PIL images as in its torchvision v1 code)

def train_transform(img_size, *, aug="report", mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """aug: report (the chain below, on decoded PIL images), fused (the same random maps as one warp
    from a reduced JPEG decode; it reads the path itself) or fused-gpu (see FusedTrainTransform)."""
    if aug not in TRAIN_AUGS:
        raise UserError(f"--aug {aug} is not one of {', '.join(TRAIN_AUGS)}")
    if aug != "report":
        return FusedTrainTransform(img_size, mean=mean, std=std, device_warp=aug == "fused-gpu")
    return v2.Compose([
        v2.RandomResizedCrop(img_size),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=30),
        v2.RandomPerspective(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


def eval_transform(img_size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return EvalTransform(img_size, mean=mean, std=std)


class EvalTransform:
    """The report's eval pipeline: resize to img_size x img_size, ToTensor, Normalize. Given a path (as
    ImageDataset gives it), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    img_size pixels each way, so the same resize reads fewer pixels: about 1.8x faster for 500-1000 px
    photos at 224, with pixels within about half a level (of 255) of the full decode's on average."""
    reads_path = True

    def __init__(self, img_size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.img_size = img_size
        self.pipeline = v2.Compose([
            v2.Resize((img_size, img_size)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])

    def __call__(self, source):
        """source: a file's path, or a decoded PIL image (used as it is)."""
        return self.pipeline(source if isinstance(source, Image.Image) else load_rgb(source, self.img_size))


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
# decoded-image cache: train images decoded once, then memory-mapped by every worker and rank

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
                    tqdm(total=len(paths), desc=f"cache {size}px", unit="img", disable=None if progress else True,
                         dynamic_ncols=True) as bar:
                for start in range(0, len(paths), 256):  # in chunks: finished images never pile up in memory
                    chunk = range(start, min(start + 256, len(paths)))
                    for img in pool.map(decode_resized, [paths[i] for i in chunk], [sizes[i] for i in chunk]):
                        f.write(img.tobytes())
                        bar.update()

        atomic_write(pixels_path, write)
        atomic_save_npz(index_path, offsets=offsets, sizes=sizes)
        return cls(pixels_path, offsets[:-1], sizes)


# ----------------------------------------------------------------------------
# fused train augmentation: the report's chain (RandomResizedCrop, RandomHorizontalFlip,
# RandomAffine(30), RandomPerspective) is a chain of projective maps. The same random parameters are
# drawn; the crop is resized as RandomResizedCrop resizes it (PIL, antialiased), from a JPEG decoded at
# the smallest DCT scale at which the crop still has the output's resolution; flip, rotation and
# perspective are composed into one homography and applied as one warp (grid_sample, edges as PIL's).
#
# Coordinates are normalised: (0, 0) is an image's top-left corner, (1, 1) its bottom-right one, and
# pixel x's centre is (x + 0.5) / width, as in PIL. "maps" (2, 3, 3) take an output point to [0] the
# RandomResizedCrop output, where the pixel is read, and [1] the perspective's input. An output pixel
# is black (the chain's fill, 0) unless both points lie in [0, 1): the rotation's and the
# perspective's corners.

TRAIN_AUGS = ("report", "fused", "fused-gpu")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_LOG_RATIO = tuple(torch.log(torch.tensor(RRC_RATIO)).tolist())  # float32, as v2 computes it
AFFINE_DEGREES = 30.0
PERSPECTIVE_DISTORTION, PERSPECTIVE_P, FLIP_P = 0.5, 0.5, 0.5


def sample_train_params(width, height, img_size):
    """Draw the chain's parameters for a width x height image from torch's global RNG with the calls,
    in the order, of torchvision v2's RandomResizedCrop(img_size), RandomHorizontalFlip(),
    RandomAffine(degrees=30) and RandomPerspective(): under one seed both draw the same values."""
    area = width * height
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*RRC_SCALE).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(*RRC_LOG_RATIO)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            break
    else:  # v2's fallback: a central crop, clipped to the ratio range
        if width / height < RRC_RATIO[0]:
            w, h = width, int(round(width / RRC_RATIO[0]))
        elif width / height > RRC_RATIO[1]:
            w, h = int(round(height * RRC_RATIO[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    flip = bool(torch.rand(1) < FLIP_P)
    angle = torch.empty(1).uniform_(-AFFINE_DEGREES, AFFINE_DEGREES).item()
    endpoints = None
    if torch.rand(1) < PERSPECTIVE_P:
        bound = int(PERSPECTIVE_DISTORTION * (img_size // 2)) + 1
        low, high = (0, bound), (img_size - bound, img_size)
        endpoints = [[int(torch.randint(*x, size=(1,))), int(torch.randint(*y, size=(1,)))]
                     for x, y in ((low, low), (high, low), (high, high), (low, high))]
    return {"top": top, "left": left, "height": h, "width": w, "flip": flip, "angle": angle, "endpoints": endpoints}


def homography(src, dst):
    """The 3x3 projective map (float64) that takes the four points src to dst."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    return np.append(np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)),
                     1.0).reshape(3, 3)


def train_maps(params, img_size):
    """The (2, 3, 3) float64 maps (see above) of sample_train_params' parameters."""
    to_pixels, to_unit = np.diag([img_size, img_size, 1.0]), np.diag([1 / img_size, 1 / img_size, 1.0])
    perspective = np.eye(3)
    if params["endpoints"] is not None:
        # as torchvision's: in pixels, from the drawn corners (output) to the image corners (input)
        corners = [[0, 0], [img_size - 1, 0], [img_size - 1, img_size - 1], [0, img_size - 1]]
        perspective = to_unit @ homography(params["endpoints"], corners) @ to_pixels
    # the inverse rotation about the centre that torchvision hands PIL (output -> input)
    cos, sin = math.cos(math.radians(params["angle"])), math.sin(math.radians(params["angle"]))
    rotation = np.array([[cos, sin, 0.5 * (1 - cos - sin)], [-sin, cos, 0.5 * (1 - cos + sin)], [0, 0, 1]])
    flip = np.array([[-1.0, 0, 1], [0, 1, 0], [0, 0, 1]]) if params["flip"] else np.eye(3)
    return np.stack([flip @ rotation @ perspective, perspective])


def crop_box(params, scale=1.0):
    """The crop (left, top, right, bottom) in pixels of the image decoded at `scale`."""
    left, top = params["left"] * scale, params["top"] * scale
    return left, top, left + params["width"] * scale, top + params["height"] * scale


def draft_for_crop(img, params, img_size):
    """Have PIL decode a JPEG at 1/2, 1/4 or 1/8 scale where the crop keeps img_size pixels or more each
    way, so that nothing is upsampled that the chain does not upsample. Returns the scale (decoded pixels
    per original pixel): 1 for small crops and for other formats."""
    width, height = img.size
    factor = next((f for f in (8, 4, 2) if f * img_size <= min(params["width"], params["height"])), 1)
    drafted = img.draft("RGB", (width // factor, height // factor)) if factor > 1 else None
    return 1.0 if drafted is None else drafted[1][2] / width


@functools.lru_cache(maxsize=8)
def _pixel_centres(img_size, device):
    centres = (torch.arange(img_size, dtype=torch.float32, device=device) + 0.5) / img_size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y, torch.ones_like(x)], dim=-1)  # (S, S, 3)


def map_points(maps, img_size):
    """maps (B, K, 3, 3) -> (B, K, S, S, 2): where each output pixel centre lands in each frame."""
    batch, frames = maps.shape[:2]
    # one (S*S, 3) x (3, B*K*3) product: batched 3x3 products are slow on the CPU
    centres = _pixel_centres(img_size, maps.device).to(maps.dtype).view(-1, 3)
    points = centres @ maps.permute(3, 0, 1, 2).reshape(3, -1)
    points = points.view(img_size, img_size, batch, frames, 3).permute(2, 3, 0, 1, 4)
    return points[..., :2] / points[..., 2:]


def valid_mask(points):
    """(B, K, S, S, 2) points -> (B, S, S): the pixels whose points all lie in [0, 1)."""
    return ((points >= 0) & (points < 1)).all(dim=-1).all(dim=1)


def valid_region(maps, img_size):
    """valid_mask for one image on the CPU, without a division per pixel: a frame's point lies in [0, 1)
    where 0 <= row_i . p < row_2 . p (i = x, y), 8 half-planes of the output (the maps' denominators
    row_2 . p stay positive over the output at the chain's distortion). Each output row is one
    interval of x. Returns bool (img_size, img_size)."""
    planes = np.concatenate([maps[:, :2], maps[:, 2:] - maps[:, :2]], axis=1).reshape(-1, 3)  # (8, 3)
    centres = (np.arange(img_size) + 0.5) / img_size
    slope = planes[:, :1]
    bound = -(planes[:, 1:2] * centres + planes[:, 2:3])  # plane holds where slope * x >= bound
    with np.errstate(divide="ignore", invalid="ignore"):
        x_limit = bound / slope
    low = np.where(slope > 0, x_limit, -np.inf).max(axis=0)
    high = np.where(slope < 0, x_limit, np.inf).min(axis=0)
    rows = np.where(slope == 0, bound <= 0, True).all(axis=0)
    return (centres >= low[:, None]) & (centres < high[:, None]) & rows[:, None]


def sample_bilinear(pixels, points):
    """Bilinear samples of float pixels (B, C, H, W) at normalised points (B, S, S, 2), edges clamped as
    PIL's bilinear transform clamps them."""
    return F.grid_sample(pixels, points * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)


def normalize_255(pixels, mean, std):
    """Float pixels (..., 3, H, W) in 0..255 -> ToDtype(scale=True) then Normalize, in place."""
    mean = torch.tensor(mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(std, device=pixels.device).view(3, 1, 1)
    return pixels.mul_(1 / (255 * std)).sub_(mean / std)


def resize_crop(img, box, img_size):
    """The crop box (left, top, right, bottom; pixels) of a PIL RGB image resized to img_size x img_size as
    RandomResizedCrop resizes it (PIL, antialiased: a bilinear sample of a larger crop would alias)."""
    return img.resize((img_size, img_size), Image.Resampling.BILINEAR, box=box)


def warp_image(img, maps, box, img_size):
    """The CPU path: resize_crop, then warp_crop."""
    return warp_crop(resize_crop(img, box, img_size), maps, img_size)


def warp_crop(crop, maps, img_size):
    """A resized crop (PIL RGB, img_size x img_size) flipped, rotated and distorted by maps (2, 3, 3) in one
    warp (nearest or bilinear, see warp_mode) -> float (3, img_size, img_size) in 0..255, 0 (black) where
    the chain fills."""
    pixels = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float()
    # the points of one image as outer sums of pixel centres: cheaper than map_points' general product
    m = (np.array([[2.0, 0, -1], [0, 2, -1], [0, 0, 1]]) @ maps[0]).tolist()  # to grid_sample's -1..1
    centres = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size
    row, col = centres[:, None], centres[None, :]
    denominator = col * m[2][0] + (row * m[2][1] + m[2][2])
    grid = torch.empty(1, img_size, img_size, 2)
    torch.div(col * m[0][0] + (row * m[0][1] + m[0][2]), denominator, out=grid[0, ..., 0])
    torch.div(col * m[1][0] + (row * m[1][1] + m[1][2]), denominator, out=grid[0, ..., 1])
    out = F.grid_sample(pixels, grid, mode=warp_mode(maps), padding_mode="border", align_corners=False)[0]
    return out.mul_(torch.from_numpy(valid_region(maps, img_size)))


def warp_mode(maps):
    """The chain rotates with nearest-neighbour sampling (RandomAffine's default) and distorts with
    bilinear (RandomPerspective's): without a perspective (identity maps[1]) the warp is nearest, so the
    images are as sharp as the chain's; with one, the one bilinear warp blurs as its one bilinear op."""
    return "nearest" if np.array_equal(maps[1], np.eye(3)) else "bilinear"


class FusedTrainTransform:
    """The report's train chain as one warp per image (see above). It is called with the file's path
    (ImageDataset passes paths to transforms with reads_path) and draws from torch's global RNG, so
    ImageDataset's (index, seed) items make it deterministic.

    device_warp=False ("fused"): returns the normalised float (3, img_size, img_size) tensor.
    device_warp=True ("fused-gpu"): returns (uint8 (3, img_size, img_size), float32 maps (2, 3, 3)): the
    crop, cut and resized here as the chain's first step does; the loop passes the batch of both to
    warp_batch on the GPU, which flips, rotates, distorts and normalises it."""
    reads_path = True

    def __init__(self, img_size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, device_warp=False):
        self.img_size, self.mean, self.std, self.device_warp = img_size, tuple(mean), tuple(std), device_warp

    def __call__(self, source):
        """source: a file's path (decoded here, at reduced size where the crop allows it), or a decoded
        RGB PIL image (from a DecodedCache)."""
        if isinstance(source, Image.Image):
            params = sample_train_params(source.width, source.height, self.img_size)
            return self.warp(source, params, scale=1.0)
        with Image.open(source) as img:
            params = sample_train_params(img.width, img.height, self.img_size)
            scale = draft_for_crop(img, params, self.img_size)
            img.load()
            return self.warp(img if img.mode == "RGB" else to_rgb(img), params, scale)  # most JPEGs: no copy

    def warp(self, rgb, params, scale):
        maps = train_maps(params, self.img_size)
        crop = resize_crop(rgb, crop_box(params, scale), self.img_size)
        if self.device_warp:
            return v2.functional.pil_to_tensor(crop), torch.from_numpy(maps).float()
        return normalize_255(warp_crop(crop, maps, self.img_size), self.mean, self.std)


def warp_batch(images, maps, img_size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The device half of aug="fused-gpu": uint8 images (B, 3, H, W) and maps (B, K, 3, 3) on any device
    -> normalised float (B, 3, img_size, img_size): the CPU path's warp (nearest or bilinear per image, as
    warp_mode), with the fill wherever a point of any frame leaves [0, 1)."""
    points, pixels = map_points(maps.float(), img_size), images.float()
    # both samplings for the whole batch, then a per-image choice: branching on which images need which
    # would wait for the device every step
    bilinear = sample_bilinear(pixels, points[:, 0])
    nearest = F.grid_sample(pixels, points[:, 0] * 2 - 1, mode="nearest", padding_mode="border", align_corners=False)
    no_perspective = (maps[:, 1] == torch.eye(3, device=maps.device)).flatten(1).all(1)
    out = torch.where(no_perspective[:, None, None, None], nearest, bilinear)
    return normalize_255(out.mul_(valid_mask(points)[:, None]), mean, std)


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


# ----------------------------------------------------------------------------
# the demo dataset: coloured shapes on noisy backgrounds, learnable in a few CPU epochs

DEMO_CLASSES = 16  # more than 10, so numeric and lexicographic class orders differ
DEMO_SHAPES = ("ellipse", "rectangle", "triangle", "cross")
DEMO_FORMATS = ((".jpg", "JPEG"), (".png", "PNG"), (".JPEG", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP"))


def demo_image(label, rng):
    size = int(rng.integers(48, 160)), int(rng.integers(48, 160))
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 25, (size[1], size[0], 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    hue = (label % 4) / 4 + rng.uniform(-0.04, 0.04)
    colour = tuple(int(255 * c) for c in _hsv_to_rgb(hue % 1, 0.9, 0.4 + 0.5 * (label // 8)))
    shape = DEMO_SHAPES[(label // 4) % 4]
    w, h = size
    cx, cy, r = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h, rng.uniform(0.25, 0.4) * min(w, h)
    draw = ImageDraw.Draw(img)
    if shape == "ellipse":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "rectangle":
        draw.rectangle((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
    return img


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def make_demo(out_dir, seed=0, train_per_class=40, val_per_class=10, test_per_class=6):
    """Write the demo dataset (and test_labels.csv beside test/, to score predictions)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    counter = 0
    test_rows = []
    for split, per_class in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
        for label in range(DEMO_CLASSES):
            folder = out_dir / split if split == "test" else out_dir / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class):
                suffix, fmt = DEMO_FORMATS[counter % len(DEMO_FORMATS)]
                name = f"{counter:05d}{suffix}" if split != "test" else f"img_{rng.integers(16**8):08x}{suffix}"
                demo_image(label, rng).save(folder / name, fmt)
                if split == "test":
                    test_rows.append(f"{Path(name).stem},{label}")
                counter += 1
    atomic_write_text(out_dir / "test_labels.csv", "image_name,label\n" + "\n".join(sorted(test_rows)) + "\n")
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("make-demo", help="write the synthetic demo dataset",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("out", type=Path, help="output folder (gets train/, val/, test/, test_labels.csv)")
    demo.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    demo.add_argument("--train-per-class", type=int, default=40, help="train images per class")
    demo.add_argument("--val-per-class", type=int, default=10, help="val images per class")
    demo.add_argument("--test-per-class", type=int, default=6, help="test images per class")
    scan = sub.add_parser("scan", help="check every image of a data folder and list the unreadable ones",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    scan.add_argument("data_dir", type=Path, help="data folder with train/, val/ and test/")
    args = parser.parse_args()
    if args.command == "make-demo":
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
            raise UserError(f"{args.out} exists and is not an empty folder; choose a new folder")
        make_demo(args.out, args.seed, args.train_per_class, args.val_per_class, args.test_per_class)
        print(f"wrote the demo dataset ({DEMO_CLASSES} classes) to {args.out}")
    else:
        train = load_split(args.data_dir, "train")
        val = load_split(args.data_dir, "val", train[2])
        test, _ = load_test(args.data_dir / "test", strict=False)
        print(f"{len(train[2])} classes; readable images: train {len(train[0])}, val {len(val[0])}, test {len(test)}")


if __name__ == "__main__":
    run_main(main)
