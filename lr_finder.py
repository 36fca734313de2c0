"""The learning-rate range test of `train.py --find-lr`: the run's model, optimizer, loss and train pipeline,
with the LR rising exponentially step by step until the smoothed loss diverges.

Written on engine.train_step rather than with torch-lr-finder, whose own training loop would bypass the
project's autocast, memory format and on-device (fused-gpu) augmentation.
"""
import math

import numpy as np
import pandas as pd

import engine
import utils

BETA = 0.98  # exponential smoothing of the loss (bias-corrected)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum


def lr_steps(start, end, steps):
    """One LR per step, exponential from start to end."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def cycle(loader, sampler):
    """The loader's batches, epoch after epoch (each reshuffled by sampler.set_epoch), without end."""
    epoch = 1
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def range_test(training, batches, lrs, *, lr_scale=1.0, progress=True):
    """One engine.train_step per LR of `lrs` (the optimizer gets lr * lr_scale, times a group's "lr_scale"
    under layer decay) on the next of `batches`, mixed as training.mix mixes them,
    stopping early once the smoothed loss exceeds DIVERGED x its minimum or is not finite. Returns a row
    {step, lr, loss, smoothed_loss} per step taken."""
    runtime = training.runtime
    prepare_images = training.prepare_images or runtime.images
    rows, average, best = [], 0.0, math.inf
    bar = utils.progress(zip(lrs, batches), desc="find lr", total=len(lrs), enabled=progress, leave=False)
    for step, (lr, (images, labels)) in enumerate(bar, 1):
        for group in training.optimizer.param_groups:
            group["lr"] = lr * lr_scale * group.get("lr_scale", 1.0)
        images, targets = prepare_images(images), labels.to(runtime.device, non_blocking=True)
        if training.mix is not None:
            images, targets = training.mix(images, targets)
        loss, _ = engine.train_step(training, images, targets)
        loss = loss.item()
        average = BETA * average + (1 - BETA) * loss
        smoothed = average / (1 - BETA ** step)
        rows.append({"step": step, "lr": lr, "loss": loss, "smoothed_loss": smoothed})
        best = min(best, smoothed)
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed:.4f}")
        if not math.isfinite(smoothed) or smoothed > DIVERGED * best:
            break
    bar.close()
    return rows


def suggest(rows):
    """The index of the row where the smoothed loss falls fastest against log LR (its minimum gradient),
    leaving out the first tenth of the steps, whose average holds too few losses to be smooth."""
    if not math.isfinite(rows[-1]["smoothed_loss"]):  # the step that stopped the test (range_test)
        rows = rows[:-1]
    skip = len(rows) // 10
    smoothed = [row["smoothed_loss"] for row in rows[skip:]]
    if len(smoothed) < 2:
        return 0
    log_lr = np.log10([row["lr"] for row in rows[skip:]])
    return skip + int(np.argmin(np.gradient(smoothed, log_lr)))


def write_csv(rows, path):
    utils.atomic_write_text(path, pd.DataFrame(rows, columns=["step", "lr", "loss", "smoothed_loss"]).to_csv(
        index=False))


def plot(rows, suggested, path, title=""):
    """Loss and smoothed loss against the LR (log scale), the suggestion marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lrs, losses = [row["lr"] for row in rows], [row["loss"] for row in rows]
    smoothed = [row["smoothed_loss"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(lrs, losses, color="C0", alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, smoothed, color="C0", lw=2, label=f"smoothed loss (beta {BETA})")
    lr = rows[suggested]["lr"]
    ax.axvline(lr, color="C3", ls="--", lw=1)
    ax.plot([lr], [smoothed[suggested]], "o", color="C3", label=f"suggested --lr {lr:.1e} (steepest descent)")
    finite = [value for value in smoothed if math.isfinite(value)]
    if finite:  # the smoothed curve's range: a diverging step's raw loss would flatten the rest
        ax.set_ylim(0.9 * min(finite), 1.05 * min(max(finite), DIVERGED * min(finite)))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate per 32 images (--lr)")
    ax.set_ylabel("train loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    utils.atomic_savefig(fig, path)
    plt.close(fig)
