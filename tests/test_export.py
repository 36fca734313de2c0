"""export.py: the ONNX graphs of a member and of a whole ensemble against torch, their metadata, the
verification that refuses a bad graph, and predict.py on an .onnx file."""
import json
import zipfile

import onnx
import pytest
import torch
from torch import nn

import checkpoints
import data
import export
import models
import onnx_runtime
import predict
import transforms
import utils
from utils import UserError

# onnxruntime's logits against torch's, as a fraction of the largest |logit|: fp32 kernels differ by ~1e-6,
# 10x tighter than export.py's own check
MATCH = 1e-4


def assert_matches(logits, reference):
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= MATCH * max(1.0, reference.abs().max().item())
    assert torch.equal(logits.argmax(1), reference.argmax(1))


def images_of(ckpt, paths):
    transform = transforms.eval_transform(ckpt["img_size"], mean=ckpt["mean"], std=ckpt["std"])
    return torch.stack([transform(path) for path in paths])


def torch_logits(ckpt, images):
    with torch.no_grad():
        return checkpoints.model_from_checkpoint(ckpt)(images)


@pytest.fixture(scope="module")
def ensemble_dir(member_runs, tmp_path_factory):
    """A folder holding ensemble.pt of the three demo members (the ViT one among them) in ensemble.py's schema,
    with a seeded random head (training it would change nothing that export.py does)."""
    members = [checkpoints.ensemble_member(checkpoints.load(member_runs[name] / "best.pt"), member_runs[name] /
                                           "best.pt", sha256="") for name in models.MODEL_NAMES]
    torch.manual_seed(0)
    head = nn.Linear(len(members) * 16, 16)
    out_dir = tmp_path_factory.mktemp("ensemble")
    checkpoints.save(checkpoints.ensemble_checkpoint(members, head.state_dict(), metrics={}), out_dir / "ensemble.pt")
    return out_dir


def test_member_graph_matches_torch_at_any_batch_and_holds_its_task(member_runs, demo_dir, tmp_path, capsys):
    ckpt_path = member_runs["resnext_vit"] / "best.pt"  # a HF transformers ViT inside layer4
    out = tmp_path / "vit.onnx"
    export.main([str(ckpt_path), "--out", str(out), "--data-dir", str(demo_dir), "--samples", "6"])
    printed = capsys.readouterr().out
    assert f"on 6 images of {demo_dir / 'val'}: largest logit difference" in printed
    assert "top-1 identical on 6/6" in printed and f"wrote {out} (member, 16 classes, 32 px" in printed

    # the metadata, read with onnx itself: what predict.py needs, and where the graph came from
    proto = onnx.load(out)
    props = {prop.key: prop.value for prop in proto.metadata_props}
    ckpt = checkpoints.load(ckpt_path)
    assert json.loads(props["class_names"]) == ckpt["class_names"] == [str(i) for i in range(16)]
    assert int(props["img_size"]) == 32 and props["kind"] == "member"
    assert json.loads(props["mean"]) == list(transforms.IMAGENET_MEAN)
    assert json.loads(props["std"]) == list(transforms.IMAGENET_STD)
    assert props["checkpoint"] == str(ckpt_path) and props["checkpoint_sha256"] == utils.file_sha256(ckpt_path)
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "images" and dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == \
        [3, 32, 32]

    # the batch axis is dynamic: one image, and more than the traced two, give torch's logits
    paths, _, _ = data.list_split(demo_dir, "val")
    images = images_of(ckpt, paths[::16])
    model = onnx_runtime.OnnxModel(out)
    assert model.metadata == {**{key: ckpt[key] for key in ("kind", "class_names", "img_size")},
                              "mean": list(ckpt["mean"]), "std": list(ckpt["std"]), "format": onnx_runtime.FORMAT,
                              "checkpoint": str(ckpt_path), "checkpoint_sha256": utils.file_sha256(ckpt_path),
                              "eval_size": ckpt["eval_size"], "interpolation": "bilinear", "crop_pct": None}
    reference = torch_logits(ckpt, images)
    assert_matches(model(images[:1]), reference[:1])
    assert_matches(model(images), reference)


def test_ensemble_is_one_graph_and_predict_writes_the_same_files_from_it(ensemble_dir, demo_dir, tmp_path):
    ckpt_path = ensemble_dir / "ensemble.pt"
    export.main([str(ckpt_path)])  # random tensors; beside the checkpoint by default
    out = ensemble_dir / "ensemble.onnx"
    ckpt = checkpoints.load(ckpt_path)
    model = onnx_runtime.OnnxModel(out)
    assert model.metadata["kind"] == "ensemble" and model.metadata["class_names"] == ckpt["class_names"]
    paths, _ = data.load_test(demo_dir / "test")
    images = images_of(ckpt, paths[:10])
    assert_matches(model(images), torch_logits(ckpt, images))

    # predict.py: the same CSV, zip and (nearly) logits from the .onnx as from the .pt, TTA included
    for name, source in (("pt", ckpt_path), ("onnx", out)):
        predict.main(["--checkpoint", str(source), "--data-dir", str(demo_dir), "--out",
                      str(tmp_path / name / "prediction.csv"), "--tta", "hflip", "--save-logits", "--workers", "0"])
    csv = (tmp_path / "pt" / "prediction.csv").read_bytes()
    assert (tmp_path / "onnx" / "prediction.csv").read_bytes() == csv and len(csv.splitlines()) == 1 + len(paths)
    with zipfile.ZipFile(tmp_path / "onnx" / "submission.zip") as zf:
        assert zf.namelist() == ["prediction.csv"] and zf.read("prediction.csv") == csv
    logits = [torch.load(tmp_path / name / "logits.pt", weights_only=True)["logits"] for name in ("onnx", "pt")]
    assert_matches(*logits)


def test_a_graph_that_differs_from_torch_is_not_written(member_runs, tmp_path, monkeypatch):
    out = tmp_path / "member.onnx"
    out.write_bytes(b"previous")
    forward = onnx_runtime.OnnxModel.forward
    monkeypatch.setattr(onnx_runtime.OnnxModel, "forward", lambda self, images: forward(self, images) + 0.01)
    ckpt_path = member_runs["resnext"] / "best.pt"
    with pytest.raises(UserError, match=rf"^the ONNX export of {ckpt_path} does not match torch \(largest logit "
                       rf"difference 1\.00e-02, allowed .*; top-1 differs on 0 image\(s\)\); {out} was not written$"):
        export.main([str(ckpt_path), "--out", str(out)])
    assert out.read_bytes() == b"previous"


def test_top1_may_differ_only_on_a_near_tie():
    reference = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0 - 1e-7, 0.0]])
    # row 1 picks class 2 (2 below torch's best), row 2 class 2 (1 below): both real differences
    assert export.compare(reference, reference.flip(1)) == (2.0, pytest.approx(2e-3), 0, 2)
    # row 2 picks class 1, 1e-7 below torch's best: a near-tie, not a difference
    near_tie = torch.tensor([[2.0, 1.0, 0.0], [1.0 - 1e-7, 1.0, 0.0]])
    assert export.compare(reference, near_tie)[2:] == (1, 0)


def test_what_is_not_a_model_is_a_one_line_error(member_runs, tmp_path, capsys):
    def error_of(main, *argv):
        with pytest.raises(SystemExit) as exit_info:
            utils.run_main(main, [str(a) for a in argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert error_of(export.main, text) == (f"error: checkpoint {text} cannot be read (UnpicklingError): it is "
                                           "truncated, corrupt or not a checkpoint of this project\n")
    cache = tmp_path / "logits_cache.pt"
    checkpoints.save(checkpoints.logits_cache({}, {}), cache)
    assert error_of(export.main, cache) == (f"error: checkpoint {cache} is a logits file, not a model; export a "
                                            "member's best.pt or an ensemble.pt\n")
    assert error_of(export.main, member_runs["resnext"] / "best.pt", "--out", tmp_path / "model.pt") == (
        f"error: --out {tmp_path / 'model.pt'} must end in .onnx, which is how predict.py tells an ONNX model\n")

    # predict.py: an .onnx file that is not ONNX, one that export.py did not write, bf16 asked of a graph
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not protobuf")
    assert error_of(predict.main, "--checkpoint", garbage, "--test-dir", tmp_path) == (
        f"error: ONNX model {garbage} cannot be read (InvalidProtobuf): it is truncated, corrupt or not an ONNX "
        "file\n")
    foreign = tmp_path / "foreign.onnx"
    identity = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity",
                                      [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                      [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(identity, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign)
    assert error_of(predict.main, "--checkpoint", foreign, "--test-dir", tmp_path) == (
        f"error: ONNX model {foreign} was not written by export.py (its metadata lacks the class names, image size "
        "and normalisation); export a checkpoint with python export.py CHECKPOINT\n")
    assert error_of(predict.main, "--checkpoint", foreign, "--precision", "bf16") == (
        "error: --precision bf16 does not apply to an ONNX model, which runs in the fp32 it was exported in; leave "
        "--precision out\n")
