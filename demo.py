"""The whole workflow on the built-in demo dataset, on a CPU in a few minutes, offline.

    python demo.py [--out demo]

Runs, and prints, the same commands you would run on your own data: make the demo data, train the
three members (a tiny resnet10t from scratch instead of the pretrained ResNeXt101), stack them,
predict the test set (OUT/submission.zip) and write the report (OUT/runs/report.md).
"""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import models
from utils import HelpFormatter, UserError, run_main

# small enough for a CPU: a tiny backbone trained from scratch at 32 px
MEMBER_FLAGS = ["--arch", "resnet10t", "--weights", "none", "--img-size", "32", "--epochs", "12", "--lr", "0.02"]


def run(*args):
    command = [sys.executable, *map(str, args)]
    print("$ " + shlex.join(["python", *map(str, args)]), flush=True)
    if subprocess.run(command).returncode != 0:
        raise UserError(f"'{shlex.join(command[1:])}' failed; see its message above")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo"), help="folder for the data, runs and submission")
    args = parser.parse_args(argv)
    data_dir, runs = args.out / "data", args.out / "runs"
    if not (data_dir / "train").is_dir():
        run("data.py", "make-demo", data_dir)
    # the ViT-tiny of the report would be downloaded; offline, a small randomly initialised ViT stands in
    vit_dir = args.out / "tiny-vit"
    if not (vit_dir / "config.json").is_file():  # the same for the same seed: the same demo figures every time
        models.save_random_vit(vit_dir, models.DEMO_VIT_CONFIG)
    # each member its own seed (data order, augmentation, init), so that their errors differ and the
    # ensemble has something to average; from scratch, the freeze member's random stages are unfrozen early
    extra = {"resnext": ["--seed", "1"],
             "resnext_freeze": ["--seed", "2", "--unfreeze", "1:layer4,2:layer3,3:layer2+layer1"],
             "resnext_vit": ["--seed", "3", "--vit-weights", vit_dir]}
    for model, flags in extra.items():
        run("train.py", "--model", model, "--data-dir", data_dir, "--out-dir", runs / model, *MEMBER_FLAGS, *flags)
    run("ensemble.py", "--members", *(runs / m / "best.pt" for m in extra), "--data-dir", data_dir,
        "--out-dir", runs / "ensemble")
    run("predict.py", "--checkpoint", runs / "ensemble" / "ensemble.pt", "--data-dir", data_dir,
        "--out", args.out / "prediction.csv", "--zip", args.out / "submission.zip",
        "--labels", data_dir / "test_labels.csv")
    run("report.py", runs)
    print(f"done: submission {args.out / 'submission.zip'}, report {runs / 'report.md'}")


if __name__ == "__main__":
    run_main(main)
