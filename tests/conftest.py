import os
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# tests never touch the network: every hub lookup must come from local files
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import checkpoints  # noqa: E402
import demo_data  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402

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


# ----------------------------------------------------------------------------
# training in this process, and what tests of interrupted runs compare

TIMING = ("seconds", "images_per_s")


def train_here(cmd):
    """Run a train.py command line in this process (no interpreter start-up), on one thread like the
    subprocesses (so that results are bit-identical to theirs); its signal handlers are put back after."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(cmd[2:])
    finally:
        torch.set_num_threads(threads)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def csv_holds(out_dir, rows):
    """history.csv has exactly these rows (to the CSV's decimal precision; timing columns aside)."""
    csv, expected = pd.read_csv(out_dir / "history.csv"), pd.DataFrame(rows)
    columns = [c for c in expected.columns if c not in TIMING]
    return (len(rows) > 0 and list(csv.columns) == list(expected.columns) and len(csv) == len(expected)
            and np.allclose(csv[columns], expected[columns], rtol=1e-12, atol=0))


def assert_same_run(out_dir, reference):
    """The run in out_dir ended bit-identical to the uninterrupted reference run."""
    for name in ("last.pt", "best.pt"):
        got, want = checkpoints.load(out_dir / name), checkpoints.load(reference / name)
        assert (got["epoch"], got["step"], got["best_epoch"]) == (want["epoch"], want["step"], want["best_epoch"])
        assert got["state_dict"].keys() == want["state_dict"].keys()
        for key, value in want["state_dict"].items():
            assert torch.equal(got["state_dict"][key], value), f"{name}: {key} differs"
        for index, state in want["optimizer"]["state"].items():
            assert torch.equal(got["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"])
        assert without_timing(got["history"]) == without_timing(want["history"])
        if name == "last.pt":
            assert csv_holds(out_dir, got["history"])
    assert not list(out_dir.glob(".*.tmp"))


class Killed(Exception):
    """Raised right after a checkpoint is written: leaves the disk as a kill -9 at that instant would."""


SAVE = utils.atomic_save_torch


def die_after_save(monkeypatch, epoch, step):
    def save_then_die(state, path):
        SAVE(state, path)
        if (state["epoch"], state["step"]) == (epoch, step):
            raise Killed

    monkeypatch.setattr(utils, "atomic_save_torch", save_then_die)


# ----------------------------------------------------------------------------
# files of the first checkpoint format (test_checkpoints and test_reliability load them)

# the keys of real imgcls-checkpoint-1 files, as that version of train.py and ensemble.py wrote them
V1_MEMBER_KEYS = ["arch", "args", "best_acc", "best_epoch", "class_names", "ema_state_dict", "epoch", "format",
                  "history", "img_size", "kind", "mean", "model", "optimizer", "partial", "rng", "scaler",
                  "state_dict", "std", "step", "vit_config", "weights"]
V1_ENSEMBLE_KEYS = ["class_names", "format", "head_state_dict", "img_size", "kind", "mean", "members", "metrics",
                    "std"]
NEW_IN_3 = ("eval_size", "interpolation", "crop_pct")  # the eval pipeline, stored since imgcls-checkpoint-3
NEW_IN_4 = ("pipelines", "pipeline_index")  # an ensemble's pipelines (mixed ensembles), since imgcls-checkpoint-4
V1_ENSEMBLE_MEMBER_KEYS = ["arch", "class_names", "img_size", "mean", "model", "sha256", "source", "state_dict",
                           "std", "vit_config", "weights"]


def as_version_1(ckpt):
    """A current checkpoint written back in format 1's key names (format 3's eval pipeline keys dropped)."""
    old = {key: value for key, value in ckpt.items() if key not in NEW_IN_3 + NEW_IN_4} | {
        "format": "imgcls-checkpoint-1"}
    if old["kind"] == "member":
        old["weights"] = "ema" if old.pop("use_ema") else "raw"
        old["partial"] = old.pop("epoch_sums")
        assert old.pop("folds") is None  # format 1 had no --folds
        assert old.pop("teacher") is None  # nor --teacher
    if old["kind"] == "ensemble":
        assert old.pop("combiner") == "head"  # format 1 had no other
        assert old.pop("groups") is None  # nor fold members
        old["members"] = [{k: v for k, v in m.items() if k not in NEW_IN_3 + NEW_IN_4}
                          | {"weights": "ema" if m["use_ema"] else "raw"} for m in old["members"]]
        for member in old["members"]:
            del member["use_ema"]
            assert member.pop("reference") is None  # nor referenced members
    return old


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
    runs = tmp_path_factory.mktemp("fold_runs")
    for name, flags in FOLD_TYPES.items():
        for fold in range(2):
            train_here(["python", "train.py", "--model", name, "--data-dir", demo_dir, "--out-dir",
                        runs / f"{name}_fold{fold}", "--epochs", "1", "--folds", "2", "--fold", fold,
                        "--no-tensorboard", *TINY_TRAIN, *flags])
    return {(name, fold): runs / f"{name}_fold{fold}" for name in FOLD_TYPES for fold in range(2)}
