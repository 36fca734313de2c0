"""ONNX graphs of the project's models: exported from torch with their task in the metadata (export.py), and
run with onnxruntime as a module that engine.infer and engine.predict_images call like the torch model.

An exported file takes float32 NCHW images, normalised as the checkpoint's eval pipeline does, at its
eval_size, on a dynamic batch axis ("images"), and returns the logits ("logits"). Its metadata_props hold
METADATA_KEYS as strings (lists as JSON); files exported before the eval pipeline was stored lack
PIPELINE_KEYS and get the report's (eval_size = img_size, bilinear, no crop)."""
import io
import json
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

from utils import UserError

FORMAT = "imgcls-onnx-1"
METADATA_KEYS = ("format", "kind", "class_names", "img_size", "mean", "std", "checkpoint", "checkpoint_sha256")
PIPELINE_KEYS = ("eval_size", "interpolation", "crop_pct")  # written since imgcls-checkpoint-3
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# opset 17 has every operator of the ResNets and of the HF ViT (LayerNormalization among them) and is read
# by every onnxruntime since 1.11 and by TensorRT
OPSET = 17
EXAMPLE_BATCH = 2  # the traced batch; the batch axis stays dynamic, and export.py verifies another size


def is_onnx(path):
    return Path(path).suffix.lower() == ".onnx"


def metadata_of(ckpt, source, sha256):
    """The metadata (METADATA_KEYS, plain values) of the graph exported from checkpoint `ckpt` read from
    `source`, whose file hash is sha256."""
    return {"format": FORMAT, "kind": ckpt["kind"], "class_names": list(ckpt["class_names"]),
            "img_size": int(ckpt["img_size"]), "mean": list(ckpt["mean"]), "std": list(ckpt["std"]),
            "checkpoint": str(source), "checkpoint_sha256": sha256,
            **{key: ckpt[key] for key in PIPELINE_KEYS}}


def to_onnx(model, img_size, metadata):
    """The serialised ONNX model of a torch model (fp32, eval mode, on the CPU) taking img_size x img_size
    images (a checkpoint's eval_size), with `metadata` in its metadata_props.

    The TorchScript exporter (dynamo=False) is used. With torch 2.14 both exporters export resnet10t, the
    resnext_vit member (HF ViT) and an ensemble of them with a dynamic batch, to the same logits (1e-6); the
    torch.export-based one (dynamo=True, torch's default since 2.9) needs onnxscript besides onnx, prints its
    progress, and took twice as long (9.5 s against 4.4 s for a resnet10t + resnext_vit ensemble). The
    TorchScript one needs onnx alone and takes dynamic_axes on every torch from 2.5 (where the `dynamo`
    argument appeared) to the 2.14 that requirements.txt allows; it is deprecated, so its notice is hidden."""
    if torch.__version__ < "2.5":
        raise UserError(f"exporting to ONNX needs torch 2.5 or newer (this is {torch.__version__}); "
                        "pip install -U -r requirements.txt")
    import onnx  # 0.6 s to import, and needed only here: predict.py reads a graph with onnxruntime alone
    example = torch.randn(EXAMPLE_BATCH, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the exporter's deprecation notice, and the tracer's on the HF ViT's shape checks (channels, image
        # size, tokens), which compare sizes that img_size fixes; the batch axis is marked dynamic
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model.eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {key: value if isinstance(value, str) else json.dumps(value)
                                        for key, value in metadata.items()})
    return proto.SerializeToString()


def parse_metadata(props, name):
    """METADATA_KEYS as plain values from an exported graph's metadata_props (strings); a graph without
    them is a one-line UserError naming it."""
    if props.get("format") != FORMAT or any(key not in props for key in METADATA_KEYS):
        raise UserError(f"ONNX model {name} was not written by export.py (its metadata lacks the class names, "
                        "image size and normalisation); export a checkpoint with python export.py CHECKPOINT")
    metadata = {key: props[key] if key in ("format", "kind", "checkpoint", "checkpoint_sha256")
                else json.loads(props[key]) for key in METADATA_KEYS}
    report_pipeline = {"eval_size": metadata["img_size"], "interpolation": "bilinear", "crop_pct": None}
    pipeline = {key: (props[key] if key == "interpolation" else json.loads(props[key])) if key in props
                else report_pipeline[key] for key in PIPELINE_KEYS}
    return {**metadata, **pipeline}


def providers_for(device):
    """onnxruntime's CUDA provider for a CUDA device when this onnxruntime has one (onnxruntime-gpu), then
    its CPU provider."""
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        warnings.warn("this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu): the ONNX "
                      "model runs on the CPU", stacklevel=2)
    return ["CPUExecutionProvider"]


class OnnxModel(nn.Module):
    """An exported graph (a file, or its bytes) run by onnxruntime, as a module without parameters: images
    (a float batch on any device, in any memory format) in, float32 logits on the same device out. Its task
    (parse_metadata) is `metadata`, and the provider that runs it `provider`."""

    def __init__(self, source, device=torch.device("cpu")):
        super().__init__()
        name = "(in memory)" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise UserError(f"ONNX model {name} does not exist")
        options = ort.SessionOptions()
        # between batches the main thread decodes the next images (a CPU runs no DataLoader workers): pool
        # threads spinning for more work would take its core (4-9% fewer images/s on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                                providers=providers_for(device))
        except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
            raise UserError(f"ONNX model {name} cannot be read ({type(error).__name__}): it is truncated, corrupt "
                            "or not an ONNX file") from error
        self.metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map, name)
        self.provider = self.session.get_providers()[0]

    def forward(self, images):
        # onnxruntime reads host memory in NCHW order: copy a device or channels_last batch there first
        batch = images.detach().float().cpu().contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        return torch.from_numpy(logits).to(images.device)
