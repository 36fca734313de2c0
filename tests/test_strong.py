"""The strong recipe (train.py --recipe strong): preprocessing from a (fake, local) pretrained config stored in the
checkpoint and used by predict.py, MixUp/CutMix targets and loss, bit-exact resume with mixing on, the optimizer's
layer groups with frozen stages, ResNet-family variants, TTA scales, and older checkpoints."""
import math

import numpy as np
import pytest
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torchvision.transforms import v2

import checkpoints
import data
import demo_data
import engine
import ensemble
import export
import models
import onnx_runtime
import predict
import transforms
import utils
from conftest import SAVE, TINY_VIT, Killed, die_after_save, train_here, without_timing
from utils import UserError

# a pretrained config unlike the report's pipeline in every field: train at 24 px, test at 32 px with a crop
FAKE_CFG = {"architecture": "resnet10t", "input_size": (3, 24, 24), "test_input_size": (3, 32, 32),
            "interpolation": "bicubic", "crop_pct": 0.875, "test_crop_pct": 0.9, "mean": (0.5, 0.4, 0.3),
            "std": (0.2, 0.25, 0.3), "num_classes": 1000}
TINY = ("--arch", "resnet10t", "--weights", "none", "--workers", "0", "--batch-size", "8", "--log-every", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """16 classes, 4 train images each: 8 steps of 8 images per epoch."""
    return demo_data.make_demo(tmp_path_factory.mktemp("tiny") / "data", seed=0, train_per_class=4,
                               val_per_class=2, test_per_class=1)


@pytest.fixture(scope="module")
def strong_run(tiny_dir, tmp_path_factory):
    """One epoch of --recipe strong on resnet10t with FAKE_CFG as the arch's pretrained config."""
    out = tmp_path_factory.mktemp("strong")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "pretrained_cfg", lambda arch: dict(FAKE_CFG))
        train_here(["python", "train.py", "--model", "resnext", "--recipe", "strong", "--data-dir", tiny_dir,
                    "--out-dir", out, "--epochs", "1", "--cutmix", "0", *TINY])
    return out


def test_strong_recipe_reads_the_pretrained_config_and_explicit_flags_win(strong_run):
    ckpt = checkpoints.load(strong_run / "best.pt", kind="member")
    assert {key: ckpt[key] for key in ("img_size", "eval_size", "interpolation", "crop_pct", "mean", "std")} == {
        "img_size": 24, "eval_size": 32, "interpolation": "bicubic", "crop_pct": 0.9, "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3]}
    args = ckpt["args"]
    assert (args["recipe"], args["opt"], args["weight_decay"], args["layer_decay"], args["label_smoothing"]) == \
        ("strong", "adamw", 0.05, 0.9, 0.1)
    assert (args["aug"], args["auto_augment"], args["random_erase"], args["mixup"]) == \
        ("crop-flip", "trivial", 0.25, 0.8)
    assert args["arch"] == "resnet10t" and args["cutmix"] == 0  # given explicitly: they win
    # layer decay: 0.9 per layer group below fc (resnet10t: stem, 4 blocks, fc)
    scales = sorted({group["lr_scale"] for group in ckpt["optimizer"]["param_groups"]})
    assert scales == pytest.approx([0.9 ** k for k in range(5, -1, -1)])


def run_predict(argv):
    predict.main([str(arg) for arg in argv])


def test_predict_uses_the_stored_pipeline(strong_run, tiny_dir, tmp_path):
    ckpt = checkpoints.load(strong_run / "best.pt")
    run_predict(["--checkpoint", strong_run / "best.pt", "--data-dir", tiny_dir, "--out", tmp_path / "pred.csv",
                 "--save-logits", "--workers", "0"])
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)["logits"]
    # the fake config's pipeline, written out: the shorter side to floor(32 / 0.9) = 35 px (bicubic, from a
    # decode that keeps 35 px), the central 32 x 32, its mean and std
    pipeline = v2.Compose([v2.Resize(35, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(32), v2.ToImage(),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    paths, _ = data.load_test(tiny_dir / "test")
    images = torch.stack([pipeline(data.load_rgb(path, 35)) for path in paths])
    assert images.shape[-2:] == (32, 32)
    with torch.no_grad():
        expected = checkpoints.model_from_checkpoint(ckpt)(images)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)

    # the stored eval size is the one predict.py evaluates at
    checkpoints.save(dict(ckpt, eval_size=40, crop_pct=None), tmp_path / "eval40.pt")
    run_predict(["--checkpoint", tmp_path / "eval40.pt", "--data-dir", tiny_dir, "--out", tmp_path / "p40.csv",
                 "--save-logits", "--workers", "0"])
    resize = v2.Compose([v2.Resize((40, 40), interpolation=v2.InterpolationMode.BICUBIC), v2.ToImage(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
    with torch.no_grad():
        expected = checkpoints.model_from_checkpoint(ckpt)(torch.stack([resize(data.load_rgb(p, 40)) for p in paths]))
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True)["logits"], expected, rtol=0,
                               atol=1e-4)


def test_onnx_export_carries_the_pipeline(strong_run, tiny_dir, tmp_path):
    export.main([str(strong_run / "best.pt"), "--out", str(tmp_path / "m.onnx")])
    assert onnx_runtime.OnnxModel(tmp_path / "m.onnx").metadata["crop_pct"] == 0.9
    for name, model in (("pt", strong_run / "best.pt"), ("onnx", tmp_path / "m.onnx")):
        run_predict(["--checkpoint", model, "--data-dir", tiny_dir, "--out", tmp_path / name / "pred.csv",
                     "--workers", "0"])
    assert (tmp_path / "onnx" / "pred.csv").read_text() == (tmp_path / "pt" / "pred.csv").read_text()


def test_mixed_targets_sum_to_one_and_the_loss_is_timms():
    torch.manual_seed(0)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=5)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    np.random.seed(3)
    for _ in range(10):
        mixed, targets = mix(images.clone(), labels)
        assert targets.shape == (8, 5) and (targets > 0).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(8))

    # one step of engine.train_one_epoch (LR 0) mixes the batch and reports timm's soft-target loss of it
    model = models.build_model("resnext", "resnet10t", 5, weights="none").train()
    np.random.seed(5)
    mixed, targets = mix(images.clone(), labels)
    with torch.no_grad():
        logits = model(mixed)
    expected = SoftTargetCrossEntropy()(logits, targets).item()
    assert expected == pytest.approx(-(targets * logits.log_softmax(1)).sum(1).mean().item(), rel=1e-6)
    runtime = engine.resolve_runtime("cpu", "fp32", "off")
    training = engine.Training(model, model, torch.optim.SGD(model.parameters(), lr=0.0),
                               torch.amp.GradScaler("cpu", enabled=False), SoftTargetCrossEntropy(), runtime, mix=mix)
    np.random.seed(5)
    metrics, _ = engine.train_one_epoch(training, [(images.clone(), labels)], epoch=1, steps_per_epoch=1,
                                        lr_at=lambda step: 0.0, progress=False)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    # train accuracy: the prediction against the class with the larger weight in the mixed target
    assert metrics["acc"] == pytest.approx(100 * (logits.argmax(1) == targets.argmax(1)).float().mean().item())


def strong_cmd(data_dir, out_dir, *flags):
    return ["python", "train.py", "--model", "resnext", "--data-dir", data_dir, "--out-dir", out_dir,
            "--epochs", "2", "--img-size", "32", "--opt", "adamw", "--lr", "1e-3", "--weight-decay", "0.05",
            "--layer-decay", "0.8", "--label-smoothing", "0.1", "--aug", "crop-flip", "--auto-augment", "trivial",
            "--random-erase", "0.5", "--mixup", "0.8", "--cutmix", "1.0", *TINY, *map(str, flags)]


def test_resume_mid_epoch_with_mixing_is_exact(tiny_dir, tmp_path, monkeypatch):
    train_here(strong_cmd(tiny_dir, tmp_path / "reference"))
    out = tmp_path / "run"
    die_after_save(monkeypatch, 1, 3)  # killed right after the checkpoint at step 3 of epoch 2
    with pytest.raises(Killed):
        train_here(strong_cmd(tiny_dir, out, "--save-every", 3))
    monkeypatch.setattr(utils, "atomic_save_torch", SAVE)
    train_here(["python", "train.py", "--resume", "--out-dir", out, "--workers", "0"])
    got, want = (checkpoints.load(path / "last.pt") for path in (out, tmp_path / "reference"))
    assert got["epoch"] == want["epoch"] == 2
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    for index, state in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    assert without_timing(got["history"]) == without_timing(want["history"])


def test_frozen_stages_get_no_update_nor_decay_and_the_optimizer_resumes():
    torch.manual_seed(0)
    model = models.build_model("resnext_freeze", "resnet10t", 4, weights="none")
    optimizer = models.create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.5, momentum=0.9, layer_decay=0.9)
    models.apply_unfreeze(model, models.parse_unfreeze("1:layer4"), 1)  # epoch 1: fc alone
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != name.startswith("fc."), name
    resumed = models.create_optimizer(model, "adamw", lr=1e-2, weight_decay=0.5, momentum=0.9, layer_decay=0.9)
    resumed.load_state_dict(optimizer.state_dict())
    assert [len(g["params"]) for g in resumed.param_groups] == [len(g["params"]) for g in optimizer.param_groups]
    assert len(resumed.state) == 2  # fc's weight and bias


@pytest.mark.parametrize("arch", ["seresnext26d_32x4d", "resnest14d", "resnetaa50d"])
def test_resnet_family_variants_freeze_wrap_and_group(arch):
    """Deep stems (conv1 a Sequential), squeeze-excite, avg-down (d), anti-aliasing (aa) and ResNeSt's split
    attention: the freeze stages, the ViT wrap of layer4 and timm's layer groups all work."""
    torch.manual_seed(0)
    model = models.build_model("resnext_vit", arch, 5, weights="none", vit_config=TINY_VIT)
    assert isinstance(model.layer4[-1], models.ViTBlock)
    models.apply_unfreeze(model, models.parse_unfreeze("1:layer4"), 2)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {"layer4", "fc"}
    optimizer = models.create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, layer_decay=0.9)
    scales = [group["lr_scale"] for group in optimizer.param_groups]
    assert min(scales) < 0.9 ** 3 and max(scales) == 1.0


def test_tta_views_and_their_errors(tmp_path):
    images = torch.randn(2, 3, 32, 32)
    assert [view(images).shape[-1] for view in predict.parse_tta("hflip,scale:1.15")] == [32, 32, 37]
    assert torch.equal(predict.parse_tta("hflip")[1](images), images.flip(-1))
    assert len(predict.parse_tta("none")) == 1
    for bad in ("hflip,zoom", "scale:abc", "scale:0", "scale:1", ""):
        with pytest.raises(UserError, match="is not a view; use none, or a comma list of hflip and scale:S"):
            predict.parse_tta(bad)
    with pytest.raises(UserError, match=r"^--tta scale:1.2: an ONNX model takes images of its one eval size"):
        run_predict(["--checkpoint", tmp_path / "m.onnx", "--tta", "scale:1.2", "--out", tmp_path / "p.csv"])


def format_2_member(tmp_path, eval_size=None):
    """A member checkpoint as format 2 wrote it (no eval pipeline keys), or (eval_size) a current one."""
    torch.manual_seed(0)
    model = models.build_model("resnext", "resnet10t", 4, weights="none").eval()
    spec = checkpoints.member_spec(model, "resnext", "resnet10t", ["a", "b", "c", "d"], 32, (0.5,) * 3, (0.25,) * 3,
                                   eval_size)
    ckpt = checkpoints.member_checkpoint(spec, state_dict=model.state_dict(), ema_state_dict=None,
                                         state=checkpoints.TrainState(), optimizer={}, scaler={}, rng=[], args={})
    if eval_size is None:
        for key in ("eval_size", "interpolation", "crop_pct"):
            del ckpt[key]
        ckpt["format"] = "imgcls-checkpoint-2"
    path = tmp_path / f"member{eval_size}.pt"
    torch.save(ckpt, path)
    return path


def test_format_2_files_keep_the_report_pipeline(tmp_path, tiny_dir):
    upgraded = checkpoints.load(format_2_member(tmp_path), kind="member")
    assert upgraded["format"] == checkpoints.FORMAT
    assert (upgraded["eval_size"], upgraded["interpolation"], upgraded["crop_pct"]) == (32, "bilinear", None)
    path = data.list_split(tiny_dir, "val")[0][0]
    old = transforms.eval_transform(32, mean=(0.5,) * 3, std=(0.25,) * 3)  # the report's pipeline
    assert torch.equal(transforms.eval_transform_of(upgraded)(path), old(path))
    member = dict(checkpoints.spec_of(upgraded), state_dict={}, source="m.pt")
    for key in ("eval_size", "interpolation", "crop_pct"):
        del member[key]
    ensemble_ckpt = {"format": "imgcls-checkpoint-2", "kind": "ensemble", "class_names": member["class_names"],
                     "img_size": 32, "mean": member["mean"], "std": member["std"], "members": [member, dict(member)],
                     "combiner": "head"}
    torch.save(ensemble_ckpt, tmp_path / "ensemble.pt")
    loaded = checkpoints.load(tmp_path / "ensemble.pt", kind="ensemble")
    assert all((entry["eval_size"], entry["crop_pct"]) == (32, None) for entry in [loaded, *loaded["members"]])
    # an ONNX file exported before: the report's pipeline too
    props = {"format": onnx_runtime.FORMAT, "kind": "member", "class_names": '["a"]', "img_size": "32",
             "mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]", "checkpoint": "m.pt", "checkpoint_sha256": ""}
    metadata = onnx_runtime.parse_metadata(props, "old.onnx")
    assert (metadata["eval_size"], metadata["interpolation"], metadata["crop_pct"]) == (32, "bilinear", None)
    props.update(eval_size="40", interpolation="bicubic", crop_pct="0.9")  # as export.py writes them now
    metadata = onnx_runtime.parse_metadata(props, "new.onnx")
    assert (metadata["eval_size"], metadata["interpolation"], metadata["crop_pct"]) == (40, "bicubic", 0.9)


def test_ensemble_takes_members_with_other_eval_sizes(tmp_path):
    paths = [format_2_member(tmp_path, 32), format_2_member(tmp_path, 40)]
    members, _ = ensemble.load_members(paths)  # a mixed ensemble (tests/test_mixed.py), each its own pipeline
    pipelines, inputs = checkpoints.distinct_pipelines(members)
    assert [p["eval_size"] for p in pipelines] == [32, 40] and inputs == [0, 1]


def test_crop_keeps_the_resize_input_size_when_decoding():
    transform = transforms.eval_transform(32, crop_pct=0.9)
    assert transform.draft_size == math.floor(32 / 0.9) == 35
    assert transform.kept_box(70, 140) == (3, 38, 67, 102)  # the central 32/35 of the shorter side, squared
