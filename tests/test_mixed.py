"""Mixed ensembles: members with their own image size, eval size and normalisation. Each member gets the same
logits in the ensemble as alone, each image is decoded once, and every consumer (predict.py, train.py
--teacher, export.py) handles the ensemble's tuple of pipelines. The members are the member_runs; the mixed one
is a copy of resnext_freeze's best.pt with another pipeline (the same weights: a ResNet takes any size)."""
import re

import pytest
import torch

import checkpoints
import data
import distill
import engine
import ensemble
import export
import models
import predict
import train
import transforms
import utils
from test_distill import distil_flags, tiny_dir  # noqa: F401 (a fixture)
from utils import UserError

# eval 28 px after a resize to floor(28 / 0.875) = 32 px: JPEGs are decoded at the same reduced size as for the
# 32 px members, so the ensemble's one decode gives each member exactly its own pixels
OTHER_PIPELINE = {"img_size": 40, "eval_size": 28, "crop_pct": 0.875, "interpolation": "bicubic",
                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def count_decodes(monkeypatch):
    """Count the files the eval and mixed pipelines decode."""
    calls = []

    def counting(path, draft_size=None):
        calls.append(path)
        return data.load_rgb(path, draft_size)
    monkeypatch.setattr(transforms, "load_rgb", counting)
    return calls


@pytest.fixture(scope="module")
def mixed(member_runs, tiny_dir, tmp_path_factory):  # noqa: F811
    """ensemble.py on resnext (32 px), the copy of resnext_freeze at OTHER_PIPELINE and resnext_vit (32 px):
    {"members": their paths, "out": the out dir, "decodes": files decoded while stacking}."""
    folder = tmp_path_factory.mktemp("mixed")
    other = checkpoints.load(member_runs["resnext_freeze"] / "best.pt")
    checkpoints.save(dict(other, **OTHER_PIPELINE), folder / "other.pt")
    members = [member_runs["resnext"] / "best.pt", folder / "other.pt", member_runs["resnext_vit"] / "best.pt"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        decodes = count_decodes(monkeypatch)
        ensemble.main(["--members", *map(str, members), "--data-dir", str(tiny_dir), "--out-dir", str(folder / "ens"),
                       "--epochs", "2", "--workers", "0"])
    return {"members": members, "out": folder / "ens", "decodes": len(decodes)}


def test_each_member_gets_its_own_pipeline_and_the_same_logits_as_alone(mixed, tiny_dir):  # noqa: F811
    ckpt = checkpoints.load(mixed["out"] / "ensemble.pt", kind="ensemble")
    first = checkpoints.pipeline_of(checkpoints.load(mixed["members"][0]))
    assert ckpt["pipelines"] == [first, OTHER_PIPELINE]
    assert [entry["pipeline_index"] for entry in ckpt["members"]] == [0, 1, 0]
    assert all(ckpt[key] is None for key in checkpoints.PIPELINE_KEYS)  # a mixed ensemble has no one pipeline
    assert checkpoints.model_from_checkpoint(ckpt).inputs == [0, 1, 0]
    train_paths, train_labels, _ = data.load_split(tiny_dir, "train")
    val_paths, _, _ = data.load_split(tiny_dir, "val")
    assert mixed["decodes"] == len(train_paths) + len(val_paths)  # one view: each image once, for 3 members
    cache = checkpoints.load(mixed["out"] / "logits_cache.pt", kind="logits")["members"]
    runtime = engine.resolve_runtime("cpu")
    for path in mixed["members"][:2]:
        member = checkpoints.load(path)
        model = checkpoints.model_from_checkpoint(member)
        cached = cache[utils.file_sha256(path)]
        assert cached["pipeline"] == checkpoints.pipeline_of(member)
        alone = engine.predict_images(model, data.ImageDataset(val_paths, range(len(val_paths)),
                                                               transforms.eval_transform_of(member)),
                                      runtime, batch_size=8, workers=0)
        assert torch.equal(cached["val"], alone), path
        # the train view: the member's own augmentation at its own size, with the seed of each image
        train_set = data.ImageDataset(train_paths, train_labels, transforms.train_transform(
            member["img_size"], mean=member["mean"], std=member["std"]))
        loader = data.make_loader(train_set, device=runtime.device, workers=0,
                                  batch_sampler=ensemble.view_batches(len(train_set), 1, 8, 0))
        (train_alone,), _ = engine.infer([model], loader, runtime)
        assert torch.equal(cached["train"], train_alone), path


def test_predict_gives_each_member_its_pipeline_and_tta_and_decodes_once(mixed, tiny_dir, tmp_path,  # noqa: F811
                                                                         monkeypatch, capsys):
    flags = ["--data-dir", str(tiny_dir), "--save-logits", "--tta", "hflip,scale:1.25", "--workers", "0"]
    decodes = count_decodes(monkeypatch)
    predict.main(["--checkpoint", str(mixed["out"] / "ensemble.pt"), "--out", str(tmp_path / "ens" / "p.csv"),
                  *flags])
    test_paths, _ = data.load_test(tiny_dir / "test")
    assert len(decodes) == len(test_paths)
    assert "(16 classes, eval 32 + 28 px, 2 pipelines: each member its own)" in capsys.readouterr().out
    frame = (tmp_path / "ens" / "p.csv").read_text().splitlines()
    assert frame[0] == "image_name,pred_label" and len(frame) == len(test_paths) + 1
    assert {row.split(",")[1] for row in frame[1:]} <= {str(c) for c in range(16)}
    assert (tmp_path / "ens" / "submission.zip").is_file()
    member_logits = []
    for i, path in enumerate(mixed["members"]):
        predict.main(["--checkpoint", str(path), "--out", str(tmp_path / f"m{i}" / "p.csv"), *flags])
        member_logits.append(torch.load(tmp_path / f"m{i}" / "logits.pt", weights_only=True)["logits"])
    model = checkpoints.model_from_checkpoint(checkpoints.load(mixed["out"] / "ensemble.pt"))
    with torch.no_grad():
        expected = model.head(torch.cat(member_logits, dim=1))
    logits = torch.load(tmp_path / "ens" / "logits.pt", weights_only=True)["logits"]
    assert torch.allclose(logits, expected, atol=1e-5)


def test_members_with_other_class_names_are_refused(mixed, tiny_dir, tmp_path):  # noqa: F811
    other = checkpoints.load(mixed["members"][1])
    checkpoints.save(dict(other, class_names=other["class_names"][::-1]), tmp_path / "reversed.pt")
    first = mixed["members"][0]
    with pytest.raises(UserError) as error:
        ensemble.main(["--members", str(first), str(tmp_path / "reversed.pt"), "--data-dir", str(tiny_dir),
                       "--out-dir", str(tmp_path / "ens")])
    assert str(error.value) == (f"members {first} and {tmp_path / 'reversed.pt'} differ in class names (16 vs 16 "
                                "classes, or another order); ensemble only members trained on the same classes")


def test_export_refuses_a_mixed_ensemble(mixed, tmp_path):
    path = mixed["out"] / "ensemble.pt"
    with pytest.raises(UserError, match=re.escape(
            f"checkpoint {path} is a mixed ensemble (its members take 2 pipelines, eval 32 + 28 px), and an ONNX "
            "graph takes one input; export each member's best.pt instead")):
        export.main([str(path), "--out", str(tmp_path / "e.onnx")])


def test_a_format_3_ensemble_gets_its_one_pipeline(mixed, member_runs, tmp_path):
    members = [checkpoints.ensemble_member(checkpoints.load(member_runs[name] / "best.pt"), name, name * 4)
               for name in ("resnext", "resnext_vit")]
    ckpt = checkpoints.ensemble_checkpoint(members, torch.nn.Linear(32, 16).state_dict(), metrics={})
    del ckpt["pipelines"]
    for entry in ckpt["members"]:
        del entry["pipeline_index"]
    torch.save(dict(ckpt, format="imgcls-checkpoint-3"), tmp_path / "v3.pt")
    loaded = checkpoints.load(tmp_path / "v3.pt", kind="ensemble")
    assert loaded["pipelines"] == [checkpoints.pipeline_of(ckpt)] and loaded["eval_size"] == 32
    assert [entry["pipeline_index"] for entry in loaded["members"]] == [0, 0]


def test_a_mixed_teacher_gets_the_student_batch_in_each_pipeline(mixed, tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    students, teachers = [], []
    build_model, build_teacher = models.build_model, distill.build_teacher

    def student(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: students.append(inputs[0].clone())
                                        if module.training else None)
        return model

    def teacher(*args, **kwargs):
        module = build_teacher(*args, **kwargs)
        module.model.register_forward_pre_hook(lambda module, inputs: teachers.append(inputs[0]))
        return module
    monkeypatch.setattr(models, "build_model", student)
    monkeypatch.setattr(distill, "build_teacher", teacher)
    train.main(distil_flags(tiny_dir, tmp_path / "run", mixed["out"] / "ensemble.pt"))
    pipelines = checkpoints.load(mixed["out"] / "ensemble.pt")["pipelines"]
    student_spec = {"img_size": 32, "mean": transforms.IMAGENET_MEAN, "std": transforms.IMAGENET_STD}
    assert len(students) == len(teachers) == 8  # 8 steps, the teacher on each
    for student_images, batch in zip(students, teachers):
        assert isinstance(batch, tuple) and [x.shape[-1] for x in batch] == [32, 40]
        assert torch.equal(batch[0], student_images)  # the first pipeline is the student's own
        assert torch.equal(batch[1], transforms.renormalize(student_images, student_spec, pipelines[1]))
    assert checkpoints.load(tmp_path / "run" / "last.pt")["teacher"]["kind"] == "ensemble"
