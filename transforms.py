"""Train and eval pipelines side by side. Every script builds its eval inputs here, from the settings a
checkpoint stores (eval_transform_of: eval size, interpolation, crop fraction, mean, std), so that train, val,
ensemble, predict, report and export agree."""
import math

import torch
from PIL import Image
from torchvision.transforms import v2

from data import load_rgb
from fused import FusedTrainTransform
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_AUGS = ("report", "fused", "fused-gpu", "crop-flip")
AUTO_AUGMENTS = ("none", "trivial")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def interpolation_mode(name):
    if name not in INTERPOLATIONS:
        raise UserError(f"interpolation '{name}' is not one of {', '.join(INTERPOLATIONS)}")
    return v2.InterpolationMode(name)


def crop_augment(auto_augment="none", random_erase=0.0, mean=IMAGENET_MEAN):
    """What --auto-augment and --random-erase add to the fused paths: a map of the resized uint8 crop (PIL),
    before the warp, or None when both are off. RandomErasing fills with the mean colour there, which the
    normalisation makes 0, as the other paths' erasing after it."""
    steps = [v2.TrivialAugmentWide()] if auto_augment == "trivial" else []
    if random_erase:
        steps += [v2.PILToTensor(), v2.RandomErasing(random_erase, value=[round(255 * m) for m in mean]),
                  v2.ToPILImage()]
    return v2.Compose(steps) if steps else None


def train_transform(img_size, *, aug="report", mean=IMAGENET_MEAN, std=IMAGENET_STD, auto_augment="none",
                    random_erase=0.0, interpolation="bilinear"):
    """aug: report (the report's chain, on decoded PIL images, as in its torchvision v1 code), crop-flip
    (RandomResizedCrop and flip alone, the usual fine-tuning chain), fused (the report's random maps as one
    warp from a reduced JPEG decode; it reads the path itself) or fused-gpu (see fused.FusedTrainTransform).
    auto_augment "trivial" adds TrivialAugmentWide after the geometric steps, random_erase P RandomErasing
    (probability P) after the normalisation (fused: both on the crop before the warp, see crop_augment)."""
    if aug not in TRAIN_AUGS:
        raise UserError(f"--aug {aug} is not one of {', '.join(TRAIN_AUGS)}")
    if auto_augment not in AUTO_AUGMENTS:
        raise UserError(f"--auto-augment {auto_augment} is not one of {', '.join(AUTO_AUGMENTS)}")
    if not 0 <= random_erase <= 1:
        raise UserError(f"--random-erase {random_erase} is a probability: use 0 to 1")
    if aug in ("fused", "fused-gpu"):
        return FusedTrainTransform(img_size, mean=mean, std=std, device_warp=aug == "fused-gpu",
                                   crop_augment=crop_augment(auto_augment, random_erase, mean))
    geometric = [v2.RandomResizedCrop(img_size, interpolation=interpolation_mode(interpolation)),
                 v2.RandomHorizontalFlip()]
    if aug == "report":
        geometric += [v2.RandomAffine(degrees=30), v2.RandomPerspective()]
    return v2.Compose([
        *geometric,
        *([v2.TrivialAugmentWide(interpolation=interpolation_mode(interpolation))] if auto_augment == "trivial"
          else []),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        *([v2.RandomErasing(random_erase)] if random_erase else []),
    ])


def eval_transform(img_size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=None):
    return EvalTransform(img_size, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)


def eval_transform_of(spec):
    """The eval pipeline of a checkpoint (member or ensemble) or of its spec: its eval_size, interpolation,
    crop_pct, mean and std (checkpoints.SPEC_KEYS)."""
    return eval_transform(spec["eval_size"], mean=spec["mean"], std=spec["std"],
                          interpolation=spec["interpolation"], crop_pct=spec["crop_pct"])


def input_transform(pipelines):
    """The eval inputs of a model that takes these pipelines (checkpoints.input_pipelines): a member's or a
    uniform ensemble's one EvalTransform, or for a mixed ensemble a PipelineTuple of each pipeline's."""
    if len(pipelines) == 1:
        return eval_transform_of(pipelines[0])
    return PipelineTuple([eval_transform_of(pipeline) for pipeline in pipelines])


def resize_size(img_size, crop_pct):
    """The resize before the center crop of crop_pct (timm's: floor(img_size / crop_pct) on the shorter side)."""
    return math.floor(img_size / crop_pct)


class EvalTransform:
    """The eval pipeline: crop_pct None (the report's): resize to img_size x img_size; else timm's: resize the
    shorter side to floor(img_size / crop_pct), center-crop img_size x img_size; then ToTensor, Normalize.
    Given a path (as ImageDataset gives it), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps the resize's input size (img_size, or the shorter side's target) each way, so the same resize reads
    fewer pixels: about 1.8x faster for 500-1000 px photos at 224, with pixels within about half a level (of
    255) of the full decode's on average."""
    reads_path = True

    def __init__(self, img_size, *, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear", crop_pct=None):
        self.img_size, self.crop_pct = img_size, crop_pct
        mode = interpolation_mode(interpolation)
        if crop_pct is None:
            self.draft_size, resize = img_size, [v2.Resize((img_size, img_size), interpolation=mode)]
        else:
            if not 0 < crop_pct <= 1:
                raise UserError(f"crop fraction {crop_pct} must be above 0 and at most 1 (--crop-pct)")
            self.draft_size = resize_size(img_size, crop_pct)
            resize = [v2.Resize(self.draft_size, interpolation=mode), v2.CenterCrop(img_size)]
        self.pipeline = v2.Compose([
            *resize,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ])

    def kept_box(self, width, height):
        """The (left, top, right, bottom) box of a width x height image that the pipeline keeps: all of it, or
        the part the center crop keeps (report.py draws Grad-CAM maps over that part)."""
        if self.crop_pct is None:
            return 0, 0, width, height
        side = self.img_size * min(width, height) / self.draft_size  # the crop's side in the image's pixels
        left, top = (width - side) / 2, (height - side) / 2
        return round(left), round(top), round(left + side), round(top + side)

    def __call__(self, source):
        """source: a file's path, or a decoded PIL image (used as it is)."""
        return self.pipeline(source if isinstance(source, Image.Image) else load_rgb(source, self.draft_size))


class PipelineTuple:
    """Several pipelines over one decode of each image (a mixed ensemble's members each take their own): a
    tuple of tensors, one per pipeline. Eval pipelines (EvalTransform) alone: a JPEG is decoded at the largest
    reduced size any of them needs (draft_size), so a pipeline of a smaller one reads more pixels than alone,
    and its pixels can differ from its own decode's by about half a level where its own decode would have been
    reduced further; any other pipeline: the full image, as ImageDataset gives it. Random pipelines (train
    views) each start from the generator state of the call, which ImageDataset seeds per sample: every
    pipeline draws the same random numbers, so all see the same crop, flip and angle, each at its own size, as
    each alone would with that seed."""
    reads_path = True

    def __init__(self, pipelines):
        self.pipelines = list(pipelines)
        drafts = [getattr(pipeline, "draft_size", None) for pipeline in self.pipelines]
        self.draft_size = None if None in drafts else max(drafts)

    def __call__(self, source):
        """source: a file's path, or a decoded PIL image (used as it is)."""
        image = source if isinstance(source, Image.Image) else load_rgb(source, self.draft_size)
        state = torch.random.get_rng_state()
        outputs = []
        for pipeline in self.pipelines:
            torch.random.set_rng_state(state)
            outputs.append(pipeline(image))
        return tuple(outputs)


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
