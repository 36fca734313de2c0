"""report.py on runs made from the demo data: every table value equals the histories or a recomputation from
the checkpoints, the figures have their sizes, incomplete runs are labelled."""
import json
import os
import re
import shutil

import pandas as pd
import pytest
import torch
from PIL import Image

import checkpoints
import data
import demo_data
import ensemble
import models
import report
import stats
import transforms
import utils


@pytest.fixture(scope="module")
def runs_dir(member_runs, demo_dir, tmp_path_factory):
    """The members (hard links: the fixture's files are never written), an ensemble of them, and incomplete
    runs: one that crashed after epoch 1 and lost last.pt, one whose last.pt is garbage, one with only its
    config.json, an ensemble without ensemble.pt; reported once, with --cam 1, over a Grad-CAM pair figure of
    an earlier report."""
    runs = tmp_path_factory.mktemp("report") / "runs"
    for name, folder in member_runs.items():
        shutil.copytree(folder, runs / name, copy_function=os.link)
    crashed = runs / "crashed"
    shutil.copytree(member_runs["resnext"], crashed, copy_function=os.link)
    (crashed / "last.pt").unlink()
    history = pd.read_csv(crashed / "history.csv")
    (crashed / "history.csv").unlink()  # a new file, not the linked one
    history.head(1).to_csv(crashed / "history.csv", index=False)
    corrupt = runs / "corrupt"
    shutil.copytree(member_runs["resnext"], corrupt, copy_function=os.link)
    (corrupt / "last.pt").unlink()
    (corrupt / "last.pt").write_bytes(b"not a checkpoint")
    (runs / "started").mkdir()
    shutil.copyfile(member_runs["resnext"] / "config.json", runs / "started" / "config.json")
    ensemble.main(["--members", *(str(folder / "best.pt") for folder in member_runs.values()),
                   "--data-dir", str(demo_dir), "--out-dir", str(runs / "ensemble"), "--views", "1", "--epochs", "3",
                   "--workers", "0", "--device", "cpu"])
    (runs / "unfinished_ensemble").mkdir()
    shutil.copyfile(runs / "ensemble" / "metrics.json", runs / "unfinished_ensemble" / "metrics.json")
    (runs / "report_cam").mkdir()
    (runs / "report_cam" / "pair_11_a_b.png").write_bytes(b"an earlier report's pair")
    report.main([str(runs), "--cam", "1", "--device", "cpu", "--workers", "0"])
    return runs


@pytest.fixture(scope="module")
def result(runs_dir):
    return json.loads((runs_dir / "report.json").read_text())


def size(inches):
    """A figure's pixels."""
    return round(inches[0] * report.DPI), round(inches[1] * report.DPI)


def val_outputs(model, ckpt, demo_dir):
    """Logits of a checkpoint's model on demo val ((N, M*C) member logits for an ensemble), and the labels,
    computed here independently of report.py."""
    paths, labels, _ = data.load_split(demo_dir, "val", ckpt["class_names"])
    dataset = data.ImageDataset(paths, labels, transforms.eval_transform(ckpt["img_size"], mean=ckpt["mean"],
                                                                         std=ckpt["std"]))
    loader = data.make_loader(dataset, device=torch.device("cpu"), workers=0, batch_size=64)
    with torch.no_grad():
        batches = [(model.member_logits(x) if ckpt["kind"] == "ensemble" else model(x), y) for x, y in loader]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def accuracy(logits, labels):
    return 100 * (logits.argmax(-1) == labels).double().mean().item()


def with_interval(acc, images=160):
    """How report.md writes an accuracy on the demo's 160 val images: from the count of right images, as
    the scripts compute it (a recomputed mean can differ in the last bit, and so in the rounding of x.xx5)."""
    correct = round(acc * images / 100)
    return stats.accuracy_text(100 * correct / images, *stats.wilson_interval(correct, images))


def test_tables_equal_histories_and_checkpoints(runs_dir, result, member_runs, demo_dir):
    runs = {run["name"]: run for run in result["runs"]}
    summary = {(row["run"], row["model"]): row["val_acc"] for row in result["summary"]}
    markdown = (runs_dir / "report.md").read_text()

    # recomputed from ensemble.pt, which holds the members' best.pt weights: their logits, averages and head
    ckpt = checkpoints.load(runs_dir / "ensemble" / "ensemble.pt", kind="ensemble")
    assert [m["source"] for m in ckpt["members"]] == [str(member_runs[name] / "best.pt") for name in member_runs]
    model = checkpoints.model_from_checkpoint(ckpt)
    logits, labels = val_outputs(model, ckpt, demo_dir)
    per_member = logits.view(len(logits), len(ckpt["members"]), -1)  # (N, M, C)
    recomputed = {name: accuracy(per_member[:, i], labels) for i, name in enumerate(member_runs)}
    ensemble = runs["ensemble"]
    assert ensemble["status"] == "complete"
    for key, value in (("logit average", accuracy(per_member.mean(1), labels)),
                       ("softmax average", accuracy(per_member.softmax(-1).mean(1), labels)),
                       ("trained head (3 epochs), in ensemble.pt", accuracy(model.head(logits), labels))):
        assert summary[("ensemble", f"ensemble: {key}")] == pytest.approx(value, abs=1e-6)
        assert f"| ensemble: {key} | ensemble | complete |  | {with_interval(value)} |" in markdown
    assert [m["val_acc"] for m in ensemble["members"]] == pytest.approx(list(recomputed.values()), abs=1e-6)

    # members: the best val accuracy of history.csv, which their best.pt reproduces
    for name, folder in member_runs.items():
        history, config = pd.read_csv(folder / "history.csv"), json.loads((folder / "config.json").read_text())
        run, epochs = runs[name], config["epochs"]
        assert (run["status"], run["epochs_done"], run["epochs"]) == ("complete", epochs, epochs)
        assert run["best_val_acc"] == summary[(name, name)] == history["val_acc"].max()
        assert run["best_val_acc"] == pytest.approx(recomputed[name], abs=1e-6)
        assert f"| {name} | {name} | complete | {epochs}/{epochs} | {with_interval(run['best_val_acc'])} |" in markdown

    # the paired comparison: the ensemble in ensemble.pt against its best member, image by image
    with torch.no_grad():
        ensemble_right = model.head(logits).argmax(1) == labels
    member_right = per_member.argmax(-1) == labels[:, None]  # (N, M)
    best = max(range(len(member_runs)), key=lambda i: member_right[:, i].sum().item())  # the first of the best
    ensemble_only = int((ensemble_right & ~member_right[:, best]).sum())
    member_only = int((member_right[:, best] & ~ensemble_right).sum())
    p = stats.mcnemar(ensemble_right, member_right[:, best])
    member = ensemble["members"][best]
    assert member["model"] == list(member_runs)[best]
    sentence = ("Paired on the same 160 val images: " + stats.paired_text(
        "the ensemble (trained head)", f"its best member, {member['model']} ({with_interval(member['val_acc'])}),",
        ensemble_only, member_only, p) + ".")
    assert f"\n{sentence}\n" in markdown
    assert sentence.endswith(": within noise.") == (p >= 0.05)

    # gradual unfreezing: one row per section of --unfreeze 1:layer4, maxima of history.csv
    history = pd.read_csv(member_runs["resnext_freeze"] / "history.csv")
    rows = runs["resnext_freeze"]["unfreeze"]
    sections = models.section_bounds(models.parse_unfreeze("1:layer4"), len(history))
    assert [(r["first"], r["last"]) for r in rows] == sections
    assert [r["action"] for r in rows] == ["Unfreeze the final fully connected layer", "Unfreeze layer4"]
    for row in rows:
        part = history[history["epoch"].between(row["first"], row["last"])]
        assert (row["best_train_acc"], row["best_val_acc"]) == (part["train_acc"].max(), part["val_acc"].max())
        assert (f"| {row['epochs']} | {row['action']} | {row['best_train_acc']:.2f} | "
                f"{with_interval(row['best_val_acc'])} |") in markdown
        assert [row["best_val_acc_low"], row["best_val_acc_high"]] == list(
            stats.accuracy_interval(row["best_val_acc"], 160))
    assert runs["resnext"]["unfreeze"] is None

    # the model analysed is the ensemble the submission uses, its accuracy recomputed; members above it are named
    complete = {name: run["best_val_acc"] for name, run in runs.items() if run["status"] == "complete"}
    best = result["analysed_model"]
    assert best["run"] == "ensemble" and best["why"].startswith("the ensemble, whose ensemble.pt (trained head)")
    above = [name for name in member_runs if complete[name] > complete["ensemble"]]
    assert [caveat.split(" alone")[0] for caveat in best["caveats"]] == above
    for caveat in best["caveats"]:
        assert f"- {caveat}" in markdown and "python predict.py --checkpoint " in caveat
    assert best["val_acc"] == pytest.approx(best["table_val_acc"], abs=1e-6)
    assert f"Val accuracy {with_interval(best['val_acc'])} recomputed from the checkpoint" in markdown
    assert best["val_acc"] == pytest.approx(recomputed.get(best["run"], complete[best["run"]]), abs=1e-6)
    per_class = pd.read_csv(runs_dir / result["files"]["per_class"], keep_default_na=False)
    assert per_class["class"].astype(str).tolist() == [str(i) for i in range(demo_data.DEMO_CLASSES)]
    assert per_class["images"].sum() == best["images"] == 160
    assert 100 * per_class["correct"].sum() / 160 == pytest.approx(best["val_acc"])
    pairs = best["top_confusions"]
    assert len(pairs) <= 10 and [p["images"] for p in pairs] == sorted((p["images"] for p in pairs), reverse=True)
    assert best["mistakes"] == 160 - per_class["correct"].sum()
    assert all(f"| {p['true']} | {p['predicted']} | {p['images']} |" in markdown for p in pairs)


def test_figures_have_their_sizes(runs_dir, result):
    files = result["files"]
    # a row per run with a history: 3 members, crashed, corrupt, 2 ensemble heads; not the started run
    assert Image.open(runs_dir / files["curves"]).size == size(report.curves_size(7))
    assert Image.open(runs_dir / files["confusion"]).size == size(report.CONFUSION_SIZE)
    shown = result["analysed_model"]["shown"]
    assert shown == min(report.MAX_MISCLASSIFIED, result["analysed_model"]["mistakes"]) > 0
    assert Image.open(runs_dir / files["misclassified"]).size == size(report.grid_size(shown))


def test_incomplete_runs_are_labelled(runs_dir, result):
    runs = {run["name"]: run for run in result["runs"]}
    crashed, started, corrupt = runs["crashed"], runs["started"], runs["corrupt"]
    assert crashed["status"] == started["status"] == corrupt["status"] == "incomplete"
    assert "last.pt" in corrupt["reason"] and corrupt["epochs_done"] == corrupt["epochs"]
    assert runs["unfinished_ensemble"]["status"] == "incomplete"
    assert runs["unfinished_ensemble"]["reason"] == "no ensemble.pt"
    epochs = crashed["epochs"]
    assert "no last.pt" in crashed["reason"] and f"1 of {epochs} epochs" in crashed["reason"]
    assert crashed["best_val_acc"] == pd.read_csv(runs_dir / "crashed" / "history.csv")["val_acc"].max()
    assert "no history.csv" in started["reason"] and started["best_val_acc"] is None
    markdown = (runs_dir / "report.md").read_text()
    assert f"| resnext | crashed | incomplete: {crashed['reason']} | 1/{epochs} |" in markdown
    assert f"| resnext | started | incomplete: {started['reason']} | 0/{epochs} | - |" in markdown
    assert "| ensemble: trained head (3 epochs) | unfinished_ensemble | incomplete: no ensemble.pt |" in markdown
    assert result["analysed_model"]["run"] in ("ensemble", *(name for name in models.MODEL_NAMES))


def test_user_errors(runs_dir, tmp_path):
    with pytest.raises(utils.UserError, match="does not exist"):
        report.main([str(tmp_path / "nowhere")])
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(utils.UserError, match="holds no run folders"):
        report.main([str(tmp_path)])
    with pytest.raises(utils.UserError, match=r"^--cam -1: give the number of images per confused pair, or 0"):
        report.main([str(runs_dir), "--cam", "-1"])
    with pytest.raises(utils.UserError, match=r"\(--data-dir\) does not exist"):
        report.main([str(runs_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path / "r.md")])
    assert not (tmp_path / "r.md").exists()


def test_cam_overlays(runs_dir, result):
    """--cam 1: one figure of the misclassified images shown and one per confused pair, a Grad-CAM per
    ensemble member (the wrapped block in resnext_vit), linked from report.md; an earlier report's pair
    figure is removed."""
    best, summary = result["analysed_model"], result["analysed_model"]["cam"]
    assert best["run"] == "ensemble"
    assert {m["name"]: m["layer"] for m in summary["members"]} == {
        "resnext": "layer4.0", "resnext_freeze": "layer4.0", "resnext_vit": "layer4.0.block"}
    assert (summary["heatmap_size"], summary["img_size"], summary["per_pair"]) == ([1, 1], 32, 1)

    # images per figure: the misclassified grid's, and per pair 1 mistake + 1 correct image of each class it has
    per_class = pd.read_csv(runs_dir / result["files"]["per_class"], keep_default_na=False)
    correct = dict(zip(per_class["class"].astype(str), per_class["correct"]))
    expected = {"report_cam/misclassified.png": best["shown"]}
    for rank, pair in enumerate(best["top_confusions"], 1):
        assert pair["cam"] == f"report_cam/pair_{rank:02d}_{pair['true']}_{pair['predicted']}.png"
        expected[pair["cam"]] = pair["cam_images"]
        assert pair["cam_images"] == 1 + min(1, correct[pair["true"]]) + min(1, correct[pair["predicted"]])
    assert len(expected) == len(best["top_confusions"]) + 1 > 1
    assert result["files"]["cam"] == list(expected)
    assert sorted(path.name for path in (runs_dir / "report_cam").iterdir()) == sorted(
        name.split("/")[1] for name in expected)
    for name, images in expected.items():
        with Image.open(runs_dir / name) as figure:
            figure.load()
            assert figure.size == size(report.cam_grid_size(images, 3))

    section = (runs_dir / "report.md").read_text().split("### Grad-CAM\n")[1]
    links = re.findall(r"\]\(([^)]+)\)", section)
    assert links == list(expected) and all((runs_dir / link).is_file() for link in links)
    assert "resnext_vit at layer4.0.block (1 x 1 maps at 32 px" in section
    assert "At 32 px the map is a single value and shows nothing" in section
