"""The report's train augmentation fused into one warp per image (train.py --aug fused / fused-gpu).

The report's chain (RandomResizedCrop, RandomHorizontalFlip, RandomAffine(30), RandomPerspective) is a
chain of projective maps. The same random parameters are
drawn; the crop is resized as RandomResizedCrop resizes it (PIL, antialiased), from a JPEG decoded at
the smallest DCT scale at which the crop still has the output's resolution; flip, rotation and
perspective are composed into one homography and applied as one warp (grid_sample, edges as PIL's).

Coordinates are normalised: (0, 0) is an image's top-left corner, (1, 1) its bottom-right one, and
pixel x's centre is (x + 0.5) / width, as in PIL. "maps" (2, 3, 3) take an output point to [0] the
RandomResizedCrop output, where the pixel is read, and [1] the perspective's input. An output pixel
is black (the chain's fill, 0) unless both points lie in [0, 1): the rotation's and the
perspective's corners.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from data import to_rgb

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
    warp_batch on the GPU, which flips, rotates, distorts and normalises it.
    crop_augment: a map of the resized crop (PIL) applied before the warp, on either path (TrivialAugmentWide,
    RandomErasing: transforms.crop_augment), or None."""
    reads_path = True

    def __init__(self, img_size, *, mean, std, device_warp=False, crop_augment=None):
        self.img_size, self.mean, self.std, self.device_warp = img_size, tuple(mean), tuple(std), device_warp
        self.crop_augment = crop_augment

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
        if self.crop_augment is not None:
            crop = self.crop_augment(crop)
        if self.device_warp:
            return v2.functional.pil_to_tensor(crop), torch.from_numpy(maps).float()
        return normalize_255(warp_crop(crop, maps, self.img_size), self.mean, self.std)


def warp_on_device(batch, img_size, *, mean, std, device, memory_format):
    """A fused-gpu loader batch (uint8 images, maps) moved to the device and warped there (warp_batch)."""
    pixels, maps = (t.to(device, non_blocking=True) for t in batch)
    return warp_batch(pixels, maps, img_size, mean=mean, std=std).contiguous(memory_format=memory_format)


def warp_batch(images, maps, img_size, *, mean, std):
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
