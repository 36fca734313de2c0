"""The built-in demo dataset: coloured shapes on noisy backgrounds, learnable in a few CPU epochs
(`python data.py make-demo DIR`)."""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils import atomic_write_text

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
