"""cam.py: Grad-CAM is taken where the last spatial map is (the wrapped block in resnext_vit), equals the
textbook computation there, works on frozen weights (ensemble members) and gives maps in [0, 1]."""
import torch
import torch.nn.functional as F
from PIL import Image

import cam
import models

IMG_SIZE = 96  # resnet10t's layer4 is 3 x 3 at 96 px


def reference_grad_cam(model, layer, images, classes):
    """Grad-CAM written out: ReLU of the layer's activations weighted by their spatially averaged gradients
    of the class score, min-max normalised per image."""
    stored = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: stored.setdefault("a", output))
    scores = model(images)
    handle.remove()
    (grad,) = torch.autograd.grad(scores[torch.arange(len(classes)), classes].sum(), stored["a"])
    maps = F.relu((grad.mean((2, 3), keepdim=True) * stored["a"]).sum(1)).detach()
    maps = maps - maps.amin((1, 2), keepdim=True)
    return maps / (maps.amax((1, 2), keepdim=True) + 1e-8)


def vit_model(tiny_vit_dir):
    torch.manual_seed(0)
    return models.build_model("resnext_vit", "resnet10t", num_classes=4, weights="none",
                              vit_weights=tiny_vit_dir).eval()


def test_resnext_vit_cam_hooks_the_wrapped_block(tiny_vit_dir):
    model = vit_model(tiny_vit_dir)
    assert isinstance(model.layer4[-1], models.ViTBlock)
    assert cam.target_layer(model) is model.layer4[-1].block
    assert cam.target_layer_name(model) == "layer4.0.block"

    images, classes = torch.randn(2, 3, IMG_SIZE, IMG_SIZE), torch.tensor([0, 3])
    heatmaps = cam.grad_cams(model, images, classes.tolist())
    assert heatmaps.shape == (2, 3, 3)
    assert torch.allclose(heatmaps, reference_grad_cam(model, model.layer4[-1].block, images, classes), atol=1e-5)
    # the ViTBlock's own output (its input plus a broadcast vector) gives another map
    assert not torch.allclose(heatmaps, reference_grad_cam(model, model.layer4[-1], images, classes), atol=1e-2)
    assert not any(m._forward_hooks for m in model.modules())  # torchcam's hooks are removed


def test_heatmaps_in_unit_range_with_frozen_weights():
    torch.manual_seed(0)
    model = models.build_model("resnext", "resnet10t", num_classes=4, weights="none").eval()
    assert cam.target_layer(model) is model.layer4[-1] and cam.target_layer_name(model) == "layer4.0"
    model.requires_grad_(False)  # as the members of an ensemble are
    heatmaps = cam.grad_cams(model, torch.randn(4, 3, IMG_SIZE, IMG_SIZE), [0, 1, 2, 3])
    assert heatmaps.shape == (4, 3, 3) and torch.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0 and heatmaps.max() <= 1
    peaks = heatmaps.amax((1, 2))
    assert torch.allclose(peaks[peaks > 0], torch.ones(1), atol=1e-5) and (peaks > 0).any()
    assert all(p.grad is None for p in model.parameters())

    photo = Image.new("RGB", (50, 30), (128, 128, 128))
    blended = cam.overlay(photo, heatmaps[0])
    assert blended.mode == "RGB" and blended.size == (50, 30)
