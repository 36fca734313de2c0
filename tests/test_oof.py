"""ensemble.py on fold runs: out-of-fold logits, the cross-validated head, the fold ensemble at test time,
--reference-members, and report.py's fold table."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import checkpoints
import data
import engine
import ensemble
import predict
import report
import transforms
from conftest import FOLD_TYPES
from utils import UserError

TYPES = sorted(FOLD_TYPES)  # the order of the groups, and of their logits before the head


def best(fold_runs, name, fold):
    return fold_runs[(name, fold)] / "best.pt"


def stack(members, demo_dir, out, *flags):
    return ensemble.main([str(a) for a in ("--members", *members, "--data-dir", demo_dir, "--out-dir", out,
                                           "--epochs", "2", *flags)])


def pooled(demo_dir):
    """The pooled train/ + val/ images, as train.py --folds pools them: (paths, labels, names)."""
    train_paths, train_labels, class_names = data.load_split(demo_dir, "train")
    val_paths, val_labels, _ = data.load_split(demo_dir, "val", class_names)
    paths, labels = train_paths + val_paths, train_labels + val_labels
    return paths, labels, [p.relative_to(demo_dir).as_posix() for p in paths]


@pytest.fixture(scope="module")
def fold_ensemble(fold_runs, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fold_ensemble")
    metrics = stack([path / "best.pt" for path in fold_runs.values()], demo_dir, out)
    return out, metrics


def test_groups_are_found_in_any_order_and_the_cache_is_reused(fold_ensemble, fold_runs, demo_dir, tmp_path):
    out, metrics = fold_ensemble
    ckpt = checkpoints.load(out / "ensemble.pt", kind="ensemble")
    assert [(g["model"], g["fold"]) for g in ckpt["groups"]] == [(name, [0, 1]) for name in TYPES]
    for group in ckpt["groups"]:
        assert [ckpt["members"][i]["source"] for i in group["entries"]] == \
            [str(best(fold_runs, group["model"], fold)) for fold in (0, 1)]
    assert metrics["folds"]["images"] == metrics["val_images"] == 800 and metrics["cache"]["computed"] == 4
    shutil.copytree(out, tmp_path / "again")
    shuffled = [best(fold_runs, name, fold) for fold, name in ((1, "resnext_freeze"), (0, "resnext"),
                                                               (0, "resnext_freeze"), (1, "resnext"))]
    again = stack(shuffled, demo_dir, tmp_path / "again")
    assert again["cache"] == {"reused": 4, "computed": 0}
    same = {key: value for key, value in again.items() if key not in ("seconds", "cache")}
    assert same == {key: value for key, value in metrics.items() if key not in ("seconds", "cache")}
    head = checkpoints.load(tmp_path / "again" / "ensemble.pt")["head_state_dict"]
    assert all(torch.equal(head[key], ckpt["head_state_dict"][key]) for key in head)


def planted_members(fold_runs, folder):
    """Copies of the fold runs whose logits are a constant vector naming the model: argmax 4 * type + fold."""
    paths = {}
    for (name, fold), run in fold_runs.items():
        ckpt = checkpoints.load(run / "best.pt")
        marker = 4 * TYPES.index(name) + fold
        for key in ("state_dict", "ema_state_dict"):
            if ckpt[key] is not None:
                ckpt[key]["fc.weight"].zero_()
                ckpt[key]["fc.bias"] = 10 * torch.nn.functional.one_hot(torch.tensor(marker), 16).float()
        paths[(name, fold)] = folder / f"{name}_fold{fold}.pt"
        checkpoints.save(ckpt, paths[(name, fold)])
    return paths


def test_no_out_of_fold_row_comes_from_a_model_that_trained_on_its_image(fold_runs, demo_dir, tmp_path):
    planted = planted_members(fold_runs, tmp_path)
    members, ckpts = ensemble.load_members(list(planted.values()))
    groups = ensemble.fold_groups(members, ckpts)
    paths, labels, names = pooled(demo_dir)
    fold_of = ensemble.pooled_folds(demo_dir, paths, labels, members, ckpts)
    pool_set = data.ImageDataset(paths, labels, transforms.eval_transform(32))
    cached = ensemble.held_out_logits([(m, c["folds"]["fold"]) for m, c in zip(members, ckpts)], pool_set, fold_of,
                                      batch_size=64, runtime=engine.resolve_runtime("cpu"), workers=0)
    oof, source_fold = ensemble.out_of_fold(groups, members, cached, len(paths), 16)
    covered = []
    for fold in (0, 1):
        trained_on, held_out, _ = data.fold_split(names, labels, 2, fold, seed=0)  # as train.py split fold `fold`
        covered += held_out
        for g, name in enumerate(TYPES):
            # the marker says which model produced each row: the one of this fold, which never saw these images
            assert (oof[g, held_out].argmax(1) == 4 * g + fold).all()
            assert (source_fold[g, held_out] == fold).all()
            assert not set(held_out) & set(trained_on)
    assert sorted(covered) == list(range(len(paths)))  # every image, once per group

    metrics = stack(list(planted.values()), demo_dir, tmp_path / "ens", "--epochs", "0")
    labels = np.array(labels)
    for g, group in enumerate(metrics["folds"]["groups"]):
        expected = 100 * np.mean(labels == 4 * g + fold_of.numpy())  # right only where the label is the marker
        assert group["model"] == TYPES[g] and group["oof_acc"] == pytest.approx(expected)


def changed_copy(source, path, change):
    ckpt = checkpoints.load(source)
    change(ckpt)
    checkpoints.save(ckpt, path)
    return path


def test_incomplete_or_mismatched_cross_validations_are_one_line_errors(fold_runs, demo_dir, tmp_path):
    every = [best(fold_runs, name, fold) for name in TYPES for fold in (0, 1)]
    first = str(every[0])

    def bump(ckpt):
        ckpt["state_dict"]["fc.bias"] += 1e-3

    def three_folds(ckpt):
        ckpt["folds"]["folds"] = 3

    def other_images(ckpt):
        ckpt["folds"]["held_out_sha256"] = "0" * 64

    cases = [
        (every[:3], [], r"member type resnext_freeze \(resnet10t\) lacks fold 1 of 2 \(--folds 2 --fold-seed 0\); "
                        r"pass every fold's best.pt, training the missing ones first"),
        (every + [changed_copy(every[0], tmp_path / "k3.pt", three_folds)], [],
         f"members {first} \\(--folds 2 --fold-seed 0\\) and {tmp_path / 'k3.pt'} \\(--folds 3 --fold-seed 0\\) "
         "come from different cross-validations; every fold run of one ensemble needs the same --folds and "
         "--fold-seed"),
        (every + [changed_copy(every[0], tmp_path / "again.pt", bump)], [],
         f"member type resnext \\(resnet10t\\) has fold 0 twice \\({first} and {tmp_path / 'again.pt'}\\); pass each "
         "fold's best.pt once"),
        ([changed_copy(every[0], tmp_path / "moved.pt", other_images)] + every[1:], [],
         f"member {tmp_path / 'moved.pt'} held out other images than fold 0 of {demo_dir}'s pooled train/ and val/ "
         r"\(--folds 2 --fold-seed 0\): images were added, removed or became unreadable since it trained, or it "
         "trained on other data; point --data-dir at the data it was trained on"),
        (every, ["--views", "2"], "--views 2 applies to members trained without --folds; the head of fold members "
                                  r"learns from their held-out images' logits \(eval transform\); leave --views out"),
    ]
    for members, flags, message in cases:
        with pytest.raises(UserError, match=f"^{message}$"):
            stack(members, demo_dir, tmp_path / "ens", *flags)
        assert not (tmp_path / "ens" / "ensemble.pt").exists()


def test_predict_writes_a_valid_submission_of_head_over_fold_averages(fold_ensemble, fold_runs, demo_dir, tmp_path):
    out, _ = fold_ensemble
    predict.main([str(a) for a in ("--checkpoint", out / "ensemble.pt", "--data-dir", demo_dir, "--out",
                                   tmp_path / "prediction.csv", "--save-logits")])
    frame = pd.read_csv(tmp_path / "prediction.csv", dtype=str)
    test_paths = data.list_images(demo_dir / "test")
    assert sorted(frame["image_name"]) == sorted(p.stem for p in test_paths) and frame["image_name"].is_unique
    ckpt = checkpoints.load(out / "ensemble.pt")
    assert set(frame["pred_label"]) <= set(ckpt["class_names"])

    transform = transforms.eval_transform(32)
    images = torch.stack([transform(str(p)) for p in sorted(test_paths, key=lambda p: p.stem)])
    with torch.no_grad():
        fold_models = {key: checkpoints.model_from_checkpoint(checkpoints.load(run / "best.pt"))
                       for key, run in fold_runs.items()}
        per_type = [torch.stack([fold_models[(name, fold)](images) for fold in (0, 1)]).mean(0) for name in TYPES]
        head = torch.nn.Linear(2 * 16, 16)
        head.load_state_dict(ckpt["head_state_dict"])
        expected = head(torch.cat(per_type, dim=1))
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.allclose(saved["logits"], expected, atol=1e-4)
    assert list(frame["pred_label"]) == [ckpt["class_names"][i] for i in expected.argmax(1)]


def test_reference_members_round_trip_and_a_changed_or_missing_file(fold_ensemble, fold_runs, demo_dir, tmp_path):
    out, _ = fold_ensemble
    copies = []
    for (name, fold), run in fold_runs.items():
        copies.append(tmp_path / "members" / f"{name}_fold{fold}.pt")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(run / "best.pt", copies[-1])
    (tmp_path / "ref").mkdir()
    shutil.copy(out / "logits_cache.pt", tmp_path / "ref")  # the copies have the same SHA-256: reused
    metrics = stack(copies, demo_dir, tmp_path / "ref", "--reference-members")
    assert metrics["cache"]["reused"] == 4
    ref = checkpoints.load(tmp_path / "ref" / "ensemble.pt")
    assert all(m["state_dict"] is None for m in ref["members"])
    assert sorted(m["reference"] for m in ref["members"]) == sorted(str(p.resolve()) for p in copies)
    assert (tmp_path / "ref" / "ensemble.pt").stat().st_size < (out / "ensemble.pt").stat().st_size / 100
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = checkpoints.model_from_checkpoint(checkpoints.load(out / "ensemble.pt"))(images)
        assert torch.equal(checkpoints.model_from_checkpoint(ref)(images), expected)

    copies[1].write_bytes(copies[1].read_bytes() + b"\0")
    with pytest.raises(UserError, match=f"^ensemble member {copies[1].resolve()} has changed since ensemble.py "
                       r"referenced it \(another SHA-256\); put the original back, or rerun ensemble.py with the new "
                       "file$"):
        predict.main([str(a) for a in ("--checkpoint", tmp_path / "ref" / "ensemble.pt", "--data-dir", demo_dir,
                                       "--out", tmp_path / "prediction.csv")])
    copies[1].unlink()
    with pytest.raises(UserError, match=f"^ensemble member {copies[1].resolve()} does not exist"):
        checkpoints.model_from_checkpoint(ref)
    assert not (tmp_path / "prediction.csv").exists()


def test_an_ensemble_written_before_fold_members_still_loads(fold_ensemble, tmp_path):
    out, _ = fold_ensemble
    ckpt = checkpoints.load(out / "ensemble.pt")
    # format 2: no groups, no references, no stored eval pipeline
    dropped = ("reference", "eval_size", "interpolation", "crop_pct")
    old = dict(ckpt, format="imgcls-checkpoint-2",
               members=[{k: v for k, v in m.items() if k not in dropped} for m in ckpt["members"][:2]])
    del old["groups"]
    old["head_state_dict"] = ensemble.averaging_head(2, 16).state_dict()
    torch.save(old, tmp_path / "old.pt")
    loaded = checkpoints.load(tmp_path / "old.pt")
    assert loaded["groups"] is None and [m["reference"] for m in loaded["members"]] == [None, None]
    model = checkpoints.model_from_checkpoint(loaded)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first, second = (checkpoints.build_member(m, m["state_dict"]).eval()(images) for m in ckpt["members"][:2])
        assert torch.allclose(model(images), (first + second) / 2, atol=1e-5)


def test_report_fold_table(fold_ensemble, fold_runs, demo_dir, tmp_path):
    out, metrics = fold_ensemble
    runs = tmp_path / "runs"
    shutil.copytree(out, runs / "ens")
    with pytest.raises(UserError, match=r"^--cam 1: the analysed model .*ensemble.pt is a fold ensemble"):
        report.main([str(runs), "--cam", "1"])
    report.main([str(runs)])
    (run,) = json.loads((runs / "report.json").read_text())["runs"]
    text = (runs / "report.md").read_text()
    for table, name in zip(run["fold_tables"], TYPES):
        accs = [checkpoints.load(best(fold_runs, name, fold))["best_acc"] for fold in (0, 1)]
        assert table["model"] == name and [row["val_acc"] for row in table["rows"]] == accs
        assert table["mean"] == pytest.approx(np.mean(accs)) and table["sd"] == pytest.approx(np.std(accs, ddof=1))
        assert f"{name} (resnet10t): mean {np.mean(accs):.2f}, standard deviation {np.std(accs, ddof=1):.2f} " \
               "over the folds." in text
    expected = [group["oof_acc"] for group in metrics["folds"]["groups"]]
    expected += [metrics["logit_average_val_acc"], metrics["head_val_acc"]]
    assert [row["val_acc"] for row in run["oof"]] == pytest.approx(expected)
    head = metrics["head_val_acc"], metrics["head_val_acc_low"], metrics["head_val_acc_high"]
    assert "| trained head (cross-validated over the 2 folds) | %.2f [%.1f, %.1f] |" % head in text
    assert "the val figures of this section are in-sample" in text
