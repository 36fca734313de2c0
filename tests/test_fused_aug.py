"""The fused train augmentation (fused.FusedTrainTransform, warp_batch) against torchvision's chain."""
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.functional import _get_inverse_affine_matrix, _get_perspective_coeffs

import data
import engine
import fused
import models
import transforms
from utils import UserError

S = 64
IMAGENET = dict(mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD)
IDENTITY = {"top": 0, "left": 0, "height": S, "width": S, "flip": False, "angle": 0.0, "endpoints": None}
CORNERS = [[0, 0], [S - 1, 0], [S - 1, S - 1], [0, S - 1]]


def textured(width, height):
    """Sinusoids of a few pixels' period: a half-pixel error in a map shows, interpolation barely does."""
    y, x = np.mgrid[0:height, 0:width]
    channels = [128 + 100 * np.sin(x / 5.0), 128 + 100 * np.cos(y / 7.0), 128 + 60 * np.sin((x + y) / 9.0)]
    return Image.fromarray(np.stack(channels, -1).astype(np.uint8))


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("fused") / "textured.png"
    textured(128, 96).save(path)
    return path


def warp(img, params):
    """The fused CPU warp of PIL img with explicit parameters: float (3, S, S) in 0..255."""
    return fused.warp_image(img, fused.train_maps(params, S), fused.crop_box(params), S)


def pixels(img):
    return v2.functional.pil_to_tensor(img).float()


# ----------------------------------------------------------------------------
# each map alone against torchvision's op on the same PIL image

def test_single_maps_match_torchvision_ops():
    src = textured(128, 96)
    square = src.crop((0, 0, S, S))
    close = dict(atol=1e-3, rtol=0)
    torch.testing.assert_close(warp(square, IDENTITY), pixels(square), **close)
    torch.testing.assert_close(warp(square, dict(IDENTITY, flip=True)),
                               pixels(v2.functional.horizontal_flip(square)), **close)
    crop = dict(IDENTITY, top=10, left=20)
    torch.testing.assert_close(warp(src, crop), pixels(v2.functional.resized_crop(src, 10, 20, S, S, [S, S])),
                               **close)
    # a rotation alone is nearest-neighbour, as RandomAffine's: the same pixels but for a rare tie
    for angle in (17.3, -29.0, 5.0):
        expected = v2.functional.affine(square, angle=angle, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                                        interpolation=v2.InterpolationMode.NEAREST)
        assert ((warp(square, dict(IDENTITY, angle=angle)) - pixels(expected)).abs() > 0).float().mean() < 1e-3
    # with a perspective the one warp is bilinear; PIL's bilinear warps truncate: within one level of ours
    endpoints = [[3, 10], [60, 2], [55, 50], [8, 63]]
    expected = v2.functional.perspective(square, CORNERS, endpoints)
    assert (warp(square, dict(IDENTITY, endpoints=endpoints)) - pixels(expected)).abs().max() <= 1.001
    # an upsampling crop: PIL's resize and the bilinear warp differ only at the borders
    up = dict(IDENTITY, top=10, left=20, height=40, width=30)
    assert (warp(src, up) - pixels(v2.functional.resized_crop(src, 10, 20, 40, 30, [S, S]))).abs().mean() < 1


def test_downscaled_crops_are_antialiased_as_the_chain():
    """A 1-pixel checkerboard shrunk 4x is flat grey through RandomResizedCrop's antialiased resize; a plain
    bilinear sample of it would keep a full-contrast pattern, which the model would learn and never see
    in the resized val images."""
    checker = Image.fromarray((np.indices((4 * S, 4 * S)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    whole = dict(IDENTITY, height=4 * S, width=4 * S)
    got = warp(checker, whole)
    expected = pixels(v2.functional.resized_crop(checker, 0, 0, 4 * S, 4 * S, [S, S]))
    assert (got - expected).abs().max() <= 1e-3 and got[:, 1:-1, 1:-1].std() < 2
    turned = warp(checker, dict(whole, angle=20.0))[:, S // 4:-S // 4, S // 4:-S // 4]  # the centre: no fill
    assert (turned - 127.5).abs().max() < 8


def test_composed_map_is_the_chain_of_torchvision_inverse_maps():
    """maps[0] sends an output point where the chain's inverse maps, applied one after another, send it."""
    params = {"top": 7, "left": 11, "height": 50, "width": 70, "flip": True, "angle": 23.0,
              "endpoints": [[5, 9], [58, 1], [62, 55], [2, 60]]}
    maps = fused.train_maps(params, S)
    persp = np.append(_get_perspective_coeffs(CORNERS, params["endpoints"]), 1.0).reshape(3, 3)
    rot = np.vstack([np.reshape(_get_inverse_affine_matrix([S / 2, S / 2], params["angle"], [0, 0], 1.0,
                                                           [0.0, 0.0]), (2, 3)), [0, 0, 1]])
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, S, (20, 2)):
        p = persp @ [x, y, 1]
        p = rot @ (p / p[2])
        p = [S - p[0], p[1]]  # PIL's left-right flip
        expected = [params["left"] + p[0] * params["width"] / S, params["top"] + p[1] * params["height"] / S]
        q = maps[0] @ [x / S, y / S, 1]
        got = [params["left"] + q[0] / q[2] * params["width"], params["top"] + q[1] / q[2] * params["height"]]
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_params_are_torchvision_draws():
    """Under one seed the fused transform draws what v2's chain draws, fallback crops included."""
    image = textured(S, S)
    for width, height in ((128, 96), (20, 400)):  # 20 x 400: no crop fits the ratios, the central fallback
        source = Image.new("RGB", (width, height))
        for seed in range(6):
            torch.manual_seed(seed)
            params = fused.sample_train_params(width, height, S)
            torch.manual_seed(seed)
            crop = v2.RandomResizedCrop(S).make_params([source])
            flip = bool(torch.rand(1) < 0.5)  # what RandomHorizontalFlip's forward draws
            angle = v2.RandomAffine(degrees=30).make_params([image])["angle"]
            perspective = bool(torch.rand(1) < 0.5)
            coeffs = v2.RandomPerspective().make_params([image])["coefficients"] if perspective else None
            assert [params[k] for k in ("top", "left", "height", "width")] == [
                crop["top"], crop["left"], crop["height"], crop["width"]]
            assert (params["flip"], params["angle"], params["endpoints"] is not None) == (flip, angle, perspective)
            if perspective:
                ours = fused.homography(params["endpoints"], CORNERS).ravel()[:8]
                np.testing.assert_allclose(ours, coeffs, rtol=1e-4, atol=1e-4)


def test_fused_is_the_report_chain_under_one_seed(png):
    chain, fused = transforms.train_transform(S), transforms.train_transform(S, aug="fused")
    for seed in range(4):
        torch.manual_seed(seed)
        expected = chain(data.load_rgb(png))
        torch.manual_seed(seed)
        same = (fused(str(png)) - expected).abs().mean()
        torch.manual_seed(seed + 100)
        other = (fused(str(png)) - expected).abs().mean()
        # what differs: the chain's two interpolations (nearest, then bilinear) where one warp does both,
        # and its intermediate roundings
        assert same < 0.05 and same < other / 16, (seed, same, other)


# ----------------------------------------------------------------------------
# output, determinism, the GPU half

def test_output_shape_dtype_and_normalisation(png):
    torch.manual_seed(0)
    out = fused.FusedTrainTransform(S, **IMAGENET)(str(png))
    assert out.shape == (3, S, S) and out.dtype == torch.float32
    mean, std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
    fill = -torch.tensor(mean) / torch.tensor(std)
    # identity maps on a square: exactly ToImage, ToDtype(scale=True), Normalize of the pixels
    img = np.array(textured(S, S))
    expected = v2.functional.normalize(v2.functional.to_dtype(torch.from_numpy(img).permute(2, 0, 1), torch.float32,
                                                              scale=True), mean, std)
    got = fused.normalize_255(torch.from_numpy(img).permute(2, 0, 1).float(), mean, std)
    torch.testing.assert_close(got, expected)
    # a 30 degree turn leaves the corners to the chain's fill: black, normalised
    corner = fused.normalize_255(warp(textured(S, S), dict(IDENTITY, angle=30.0)), mean, std)[:, 0, 0]
    torch.testing.assert_close(corner, fill)
    images, maps = transforms.train_transform(S, aug="fused-gpu")(str(png))
    assert images.shape == (3, S, S) and images.dtype == torch.uint8
    assert maps.shape == (2, 3, 3) and maps.dtype == torch.float32


def test_train_transform_keeps_the_report_chain_and_refuses_unknown_augs():
    chain = transforms.train_transform(S, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD)
    assert [type(t).__name__ for t in chain.transforms][:4] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "RandomAffine", "RandomPerspective"]
    with pytest.raises(UserError, match="--aug fast is not one of report, fused, fused-gpu"):
        transforms.train_transform(S, aug="fast")


def test_dataset_items_are_a_function_of_the_seed(png, tmp_path):
    transform = transforms.train_transform(S, aug="fused")
    dataset = pickle.loads(pickle.dumps(data.ImageDataset([png, png], [3, 4], transform)))
    state = torch.get_rng_state()
    first, label = dataset[(1, 12345)]
    assert label == 4 and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(dataset[(1, 12345)][0], first)
    assert not torch.equal(dataset[(1, 12346)][0], first)
    # a file gone since the scan is skipped with a warning, the label following the image read
    gone = tmp_path / "gone.png"
    dataset = data.ImageDataset([gone, png], [3, 4], transforms.train_transform(S, aug="fused"))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert dataset[(0, 1)][1] == 4


def test_gpu_batch_warp_matches_the_cpu_warp(png):
    src = textured(128, 96)
    for seed in range(4):
        torch.manual_seed(seed)
        # the device warp reads the crop as the workers resize it: then both warps read the same pixels
        params = fused.sample_train_params(128, 96, S)
        maps, box = fused.train_maps(params, S), fused.crop_box(params)
        cpu = fused.warp_image(src, maps, box, S)
        crop = src.resize((S, S), Image.Resampling.BILINEAR, box=box)
        gpu = fused.warp_batch(v2.functional.pil_to_tensor(crop)[None], torch.from_numpy(maps).float()[None], S,
                               mean=(0, 0, 0), std=(1, 1, 1))[0]
        diff = (gpu * 255 - cpu).abs()
        assert (diff > 0.01).float().mean() < 0.002, seed  # a pixel on the mask's edge may differ
    # end to end: the workers' crop then the device warp, against the one-warp CPU path
    for seed in range(3):
        torch.manual_seed(seed)
        images, maps = transforms.train_transform(S, aug="fused-gpu")(str(png))
        torch.manual_seed(seed)
        expected = transforms.train_transform(S, aug="fused")(str(png))
        assert (fused.warp_batch(images[None], maps[None], S, **IMAGENET)[0] - expected).abs().mean() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_batch_warp_on_cuda_matches_cpu(png):
    batch = [transforms.train_transform(S, aug="fused-gpu")(str(png)) for _ in range(4)]
    images, maps = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
    expected = fused.warp_batch(images, maps, S, **IMAGENET)
    got = fused.warp_batch(images.cuda(), maps.cuda(), S, **IMAGENET).cpu()
    assert ((got - expected).abs() > 0.02).float().mean() < 0.002


def test_valid_region_and_denominators():
    """The CPU path's half-plane mask is the per-pixel one, and the maps' denominators stay positive."""
    corners = np.array([[0.0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]])
    for seed in range(200):
        torch.manual_seed(seed)
        maps = fused.train_maps(fused.sample_train_params(300, 200, 224), 224)
        assert (corners @ maps.transpose(0, 2, 1))[..., 2].min() > 0
    for seed in range(10):
        torch.manual_seed(seed)
        maps = fused.train_maps(fused.sample_train_params(300, 200, S), S)
        exact = fused.valid_mask(fused.map_points(torch.from_numpy(maps)[None], S))[0].numpy()
        assert (fused.valid_region(maps, S) != exact).sum() <= 1


# ----------------------------------------------------------------------------
# reduced JPEG decoding

def test_draft_decode_keeps_the_resolution_the_crop_needs(tmp_path):
    path = tmp_path / "photo.jpg"
    textured(1000, 700).save(path, quality=90)
    factors = set()
    for size, seed in [(size, seed) for size in (32, 224) for seed in range(30)]:
        torch.manual_seed(seed)
        with Image.open(path) as img:
            params = fused.sample_train_params(img.width, img.height, size)
            scale = fused.draft_for_crop(img, params, size)
            img.load()
            decoded = img.size
        factor = round(1 / scale)
        factors.add(factor)
        assert decoded == (math.ceil(1000 / factor), math.ceil(700 / factor))
        crop = min(params["width"], params["height"])
        assert crop * scale >= min(size, crop)  # never below the output size, unless the crop is
        assert factor == 8 or crop * scale < 2 * size  # and the smallest such decode
    assert {1, 2, 4, 8} <= factors


# ----------------------------------------------------------------------------
# bench.py

@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_bench_gpu_without_cuda_is_a_user_error(monkeypatch):
    import bench
    with pytest.raises(UserError, match="bench.py gpu needs a CUDA GPU and none is visible"):
        bench.main(["gpu"])


def test_bench_building_blocks_on_cpu(tmp_path):
    import bench
    paths, labels, _ = data.load_split(bench.make_jpegs(tmp_path, 4, classes=2), "train")
    with Image.open(paths[0]) as img:
        assert 500 <= min(img.size) and max(img.size) <= 1000 and img.format == "JPEG"
    cpu_rates, _ = bench.per_core({"report": lambda p: bench.report_transform(S)(bench.report_loader(p)),
                                   "fused": transforms.train_transform(S, aug="fused")}, paths, seconds=0.01)
    assert set(cpu_rates) == {"report", "fused"} and min(cpu_rates.values()) > 0
    runtime, size, threads = engine.resolve_runtime("cpu"), 32, torch.get_num_threads()
    model = models.build_model("resnext", "resnet10t", 2, weights="none")
    gpu_aug = data.ImageDataset(paths, labels, transforms.train_transform(size, aug="fused-gpu"))
    batch = torch.utils.data.default_collate([gpu_aug[(i, i)] for i in range(4)])  # ([images, maps], labels)
    torch.set_num_threads(1)  # steps this small gain nothing from threads, which spin on a busy machine
    try:
        loss = bench.project_step(model, runtime, size)(*batch)
        report = bench.ReportStep(model, runtime.device)
        report(*torch.utils.data.default_collate([bench.ReportDataset(paths, labels, size)[i] for i in range(4)]))
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(loss) and math.isfinite(report.running_loss)
