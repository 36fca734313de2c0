"""The report's three models on any timm ResNet-family backbone, and the gradual unfreezing schedule.

- resnext:        backbone with fc replaced by Linear(features -> num_classes)
- resnext_freeze: the same network, trained with gradual unfreezing (see parse_unfreeze)
- resnext_vit:    the last block of layer4 wrapped with a ViT (see ViTBlock)
"""
import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError

MODEL_NAMES = ("resnext", "resnext_freeze", "resnext_vit")
DEFAULT_ARCH = "resnext101_32x8d.tv_in1k"
DEFAULT_VIT = "WinKawaks/vit-tiny-patch16-224"
DEFAULT_UNFREEZE = "10:layer4,20:layer3,30:layer2+layer1"
STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
# ViT-tiny's architecture (DEFAULT_VIT's config), so that --vit-weights none needs no download
VIT_TINY_CONFIG = {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768,
                   "image_size": 224, "patch_size": 16}
# a ViT small enough for a CPU, for the demo and the CPU benchmarks (no download)
DEMO_VIT_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                   "image_size": 32, "patch_size": 8}
HUB_TIMEOUT_S = 3


def offline_hint(flag, local):
    return (f"to work offline, fill the Hugging Face cache (HF_HOME) once on a connected machine and set "
            f"HF_HUB_OFFLINE=1, or pass {flag} {local}, or {flag} none (random init)")


def check_hub():
    """Go offline at once when the Hugging Face Hub cannot be reached, instead of retrying each file for
    about a minute: one request, HUB_TIMEOUT_S seconds, no retries. Cached files still load. Returns
    whether the Hub answered (True under HF_HUB_OFFLINE=1 too, where no request is made)."""
    from huggingface_hub import constants, get_session
    if constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT_S)
        return True
    except Exception:  # DNS, refused, timeout, proxy: all mean no hub
        constants.HF_HUB_OFFLINE = True
        print(f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached: using the local cache only "
              "(HF_HUB_OFFLINE=1 skips this check)", flush=True)
        return False


class ViTBlock(nn.Module):
    """The report's ResNeXt_ViT block: the wrapped block's output goes through a 1x1 conv to 3
    channels, is resized to the ViT's input size and runs through the ViT; the CLS vector is
    projected to the block's width and added to the block's input, broadcast over H x W. When the
    block changes shape (a stage of one block, as in resnet10t) the input goes through the block's
    own shortcut (downsample) first, as a residual block's identity does."""

    def __init__(self, block, channels, vit):
        super().__init__()
        self.block = block
        self.to_rgb = nn.Conv2d(channels, 3, kernel_size=1)
        self.vit = vit
        self.vit_size = vit.config.image_size
        self.proj = nn.Linear(vit.config.hidden_size, channels)

    def forward(self, x):  # x: (B, C_in, H_in, W_in)
        shortcut = x if self.block.downsample is None else self.block.downsample(x)  # (B, C, H, W)
        y = self.to_rgb(self.block(x))  # (B, 3, H, W)
        y = F.interpolate(y, size=(self.vit_size, self.vit_size), mode="bilinear", align_corners=False)
        cls = self.vit(pixel_values=y).last_hidden_state[:, 0]  # (B, hidden)
        return shortcut + self.proj(cls)[:, :, None, None]


def build_vit(vit_weights=DEFAULT_VIT, vit_config=None):
    """A ViTModel from an HF id or local directory, or with random weights: of vit_config (a checkpoint's)
    when given, of ViT-tiny's architecture for vit_weights "none"."""
    from transformers import ViTConfig, ViTModel
    if vit_config is not None or str(vit_weights) == "none":
        return ViTModel(ViTConfig.from_dict(vit_config or VIT_TINY_CONFIG), add_pooling_layer=False)
    if not Path(vit_weights).is_dir():
        check_hub()
    try:
        return ViTModel.from_pretrained(str(vit_weights), add_pooling_layer=False)
    except OSError as error:
        raise UserError(f"could not load the ViT '{vit_weights}' (not in the local cache and no network, or not "
                        f"an HF id or a folder saved with save_pretrained); "
                        f"{offline_hint('--vit-weights', 'a folder saved with save_pretrained')}") from error


def save_random_vit(path, config, seed=0):
    """A randomly initialised ViT of `config`, saved with save_pretrained: a --vit-weights folder that is
    the same for the same seed."""
    from transformers import ViTConfig, ViTModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ViTModel(ViTConfig(**config), add_pooling_layer=False).save_pretrained(path)
    return Path(path)


def load_state_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: file not found; give a .pth or .safetensors state dict, "
                        "or 'imagenet' or 'none'")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable or unsafe file
        raise UserError(f"--weights {path}: cannot read it as a state dict ({type(error).__name__})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--weights {path}: not a state dict (a mapping of names to tensors)")
    return state


def load_backbone_weights(model, path):
    """Load a backbone state dict; a classifier of another size (e.g. 1000 ImageNet classes) is dropped."""
    state = load_state_file(path)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("fc.") and v.shape != own.get(k, v).shape)}
    missing = [k for k in own if k not in state and not k.startswith("fc.")]
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    unexpected = [k for k in state if k not in own]
    if missing or wrong or unexpected:
        what = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                f"wrong shape for {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}"
                if wrong else f"unexpected key {unexpected[0]}")
        raise UserError(f"--weights {path} does not fit --arch {model.pretrained_cfg['architecture']}: {what}")
    model.load_state_dict(state, strict=False)


def create_backbone(arch, num_classes, weights="imagenet"):
    """A timm ResNet-family network with its fc sized for num_classes."""
    if not timm.is_model(arch):
        raise UserError(f"--arch {arch} is not a timm model; e.g. resnext101_32x8d.tv_in1k, "
                        "resnext50_32x4d, resnet50, resnet10t")
    pretrained = weights == "imagenet"
    if pretrained:
        check_hub()
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes)
    except (OSError, RuntimeError, ValueError) as error:
        if not pretrained:
            raise
        raise UserError(f"could not download the pretrained weights of {arch} ({type(error).__name__}; they are "
                        f"not in the local cache either); "
                        f"{offline_hint('--weights', 'a local .pth or .safetensors file')}") from error
    absent = [name for name in STAGES if not hasattr(model, name)]
    if absent:
        raise UserError(f"--arch {arch} is not a ResNet-family network (it has no {', '.join(absent)}); "
                        "use a resnet/resnext/seresnext name")
    if weights not in ("imagenet", "none"):
        load_backbone_weights(model, weights)
    return model


def pretrained_cfg(arch):
    """timm's pretrained config of `arch` as a dict (timm holds it in its code: no network), for any --weights:
    a local weights file or random init uses the arch's (its default tag's) config too."""
    if not timm.is_model(arch):
        raise UserError(f"--arch {arch} is not a timm model; e.g. resnext101_32x8d.tv_in1k, "
                        "resnext50_32x4d, resnet50, resnet10t")
    return timm.models.get_pretrained_cfg(arch).to_dict()


def pretrained_preprocessing(arch):
    """The input pipeline the weights of `arch` were made for, read by timm's resolve_data_config from its
    pretrained config: img_size (train), eval_size (its test size, else the train size), interpolation,
    crop_pct (of the test size), mean and std."""
    cfg = pretrained_cfg(arch)
    train = timm.data.resolve_data_config(pretrained_cfg=cfg)
    test = timm.data.resolve_data_config(pretrained_cfg=cfg, use_test_size=True)
    return {"img_size": int(train["input_size"][-1]), "eval_size": int(test["input_size"][-1]),
            "interpolation": str(test["interpolation"]), "crop_pct": float(test["crop_pct"]),
            "mean": [float(m) for m in test["mean"]], "std": [float(s) for s in test["std"]]}


def build_model(name, arch=DEFAULT_ARCH, num_classes=100, weights="imagenet",
                vit_weights=DEFAULT_VIT, vit_config=None):
    """Build one of MODEL_NAMES. vit_config (a dict) builds the ViT offline with random weights,
    as when a checkpoint is about to be loaded."""
    if name not in MODEL_NAMES:
        raise UserError(f"--model {name} is not one of {', '.join(MODEL_NAMES)}")
    model = create_backbone(arch, num_classes, weights)
    if name == "resnext_vit":
        vit = build_vit(vit_weights, vit_config)
        last = len(model.layer4) - 1
        model.layer4[last] = ViTBlock(model.layer4[last], model.num_features, vit)
    return model


def vit_config_of(model):
    """The ViT's config as a plain dict (None for models without one), for checkpoints."""
    block = model.layer4[-1]
    return block.vit.config.to_dict() if isinstance(block, ViTBlock) else None


# ----------------------------------------------------------------------------
# gradual unfreezing

def parse_unfreeze(spec):
    """'10:layer4,20:layer3,30:layer2+layer1' -> [(10, ['layer4']), ...]: after epoch 10 layer4 trains too."""
    schedule = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        epoch, _, stages = part.partition(":")
        names = stages.split("+")
        if not epoch.isdigit() or not stages or any(n not in STAGES for n in names):
            raise UserError(f"--unfreeze '{spec}': each part is EPOCH:STAGE[+STAGE], "
                            f"stages among {', '.join(STAGES)}")
        schedule.append((int(epoch), names))
    if [e for e, _ in schedule] != sorted({e for e, _ in schedule}):
        raise UserError(f"--unfreeze '{spec}': epochs must increase")
    return schedule


def resolve_unfreeze(spec, epochs):
    """The schedule a resnext_freeze run uses, as a spec: spec itself when it fits inside `epochs`, or (spec
    None) DEFAULT_UNFREEZE, made for 50 epochs, scaled to `epochs` (10/20/30 of 50 stay the report's)."""
    if spec is None:
        default = parse_unfreeze(DEFAULT_UNFREEZE)
        if epochs < len(default) + 1:
            raise UserError(f"--epochs {epochs} is too short for resnext_freeze's {len(default) + 1} unfreezing "
                            f"sections; train {len(default) + 1} epochs or more, or give a shorter --unfreeze "
                            "schedule such as 1:layer4")
        starts = [math.floor(start * epochs / 50 + 0.5) for start, _ in default]
        for i in range(len(starts)):  # at least one epoch per section
            starts[i] = min(max(starts[i], starts[i - 1] + 1 if i else 1), epochs - len(starts) + i)
        return ",".join(f"{start}:{'+'.join(names)}" for start, (_, names) in zip(starts, default))
    for start, names in parse_unfreeze(spec):
        if not 0 <= start < epochs:
            raise UserError(f"--unfreeze '{spec}': {'+'.join(names)} would unfreeze after epoch {start}, which "
                            f"is not inside --epochs {epochs}; use epochs from 0 to {epochs - 1}, or more --epochs")
    return spec


def trainable_stages(schedule, epoch):
    """The stages that train in `epoch` (1-based): fc always, plus each stage whose epoch has passed."""
    stages = ["fc"]
    for start, names in schedule:
        if epoch > start:
            stages += names
    return stages


def section_bounds(schedule, epochs):
    """Epoch ranges [first, last] (1-based) of the unfreezing sections within `epochs`."""
    starts = [0] + [e for e, _ in schedule if e < epochs]
    return [(s + 1, e) for s, e in zip(starts, starts[1:] + [epochs])]


def apply_unfreeze(model, schedule, epoch, freeze_bn_stats=False):
    """Set requires_grad for `epoch`. Frozen BatchNorm layers still update their running statistics
    in train mode, as in the report, unless freeze_bn_stats (call again after model.train())."""
    stages = trainable_stages(schedule, epoch)
    for name in STAGES:
        module = getattr(model, name)
        module.requires_grad_(name in stages)
        if freeze_bn_stats and name not in stages:
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
    return stages


# ----------------------------------------------------------------------------
# optimizers

OPTIMIZERS = ("sgd", "adamw")


def create_optimizer(model, opt, *, lr, weight_decay, momentum, layer_decay=None):
    """sgd without layer decay: the report's SGD (one group, weight decay on every weight). Otherwise timm's
    optimizer factory (SGD with momentum, or AdamW), which leaves biases and norms undecayed and, with
    layer_decay, gives each of the model's layer groups (its group_matcher: stem, each block, fc) an
    "lr_scale" of layer_decay ** (layers after it); engine.train_one_epoch multiplies the LR by it. Parameters
    that do not train (resnext_freeze's frozen stages) get no gradient, so neither rule touches them."""
    if opt not in OPTIMIZERS:
        raise UserError(f"--opt {opt} is not one of {', '.join(OPTIMIZERS)}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise UserError(f"--layer-decay {layer_decay} must be above 0 and at most 1")
    if opt == "sgd" and layer_decay is None:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    from timm.optim import create_optimizer_v2
    # timm leaves out parameters that do not require grad: every one gets its group whatever is frozen now,
    # so that the groups (and a saved optimizer state) are the same at any epoch of the unfreezing schedule
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        return create_optimizer_v2(model, opt="momentum" if opt == "sgd" else "adamw", lr=lr,
                                   weight_decay=weight_decay, momentum=momentum, layer_decay=layer_decay)
    finally:
        for p in frozen:
            p.requires_grad_(False)


def count_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class StackingEnsemble(nn.Module):
    """The report's ensemble: frozen members whose logits, concatenated (M x C), feed Linear(M*C -> C).
    inputs (a mixed ensemble, whose members take their own pipelines): member i's index into a tuple of
    image batches, one per pipeline (None: every member takes the one batch)."""

    def __init__(self, members, num_classes, inputs=None):
        super().__init__()
        self.members = nn.ModuleList(members).requires_grad_(False)
        self.head = nn.Linear(len(members) * num_classes, num_classes)
        self.inputs = [0] * len(members) if inputs is None else [int(i) for i in inputs]

    def member_logits(self, x):  # (B, 3, H, W), or a tuple of them (one per pipeline) -> (B, M*C)
        if isinstance(x, (tuple, list)):
            return torch.cat([member(x[i]) for member, i in zip(self.members, self.inputs)], dim=1)
        if len(set(self.inputs)) > 1:
            raise TypeError(f"this ensemble's members take {len(set(self.inputs))} pipelines: pass a tuple of "
                            "image batches, one per pipeline, not one tensor")
        return torch.cat([member(x) for member in self.members], dim=1)

    def forward(self, x):
        return self.head(self.member_logits(x))


class FoldAverage(nn.Module):
    """One member type of a K-fold ensemble at test time: the mean of its K fold models' logits."""

    def __init__(self, fold_models):
        super().__init__()
        self.folds = nn.ModuleList(fold_models)

    def forward(self, x):  # (B, 3, H, W) -> (B, C)
        return torch.stack([model(x) for model in self.folds]).mean(0)
