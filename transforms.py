"""Train and eval pipelines side by side. Every script builds its inputs here, from the settings a
checkpoint stores (image size, mean, std), so that train, val, ensemble, predict and report agree."""
import torch
from PIL import Image
from torchvision.transforms import v2

from data import load_rgb
from fused import FusedTrainTransform
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_AUGS = ("report", "fused", "fused-gpu")


def train_transform(img_size, *, aug="report", mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """aug: report (the report's chain, on decoded PIL images, as in its torchvision v1 code), fused (the
    same random maps as one warp from a reduced JPEG decode; it reads the path itself) or fused-gpu (see
    fused.FusedTrainTransform)."""
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


def renormalize(images, source, target):
    """A device batch made by source's pipeline (normalised with its mean/std at its img_size), as target's
    would give it: un-normalised, resized to target's img_size (bilinear, antialiased), normalised with
    target's mean/std. source and target: dicts (specs, checkpoints) with img_size, mean and std. The same
    tensor when they agree."""
    size, mean, std = (target[key] for key in ("img_size", "mean", "std"))
    if size == source["img_size"] and list(mean) == list(source["mean"]) and list(std) == list(source["std"]):
        return images

    def column(values):
        return torch.tensor(values, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    pixels = images * column(source["std"]) + column(source["mean"])
    if size != source["img_size"]:
        pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                                                 antialias=True)
    return (pixels - column(mean)) / column(std)
