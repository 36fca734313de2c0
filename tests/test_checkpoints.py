"""checkpoints.py: files of the previous format (imgcls-checkpoint-1) still load and predict the same
(test_reliability resumes one mid-epoch)."""
import pytest
import torch

import checkpoints
from conftest import (V1_ENSEMBLE_KEYS, V1_ENSEMBLE_MEMBER_KEYS, V1_MEMBER_KEYS, as_version_1,
                      run_script)


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
