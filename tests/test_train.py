import json
import math
import socket

import pandas as pd
import pytest
import torch
from PIL import Image

import checkpoints
import demo_data
import models
import stats
import transforms
from conftest import TINY_TRAIN, run_script

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_acc_low", "val_acc_high",
                   "seconds", "images_per_s", "trainable_params"]
TIMING_COLUMNS = ["seconds", "images_per_s"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """32 train images (one step of 32 per epoch) and 48 val images."""
    return demo_data.make_demo(tmp_path_factory.mktemp("tiny") / "data", train_per_class=2, val_per_class=3,
                               test_per_class=1)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_run_writes_every_output(member_runs, demo_dir, name):
    run = member_runs[name]
    for file in ("last.pt", "best.pt", "history.csv", "config.json", "curves.png"):
        assert (run / file).is_file(), file
    history = pd.read_csv(run / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2]
    ckpt = checkpoints.load(run / "last.pt", kind="member")
    assert ckpt["model"] == name and ckpt["arch"] == "resnet10t" and ckpt["img_size"] == 32
    assert ckpt["class_names"] == [str(i) for i in range(demo_data.DEMO_CLASSES)]  # numeric order
    assert ckpt["mean"] == list(transforms.IMAGENET_MEAN) and ckpt["std"] == list(transforms.IMAGENET_STD)
    assert (ckpt["vit_config"] is not None) == (name == "resnext_vit")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0
    for key in ("optimizer", "scaler", "rng", "best_acc", "best_epoch", "args", "state_dict"):
        assert key in ckpt, key
    assert ckpt["history"] == history.to_dict("records")
    assert ckpt["best_acc"] == history["val_acc"].max()
    best = checkpoints.load(run / "best.pt")
    assert best["epoch"] == ckpt["best_epoch"] == int(history["val_acc"].idxmax()) + 1
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == name and config["num_classes"] == demo_data.DEMO_CLASSES
    # each epoch's 95% Wilson interval of its count of right val images
    val_images = config["val_images"]
    for acc, low, high in history[["val_acc", "val_acc_low", "val_acc_high"]].values:
        correct = round(acc * val_images / 100)
        assert acc == pytest.approx(100 * correct / val_images, abs=1e-9) and low <= acc <= high and low < high
        assert (low, high) == pytest.approx(stats.wilson_interval(correct, val_images), abs=1e-9)
    assert config["peak_lr"] == pytest.approx(1e-3)
    assert Image.open(run / "curves.png").size == (1100, 400)


def test_lr_follows_the_report_cosine(member_runs):
    history = pd.read_csv(member_runs["resnext"] / "history.csv")
    config = json.loads((member_runs["resnext"] / "config.json").read_text())
    steps = config["steps_per_epoch"]
    # the lr logged is the last step's: cosine over 2 epochs of `steps` steps, per iteration
    for epoch, lr in zip(history["epoch"], history["lr"]):
        progress = (epoch * steps - 1) / (2 * steps)
        expected = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * progress)) / 2
        assert lr == pytest.approx(expected, rel=1e-6)


def test_freeze_model_trains_the_scheduled_stages(member_runs):
    history = pd.read_csv(member_runs["resnext_freeze"] / "history.csv")
    model = models.build_model("resnext_freeze", "resnet10t", demo_data.DEMO_CLASSES, weights="none")
    fc = sum(p.numel() for p in model.fc.parameters())
    layer4 = sum(p.numel() for p in model.layer4.parameters())
    assert history["trainable_params"].tolist() == [fc, fc + layer4]  # --unfreeze 1:layer4


def test_loop_learns(tiny_data, tmp_path):
    result = run_script("train.py", "--model", "resnext", "--data-dir", tiny_data, "--out-dir", tmp_path,
                        "--epochs", "12", "--lr", "0.05", *TINY_TRAIN)
    history = pd.read_csv(tmp_path / "history.csv")
    losses = history["train_loss"]
    assert losses.iloc[-3:].mean() < 0.6 * losses.iloc[:3].mean()
    # the epoch lines and the last line give the val accuracy with its interval
    last, best = history.iloc[-1], history.loc[history["val_acc"].idxmax()]
    assert f" val_acc {last['val_acc']:.2f} [{last['val_acc_low']:.1f}, {last['val_acc_high']:.1f}] " in result.stdout
    assert (f"best val accuracy {best['val_acc']:.2f}% [{best['val_acc_low']:.1f}, {best['val_acc_high']:.1f}] "
            f"(95% Wilson interval; epoch {int(best['epoch'])})") in result.stdout


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_stop_and_resume_is_bit_exact(tiny_data, tiny_vit_dir, tmp_path, name):
    flags = ["--model", name, "--data-dir", tiny_data, "--epochs", "3", "--lr", "0.01", *TINY_TRAIN,
             "--unfreeze", "1:layer4,2:layer3", "--vit-weights", tiny_vit_dir]
    run_script("train.py", *flags, "--out-dir", tmp_path / "full")
    stopped = run_script("train.py", *flags, "--out-dir", tmp_path / "split", "--stop-after", "1")
    assert "resume with: python train.py --resume" in stopped.stdout
    assert len(pd.read_csv(tmp_path / "split" / "history.csv")) == 1
    run_script("train.py", "--resume", tmp_path / "split" / "last.pt")
    full = checkpoints.load(tmp_path / "full" / "last.pt")
    split = checkpoints.load(tmp_path / "split" / "last.pt")
    for key, value in full["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    history = pd.read_csv(tmp_path / "split" / "history.csv").drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(history, pd.read_csv(tmp_path / "full" / "history.csv").drop(
        columns=TIMING_COLUMNS))


def test_resume_refuses_a_changed_recipe(member_runs):
    result = run_script("train.py", "--resume", member_runs["resnext"] / "last.pt", "--lr", "0.1", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --lr cannot change when resuming {member_runs['resnext'] / 'last.pt'} (its run uses 0.001); "
        "leave it out, or start a new run in another --out-dir"]


def test_missing_model_flag_is_one_line():
    result = run_script("train.py", check=False)
    assert result.returncode == 2
    assert result.stderr == "error: --model is required (resnext, resnext_freeze or resnext_vit)\n"


def test_short_freeze_run_without_a_fitting_schedule_is_refused(tmp_path):
    result = run_script("train.py", "--model", "resnext_freeze", "--epochs", "2", "--out-dir", tmp_path / "run",
                        check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: --epochs 2 is too short for resnext_freeze")
    assert not (tmp_path / "run").exists()


def test_checkpoint_rebuilds_without_network(member_runs, monkeypatch):
    from transformers import ViTModel

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(ViTModel, "from_pretrained", no_network)
    for run in member_runs.values():
        ckpt = checkpoints.load(run / "best.pt")
        model = checkpoints.model_from_checkpoint(ckpt)
        reference = models.build_model(ckpt["model"], "resnet10t", demo_data.DEMO_CLASSES, weights="none",
                                       vit_config=ckpt["vit_config"])
        reference.load_state_dict(ckpt["state_dict"])
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(model(x), reference.eval()(x))
