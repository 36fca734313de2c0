"""train.py --find-lr and lr_finder: the range test's schedule, smoothing and stop, the suggestion, the
files it writes and the ones it must not."""
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import data
import engine
import lr_finder
import train
from utils import UserError
from conftest import TINY_TRAIN, train_here


def test_find_lr_writes_curve_and_suggestion_and_no_checkpoint(demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train_here(["python", "train.py", "--model", "resnext", "--data-dir", demo_dir, "--out-dir", out, *TINY_TRAIN,
                "--batch-size", "16", "--find-lr", "--find-lr-steps", "30", "--find-lr-start", "1e-5",
                "--find-lr-end", "1"])
    stdout = capsys.readouterr().out
    rows = pd.read_csv(out / "lr_find.csv")
    assert list(rows.columns) == ["step", "lr", "loss", "smoothed_loss"]
    assert rows["step"].tolist() == list(range(1, len(rows) + 1)) and 2 <= len(rows) <= 30
    # per 32 images, exponential from 1e-5 to 1 over 30 steps
    assert np.allclose(rows["lr"], 1e-5 * 10 ** (5 * np.arange(len(rows)) / 29), rtol=1e-9)
    average, smoothed = 0.0, []
    for step, loss in enumerate(rows["loss"], 1):
        average = 0.98 * average + 0.02 * loss
        smoothed.append(average / (1 - 0.98 ** step))
    assert np.allclose(rows["smoothed_loss"], smoothed, rtol=1e-9)
    suggested = float(re.search(r"^suggested --lr (\S+) \(per 32 images; steepest descent", stdout, re.M)[1])
    assert 1e-5 <= suggested <= 1
    assert np.isclose(rows["lr"], suggested, rtol=5e-3).sum() == 1  # printed to 3 digits: one of the steps
    assert Image.open(out / "lr_find.png").size == (700, 450)
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.csv", "lr_find.png"]  # no .pt, history or events


def test_range_test_stops_once_the_smoothed_loss_passes_4x_its_minimum():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    runtime = engine.resolve_runtime("cpu", "fp32", "off")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    training = engine.Training(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                               nn.CrossEntropyLoss(), runtime)
    batches = ((torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(1000))
    lrs = lr_finder.lr_steps(1e-3, 1e6, 100)
    rows = lr_finder.range_test(training, batches, lrs, lr_scale=0.5, progress=False)
    smoothed = [row["smoothed_loss"] for row in rows]
    assert 2 < len(rows) < 100
    assert all(value <= 4 * min(smoothed[:i + 1]) for i, value in enumerate(smoothed[:-1]))
    assert not math.isfinite(smoothed[-1]) or smoothed[-1] > 4 * min(smoothed[:-1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * lrs[len(rows) - 1])  # raw = per-32 x scale


def test_suggestion_is_the_steepest_descent_of_the_smoothed_loss():
    lrs = lr_finder.lr_steps(1e-7, 10, 81)  # 10 steps per decade
    log_lr = np.log10(lrs)
    loss = 3 - np.tanh(2 * (log_lr + 2)) + np.exp(3 * (log_lr - 1))  # falls fastest at 1e-2, then diverges
    rows = [{"step": i + 1, "lr": lr, "loss": value, "smoothed_loss": value} for i, (lr, value) in
            enumerate(zip(lrs, loss))]
    assert rows[lr_finder.suggest(rows)]["lr"] == pytest.approx(1e-2)
    rows[-1]["smoothed_loss"] = float("nan")  # a non-finite step that stopped the test is left out
    assert rows[lr_finder.suggest(rows)]["lr"] == pytest.approx(1e-2)


def test_cycle_reshuffles_each_pass_over_the_train_split():
    class Indices(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, item):
            return item[0]

    sampler = data.TrainBatchSampler(12, 4, seed=0)
    loader = torch.utils.data.DataLoader(Indices(), batch_sampler=sampler)
    batches = [batch.tolist() for _, batch in zip(range(7), lr_finder.cycle(loader, sampler))]
    epochs = [sorted(sum(batches[i:i + 3], [])) for i in (0, 3)]
    assert epochs == [list(range(12))] * 2 and batches[:3] != batches[3:6] and sampler.epoch == 3


@pytest.mark.parametrize("flags, message", [
    (["--resume"], "--find-lr starts from the run's initial weights; leave out --resume"),
    (["--find-lr-steps", "1"], "--find-lr-steps 1 must be at least 2"),
    (["--find-lr-start", "1", "--find-lr-end", "0.1"], "--find-lr-start 1.0 must be above 0 and below "
     "--find-lr-end 0.1"),
])
def test_bad_find_lr_flags_are_one_line_errors(tmp_path, flags, message):
    with pytest.raises(UserError) as info:
        train.main(["--model", "resnext", "--out-dir", tmp_path, "--find-lr", *flags])
    assert str(info.value) == message
