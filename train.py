"""Train one member of the ensemble.

    python train.py --model resnext|resnext_freeze|resnext_vit [--data-dir data] [--out-dir runs/MODEL]
    torchrun --nproc_per_node=N train.py --model ...      (DistributedDataParallel, same recipe)

Defaults reproduce the course report: SGD momentum 0.9, batch 32, cosine LR 1e-3 -> 1e-6 stepped per
iteration, 50 epochs at 224 px. --lr and --min-lr are per 32 images: they are scaled linearly with
--batch-size. Writes last.pt (every epoch), best.pt, history.csv, config.json and curves.png.
"""
import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import models
import utils
from utils import UserError

# flags that may differ when a run is resumed; every other flag comes from the checkpoint
RUNTIME_FLAGS = ("data_dir", "out_dir", "cache_dir", "resume", "workers", "device", "stop_after", "save_every",
                 "log_every", "compile", "detect_anomaly", "strict")
ARTEFACTS = ("last.pt", "best.pt", "history.csv", "config.json", "curves.png")  # what a run writes in --out-dir


def get_args_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--model", choices=models.MODEL_NAMES, help="which member to train (required unless "
                        "--resume PATH)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with train/ and val/")
    parser.add_argument("--out-dir", type=Path, help="run folder (default: runs/MODEL)")
    parser.add_argument("--arch", default=models.DEFAULT_ARCH, help="timm ResNet-family backbone, e.g. "
                        "resnext50_32x4d, resnext101_32x8d.fb_swsl_ig1b_ft_in1k, resnet10t")
    parser.add_argument("--weights", default="imagenet", help="imagenet (timm download, cached), none, or a "
                        "local .pth/.safetensors backbone state dict")
    parser.add_argument("--vit-weights", default=models.DEFAULT_VIT, help="resnext_vit: HF id or local folder")
    parser.add_argument("--epochs", type=int, default=50, help="total epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="global batch size (split across ranks)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR per 32 images (scaled by batch/32)")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="final cosine LR per 32 images")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    parser.add_argument("--img-size", type=int, default=224, help="train and eval image size")
    parser.add_argument("--aug", default="report", choices=data.TRAIN_AUGS, help="train augmentation: report "
                        "(the report's chain), fused (the same random maps as one warp from a reduced JPEG "
                        "decode), fused-gpu (that warp done on the device for the whole batch)")
    parser.add_argument("--cache-size", type=int, default=0, help="decode each train image once, shorter side "
                        "at most this many px (e.g. 2x --img-size), into --cache-dir; epochs read that instead "
                        "of the files (0: off)")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"), help="where --cache-size keeps "
                        "its files (one set per data folder and size, shared by the members; safe to delete)")
    parser.add_argument("--unfreeze", default=models.DEFAULT_UNFREEZE, help="resnext_freeze: EPOCH:STAGE[+STAGE] "
                        "list; after EPOCH those stages train too; the cosine restarts at each section")
    parser.add_argument("--freeze-bn-stats", action="store_true", help="resnext_freeze: keep running BatchNorm "
                        "statistics of frozen stages fixed (the report let them update)")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights, evaluated and saved too")
    parser.add_argument("--ema-decay", type=float, default=0.9998, help="EMA decay per step")
    parser.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentation, init)")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers per process (-1: 0 on "
                        "the CPU, else one per core of this process's share)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="device")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="auto: bf16 on GPUs that have it, else fp16 with a scaler; fp32 on CPU")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="channels_last memory format (auto: on for CUDA)")
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
    return parser


def explicit_flags(argv):
    """The flags given on the command line (not left at their defaults)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def resolve_args(args, given):
    """Fill in defaults that depend on other flags. On resume the recipe and --data-dir come from the
    checkpoint; runtime flags (RUNTIME_FLAGS) are this command's; a recipe flag given with another
    value is an error."""
    if args.resume is None:
        if args.model is None:
            raise UserError("--model is required (resnext, resnext_freeze or resnext_vit)")
        args.out_dir = args.out_dir or Path("runs") / args.model
        return args, None
    if args.resume == "last":
        if args.model is None and args.out_dir is None:
            raise UserError("--resume without a PATH needs --model or --out-dir to find last.pt")
        path = (args.out_dir or Path("runs") / args.model) / "last.pt"
        if not path.exists() and args.model is not None:  # nothing to resume yet: start (a requeued job)
            if os.environ.get("RANK", "0") == "0":
                print(f"no {path} yet: starting a new run")
            args.resume, args.out_dir = None, path.parent
            return args, None
    else:
        path = Path(args.resume)
    ckpt = utils.load_checkpoint(path, kind="member")
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
    args.resume, args.out_dir = str(path), args.out_dir or path.parent
    return args, ckpt


def lr_at(args, sections, steps_per_epoch, epoch, step):
    """Cosine from lr to min-lr within the unfreezing section holding `epoch` (1-based), per iteration."""
    scale = args.batch_size / 32
    first, last = next((a, b) for a, b in sections if a <= epoch <= b)
    progress = ((epoch - first) * steps_per_epoch + step) / ((last - first + 1) * steps_per_epoch)
    return scale * (args.min_lr + (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress)) / 2)


def evaluate(model, loader, device, precision, channels_last):
    """Summed loss, correct and count over this rank's shard, reduced over ranks: each image counted once."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=channels_last)
            labels = labels.to(device, non_blocking=True)
            with utils.autocast(device, precision):
                logits = model(images)
            totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += labels.numel()
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return loss / count, 100 * correct / count


def any_rank(flag, device):
    """True on every rank when it is true on one (so that all ranks stop at the same step)."""
    if not dist.is_initialized():
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def gather_rng():
    """Every rank's RNG state, gathered to all (rank 0 saves them)."""
    state = utils.rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def write_history(out_dir, history, title, section_starts):
    """history.csv and curves.png, rewritten whole from the rows that last.pt holds."""
    utils.atomic_write_text(out_dir / "history.csv", pd.DataFrame(history).to_csv(index=False))
    utils.plot_curves(history, out_dir / "curves.png", title=title, section_starts=section_starts)


def all_finite(tensors):
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def check_disk_space(out_dir, model, ema):
    """Refuse to start when the disk cannot hold a checkpoint twice (the new one is written beside the old)."""
    per_copy = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    needed = per_copy * (3 if ema else 2) * 2
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise UserError(f"--out-dir {out_dir} has {free / 2**30:.1f} GiB free, but a checkpoint needs about "
                        f"{needed / 2**30:.1f} GiB (new and previous); free some space or choose another folder")


def main():
    args, ckpt = resolve_args(get_args_parser().parse_args(), explicit_flags(sys.argv[1:]))
    rank, world_size, local_rank = utils.init_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    device = utils.resolve_device(args.device, local_rank)
    precision = utils.resolve_precision(args.precision, device)
    channels_last = torch.channels_last if (args.channels_last == "on" or (
        args.channels_last == "auto" and device.type == "cuda")) else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.autograd.set_detect_anomaly(args.detect_anomaly)
    utils.seed_everything(args.seed + rank)
    out_dir = args.out_dir
    if is_main:
        utils.check_writable(out_dir)
        utils.remove_stale_temps(out_dir, ARTEFACTS)  # left by a kill -9 in the middle of a write

    # -------------------------------------------------------------------- data
    train_paths, train_labels, class_names = data.load_split(args.data_dir, "train", strict=args.strict)
    val_paths, val_labels, _ = data.load_split(args.data_dir, "val", class_names, strict=args.strict)
    if ckpt is not None and ckpt["class_names"] != class_names:
        raise UserError(f"--resume {args.resume} was trained on other classes than {args.data_dir}/train "
                        f"({len(ckpt['class_names'])} vs {len(class_names)} classes, or another order)")
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    train_pipeline = data.train_transform(args.img_size, aug=args.aug, mean=mean, std=std)
    cache = None
    if args.cache_size != 0 and args.cache_size < args.img_size:
        raise UserError(f"--cache-size {args.cache_size} is below --img-size {args.img_size}, so every crop would "
                        f"be enlarged; use 0 (no cache) or at least {args.img_size} (2x keeps most crops sharp)")
    if args.cache_size > 0:  # each node's first process builds it, the others then open it
        if local_rank == 0:
            cache = data.DecodedCache.build(train_paths, args.cache_dir, args.cache_size, progress=is_main)
        if dist.is_initialized():
            dist.barrier()
        if cache is None:
            cache = data.DecodedCache.load(train_paths, args.cache_dir, args.cache_size)
        if cache is None:
            raise UserError(f"--cache-dir {args.cache_dir} must be one folder for all the processes of a node")
    train_set = data.ImageDataset(train_paths, train_labels, train_pipeline, cache)
    val_set = data.ImageDataset(val_paths, val_labels, data.eval_transform(args.img_size, mean=mean, std=std))
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
        model = models.member_from_spec(ckpt, ckpt["state_dict"])
    if args.sync_bn and world_size > 1:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm); leave it out on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=channels_last)
    spec = models.member_spec(model, args.model, args.arch, class_names, args.img_size, mean, std)
    freeze = models.parse_unfreeze(args.unfreeze) if args.model == "resnext_freeze" else None
    sections = models.section_bounds(freeze, args.epochs) if freeze else [(1, args.epochs)]
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    if is_main and ckpt is None:
        check_disk_space(out_dir, model, ema)

    start_epoch, start_step, best_acc, best_epoch, history, partial = 1, 0, -1.0, 0, [], None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema_state_dict"])
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
        best_acc, best_epoch, history, partial = ckpt["best_acc"], ckpt["best_epoch"], ckpt["history"], ckpt["partial"]
        if len(ckpt["rng"]) == world_size:
            utils.set_rng_state(ckpt["rng"][rank])
        log(f"resuming {args.resume}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}")
        # an epoch's end writes last.pt, then best.pt and history.csv: a kill in between leaves those
        # behind last.pt, so bring them up to it before anything else is written
        if is_main and history:
            if ckpt["step"] == 0 and ckpt["best_epoch"] == ckpt["epoch"]:
                utils.atomic_link(args.resume, out_dir / "best.pt")
            write_history(out_dir, history, f"{args.model} ({args.arch})", [a for a, _ in sections[1:]])

    config = dict(vars(args), out_dir=str(out_dir), data_dir=str(args.data_dir), cache_dir=str(args.cache_dir),
                  resume=args.resume, world_size=world_size, device=str(device), precision=precision, workers=workers,
                  num_classes=len(class_names), train_images=len(train_set), val_images=len(val_set),
                  steps_per_epoch=steps_per_epoch, peak_lr=args.lr * args.batch_size / 32,
                  params=models.count_params(model))
    if is_main:
        utils.atomic_write_json(out_dir / "config.json", config)
        log(f"{args.model} ({args.arch}, {config['params'] / 1e6:.2f}M params) on {device} [{precision}], "
            f"{world_size} process(es); {len(class_names)} classes, {len(train_set)} train / "
            f"{len(val_set)} val images; {steps_per_epoch} steps of {args.batch_size} per epoch")

    def save(epoch, step, partial_sums, weights):
        """Write last.pt (rank 0; all ranks call this for the RNG gather). Returns the checkpoint path."""
        rng = gather_rng()
        if not is_main:
            return None
        state = dict(spec, format=utils.CHECKPOINT_FORMAT, kind="member", state_dict=model.state_dict(),
                     ema_state_dict=ema.module.state_dict() if ema else None, weights=weights,
                     epoch=epoch, step=step, partial=partial_sums, best_acc=best_acc, best_epoch=best_epoch,
                     history=history, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng,
                     args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
        utils.atomic_save_torch(state, out_dir / "last.pt")
        return out_dir / "last.pt"

    def resume_hint():
        launcher = "torchrun --nproc_per_node=%d" % world_size if world_size > 1 else "python"
        return f"{launcher} train.py --resume {out_dir / 'last.pt'}"

    def to_device(images):
        """A train batch on the device; fused-gpu batches are (uint8 images, maps) warped there in one go."""
        if args.aug != "fused-gpu":
            return images.to(device, non_blocking=True, memory_format=channels_last)
        pixels, maps = (t.to(device, non_blocking=True) for t in images)
        return data.warp_batch(pixels, maps, args.img_size, mean=mean, std=std).contiguous(
            memory_format=channels_last)

    # -------------------------------------------------------------------- loop
    stop = utils.StopSignal()
    trainable, train_model, weights = None, None, ckpt["weights"] if ckpt else "raw"
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        stages = models.apply_unfreeze(model, freeze, epoch, args.freeze_bn_stats) if freeze else None
        if train_model is None or stages != trainable:  # DDP registers only parameters that need grad
            trainable = stages
            train_model = model
            if world_size > 1:
                train_model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                      else None)
            if args.compile:
                train_model = torch.compile(train_model)
        sampler.set_epoch(epoch, start_step)
        sums = partial or {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
        loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=device)
        correct = torch.tensor(sums["correct"], dtype=torch.int64, device=device)
        count = sums["count"]
        nonfinite_step = torch.tensor(-1, device=device)  # first step with a non-finite loss, found on device
        epoch_start = time.perf_counter() - sums["seconds"]
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", initial=start_step, total=steps_per_epoch,
                   disable=None if is_main else True, leave=False, dynamic_ncols=True)
        step = start_step
        for images, labels in bar:
            lr = lr_at(args, sections, steps_per_epoch, epoch, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = to_device(images)
            labels = labels.to(device, non_blocking=True)
            with utils.autocast(device, precision):
                logits = train_model(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model, step=(epoch - 1) * steps_per_epoch + step)
            detached = loss.detach()
            if not scaler.is_enabled():  # fp16's scaler skips bad steps itself
                nonfinite_step.masked_fill_((nonfinite_step < 0) & ~torch.isfinite(detached), step)
            loss_sum += detached.double() * labels.numel()
            correct += (logits.detach().argmax(1) == labels).sum()
            count += labels.numel()
            step += 1
            checkpoint_due = args.save_every and step % args.save_every == 0 and step < steps_per_epoch
            # ranks enter this block together: a signal seen by one rank is shared at the next log step
            signalled = stop.requested and world_size == 1
            if step % args.log_every == 0 or checkpoint_due or signalled or step == steps_per_epoch:
                bad_step, what = int(nonfinite_step.item()), "loss"
                if bad_step < 0 and not scaler.is_enabled() and not all_finite(model.parameters()):
                    # a finite loss but a non-finite gradient (at this step or since the last check) shows in the
                    # weights; fp16's scaler skips such steps instead
                    bad_step, what = step - 1, "gradient"
                if any_rank(bad_step >= 0, device):
                    good = out_dir / "last.pt" if (out_dir / "last.pt").exists() else args.resume or "none yet"
                    raise UserError(f"non-finite {what} at epoch {epoch}, step {max(bad_step, 0) + 1} of "
                                    f"{steps_per_epoch}; the last good checkpoint ({good}) is left intact; "
                                    "lower --lr or look with --detect-anomaly")
                elapsed = time.perf_counter() - epoch_start
                bar.set_postfix(loss=f"{loss_sum.item() / count:.4f}", acc=f"{100 * correct.item() / count:.2f}",
                                lr=f"{lr:.2e}", img_s=f"{count * world_size / elapsed:.0f}")
                stopping = any_rank(stop.requested, device)
                if checkpoint_due or (stopping and step < steps_per_epoch):
                    partial = {"loss": loss_sum.item(), "correct": int(correct.item()), "count": count,
                               "seconds": time.perf_counter() - epoch_start}
                    path = save(epoch - 1, step, partial, weights)
                    if stopping:
                        log(f"stopped at epoch {epoch}, step {step}; checkpoint {path}; resume with: {resume_hint()}")
                        sys.exit(128 + (stop.signum or 15))
        bar.close()
        start_step, partial = 0, None

        # ------------------------------------------------------------ evaluate
        train_seconds = time.perf_counter() - epoch_start
        train_totals = torch.stack([loss_sum, correct.double(), torch.tensor(count, device=device).double()])
        if dist.is_initialized():
            dist.all_reduce(train_totals)
        train_loss, train_correct, train_count = train_totals.tolist()
        if dist.is_initialized():  # rank 0's BatchNorm statistics are the ones saved: evaluate with them
            for buffer in [*model.buffers(), *(ema.module.buffers() if ema else [])]:
                dist.broadcast(buffer, 0)
        val_loss, val_acc = evaluate(model, val_loader, device, precision, channels_last)
        row = {"epoch": epoch, "lr": lr, "train_loss": train_loss / train_count,
               "train_acc": 100 * train_correct / train_count, "val_loss": val_loss, "val_acc": val_acc,
               "seconds": time.perf_counter() - epoch_start, "images_per_s": train_count / train_seconds,
               "trainable_params": models.count_params(model, trainable_only=True)}
        epoch_acc, weights = val_acc, "raw"
        if ema is not None:
            row["ema_val_loss"], row["ema_val_acc"] = evaluate(ema.module, val_loader, device, precision,
                                                               channels_last)
            if row["ema_val_acc"] > val_acc:
                epoch_acc, weights = row["ema_val_acc"], "ema"
        history.append(row)
        improved = epoch_acc > best_acc
        if improved:
            best_acc, best_epoch = epoch_acc, epoch
        path = save(epoch, 0, None, weights)
        if is_main:
            if improved:
                utils.atomic_link(path, out_dir / "best.pt")
            write_history(out_dir, history, f"{args.model} ({args.arch})", [a for a, _ in sections[1:]])
            ema_note = f" ema_val_acc {row['ema_val_acc']:.2f}" if ema is not None else ""
            tqdm.write(f"epoch {epoch}/{args.epochs} lr {lr:.2e} train_loss {row['train_loss']:.4f} "
                       f"train_acc {row['train_acc']:.2f} val_loss {val_loss:.4f} val_acc {val_acc:.2f}{ema_note} "
                       f"{row['images_per_s']:.0f} img/s {row['seconds']:.0f}s{' *' if improved else ''}")
        stopping = any_rank(stop.requested, device)
        if stopping or epoch == args.stop_after:
            if epoch < args.epochs:
                log(f"stopped after epoch {epoch}; resume with: {resume_hint()}")
            if stopping:
                sys.exit(128 + (stop.signum or 15))
            break

    log(f"best val accuracy {best_acc:.2f}% (epoch {best_epoch}), saved in {out_dir / 'best.pt'}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    utils.run_main(main)
