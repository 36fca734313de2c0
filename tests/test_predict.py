"""predict.py: the submission files, their agreement with image-by-image inference, TTA, bad images, labels."""
import re
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import checkpoints
import data
import engine
import predict
import stats
import transforms
import utils
from conftest import run_script
from utils import UserError


@pytest.fixture(scope="module")
def ensemble_ckpt(member_runs, tmp_path_factory):
    """A two-member ensemble checkpoint in ensemble.py's schema, with a random (seeded) head."""
    members = []
    for name in ("resnext", "resnext_freeze"):
        path = member_runs[name] / "best.pt"
        members.append(checkpoints.ensemble_member(checkpoints.load(path, kind="member"), path, sha256=""))
    num_classes = len(members[0]["class_names"])
    torch.manual_seed(0)
    head = nn.Linear(len(members) * num_classes, num_classes)
    ensemble = checkpoints.ensemble_checkpoint(members, head.state_dict(), metrics={})
    path = tmp_path_factory.mktemp("ensemble") / "ensemble.pt"
    checkpoints.save(ensemble, path)
    return path


def demo_stems(demo_dir):
    """The expected image_name column, found independently of data.load_test."""
    return sorted(p.stem for p in (demo_dir / "test").iterdir())


def one_by_one(ckpt_path, paths, flip=False):
    """Logits of each image, read and transformed one at a time (eval_transform), as a per-image loop does.
    One forward pass over the stack gives the same numbers as one per image (eval mode) in less time."""
    ckpt = checkpoints.load(ckpt_path)
    model = checkpoints.model_from_checkpoint(ckpt)
    transform = transforms.eval_transform(ckpt["img_size"], mean=ckpt["mean"], std=ckpt["std"])
    images = torch.stack([transform(path) for path in paths])
    with torch.no_grad():
        return model(images.flip(-1) if flip else images)


def read_csv(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def test_predict_member(member_runs, demo_dir, tmp_path):
    ckpt_path = member_runs["resnext"] / "best.pt"
    out = tmp_path / "sub" / "prediction.csv"
    result = run_script("predict.py", "--checkpoint", ckpt_path, "--data-dir", demo_dir, "--out", out,
                        "--zip", tmp_path / "submission.zip", "--labels", demo_dir / "test_labels.csv",
                        "--topk", "3", "--save-logits", "--batch-size", "20", "--workers", "1")
    stems = demo_stems(demo_dir)
    assert out.read_text().splitlines()[0] == "image_name,pred_label"
    frame = read_csv(out)
    assert frame["image_name"].tolist() == stems

    # the labels are the class folder names of the per-image argmax: "10" for index 10, never index 2
    class_names = checkpoints.load(ckpt_path)["class_names"]
    assert class_names == [str(i) for i in range(16)]
    paths, _ = data.load_test(demo_dir / "test")
    reference = one_by_one(ckpt_path, paths)
    indices = reference.argmax(1).tolist()
    assert max(indices) >= 2  # some index whose numeric and lexicographic names differ
    assert frame["pred_label"].tolist() == [str(i) for i in indices]
    saved = torch.load(out.with_name("logits.pt"), weights_only=True)
    assert saved["image_names"] == stems and saved["class_names"] == class_names
    assert torch.allclose(saved["logits"], reference, atol=1e-4)

    # the zip holds prediction.csv alone, at its root, byte for byte
    with zipfile.ZipFile(tmp_path / "submission.zip") as zf:
        assert zf.namelist() == ["prediction.csv"]
        assert zf.read("prediction.csv") == out.read_bytes()

    # probabilities.csv: K "label:p" pairs per row, most likely first, the softmax of the logits
    top = read_csv(out.with_name("probabilities.csv"))
    assert top.columns.tolist() == ["image_name", "top_k"] and top["image_name"].tolist() == stems
    softmax = reference.softmax(1)
    for row, pred, probs in zip(top["top_k"], frame["pred_label"], softmax):
        pairs = [pair.split(":") for pair in row.split()]
        values = [float(p) for _, p in pairs]
        assert len(pairs) == 3 and pairs[0][0] == pred and all(name in class_names for name, _ in pairs)
        assert values == sorted(values, reverse=True) and sum(values) <= 1
        assert values == pytest.approx([probs[class_names.index(name)].item() for name, _ in pairs], abs=2e-4)

    # the printed accuracy is that of the CSV against the labels file
    truth = dict(read_csv(demo_dir / "test_labels.csv").values)
    correct = sum(truth[name] == label for name, label in frame.values)
    match = re.search(r"accuracy ([\d.]+)% \[([\d.]+), ([\d.]+)\] \(95% Wilson interval\) \((\d+)/(\d+) images",
                      result.stdout)
    assert match and (int(match[4]), int(match[5])) == (correct, len(stems))
    assert float(match[1]) == pytest.approx(100 * correct / len(stems), abs=0.006)
    low, high = stats.wilson_interval(correct, len(stems))
    assert (match[2], match[3]) == (f"{low:.1f}", f"{high:.1f}")


def test_predict_ensemble_with_tta(ensemble_ckpt, demo_dir, tmp_path):
    out = tmp_path / "prediction.csv"
    # the zip goes beside --out unless --zip says where
    run_script("predict.py", "--checkpoint", ensemble_ckpt, "--data-dir", demo_dir, "--out", out,
               "--tta", "hflip", "--save-logits", "--workers", "0")
    stems = demo_stems(demo_dir)
    frame = read_csv(out)
    assert out.read_text().splitlines()[0] == "image_name,pred_label"
    assert frame["image_name"].tolist() == stems
    with zipfile.ZipFile(tmp_path / "submission.zip") as zf:
        assert zf.namelist() == ["prediction.csv"] and zf.read("prediction.csv") == out.read_bytes()

    # hflip averages the logits of the image and of its mirror, each as the ensemble gives them alone
    paths, _ = data.load_test(demo_dir / "test")
    plain, mirrored = one_by_one(ensemble_ckpt, paths), one_by_one(ensemble_ckpt, paths, flip=True)
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(saved["logits"], (plain + mirrored) / 2, atol=1e-4)
    assert not torch.allclose(saved["logits"], plain, atol=1e-3)
    assert frame["pred_label"].tolist() == [str(i) for i in ((plain + mirrored) / 2).argmax(1).tolist()]


def test_labels_map_indices_to_class_names(demo_dir):
    class_names = data.find_classes(demo_dir / "train")  # numeric order: index 10 is "10", index 2 is "2"
    logits = torch.zeros(2, 16)
    logits[0, 10] = logits[1, 2] = 1
    assert predict.labels_of(logits, class_names) == ["10", "2"]


def test_unreadable_test_image(member_runs, demo_dir, tmp_path, monkeypatch, capsys):
    test_dir = tmp_path / "test"
    shutil.copytree(demo_dir / "test", test_dir)
    bad = next(p for p in sorted(test_dir.iterdir()) if p.suffix == ".jpg")
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    out, zip_path = tmp_path / "prediction.csv", tmp_path / "submission.zip"
    out.write_text("previous\n")
    zip_path.write_bytes(b"previous")
    argv = ["predict.py", "--checkpoint", str(member_runs["resnext"] / "best.pt"), "--test-dir", str(test_dir),
            "--out", str(out), "--zip", str(zip_path), "--workers", "0"]

    # in this process, through run_main as `python predict.py` does: exit 2 and one line, no traceback
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(predict.main, argv[1:])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert str(bad) in stderr and "--skip-bad" in stderr
    assert out.read_text() == "previous\n" and zip_path.read_bytes() == b"previous"

    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        predict.main(argv[1:] + ["--skip-bad", "--labels", str(demo_dir / "test_labels.csv")])
    captured = capsys.readouterr()
    assert re.search(rf"warning: 1 unreadable .*: {re.escape(bad.name)}$", captured.err, re.MULTILINE)
    assert read_csv(out)["image_name"].tolist() == [s for s in demo_stems(demo_dir) if s != bad.stem]
    assert re.search(r"accuracy [\d.]+% \[[\d.]+, [\d.]+\] \(95% Wilson interval\) \(\d+/95 images", captured.out)


def test_image_unreadable_after_the_scan_is_an_error(member_runs, demo_dir, tmp_path):
    """The dataset would read the next image in its place, shifting every later prediction."""
    paths = [shutil.copy(p, tmp_path) for p in data.list_images(demo_dir / "test")[:3]]
    ckpt = checkpoints.load(member_runs["resnext"] / "best.pt")
    model = checkpoints.model_from_checkpoint(ckpt)
    Path(paths[1]).write_text("not an image any more\n")
    with pytest.warns(UserWarning), pytest.raises(UserError, match=re.escape(str(paths[1]))):
        dataset = data.ImageDataset(paths, range(3), transforms.eval_transform(ckpt["img_size"], mean=ckpt["mean"],
                                                                               std=ckpt["std"]))
        engine.predict_images(model, dataset, engine.resolve_runtime("cpu"), batch_size=2, workers=0, desc=None)


def test_labels_file_errors(tmp_path):
    stems, class_names = ["a", "b"], ["0", "1"]
    path = tmp_path / "labels.csv"
    path.write_text("image_name,label\na,1\nb,0\nextra,1\n")
    assert predict.read_labels(path, stems, class_names) == ["1", "0"]
    for text, message in (("image_name,label\na,1\n", "no label for 1 of the 2 test images"),
                          ("image_name,label\na,1\nb,7\n", "not classes of the checkpoint"),
                          ("image_name,label\na,1\na,0\nb,0\n", "more than once"),
                          ("name,class\na,1\n", "needs the columns image_name,label")):
        path.write_text(text)
        with pytest.raises(UserError, match=message) as error:
            predict.read_labels(path, stems, class_names)
        assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        predict.read_labels(tmp_path / "missing.csv", stems, class_names)


def test_check_submission_refuses_incomplete_frames():
    stems, class_names = ["a", "b"], ["0", "1"]
    predict.check_submission(pd.DataFrame({"image_name": stems, "pred_label": ["1", "0"]}), stems, class_names)
    for names, labels in ((["a"], ["1"]), (["a", "a"], ["1", "1"]), (["a", "b"], ["1", "5"])):
        with pytest.raises(RuntimeError, match="nothing was written"):
            predict.check_submission(pd.DataFrame({"image_name": names, "pred_label": labels}), stems,
                                     class_names)


def test_cli_mistakes(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="run ensemble.py first"):
        predict.main([])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun"):
        predict.main([])


def test_inference_batch_size_depends_on_the_device():
    assert engine.resolve_batch_size(-1, torch.device("cpu")) == 8
    assert engine.resolve_batch_size(-1, torch.device("cuda")) == 64
    assert engine.resolve_batch_size(20, torch.device("cpu")) == 20
    with pytest.raises(UserError, match=r"^--batch-size 0 must be at least 1 \(or -1: 64 on a GPU, 8 on the CPU\)$"):
        engine.resolve_batch_size(0, torch.device("cuda"))


def test_ctrl_c_is_one_line_and_leaves_the_previous_files(member_runs, demo_dir, tmp_path, monkeypatch, capsys):
    out, zip_path = tmp_path / "prediction.csv", tmp_path / "submission.zip"
    out.write_text("previous\n")
    zip_path.write_bytes(b"previous")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "predict_images", interrupted)
    argv = ["--checkpoint", member_runs["resnext"] / "best.pt", "--data-dir", demo_dir, "--out", out, "--zip", zip_path]
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(predict.main, [str(a) for a in argv])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip() == ("interrupted: every file is written whole or not at all, so none "
                                               "is left half-written")
    assert out.read_text() == "previous\n" and zip_path.read_bytes() == b"previous"
