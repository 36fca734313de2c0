"""Knowledge distillation (train.py --teacher): the loss, the teacher's inputs and weights, its checks, and exact
resume. Trainings run train.main in this process (resnet10t at 32 px, 8 steps of 8 images per epoch); the
teachers are the member_runs."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import bench
import checkpoints
import demo_data
import distill
import engine
import models
import train
import transforms
import utils
from conftest import SAVE, TINY_TRAIN, Killed, assert_same_run, die_after_save, train_here
from utils import UserError

CLASSES = demo_data.DEMO_CLASSES


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """16 classes, 4 train images each: 8 steps of 8 images per epoch."""
    return demo_data.make_demo(tmp_path_factory.mktemp("tiny") / "data", seed=0, train_per_class=4,
                               val_per_class=2, test_per_class=1)


def tiny_training(seed, teacher=None, alpha=1.0, temp=1.0):
    utils.seed_everything(seed)
    model = models.build_model("resnext", "resnet10t", CLASSES, weights="none")
    runtime = engine.resolve_runtime("cpu")
    return engine.Training(model, model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss(), runtime,
                           teacher=teacher, distill_alpha=alpha, distill_temp=temp)


def batch(seed=0, size=8):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=generator), torch.randint(0, CLASSES, (size,), generator=generator)


def test_alpha_zero_is_the_plain_loss_and_step():
    teacher = tiny_training(1).model.eval()
    plain, distilled = tiny_training(0), tiny_training(0, teacher=teacher, alpha=0.0)
    images, labels = batch()
    plain_loss, plain_logits = engine.train_step(plain, images, labels)
    loss, logits = engine.train_step(distilled, images, labels)
    assert torch.equal(loss, plain_loss) and torch.equal(logits, plain_logits)
    for (name, weight), other in zip(plain.model.state_dict().items(), distilled.model.state_dict().values()):
        assert torch.equal(weight, other), name


@pytest.mark.parametrize("alpha, temp", [(1.0, 1.0), (0.3, 4.0)])
def test_loss_is_the_kl_term_by_hand(alpha, temp):
    teacher = tiny_training(1).model.eval()
    training = tiny_training(0, teacher=teacher, alpha=alpha, temp=temp)
    images, labels = batch()
    with torch.no_grad():
        student_logits, teacher_logits = training.model(images).double(), teacher(images).double()
    p_teacher = torch.softmax(teacher_logits / temp, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student_logits / temp, 1))).sum(1).mean()
    expected = alpha * temp ** 2 * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)
    loss, _ = engine.train_step(training, images, labels)
    assert kl > 1e-3 and loss.item() == pytest.approx(expected.item(), rel=1e-5)


def normalise(pixels, spec):
    return (pixels - torch.tensor(spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(spec["std"]).view(1, 3, 1, 1)


def test_renormalize_to_another_size_and_normalisation():
    student = {"img_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    teacher = {"img_size": 48, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "class_names": ["a"]}
    pixels = torch.rand(2, 3, 32, 32)
    normalised = normalise(pixels, student)
    assert transforms.renormalize(normalised, student, dict(student, class_names=["a"])) is normalised
    same_size = dict(teacher, img_size=32)
    expected = normalise(pixels, teacher)
    assert torch.allclose(transforms.renormalize(normalised, student, same_size), expected, atol=1e-5)
    assert torch.allclose(transforms.renormalize(expected, same_size, student), normalised, atol=1e-5)
    colour = torch.tensor([0.2, 0.6, 0.9]).view(1, 3, 1, 1)
    resized = transforms.renormalize(normalise(colour.expand(1, 3, 32, 32), student), student, teacher)
    assert resized.shape == (1, 3, 48, 48)  # a flat colour stays that colour, in the teacher's normalisation
    assert torch.allclose(resized, normalise(colour, teacher).expand(1, 3, 48, 48), atol=1e-5)


def record_training(monkeypatch):
    """Record every training-mode input of the student model and every input of the teacher's model (with
    its mode and whether any of its weights asks for gradients); returns (record, the Teacher once built)."""
    record = {"student": [], "teacher": [], "teacher_modes": []}
    built = {}
    build_model, build_teacher = models.build_model, distill.build_teacher

    def student(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda module, inputs: record["student"].append(inputs[0].clone()) if module.training else None)
        return model

    def teacher(*args, **kwargs):
        built["teacher"] = teacher_module = build_teacher(*args, **kwargs)

        def hook(module, inputs):
            record["teacher"].append(inputs[0].clone())
            record["teacher_modes"].append((module.training, any(p.requires_grad for p in module.parameters()),
                                            torch.is_grad_enabled()))
        teacher_module.model.register_forward_pre_hook(hook)
        return teacher_module

    monkeypatch.setattr(models, "build_model", student)
    monkeypatch.setattr(distill, "build_teacher", teacher)
    return record, built


def distil_flags(data_dir, out_dir, teacher, *flags):
    return ["--model", "resnext", "--data-dir", data_dir, "--out-dir", out_dir, "--epochs", "1", "--lr", "0.05",
            "--batch-size", "8", *TINY_TRAIN, "--no-tensorboard", "--teacher", teacher, *flags]


def test_teacher_sees_the_student_batch_and_stays_frozen(member_runs, tiny_dir, tmp_path, monkeypatch):
    teacher_path = member_runs["resnext"] / "best.pt"
    before = checkpoints.load(teacher_path)["state_dict"]
    record, built = record_training(monkeypatch)
    train.main(distil_flags(tiny_dir, tmp_path / "run", teacher_path, "--distill-alpha", "0.5"))
    steps = json.loads((tmp_path / "run" / "config.json").read_text())["steps_per_epoch"]
    assert len(record["student"]) == len(record["teacher"]) == steps
    for student_images, teacher_images in zip(record["student"], record["teacher"]):
        assert torch.equal(student_images, teacher_images)  # the same augmented pixels: no second draw
    assert set(record["teacher_modes"]) == {(False, False, False)}  # eval, frozen, no autograd graph
    for name, weight in built["teacher"].model.state_dict().items():
        assert torch.equal(weight, before[name]), name
    ckpt = checkpoints.load(tmp_path / "run" / "last.pt")
    assert ckpt["teacher"] == {"path": str(teacher_path), "kind": "member", "sha256": utils.file_sha256(teacher_path),
                               "alpha": 0.5, "temp": 1.0}
    plain = models.build_model("resnext", "resnet10t", CLASSES, weights="none")
    assert ckpt["state_dict"].keys() == plain.state_dict().keys()  # no teacher weights in the student's


def test_ensemble_teacher_at_another_size_gets_its_own_preprocessing(member_runs, tiny_dir, tmp_path, monkeypatch):
    members = [checkpoints.load(member_runs[name] / "best.pt") for name in ("resnext", "resnext_freeze")]
    entries = [dict(checkpoints.ensemble_member(ckpt, "member.pt", "0" * 64), img_size=48, mean=[0.5] * 3,
                    std=[0.25] * 3) for ckpt in members]
    head = torch.nn.Linear(2 * CLASSES, CLASSES).state_dict()
    path = tmp_path / "ensemble.pt"
    checkpoints.save(checkpoints.ensemble_checkpoint(entries, head, metrics={}), path)
    record, built = record_training(monkeypatch)
    train.main(distil_flags(tiny_dir, tmp_path / "run", path, "--distill-temp", "2"))
    teacher = built["teacher"]
    assert isinstance(teacher.model, models.StackingEnsemble) and record["teacher"]
    student_spec = {"img_size": 32, "mean": transforms.IMAGENET_MEAN, "std": transforms.IMAGENET_STD}
    for student_images, teacher_images in zip(record["student"], record["teacher"]):
        assert teacher_images.shape[-2:] == (48, 48)
        assert torch.equal(teacher_images, transforms.renormalize(student_images, student_spec, entries[0]))
    assert checkpoints.load(tmp_path / "run" / "last.pt")["teacher"]["kind"] == "ensemble"


def teacher_error(flags):
    with pytest.raises(UserError) as info:
        train.main(flags)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_wrong_teacher_is_one_line_before_training(member_runs, demo_dir, tmp_path):
    out = tmp_path / "run"
    missing = tmp_path / "missing.pt"
    assert teacher_error(distil_flags(demo_dir, out, missing)) == f"--teacher: checkpoint {missing} does not exist"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all")
    assert teacher_error(distil_flags(demo_dir, out, corrupt)) == (
        f"--teacher: checkpoint {corrupt} cannot be read (UnpicklingError): it is truncated, corrupt or not a "
        "checkpoint of this project")
    other = tmp_path / "other.pt"
    ckpt = checkpoints.load(member_runs["resnext"] / "best.pt")
    checkpoints.save(dict(ckpt, class_names=ckpt["class_names"][:-1]), other)
    assert teacher_error(distil_flags(demo_dir, out, other)) == (
        f"--teacher {other} was trained on other classes than {demo_dir}/train (15 vs 16 classes, or another "
        "order)")
    assert not (out / "last.pt").exists()
    assert teacher_error(distil_flags(demo_dir, out, member_runs["resnext"] / "best.pt", "--distill-alpha",
                                      "1.5")) == "--distill-alpha 1.5 must be from 0 to 1"
    plain = ["--model", "resnext", "--data-dir", demo_dir, "--out-dir", out, *TINY_TRAIN, "--distill-temp", "2"]
    assert teacher_error(plain) == "--distill-alpha and --distill-temp need --teacher"


def resume_flags(data_dir, out_dir, teacher, *flags):
    return ["python", "train.py", "--model", "resnext", "--data-dir", data_dir, "--out-dir", out_dir, "--arch",
            "resnet10t", "--weights", "none", "--img-size", "32", "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--log-every", "1", "--no-tensorboard", "--teacher", teacher, "--distill-alpha", "0.7",
            "--distill-temp", "2", *flags]


def test_resume_with_a_teacher_is_exact_and_checks_its_file(member_runs, tiny_dir, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes((member_runs["resnext_vit"] / "best.pt").read_bytes())
    train_here(resume_flags(tiny_dir, tmp_path / "full", teacher))
    out = tmp_path / "split"
    die_after_save(monkeypatch, 0, 3)  # mid-epoch 1, after the checkpoint of step 3
    with pytest.raises(Killed):
        train_here(resume_flags(tiny_dir, out, teacher, "--save-every", 3))
    monkeypatch.setattr(utils, "atomic_save_torch", SAVE)
    original = teacher.read_bytes()
    changed = checkpoints.load(teacher)
    changed["state_dict"] = {key: value + 1e-3 if value.is_floating_point() else value
                             for key, value in copy.deepcopy(changed["state_dict"]).items()}
    checkpoints.save(changed, teacher)
    message = teacher_error(["--resume", out / "last.pt", "--workers", "0"])
    assert message.startswith(f"--teacher {teacher} has changed since this run started (SHA-256 ")
    assert message.endswith("...); put the original file back, or start a new run")
    teacher.write_bytes(original)
    train_here(["python", "train.py", "--resume", out / "last.pt", "--workers", "0", "--log-every", "1"])
    assert_same_run(out, tmp_path / "full")
    assert checkpoints.load(out / "last.pt")["teacher"]["sha256"] == utils.file_sha256(teacher)


def test_bench_distill_prints_the_three_rates(capsys):
    bench.main(["distill", "--img-size", "32", "--batch-size", "4", "--steps", "1", "--device", "cpu"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["bench"] for row in rows] == ["env", "distill"]
    row = rows[-1]
    assert min(row[f"{name}_teacher_img_s"] for name in ("none", "member", "ensemble")) > 0
    assert {key for key in row if "ratio" in key} == {"member_teacher_over_none_ratio",
                                                      "ensemble_teacher_over_none_ratio"}


@pytest.mark.filterwarnings("ignore:the smoothed loss never fell")  # 4 steps: the suggestion means nothing
def test_find_lr_steps_with_the_teacher(member_runs, tiny_dir, tmp_path, monkeypatch, capsys):
    record, _ = record_training(monkeypatch)
    train.main(distil_flags(tiny_dir, tmp_path / "run", member_runs["resnext"] / "best.pt", "--find-lr",
                            "--find-lr-steps", "4"))
    assert len(record["teacher"]) == 4 and (tmp_path / "run" / "lr_find.csv").is_file()
    assert "suggested --lr" in capsys.readouterr().out
