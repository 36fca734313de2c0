"""Export a member checkpoint (best.pt / last.pt) or a whole ensemble.pt to ONNX, verified against torch.

    python export.py runs/ensemble/ensemble.pt [--out runs/ensemble/ensemble.onnx] [--data-dir data]

The graph takes float32 NCHW images as the checkpoint's eval pipeline gives them (transforms.eval_transform_of),
at its eval size, on a dynamic batch axis, and returns the logits; an ensemble is one graph, members and
stacking head. Its metadata_props hold class_names, img_size, mean, std, eval_size, interpolation, crop_pct
(JSON), kind and the checkpoint's path and sha256, so predict.py --checkpoint MODEL.onnx needs the file alone.

Before the file is written, onnxruntime runs the graph on --samples images (from --data-dir's val/ or test/,
else random tensors) and its logits are compared with torch's: a top-1 that differs (other than on a near-tie),
or a logit further than 1e-3 x the largest |logit| from torch's, is an error and nothing is written.
"""
import argparse
from pathlib import Path

import torch

import checkpoints
import data
import onnx_runtime
import transforms
import utils
from utils import UserError

# onnxruntime and torch differ by about 1e-6 of the logits' scale in fp32 (other kernels, other summation
# orders); an export gone wrong differs by far more
TOLERANCE = 1e-3


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a member's best.pt / last.pt (train.py) or an ensemble.pt "
                        "(ensemble.py)")
    parser.add_argument("--out", type=Path, help="the .onnx file to write (default: the checkpoint's path with the "
                        "suffix .onnx)")
    parser.add_argument("--data-dir", type=Path, help="verify on images of DATA/val (or DATA/test); without it, "
                        "on random tensors")
    parser.add_argument("--samples", type=int, default=8, help="images of the verification (one batch)")
    return parser


def sample_images(data_dir, count, spec):
    """(count x 3 x eval_size x eval_size) images of DATA/val, spread over its classes, or of DATA/test, through
    the eval pipeline of a checkpoint's spec, and what they are; random tensors (seeded) without data_dir."""
    if data_dir is None:
        generator = torch.Generator().manual_seed(0)
        size = spec["eval_size"]
        return torch.randn(count, 3, size, size, generator=generator), "random tensors"
    if (data_dir / "val").is_dir():
        paths, _, _ = data.list_split(data_dir, "val")
        source = data_dir / "val"
    elif (data_dir / "test").is_dir():
        paths, source = data.list_images(data_dir / "test"), data_dir / "test"
    else:
        raise UserError(f"--data-dir {data_dir} has neither val/ nor test/; point it at the data folder, "
                        "or leave it out to verify on random tensors")
    paths, _ = data.scan_images(paths[::max(1, len(paths) // count)][:count], warn=False)
    if not paths:
        raise UserError(f"{source} holds no readable image to verify the export on")
    transform = transforms.eval_transform_of(spec)
    return torch.stack([transform(path) for path in paths]), f"images of {source}"


def compare(reference, logits):
    """(largest |difference|, allowed difference, top-1 agreements, top-1 differences beyond near-ties) of
    onnxruntime's logits against torch's. A top-1 may differ only for a class whose torch logit lies within the
    allowed difference of torch's largest (a near-tie)."""
    allowed = TOLERANCE * max(1.0, reference.abs().max().item())
    largest = (logits - reference).abs().max().item()
    chosen = logits.argmax(1)
    same = reference.argmax(1) == chosen
    tie = reference.max(1).values - reference.gather(1, chosen[:, None])[:, 0] <= allowed
    return largest, allowed, int(same.sum()), int((~same & ~tie).sum())


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = args.out or args.checkpoint.with_suffix(".onnx")
    if not onnx_runtime.is_onnx(out):
        raise UserError(f"--out {out} must end in .onnx, which is how predict.py tells an ONNX model")
    if args.samples < 1:
        raise UserError(f"--samples {args.samples} must be at least 1")
    ckpt = checkpoints.load(args.checkpoint)
    if ckpt["kind"] not in ("member", "ensemble"):
        raise UserError(f"checkpoint {args.checkpoint} is a {ckpt['kind']} file, not a model; export a member's "
                        "best.pt or an ensemble.pt")
    pipelines = checkpoints.input_pipelines(ckpt)
    if len(pipelines) > 1:
        raise UserError(f"checkpoint {args.checkpoint} is a mixed ensemble (its members take "
                        f"{len(pipelines)} pipelines, eval {' + '.join(str(p['eval_size']) for p in pipelines)} px), "
                        "and an ONNX graph takes one input; export each member's best.pt instead")
    utils.check_writable(out.parent, "--out")
    images, source = sample_images(args.data_dir, args.samples, ckpt)

    # ----------------------------------------------------------------- export
    model = checkpoints.model_from_checkpoint(ckpt)
    metadata = onnx_runtime.metadata_of(ckpt, args.checkpoint, utils.file_sha256(args.checkpoint))
    graph = onnx_runtime.to_onnx(model, ckpt["eval_size"], metadata)

    # ----------------------------------------------------------------- verify, then write
    with torch.inference_mode():
        reference = model(images)
    logits = onnx_runtime.OnnxModel(graph)(images)
    largest, allowed, same, flipped = compare(reference, logits)
    print(f"onnxruntime vs torch on {len(images)} {source}: largest logit difference {largest:.2e} (allowed "
          f"{allowed:.2e}), top-1 identical on {same}/{len(images)}")
    if largest > allowed or flipped:
        raise UserError(f"the ONNX export of {args.checkpoint} does not match torch (largest logit difference "
                        f"{largest:.2e}, allowed {allowed:.2e}; top-1 differs on {flipped} image(s)); "
                        f"{out} was not written")
    utils.atomic_write(out, lambda f: f.write(graph))
    print(f"wrote {out} ({ckpt['kind']}, {len(ckpt['class_names'])} classes, {ckpt['eval_size']} px, "
          f"{len(graph) / 2**20:.1f} MB)")


if __name__ == "__main__":
    utils.run_main(main)
