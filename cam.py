"""Grad-CAM on the project's models (torchcam): the regions of an image that a class's score comes from.

The map is taken at the last block of layer4, the last spatial feature map. In resnext_vit that block is
a ViTBlock, whose output is its input plus one vector broadcast over H x W, so the map is taken at the
block it wraps: everything the ViT sees passes through that block's output.
"""
import numpy as np
import torch
from PIL import Image
from torchcam.methods import GradCAM
from torchcam.utils import overlay_mask

import models

OVERLAY_ALPHA = 0.5  # share of the photo in an overlay; the rest is the colour-mapped heatmap


def target_layer(model):
    """The module whose output the Grad-CAM of a member model (not an ensemble) is computed on."""
    block = model.layer4[-1]
    return block.block if isinstance(block, models.ViTBlock) else block


def target_layer_name(model):
    """target_layer's name in model.named_modules(), e.g. layer4.2 or layer4.2.block."""
    layer = target_layer(model)
    return next(name for name, module in model.named_modules() if module is layer)


def grad_cams(model, images, class_idx):
    """Grad-CAM heatmaps (N, h, w) in [0, 1], at the target layer's resolution, on the CPU: row i is the map
    of class class_idx[i] for images[i] (a batch on the model's device), each min-max normalised. fp32."""
    model.eval()
    # the input requires grad so that the graph reaches the target layer even when the weights are frozen
    # (an ensemble's members)
    images = images.detach().float().requires_grad_(True)
    with torch.enable_grad(), GradCAM(model, target_layer=target_layer(model)) as extractor:
        scores = model(images)
        (heatmaps,) = extractor(class_idx=[int(c) for c in class_idx], scores=scores)
    return heatmaps.detach().float().cpu()


def overlay(image, heatmap):
    """The PIL image with a heatmap ((h, w) in [0, 1], stretched over the whole image as the eval resize
    stretches the image) blended over it in the jet colour map: red is where the class's evidence lies."""
    mask = Image.fromarray(np.clip(heatmap.numpy(), 0, 1).astype(np.float32))
    return overlay_mask(image, mask, alpha=OVERLAY_ALPHA)
