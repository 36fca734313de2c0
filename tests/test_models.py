import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import checkpoints
import models
import utils
from conftest import TINY_VIT
from utils import UserError

VIT_TINY = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                image_size=224, patch_size=16)  # WinKawaks/vit-tiny-patch16-224


def vit_encoder_params(hidden_size, num_hidden_layers, intermediate_size, image_size, patch_size, **_):
    """Parameters of a ViTModel without pooler, from its config (see ViTEmbeddings / ViTLayer)."""
    h, patches = hidden_size, (image_size // patch_size) ** 2
    embeddings = h + (patches + 1) * h + 3 * patch_size**2 * h + h  # cls, positions, patch conv
    layer = (4 * (h * h + h)  # query, key, value, attention output
             + 2 * h * intermediate_size + intermediate_size + h  # MLP
             + 2 * 2 * h)  # two layer norms
    return embeddings + num_hidden_layers * layer + 2 * h  # final layer norm


def resnet10t(num_classes=10):
    return models.build_model("resnext", "resnet10t", num_classes, weights="none")


def stage_state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def assert_same_backbone(model, state):
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert backbone and set(backbone) == {k for k in own if not k.startswith("fc.")}
    for k in backbone:
        assert torch.equal(own[k], state[k]), k


# ----------------------------------------------------------------------------
# sizes and shapes

def test_default_builds_have_the_report_sizes():
    with torch.device("meta"):  # the sizes without allocating ~350 MB per model
        sizes = {}
        for name in ("resnext", "resnext_freeze"):
            model = models.build_model(name, num_classes=100, weights="none")
            sizes[name] = models.count_params(model)
            assert model.fc.out_features == 100
            del model
        model = models.build_model("resnext_vit", num_classes=100, weights="none", vit_config=VIT_TINY)
        sizes["resnext_vit"] = models.count_params(model)
        del model
    assert sizes["resnext"] == sizes["resnext_freeze"]
    assert sizes["resnext"] / 1e6 == pytest.approx(86.95, abs=0.01)
    expected_vit = (sizes["resnext"]
                    + 2048 * 3 + 3  # Conv2d(2048, 3, 1)
                    + vit_encoder_params(**VIT_TINY)
                    + 192 * 2048 + 2048)  # Linear(192, 2048)
    assert abs(sizes["resnext_vit"] - expected_vit) < 0.1e6


@pytest.mark.parametrize("arch, num_classes", [("resnet10t", 7), ("resnext50_32x4d", 3)])
def test_forward_shapes(arch, num_classes):
    model = models.build_model("resnext", arch, num_classes, weights="none").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_resnext_vit_forward_with_saved_vit(tiny_vit_dir):
    from transformers import ViTModel
    model = models.build_model("resnext_vit", "resnet10t", 5, weights="none", vit_weights=tiny_vit_dir).eval()
    block = model.layer4[-1]
    assert isinstance(block, models.ViTBlock)
    saved = ViTModel.from_pretrained(tiny_vit_dir, add_pooling_layer=False).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in block.vit.state_dict().items())
    assert models.vit_config_of(model)["hidden_size"] == TINY_VIT["hidden_size"]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    grads = torch.autograd.grad(model(torch.randn(1, 3, 32, 32)).sum(), list(block.vit.parameters())[:1])
    assert grads[0].abs().sum() > 0  # the ViT is on the path to the logits


def test_missing_vit_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--vit-weights"):
        models.build_model("resnext_vit", "resnet10t", 5, weights="none", vit_weights=tmp_path / "no-vit")


@pytest.mark.parametrize("name, arch, match", [("resnet", "resnet10t", "--model resnet"),
                                               ("resnext", "resnet_does_not_exist", "--arch"),
                                               ("resnext", "vit_tiny_patch16_224", "not a ResNet-family")])
def test_bad_model_or_arch(name, arch, match):
    with pytest.raises(UserError, match=match):
        models.build_model(name, arch, 5, weights="none")


# ----------------------------------------------------------------------------
# gradual unfreezing

@pytest.mark.parametrize("epoch, stages", [
    (1, {"fc"}), (10, {"fc"}), (11, {"fc", "layer4"}), (21, {"fc", "layer4", "layer3"}),
    (31, {"fc", "layer4", "layer3", "layer2", "layer1"}), (50, {"fc", "layer4", "layer3", "layer2", "layer1"}),
])
def test_default_unfreeze_schedule(epoch, stages):
    model = resnet10t()
    models.apply_unfreeze(model, models.parse_unfreeze(models.DEFAULT_UNFREEZE), epoch)
    training = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert training == stages
    assert {"conv1", "bn1"} <= frozen and not training & frozen
    assert models.count_params(model, trainable_only=True) == sum(
        p.numel() for name, p in model.named_parameters() if name.split(".")[0] in stages)


def test_parse_unfreeze_and_sections():
    schedule = models.parse_unfreeze(models.DEFAULT_UNFREEZE)
    assert schedule == [(10, ["layer4"]), (20, ["layer3"]), (30, ["layer2", "layer1"])]
    assert models.section_bounds(schedule, 50) == [(1, 10), (11, 20), (21, 30), (31, 50)]
    assert models.section_bounds(schedule, 25) == [(1, 10), (11, 20), (21, 25)]
    assert models.parse_unfreeze("") == []


@pytest.mark.parametrize("spec", ["10", "10:", "x:layer4", "10:layer5", "10:layer4+", "-1:layer4",
                                  "20:layer3,10:layer4", "10:layer4,10:layer3"])
def test_parse_unfreeze_refuses_bad_specs(spec):
    with pytest.raises(UserError, match="--unfreeze"):
        models.parse_unfreeze(spec)


def test_default_unfreeze_scales_with_the_epochs():
    assert models.resolve_unfreeze(None, 50) == models.DEFAULT_UNFREEZE == "10:layer4,20:layer3,30:layer2+layer1"
    assert models.resolve_unfreeze(None, 100) == "20:layer4,40:layer3,60:layer2+layer1"
    assert models.resolve_unfreeze(None, 10) == "2:layer4,4:layer3,6:layer2+layer1"
    for epochs in range(4, 60):
        sections = models.section_bounds(models.parse_unfreeze(models.resolve_unfreeze(None, epochs)), epochs)
        assert len(sections) == 4 and all(first <= last for first, last in sections), epochs
        assert sections[-1][1] == epochs
    with pytest.raises(UserError, match=r"^--epochs 3 is too short for resnext_freeze's 4 unfreezing sections; "
                                        r"train 4 epochs or more, or give a shorter --unfreeze schedule such as "
                                        r"1:layer4$"):
        models.resolve_unfreeze(None, 3)
    assert models.resolve_unfreeze("1:layer4", 2) == "1:layer4"  # the fix that message suggests
    with pytest.raises(UserError, match=r"^--unfreeze '1:layer4,2:layer3': layer3 would unfreeze after epoch 2, "
                                        r"which is not inside --epochs 2; use epochs from 0 to 1, or more --epochs$"):
        models.resolve_unfreeze("1:layer4,2:layer3", 2)


@pytest.mark.parametrize("freeze_bn_stats", [False, True])
def test_freeze_bn_stats(freeze_bn_stats):
    torch.manual_seed(0)
    model = resnet10t().train()
    models.apply_unfreeze(model, models.parse_unfreeze(models.DEFAULT_UNFREEZE), 11, freeze_bn_stats)
    before = {name: stage_state(model, name) for name in ("bn1", "layer1", "layer3", "layer4")}
    model(torch.randn(4, 3, 32, 32))
    for name, state in before.items():
        now = stage_state(model, name)
        unchanged = all(torch.equal(v, now[k]) for k, v in state.items())
        assert unchanged == (freeze_bn_stats and name != "layer4"), name


# ----------------------------------------------------------------------------
# backbone weights from a file, from the Hugging Face cache, or neither

@pytest.fixture(scope="module")
def imagenet_state():
    """A resnet10t state dict with a 1000-class fc, as a downloaded ImageNet file holds."""
    torch.manual_seed(1)
    return timm.create_model("resnet10t", num_classes=1000).state_dict()


@pytest.mark.parametrize("fmt", [".pth", ".safetensors", ".SAFETENSORS", "wrapped.pth"])
def test_backbone_weights_from_a_file(tmp_path, imagenet_state, fmt):
    path = tmp_path / f"weights{fmt}"
    if fmt.lower() == ".safetensors":
        save_file(imagenet_state, path)
    else:
        torch.save({"state_dict": imagenet_state} if fmt.startswith("wrapped") else imagenet_state, path)
    model = models.create_backbone("resnet10t", 10, weights=path)
    assert_same_backbone(model, imagenet_state)
    assert model.fc.weight.shape == (10, 512)  # the 1000-class fc is dropped
    same_size = models.create_backbone("resnet10t", 1000, weights=path)
    assert torch.equal(same_size.fc.weight, imagenet_state["fc.weight"])


def test_bad_backbone_files(tmp_path, imagenet_state):
    with pytest.raises(UserError, match="file not found") as error:
        models.create_backbone("resnet10t", 10, weights=tmp_path / "missing.pth")
    assert str(tmp_path / "missing.pth") in str(error.value)
    (tmp_path / "garbage.pth").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="cannot read"):
        models.create_backbone("resnet10t", 10, weights=tmp_path / "garbage.pth")
    other = timm.create_model("resnet18", num_classes=10).state_dict()
    torch.save(other, tmp_path / "resnet18.pth")
    with pytest.raises(UserError, match="does not fit --arch resnet10t: .*missing"):
        models.create_backbone("resnet10t", 10, weights=tmp_path / "resnet18.pth")
    wrong = dict(imagenet_state, **{"layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"wrong shape for layer1.0.conv1.weight: \(8, 8, 1, 1\)"):
        models.create_backbone("resnet10t", 10, weights=tmp_path / "wrong.pth")
    torch.save(dict(imagenet_state, extra=torch.zeros(1)), tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected key extra"):
        models.create_backbone("resnet10t", 10, weights=tmp_path / "extra.pth")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode. huggingface_hub reads the environment once, at
    import, so its constants are patched too."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_pretrained_weights_from_a_prefilled_cache(hf_cache, imagenet_state):
    prefill(hf_cache, imagenet_state)
    model = models.create_backbone("resnet10t", 10, "imagenet")
    assert_same_backbone(model, imagenet_state)
    assert model.fc.weight.shape == (10, 512)


def prefill(hf_cache, imagenet_state):
    repo = hf_cache / "models--timm--resnet10t.c3_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(imagenet_state, repo / "snapshots" / commit / "model.safetensors")


def test_pretrained_weights_offline_with_an_empty_cache(hf_cache):
    with pytest.raises(UserError) as error:
        models.create_backbone("resnet10t", 10, "imagenet")
    message = str(error.value)
    assert "\n" not in message and "resnet10t" in message
    assert "--weights a local .pth or .safetensors file" in message and "HF_HUB_OFFLINE=1" in message
    assert "--weights none" in message


@pytest.fixture
def unreachable_hub(hf_cache, monkeypatch, capsys):
    """Online mode with a hub that refuses connections (a closed local port): what a machine without
    network sees, without touching the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    requests = []
    session = huggingface_hub.get_session()
    real_head = session.head
    monkeypatch.setattr(session, "head", lambda *a, **k: requests.append(a) or real_head(*a, **k))
    return requests


def test_unreachable_hub_is_one_request_then_the_cache(unreachable_hub, hf_cache, imagenet_state, capsys):
    prefill(hf_cache, imagenet_state)
    model = models.create_backbone("resnet10t", 10, "imagenet")
    assert_same_backbone(model, imagenet_state)
    assert unreachable_hub == [("http://127.0.0.1:9",)] and huggingface_hub.constants.HF_HUB_OFFLINE
    assert capsys.readouterr().out == ("the Hugging Face Hub (http://127.0.0.1:9) cannot be reached: using the "
                                       "local cache only (HF_HUB_OFFLINE=1 skips this check)\n")


def test_unreachable_hub_with_an_empty_cache_fails_at_once(unreachable_hub):
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE=1, or pass --vit-weights a folder saved with "
                                        r"save_pretrained, or --vit-weights none \(random init\)$"):
        models.build_vit("WinKawaks/vit-tiny-patch16-224")
    assert len(unreachable_hub) == 1
    with pytest.raises(UserError, match="could not download the pretrained weights of resnet10t"):
        models.create_backbone("resnet10t", 10, "imagenet")
    assert len(unreachable_hub) == 1  # once offline, no second request


def test_vit_weights_none_is_vit_tiny_offline(unreachable_hub):
    # the fix the ViT's error suggests works without any file or network
    model = models.build_model("resnext_vit", "resnet10t", 5, weights="none", vit_weights="none")
    config = model.layer4[-1].vit.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
            config.image_size) == (192, 12, 3, 16, 224)
    assert models.count_params(model.layer4[-1].vit) == pytest.approx(5.5e6, rel=0.02)  # ViT-tiny's size
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5) and unreachable_hub == []


# ----------------------------------------------------------------------------
# rebuilding from checkpoints

def member_checkpoint(model, name, arch, use_ema=False, ema_model=None):
    spec = checkpoints.member_spec(model, name, arch, [f"c{i}" for i in range(model.fc.out_features)], 32,
                                   (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    state = checkpoints.TrainState(epoch=1, step=2, best_acc=50.0, best_epoch=1, use_ema=use_ema)
    return checkpoints.member_checkpoint(spec, state_dict=model.state_dict(), ema_state_dict=ema_model.state_dict()
                                         if ema_model is not None else None, state=state, optimizer={}, scaler={},
                                         rng=[], args={"model": name})


def perturbed(model):
    torch.manual_seed(2)
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", ["resnext", "resnext_vit"])
def test_member_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = models.build_model(name, "resnet10t", 4, weights="none", vit_config=TINY_VIT).eval()
    perturbed(model.fc)  # so that the rebuilt fc differs from a fresh one
    utils.atomic_save_torch(member_checkpoint(model, name, "resnet10t"), tmp_path / "last.pt")
    ckpt = checkpoints.load(tmp_path / "last.pt", kind="member")
    rebuilt = checkpoints.model_from_checkpoint(ckpt)
    assert not rebuilt.training and models.vit_config_of(rebuilt) == models.vit_config_of(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_member_checkpoint_uses_the_chosen_weights(tmp_path):
    raw = resnet10t(4).eval()
    ema = perturbed(resnet10t(4).eval())
    utils.atomic_save_torch(member_checkpoint(raw, "resnext", "resnet10t", True, ema), tmp_path / "best.pt")
    rebuilt = checkpoints.model_from_checkpoint(checkpoints.load(tmp_path / "best.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ema(x)) and not torch.equal(rebuilt(x), raw(x))


def test_ensemble_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    members = [perturbed(resnet10t(4)), perturbed(resnet10t(4))]
    ensemble = models.StackingEnsemble(members, 4).eval()
    assert not any(p.requires_grad for p in ensemble.members.parameters())
    assert isinstance(ensemble.head, nn.Linear) and ensemble.head.in_features == 8
    specs = [member_checkpoint(m, "resnext", "resnet10t") for m in members]
    ckpt = checkpoints.ensemble_checkpoint([checkpoints.ensemble_member(s, f"m{i}.pt", str(i) * 64)
                                            for i, s in enumerate(specs)], ensemble.head.state_dict(), metrics={})
    utils.atomic_save_torch(ckpt, tmp_path / "ensemble.pt")
    with pytest.raises(UserError, match="expected a member"):
        checkpoints.load(tmp_path / "ensemble.pt", kind="member")
    rebuilt = checkpoints.model_from_checkpoint(checkpoints.load(tmp_path / "ensemble.pt", kind="ensemble"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rebuilt.member_logits(x).shape == (2, 8)
        assert torch.equal(rebuilt(x), ensemble(x))
