"""The teacher of `train.py --teacher PATH` (knowledge distillation): an ensemble.pt or a member's checkpoint,
frozen, in eval mode, fed the student's own augmented batch through its own preprocessing. The loss that
uses it is engine.distill_loss, inside engine.train_step."""
from torch import nn

import checkpoints
import transforms
import utils
from utils import UserError


class Teacher(nn.Module):
    """A frozen model that takes the student's device batch: renormalised (and resized) to its own
    preprocessing first (transforms.renormalize; nothing is done where the two agree). teacher_spec: a dict
    with img_size, mean and std, or a list of them (a mixed ensemble's pipelines), which renormalises the batch
    to each and passes the tuple."""

    def __init__(self, model, student_spec, teacher_spec):
        super().__init__()
        self.model, self.student_spec, self.teacher_spec = model, student_spec, teacher_spec
        self.requires_grad_(False).eval()

    def forward(self, images):
        if isinstance(self.teacher_spec, dict):
            return self.model(transforms.renormalize(images, self.student_spec, self.teacher_spec))
        return self.model(tuple(transforms.renormalize(images, self.student_spec, spec) for spec in self.teacher_spec))


def read_teacher(path, *, alpha, temp, resumed=None):
    """--teacher's checkpoint (checkpoints.load) and its record for the student's checkpoints ({"path",
    "kind", "sha256", "alpha", "temp"}). resumed: the student's checkpoint being resumed, whose teacher
    file must still have the SHA-256 it had when the run started."""
    try:
        ckpt = checkpoints.load(path)
    except UserError as error:
        raise UserError(f"--teacher: {error}") from error
    if ckpt["kind"] not in ("member", "ensemble"):
        raise UserError(f"--teacher {path} is a {ckpt['kind']} checkpoint; give an ensemble.pt or a member's "
                        "best.pt or last.pt")
    sha256 = utils.file_sha256(path)
    if resumed is not None:
        started = resumed.get("teacher")
        if started is None:
            raise UserError("--teacher cannot be added when resuming a run that trained without one; start a new "
                            "run in another --out-dir")
        if started["sha256"] != sha256:
            raise UserError(f"--teacher {path} has changed since this run started (SHA-256 {sha256[:12]}..., was "
                            f"{started['sha256'][:12]}...); put the original file back, or start a new run")
    return ckpt, {"path": str(path), "kind": ckpt["kind"], "sha256": sha256, "alpha": alpha, "temp": temp}


def build_teacher(ckpt, path, class_names, student_spec, runtime, data_dir):
    """The Teacher of a checkpoint from read_teacher, placed with the runtime; its classes must be the data's."""
    if ckpt["class_names"] != list(class_names):
        raise UserError(f"--teacher {path} was trained on other classes than {data_dir}/train "
                        f"({len(ckpt['class_names'])} vs {len(class_names)} classes, or another order)")
    model = runtime.place(checkpoints.model_from_checkpoint(ckpt))
    pipelines = checkpoints.input_pipelines(ckpt)
    return Teacher(model, student_spec, pipelines[0] if len(pipelines) == 1 else pipelines)
