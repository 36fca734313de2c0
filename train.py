"""Train one member of the ensemble.

    python train.py --model resnext|resnext_freeze|resnext_vit [--data-dir data] [--out-dir runs/MODEL]
    torchrun --nproc_per_node=N train.py --model ...      (DistributedDataParallel, same recipe)

Defaults reproduce the course report: SGD momentum 0.9, batch 32, cosine LR 1e-3 -> 1e-6 stepped per
iteration, 50 epochs at 224 px. --lr and --min-lr are per 32 images: they are scaled linearly with
--batch-size. Writes last.pt (every epoch), best.pt, history.csv, config.json, curves.png and TensorBoard
event files (`tensorboard --logdir runs`).

    python train.py --model resnext --find-lr    (LR range test: lr_find.csv, lr_find.png, a suggested --lr)
    python train.py --model resnext --recipe strong   (a modern fine-tuning recipe: README, "The strong recipe")
"""
import argparse
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cache
import checkpoints
import data
import distill
import engine
import fused
import lr_finder
import models
import stats
import tensorboard_log
import transforms
import utils
from utils import UserError

# flags that may differ when a run is resumed; every other flag comes from the checkpoint
RUNTIME_FLAGS = ("data_dir", "out_dir", "cache_dir", "resume", "workers", "device", "stop_after", "save_every",
                 "log_every", "compile", "detect_anomaly", "strict", "channels_last", "tensorboard", "find_lr",
                 "find_lr_start", "find_lr_end", "find_lr_steps")
# the flags --recipe strong sets, unless given: a modern fine-tuning recipe (README: "The strong recipe")
STRONG_RECIPE = {"arch": "seresnextaa101d_32x8d.sw_in12k_ft_in1k", "opt": "adamw", "lr": 1e-4, "weight_decay": 0.05,
                 "layer_decay": 0.9, "label_smoothing": 0.1, "aug": "crop-flip", "auto_augment": "trivial",
                 "random_erase": 0.25, "mixup": 0.8, "cutmix": 1.0, "preprocessing": "pretrained"}
# what a run (and --find-lr) writes atomically in --out-dir; TensorBoard appends to its own event files
ARTEFACTS = ("last.pt", "best.pt", "history.csv", "config.json", "curves.png", "lr_find.csv", "lr_find.png")


def crop_fraction(text):
    """--crop-pct: a fraction, or none (the report's resize to the eval size without a crop)."""
    return None if text == "none" else float(text)


def strong(key):
    return f" (strong: {STRONG_RECIPE[key]})"


def get_args_parser():
    fmt = utils.HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--model", choices=models.MODEL_NAMES, help="which member to train (required unless "
                        "--resume PATH)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with train/ and val/")
    parser.add_argument("--out-dir", type=Path, help="run folder (default: runs/MODEL)")
    parser.add_argument("--recipe", default="report", choices=("report", "strong"), help="report: the course "
                        "report's recipe (every default below); strong: a modern fine-tuning recipe, the defaults "
                        "marked (strong: ...) below; a flag given explicitly always wins")
    parser.add_argument("--arch", default=models.DEFAULT_ARCH, help="timm ResNet-family backbone, e.g. "
                        "resnext50_32x4d, resnext101_32x8d.fb_swsl_ig1b_ft_in1k, resnet10t" + strong("arch"))
    parser.add_argument("--weights", default="imagenet", help="imagenet (timm download, cached), none, or a "
                        "local .pth/.safetensors backbone state dict")
    parser.add_argument("--vit-weights", default=models.DEFAULT_VIT, help="resnext_vit: HF id or local folder")
    parser.add_argument("--epochs", type=int, default=50, help="total epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (split across ranks)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR per 32 images (scaled by batch/32)"
                        + strong("lr"))
    parser.add_argument("--min-lr", type=float, default=1e-6, help="final cosine LR per 32 images")
    parser.add_argument("--opt", default="sgd", choices=models.OPTIMIZERS, help="optimizer: sgd (with --momentum; "
                        "without --layer-decay the report's torch SGD) or adamw, through timm's optimizer factory"
                        + strong("opt"))
    parser.add_argument("--layer-decay", type=float, help="LR x this per layer group from fc down to the stem "
                        "(timm's layer groups: stem, each block, fc) (default: off; strong: 0.9)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (the report's SGD: on every "
                        "weight; timm's optimizers: not on biases and norms; adamw: decoupled)"
                        + strong("weight_decay"))
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing (with "
                        "--mixup / --cutmix: of the mixed targets)" + strong("label_smoothing"))
    parser.add_argument("--img-size", type=int, default=224, help="train image size (--preprocessing pretrained: "
                        "the weights' input size)")
    parser.add_argument("--eval-size", type=int, help="image size of validation, ensemble.py and predict.py, "
                        "stored in the checkpoint (default: --img-size; --preprocessing pretrained: the weights' "
                        "test size)")
    parser.add_argument("--crop-pct", type=crop_fraction, help="eval crop fraction: resize the shorter side to "
                        "eval size / this, center-crop the eval size (timm's); none: resize to eval size x eval "
                        "size, the report's (default: none; --preprocessing pretrained: the weights' test crop)")
    parser.add_argument("--preprocessing", default="report", choices=("report", "pretrained"), help="report: "
                        "ImageNet mean and std, bilinear, eval resize without a crop; pretrained: mean, std, "
                        "interpolation, crop fraction and train and test sizes from timm's pretrained config of "
                        "--arch (resolve_data_config)" + strong("preprocessing"))
    parser.add_argument("--aug", default="report", choices=transforms.TRAIN_AUGS, help="train augmentation: report "
                        "(the report's chain), crop-flip (RandomResizedCrop and flip alone), fused (the report's "
                        "random maps as one warp from a reduced JPEG decode), fused-gpu (that warp done on the "
                        "device for the whole batch)" + strong("aug"))
    parser.add_argument("--auto-augment", default="none", choices=transforms.AUTO_AUGMENTS, help="trivial: "
                        "TrivialAugmentWide after the geometric steps (fused: on the crop, before the warp)"
                        + strong("auto_augment"))
    parser.add_argument("--random-erase", type=float, default=0.0, help="RandomErasing probability per image "
                        "(fused: on the crop, before the warp)" + strong("random_erase"))
    parser.add_argument("--mixup", type=float, default=0.0, help="MixUp alpha (timm's Mixup on the device batch, "
                        "soft-target loss; 0: off); with --cutmix too, each batch is one or the other"
                        + strong("mixup"))
    parser.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)" + strong("cutmix"))
    parser.add_argument("--cache-size", type=int, default=0, help="decode each train image once, shorter side "
                        "at most this many px (e.g. 2x --img-size), into --cache-dir; epochs read that instead "
                        "of the files (0: off)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="where --cache-size keeps "
                        "its files (one set per data folder and size, shared by the members; safe to delete)")
    parser.add_argument("--unfreeze", help="resnext_freeze: EPOCH:STAGE[+STAGE] list; after EPOCH those stages "
                        "train too; the cosine restarts at each section (default: the report's "
                        f"{models.DEFAULT_UNFREEZE} of 50 epochs, scaled to --epochs)")
    parser.add_argument("--freeze-bn-stats", action="store_true", help="resnext_freeze: keep running BatchNorm "
                        "statistics of frozen stages fixed (the report let them update)")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights, evaluated and saved too")
    parser.add_argument("--ema-decay", type=float, default=0.9998, help="EMA decay per step")
    parser.add_argument("--teacher", help="distil from this ensemble.pt or member best.pt/last.pt (frozen, "
                        "fed the student's augmented batch): the loss becomes --distill-alpha x the KL term plus "
                        "the rest x the label loss (default: no teacher)")
    parser.add_argument("--distill-alpha", type=float, default=1.0, help="--teacher: weight of the distillation "
                        "term, 0 to 1 (1: the teacher alone, as Beyer et al. 2022)")
    parser.add_argument("--distill-temp", type=float, default=1.0, help="--teacher: softmax temperature T of "
                        "KL(teacher || student), scaled by T^2")
    parser.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init)")
    parser.add_argument("--folds", type=int, default=0, help="K-fold cross-validation: pool train/ and val/, split "
                        "them into K stratified folds, train on K-1 and validate on --fold (0: off, the "
                        "train/val folders as they are)")
    parser.add_argument("--fold", type=int, default=0, help="with --folds K: the held-out fold, 0 to K-1")
    parser.add_argument("--fold-seed", type=int, default=0, help="with --folds: the seed of the split (the same "
                        "for every member and fold of one cross-validation)")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers per process (-1: 0 on "
                        "the CPU, else one per core of this process's share)")
    engine.add_runtime_args(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across ranks under torchrun")
    parser.add_argument("--strict", action="store_true", help="refuse to train when an image is unreadable "
                        "(default: warn and leave it out)")
    parser.add_argument("--resume", nargs="?", const="last", help="continue a run from PATH, or (no PATH) from "
                        "--out-dir's last.pt when there is one, else start it")
    parser.add_argument("--stop-after", type=int, help="end cleanly after this epoch, resumable later")
    parser.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: off)")
    parser.add_argument("--log-every", type=int, default=20, help="steps between progress updates (each costs "
                        "a host sync)")
    parser.add_argument("--detect-anomaly", action="store_true", help="torch.autograd anomaly detection (slow)")
    parser.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="write no TensorBoard "
                        "event files into --out-dir (default: write them, on rank 0)")
    parser.add_argument("--find-lr", action="store_true", help="train nothing: run an LR range test from the "
                        "run's starting weights with its data, optimizer and loss, write lr_find.csv and "
                        "lr_find.png into --out-dir and print a suggested --lr: the LR of the steepest descent "
                        "of the smoothed loss (no checkpoint is written)")
    parser.add_argument("--find-lr-start", type=float, default=1e-7, help="--find-lr: first LR, per 32 images "
                        "like --lr")
    parser.add_argument("--find-lr-end", type=float, default=10.0, help="--find-lr: last LR, per 32 images")
    parser.add_argument("--find-lr-steps", type=int, default=200, help="--find-lr: steps from start to end "
                        "(the LR rises exponentially; the train split is cycled when it has fewer batches; the "
                        "test stops early once the smoothed loss passes 4x its minimum)")
    return parser


def explicit_flags(argv):
    """The flags given on the command line (not left at their defaults)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_distill(args, given):
    if args.teacher is None and {"distill_alpha", "distill_temp"} & given:
        raise UserError("--distill-alpha and --distill-temp need --teacher")
    if not 0 <= args.distill_alpha <= 1:
        raise UserError(f"--distill-alpha {args.distill_alpha} must be from 0 to 1")
    if not args.distill_temp > 0:
        raise UserError(f"--distill-temp {args.distill_temp} must be above 0")


def check_find_lr(args):
    if args.resume is not None:
        raise UserError("--find-lr starts from the run's initial weights; leave out --resume")
    utils.refuse_distributed("train.py --find-lr")
    if args.find_lr_steps < 2:
        raise UserError(f"--find-lr-steps {args.find_lr_steps} must be at least 2")
    if not 0 < args.find_lr_start < args.find_lr_end:
        raise UserError(f"--find-lr-start {args.find_lr_start} must be above 0 and below --find-lr-end "
                        f"{args.find_lr_end}")


def resolve_preprocessing(args, given):
    """The input pipeline of a new run: --preprocessing's (the report's, or the weights' pretrained config),
    with --img-size, --eval-size and --crop-pct winning when given. Sets img_size, eval_size, crop_pct,
    interpolation, mean and std on args."""
    if args.preprocessing == "pretrained":
        pipeline = models.pretrained_preprocessing(args.arch)
    else:
        pipeline = {"img_size": args.img_size, "eval_size": None, "crop_pct": None, "interpolation": "bilinear",
                    "mean": list(transforms.IMAGENET_MEAN), "std": list(transforms.IMAGENET_STD)}
    for key, value in pipeline.items():
        if key not in given:
            setattr(args, key, value)
    if args.eval_size is None:
        args.eval_size = args.img_size
    for flag, value in (("--img-size", args.img_size), ("--eval-size", args.eval_size)):
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UserError(f"--crop-pct {args.crop_pct} must be above 0 and at most 1, or none")


def new_run(args, out_dir, given):
    args.out_dir = out_dir
    if args.recipe == "strong":
        for key, value in STRONG_RECIPE.items():
            if key not in given:
                setattr(args, key, value)
    resolve_preprocessing(args, given)
    if args.model == "resnext_freeze":
        args.unfreeze = models.resolve_unfreeze(args.unfreeze, args.epochs)
    return args, None


def resolve_args(args, given):
    """Fill in defaults that depend on other flags. On resume the recipe and --data-dir come from the
    checkpoint; runtime flags (RUNTIME_FLAGS) are this command's; a recipe flag given with another
    value is an error."""
    if args.resume is None:
        if args.model is None:
            raise UserError("--model is required (resnext, resnext_freeze or resnext_vit)")
        return new_run(args, args.out_dir or Path("runs") / args.model, given)
    if args.resume == "last":
        if args.model is None and args.out_dir is None:
            raise UserError("--resume without a PATH needs --model or --out-dir to find last.pt")
        path = (args.out_dir or Path("runs") / args.model) / "last.pt"
        if not path.exists() and args.model is not None:  # nothing to resume yet: start (a requeued job)
            if os.environ.get("RANK", "0") == "0":
                print(f"no {path} yet: starting a new run")
            args.resume = None
            return new_run(args, path.parent, given)
    else:
        path = Path(args.resume)
    ckpt = checkpoints.load(path, kind="member")
    if args.model is not None and args.model != ckpt["model"]:
        raise UserError(f"--resume {path} holds a {ckpt['model']} run, not --model {args.model}")
    for key, value in ckpt["args"].items():
        if key in given and key not in RUNTIME_FLAGS and getattr(args, key) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} cannot change when resuming {path} (its run uses {value}); "
                            "leave it out, or start a new run in another --out-dir")
        if key == "data_dir" and key not in given:  # the run's data, unless pointed elsewhere
            args.data_dir = Path(value)
        elif key not in RUNTIME_FLAGS:
            setattr(args, key, value)
    for key in checkpoints.PREPROCESSING_KEYS:  # the run's pipeline (an older file's args lack it)
        setattr(args, key, ckpt[key])
    args.resume, args.out_dir = str(path), args.out_dir or path.parent
    return args, ckpt


def lr_at(args, sections, steps_per_epoch, epoch, step):
    """Cosine from lr to min-lr within the unfreezing section holding `epoch` (1-based), per iteration."""
    scale = args.batch_size / 32
    first, last = next((a, b) for a, b in sections if a <= epoch <= b)
    progress = ((epoch - first) * steps_per_epoch + step) / ((last - first + 1) * steps_per_epoch)
    return scale * (args.min_lr + (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress)) / 2)


def write_history(out_dir, history, title, section_starts):
    """history.csv and curves.png, rewritten whole from the rows that last.pt holds."""
    utils.atomic_write_text(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
    utils.plot_curves(history, out_dir / "curves.png", title=title, section_starts=section_starts)


def check_disk_space(out_dir, model, ema):
    """Refuse to start when the disk cannot hold a checkpoint twice (the new one is written beside the old)."""
    per_copy = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    needed = per_copy * (3 if ema else 2) * 2
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise UserError(f"--out-dir {out_dir} has {free / 2**30:.1f} GiB free, but a checkpoint needs about "
                        f"{needed / 2**30:.1f} GiB (new and previous); free some space or choose another folder")


def open_cache(args, train_paths, local_rank, is_main):
    """The decoded-image cache of --cache-size (None when 0): each node's first process builds it, the
    others then open it."""
    if args.cache_size != 0 and args.cache_size < args.img_size:
        raise UserError(f"--cache-size {args.cache_size} is below --img-size {args.img_size}, so every crop would "
                        f"be enlarged; use 0 (no cache) or at least {args.img_size} (2x keeps most crops sharp)")
    if args.cache_size == 0:
        return None
    decoded = None
    if local_rank == 0:
        decoded = cache.DecodedCache.build(train_paths, args.cache_dir, args.cache_size, progress=is_main)
    if dist.is_initialized():
        dist.barrier()
    if decoded is None:
        decoded = cache.DecodedCache.load(train_paths, args.cache_dir, args.cache_size)
    if decoded is None:
        raise UserError(f"--cache-dir {args.cache_dir} must be one folder for all the processes of a node")
    return decoded


def forward_model(model, args, world_size, local_rank, device):
    """The model the steps run: wrapped in DDP under torchrun (it registers only the parameters that need
    grad, so it is rebuilt whenever unfreezing changes them) and compiled with --compile."""
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


def save_last(out_dir, spec, training, state, args, is_main, writer=None, folds=None, teacher=None):
    """Write out_dir/last.pt (rank 0; every rank calls this, for the RNG gather), with the --teacher record
    (distill.read_teacher; the teacher's weights are never saved). Returns its path. The TensorBoard writer
    is flushed first, so that the event files always reach as far as last.pt."""
    rng = utils.gather_rng()
    if not is_main:
        return None
    if writer is not None:
        writer.flush()
    ema = training.ema.module.state_dict() if training.ema is not None else None
    ckpt = checkpoints.member_checkpoint(spec, state_dict=training.model.state_dict(), ema_state_dict=ema,
                                         state=state, optimizer=training.optimizer.state_dict(),
                                         scaler=training.scaler.state_dict(), rng=rng, args=vars(args),
                                         folds=folds, teacher=teacher)
    checkpoints.save(ckpt, out_dir / "last.pt")
    return out_dir / "last.pt"


def split_folds(args, paths, labels, ckpt):
    """--folds: the pooled images split into this run's train and held-out fold (data.fold_split), and the
    fold's record for the checkpoint; a resumed run must find the same held-out images."""
    if args.folds < 2 or not 0 <= args.fold < args.folds:
        raise UserError(f"--folds {args.folds} --fold {args.fold}: need --folds of at least 2 and --fold from 0 "
                        "to --folds minus 1")
    names = [Path(p).relative_to(args.data_dir).as_posix() for p in paths]
    train, held_out, digest = data.fold_split(names, labels, args.folds, args.fold, args.fold_seed)
    if ckpt is not None and (ckpt.get("folds") or {}).get("held_out_sha256") != digest:
        raise UserError(f"--resume {args.resume}: the held-out fold of {args.data_dir} is not the one this run "
                        "validated on (images were added, removed or became unreadable); resume on the same data")
    record = {"folds": args.folds, "fold": args.fold, "fold_seed": args.fold_seed, "held_out_sha256": digest}
    return ([paths[i] for i in train], [labels[i] for i in train], [paths[i] for i in held_out],
            [labels[i] for i in held_out], record)


def first_batch_images(train_set, sampler, prepare_images, count=16):
    """The first `count` images of epoch 1's first batch, augmented as its first step sees them (each
    sample's augmentation is a function of its seed: drawing them here changes no random state)."""
    sampler.set_epoch(1)
    images, _ = torch.utils.data.default_collate([train_set[item] for item in next(iter(sampler))[:count]])
    return prepare_images(images)


def find_lr(args, training, freeze, train_loader, sampler, out_dir):
    """--find-lr: the LR range test (lr_finder) in epoch 1's set-up (its trainable stages); writes
    lr_find.csv and lr_find.png and prints the suggested --lr. Returns the suggestion, per 32 images."""
    model, device = training.model, training.runtime.device
    model.train()
    if freeze:
        models.apply_unfreeze(model, freeze, 1, args.freeze_bn_stats)
    training.forward_model = forward_model(model, args, 1, 0, device)
    lrs = lr_finder.lr_steps(args.find_lr_start, args.find_lr_end, args.find_lr_steps)
    rows = lr_finder.range_test(training, lr_finder.cycle(train_loader, sampler), lrs,
                                lr_scale=args.batch_size / 32)
    suggested = lr_finder.suggest(rows)
    lr = rows[suggested]["lr"]
    lr_finder.write_csv(rows, out_dir / "lr_find.csv")
    lr_finder.plot(rows, suggested, out_dir / "lr_find.png", title=f"{args.model} ({args.arch}), batch "
                   f"{args.batch_size}: LR range test")
    ended = (f"the smoothed loss passed {lr_finder.DIVERGED:g}x its minimum at step {len(rows)}"
             if len(rows) < len(lrs) else f"all {len(rows)} steps ran")
    lowest = min(rows, key=lambda row: row["smoothed_loss"])
    print(f"LR range test from {args.find_lr_start:g} to {args.find_lr_end:g} per 32 images: {ended}; the "
          f"smoothed loss went from {rows[0]['smoothed_loss']:.4f} to {lowest['smoothed_loss']:.4f} at "
          f"{lowest['lr']:.2e}")
    if lowest is rows[0]:
        warnings.warn("the smoothed loss never fell below its first value, so the suggestion means little; "
                      "try a lower --find-lr-start or more --find-lr-steps", stacklevel=2)
    print(f"suggested --lr {lr:.2e} (per 32 images; steepest descent of the smoothed loss, step {suggested + 1})")
    print(f"wrote {out_dir / 'lr_find.csv'} and {out_dir / 'lr_find.png'}")
    return lr


def accuracy_text(row, key):
    """A history row's accuracy with its interval, e.g. '43.12 [35.7, 50.9]'."""
    return stats.accuracy_text(row[key], row[f"{key}_low"], row[f"{key}_high"])


def resume_hint(out_dir, world_size):
    launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
    return f"{launcher} train.py --resume {out_dir / 'last.pt'}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = get_args_parser().parse_args(argv)
    if args.find_lr:
        check_find_lr(args)
    given = explicit_flags(argv)
    args, ckpt = resolve_args(args, given)
    check_distill(args, given)
    teacher_ckpt, teacher_record = None, None
    if args.teacher is not None:  # a bad file fails here, before the data scan
        teacher_ckpt, teacher_record = distill.read_teacher(args.teacher, alpha=args.distill_alpha,
                                                            temp=args.distill_temp, resumed=ckpt)
    rank, world_size, local_rank = utils.init_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    runtime = engine.resolve_runtime(args.device, args.precision, args.channels_last, local_rank)
    device = runtime.device
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    utils.seed_everything(args.seed + rank)
    out_dir = args.out_dir
    if is_main:
        utils.check_writable(out_dir)
        utils.remove_stale_temps(out_dir, ARTEFACTS)  # left by a kill -9 in the middle of a write

    # -------------------------------------------------------------------- data
    train_paths, train_labels, class_names = data.load_split(args.data_dir, "train", strict=args.strict)
    val_paths, val_labels, _ = data.load_split(args.data_dir, "val", class_names, strict=args.strict)
    folds = None
    if args.folds or args.fold:
        train_paths, train_labels, val_paths, val_labels, folds = split_folds(
            args, train_paths + val_paths, train_labels + val_labels, ckpt)
        log(f"fold {args.fold} of {args.folds} (--fold-seed {args.fold_seed}): {len(train_paths)} train / "
            f"{len(val_paths)} held-out images of the pooled train/ and val/")
    if ckpt is not None and ckpt["class_names"] != class_names:
        raise UserError(f"--resume {args.resume} was trained on other classes than {args.data_dir}/train "
                        f"({len(ckpt['class_names'])} vs {len(class_names)} classes, or another order)")
    mean, std = args.mean, args.std
    preprocessing = {key: getattr(args, key) for key in checkpoints.PREPROCESSING_KEYS}
    train_set = data.ImageDataset(train_paths, train_labels, transforms.train_transform(
        args.img_size, aug=args.aug, mean=mean, std=std, auto_augment=args.auto_augment,
        random_erase=args.random_erase, interpolation=args.interpolation),
        open_cache(args, train_paths, local_rank, is_main))
    val_set = data.ImageDataset(val_paths, val_labels, transforms.eval_transform_of(preprocessing))
    workers = data.loader_workers(args.workers, device, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    sampler = data.TrainBatchSampler(len(train_set), args.batch_size, args.seed, rank, world_size)
    train_loader = data.make_loader(train_set, device=device, workers=workers, batch_sampler=sampler)
    val_loader = data.make_loader(data.shard(val_set, rank, world_size), device=device, workers=workers,
                                  batch_size=args.batch_size // world_size)
    steps_per_epoch = sampler.steps_per_epoch

    # ------------------------------------------------------------------- model
    if ckpt is None:
        model = models.build_model(args.model, args.arch, len(class_names), args.weights, args.vit_weights)
    else:  # everything comes from the checkpoint: no network, no original weights
        model = checkpoints.build_member(ckpt, ckpt["state_dict"])
    if args.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm); leave it out on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    runtime.place(model)
    spec = checkpoints.member_spec(model, args.model, args.arch, class_names, args.img_size, mean, std,
                                   args.eval_size, args.interpolation, args.crop_pct)
    teacher = None
    if teacher_ckpt is not None:  # each rank its own copy, outside DDP
        teacher = distill.build_teacher(teacher_ckpt, args.teacher, class_names, spec, runtime, args.data_dir)
        del teacher_ckpt
    freeze = models.parse_unfreeze(args.unfreeze) if args.model == "resnext_freeze" else None
    sections = models.section_bounds(freeze, args.epochs) if freeze else [(1, args.epochs)]
    section_starts = [first for first, _ in sections[1:]]
    optimizer = models.create_optimizer(model, args.opt, lr=args.lr, momentum=args.momentum,
                                        weight_decay=args.weight_decay, layer_decay=args.layer_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    prepare_images = None
    if args.aug == "fused-gpu":  # batches of (uint8 crops, maps), warped on the device
        prepare_images = functools.partial(fused.warp_on_device, img_size=args.img_size, mean=mean, std=std,
                                           device=device, memory_format=runtime.memory_format)
    mix, criterion = None, nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if args.mixup or args.cutmix:
        if min(args.mixup, args.cutmix) < 0:
            raise UserError(f"--mixup {args.mixup} and --cutmix {args.cutmix} must not be negative (0: off)")
        if (args.batch_size // world_size) % 2:
            raise UserError(f"--mixup / --cutmix pair each image with another of its batch: --batch-size "
                            f"{args.batch_size} must give each of the {world_size} process(es) an even batch")
        # its draws come from numpy's global RNG, which last.pt saves: a resumed run mixes as an uninterrupted one
        mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                    num_classes=len(class_names))
        criterion = SoftTargetCrossEntropy()
    training = engine.Training(model, model, optimizer, scaler, criterion, runtime, ema, prepare_images, mix,
                               teacher, args.distill_alpha, args.distill_temp)
    if args.find_lr:
        find_lr(args, training, freeze, train_loader, sampler, out_dir)
        return
    if is_main and ckpt is None:
        check_disk_space(out_dir, model, ema)
        tensorboard_log.remove_event_files(out_dir)

    state = checkpoints.TrainState()
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema_state_dict"])
        state = checkpoints.train_state(ckpt)
        if len(ckpt["rng"]) == world_size:
            utils.set_rng_state(ckpt["rng"][rank])
        log(f"resuming {args.resume}: epoch {state.epoch + 1}, step {state.step} of {steps_per_epoch}")
        # an epoch's end writes last.pt, then best.pt and history.csv: a kill in between leaves those
        # behind last.pt, so bring them up to it before anything else is written
        if is_main and state.history:
            if state.step == 0 and state.best_epoch == state.epoch:
                utils.atomic_link(args.resume, out_dir / "best.pt")
            write_history(out_dir, state.history, f"{args.model} ({args.arch})", section_starts)

    config = dict(vars(args), out_dir=str(out_dir), data_dir=str(args.data_dir), cache_dir=str(args.cache_dir),
                  resume=args.resume, world_size=world_size, device=str(device), precision=runtime.precision,
                  workers=workers, num_classes=len(class_names), train_images=len(train_set),
                  val_images=len(val_set), steps_per_epoch=steps_per_epoch, peak_lr=args.lr * args.batch_size / 32,
                  params=models.count_params(model))
    if is_main:
        utils.atomic_write_json(out_dir / "config.json", config)
        log(f"{args.model} ({args.arch}, {config['params'] / 1e6:.2f}M params; {args.recipe} recipe, "
            f"{args.img_size} px, eval {args.eval_size} px) on {device} [{runtime.precision}], "
            f"{world_size} process(es); {len(class_names)} classes, {len(train_set)} train / "
            f"{len(val_set)} val images; {steps_per_epoch} steps of {args.batch_size} per epoch")
        if teacher is not None:
            log(f"distilling from --teacher {args.teacher} ({teacher_record['kind']}, SHA-256 "
                f"{teacher_record['sha256'][:12]}...): loss = {args.distill_alpha:g} x T^2 KL at T = "
                f"{args.distill_temp:g} + {1 - args.distill_alpha:g} x label loss")
    writer = None
    if is_main and args.tensorboard:
        # events an earlier process logged after the last.pt resumed from are dropped by TensorBoard
        writer = tensorboard_log.open_writer(
            out_dir, purge_step=None if ckpt is None else state.epoch * steps_per_epoch + state.step + 1)
        if ckpt is None:
            tensorboard_log.log_images(writer, first_batch_images(
                train_set, sampler, prepare_images or runtime.images), mean, std)

    # -------------------------------------------------------------------- loop
    stop = utils.StopSignal()
    trainable = None
    first_epoch = state.epoch + 1
    for epoch in range(first_epoch, args.epochs + 1):
        model.train()
        stages = models.apply_unfreeze(model, freeze, epoch, args.freeze_bn_stats) if freeze else None
        if training.forward_model is model or stages != trainable:
            trainable = stages
            training.forward_model = forward_model(model, args, world_size, local_rank, device)
        sampler.set_epoch(epoch, state.step)
        try:
            metrics, stopped_at = engine.train_one_epoch(
                training, train_loader, epoch=epoch, steps_per_epoch=steps_per_epoch,
                lr_at=functools.partial(lr_at, args, sections, steps_per_epoch, epoch), start_step=state.step,
                epoch_sums=state.epoch_sums, log_every=args.log_every, save_every=args.save_every, stop=stop,
                save_partial=lambda step, sums: save_last(out_dir, spec, training, dataclasses.replace(
                    state, step=step, epoch_sums=sums), args, is_main, writer, folds, teacher_record),
                on_log=None if writer is None else lambda step, figures: tensorboard_log.log_step(
                    writer, (epoch - 1) * steps_per_epoch + step, figures),
                progress=is_main, desc=f"epoch {epoch}/{args.epochs}")
        except engine.NonFiniteError as error:
            good = out_dir / "last.pt" if (out_dir / "last.pt").exists() else args.resume or "none yet"
            raise UserError(f"{error} of {steps_per_epoch}; the last good checkpoint ({good}) is left intact; "
                            "lower --lr or look with --detect-anomaly") from error
        if stopped_at is not None:
            log(f"stopped at epoch {epoch}, step {stopped_at}; checkpoint {out_dir / 'last.pt'}; "
                f"resume with: {resume_hint(out_dir, world_size)}")
            sys.exit(128 + (stop.signum or 15))

        # ------------------------------------------------------------ evaluate
        val_started = time.perf_counter()
        if dist.is_initialized():  # rank 0's BatchNorm statistics are the ones saved: evaluate with them
            for buffer in [*model.buffers(), *(ema.module.buffers() if ema else [])]:
                dist.broadcast(buffer, 0)
        val = engine.evaluate(model, val_loader, runtime)
        ema_val = engine.evaluate(ema.module, val_loader, runtime) if ema is not None else None
        row = {"epoch": epoch, "lr": metrics["lr"], "train_loss": metrics["loss"], "train_acc": metrics["acc"],
               "val_loss": val["loss"], **stats.accuracy_fields("val_acc", val["correct"], val["count"]),
               "seconds": metrics["seconds"] + time.perf_counter() - val_started,
               "images_per_s": metrics["images_per_s"],
               "trainable_params": models.count_params(model, trainable_only=True)}
        use_ema = ema_val is not None and ema_val["acc"] > val["acc"]
        if ema_val is not None:
            row["ema_val_loss"] = ema_val["loss"]
            row.update(stats.accuracy_fields("ema_val_acc", ema_val["correct"], ema_val["count"]))
        epoch_acc = ema_val["acc"] if use_ema else val["acc"]
        state.history.append(row)
        improved = epoch_acc > state.best_acc
        if improved:
            state.best_acc, state.best_epoch = epoch_acc, epoch
        state.epoch, state.step, state.epoch_sums, state.use_ema = epoch, 0, None, use_ema
        path = save_last(out_dir, spec, training, state, args, is_main, writer, folds, teacher_record)
        if writer is not None:  # after last.pt: a resumed run never logs this epoch again
            tensorboard_log.log_epoch(writer, row)
        if is_main:
            if improved:
                utils.atomic_link(path, out_dir / "best.pt")
            write_history(out_dir, state.history, f"{args.model} ({args.arch})", section_starts)
            ema_note = f" ema_val_acc {accuracy_text(row, 'ema_val_acc')}" if ema is not None else ""
            tqdm.write(f"epoch {epoch}/{args.epochs} lr {row['lr']:.2e} train_loss {row['train_loss']:.4f} "
                       f"train_acc {row['train_acc']:.2f} val_loss {row['val_loss']:.4f} "
                       f"val_acc {accuracy_text(row, 'val_acc')}{ema_note} {row['images_per_s']:.0f} img/s "
                       f"{row['seconds']:.0f}s{' *' if improved else ''}")
        stopping = utils.any_rank(stop.requested, device)
        if stopping or epoch == args.stop_after:
            if epoch < args.epochs:
                log(f"stopped after epoch {epoch}; resume with: {resume_hint(out_dir, world_size)}")
            if stopping:
                sys.exit(128 + (stop.signum or 15))
            break

    if state.best_epoch:  # none with --epochs 0
        interval = stats.interval_text(*stats.accuracy_interval(state.best_acc, len(val_set)))
        log(f"best val accuracy {state.best_acc:.2f}% {interval} (95% Wilson interval; epoch {state.best_epoch}), "
            f"saved in {out_dir / 'best.pt'}")
    if writer is not None:
        if state.epoch == args.epochs >= first_epoch:  # the run ended in this process
            last = state.history[-1]
            tensorboard_log.log_hparams(
                writer, {key: value for key, value in vars(args).items() if key not in RUNTIME_FLAGS},
                {"hparams/best_val_acc": state.best_acc, "hparams/val_acc": last["val_acc"],
                 "hparams/val_loss": last["val_loss"], "hparams/train_loss": last["train_loss"]}, args.epochs)
        writer.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    utils.run_main(main)
