"""engine.py: the runtime decision, the training step and epoch, and the one inference path."""
import argparse
import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import engine
import utils
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train", "ensemble", "predict", "report", "demo", "bench")


def test_runtime_defaults_on_the_cpu():
    runtime = engine.resolve_runtime("cpu")
    assert runtime == engine.Runtime(torch.device("cpu"), "fp32", torch.channels_last)
    assert engine.resolve_runtime("cpu", "bf16", "off").memory_format == torch.contiguous_format
    assert engine.resolve_runtime("cpu", "bf16", "on").precision == "bf16"
    with pytest.raises(UserError, match=r"^--precision fp16 needs a GPU; use bf16 or fp32 on the CPU$"):
        engine.resolve_runtime("cpu", "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"^--device cuda was asked for but no CUDA GPU is visible"):
            engine.resolve_runtime("cuda")
    image = runtime.images(torch.zeros(2, 3, 4, 4))
    assert image.is_contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with engine.resolve_runtime("cpu", "bf16").autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16


def test_every_script_shares_the_runtime_flags():
    parser = argparse.ArgumentParser()
    engine.add_runtime_args(parser)
    flags = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    assert flags == {"device": "auto", "precision": "auto", "channels_last": "auto"}
    for script in SCRIPTS[:4]:
        tree = ast.parse((ROOT / f"{script}.py").read_text())
        calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
        assert calls & {"engine.add_runtime_args", "engine.add_inference_args"}, script
        assert "engine.resolve_runtime" in calls, script


def test_no_script_imports_another():
    for script in SCRIPTS:
        tree = ast.parse((ROOT / f"{script}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        others = imported & set(SCRIPTS) - {script}
        # bench.py measures the scripts, so it may call them
        assert others <= ({"train", "ensemble", "predict"} if script == "bench" else set()), (script, others)
        tree_main = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
        assert tree_main and [a.arg for a in tree_main[0].args.args] == ["argv"], script


def toy_training(runtime):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return engine.Training(model, model, optimizer, scaler, nn.CrossEntropyLoss(), runtime)


def toy_loader(n=24, batch_size=4):
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(n, 3, 2, 2, generator=generator), torch.arange(n) % 3
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size), images, labels


def test_train_step_is_one_sgd_step():
    runtime = engine.resolve_runtime("cpu", "fp32", "off")
    training = toy_training(runtime)
    _, images, labels = toy_loader()
    before = [p.detach().clone() for p in training.model.parameters()]
    expected_loss = F.cross_entropy(training.model(images[:4]), labels[:4])
    grads = torch.autograd.grad(expected_loss, list(training.model.parameters()))
    loss, logits = engine.train_step(training, images[:4], labels[:4])
    assert not loss.requires_grad and not logits.requires_grad and logits.shape == (4, 3)
    assert loss.item() == pytest.approx(expected_loss.item())
    for p, b, g in zip(training.model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g)


def test_train_one_epoch_metrics_and_a_stop_mid_epoch():
    runtime = engine.resolve_runtime("cpu", "fp32", "off")
    loader, images, labels = toy_loader()
    reference, losses, correct = toy_training(runtime), [], 0  # the same steps taken one by one
    for index in range(0, 24, 4):
        loss, logits = engine.train_step(reference, images[index:index + 4], labels[index:index + 4])
        losses.append(loss.item())
        correct += int((logits.argmax(1) == labels[index:index + 4]).sum())
    steps_seen = []

    def lr_at(step):
        steps_seen.append(step)
        return 0.1

    metrics, stopped = engine.train_one_epoch(toy_training(runtime), loader, epoch=1, steps_per_epoch=6,
                                              lr_at=lr_at, progress=False)
    assert stopped is None and metrics["lr"] == 0.1 and steps_seen == [0, *range(6)]
    assert metrics["loss"] == pytest.approx(sum(losses) / 6) and metrics["acc"] == pytest.approx(100 * correct / 24)

    class StopAfterTwoChecks:
        calls = 0

        @property
        def requested(self):
            self.calls += 1
            return self.calls > 2

    saved, training = [], toy_training(runtime)
    metrics, stopped = engine.train_one_epoch(training, loader, epoch=1, steps_per_epoch=6, lr_at=lambda s: 0.1,
                                              log_every=1, save_partial=lambda step, sums: saved.append((step, sums)),
                                              stop=StopAfterTwoChecks(), progress=False)
    assert metrics is None and stopped == 2 and [step for step, _ in saved] == [2]
    sums = saved[0][1]
    assert sums["count"] == 8 and sums["loss"] == pytest.approx(4 * (losses[0] + losses[1]))
    # continuing from those sums ends with the uninterrupted epoch's metrics
    rest = DataLoader(TensorDataset(images[8:], labels[8:]), batch_size=4)
    metrics, _ = engine.train_one_epoch(training, rest, epoch=1, steps_per_epoch=6, lr_at=lambda s: 0.1,
                                        start_step=2, epoch_sums=sums, progress=False)
    assert metrics["loss"] == pytest.approx(sum(losses) / 6) and metrics["acc"] == pytest.approx(100 * correct / 24)


def test_nonfinite_loss_names_its_step():
    training = toy_training(engine.resolve_runtime("cpu", "fp32", "off"))
    loader, images, labels = toy_loader()
    images[9] = float("nan")  # in the third batch
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    with pytest.raises(engine.NonFiniteError, match=r"^non-finite loss at epoch 2, step 3$"):
        engine.train_one_epoch(training, loader, epoch=2, steps_per_epoch=6, lr_at=lambda s: 0.0, progress=False)


def test_infer_keeps_the_order_and_averages_the_views():
    runtime = engine.resolve_runtime("cpu")
    loader, images, labels = toy_loader(n=10, batch_size=3)
    models = [toy_training(runtime).model, nn.Sequential(nn.Flatten(), nn.Linear(12, 3))]
    views = (engine.identity, lambda x: x.flip(-1))
    (first, second), got_labels = engine.infer(models, loader, runtime, views=views)
    assert torch.equal(got_labels, labels) and first.dtype == torch.float32 and first.shape == (10, 3)
    with torch.no_grad():
        for model, logits in zip(models, (first, second)):
            torch.testing.assert_close(logits, (model(images) + model(images.flip(-1))) / 2)
        plain = models[0](images)
    metrics = engine.evaluate(models[0], loader, runtime)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(plain, labels).item())
    assert metrics["acc"] == pytest.approx(100 * (plain.argmax(1) == labels).float().mean().item())
    assert (metrics["correct"], metrics["count"]) == ((plain.argmax(1) == labels).sum().item(), 10)


def test_progress_in_a_log_is_a_line_per_tenth(capsys):
    bar = utils.progress(range(20), desc="val logits")  # stderr is captured: not a terminal
    assert isinstance(bar, utils.LogProgress)
    bar.set_postfix(loss="0.5")
    assert list(bar) == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0].startswith("val logits: 2/20 (10%, ") and lines[0].endswith("s) loss 0.5")
    assert lines[-1].startswith("val logits: 20/20 (100%, ")
    resumed = utils.progress(range(5), desc="epoch 3/3", total=10, initial=5)  # a mid-epoch resume
    list(resumed)
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        f"epoch 3/3: {n}/10" for n in range(6, 11)]
    assert list(utils.progress(range(3), desc="quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
