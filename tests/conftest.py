import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests never touch the network: every hub lookup must come from local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import demo_data  # noqa: E402
import models  # noqa: E402

TINY_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                image_size=32, patch_size=16)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo dataset with fewer val and test images than demo.py's (160 and 96, for speed), built once
    per test session; treat it as read-only."""
    return demo_data.make_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, val_per_class=10,
                               test_per_class=6)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A tiny ViT saved with save_pretrained (seeded), standing in for an HF id offline."""
    # seeded: the same weights in every test session, so the member trainings give the same figures
    return models.save_random_vit(tmp_path_factory.mktemp("vit") / "tiny-vit", TINY_VIT)


def run_script(*args, check=True, env=None, timeout=600):
    """Run one of the project's scripts in a subprocess, as a user would."""
    import subprocess
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


TINY_TRAIN = ("--arch", "resnet10t", "--weights", "none", "--img-size", "32", "--workers", "0")


@pytest.fixture(scope="session")
def member_runs(demo_dir, tiny_vit_dir, tmp_path_factory):
    """The three members trained 2 epochs on the demo data (tiny): model name -> run dir. Read-only."""
    runs = tmp_path_factory.mktemp("runs")
    extra = {"resnext": (), "resnext_freeze": ("--unfreeze", "1:layer4"),
             "resnext_vit": ("--vit-weights", tiny_vit_dir)}
    for name, flags in extra.items():
        run_script("train.py", "--model", name, "--data-dir", demo_dir, "--out-dir", runs / name,
                   "--epochs", "2", *TINY_TRAIN, *flags)
    return {name: runs / name for name in extra}


FOLD_TYPES = {"resnext": (), "resnext_freeze": ("--unfreeze", "0:layer4")}


@pytest.fixture(scope="session")
def fold_runs(demo_dir, tmp_path_factory):
    """2-fold cross-validation (--fold-seed 0) of two member types on the demo data, 1 epoch each, trained in
    this process: {(model name, fold): run dir}. Read-only."""
    import signal

    import torch

    import train
    runs = tmp_path_factory.mktemp("fold_runs")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess trainings run
    try:
        for name, flags in FOLD_TYPES.items():
            for fold in range(2):
                train.main(["--model", name, "--data-dir", demo_dir, "--out-dir", runs / f"{name}_fold{fold}",
                            "--epochs", "1", "--folds", "2", "--fold", fold, "--no-tensorboard", *TINY_TRAIN, *flags])
    finally:
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return {(name, fold): runs / f"{name}_fold{fold}" for name in FOLD_TYPES for fold in range(2)}
