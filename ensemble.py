"""Stack trained members into the report's ensemble: a linear head on their concatenated logits.

    python ensemble.py [--members A.pt B.pt ...] [--data-dir data] [--out-dir runs/ensemble]

The members are frozen, so their logits never change: each member runs once, in eval mode, over val and
over --views augmented views of train (train.py's augmentation, seeded per image), and the head
Linear(M x C -> C) trains on those stored logits (Adam, cosine schedule, on the CPU: it is small). The
head starts as the plain average of the members' logits, and weight decay pulls it back towards that
average rather than towards zero. Writes ensemble.pt (self-contained: the members' weights and specs and
the head), metrics.json and logits_cache.pt to --out-dir. Every val accuracy comes with its 95% Wilson
interval, and the ensemble is compared with its best member on the same val images (McNemar's exact test).

Fold members (train.py --folds K --fold I, every fold's best.pt, in any order) are grouped by member type
(model, arch, ViT config); each group must be one complete cross-validation, the same K and --fold-seed for
all. Each image of the pooled train/ + val/ then gets, per member type, the logits of the fold model that
held it out (out-of-fold, eval transform; --views does not apply), and the head learns from those rows. Its
accuracy is estimated by cross-validation over the same folds (a head trained on K-1 folds' rows predicts
the remaining fold), then the head of ensemble.pt trains on every row. At test time each member type
averages its K fold models' logits (models.FoldAverage) before the head.

Members need only share their class names: each may have its own architecture, image size, eval size and
preprocessing (a mixed ensemble). Each image is decoded once and goes through each member's own pipeline
(transforms.PipelineTuple): its eval pipeline for val, and for the train views train.py's augmentation at its
img_size and normalisation, every pipeline with the same random draw, so that all members see the same crop.

The logits cache is reused, member by member, while a member file's content (SHA-256) and its pipeline are
unchanged and the data's file list (relative paths, labels, sizes and modification times), --views, --seed,
--precision, the class names and the size JPEGs are decoded at are the same; anything else recomputes it.
--reference-members stores each member's path and SHA-256 instead of its weights (a small ensemble.pt
that needs the member files, unchanged, wherever it is loaded).
"""
import argparse
import hashlib
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import checkpoints
import data
import engine
import models
import stats
import transforms
import utils
from utils import UserError

DEFAULT_MEMBERS = [f"runs/{name}/best.pt" for name in models.MODEL_NAMES]
# 2: val images decoded at reduced JPEG scale (data.EvalTransform); 3: each member's own pipeline (mixed ensembles)
CACHE_VERSION = 3


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--members", type=Path, nargs="+", metavar="PATH", default=DEFAULT_MEMBERS,
                        help="member checkpoints (train.py's best.pt), two or more; they must share class names, "
                        "and may differ in architecture, image and eval size and preprocessing (each gets its own); "
                        "--folds runs: every fold's best.pt of each member type")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="folder with train/ and val/")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/ensemble"),
                        help="writes ensemble.pt, metrics.json and logits_cache.pt here")
    parser.add_argument("--views", type=int, default=1, help="augmented views of each train image whose member "
                        "logits train the head (each view costs one pass of every member over train); members "
                        "trained without --folds only")
    parser.add_argument("--epochs", type=int, default=20, help="head epochs over the stored logits "
                        "(0: keep the plain logit average)")
    parser.add_argument("--lr", type=float, default=1e-2, help="head Adam peak learning rate (cosine to 0)")
    parser.add_argument("--weight-decay", type=float, default=1.0, help="head weight decay, decoupled, towards "
                        "the plain logit average the head starts from")
    parser.add_argument("--head-batch-size", type=int, default=64, help="head mini-batch (rows of logits)")
    parser.add_argument("--combiner", default="head", choices=("head", "average"), help="what ensemble.pt "
                        "combines the members' logits with: the trained head (the report's), or their plain "
                        "average (better when the head overfits the train logits)")
    parser.add_argument("--reference-members", action="store_true", help="store each member's path and SHA-256 "
                        "in ensemble.pt instead of its weights: a small file that loads only beside the unchanged "
                        "member files")
    engine.add_inference_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed (train views, head batch order)")
    return parser


def check_args(args):
    if len(args.members) < 2:
        raise UserError(f"--members lists {len(args.members)} checkpoint; an ensemble needs two or more")
    for flag, value, low in (("--views", args.views, 1), ("--epochs", args.epochs, 0),
                             ("--head-batch-size", args.head_batch_size, 1)):
        if value < low:
            raise UserError(f"{flag} {value} must be at least {low}")
    if not args.lr > 0 or args.weight_decay < 0:
        raise UserError(f"--lr {args.lr} must be positive and --weight-decay {args.weight_decay} not negative")


# ----------------------------------------------------------------------------
# members and fingerprints

def check_members_exist(paths, defaults):
    for path in paths:
        if not path.is_file():
            hint = (f"train it first (python train.py --model {path.parent.name}) or name the members with --members"
                    if defaults else "check the path")
            raise UserError(f"member checkpoint {path} does not exist; {hint}")


def load_members(paths):
    """Each member's entry (checkpoints.ensemble_member: spec, inference weights, source path and content
    hash) and what its run says of itself ({"folds": its fold record or None, "best_acc"}); they must have the
    same class names, in the same order. Checkpoints are read one at a time, keeping only the inference
    weights of each (not its optimizer and other training state)."""
    members, runs = [], []
    for path in paths:
        ckpt = checkpoints.load(path, kind="member")
        members.append(checkpoints.ensemble_member(ckpt, path, utils.file_sha256(path)))
        runs.append({"folds": ckpt["folds"], "best_acc": ckpt["best_acc"]})
    first = members[0]
    seen = {}
    for member in members:
        if member["sha256"] in seen:
            raise UserError(f"members {seen[member['sha256']]} and {member['source']} are the same weights; "
                            "list each member once")
        seen[member["sha256"]] = member["source"]
    for member in members[1:]:
        if member["class_names"] != first["class_names"]:
            raise UserError(f"members {first['source']} and {member['source']} differ in class names "
                            f"({len(first['class_names'])} vs {len(member['class_names'])} classes, or another "
                            "order); ensemble only members trained on the same classes")
    return members, runs


def cv_text(record):
    return f"--folds {record['folds']} --fold-seed {record['fold_seed']}"


def fold_groups(members, runs):
    """The fold members grouped by member type (model, arch, ViT config), sorted by type so that any order of
    --members gives the same ensemble: [{"model", "arch", "folds", "fold_seed", "entries": member indices by
    fold, "fold": their folds}], or None when no member is a --folds run. Each group must be one complete
    cross-validation (every fold once), all of the same K and --fold-seed, so that every pooled image is held
    out exactly once per group."""
    records = [run["folds"] for run in runs]
    if all(record is None for record in records):
        return None
    if None in records:
        plain = members[records.index(None)]["source"]
        index, record = next((i, r) for i, r in enumerate(records) if r is not None)
        raise UserError(f"members {plain} (trained on train/) and {members[index]['source']} (fold {record['fold']} "
                        f"of {record['folds']}) mix a plain run with a --folds run; stack plain runs alone, or "
                        "every fold's best.pt of each member type")
    first = records[0]
    for member, record in zip(members, records):
        if (record["folds"], record["fold_seed"]) != (first["folds"], first["fold_seed"]):
            raise UserError(f"members {members[0]['source']} ({cv_text(first)}) and {member['source']} "
                            f"({cv_text(record)}) come from different cross-validations; every fold run of one "
                            "ensemble needs the same --folds and --fold-seed")
    folds = first["folds"]
    types = {}
    for index, (member, record) in enumerate(zip(members, records)):
        key = (member["model"], member["arch"], json.dumps(member["vit_config"], sort_keys=True))
        types.setdefault(key, {}).setdefault(record["fold"], []).append(index)
    groups = []
    for (model, arch, _), by_fold in sorted(types.items()):
        name = f"member type {model} ({arch})"
        for fold, indices in sorted(by_fold.items()):
            if len(indices) > 1:
                raise UserError(f"{name} has fold {fold} twice ({members[indices[0]]['source']} and "
                                f"{members[indices[1]]['source']}); pass each fold's best.pt once")
        first_fold = members[next(iter(by_fold.values()))[0]]
        for indices in by_fold.values():
            if checkpoints.pipeline_of(members[indices[0]]) != checkpoints.pipeline_of(first_fold):
                raise UserError(f"{name}: {first_fold['source']} and {members[indices[0]]['source']} take other "
                                "images (image or eval size, or preprocessing); the fold models of one member "
                                "type need the same --img-size, --eval-size and --preprocessing")
        missing = [str(fold) for fold in range(folds) if fold not in by_fold]
        if missing:
            raise UserError(f"{name} lacks fold{'s' * (len(missing) > 1)} {', '.join(missing)} of {folds} "
                            f"({cv_text(first)}); pass every fold's best.pt, training the missing ones first")
        groups.append({"model": model, "arch": arch, "folds": folds, "fold_seed": first["fold_seed"],
                       "entries": [by_fold[fold][0] for fold in range(folds)], "fold": list(range(folds))})
    return groups


def pooled_folds(data_dir, paths, labels, members, runs):
    """For each pooled image (train/ then val/, as train.py --folds pools them), the fold that holds it out
    (data.fold_split); every fold member's held-out digest must be its fold's on this data."""
    record = runs[0]["folds"]
    names = [Path(path).relative_to(data_dir).as_posix() for path in paths]
    fold_of = torch.empty(len(paths), dtype=torch.int64)
    digests = []
    for fold in range(record["folds"]):
        _, held_out, digest = data.fold_split(names, labels, record["folds"], fold, record["fold_seed"])
        fold_of[held_out] = fold
        digests.append(digest)
    for member, run in zip(members, runs):
        fold = run["folds"]["fold"]
        if run["folds"]["held_out_sha256"] != digests[fold]:
            raise UserError(f"member {member['source']} held out other images than fold {fold} of {data_dir}'s "
                            f"pooled train/ and val/ ({cv_text(run['folds'])}): images were added, removed or "
                            "became unreadable since it trained, or it trained on other data; point --data-dir "
                            "at the data it was trained on")
    return fold_of


def data_fingerprint(data_dir, splits):
    """SHA-256 of each image's path relative to data_dir, label, size and modification time (not contents)."""
    rows = []
    for split, (paths, labels) in splits.items():
        for path, label in zip(paths, labels):
            stat = Path(path).stat()
            rows.append((split, Path(path).relative_to(data_dir).as_posix(), label, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ----------------------------------------------------------------------------
# the members' logits, computed once

def read_cache(path, settings):
    """The cached logits per member hash (each with the pipeline it was computed with), or {} when absent,
    unreadable or made with other settings."""
    if not path.is_file():
        print(f"logits cache: none yet at {path}")
        return {}
    try:
        cache = checkpoints.load(path, kind="logits")
    except UserError as error:
        print(f"logits cache: ignored ({error})")
        return {}
    if cache["settings"] != settings:
        print("logits cache: the data, --views, --seed, --precision, the classes or the decode size changed; "
              "recomputing")
        return {}
    return cache["members"]


def view_batches(num_images, views, batch_size, seed):
    """(index, seed) items, in order, view after view. Views use negative epochs in data.sample_seed, so no
    view repeats an augmentation that train.py (epochs 1, 2, ...) showed the members with the same seed."""
    items = [(i, data.sample_seed(seed, -1 - view, i)) for view in range(views) for i in range(num_images)]
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def member_logits(todo, train_set, val_set, inputs, *, views, batch_size, seed, runtime, workers):
    """Run the members in `todo` once, in eval mode, over val and over the train views (view after view), each
    on its pipeline's tensor (inputs: its index into the datasets' tuples, transforms.PipelineTuple); returns
    {sha256: {"train": (views * N, C), "val": (V, C), "train_labels", "val_labels"}}."""
    modules = [runtime.place(checkpoints.build_member(m, m["state_dict"])) for m in todo]
    val_loader = data.make_loader(val_set, device=runtime.device, workers=workers, batch_size=batch_size)
    val, val_labels = engine.infer(modules, val_loader, runtime, inputs=inputs, desc="val logits")
    train_loader = data.make_loader(train_set, device=runtime.device, workers=workers,
                                    batch_sampler=view_batches(len(train_set), views, batch_size, seed))
    train, train_labels = engine.infer(modules, train_loader, runtime, inputs=inputs,
                                       desc=f"train logits ({views} views)")
    # labels come from the loader: an image unreadable since the scan is replaced by another, with its label
    return {m["sha256"]: {"train": t, "val": v, "train_labels": train_labels, "val_labels": val_labels}
            for m, t, v in zip(todo, train, val)}


def held_out_logits(todo, pool_set, fold_of, *, batch_size, runtime, workers, inputs=None):
    """Run each fold member of `todo` ((entry, fold) pairs) once, in eval mode, over the pooled images its fold
    holds out, fold by fold, so that each image is decoded once for all the member types; inputs (a pool_set of
    transforms.PipelineTuple): each member's index into its tuples. Returns {sha256: {"held_out": (n, C) logits,
    "index": (n,) their pooled indices}}."""
    logits = {}
    for fold in sorted({fold for _, fold in todo}):
        chosen = [i for i, (_, member_fold) in enumerate(todo) if member_fold == fold]
        index = (fold_of == fold).nonzero().flatten()
        # the labels are the positions, so that engine.check_indices checks each image is the one asked for
        dataset = data.ImageDataset([pool_set.paths[i] for i in index], range(len(index)), pool_set.transform)
        loader = data.make_loader(dataset, device=runtime.device, workers=workers, batch_size=batch_size)
        modules = [runtime.place(checkpoints.build_member(todo[i][0], todo[i][0]["state_dict"])) for i in chosen]
        outputs, positions = engine.infer(modules, loader, runtime, inputs=None if inputs is None else [
            inputs[i] for i in chosen], desc=f"held-out logits of fold {fold}")
        engine.check_indices(positions, dataset)
        for i, output in zip(chosen, outputs):
            logits[todo[i][0]["sha256"]] = {"held_out": output, "index": index}
    return logits


def out_of_fold(groups, members, cached, num_images, num_classes):
    """(G, N, C) logits: row n of group g comes from the fold model of g whose fold held image n out; and (G, N)
    the fold of the model each row came from."""
    logits = torch.zeros(len(groups), num_images, num_classes)
    source_fold = torch.full((len(groups), num_images), -1)
    for g, group in enumerate(groups):
        for index, fold in zip(group["entries"], group["fold"]):
            entry = cached[members[index]["sha256"]]
            logits[g, entry["index"]] = entry["held_out"]
            source_fold[g, entry["index"]] = fold
    return logits, source_fold


# ----------------------------------------------------------------------------
# the head

def averaging_head(num_members, num_classes):
    """Linear(M*C -> C) equal to the plain average of the members' logits: identity blocks / M, bias 0."""
    head = nn.Linear(num_members * num_classes, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.eye(num_classes).repeat(1, num_members) / num_members)
        head.bias.zero_()
    return head


def is_right(logits, labels):
    """Per image (the last dimension of logits holds the classes): whether its argmax is the label."""
    return logits.argmax(-1) == labels


def accuracy_fields(key, right):
    """{key: accuracy (%), key_low, key_high: its 95% Wilson interval} of a boolean per-image tensor."""
    return stats.accuracy_fields(key, int(right.sum()), len(right))


def paired_comparison(ensemble_right, members, member_right):
    """McNemar's exact test of the ensemble against its best member (the first of the highest val accuracy)
    on the same val images, from boolean per-image correctness (member_right: (M, V))."""
    best = int(member_right.sum(1).argmax())  # argmax returns the first of equal maxima
    ensemble_only, member_only = stats.discordant_pairs(ensemble_right, member_right[best])
    return {"best_member": {"model": members[best]["model"], "path": members[best]["source"],
                            **accuracy_fields("val_acc", member_right[best])},
            "ensemble_right_member_wrong": ensemble_only, "ensemble_wrong_member_right": member_only,
            "mcnemar_p": stats.mcnemar_exact(ensemble_only, member_only)}


def train_head(head, train_x, train_y, val_x, val_y, *, epochs, lr, weight_decay, batch_size, seed):
    """Adam on shuffled mini-batches of stored logits, cosine schedule per step; returns per-epoch rows.
    train_x: (views, N, M*C), train_y: (views, N). An epoch is one pass over the N train images, as in the
    report, each image in one of its views drawn at random (the views stand in for fresh augmentations).
    Weight decay is decoupled (as in AdamW) but pulls towards the head's start, the plain logit average,
    rather than towards zero: the head leaves the average only as far as the train logits support it."""
    views, num_images = train_y.shape
    start = [p.detach().clone() for p in head.parameters()]
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    steps_per_epoch = math.ceil(num_images / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1 + math.cos(math.pi * step / max(1, epochs * steps_per_epoch))) / 2)
    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(num_images, generator=generator)
        view = torch.randint(views, (num_images,), generator=generator)
        loss_sum = 0.0
        for batch in torch.arange(num_images).split(batch_size):
            x, y = train_x[view[batch], order[batch]], train_y[view[batch], order[batch]]
            loss = F.cross_entropy(head(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for param, param_start in zip(head.parameters(), start):
                    param.sub_(param - param_start, alpha=schedule.get_last_lr()[0] * weight_decay)
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(batch)
        with torch.no_grad():
            val_logits = head(val_x)
        history.append({"epoch": epoch, "train_loss": loss_sum / num_images,
                        "val_loss": F.cross_entropy(val_logits, val_y).item(),
                        **accuracy_fields("val_acc", is_right(val_logits, val_y))})
    return history


def cross_validate_head(x, y, fold_of, folds, num_members, **head_args):
    """The head's accuracy by cross-validation over the folds: for each fold, a head trained on the rows of the
    other folds predicts that fold's rows. Returns each row's logits (N, C) from the head that never saw it, and
    per-epoch rows pooled over the folds (train_loss of the K heads, val_loss and val_acc of their held-out
    folds together)."""
    num_classes = x.shape[1] // num_members
    logits = torch.zeros(len(y), num_classes)
    histories = []
    for fold in range(folds):
        held = fold_of == fold
        head = averaging_head(num_members, num_classes)
        histories.append(train_head(head, x[~held][None], y[~held][None], x[held], y[held], **head_args))
        with torch.no_grad():
            logits[held] = head(x[held])
    sizes = [int((fold_of == fold).sum()) for fold in range(folds)]
    history = []
    for rows in zip(*histories):
        right = sum(round(row["val_acc"] * n / 100) for row, n in zip(rows, sizes))
        history.append({"epoch": rows[0]["epoch"],
                        "train_loss": sum(row["train_loss"] * (len(y) - n) for row, n in zip(rows, sizes))
                        / ((folds - 1) * len(y)),
                        "val_loss": sum(row["val_loss"] * n for row, n in zip(rows, sizes)) / len(y),
                        **stats.accuracy_fields("val_acc", right, len(y))})
    return logits, history


# ----------------------------------------------------------------------------

def run_cache(cache_path, settings, members, compute):
    """The members' logits from the cache, computing (compute(todo)) and saving those it lacks or holds for
    another pipeline; returns (logits per sha256, how many members were computed)."""
    cached = read_cache(cache_path, settings)
    todo = [m for m in members
            if m["sha256"] not in cached or cached[m["sha256"]].get("pipeline") != checkpoints.pipeline_of(m)]
    if todo:
        print(f"logits cache: reused for {len(members) - len(todo)} of {len(members)} members; computing the "
              f"logits of {', '.join(m['source'] for m in todo)}")
        fresh = compute(todo)
        cached.update({m["sha256"]: dict(fresh[m["sha256"]], pipeline=checkpoints.pipeline_of(m)) for m in todo})
        checkpoints.save(checkpoints.logits_cache(settings, {m["sha256"]: cached[m["sha256"]] for m in members}),
                         cache_path)
    else:
        print(f"logits cache: reused for all {len(members)} members ({cache_path})")
    return cached, len(todo)


def pipelines_text(pipelines):
    """'28 px (train 40 px), 32 px': the eval and train sizes of each pipeline."""
    return ", ".join(f"{p['eval_size']} px" + (f" (train {p['img_size']} px)" if p["img_size"] != p["eval_size"]
                                               else "") for p in pipelines)


def stack_plain(args, members, class_names, splits, runtime, workers, cache_path, start):
    """Members trained on train/: the head learns from their logits of --views augmented views of train/ and
    is scored on val/. Returns (head, metrics, table rows: (name, a dict, the key of its accuracy))."""
    (train_paths, train_labels), (val_paths, val_labels) = splits["train"], splits["val"]
    num_classes = len(class_names)
    pipelines, inputs = checkpoints.distinct_pipelines(members)
    train_set = data.ImageDataset(train_paths, train_labels, transforms.PipelineTuple(
        [transforms.train_transform(p["img_size"], mean=p["mean"], std=p["std"]) for p in pipelines]))
    val_set = data.ImageDataset(val_paths, val_labels,
                                transforms.PipelineTuple([transforms.eval_transform_of(p) for p in pipelines]))
    print(f"{len(members)} members, {num_classes} classes, {len(train_set)} train images x {args.views} views, "
          f"{len(val_set)} val images, {len(pipelines)} pipeline{'s' * (len(pipelines) > 1)} "
          f"({pipelines_text(pipelines)}); {runtime.device} [{runtime.precision}]")
    settings = {"version": CACHE_VERSION, "views": args.views, "seed": args.seed, "precision": runtime.precision,
                "data": data_fingerprint(args.data_dir, splits), "class_names": class_names,
                "decode_size": val_set.transform.draft_size}
    batch_size = engine.resolve_batch_size(args.batch_size, runtime.device)
    index_of = dict(zip((m["sha256"] for m in members), inputs))
    cached, computed = run_cache(cache_path, settings, members, lambda todo: member_logits(
        todo, train_set, val_set, [index_of[m["sha256"]] for m in todo], views=args.views, batch_size=batch_size,
        seed=args.seed, runtime=runtime, workers=workers))
    logits_seconds = time.perf_counter() - start
    logits = [cached[m["sha256"]] for m in members]
    train_x = torch.cat([entry["train"] for entry in logits], dim=1).view(args.views, len(train_set), -1)
    val_x = torch.cat([entry["val"] for entry in logits], dim=1)  # (V, M * C)
    train_y = logits[0]["train_labels"].view(args.views, len(train_set))
    val_y = logits[0]["val_labels"]

    head = averaging_head(len(members), num_classes)
    history = train_head(head, train_x, train_y, val_x, val_y, epochs=args.epochs, lr=args.lr,
                         weight_decay=args.weight_decay, batch_size=args.head_batch_size, seed=args.seed)
    with torch.no_grad():
        head_right = is_right(head(val_x), val_y)
    member_val = torch.stack([entry["val"] for entry in logits])  # (M, V, C)
    member_right = is_right(member_val, val_y)  # (M, V)
    average_right = is_right(member_val.mean(0), val_y)
    ensemble_right = head_right if args.combiner == "head" else average_right
    metrics = {
        "members": [{"path": m["source"], "model": m["model"], "arch": m["arch"], "use_ema": m["use_ema"],
                     **accuracy_fields("val_acc", right)} for m, right in zip(members, member_right)],
        **accuracy_fields("logit_average_val_acc", average_right),
        **accuracy_fields("softmax_average_val_acc", is_right(member_val.softmax(-1).mean(0), val_y)),
        **accuracy_fields("head_val_acc", head_right), "combiner": args.combiner,
        **accuracy_fields("val_acc", ensemble_right), "views": args.views, "epochs": args.epochs,
        "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "precision": runtime.precision,
        "device": str(runtime.device), "data_dir": str(args.data_dir), "train_images": len(train_set),
        "val_images": len(val_set),
        "paired": paired_comparison(ensemble_right, members, member_right),
        "cache": {"reused": len(members) - computed, "computed": computed},
        "seconds": {"logits": logits_seconds, "head": time.perf_counter() - start - logits_seconds},
        "history": history,
    }
    table = [(f"{m['model']} ({m['source']})", row, "val_acc") for m, row in zip(members, metrics["members"])]
    return head, metrics, table


def stack_folds(args, members, runs, groups, class_names, splits, runtime, workers, cache_path, start):
    """Fold members: the head learns from each pooled image's out-of-fold logits, its accuracy estimated by
    cross-validation over the folds. Returns (head, metrics, table rows) as stack_plain does; every "val"
    figure of the metrics is out-of-fold over the pooled images ("evaluation": "out-of-fold")."""
    if args.views != 1:
        raise UserError(f"--views {args.views} applies to members trained without --folds; the head of fold "
                        "members learns from their held-out images' logits (eval transform); leave --views out")
    (train_paths, train_labels), (val_paths, val_labels) = splits["train"], splits["val"]
    paths, labels = train_paths + val_paths, train_labels + val_labels
    fold_of = pooled_folds(args.data_dir, paths, labels, members, runs)
    folds, fold_seed, num_classes = groups[0]["folds"], groups[0]["fold_seed"], len(class_names)
    pipelines, inputs = checkpoints.distinct_pipelines(members)
    pool_set = data.ImageDataset(paths, labels,
                                 transforms.PipelineTuple([transforms.eval_transform_of(p) for p in pipelines]))
    print(f"{len(members)} fold members: {len(groups)} member type{'s' * (len(groups) > 1)} x {folds} folds "
          f"(--fold-seed {fold_seed}), {num_classes} classes, {len(paths)} pooled train/ and val/ images, each "
          f"held out by one fold; {len(pipelines)} pipeline{'s' * (len(pipelines) > 1)} "
          f"({pipelines_text(pipelines)}); {runtime.device} [{runtime.precision}]")
    settings = {"version": CACHE_VERSION, "evaluation": "out-of-fold", "precision": runtime.precision,
                "data": data_fingerprint(args.data_dir, splits), "class_names": class_names,
                "decode_size": pool_set.transform.draft_size}
    fold_of_member = {m["sha256"]: run["folds"]["fold"] for m, run in zip(members, runs)}
    index_of = dict(zip((m["sha256"] for m in members), inputs))
    cached, computed = run_cache(cache_path, settings, members, lambda todo: held_out_logits(
        [(m, fold_of_member[m["sha256"]]) for m in todo], pool_set, fold_of,
        batch_size=engine.resolve_batch_size(args.batch_size, runtime.device), runtime=runtime, workers=workers,
        inputs=[index_of[m["sha256"]] for m in todo]))
    logits_seconds = time.perf_counter() - start
    oof, _ = out_of_fold(groups, members, cached, len(paths), num_classes)  # (G, N, C)
    y = torch.tensor(labels)
    x = oof.permute(1, 0, 2).reshape(len(paths), -1)  # (N, G * C), as StackingEnsemble concatenates them
    head_args = {"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                 "batch_size": args.head_batch_size, "seed": args.seed}
    cv_logits, history = cross_validate_head(x, y, fold_of, folds, len(groups), **head_args)
    head = averaging_head(len(groups), num_classes)
    train_head(head, x[None], y[None], x, y, **head_args)  # the head of ensemble.pt: every out-of-fold row

    group_right = is_right(oof, y)  # (G, N)
    average_right = is_right(oof.mean(0), y)
    head_right = is_right(cv_logits, y)
    ensemble_right = head_right if args.combiner == "head" else average_right
    names = [{"model": g["model"], "source": f"{g['arch']}, {folds} folds"} for g in groups]
    type_rows = []
    for group, right in zip(groups, group_right):
        fold_runs = []
        for index, fold in zip(group["entries"], group["fold"]):
            held = int((fold_of == fold).sum())
            low, high = stats.accuracy_interval(runs[index]["best_acc"], held)
            fold_runs.append({"fold": fold, "path": members[index]["source"], "sha256": members[index]["sha256"],
                              "held_out_images": held, "best_val_acc": runs[index]["best_acc"],
                              "best_val_acc_low": low, "best_val_acc_high": high})
        type_rows.append({"model": group["model"], "arch": group["arch"], "runs": fold_runs,
                          **accuracy_fields("oof_acc", right)})
    metrics = {
        "evaluation": "out-of-fold",
        "members": [{"path": name["source"], "model": g["model"], "arch": g["arch"],
                     **accuracy_fields("val_acc", right)} for name, g, right in zip(names, groups, group_right)],
        **accuracy_fields("logit_average_val_acc", average_right),
        **accuracy_fields("softmax_average_val_acc", is_right(oof.softmax(-1).mean(0), y)),
        **accuracy_fields("head_val_acc", head_right), "combiner": args.combiner,
        **accuracy_fields("val_acc", ensemble_right), "views": None, "epochs": args.epochs,
        "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed, "precision": runtime.precision,
        "device": str(runtime.device), "data_dir": str(args.data_dir), "train_images": len(paths),
        "val_images": len(paths),
        "folds": {"folds": folds, "fold_seed": fold_seed, "images": len(paths), "groups": type_rows},
        "paired": paired_comparison(ensemble_right, names, group_right),
        "cache": {"reused": len(members) - computed, "computed": computed},
        "seconds": {"logits": logits_seconds, "head": time.perf_counter() - start - logits_seconds},
        "history": history,
    }
    table = [(f"{name['model']} ({name['source']})", row, "val_acc") for name, row in zip(names, metrics["members"])]
    return head, metrics, table


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    utils.refuse_distributed("ensemble.py")
    check_args(args)
    runtime = engine.resolve_runtime(args.device, args.precision, args.channels_last)
    workers = data.loader_workers(args.workers, runtime.device)
    member_paths = [Path(path) for path in args.members]  # argparse leaves a list default as strings
    check_members_exist(member_paths, defaults=args.members == DEFAULT_MEMBERS)
    utils.check_writable(args.out_dir)
    cache_path = args.out_dir / "logits_cache.pt"

    # ----------------------------------------------------------------- members and data
    members, runs = load_members(member_paths)
    groups = fold_groups(members, runs)
    class_names, num_classes = members[0]["class_names"], len(members[0]["class_names"])
    train_paths, train_labels, found = data.load_split(args.data_dir, "train")
    if found != class_names:
        raise UserError(f"{args.data_dir / 'train'} has other classes than the members ({len(found)} vs "
                        f"{num_classes}, or another order); point --data-dir at the data they were trained on")
    val_paths, val_labels, _ = data.load_split(args.data_dir, "val", class_names)
    splits = {"train": (train_paths, train_labels), "val": (val_paths, val_labels)}

    # ------------------------------------------------------------ logits (cached) and head
    if groups is None:
        head, metrics, table = stack_plain(args, members, class_names, splits, runtime, workers, cache_path, start)
    else:
        head, metrics, table = stack_folds(args, members, runs, groups, class_names, splits, runtime, workers,
                                           cache_path, start)
    if args.combiner == "average":
        head = averaging_head(len(groups or members), num_classes)

    # ---------------------------------------------------------------------- save
    metrics["seconds"]["total"] = time.perf_counter() - start
    entries = [checkpoints.referenced(m) for m in members] if args.reference_members else members
    checkpoints.save(checkpoints.ensemble_checkpoint(entries, head.state_dict(), metrics, args.combiner, groups),
                     args.out_dir / "ensemble.pt")
    utils.atomic_write_json(args.out_dir / "metrics.json", metrics)

    folded = groups is not None
    scored = f"out-of-fold on the {metrics['val_images']} pooled images" if folded else "val"
    head_name = f"stacking head ({args.epochs} epoch{'s' if args.epochs != 1 else ''}" + \
        (f", {groups[0]['folds']}-fold CV)" if folded else ")")
    table += [("logit average", metrics, "logit_average_val_acc"),
              ("softmax average", metrics, "softmax_average_val_acc"), (head_name, metrics, "head_val_acc")]
    width = max(len(name) for name, *_ in table) + 2
    print(f"\n{'model':<{width}} {'acc (%)':>8}  95% Wilson interval ({scored})")
    for name, values, key in table:
        interval = stats.interval_text(values[f"{key}_low"], values[f"{key}_high"])
        print(f"{name:<{width}} {values[key]:8.2f}  {interval}")
    combiner = "stacking head" if args.combiner == "head" else "logit average"
    paired, best = metrics["paired"], metrics["paired"]["best_member"]
    rows = "out-of-fold rows (the head's from cross-validation)" if folded else "val images"
    print(f"\npaired on the same {metrics['val_images']} {rows}: " + stats.paired_text(
        f"the ensemble ({combiner})", f"its best member{' type' * folded}, {best['model']} ({best['path']}),",
        paired["ensemble_right_member_wrong"], paired["ensemble_wrong_member_right"], paired["mcnemar_p"]))
    stored = f", referencing its {len(members)} member files" if args.reference_members else ""
    print(f"\nsaved {args.out_dir / 'ensemble.pt'} ({combiner}{stored}) and metrics.json "
          f"({metrics['seconds']['total']:.1f}s)")
    head_acc, average_acc = metrics["head_val_acc"], metrics["logit_average_val_acc"]
    if args.combiner == "head" and head_acc < average_acc:
        why = ("by cross-validation over the folds" if folded else
               "on val: it learned the members' train logits, not their val behaviour")
        warnings.warn(f"the trained head ({head_acc:.2f}) is below the plain logit average ({average_acc:.2f}) "
                      f"{why}; --combiner average makes ensemble.pt use the average", stacklevel=1)
    return metrics


if __name__ == "__main__":
    utils.run_main(main)
