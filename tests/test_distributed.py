"""torchrun with 2 CPU ranks (gloo) on a tiny copy of the demo data."""
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

import checkpoints
import data
import demo_data
import engine
import models
import transforms
import utils
from conftest import ROOT, TINY_TRAIN, run_script


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """32 train images (one step of 32) and 47 val images, so the val set does not split evenly."""
    root = demo_data.make_demo(tmp_path_factory.mktemp("ddp") / "data", train_per_class=2, val_per_class=3,
                               test_per_class=1)
    data.list_images(root / "val" / "0")[0].unlink()
    shutil.rmtree(root / "test")
    return root


def test_two_ranks_of_16_equal_one_process_of_32(odd_data, tmp_path):
    # resnet50_gn uses GroupNorm: per-sample statistics, so the split cannot change the forward pass
    flags = ["--model", "resnext", "--data-dir", odd_data, "--epochs", "1", "--lr", "0.5", *TINY_TRAIN,
             "--arch", "resnet50_gn"]
    torchrun(*flags, "--out-dir", tmp_path / "ddp")
    run_script("train.py", *flags, "--out-dir", tmp_path / "single")
    ddp = checkpoints.load(tmp_path / "ddp" / "last.pt")
    single = checkpoints.load(tmp_path / "single" / "last.pt")
    assert ddp["args"]["batch_size"] == 32
    utils.seed_everything(0)  # train.py's initialisation with --seed 0
    initial = models.build_model("resnext", "resnet50_gn", demo_data.DEMO_CLASSES, weights="none").state_dict()
    moved = 0
    for key, value in single["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-5, atol=1e-6)
        moved += not torch.equal(value, initial[key])
    assert moved >= 40  # one step moves the stem, shortcuts, last norms of each block and fc


def test_val_accuracy_counts_every_image_once(odd_data, tmp_path):
    torchrun("--model", "resnext", "--data-dir", odd_data, "--epochs", "1", *TINY_TRAIN,
             "--out-dir", tmp_path)
    ckpt = checkpoints.load(tmp_path / "last.pt")
    model = checkpoints.model_from_checkpoint(ckpt)
    paths, labels, _ = data.load_split(odd_data, "val", ckpt["class_names"])
    assert len(paths) == 47
    dataset = data.ImageDataset(paths, labels, transforms.eval_transform(32))
    loader = data.make_loader(dataset, device=torch.device("cpu"), workers=0, batch_size=16)
    val = engine.evaluate(model, loader, engine.resolve_runtime("cpu", "fp32", "off"))
    row = pd.read_csv(tmp_path / "history.csv").iloc[0]
    assert row["val_acc"] == pytest.approx(val["acc"], abs=1e-9)
    assert row["val_loss"] == pytest.approx(val["loss"], rel=1e-5)


def test_two_rank_stop_and_resume_matches_uninterrupted(odd_data, tmp_path):
    flags = ["--model", "resnext", "--data-dir", odd_data, "--epochs", "2", "--batch-size", "16", *TINY_TRAIN]
    torchrun(*flags, "--out-dir", tmp_path / "full")
    stopped = torchrun(*flags, "--out-dir", tmp_path / "split", "--stop-after", "1")
    assert "resume with: torchrun --nproc_per_node=2 train.py --resume" in stopped.stdout
    torchrun("--resume", tmp_path / "split" / "last.pt")
    full = checkpoints.load(tmp_path / "full" / "last.pt")
    split = checkpoints.load(tmp_path / "split" / "last.pt")
    assert split["epoch"] == 2 and len(split["rng"]) == 2
    for key, value in full["state_dict"].items():
        assert torch.equal(value, split["state_dict"][key]), key
