"""The one place that writes and reads the project's checkpoint files, and rebuilds models from them.

A checkpoint is a dict of tensors and plain values, saved with torch.save and always loaded with
torch.load(weights_only=True), so that loading one never runs code. Its "kind" is one of:

- member:   train.py's last.pt / best.pt: the spec (SPEC_KEYS) that rebuilds the model offline, the
            raw and EMA weights, and the training state that resumes the run exactly.
- ensemble: ensemble.py's ensemble.pt: the task (TASK_KEYS), each member's spec and inference
            weights (or, for a referenced member, its file's path and SHA-256), the stacking head, and for
            fold members the groups: which entries are the K fold models of one member type, and its input
            pipelines (PIPELINE_KEYS): one for a uniform ensemble, one per distinct pipeline of a mixed one.
- logits:   ensemble.py's cache of the members' logits.

Files of the previous formats (imgcls-checkpoint-1 to -3) are upgraded when loaded (see upgrade).
"""
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import models
import utils
from utils import UserError

FORMAT = "imgcls-checkpoint-4"
READABLE_FORMATS = ("imgcls-checkpoint-1", "imgcls-checkpoint-2", "imgcls-checkpoint-3", FORMAT)
# the eval pipeline (transforms.eval_transform_of): eval_size, interpolation and crop_pct (timm's meaning; None:
# the report's Resize((eval_size, eval_size)) without a crop), mean and std
PREPROCESSING_KEYS = ("eval_size", "interpolation", "crop_pct", "mean", "std")
SPEC_KEYS = ("model", "arch", "class_names", "img_size", "mean", "std", "vit_config", "eval_size", "interpolation",
             "crop_pct")  # rebuild a member and its input pipeline
TASK_KEYS = ("class_names", "img_size", "mean", "std", "eval_size", "interpolation",
             "crop_pct")  # an ensemble's top-level task: its class names and (uniform ensembles) its one pipeline
# one input pipeline: the train pipeline's size (ensemble.py's train views, distillation) and the eval pipeline;
# a mixed ensemble's members differ in it
PIPELINE_KEYS = ("img_size", *PREPROCESSING_KEYS)
# what a format-2 file's eval pipeline was: the report's resize to img_size x img_size
REPORT_EVAL = {"interpolation": "bilinear", "crop_pct": None}


@dataclass
class TrainState:
    """What a member checkpoint holds of its run besides weights, optimizer and RNG."""
    epoch: int = 0  # epochs finished
    step: int = 0  # steps of epoch + 1 done: a mid-epoch checkpoint when > 0
    epoch_sums: dict = None  # the running sums of epoch + 1 (loss, correct, count, seconds) at `step`
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list = field(default_factory=list)  # a row per finished epoch (history.csv)
    use_ema: bool = False  # inference uses the EMA weights (they scored better on val at `epoch`)


# ----------------------------------------------------------------------------
# reading

def load(path, kind=None):
    """Load a checkpoint of this project (upgraded to FORMAT); every way it can be wrong is a one-line
    UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only runs no code: any failure (of many types) means a bad file
        unsafe = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        if isinstance(error, pickle.UnpicklingError) and unsafe:
            raise UserError(f"checkpoint {path} was refused: loading it would call {unsafe[1]}, but checkpoints "
                            "hold only tensors and plain values; it is not from this project, or unsafe") from error
        raise UserError(f"checkpoint {path} cannot be read ({type(error).__name__}): it is truncated, corrupt "
                        "or not a checkpoint of this project") from error
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        raise UserError(f"checkpoint {path} is not a checkpoint of this project "
                        "(train.py and ensemble.py write them)")
    if kind is not None and ckpt.get("kind") != kind:
        article = {"member": "a", "ensemble": "an", "logits": "a"}
        raise UserError(f"checkpoint {path} is {article.get(ckpt.get('kind'), 'a')} {ckpt.get('kind')} checkpoint, "
                        f"expected {article[kind]} {kind} one")
    return upgrade(ckpt)


def upgrade(ckpt):
    """A checkpoint of an older format in FORMAT's keys. Format 1: `weights` ("raw"/"ema", member and
    ensemble members) became `use_ema`, `partial` became `epoch_sums`; a member had no `folds`; an ensemble's
    `combiner` was always the head. Formats 1 and 2: the eval pipeline was the report's (eval_size = img_size,
    bilinear, no crop; REPORT_EVAL), for a member, an ensemble and each of its members; a member had no
    `teacher`; an ensemble had no fold members (`groups` None) and embedded every member (`reference` None).
    Formats 1 to 3: an ensemble's members shared one pipeline, its top-level one (`pipelines`, each entry's
    `pipeline_index` 0)."""
    if ckpt["format"] == FORMAT:
        return ckpt
    if ckpt["format"] != "imgcls-checkpoint-3":
        ckpt = upgrade_to_3(ckpt)
    if ckpt["kind"] == "ensemble":
        ckpt["pipelines"] = [pipeline_of(ckpt)]
        for entry in ckpt["members"]:
            entry["pipeline_index"] = 0
    return dict(ckpt, format=FORMAT)


def upgrade_to_3(ckpt):
    """A format-1 or -2 checkpoint in format 3's keys (see upgrade)."""
    entries = [ckpt, *(ckpt["members"] if ckpt["kind"] == "ensemble" else [])]
    if ckpt["format"] == "imgcls-checkpoint-1":
        for entry in entries:
            if "weights" in entry:
                entry["use_ema"] = entry.pop("weights") == "ema"
        if "partial" in ckpt:
            ckpt["epoch_sums"] = ckpt.pop("partial")
        if ckpt["kind"] == "member":
            ckpt["folds"] = None  # format 1 had no --folds
        if ckpt["kind"] == "ensemble":
            ckpt["combiner"] = "head"
    if ckpt["kind"] != "logits":  # a logits cache of another format is recomputed (its settings differ)
        for entry in entries:
            entry.update({"eval_size": entry["img_size"], **REPORT_EVAL, **entry})
    if ckpt["kind"] == "member":
        ckpt["teacher"] = None
    if ckpt["kind"] == "ensemble":
        ckpt["groups"] = None
        for entry in ckpt["members"]:
            entry["reference"] = None
    return dict(ckpt, format="imgcls-checkpoint-3")


def spec_of(ckpt):
    """The SPEC_KEYS of a member checkpoint (or of an ensemble's member entry)."""
    return {key: ckpt[key] for key in SPEC_KEYS}


def task_of(ckpt):
    """The TASK_KEYS of a checkpoint or spec."""
    return {key: ckpt[key] for key in TASK_KEYS}


def pipeline_of(spec):
    """The PIPELINE_KEYS of a member's spec (or of a uniform ensemble): the images it takes."""
    return {key: spec[key] for key in PIPELINE_KEYS}


def distinct_pipelines(entries):
    """The distinct pipelines of ensemble entries (pipeline_of), in the order they first appear, and each
    entry's index into them."""
    pipelines = []
    for entry in entries:
        if pipeline_of(entry) not in pipelines:
            pipelines.append(pipeline_of(entry))
    return pipelines, [pipelines.index(pipeline_of(entry)) for entry in entries]


def input_pipelines(ckpt):
    """The pipelines a checkpoint's model takes (from load, or an ONNX model's metadata): one for a member or a
    uniform ensemble, one per tensor of its input tuple for a mixed ensemble (see ensemble_checkpoint)."""
    return ckpt["pipelines"] if ckpt["kind"] == "ensemble" and "pipelines" in ckpt else [pipeline_of(ckpt)]


def train_state(ckpt):
    return TrainState(**{key: ckpt[key] for key in TrainState.__dataclass_fields__})


def inference_state_dict(ckpt):
    """The state dict a member checkpoint's training chose for inference: raw or EMA (`use_ema`)."""
    return ckpt["ema_state_dict"] if ckpt.get("use_ema") else ckpt["state_dict"]


def build_member(spec, state_dict):
    """The member model that a spec describes, with these weights (no network, no original weights)."""
    model = models.build_model(spec["model"], spec["arch"], len(spec["class_names"]), weights="none",
                               vit_config=spec["vit_config"])
    model.load_state_dict(state_dict)
    return model


def referenced_state_dict(entry):
    """The inference weights of an ensemble member stored by reference: read from its file, which must be
    the one ensemble.py hashed."""
    path = Path(entry["reference"])
    if not path.is_file():
        raise UserError(f"ensemble member {path} does not exist (the ensemble references it instead of holding "
                        "its weights); put the file back, or rerun ensemble.py")
    if utils.file_sha256(path) != entry["sha256"]:
        raise UserError(f"ensemble member {path} has changed since ensemble.py referenced it (another SHA-256); "
                        "put the original back, or rerun ensemble.py with the new file")
    return inference_state_dict(load(path, kind="member"))


def ensemble_member_model(entry):
    """The model of one ensemble entry, from its embedded or referenced weights."""
    return build_member(entry, entry["state_dict"] if entry["reference"] is None else referenced_state_dict(entry))


def model_from_checkpoint(ckpt):
    """The model a checkpoint (from load) describes, in eval mode, on the CPU. A member uses the weights
    its training chose for inference. A fold ensemble's members are its groups, each a models.FoldAverage of
    its fold models. An ensemble takes a tensor, or (mixed) a tuple of tensors, one per pipeline, each member
    the one of its pipeline_index."""
    if ckpt["kind"] == "member":
        model = build_member(ckpt, inference_state_dict(ckpt))
    else:
        entries = [ensemble_member_model(entry) for entry in ckpt["members"]]
        inputs = [entry["pipeline_index"] for entry in ckpt["members"]]
        if ckpt["groups"] is None:
            members = entries
        else:  # a group's fold models share their pipeline (ensemble.fold_groups)
            members = [models.FoldAverage([entries[i] for i in group["entries"]]) for group in ckpt["groups"]]
            inputs = [inputs[group["entries"][0]] for group in ckpt["groups"]]
        model = models.StackingEnsemble(members, len(ckpt["class_names"]), inputs)
        model.head.load_state_dict(ckpt["head_state_dict"])
    return model.eval()


# ----------------------------------------------------------------------------
# writing

def member_spec(model, name, arch, class_names, img_size, mean, std, eval_size=None, interpolation="bilinear",
                crop_pct=None):
    """What a member checkpoint needs to rebuild its model and its input pipeline (SPEC_KEYS); eval_size
    defaults to img_size, and the defaults are the report's eval pipeline."""
    return dict(zip(SPEC_KEYS, (name, arch, list(class_names), int(img_size), list(mean), list(std),
                                models.vit_config_of(model), int(eval_size or img_size), str(interpolation),
                                None if crop_pct is None else float(crop_pct))))


def member_checkpoint(spec, *, state_dict, ema_state_dict, state, optimizer, scaler, rng, args, folds=None,
                      teacher=None):
    """train.py's last.pt: the spec, the weights (ema_state_dict None without --ema), the TrainState, the
    optimizer, scaler and every rank's RNG state, the run's flags (plain values), for a --folds run its
    fold ({"folds", "fold", "fold_seed", "held_out_sha256"}; None otherwise) and, for a --teacher run, the
    teacher's file and settings ({"path", "kind", "sha256", "alpha", "temp"}; None otherwise)."""
    return {"format": FORMAT, "kind": "member", **spec, "state_dict": state_dict, "ema_state_dict": ema_state_dict,
            **asdict(state), "optimizer": optimizer, "scaler": scaler, "rng": rng,
            "args": {key: str(value) if isinstance(value, Path) else value for key, value in args.items()},
            "folds": folds, "teacher": teacher}


def ensemble_member(ckpt, source, sha256):
    """An ensemble's entry for one member checkpoint: its spec and inference weights, and where they came from
    (`reference` None: the weights are embedded; see referenced)."""
    return dict(spec_of(ckpt), state_dict=inference_state_dict(ckpt), use_ema=bool(ckpt.get("use_ema")),
                source=str(source), sha256=sha256, reference=None)


def referenced(entry):
    """The entry without its weights: the ensemble reads them from the member file (absolute path), checked
    against its SHA-256, whenever it is loaded."""
    return dict(entry, state_dict=None, reference=str(Path(entry["source"]).resolve()))


def ensemble_checkpoint(members, head_state_dict, metrics, combiner="head", groups=None):
    """ensemble.py's ensemble.pt: the members (ensemble_member entries, sharing class names) and the head that
    combines their logits: the trained one, or (combiner "average") the one equal to their plain average.
    groups (fold members): [{"model", "arch", "folds", "fold_seed", "entries": indices into members, "fold":
    each entry's fold}], one per member type, whose fold models' logits are averaged before the head.
    "pipelines" holds the members' distinct pipelines (PIPELINE_KEYS) and each entry its "pipeline_index". A
    uniform ensemble (one pipeline) also has it at the top level, as before; a mixed one has no one pipeline, so
    its top-level pipeline keys are None: its images are a tuple, one tensor per pipeline."""
    pipelines, indices = distinct_pipelines(members)
    top = pipelines[0] if len(pipelines) == 1 else dict.fromkeys(PIPELINE_KEYS)
    return {"format": FORMAT, "kind": "ensemble", **task_of({**members[0], **top}),
            "members": [dict(entry, pipeline_index=index) for entry, index in zip(members, indices)],
            "pipelines": pipelines, "head_state_dict": head_state_dict, "combiner": combiner, "groups": groups,
            "metrics": metrics}


def logits_cache(settings, members):
    """ensemble.py's logits cache: {member sha256: logits and labels} computed under `settings`."""
    return {"format": FORMAT, "kind": "logits", "settings": settings, "members": members}


def save(ckpt, path):
    """Write a checkpoint atomically (utils.atomic_write)."""
    utils.atomic_save_torch(ckpt, path)
