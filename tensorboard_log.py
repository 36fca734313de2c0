"""TensorBoard event files of a train.py run, written into its --out-dir: the running loss, accuracy,
learning rate and images/s at every log step (global step = (epoch - 1) * steps_per_epoch + step), every
history.csv column per epoch (keyed by epoch number), a grid of augmented train images, and the run's
hyperparameters with its final metrics (the HParams dashboard).

A resumed run opens its writer with purge_step at the first step it trains: TensorBoard then drops what an
earlier process logged beyond the checkpoint resumed from, so every step's point appears once.
"""
from pathlib import Path

import torch

EVENT_FILES = "events.out.tfevents.*"


def open_writer(out_dir, purge_step=None):
    from torch.utils.tensorboard import SummaryWriter  # imported only when on: it loads tensorboard (about 1 s)
    return SummaryWriter(str(out_dir), purge_step=purge_step)


def remove_event_files(out_dir):
    """A new run in a used folder replaces the previous run's curves, as it replaces its last.pt."""
    for path in Path(out_dir).glob(EVENT_FILES):
        path.unlink()


def log_step(writer, global_step, figures):
    """figures: engine.train_one_epoch's on_log figures (loss, acc, lr, images_per_s)."""
    for key, value in figures.items():
        writer.add_scalar(f"train/{key}", value, global_step)


def log_epoch(writer, row):
    """One history.csv row, flushed at once: it is logged just after its last.pt is written."""
    for key, value in row.items():
        if key != "epoch":
            writer.add_scalar(f"epoch/{key}", value, row["epoch"])
    writer.flush()


def log_images(writer, images, mean, std, nrow=8):
    """A grid of normalised images (B, 3, H, W), shown in their original colours."""
    from torchvision.utils import make_grid
    images = images.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    writer.add_image("train/augmented", make_grid(images.clamp(0, 1), nrow=nrow), 0)


def log_hparams(writer, hparams, metrics, step):
    """hparams: {name: value} (values other than numbers, strings and booleans as text; None left out);
    metrics: {"hparams/NAME": value}, written as scalars at `step` too, where the dashboard reads them."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries
    values = {key: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
              for key, value in hparams.items()}
    for summary in hparams_summaries(values, metrics):
        writer.file_writer.add_summary(summary)
    for key, value in metrics.items():
        writer.add_scalar(key, value, step)
    writer.flush()
