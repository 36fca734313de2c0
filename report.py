"""Rebuild the tables and figures of a set of runs from the run folders alone.

    python report.py [runs] [--data-dir data] [--device auto]

Reads every run folder in RUNS: train.py's (config.json, history.csv, last.pt, best.pt) and ensemble.py's
(ensemble.pt, metrics.json). Writes report.md (--out) and, beside it and named after it, report.json (every
value of the tables), report_curves.png (loss and accuracy of every run and ensemble head, a row each) and,
for the model analysed, report_confusion.png (val confusion matrix, log colour scale), report_per_class.csv
(val accuracy per class) and report_misclassified.png (the most confident mistakes on val), and with --cam N
Grad-CAM overlays in report_cam/ (misclassified.png and a figure per most confused pair). report.md holds
the gradual unfreezing table of each resnext_freeze run, the member and ensemble table (val accuracies with
their 95% Wilson interval), each ensemble's paired comparison with its best member on the same val images
(McNemar's exact test, from metrics.json), the figures and the analysed model's most confused class pairs. The
model analysed is the one the submission uses: the complete ensemble with the highest val accuracy
(predict.py's default is ensemble.pt), or without one the complete member with the highest; a member that
beats the ensemble on val is pointed out. Its predictions are
recomputed from its checkpoint (best.pt or ensemble.pt) on DATA/val, DATA being the data its run was trained
on unless --data-dir is given. A run still training, stopped or crashed is listed as incomplete, with the
reason, and is never the model analysed.
"""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import cam
import checkpoints
import data
import engine
import models
import stats
import transforms
import utils
from utils import UserError

MEMBER_FILES = ("config.json", "history.csv", "last.pt", "best.pt")
ENSEMBLE_FILES = ("ensemble.pt", "metrics.json", "logits_cache.pt")
DPI = 100
CURVES_SIZE = (11, 3.2)  # inches: figure width, height of each run's row
CONFUSION_SIZE = (12, 11)  # inches; 100 classes get ~8 px per cell
TILE_SIZE = (2.0, 2.4)  # inches per misclassified image, its two-line title included
GRID_COLUMNS = 6
MAX_MISCLASSIFIED = 24
MAX_TICKS = 50  # class labels per confusion-matrix axis; beyond that every k-th class is labelled
ANNOTATE_MAX = 30  # up to this many classes the counts are written in the cells
TOP_PAIRS = 10
CAM_PAIR_NAME = "pair_{rank:02d}_{true}_{predicted}.png"  # in the CAM folder, rank 1 = the most confused pair


def get_args_parser():
    fmt = utils.HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("runs", nargs="?", type=Path, default=Path("runs"), help="folder holding the run folders")
    parser.add_argument("--data-dir", type=Path, help="data folder whose val/ the model analysed is evaluated on; "
                        "None: the one its run was trained on")
    parser.add_argument("--out", type=Path, help="the Markdown report to write (None: RUNS/report.md); the "
                        "other files go beside it")
    parser.add_argument("--cam", type=int, default=0, metavar="N",
                        help="Grad-CAM overlays of the analysed model (of each member for an ensemble) on the "
                        "misclassified val images shown, and on N of each most confused pair's mistakes and N "
                        "correct val images of each of its two classes (0: none)")
    engine.add_inference_args(parser)
    return parser


def number(value):
    """A float for JSON, or None for a missing value (pandas' NaN)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ----------------------------------------------------------------------------
# reading the run folders: every problem becomes a reason, never an exception

def read_json(path):
    """(content, None), or (None, why it cannot be used)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path.name} unreadable ({type(error).__name__})"


def read_history(path):
    """(DataFrame of history.csv, None), or (None, why it cannot be used)."""
    if not path.is_file():
        return None, "no history.csv (no epoch finished)"
    try:
        frame = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        return None, f"history.csv unreadable ({type(error).__name__})"
    missing = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"} - set(frame.columns)
    if missing or frame.empty:
        return None, f"history.csv has no rows or lacks {', '.join(sorted(missing))}"
    return frame, None


def read_checkpoint(path, kind):
    """(checkpoint, None), or (None, why it cannot be used)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        return checkpoints.load(path, kind=kind), None
    except UserError as error:
        return None, str(error)


def read_metrics(path):
    """ensemble.py's metrics.json as (values, None), or (None, why it cannot be used)."""
    metrics, why = read_json(path)
    if metrics is None:
        return None, why
    try:
        return {"members": [{"model": m["model"], "path": m["path"], "val_acc": float(m["val_acc"])}
                            for m in metrics["members"]],
                "logit_average": float(metrics["logit_average_val_acc"]),
                "softmax_average": float(metrics["softmax_average_val_acc"]),
                "head": float(metrics["head_val_acc"]), "head_epochs": metrics.get("epochs"),
                "combiner": metrics.get("combiner", "head"),
                "val_acc": float(metrics.get("val_acc", metrics["head_val_acc"])),
                "head_history": metrics.get("history") or [], "data_dir": metrics.get("data_dir"),
                "val_images": metrics.get("val_images"), "paired": read_paired(metrics.get("paired")),
                "folds": read_folds(metrics.get("folds"))}, None
    except (KeyError, TypeError, ValueError) as error:
        return None, f"metrics.json lacks or mangles {error}"


def read_folds(folds):
    """metrics.json's cross-validation of a fold ensemble (None: a plain ensemble): per member type, each fold
    run's best val accuracy on its held-out fold and the type's out-of-fold accuracy."""
    if folds is None:
        return None
    return {"folds": int(folds["folds"]), "fold_seed": int(folds["fold_seed"]), "images": int(folds["images"]),
            "groups": [{"model": str(group["model"]), "arch": str(group["arch"]), "oof_acc": float(group["oof_acc"]),
                        "runs": [{"fold": int(run["fold"]), "path": str(run["path"]),
                                  "held_out_images": int(run["held_out_images"]),
                                  "best_val_acc": float(run["best_val_acc"])} for run in group["runs"]]}
                       for group in folds["groups"]]}


def read_paired(paired):
    """metrics.json's McNemar comparison of the ensemble with its best member (None: an older ensemble.py's)."""
    if paired is None:
        return None
    best = paired["best_member"]
    return {"member": str(best["model"]), "member_path": str(best["path"]), "member_val_acc": float(best["val_acc"]),
            "ensemble_only": int(paired["ensemble_right_member_wrong"]),
            "member_only": int(paired["ensemble_wrong_member_right"]), "p": float(paired["mcnemar_p"])}


def with_interval(row, key, images):
    """row with key_low and key_high: the 95% Wilson interval of the accuracy row[key] measured on `images` val
    images (None when either is unknown)."""
    known = row[key] is not None and bool(images)
    row[f"{key}_low"], row[f"{key}_high"] = stats.accuracy_interval(row[key], images) if known else (None, None)
    return row


def unfreeze_table(frame, unfreeze, epochs, val_images=None):
    """One row per gradual unfreezing section: its epochs, what it unfreezes, and the best accuracies the
    history reached in it (None for a section not reached yet), the val ones with their interval."""
    schedule = models.parse_unfreeze(unfreeze)
    keys = ["train_acc", "val_acc"] + ["ema_val_acc"] * (frame is not None and "ema_val_acc" in frame)
    rows = []
    for i, (first, last) in enumerate(models.section_bounds(schedule, epochs)):
        # section_bounds drops only the schedule's tail (epochs past the end), so section i > 0 is schedule[i - 1]
        action = ("Unfreeze the final fully connected layer" if i == 0
                  else "Unfreeze " + " and ".join(schedule[i - 1][1]))
        part = frame[(frame["epoch"] >= first) & (frame["epoch"] <= last)] if frame is not None else pd.DataFrame()
        row = {"epochs": f"{first}-{last}" if last > first else str(first), "first": first, "last": last,
               "action": action}
        for key in keys:
            row[f"best_{key}"] = number(part[key].max()) if len(part) else None
            if key != "train_acc":  # a running figure over changing weights and augmentations: no interval
                with_interval(row, f"best_{key}", val_images)
        rows.append(row)
    return rows


def read_member_run(folder):
    config, why_config = read_json(folder / "config.json")
    frame, why_history = read_history(folder / "history.csv")
    last, why_last = read_checkpoint(folder / "last.pt", "member")
    if config is None and last is not None:  # the checkpoint carries the flags too
        config, why_config = last["args"], None
    config = config or {}
    epochs, done = config.get("epochs"), 0 if frame is None else len(frame)
    reasons = [why for why in (why_config, why_history, why_last) if why]
    if epochs is not None and frame is not None and done < epochs:
        reasons.append(f"{done} of {epochs} epochs in history.csv (still training, stopped or crashed)")
    elif epochs is not None and last is not None and last["epoch"] < epochs:
        reasons.append(f"last.pt holds epoch {last['epoch']} of {epochs}")
    if not (folder / "best.pt").is_file():
        reasons.append("no best.pt")
    run = {"name": folder.name, "path": str(folder), "kind": "member", "model": config.get("model", "?"),
           "status": "incomplete" if reasons else "complete", "reason": "; ".join(reasons),
           "epochs_done": done, "epochs": epochs, "best_val_acc": None, "best_epoch": None,
           "checkpoint": str(folder / "best.pt"), "data_dir": config.get("data_dir"),
           "val_images": config.get("val_images"), "unfreeze": None,
           "section_starts": [], "history": [] if frame is None else frame.to_dict("records")}
    if frame is not None:
        # the checkpoint train.py keeps as best.pt scored max(raw, EMA) val accuracy; ties: the first epoch
        score = frame[[c for c in ("val_acc", "ema_val_acc") if c in frame]].max(axis=1)
        run["best_val_acc"], run["best_epoch"] = number(score.max()), int(frame["epoch"][score.idxmax()])
    if run["model"] == "resnext_freeze" and epochs is not None:
        run["unfreeze"] = unfreeze_table(frame, config.get("unfreeze", models.DEFAULT_UNFREEZE), epochs,
                                         run["val_images"])
        run["section_starts"] = [row["first"] for row in run["unfreeze"][1:]]
    return run


def read_ensemble_run(folder):
    metrics, why_metrics = read_metrics(folder / "metrics.json")
    _, why_ckpt = read_checkpoint(folder / "ensemble.pt", "ensemble")  # only whether it loads
    reasons = [why for why in (why_ckpt, why_metrics) if why]
    run = {"name": folder.name, "path": str(folder), "kind": "ensemble", "model": "ensemble",
           "status": "incomplete" if reasons else "complete", "reason": "; ".join(reasons),
           "best_val_acc": None, "checkpoint": str(folder / "ensemble.pt"), "data_dir": None,
           "members": [], "unfreeze": None, "logit_average": None, "softmax_average": None, "head": None,
           "head_epochs": None, "combiner": None, "history": [], "section_starts": [], "val_images": None,
           "paired": None, "folds": None}
    if metrics is not None:
        run.update(members=metrics["members"], logit_average=metrics["logit_average"],
                   softmax_average=metrics["softmax_average"], head=metrics["head"], combiner=metrics["combiner"],
                   best_val_acc=metrics["val_acc"],
                   head_epochs=metrics["head_epochs"], history=metrics["head_history"], data_dir=metrics["data_dir"],
                   val_images=metrics["val_images"], paired=metrics["paired"], folds=metrics["folds"])
        for member in run["members"]:
            with_interval(member, "val_acc", run["val_images"])
        if run["folds"]:
            run.update(fold_tables=fold_tables(run["folds"]), oof=oof_rows(run))
    return run


def find_runs(runs_dir):
    """Every run folder in runs_dir, members first, each read by read_member_run / read_ensemble_run."""
    runs = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any((folder / name).exists() for name in ENSEMBLE_FILES):
            runs.append(read_ensemble_run(folder))
        elif any((folder / name).exists() for name in MEMBER_FILES):
            runs.append(read_member_run(folder))
    if not runs:
        raise UserError(f"{runs_dir} holds no run folders (with train.py's history.csv or last.pt, or ensemble.py's "
                        "ensemble.pt); train first, or give the folder that holds them")
    return sorted(runs, key=lambda run: run["kind"] == "ensemble")


# ----------------------------------------------------------------------------
# the analysed model's val predictions

def predict_val(ckpt, model, data_dir, runtime, batch_size, workers):
    """(val paths, labels (N,), probabilities (N, C), class names) of a checkpoint's model on data_dir/val."""
    paths, labels, class_names = data.load_split(data_dir, "val", ckpt["class_names"])
    dataset = data.ImageDataset(paths, range(len(paths)),
                                transforms.input_transform(checkpoints.input_pipelines(ckpt)))
    logits = engine.predict_images(model, dataset, runtime, batch_size=batch_size, workers=workers, desc="val")
    return paths, torch.tensor(labels), logits.softmax(1), class_names


def confusion_matrix(labels, preds, num_classes):
    """(C, C) counts: row = true class, column = predicted class."""
    return np.bincount(np.asarray(labels) * num_classes + np.asarray(preds),
                       minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class(matrix, class_names):
    images, correct = matrix.sum(1), np.diag(matrix)
    wrong = matrix - np.diag(correct)
    worst = wrong.argmax(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = 100 * correct / images  # NaN for a class without val images
    return pd.DataFrame({"class": class_names, "images": images, "correct": correct, "accuracy": accuracy,
                         "most_predicted_instead": [class_names[j] if wrong[i, j] else "" for i, j in enumerate(worst)],
                         "times": wrong[np.arange(len(worst)), worst]})


def top_confusions(matrix, class_names, k=TOP_PAIRS):
    """The k largest off-diagonal cells: (true class, predicted class) pairs, most images first."""
    wrong = matrix - np.diag(np.diag(matrix))
    pairs = []
    for flat in np.argsort(-wrong, axis=None, kind="stable")[:k]:
        i, j = divmod(int(flat), len(class_names))
        if wrong[i, j]:
            pairs.append({"true": class_names[i], "predicted": class_names[j], "images": int(wrong[i, j]),
                          "share": 100 * float(wrong[i, j]) / float(matrix[i].sum())})
    return pairs


# ----------------------------------------------------------------------------
# figures

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def curves_size(num_rows):
    return CURVES_SIZE[0], CURVES_SIZE[1] * num_rows


def grid_size(num_images):
    return TILE_SIZE[0] * GRID_COLUMNS, TILE_SIZE[1] * math.ceil(num_images / GRID_COLUMNS)


def plot_all_curves(runs, path):
    """One row (loss, accuracy) per run with a history, in the order given."""
    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 2, figsize=curves_size(len(runs)), dpi=DPI, squeeze=False)
    for (ax_loss, ax_acc), run in zip(axes, runs):
        utils.draw_curves(ax_loss, ax_acc, run["history"], run["section_starts"])
        what = "ensemble head" if run["kind"] == "ensemble" else run["model"]
        title = run["name"] if what == run["name"] else f"{run['name']} ({what})"
        ax_loss.set_title(title + ("" if run["status"] == "complete" else ": incomplete"), loc="left", fontsize=10)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)
    plt.close(fig)


def short(name, width=14):
    return name if len(name) <= width else name[:width - 1] + "~"


def plot_confusion(matrix, class_names, path, title):
    """Counts on a log colour scale (zero cells white), classes in index order, labels thinned to MAX_TICKS."""
    from matplotlib.colors import LogNorm
    plt = pyplot()
    num_classes = len(class_names)
    fig, ax = plt.subplots(figsize=CONFUSION_SIZE, dpi=DPI, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_equal(matrix, 0), cmap=cmap, interpolation="nearest",
                      norm=LogNorm(vmin=1, vmax=max(2, matrix.max())))
    ticks = range(0, num_classes, math.ceil(num_classes / MAX_TICKS))
    labels = [short(class_names[i]) for i in ticks]
    fontsize = 9 if num_classes <= ANNOTATE_MAX else 7
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if num_classes <= ANNOTATE_MAX:
        for i, j in zip(*np.nonzero(matrix)):
            light = matrix[i, j] < matrix.max() ** 0.5  # dark cells at the bottom of the log scale
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
    vmax = image.norm.vmax
    ticks = [t for t in (10 ** e * m for e in range(int(math.log10(vmax)) + 1) for m in (1, 2, 5)) if t <= vmax]
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="val images (log scale)")
    bar.set_ticks(ticks, labels=[str(t) for t in ticks])
    bar.minorticks_off()
    utils.atomic_savefig(fig, path)
    plt.close(fig)


def plot_misclassified(mistakes, class_names, path):
    """mistakes: (path, true index, predicted index, confidence) tuples, drawn in order, a tile each."""
    plt = pyplot()
    rows = math.ceil(len(mistakes) / GRID_COLUMNS)
    fig, axes = plt.subplots(rows, GRID_COLUMNS, figsize=grid_size(len(mistakes)), dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image_path, true, pred, confidence) in zip(axes.flat, mistakes):
        img = data.load_rgb(image_path)
        img.thumbnail((256, 256))
        ax.imshow(img)
        ax.set_title(f"true: {short(class_names[true], 18)}\npred: {short(class_names[pred], 18)} "
                     f"({100 * confidence:.0f}%)", fontsize=9, color="firebrick")
    fig.tight_layout()
    utils.atomic_savefig(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Grad-CAM

def val_images(indices, paths, labels, preds, confidence):
    """(path, true index, predicted index, confidence) of each val image index, as the image grids take them."""
    return [(paths[i], int(labels[i]), int(preds[i]), float(confidence[i])) for i in indices]


def pair_images(labels, preds, confidence, true, predicted, count):
    """Val image indices, up to `count` of each group: `true` predicted as `predicted`, then correct `true`,
    then correct `predicted`; the most confident first."""
    order = confidence.argsort(descending=True, stable=True)
    picks = []
    for label, pred in ((true, predicted), (true, true), (predicted, predicted)):
        picks += order[(labels[order] == label) & (preds[order] == pred)][:count].tolist()
    return picks


def safe_name(name):
    """A class name as a file name part that needs no escaping in a Markdown link."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def cam_members(ckpt, model, run_name):
    """(name, member model) of each model whose Grad-CAMs are drawn: an ensemble's members, named after
    their run folders (the head only mixes their logits), or the member itself."""
    if ckpt["kind"] == "ensemble":
        return [(Path(entry["source"]).parent.name, member) for entry, member in zip(ckpt["members"], model.members)]
    return [(run_name, model)]


def compute_cams(members, images, transform, runtime, batch_size):
    """Per member, the heatmaps (N, h, w) of the images (val_images tuples): each of its predicted class,
    on the image as the eval pipeline gives it to the model."""
    heatmaps = [[] for _ in members]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pixels = runtime.images(torch.stack([transform(path) for path, *_ in batch]))
        for maps, (_, member) in zip(heatmaps, members):
            maps.append(cam.grad_cams(member, pixels, [pred for _, _, pred, _ in batch]))
    return [torch.cat(maps) for maps in heatmaps]


def cam_images_per_row(num_members):
    return max(1, GRID_COLUMNS // (1 + num_members))


def cam_grid_size(num_images, num_members):
    """Inches of a plot_cams figure: each image takes 1 + num_members tiles, side by side."""
    per_row = cam_images_per_row(num_members)
    return TILE_SIZE[0] * per_row * (1 + num_members), TILE_SIZE[1] * math.ceil(num_images / per_row)


def plot_cams(images, member_names, heatmaps, class_names, path, transform):
    """Per image (val_images tuples, in order) a tile of the image (the part the eval transform keeps), its
    true and predicted class and the confidence (red: wrong, green: right), then the Grad-CAM of the
    predicted class of each member."""
    plt = pyplot()
    per_row, width = cam_images_per_row(len(member_names)), 1 + len(member_names)
    fig, axes = plt.subplots(math.ceil(len(images) / per_row), per_row * width, dpi=DPI, squeeze=False,
                             figsize=cam_grid_size(len(images), len(member_names)))
    for ax in axes.flat:
        ax.axis("off")
    for i, (image_path, true, pred, confidence) in enumerate(images):
        row, column = divmod(i, per_row)
        tiles = axes[row, column * width:(column + 1) * width]
        img = data.load_rgb(image_path)
        img = img.crop(transform.kept_box(img.width, img.height))
        img.thumbnail((256, 256))
        tiles[0].imshow(img)
        tiles[0].set_title(f"true: {short(class_names[true], 18)}\npred: {short(class_names[pred], 18)} "
                           f"({100 * confidence:.0f}%)", fontsize=9, color="firebrick" if true != pred else "darkgreen")
        for ax, name, maps in zip(tiles[1:], member_names, heatmaps):
            ax.imshow(cam.overlay(img, maps[i]))
            ax.set_title(f"{short(name, 18)}\nGrad-CAM of {short(class_names[pred], 10)}", fontsize=9)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)
    plt.close(fig)


def write_cams(members, figures, class_names, transform, runtime, batch_size, folder):
    """Draw each figure ({file name: val_images tuples}) into folder, and delete the figures an earlier report
    left there that this one does not have. Returns the heatmaps' size (h, w)."""
    folder.mkdir(exist_ok=True)
    unique = list(dict.fromkeys(image for images in figures.values() for image in images))  # figures share images
    heatmaps = compute_cams(members, unique, transform, runtime, batch_size)
    row = {image: i for i, image in enumerate(unique)}
    for name, images in figures.items():
        rows = torch.tensor([row[image] for image in images])
        plot_cams(images, [member_name for member_name, _ in members], [maps[rows] for maps in heatmaps],
                  class_names, folder / name, transform)
    for stale in [folder / "misclassified.png", *folder.glob("pair_*.png")]:
        if stale.name not in figures and stale.is_file():
            stale.unlink()
    return tuple(heatmaps[0].shape[1:])


# ----------------------------------------------------------------------------
# Markdown

def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def fmt_acc(row, key):
    """row[key] with its interval (with_interval), e.g. '87.33 [83.1, 90.6]'; without a val count, alone."""
    if row.get(f"{key}_low") is None:
        return fmt(row.get(key))
    return stats.accuracy_text(row[key], row[f"{key}_low"], row[f"{key}_high"])


def paired_sentence(run):
    """The ensemble against its best member on the same val images, in words (McNemar's exact test)."""
    paired = run["paired"]
    best = with_interval({"val_acc": paired["member_val_acc"]}, "val_acc", run["val_images"])
    combiner = "trained head" if run["combiner"] == "head" else "logit average"
    images = "out-of-fold rows of the pooled images" if run["folds"] else "val images"
    member = "member type" if run["folds"] else "member"
    return (f"Paired on the same {run['val_images']} {images}: " + stats.paired_text(
        f"the ensemble ({combiner})", f"its best {member}, {paired['member']} ({fmt_acc(best, 'val_acc')}),",
        paired["ensemble_only"], paired["member_only"], paired["p"]) + ".")


def fold_tables(folds):
    """Per member type of a fold ensemble: a row per fold (its run's best val accuracy on its held-out fold,
    with interval) and the mean and sample standard deviation over the folds."""
    tables = []
    for group in folds["groups"]:
        rows = [with_interval({"fold": run["fold"], "path": run["path"], "images": run["held_out_images"],
                               "val_acc": run["best_val_acc"]}, "val_acc", run["held_out_images"])
                for run in group["runs"]]
        accs = np.array([row["val_acc"] for row in rows])
        tables.append({"model": group["model"], "arch": group["arch"], "rows": rows, "mean": float(accs.mean()),
                       "sd": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0})
    return tables


def oof_rows(run):
    """The out-of-fold accuracies of a fold ensemble over its pooled images: each member type's, the logit
    average's and the head's (cross-validated), with intervals."""
    folds = run["folds"]
    rows = [{"what": f"{group['model']} ({group['arch']}, {folds['folds']} folds)", "val_acc": group["oof_acc"]}
            for group in folds["groups"]]
    rows += [{"what": "logit average", "val_acc": run["logit_average"]},
             {"what": f"trained head (cross-validated over the {folds['folds']} folds)", "val_acc": run["head"]}]
    return [with_interval(row, "val_acc", folds["images"]) for row in rows]


def render_folds(run):
    folds = run["folds"]
    lines = ["", f"## Cross-validation: {run['name']}", "",
             f"{folds['folds']} folds (--fold-seed {folds['fold_seed']}) of the {folds['images']} pooled train/ and "
             "val/ images. Each fold run's best val accuracy is measured on its own held-out fold:"]
    for table in run["fold_tables"]:
        lines += ["", f"{table['model']} ({table['arch']}): mean {table['mean']:.2f}, standard deviation "
                  f"{table['sd']:.2f} over the folds.", "",
                  md_table(["Fold", "Run", "Held-out images", "Best Validation Acc."],
                           [[r["fold"], r["path"], r["images"], fmt_acc(r, "val_acc")] for r in table["rows"]])]
    lines += ["", f"Out-of-fold accuracy over the {folds['images']} pooled images (each image predicted by the fold "
              "models that held it out; the head's by a head trained on the other folds' rows):", "",
              md_table(["Model", "Out-of-fold Acc."], [[r["what"], fmt_acc(r, "val_acc")] for r in run["oof"]])]
    return lines


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def status_cell(run):
    return run["status"] if run["status"] == "complete" else f"incomplete: {run['reason']}"


def summary_rows(runs):
    """The member and ensemble table: a row per member run, then per ensemble its averages and its head."""
    rows = []
    for run in runs:
        if run["kind"] == "member":
            epochs = f"{run['epochs_done']}/{run['epochs'] if run['epochs'] is not None else '?'}"
            row = {"model": run["model"], "run": run["name"], "status": status_cell(run), "epochs": epochs,
                   "val_acc": run["best_val_acc"], "best_epoch": run["best_epoch"]}
            rows.append(with_interval(row, "val_acc", run["val_images"]))
        else:
            about = [f"{run['head_epochs']} epochs"] if run["head_epochs"] is not None else []
            about += ["cross-validated"] if run["folds"] else []
            head = f"trained head ({', '.join(about)})" if about else "trained head"
            used = {"head": "head", "average": "logit_average"}.get(run["combiner"]) if run["status"] == "complete" \
                else None
            for what, key in (("logit average", "logit_average"), ("softmax average", "softmax_average"),
                              (head, "head")):
                what += ", in ensemble.pt" if key == used else ""
                what += ", out-of-fold" if run["folds"] and key != "head" else ""
                row = {"model": f"ensemble: {what}", "run": run["name"], "status": status_cell(run), "epochs": "",
                       "val_acc": run[key], "best_epoch": None}
                rows.append(with_interval(row, "val_acc", run["val_images"]))
    return rows


def choose_analysed(runs):
    """The run whose val predictions the report shows: the complete ensemble with the highest val accuracy,
    as predict.py submits ensemble.pt by default, else the complete member with the highest. Returns
    (run or None, why it was chosen, caveats: a member above that ensemble on val is said in words)."""
    complete = [run for run in runs if run["status"] == "complete" and run["best_val_acc"] is not None]
    ensembles = [run for run in complete if run["kind"] == "ensemble"]
    if not ensembles:
        best = max(complete, key=lambda run: run["best_val_acc"], default=None)
        return best, "the complete member with the highest val accuracy (there is no complete ensemble)", []
    chosen = max(ensembles, key=lambda run: run["best_val_acc"])
    combiner = "trained head" if chosen["combiner"] == "head" else "logit average"
    why = f"the ensemble, whose ensemble.pt ({combiner}) the submission uses (predict.py's default)"
    caveats = []
    for member in complete:
        if member["kind"] == "member" and member["best_val_acc"] > chosen["best_val_acc"]:
            average_fix = chosen["combiner"] == "head" and chosen["logit_average"] >= member["best_val_acc"]
            caveats.append(
                f"{member['name']} alone scored {member['best_val_acc']:.2f} on val, above the ensemble's "
                f"{chosen['best_val_acc']:.2f} ({combiner}); to submit it instead run python predict.py --checkpoint "
                f"{member['checkpoint']}{', or keep the ensemble with ensemble.py --combiner average' * average_fix}. "
                "Whether the gap is beyond noise: see the paired comparison of the ensemble with its best member.")
    return chosen, why, caveats


def render(runs_dir, runs, summary, files, analysed, notes):
    lines = [f"# Report of {runs_dir}", "",
             "Rebuilt by report.py from the run folders alone. Accuracies are percentages of the val images, with "
             "their 95% Wilson score interval in brackets.", "",
             "## Members and ensemble", "",
             md_table(["Model", "Run", "Status", "Epochs", "Best Validation Acc.", "Best epoch"],
                      [[r["model"], r["run"], r["status"], r["epochs"], fmt_acc(r, "val_acc"),
                        r["best_epoch"] or ""] for r in summary])]
    for run in runs:
        if run["kind"] == "ensemble" and run["members"]:
            where = "out-of-fold" if run["folds"] else "on val"
            lines += ["", f"Members of {run['name']}, measured {where} by ensemble.py: "
                      + ", ".join(f"{m['model']} {fmt_acc(m, 'val_acc')} ({m['path']})" for m in run["members"]) + "."]
        if run["kind"] == "ensemble" and run["paired"]:
            lines += ["", paired_sentence(run)]
    for run in runs:
        if run.get("fold_tables"):
            lines += render_folds(run)
    for run in runs:
        if run["unfreeze"]:
            ema = "best_ema_val_acc" in run["unfreeze"][0]
            header = ["Epoch", "Action", "Best Training Acc.", "Best Validation Acc."] + ["Best EMA Val. Acc."] * ema
            rows = [[r["epochs"], r["action"], fmt(r["best_train_acc"]), fmt_acc(r, "best_val_acc")]
                    + [fmt_acc(r, "best_ema_val_acc")] * ema for r in run["unfreeze"]]
            lines += ["", f"## Gradual unfreezing: {run['name']} ({status_cell(run)})", "", md_table(header, rows)]
    lines += ["", "## Learning curves", ""]
    if "curves" in files:
        lines += [f"![learning curves]({files['curves']})", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "## The model analysed", ""]
    if analysed is None:
        lines.append("No complete run: no confusion matrix, per-class accuracy or misclassified images.")
        return "\n".join(lines) + "\n"
    lines += [f"{analysed['run']} ({analysed['kind']}, {analysed['checkpoint']}): {analysed['why']}. Val accuracy "
              f"{fmt_acc(analysed, 'val_acc')} recomputed from the checkpoint on {analysed['val_dir']} "
              f"({analysed['images']} images; the table says {analysed['table_val_acc']:.2f}).", "",
              *[f"- {caveat}\n" for caveat in analysed["caveats"]],
              f"![confusion matrix]({files['confusion']})", "",
              f"Per-class val accuracy: [{files['per_class']}]({files['per_class']}).", "",
              f"### The {TOP_PAIRS} most confused class pairs", ""]
    if analysed["top_confusions"]:
        lines.append(md_table(["True class", "Predicted as", "Images", "Share of the true class (%)"],
                              [[p["true"], p["predicted"], p["images"], fmt(p["share"])]
                               for p in analysed["top_confusions"]]))
    else:
        lines.append("None: every val image is classified correctly.")
    lines += ["", "### Misclassified val images", ""]
    if "misclassified" in files:
        lines += [f"The {analysed['shown']} most confident of the {analysed['mistakes']} mistakes (true and predicted "
                  "class, confidence of the prediction):", "", f"![misclassified]({files['misclassified']})"]
    else:
        lines.append("None.")
    if analysed.get("cam"):
        lines += ["", *render_cam(analysed["cam"], analysed["top_confusions"])]
    return "\n".join(lines) + "\n"


def render_cam(summary, pairs):
    layers = ", ".join(f"{member['name']} at {member['layer']}" for member in summary["members"])
    height, width = summary["heatmap_size"]
    lines = ["### Grad-CAM", "",
             f"Each val image is followed by the Grad-CAM of its predicted class in {layers} ({height} x {width} "
             f"maps at {summary['img_size']} px, stretched over the image): red is where the evidence for that class "
             "lies, blue adds none, and each map is scaled to its own maximum, so compare where maps point, not how "
             "strongly.", ""]
    if height * width == 1:
        lines += [f"At {summary['img_size']} px the map is a single value and shows nothing; train with a larger "
                  "--img-size for maps worth reading.", ""]
    lines += [f"![Grad-CAM of the misclassified val images]({summary['misclassified']})", "",
              f"The most confused pairs, each with up to {summary['per_pair']} of its mistakes, then up to "
              f"{summary['per_pair']} correct val images of each of its two classes:", ""]
    lines += [f"- [{p['true']} predicted as {p['predicted']}]({p['cam']}) ({p['cam_images']} images)" for p in pairs]
    return lines


# ----------------------------------------------------------------------------

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.cam < 0:
        raise UserError(f"--cam {args.cam}: give the number of images per confused pair, or 0 for no Grad-CAM")
    if not args.runs.is_dir():
        raise UserError(f"runs folder {args.runs} does not exist; give the folder that holds the run folders")
    out = args.out or args.runs / "report.md"
    utils.check_writable(out.parent, "--out")
    runs = find_runs(args.runs)
    summary = summary_rows(runs)

    # ------------------------------------------------ the model analysed and its data, checked before any work
    analysed_run, why, caveats = choose_analysed(runs)
    if analysed_run is not None:
        data_dir = args.data_dir or (Path(analysed_run["data_dir"]) if analysed_run["data_dir"] else None)
        if data_dir is None:
            raise UserError(f"run {analysed_run['path']} does not say which data it was trained on; "
                            "pass --data-dir DATA, the folder with its val/ images")
        if not (data_dir / "val").is_dir():
            source = "--data-dir" if args.data_dir else f"the data of run {analysed_run['path']}"
            raise UserError(f"{data_dir / 'val'} ({source}) does not exist; pass --data-dir DATA, "
                            "the folder with the val/ images the runs were trained on")
        if analysed_run.get("folds") and args.cam:
            raise UserError(f"--cam {args.cam}: the analysed model {analysed_run['checkpoint']} is a fold ensemble, "
                            "whose member types each average K fold models, so there is no one map per member; "
                            "leave --cam out, or run report.py --cam on a folder without the fold ensemble")
        if analysed_run.get("folds"):
            caveats.append("Its fold models trained on most of these val images (each on all folds of the pooled "
                           "train/ and val/ but its own), so the val figures of this section are in-sample; the "
                           "out-of-fold accuracies above are the honest estimate.")

    # ------------------------------------------------------------------ figures
    stem = out.with_suffix("")
    files, notes = {}, []
    plotted = [run for run in runs if run["history"]]
    for run in runs:
        if run["kind"] == "member" and not run["history"]:
            notes.append(f"{run['name']}: no curve ({run['reason']}).")
        elif run["kind"] == "ensemble" and not run["history"]:
            notes.append(f"{run['name']}: no head training curve in its metrics.json "
                         f"({run['reason'] or 'the head trained 0 epochs'}).")
        elif run["kind"] == "ensemble" and run["folds"]:
            notes.append(f"{run['name']}: the row of the ensemble head shows, per head epoch, the cross-validation "
                         "heads' loss on the out-of-fold logits of their training folds, and their loss and accuracy "
                         "on the folds they held out, pooled.")
        elif run["kind"] == "ensemble":
            notes.append(f"{run['name']}: the row of the ensemble head shows its loss on the members' stored "
                         "train logits and its val loss and accuracy, per head epoch.")
    if plotted:
        files["curves"] = f"{stem.name}_curves.png"
        plot_all_curves(plotted, out.parent / files["curves"])

    analysed = None
    if analysed_run is not None:
        runtime = engine.resolve_runtime(args.device, args.precision, args.channels_last)
        workers = data.loader_workers(args.workers, runtime.device)
        print(f"analysed model: {analysed_run['name']} ({analysed_run['best_val_acc']:.2f}); predicting "
              f"{data_dir / 'val'} on {runtime.device} [{runtime.precision}]")
        batch_size = engine.resolve_batch_size(args.batch_size, runtime.device)
        ckpt = checkpoints.load(analysed_run["checkpoint"])
        if args.cam and len(checkpoints.input_pipelines(ckpt)) > 1:
            raise UserError(f"--cam {args.cam}: the analysed model {analysed_run['checkpoint']} is a mixed ensemble, "
                            "whose members crop and resize each image their own way, so their maps would not sit "
                            "on one image; leave --cam out, or run report.py --cam on a folder without it")
        model = checkpoints.model_from_checkpoint(ckpt)
        paths, labels, probs, class_names = predict_val(ckpt, model, data_dir, runtime, batch_size, workers)
        confidence, preds = probs.max(1)
        matrix = confusion_matrix(labels.numpy(), preds.numpy(), len(class_names))
        wrong = (preds != labels).nonzero().flatten()
        wrong = wrong[confidence[wrong].argsort(descending=True, stable=True)]
        analysed = {"run": analysed_run["name"], "kind": analysed_run["kind"], "checkpoint": analysed_run["checkpoint"],
                    "why": why, "caveats": caveats, "val_dir": str(data_dir / "val"), "images": len(paths),
                    "table_val_acc": analysed_run["best_val_acc"], "mistakes": len(wrong),
                    **stats.accuracy_fields("val_acc", len(paths) - len(wrong), len(paths)),
                    "shown": min(len(wrong), MAX_MISCLASSIFIED), "top_confusions": top_confusions(matrix, class_names)}
        files["confusion"] = f"{stem.name}_confusion.png"
        plot_confusion(matrix, class_names, out.parent / files["confusion"],
                       f"{analysed_run['name']}: val confusion matrix ({analysed['val_acc']:.2f}% of {len(paths)} "
                       "images)")
        files["per_class"] = f"{stem.name}_per_class.csv"
        utils.atomic_write_text(out.parent / files["per_class"],
                                per_class(matrix, class_names).to_csv(index=False, float_format="%.2f"))
        if len(wrong):
            files["misclassified"] = f"{stem.name}_misclassified.png"
            shown = val_images(wrong[:MAX_MISCLASSIFIED], paths, labels, preds, confidence)
            plot_misclassified(shown, class_names, out.parent / files["misclassified"])
        if args.cam and len(wrong):  # without mistakes there is nothing to explain, and no pair
            cam_dir = f"{stem.name}_cam"
            figures = {"misclassified.png": shown}
            for rank, pair in enumerate(analysed["top_confusions"], 1):
                name = CAM_PAIR_NAME.format(rank=rank, true=safe_name(pair["true"]),
                                            predicted=safe_name(pair["predicted"]))
                picks = pair_images(labels, preds, confidence, class_names.index(pair["true"]),
                                    class_names.index(pair["predicted"]), args.cam)
                figures[name] = val_images(picks, paths, labels, preds, confidence)
                pair.update(cam=f"{cam_dir}/{name}", cam_images=len(picks))
            members = cam_members(ckpt, model, analysed_run["name"])
            print(f"Grad-CAM of {len(members)} model(s) on {sum(map(len, figures.values()))} val images")
            heatmap_size = write_cams(members, figures, class_names, transforms.eval_transform_of(ckpt), runtime,
                                      batch_size, out.parent / cam_dir)
            analysed["cam"] = {"members": [{"name": name, "layer": cam.target_layer_name(member)}
                                           for name, member in members],
                               "heatmap_size": list(heatmap_size), "img_size": ckpt["eval_size"], "per_pair": args.cam,
                               "misclassified": f"{cam_dir}/misclassified.png", "shown": len(shown)}
            files["cam"] = [f"{cam_dir}/{name}" for name in figures]

    # -------------------------------------------------------------------- write
    report = {"runs_dir": str(args.runs), "summary": summary, "analysed_model": analysed, "files": files,
              "notes": notes, "runs": [{key: value for key, value in run.items() if key != "history"} for run in runs]}
    utils.atomic_write_json(stem.with_suffix(".json"), report)
    utils.atomic_write_text(out, render(args.runs, runs, summary, files, analysed, notes))
    incomplete = sum(run["status"] != "complete" for run in runs)
    written = sum(len(value) if isinstance(value, list) else 1 for value in files.values())
    print(f"wrote {out}, {stem.with_suffix('.json').name} and {written} figure/table file(s) for {len(runs)} "
          f"run(s){f', {incomplete} incomplete' if incomplete else ''}")


if __name__ == "__main__":
    utils.run_main(main)
