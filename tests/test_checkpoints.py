"""checkpoints.py: files of the previous format (imgcls-checkpoint-1) still load and predict the same
(test_reliability resumes one mid-epoch)."""
import pytest
import torch

import checkpoints
from conftest import run_script

# the keys of real imgcls-checkpoint-1 files, as that version of train.py and ensemble.py wrote them
V1_MEMBER_KEYS = ["arch", "args", "best_acc", "best_epoch", "class_names", "ema_state_dict", "epoch", "format",
                  "history", "img_size", "kind", "mean", "model", "optimizer", "partial", "rng", "scaler",
                  "state_dict", "std", "step", "vit_config", "weights"]
V1_ENSEMBLE_KEYS = ["class_names", "format", "head_state_dict", "img_size", "kind", "mean", "members", "metrics",
                    "std"]
NEW_IN_3 = ("eval_size", "interpolation", "crop_pct")  # the eval pipeline, stored since imgcls-checkpoint-3
NEW_IN_4 = ("pipelines", "pipeline_index")  # an ensemble's pipelines (mixed ensembles), since imgcls-checkpoint-4
V1_ENSEMBLE_MEMBER_KEYS = ["arch", "class_names", "img_size", "mean", "model", "sha256", "source", "state_dict",
                           "std", "vit_config", "weights"]


def as_version_1(ckpt):
    """A current checkpoint written back in format 1's key names (format 3's eval pipeline keys dropped)."""
    old = {key: value for key, value in ckpt.items() if key not in NEW_IN_3 + NEW_IN_4} | {
        "format": "imgcls-checkpoint-1"}
    if old["kind"] == "member":
        old["weights"] = "ema" if old.pop("use_ema") else "raw"
        old["partial"] = old.pop("epoch_sums")
        assert old.pop("folds") is None  # format 1 had no --folds
        assert old.pop("teacher") is None  # nor --teacher
    if old["kind"] == "ensemble":
        assert old.pop("combiner") == "head"  # format 1 had no other
        assert old.pop("groups") is None  # nor fold members
        old["members"] = [{k: v for k, v in m.items() if k not in NEW_IN_3 + NEW_IN_4}
                          | {"weights": "ema" if m["use_ema"] else "raw"} for m in old["members"]]
        for member in old["members"]:
            del member["use_ema"]
            assert member.pop("reference") is None  # nor referenced members
    return old


def save_as_version_1(src, dst):
    old = as_version_1(torch.load(src, weights_only=True))
    torch.save(old, dst)
    return old


@pytest.fixture(scope="module")
def ensemble_v2(member_runs, demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    members = [member_runs[name] / "best.pt" for name in ("resnext", "resnext_vit")]
    run_script("ensemble.py", "--members", *members, "--data-dir", demo_dir, "--out-dir", out, "--epochs", "2")
    return out / "ensemble.pt"


def test_version_1_member_loads_as_the_current_format(member_runs, tmp_path):
    for name, run in member_runs.items():
        current = checkpoints.load(run / "best.pt", kind="member")
        old = save_as_version_1(run / "best.pt", tmp_path / "v1.pt")
        assert sorted(old) == V1_MEMBER_KEYS
        upgraded = checkpoints.load(tmp_path / "v1.pt", kind="member")
        assert upgraded.keys() == current.keys() and upgraded["format"] == checkpoints.FORMAT
        assert upgraded["use_ema"] is False and upgraded["epoch_sums"] is None
        assert checkpoints.train_state(upgraded) == checkpoints.train_state(current)
        # an "ema" choice survives the renaming
        torch.save(dict(old, weights="ema", ema_state_dict=old["state_dict"]), tmp_path / "v1_ema.pt")
        assert checkpoints.load(tmp_path / "v1_ema.pt")["use_ema"] is True
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = checkpoints.model_from_checkpoint(current)(images)
            assert torch.equal(checkpoints.model_from_checkpoint(upgraded)(images), expected), name


def test_version_1_ensemble_predicts_the_same_submission(ensemble_v2, demo_dir, tmp_path):
    old = save_as_version_1(ensemble_v2, tmp_path / "ensemble_v1.pt")
    assert sorted(old) == V1_ENSEMBLE_KEYS and sorted(old["members"][0]) == V1_ENSEMBLE_MEMBER_KEYS
    for name, path in (("v2", ensemble_v2), ("v1", tmp_path / "ensemble_v1.pt")):
        result = run_script("predict.py", "--checkpoint", path, "--data-dir", demo_dir, "--out",
                            tmp_path / name / "pred.csv", "--save-logits")
        # in a log (not a terminal) progress is a line per tenth, never carriage returns
        assert "\r" not in result.stderr and "predict: 12/12 (100%, " in result.stderr
    assert (tmp_path / "v1" / "pred.csv").read_text() == (tmp_path / "v2" / "pred.csv").read_text()
    logits = [torch.load(tmp_path / name / "logits.pt", weights_only=True)["logits"] for name in ("v1", "v2")]
    assert torch.equal(*logits)
