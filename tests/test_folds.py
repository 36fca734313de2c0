import json

import pytest

import checkpoints
import data
import demo_data
from conftest import TINY_TRAIN, train_here
from utils import UserError


def test_folds_are_stratified_disjoint_cover_every_image_and_fixed_by_the_seed():
    labels = [label for label, count in enumerate((10, 7, 5)) for _ in range(count)]  # 22 images
    names = [f"img{i}" for i in range(len(labels))]
    held = [data.fold_split(names, labels, 4, fold, seed=3)[1] for fold in range(4)]
    assert sorted(i for fold in held for i in fold) == list(range(len(labels)))  # disjoint and covering
    sizes = [len(fold) for fold in held]
    assert max(sizes) - min(sizes) <= 1
    for label, count in enumerate((10, 7, 5)):
        per_fold = [sum(labels[i] == label for i in fold) for fold in held]
        assert max(per_fold) - min(per_fold) <= 1 and sum(per_fold) == count
    train, held_out, digest = data.fold_split(names, labels, 4, 2, seed=3)
    assert sorted(train + held_out) == list(range(len(labels))) and held_out == held[2]
    assert data.fold_split(names, labels, 4, 2, seed=3) == (train, held_out, digest)
    assert data.fold_split(names, labels, 4, 2, seed=4)[1] != held_out


@pytest.fixture(scope="module")
def fold_data(tmp_path_factory):
    """48 pooled images (2 train + 1 val per class)."""
    return demo_data.make_demo(tmp_path_factory.mktemp("folds") / "data", train_per_class=2, val_per_class=1,
                               test_per_class=0)


def fold_run(fold_data, out, *extra):
    train_here(["python", "train.py", "--model", "resnext", "--data-dir", fold_data, "--out-dir", out,
                *TINY_TRAIN, "--folds", "3", "--fold", "1", "--fold-seed", "5", *extra])


def test_fold_run_validates_on_its_held_out_fold_and_resume_keeps_it(fold_data, tmp_path):
    out = tmp_path / "run"
    fold_run(fold_data, out, "--epochs", "2", "--stop-after", "1")
    paths, labels, _ = data.list_split(fold_data, "train")
    val_paths, val_labels, _ = data.list_split(fold_data, "val")
    names = [p.relative_to(fold_data).as_posix() for p in paths + val_paths]
    train, held_out, digest = data.fold_split(names, labels + val_labels, 3, 1, seed=5)
    ckpt = checkpoints.load(out / "last.pt")
    assert ckpt["folds"] == {"folds": 3, "fold": 1, "fold_seed": 5, "held_out_sha256": digest}
    config = json.loads((out / "config.json").read_text())
    assert (config["train_images"], config["val_images"]) == (len(train), len(held_out)) == (32, 16)
    train_here(["python", "train.py", "--resume", out / "last.pt", "--workers", "0"])
    resumed = checkpoints.load(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["folds"] == ckpt["folds"]
    assert resumed["args"]["folds"] == 3 and resumed["args"]["fold"] == 1


def test_resume_refuses_another_held_out_fold(fold_data, tmp_path):
    out = tmp_path / "run"
    fold_run(fold_data, out, "--epochs", "2", "--stop-after", "1")
    ckpt = checkpoints.load(out / "last.pt")
    ckpt["folds"]["held_out_sha256"] = "0" * 64  # as if the data had changed since
    checkpoints.save(ckpt, out / "last.pt")
    with pytest.raises(UserError, match="the held-out fold of .* is not the one this run validated on"):
        train_here(["python", "train.py", "--resume", out / "last.pt", "--workers", "0"])


@pytest.mark.parametrize("flags", [("--folds", "1"), ("--folds", "3", "--fold", "3"), ("--fold", "2")])
def test_bad_fold_flags_are_one_line_errors(fold_data, tmp_path, flags):
    with pytest.raises(UserError, match="need --folds of at least 2 and --fold from 0 to --folds minus 1"):
        train_here(["python", "train.py", "--model", "resnext", "--data-dir", fold_data, "--out-dir",
                    tmp_path / "run", *TINY_TRAIN, "--epochs", "1", *flags])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_ensemble_refuses_a_fold_run_mixed_with_a_plain_run(fold_data, member_runs, tmp_path):
    import ensemble
    out = tmp_path / "run"
    fold_run(fold_data, out, "--epochs", "1")
    with pytest.raises(UserError, match=r"^members .*resnext/best.pt \(trained on train/\) and .*last.pt \(fold 1 of "
                       r"3\) mix a plain run with a --folds run; stack plain runs alone, or every fold's best.pt of "
                       "each member type$"):
        ensemble.main([str(a) for a in ("--members", member_runs["resnext"] / "best.pt", out / "last.pt",
                                        "--data-dir", fold_data, "--out-dir", tmp_path / "ens")])
    assert not (tmp_path / "ens" / "ensemble.pt").exists()
