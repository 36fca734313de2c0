"""The loops every script shares: the runtime (device, precision, memory format), one training step and
one training epoch, evaluation, and the one inference path (a loader in, logits out)."""
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import data
import utils
from utils import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ----------------------------------------------------------------------------
# the runtime: decided once per script, from the same flags with the same defaults everywhere

@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32, bf16 or fp16
    memory_format: torch.memory_format

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def images(self, batch):
        """A batch of images on the device, in the memory format; a tuple of batches (a mixed ensemble's
        pipelines), each."""
        if isinstance(batch, (tuple, list)):
            return tuple(self.images(images) for images in batch)
        return batch.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def place(self, model):
        return model.to(self.device, memory_format=self.memory_format)


def add_runtime_args(parser):
    parser.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda, else mps, else cpu")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto: bf16 on GPUs that have it, else fp16 (with a gradient scaler when training); "
                        "fp32 on the CPU (bf16 there is 1.5-2.2x faster on CPUs with AMX / AVX512-BF16)")
    parser.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                        help="channels_last memory format (auto: on for CUDA and the CPU, where convolutions "
                        "run faster in it; off for MPS)")


def add_inference_args(parser):
    """The flags of the scripts that run trained models over images (ensemble.py, predict.py, report.py):
    --batch-size and --workers (resolve_batch_size, data.loader_workers) and the runtime's."""
    parser.add_argument("--batch-size", type=int, default=-1, help="images per forward pass (-1: 64 on a GPU, 8 "
                        "on the CPU, where bigger batches run slower)")
    parser.add_argument("--workers", type=int, default=-1, help="DataLoader workers decoding images (-1: 0 on "
                        "the CPU, else one per core)")
    add_runtime_args(parser)


def resolve_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def resolve_precision(name, device):
    """auto: bf16 on GPUs that have it, else fp16 (with a scaler) on GPU, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return name


def resolve_runtime(device="auto", precision="auto", channels_last="auto", local_rank=0):
    """The Runtime of these flags; on CUDA it also turns on cudnn.benchmark and TF32 (once, for the process)."""
    device = resolve_device(device, local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    on = channels_last == "on" or (channels_last == "auto" and device.type in ("cuda", "cpu"))
    return Runtime(device, resolve_precision(precision, device), torch.channels_last if on else torch.contiguous_format)


def resolve_batch_size(flag, device):
    """Inference --batch-size: the value given, or for -1 64 on a GPU and 8 on the CPU, where bigger
    batches spill out of the caches and run slower (BENCHMARKS.md: ResNets fastest at 4-8)."""
    if flag == -1:
        return 8 if device.type == "cpu" else 64
    if flag < 1:
        raise UserError(f"--batch-size {flag} must be at least 1 (or -1: 64 on a GPU, 8 on the CPU)")
    return flag


# ----------------------------------------------------------------------------
# training

@dataclass
class Training:
    """The objects a training step needs. forward_model is model or its DDP / compiled wrapper; model is
    what the EMA follows and checkpoints save."""
    model: nn.Module
    forward_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    runtime: Runtime
    ema: Optional[nn.Module] = None  # timm's ModelEmaV3
    prepare_images: Optional[Callable] = None  # a loader batch's images -> device tensor (default runtime.images)
    # MixUp/CutMix on the device batch, before train_step: (images, labels) -> (mixed images, soft targets)
    mix: Optional[Callable] = None
    teacher: Optional[Callable] = None  # frozen, eval mode: the student's device batch -> logits (distillation)
    distill_alpha: float = 1.0  # weight of the distillation term; 1 - alpha weighs the hard-label loss
    distill_temp: float = 1.0


class NonFiniteError(Exception):
    """A non-finite loss (or gradient, seen in the weights) at `step` (1-based) of `epoch`."""

    def __init__(self, what, epoch, step):
        super().__init__(f"non-finite {what} at epoch {epoch}, step {step}")
        self.what, self.epoch, self.step = what, epoch, step


def distill_loss(logits, teacher_logits, temp):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch, in fp32 (Hinton et al.:
    the T^2 keeps the gradient's scale independent of T)."""
    return temp * temp * F.kl_div(F.log_softmax(logits.float() / temp, dim=1),
                                  F.log_softmax(teacher_logits.float() / temp, dim=1),
                                  reduction="batchmean", log_target=True)


def train_step(training, images, targets):
    """One optimisation step on a device batch; returns the loss and logits, detached (no host sync). With
    a teacher the loss is alpha * distill_loss + (1 - alpha) * the criterion's, the teacher seeing these
    very images (mixed ones too) under the same autocast."""
    with training.runtime.autocast():
        logits = training.forward_model(images)
        loss = training.criterion(logits, targets)
        if training.teacher is not None:
            with torch.no_grad():
                teacher_logits = training.teacher(images)
            alpha = training.distill_alpha
            loss = alpha * distill_loss(logits, teacher_logits, training.distill_temp) + (1 - alpha) * loss
    training.optimizer.zero_grad(set_to_none=True)
    training.scaler.scale(loss).backward()
    training.scaler.step(training.optimizer)
    training.scaler.update()
    return loss.detach(), logits.detach()


def all_finite(tensors):
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def train_one_epoch(training, loader, *, epoch, steps_per_epoch, lr_at, start_step=0, epoch_sums=None,
                    log_every=20, save_every=0, save_partial=None, stop=None, on_log=None, progress=True, desc=""):
    """Train over the loader's batches from `start_step`, setting the LR of each step to lr_at(step).

    epoch_sums: the running sums (loss, correct, count, seconds) of a mid-epoch checkpoint to continue
    from. Each param group's LR is lr_at(step) times its "lr_scale" (layer decay). With training.mix, the
    batch is mixed before train_step, and a prediction counts as correct when it is the class with the
    largest weight in its mixed target. Every log step checks for non-finite values (NonFiniteError) and for
    a stop request (a utils.StopSignal, shared by the ranks), then passes on_log(step, {"loss", "acc", "lr",
    "images_per_s"}) the epoch's running figures so far (this rank's); every `save_every` steps, and when stopping
    mid-epoch, save_partial(step, epoch_sums) writes a checkpoint. Returns (metrics reduced over ranks,
    None) at the epoch's end, or (None, step) when it stopped there."""
    runtime, world_size = training.runtime, dist.get_world_size() if dist.is_initialized() else 1
    prepare_images = training.prepare_images or runtime.images
    sums = epoch_sums or {"loss": 0.0, "correct": 0, "count": 0, "seconds": 0.0}
    loss_sum = torch.tensor(sums["loss"], dtype=torch.float64, device=runtime.device)
    correct = torch.tensor(sums["correct"], dtype=torch.int64, device=runtime.device)
    count = sums["count"]
    nonfinite_step = torch.tensor(-1, device=runtime.device)  # first step with a non-finite loss, found on device
    started = time.perf_counter() - sums["seconds"]
    bar = utils.progress(loader, desc=desc, initial=start_step, total=steps_per_epoch, enabled=progress, leave=False)
    step, lr = start_step, lr_at(start_step)
    for images, labels in bar:
        lr = lr_at(step)
        for group in training.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        images = prepare_images(images)
        labels = labels.to(runtime.device, non_blocking=True)
        targets = labels
        if training.mix is not None:
            images, targets = training.mix(images, labels)
            labels = targets.argmax(1)
        loss, logits = train_step(training, images, targets)
        if training.ema is not None:
            training.ema.update(training.model, step=(epoch - 1) * steps_per_epoch + step)
        if not training.scaler.is_enabled():  # fp16's scaler skips bad steps itself
            nonfinite_step.masked_fill_((nonfinite_step < 0) & ~torch.isfinite(loss), step)
        loss_sum += loss.double() * labels.numel()
        correct += (logits.argmax(1) == labels).sum()
        count += labels.numel()
        step += 1
        checkpoint_due = save_every and step % save_every == 0 and step < steps_per_epoch
        # ranks enter this block together: a signal seen by one rank is shared at the next log step
        signalled = stop is not None and stop.requested and world_size == 1
        if step % log_every == 0 or checkpoint_due or signalled or step == steps_per_epoch:
            bad_step, what = int(nonfinite_step.item()), "loss"
            if bad_step < 0 and not training.scaler.is_enabled() and not all_finite(training.model.parameters()):
                # a finite loss but a non-finite gradient (at this step or since the last check) shows in the
                # weights; fp16's scaler skips such steps instead
                bad_step, what = step - 1, "gradient"
            if utils.any_rank(bad_step >= 0, runtime.device):
                raise NonFiniteError(what, epoch, max(bad_step, 0) + 1)
            seconds = time.perf_counter() - started
            figures = {"loss": loss_sum.item() / count, "acc": 100 * correct.item() / count, "lr": lr,
                       "images_per_s": count * world_size / seconds}
            bar.set_postfix(loss=f"{figures['loss']:.4f}", acc=f"{figures['acc']:.2f}", lr=f"{lr:.2e}",
                            img_s=f"{figures['images_per_s']:.0f}")
            if on_log is not None:
                on_log(step, figures)
            stopping = utils.any_rank(stop is not None and stop.requested, runtime.device)
            if checkpoint_due or (stopping and step < steps_per_epoch):
                save_partial(step, {"loss": loss_sum.item(), "correct": int(correct.item()), "count": count,
                                    "seconds": time.perf_counter() - started})
                if stopping:
                    bar.close()
                    return None, step
    bar.close()
    seconds = time.perf_counter() - started
    totals = torch.stack([loss_sum, correct.double(), torch.tensor(count, device=runtime.device).double()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss_total, correct_total, count_total = totals.tolist()
    return {"lr": lr, "loss": loss_total / count_total, "acc": 100 * correct_total / count_total,
            "seconds": seconds, "images_per_s": count_total / seconds}, None


# ----------------------------------------------------------------------------
# evaluation and inference

def identity(images):
    return images


def view_of(view, images):
    """A test-time view of a device batch, or of each batch of a tuple (each at its own size)."""
    return tuple(view(x) for x in images) if isinstance(images, tuple) else view(images)


def infer(models, loader, runtime, *, views=(identity,), inputs=None, desc=None):
    """Every model's logits over the loader, in its order: ([(N, C) float32 on the CPU] per model,
    labels (N,)). Each model sees every view of the device batch (test-time augmentations) and its
    logits are averaged over them. A loader of tuples (transforms.PipelineTuple: one batch per pipeline)
    gives each model the whole tuple, or with inputs (an index per model) its own batch of it. Models are
    switched to eval mode; desc shows a progress bar."""
    for model in models:
        model.eval()
    outputs, labels = [[] for _ in models], []
    with torch.inference_mode():
        for images, targets in utils.progress(loader, desc=desc, total=len(loader), enabled=bool(desc), leave=False):
            images = runtime.images(images)
            with runtime.autocast():
                for i, (output, model) in enumerate(zip(outputs, models)):
                    x = images if inputs is None else images[inputs[i]]
                    output.append(torch.stack([model(view_of(view, x)).float() for view in views]).mean(0).cpu())
            labels.append(targets)
    if not labels:  # an empty shard
        return [torch.zeros(0, 0) for _ in models], torch.zeros(0, dtype=torch.int64)
    return [torch.cat(o) for o in outputs], torch.cat(labels)


def evaluate(model, loader, runtime):
    """{"loss", "acc" (%), "correct", "count"} over the loader's images (the counts give acc its interval,
    stats.wilson_interval); under torchrun each rank passes its own shard and the sums are reduced, so every
    image counts once."""
    (logits,), labels = infer([model], loader, runtime)
    loss = F.cross_entropy(logits, labels, reduction="sum").item() if len(labels) else 0.0
    totals = torch.tensor([loss, (logits.argmax(1) == labels).sum().item(), len(labels)], dtype=torch.float64,
                          device=runtime.device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    loss, correct, count = totals.tolist()
    return {"loss": loss / count, "acc": 100 * correct / count, "correct": int(correct), "count": int(count)}


def predict_images(model, dataset, runtime, *, batch_size, workers, views=(identity,), desc="predict"):
    """Logits (N, C) of the images of an ImageDataset whose labels are their indices (0..N-1), in order.
    ImageDataset replaces an image that fails to read by the next one, which would shift every later
    prediction, so the indices that come back are checked: a mismatch is a UserError naming the image."""
    loader = data.make_loader(dataset, device=runtime.device, workers=workers, batch_size=batch_size)
    runtime.place(model)
    (logits,), indices = infer([model], loader, runtime, views=views, desc=desc)
    check_indices(indices, dataset)
    return logits


def check_indices(indices, dataset):
    """The labels infer returned for a dataset whose labels are its indices must be 0..N-1: a UserError naming
    the first image that ImageDataset had to replace."""
    expected = torch.arange(len(dataset))
    if not torch.equal(indices, expected):
        lost = dataset.paths[int(expected[indices != expected][0])]
        raise UserError(f"image {lost} could not be read any more (it was readable when scanned); "
                        "check the file and run again")
