"""train.py's TensorBoard event files: every log step exactly once across a stop, a resume and a kill
between logging and checkpointing; epoch scalars equal history.csv; --no-tensorboard. Runs train.main()
in this process on 64 train images: 8 steps of 8 per epoch, logged at steps 3, 6 and 8."""
import pandas as pd
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import checkpoints
import demo_data
import utils
from conftest import TINY_TRAIN, train_here

STEP_TAGS = ("train/loss", "train/acc", "train/lr", "train/images_per_s")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return demo_data.make_demo(tmp_path_factory.mktemp("tiny") / "data", seed=0, train_per_class=4,
                               val_per_class=2, test_per_class=1)


def train_cmd(data_dir, out_dir, *flags):
    return ["python", "train.py", "--model", "resnext", "--data-dir", data_dir, "--out-dir", out_dir, *TINY_TRAIN,
            "--epochs", "2", "--batch-size", "8", "--log-every", "3", *flags]


def resume_cmd(out_dir, *flags):
    return ["python", "train.py", "--resume", "--out-dir", out_dir, "--workers", "0", "--log-every", "3", *flags]


def read_events(out_dir):
    events = event_accumulator.EventAccumulator(str(out_dir), size_guidance=dict.fromkeys(
        event_accumulator.DEFAULT_SIZE_GUIDANCE, 0))
    events.Reload()
    return events


def steps(events, tag):
    return [event.step for event in events.Scalars(tag)]


class Killed(Exception):
    """Raised instead of writing epoch 2's last.pt: the disk as a kill -9 just before it leaves it."""


def test_stopped_resumed_and_killed_run_logs_every_step_once(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_here(train_cmd(tiny_dir, out, "--ema", "--stop-after", 1))
    save = utils.atomic_save_torch

    def die_before_epoch_2_is_saved(state, path):
        if state["epoch"] == 2:
            raise Killed
        save(state, path)

    monkeypatch.setattr(utils, "atomic_save_torch", die_before_epoch_2_is_saved)
    with pytest.raises(Killed):  # epoch 2's steps are logged (and flushed), its checkpoint never written
        train_here(resume_cmd(out))
    assert checkpoints.load(out / "last.pt")["epoch"] == 1
    monkeypatch.setattr(utils, "atomic_save_torch", save)
    train_here(resume_cmd(out))

    events = read_events(out)
    assert len(list(out.glob("events.out.tfevents.*"))) == 3
    for tag in STEP_TAGS:  # global step (epoch - 1) * 8 + step: epoch 2's steps once, though logged twice
        assert steps(events, tag) == [3, 6, 8, 11, 14, 16], tag
    history = pd.read_csv(out / "history.csv")
    assert "ema_val_acc" in history.columns
    for column in history.columns.drop("epoch"):
        scalars = events.Scalars(f"epoch/{column}")
        assert [s.step for s in scalars] == [1, 2], column
        assert [s.value for s in scalars] == pytest.approx(history[column].tolist(), rel=1e-6), column
    # a log step's figures are the epoch's running ones: at its last step, the epoch's
    last_steps = [events.Scalars("train/loss")[i].value for i in (2, 5)]
    assert last_steps == pytest.approx(history["train_loss"].tolist(), rel=1e-6)
    assert [s.value for s in events.Scalars("train/lr")][2::3] == pytest.approx(history["lr"].tolist(), rel=1e-6)

    (grid,) = events.Images("train/augmented")  # the first batch's 8 images of 32 px, 2 px apart
    assert (grid.step, grid.width, grid.height) == (0, 8 * 34 + 2, 34 + 2)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model"].string_value == "resnext" and start.hparams["lr"].number_value == 1e-3
    assert start.hparams["ema"].number_value == 1 and "out_dir" not in start.hparams
    assert steps(events, "hparams/best_val_acc") == [2]
    assert events.Scalars("hparams/best_val_acc")[0].value == pytest.approx(
        checkpoints.load(out / "last.pt")["best_acc"], rel=1e-6)


def test_no_tensorboard_writes_no_event_file_and_may_change_on_resume(tiny_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"a previous run's")
    train_here(train_cmd(tiny_dir, out, "--no-tensorboard", "--stop-after", 1))
    assert (out / "last.pt").is_file() and not list(out.glob("events.out.tfevents.*"))
    train_here(resume_cmd(out))  # a runtime flag: this process logs what it trains
    events = read_events(out)
    assert steps(events, "train/loss") == [11, 14, 16] and steps(events, "epoch/val_acc") == [2]
