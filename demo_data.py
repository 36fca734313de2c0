"""The built-in demo dataset: coloured patterns on noisy backgrounds, learnable in a few CPU epochs
(`python data.py make-demo DIR`)."""
from pathlib import Path

import numpy as np
from PIL import Image

from utils import atomic_write_text

DEMO_CLASSES = 16  # more than 10, so numeric and lexicographic class orders differ
# a class is a colour (4 hues, dark for classes 0-7, bright for 8-15) and a pattern over the whole image, so that
# any crop of the report's augmentation still shows it
DEMO_PATTERNS = ("stripes", "checker", "dots", "grid")
DEMO_FORMATS = ((".jpg", "JPEG"), (".png", "PNG"), (".JPEG", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP"))


def demo_image(label, rng):
    """Class `label`'s pattern in its colour over a random background, at a random size, period and angle."""
    w, h = int(rng.integers(48, 160)), int(rng.integers(48, 160))
    background = rng.integers(0, 256, 3)
    hue = (label % 4) / 4 + rng.uniform(-0.04, 0.04)
    colour = 255 * np.array(_hsv_to_rgb(hue % 1, 0.9, 0.4 + 0.5 * (label // 8)))
    period = rng.uniform(0.15, 0.3) * min(w, h)
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:h, 0:w] + rng.uniform(0, period, (2, 1, 1))
    u, v = x * np.cos(angle) + y * np.sin(angle), y * np.cos(angle) - x * np.sin(angle)  # rotated coordinates
    pattern = DEMO_PATTERNS[(label // 4) % 4]
    if pattern == "stripes":
        mask = u % period < period / 2
    elif pattern == "checker":
        mask = (u // period + v // period) % 2 == 0
    elif pattern == "dots":
        mask = (u % period - period / 2) ** 2 + (v % period - period / 2) ** 2 < (period / 3) ** 2
    else:
        mask = (u % period < period / 5) | (v % period < period / 5)
    pixels = np.where(mask[..., None], colour, background) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def make_demo(out_dir, seed=0, train_per_class=40, val_per_class=20, test_per_class=20):
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
