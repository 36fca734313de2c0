import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script

import checkpoints
import data
import ensemble
import models
import stats
import transforms
import utils


def member_paths(member_runs):
    return [member_runs[name] / "best.pt" for name in models.MODEL_NAMES]


def run_ensemble(members, data_dir, out_dir, *flags):
    return ensemble.main(["--members", *map(str, members), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
                          "--workers", "0", *flags])


@pytest.fixture(scope="module")
def ensembled(member_runs, demo_dir, tmp_path_factory):
    """The three demo members ensembled with the defaults: (out_dir, metrics, member file hashes before)."""
    members = member_paths(member_runs)
    hashes = [utils.file_sha256(p) for p in members]
    out_dir = tmp_path_factory.mktemp("ensemble")
    return out_dir, run_ensemble(members, demo_dir, out_dir), hashes


@pytest.fixture
def small_data(demo_dir, tmp_path):
    """A copy of the demo data with 3 train and 2 val images per class (all classes): cheap to recompute."""
    for split, count in (("train", 3), ("val", 2)):
        for folder in sorted((demo_dir / split).iterdir()):
            (tmp_path / "data" / split / folder.name).mkdir(parents=True)
            for path in data.list_images(folder)[:count]:
                shutil.copy2(path, tmp_path / "data" / split / folder.name / path.name)
    return tmp_path / "data"


def test_head_is_as_good_as_the_members_and_rebuilds_from_its_file(ensembled, demo_dir):
    out_dir, metrics, _ = ensembled
    assert metrics["views"] == 1 and metrics["epochs"] == 20 and len(metrics["history"]) == 20
    assert metrics["head_val_acc"] >= max(m["val_acc"] for m in metrics["members"]) - 1
    assert checkpoints.load(out_dir / "ensemble.pt", kind="ensemble")["metrics"]["head_val_acc"] == \
        metrics["head_val_acc"]
    # predict needs ensemble.pt alone: rebuild it and score val from the images
    ckpt = checkpoints.load(out_dir / "ensemble.pt", kind="ensemble")
    model = checkpoints.model_from_checkpoint(ckpt)
    paths, labels, _ = data.load_split(demo_dir, "val", ckpt["class_names"])
    transform = transforms.eval_transform(ckpt["img_size"], mean=ckpt["mean"], std=ckpt["std"])
    val_set = data.ImageDataset(paths, labels, transform)
    loader = data.make_loader(val_set, device=torch.device("cpu"), workers=0, batch_size=64)
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    assert 100 * correct / len(val_set) == pytest.approx(metrics["head_val_acc"])


def test_accuracies_have_intervals_and_the_ensemble_a_paired_test(ensembled):
    out_dir, metrics, _ = ensembled
    ckpt = checkpoints.load(out_dir / "ensemble.pt", kind="ensemble")
    cached = checkpoints.load(out_dir / "logits_cache.pt", kind="logits")["members"]
    val = torch.stack([cached[m["sha256"]]["val"] for m in ckpt["members"]])  # (M, V, C)
    labels = cached[ckpt["members"][0]["sha256"]]["val_labels"]
    head = ensemble.averaging_head(*val.shape[::2])
    head.load_state_dict(ckpt["head_state_dict"])
    with torch.no_grad():
        head_right = head(torch.cat(list(val), dim=1)).argmax(1) == labels
    member_right = val.argmax(-1) == labels
    n = metrics["val_images"]
    assert len(labels) == n

    def assert_interval(values, key, right):
        assert values[key] == pytest.approx(100 * right.sum().item() / n)
        assert (values[f"{key}_low"], values[f"{key}_high"]) == stats.wilson_interval(int(right.sum()), n)

    for key, right in (("head_val_acc", head_right), ("val_acc", head_right),
                       ("logit_average_val_acc", val.mean(0).argmax(1) == labels),
                       ("softmax_average_val_acc", val.softmax(-1).mean(0).argmax(1) == labels)):
        assert_interval(metrics, key, right)
    for row, right in zip(metrics["members"], member_right):
        assert_interval(row, "val_acc", right)
    assert all(row["val_acc_low"] <= row["val_acc"] <= row["val_acc_high"] for row in metrics["history"])

    # McNemar: the ensemble in ensemble.pt against the member that scored highest on the same images
    best = int(member_right.sum(1).argmax())
    paired = metrics["paired"]
    assert paired["best_member"]["path"] == ckpt["members"][best]["source"]
    assert paired["best_member"]["val_acc"] == max(row["val_acc"] for row in metrics["members"])
    ensemble_only = int((head_right & ~member_right[best]).sum())
    member_only = int((member_right[best] & ~head_right).sum())
    counts = (paired["ensemble_right_member_wrong"], paired["ensemble_wrong_member_right"])
    assert counts == (ensemble_only, member_only)
    assert paired["mcnemar_p"] == stats.mcnemar_exact(ensemble_only, member_only)


def test_members_stay_bit_identical(ensembled, member_runs):
    out_dir, _, hashes_before = ensembled
    assert [utils.file_sha256(p) for p in member_paths(member_runs)] == hashes_before
    ckpt = checkpoints.load(out_dir / "ensemble.pt", kind="ensemble")
    for member, path in zip(ckpt["members"], member_paths(member_runs)):
        expected = checkpoints.inference_state_dict(checkpoints.load(path, kind="member"))
        assert member["source"] == str(path) and member["state_dict"].keys() == expected.keys()
        assert any(key.endswith("running_mean") for key in expected)  # BN statistics are compared too
        for key, value in expected.items():
            assert torch.equal(member["state_dict"][key], value), key


def test_initial_head_is_the_logit_average(ensembled, member_runs, demo_dir, tmp_path):
    out_dir, metrics, _ = ensembled
    cache = checkpoints.load(out_dir / "logits_cache.pt", kind="logits")
    val = torch.stack([entry["val"] for entry in cache["members"].values()])  # (M, V, C)
    num_members, _, num_classes = val.shape
    head = ensemble.averaging_head(num_members, num_classes)
    with torch.no_grad():
        torch.testing.assert_close(head(torch.cat(list(val), dim=1)), val.mean(0))
    # --epochs 0 keeps that head; the cache travels with its file
    shutil.copy2(out_dir / "logits_cache.pt", tmp_path / "logits_cache.pt")
    untrained = run_ensemble(member_paths(member_runs), demo_dir, tmp_path, "--epochs", "0")
    assert untrained["cache"] == {"reused": 3, "computed": 0}
    assert untrained["head_val_acc"] == untrained["logit_average_val_acc"] == metrics["logit_average_val_acc"]
    saved = checkpoints.load(tmp_path / "ensemble.pt", kind="ensemble")["head_state_dict"]
    assert torch.equal(saved["weight"], head.weight) and not saved["bias"].any()


def test_combiner_average_and_the_warning_when_the_head_is_worse(ensembled, member_runs, demo_dir, tmp_path,
                                                                 monkeypatch):
    out_dir, metrics, _ = ensembled
    assert metrics["combiner"] == "head" and metrics["val_acc"] == metrics["head_val_acc"]
    shutil.copy2(out_dir / "logits_cache.pt", tmp_path / "logits_cache.pt")

    def head_that_forgets(head, *args, **kwargs):  # a head that trained badly: it predicts one class
        with torch.no_grad():
            head.weight.zero_()
        return []

    monkeypatch.setattr(ensemble, "train_head", head_that_forgets)
    with pytest.warns(UserWarning, match=r"^the trained head \([\d.]+\) is below the plain logit average "
                      r"\([\d.]+\) on val: .*; --combiner average makes ensemble.pt use the average$"):
        worse = run_ensemble(member_paths(member_runs), demo_dir, tmp_path)
    assert worse["head_val_acc"] < worse["logit_average_val_acc"]
    # the fix the warning names: ensemble.pt then holds the average, whatever the trained head did
    average = run_ensemble(member_paths(member_runs), demo_dir, tmp_path, "--combiner", "average")
    assert average["combiner"] == "average" and average["val_acc"] == metrics["logit_average_val_acc"]
    ckpt = checkpoints.load(tmp_path / "ensemble.pt", kind="ensemble")
    expected = ensemble.averaging_head(3, len(ckpt["class_names"])).state_dict()
    assert ckpt["combiner"] == "average" and all(torch.equal(ckpt["head_state_dict"][k], v)
                                                 for k, v in expected.items())


def test_cache_is_reused_and_invalidated(member_runs, small_data, tmp_path, capsys):
    members = member_paths(member_runs)
    changing = tmp_path / "changing.pt"
    shutil.copy2(members[2], changing)
    members[2] = changing
    out_dir = tmp_path / "out"
    assert run_ensemble(members, small_data, out_dir, "--epochs", "1")["cache"] == {"reused": 0, "computed": 3}
    metrics = run_ensemble(members, small_data, out_dir, "--epochs", "1")
    assert metrics["cache"] == {"reused": 3, "computed": 0}
    out = capsys.readouterr().out
    assert "logits cache: reused for all 3 members" in out
    interval = stats.interval_text(metrics["logit_average_val_acc_low"], metrics["logit_average_val_acc_high"])
    assert re.search(rf"^logit average +{metrics['logit_average_val_acc']:.2f}  {re.escape(interval)}$", out,
                     re.MULTILINE)
    paired = metrics["paired"]
    assert (f"paired on the same 32 val images: the ensemble (stacking head) is right on "
            f"{paired['ensemble_right_member_wrong']} image") in out
    assert f"(McNemar exact p = {paired['mcnemar_p']:.3g})" in out

    # a member file changes: that member alone is recomputed, with the weights its checkpoint chose (EMA)
    ckpt = checkpoints.load(changing, kind="member")
    ckpt["ema_state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    ckpt["use_ema"] = True
    utils.atomic_save_torch(ckpt, changing)
    assert run_ensemble(members, small_data, out_dir, "--epochs", "1")["cache"] == {"reused": 2, "computed": 1}
    saved = checkpoints.load(out_dir / "ensemble.pt", kind="ensemble")["members"][2]
    assert saved["use_ema"]
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in ckpt["ema_state_dict"].items())

    # the data changes (one image rewritten): everything is recomputed
    image = data.list_images(small_data / "train" / "0")[0]
    image.write_bytes(data.list_images(small_data / "train" / "1")[0].read_bytes())
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert run_ensemble(members, small_data, out_dir, "--epochs", "1")["cache"] == {"reused": 0, "computed": 3}
    assert "the data, --views" in capsys.readouterr().out


def altered_member(path, out_path, **changes):
    ckpt = checkpoints.load(path, kind="member")
    ckpt.update(changes)
    utils.atomic_save_torch(ckpt, out_path)
    return out_path


def test_members_of_other_classes_are_a_one_line_error(member_runs, demo_dir, tmp_path):
    good = member_runs["resnext"] / "best.pt"
    names = checkpoints.load(good)["class_names"]
    other = altered_member(member_runs["resnext_vit"] / "best.pt", tmp_path / "other.pt",
                           class_names=names[:-1] + ["cat"])
    result = run_script("ensemble.py", "--members", good, other, "--data-dir", demo_dir, "--out-dir", tmp_path / "out",
                        check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
    assert f"members {good} and {other} differ in class names" in result.stderr
    assert not (tmp_path / "out" / "ensemble.pt").exists()


def test_other_user_errors(member_runs, demo_dir, tmp_path, monkeypatch):
    good = member_runs["resnext"] / "best.pt"
    bigger = altered_member(member_runs["resnext_vit"] / "best.pt", tmp_path / "bigger.pt", img_size=64)
    with pytest.raises(utils.UserError, match="lists 1 checkpoint"):
        run_ensemble([good], demo_dir, tmp_path / "out")
    with pytest.raises(utils.UserError, match="are the same weights"):
        run_ensemble([good, good], demo_dir, tmp_path / "out")
    with monkeypatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        with pytest.raises(utils.UserError, match="ensemble.py runs in one process"):
            run_ensemble([good, bigger], demo_dir, tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # no runs/ here: the first default member is missing
    missing = Path("runs") / "resnext" / "best.pt"
    with pytest.raises(utils.UserError, match=re.escape(f"member checkpoint {missing} does not exist; train it first")):
        ensemble.main(["--data-dir", str(demo_dir)])


def test_help_shows_every_default():
    parser = ensemble.get_args_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert parser.format_help().count("(default:") == len(flags)
