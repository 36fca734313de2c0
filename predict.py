"""Predict the test images with a member or ensemble checkpoint and write the competition's submission.

    python predict.py [--checkpoint runs/ensemble/ensemble.pt] [--data-dir data] [--tta hflip,scale:1.15]

Images go through the checkpoint's own eval pipeline (transforms.eval_transform_of: its eval size, interpolation,
crop fraction and normalisation); a mixed ensemble's members each through their own, from one decode of each
image (transforms.PipelineTuple), and TTA views apply to each member's images at their own size. --checkpoint
may also be an ONNX model from export.py (MODEL.onnx), run with onnxruntime: its metadata gives the class names
and that pipeline, and the same TTA views and files follow.

Writes --out (prediction.csv: header image_name,pred_label, one row per image of the test folder sorted by
name; image_name is the file name without its extension, pred_label the class folder name) and --zip
(submission.zip, holding prediction.csv at its root). Beside --out it also writes, when asked:
probabilities.csv (--topk K: image_name,top_k with "label:probability" pairs, most likely first) and
logits.pt (--save-logits: a dict of image_names, class_names, logits (N, C) float32 in CSV order, tta and
checkpoint; read it with torch.load(path, weights_only=True)).
"""
import argparse
import functools
import math
import sys
from pathlib import Path

import pandas as pd
import torch.nn.functional as F

import checkpoints
import data
import engine
import onnx_runtime
import stats
import transforms
import utils
from utils import UserError

DEFAULT_CHECKPOINT = Path("runs/ensemble/ensemble.pt")


def get_args_parser():
    fmt = utils.HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="ensemble.pt from ensemble.py, a member's best.pt / last.pt from train.py, or an "
                        "ONNX model from export.py (.onnx, run with onnxruntime)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="data folder; its test/ is predicted")
    parser.add_argument("--test-dir", type=Path, help="flat folder of test images, instead of DATA_DIR/test")
    parser.add_argument("--out", type=Path, default=Path("prediction.csv"), help="the CSV to write")
    parser.add_argument("--zip", type=Path, help="the zip to upload (prediction.csv at its root); by default "
                        "submission.zip beside --out")
    parser.add_argument("--tta", default="none", help="test-time augmentation: none, or a comma list of views "
                        "whose logits are averaged with the plain image's: hflip (the mirror image), scale:S (the "
                        "batch upsampled by S, i.e. evaluated at round(eval size x S) px, FixRes-style: a model "
                        "trained at a smaller size often scores higher above its eval size; S below 1 shrinks). "
                        "E.g. hflip,scale:1.15: 3 views, 3x the compute")
    parser.add_argument("--topk", type=int, default=0, help="also write probabilities.csv beside --out with "
                        "the K most likely labels and their probabilities (0: off)")
    parser.add_argument("--save-logits", action="store_true", help="also write logits.pt beside --out")
    parser.add_argument("--labels", type=Path, help="CSV image_name,label of the test images: print the accuracy")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable test images out of the CSV "
                        "with a warning; without it they are an error, since a submission must be complete")
    engine.add_inference_args(parser)
    return parser


# ----------------------------------------------------------------------------
# test-time augmentation: views of a normalised batch, made on the device (no second decode)

def hflip(x):
    return x.flip(-1)


def rescale(x, factor):
    """The batch resized by `factor` on each side (bilinear; antialiased when it shrinks)."""
    size = [max(1, round(side * factor)) for side in x.shape[-2:]]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=factor < 1)


TTA_VIEWS = {"none": (engine.identity,), "hflip": (engine.identity, hflip)}


def parse_tta(text):
    """--tta: the views (the plain image first) of "none", or of a comma list of hflip and scale:S items."""
    if text in TTA_VIEWS:
        return TTA_VIEWS[text]
    views = [engine.identity]
    for item in (part.strip() for part in text.split(",")):
        name, _, value = item.partition(":")
        try:
            factor = float(value) if name == "scale" else None
        except ValueError:
            factor = None
        if item == "hflip":
            views.append(hflip)
        elif factor is not None and 0 < factor <= 4 and factor != 1:
            views.append(functools.partial(rescale, factor=factor))
        else:
            raise UserError(f"--tta '{text}': '{item}' is not a view; use none, or a comma list of hflip and "
                            "scale:S with S between 0 and 4, not 1 (e.g. --tta hflip,scale:1.15)")
    return tuple(views)


# ----------------------------------------------------------------------------
# inference

def labels_of(logits, class_names):
    """The class folder name of each row's largest logit."""
    return [class_names[i] for i in logits.argmax(1).tolist()]


def topk_strings(logits, class_names, k):
    """'label:p label:p ...' per row, most likely first; probabilities rounded down so each row sums to <= 1."""
    probs, indices = logits.softmax(1).topk(k, dim=1)
    return [" ".join(f"{class_names[i]}:{math.floor(p * 1e4) / 1e4:.4f}" for p, i in zip(row_p, row_i))
            for row_p, row_i in zip(probs.tolist(), indices.tolist())]


# ----------------------------------------------------------------------------
# checks

def read_labels(path, stems, class_names):
    """The true label of each test image (by stem) from a CSV image_name,label; one-line errors otherwise."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise UserError(f"--labels {path} does not exist") from error
    except OSError as error:
        raise UserError(f"--labels {path} cannot be read ({error.strerror or error})") from error
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserError(f"--labels {path} is not a CSV file ({type(error).__name__})") from error
    if not {"image_name", "label"} <= set(frame.columns):
        raise UserError(f"--labels {path} needs the columns image_name,label (it has {','.join(frame.columns)})")
    duplicated = frame["image_name"][frame["image_name"].duplicated()]
    if len(duplicated):
        raise UserError(f"--labels {path} lists image '{duplicated.iloc[0]}' more than once")
    unknown = frame[~frame["label"].isin(class_names)]
    if len(unknown):
        raise UserError(f"--labels {path} has {len(unknown)} label(s) that are not classes of the checkpoint "
                        f"(e.g. '{unknown['label'].iloc[0]}' for image '{unknown['image_name'].iloc[0]}')")
    truth = dict(zip(frame["image_name"], frame["label"]))
    missing = [stem for stem in stems if stem not in truth]
    if missing:
        raise UserError(f"--labels {path} has no label for {len(missing)} of the {len(stems)} test images "
                        f"(e.g. '{missing[0]}'); give a label for every image")
    return [truth[stem] for stem in stems]


def check_submission(frame, stems, class_names):
    """Every test image exactly once, in order, and only labels that are class names; else nothing is written."""
    names = frame["image_name"].tolist()
    if names != list(stems):
        missing = sorted(set(stems) - set(names))
        extra = sorted(set(names) - set(stems))
        raise RuntimeError(f"the submission does not list each test image once (missing {missing[:3]}, "
                           f"extra {extra[:3]}, {len(names)} rows for {len(stems)} images); nothing was written")
    unknown = sorted(set(frame["pred_label"]) - set(class_names))
    if unknown:
        raise RuntimeError(f"the submission has labels that are not classes: {unknown[:3]}; nothing was written")


def main(argv=None):
    utils.refuse_distributed("predict.py")
    args = get_args_parser().parse_args(argv)
    test_dir = args.test_dir or args.data_dir / "test"
    args.zip = args.zip or args.out.with_name("submission.zip")
    utils.check_writable(args.out.parent, "--out")
    utils.check_writable(args.zip.parent, "--zip")
    is_onnx = onnx_runtime.is_onnx(args.checkpoint)
    if is_onnx and args.precision not in ("auto", "fp32"):
        raise UserError(f"--precision {args.precision} does not apply to an ONNX model, which runs in the fp32 it "
                        "was exported in; leave --precision out")
    views = parse_tta(args.tta)
    if is_onnx and any(isinstance(view, functools.partial) for view in views):
        raise UserError(f"--tta {args.tta}: an ONNX model takes images of its one eval size, so scale:S views need "
                        "the checkpoint (.pt) it was exported from; hflip works on both")
    runtime = engine.resolve_runtime(args.device, "fp32" if is_onnx else args.precision, args.channels_last)
    batch_size = engine.resolve_batch_size(args.batch_size, runtime.device)

    # ------------------------------------------------ checkpoint and test images
    if args.checkpoint == DEFAULT_CHECKPOINT and not args.checkpoint.is_file():
        raise UserError(f"--checkpoint {args.checkpoint} does not exist; run ensemble.py first, or pass a "
                        "member's checkpoint, e.g. --checkpoint runs/resnext/best.pt")
    # an ONNX model's session is opened here, as a checkpoint is read: its task is in its metadata
    onnx_model = onnx_runtime.OnnxModel(args.checkpoint, runtime.device) if is_onnx else None
    ckpt = onnx_model.metadata if is_onnx else checkpoints.load(args.checkpoint)
    class_names = ckpt["class_names"]
    if not 0 <= args.topk <= len(class_names):
        raise UserError(f"--topk {args.topk} must be between 0 and the {len(class_names)} classes")
    paths, bad = data.load_test(test_dir, strict=not args.skip_bad)
    if bad:
        print(f"warning: {len(bad)} unreadable test image(s) get no prediction and no row in {args.out}: "
              f"{', '.join(p.name for p, _ in bad)}", file=sys.stderr)
    if not paths:
        raise UserError(f"test folder {test_dir} holds no readable image")
    stems = [p.stem for p in paths]
    truth = read_labels(args.labels, stems, class_names) if args.labels else None

    # --------------------------------------------------------------- inference
    # a torch model is built once every input is known to be fine
    model = onnx_model if is_onnx else checkpoints.model_from_checkpoint(ckpt)
    workers = data.loader_workers(args.workers, runtime.device)
    engine_name = f"onnxruntime {onnx_model.provider}" if is_onnx else runtime.precision
    pipelines = checkpoints.input_pipelines(ckpt)
    sizes = " + ".join(str(pipeline["eval_size"]) for pipeline in pipelines)
    mixed = f", {len(pipelines)} pipelines: each member its own" if len(pipelines) > 1 else ""
    print(f"{ckpt['kind']} {'ONNX model' if is_onnx else 'checkpoint'} {args.checkpoint} ({len(class_names)} "
          f"classes, eval {sizes} px{mixed}) on {runtime.device} [{engine_name}]; {len(paths)} test images from "
          f"{test_dir}; TTA {args.tta}")
    # the labels are the indices, so that engine.predict_images can check each image is the one asked for
    dataset = data.ImageDataset(paths, range(len(paths)), transforms.input_transform(pipelines))
    logits = engine.predict_images(model, dataset, runtime, batch_size=batch_size, workers=workers, views=views)
    # ------------------------------------------------------------------ write
    frame = pd.DataFrame({"image_name": stems, "pred_label": labels_of(logits, class_names)})
    check_submission(frame, stems, class_names)
    csv_text = frame.to_csv(index=False, lineterminator="\n")
    utils.atomic_write_text(args.out, csv_text)
    utils.atomic_write_zip(args.zip, {"prediction.csv": csv_text.encode("utf-8")})
    print(f"wrote {args.out} ({len(frame)} rows) and {args.zip}")
    if args.topk:
        probs_path = args.out.with_name("probabilities.csv")
        top = pd.DataFrame({"image_name": stems, "top_k": topk_strings(logits, class_names, args.topk)})
        utils.atomic_write_text(probs_path, top.to_csv(index=False, lineterminator="\n"))
        print(f"wrote {probs_path} (top {args.topk})")
    if args.save_logits:
        logits_path = args.out.with_name("logits.pt")
        utils.atomic_save_torch({"image_names": stems, "class_names": list(class_names), "logits": logits,
                                 "tta": args.tta, "checkpoint": str(args.checkpoint)}, logits_path)
        print(f"wrote {logits_path}")
    if truth is not None:
        correct = sum(p == t for p, t in zip(frame["pred_label"], truth))
        interval = stats.interval_text(*stats.wilson_interval(correct, len(truth)))
        print(f"accuracy {100 * correct / len(truth):.2f}% {interval} (95% Wilson interval) ({correct}/{len(truth)} "
              f"images, --labels {args.labels})")


if __name__ == "__main__":
    utils.run_main(main)
