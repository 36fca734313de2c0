"""Speed of the project's input pipeline and training loop against a re-implementation of the course
report's, in one run, on the same files and the same model. Prints one JSON object per line; every
field named *ratio* is project / report (or real / synthetic, or onnxruntime / torch), so higher is better.

    python bench.py data   # train pipeline images/s: per core (one process) and with N DataLoader workers
    python bench.py train  # training images/s: synthetic input (the compute ceiling) and real files
    python bench.py distill   # training images/s without a teacher, with a member and a 3-member ensemble teacher
    python bench.py gpu    # ResNeXt101_32x8d on a CUDA GPU, real files, projected time of the whole report
    python bench.py predict   # test-set inference images/s: predict.py's path against a per-image loop
    python bench.py predict --onnx   # ... and the same path with the model exported to ONNX (onnxruntime)
    python bench.py ensemble  # ensemble.py's time against the report's stacking (members forward every epoch)
    python bench.py accuracy  # held-out accuracy on real photos (Fashion-MNIST), several seeds: mean and spread
    python bench.py accuracy --suite oof   # ... of out-of-fold stacking against in-sample stacking

Without --data-dir each command writes real-size JPEGs (500-1000 px a side) into a temporary folder;
--data-dir DATA uses DATA/train/<class>/* instead (ensemble: a generated demo dataset, or DATA's
train/ and val/). BENCHMARKS.md holds measured figures.
"""
import argparse
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import timm
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

import cache
import checkpoints
import data
import demo_data
import distill
import engine
import ensemble
import fashion_mnist
import fused
import models
import onnx_runtime
import predict
import transforms
from utils import HelpFormatter, UserError, run_main

REPORT_BATCH = 32
REPORT_MEMBERS, REPORT_EPOCHS, REPORT_TRAIN_IMAGES = 3, 50, 20_700
REPORT_VAL_IMAGES, REPORT_TEST_IMAGES, REPORT_ENSEMBLE_EPOCHS = 324, 2_344, 20
# small enough for a CPU: resnet10t from scratch at 32 px, the report's recipe otherwise (LR for training from
# scratch); the freeze member's schedule is the report's, scaled to the epochs
ACCURACY_MEMBER_FLAGS = ["--arch", "resnet10t", "--weights", "none", "--img-size", "32", "--epochs", "6",
                         "--lr", "0.05", "--workers", "0"]


def emit(row):
    print(json.dumps(row), flush=True)


# ----------------------------------------------------------------------------
# the report's input path, re-implemented here so that it stays fixed whatever the project does:
# torchvision ImageFolder's loader (open, full decode, convert) and its train chain at 224 px

def report_loader(path):
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def report_transform(img_size):
    return v2.Compose([
        v2.RandomResizedCrop(img_size),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=30),
        v2.RandomPerspective(),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
    ])


def report_eval_transform(img_size):
    return v2.Compose([v2.Resize((img_size, img_size)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])


class ReportDataset(Dataset):
    def __init__(self, paths, labels, img_size):
        self.paths, self.labels, self.transform = [str(p) for p in paths], list(labels), report_transform(img_size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(report_loader(self.paths[index])), self.labels[index]


# ----------------------------------------------------------------------------
# files: generated photo-like JPEGs, or the user's train split

def photo_like(rng):
    """A JPEG-able image with what makes photos slow to decode: smooth shading, edges and sensor noise."""
    width, height = int(rng.integers(500, 1001)), int(rng.integers(500, 1001))
    img = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 200)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def write_photo(job):
    path, seed = job
    photo_like(np.random.default_rng(seed)).save(path, "JPEG", quality=90)


def make_jpegs(out_dir, count, classes=10, seed=0):
    """count JPEGs in out_dir/train/<class>/, written by one process per core."""
    jobs = []
    for i in range(count):
        folder = Path(out_dir) / "train" / str(i % classes)
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:06d}.jpg", seed * 1_000_003 + i))
    with multiprocessing.Pool(data.default_workers()) as pool:
        pool.map(write_photo, jobs, chunksize=8)
    return Path(out_dir)


def bench_files(args, tmp_dir):
    """(paths, labels, description) of --data-dir's train split, or of --files generated JPEGs."""
    if args.data_dir is not None:
        paths, labels, _ = data.load_split(args.data_dir, "train")
        source = str(args.data_dir)
    else:
        paths, labels, _ = data.load_split(make_jpegs(tmp_dir, args.files), "train")
        source = "generated"
    pixels = [math.prod(cache.image_size(path)) for path in paths[:64]]
    mean_bytes = float(np.mean([Path(p).stat().st_size for p in paths[:64]]))
    return paths, labels, {"source": source, "files": len(paths), "mean_megapixels": round(np.mean(pixels) / 1e6, 3),
                           "mean_kbytes": round(mean_bytes / 1024, 1)}


def environment(device):
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"bench": "env", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "pillow": PIL.__version__, "cpu": cpu, "cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


# ----------------------------------------------------------------------------
# data: the train pipeline alone

def draft_decode(path, img_size):
    """The fused pipelines' decode alone: the crop drawn, the JPEG decoded at the scale it allows."""
    with Image.open(path) as img:
        fused.draft_for_crop(img, fused.sample_train_params(img.width, img.height, img_size), img_size)
        img.load()


def per_core(pipelines, paths, seconds):
    """Images per CPU-second of each pipeline in this process (one thread), the pipelines taking turns
    over the same files and seeds, so that a busy machine slows them alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cpu, wall, done = dict.fromkeys(pipelines, 0.0), dict.fromkeys(pipelines, 0.0), dict.fromkeys(pipelines, 0)
    chunk, start = 8, 0
    while max(cpu.values()) < seconds:
        batch = [(start + i) % len(paths) for i in range(chunk)]
        for name, fn in pipelines.items():
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            for index in batch:
                # the same draws for both: under one seed the fused chain crops as the report's
                torch.default_generator.manual_seed(index)
                fn(paths[index])
            cpu[name] += time.process_time() - cpu_start
            wall[name] += time.perf_counter() - wall_start
            done[name] += len(batch)
        start += chunk
    torch.set_num_threads(threads)
    return {name: done[name] / cpu[name] for name in pipelines}, {name: done[name] / wall[name] for name in pipelines}


def loader_rate(loader, seconds, set_epoch=None):
    """Images/s a DataLoader delivers, from its first batch (worker start-up excluded) for `seconds`."""
    count, start, epoch = 0, None, 0
    while start is None or time.perf_counter() - start < seconds:
        if set_epoch is not None:
            set_epoch(epoch)
        for _, labels in loader:
            if start is None:
                start = time.perf_counter()
                continue
            count += len(labels)
            if time.perf_counter() - start >= seconds:
                break
        epoch += 1
    return count / (time.perf_counter() - start)


def enlarged_crops(paths, decoded, img_size, draws=20):
    """The fraction of RandomResizedCrop's crops (draws per image) whose shorter side is under img_size,
    so that the crop is enlarged: drawn on the files' own sizes and on the cached ones."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(0)
    counts = {"original": 0, "cached": 0}
    for index, path in enumerate(paths[:256]):
        sizes = {"original": cache.image_size(path), "cached": tuple(decoded.sizes[index])}
        for name, (width, height) in sizes.items():
            for _ in range(draws):
                params = fused.sample_train_params(width, height, img_size)
                counts[name] += min(params["width"], params["height"]) < img_size
    torch.set_rng_state(generator_state)
    total = draws * min(len(paths), 256)
    return {f"enlarged_crops_{name}_fraction": round(count / total, 3) for name, count in counts.items()}


def run_data(args):
    emit(environment(torch.device("cpu")))
    with tempfile.TemporaryDirectory() as tmp:
        paths, labels, files = bench_files(args, tmp)
        if len(paths) < REPORT_BATCH:
            raise UserError(f"{files['source']} has {len(paths)} train images; the bench needs {REPORT_BATCH} or more")
        size = args.img_size
        report_chain, fused_chain = report_transform(size), transforms.train_transform(size, aug="fused")
        fused_gpu = transforms.train_transform(size, aug="fused-gpu")
        start, cpu_start = time.perf_counter(), time.process_time()  # process time: all its threads
        decoded = cache.DecodedCache.build(paths, Path(tmp) / "cache", args.cache_size, progress=False)
        cache_build_s, cache_build_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        index_of = {str(p): i for i, p in enumerate(paths)}
        pipelines = {"decode_only": report_loader, "draft_decode_only": lambda p: draft_decode(p, size),
                     "report": lambda p: report_chain(report_loader(p)), "fused": fused_chain,
                     "fused_gpu_worker": fused_gpu,
                     "fused_cached": lambda p: fused_chain(decoded.image(index_of[p]))}
        cpu_rates, wall_rates = per_core(pipelines, [str(p) for p in paths], args.seconds)
        emit({"bench": "data", "mode": "one process, per CPU-second", "img_size": size, **files,
              "cache_size": args.cache_size, **{f"{k}_img_s": round(v, 1) for k, v in cpu_rates.items()},
              "fused_over_report_ratio": round(cpu_rates["fused"] / cpu_rates["report"], 2),
              "fused_gpu_worker_over_report_ratio": round(cpu_rates["fused_gpu_worker"] / cpu_rates["report"], 2),
              # epochs after the cache's build: the fused warp from memory-mapped pixels, no decode
              "fused_cached_over_report_ratio": round(cpu_rates["fused_cached"] / cpu_rates["report"], 2),
              # the most any pipeline that decodes as the fused ones do could reach: decoding and nothing else
              "draft_decode_only_over_report_ratio": round(cpu_rates["draft_decode_only"] / cpu_rates["report"], 2),
              "wall_fused_over_report_ratio": round(wall_rates["fused"] / wall_rates["report"], 2),
              # a one-off before the first epoch, on data.default_workers() threads
              "cache_build_img_s": round(len(paths) / cache_build_s, 1),
              "cache_megabytes": round(Path(decoded.pixels_path).stat().st_size / 2**20, 1),
              # a whole run of the report's 50 epochs per core: the cache's build (CPU time of all its
              # threads), then 50 epochs from it, against 50 epochs of the report's chain
              "fused_cached_50_epochs_over_report_ratio": round(
                  REPORT_EPOCHS / cpu_rates["report"]
                  / (cache_build_cpu_s / len(paths) + REPORT_EPOCHS / cpu_rates["fused_cached"]), 2),
              **enlarged_crops(paths, decoded, size)})

        workers = args.workers if args.workers > 0 else data.default_workers()
        # epochs of 8 batches per worker or more, so that the workers rarely wait at an epoch's end
        repeats = -(-8 * workers * REPORT_BATCH // len(paths))
        paths, labels = paths * repeats, labels * repeats
        decoded = cache.DecodedCache(decoded.pixels_path, np.tile(decoded.offsets, repeats),
                                     np.tile(decoded.sizes, (repeats, 1)))
        rates = {}
        for name, transform, source in (("report", None, None), ("fused", fused_chain, None),
                                        ("fused_gpu_worker", fused_gpu, None),
                                        ("fused_cached", fused_chain, decoded)):
            if transform is None:  # the same loader settings for both: only the pipeline differs
                loader = DataLoader(ReportDataset(paths, labels, size), batch_size=REPORT_BATCH, shuffle=True,
                                    num_workers=workers, persistent_workers=True, prefetch_factor=4)
                rates[name] = loader_rate(loader, args.seconds)
            else:
                sampler = data.TrainBatchSampler(len(paths), REPORT_BATCH, seed=0)
                loader = data.make_loader(data.ImageDataset(paths, labels, transform, source),
                                          device=torch.device("cpu"), workers=workers, batch_sampler=sampler)
                rates[name] = loader_rate(loader, args.seconds, sampler.set_epoch)
            del loader
        emit({"bench": "data", "mode": f"{workers} DataLoader workers", "img_size": size, "workers": workers,
              **files, **{f"{k}_img_s": round(v, 1) for k, v in rates.items()},
              **{f"{k}_img_s_per_worker": round(v / workers, 1) for k, v in rates.items()},
              "fused_over_report_ratio": round(rates["fused"] / rates["report"], 2),
              "fused_gpu_worker_over_report_ratio": round(rates["fused_gpu_worker"] / rates["report"], 2),
              "fused_cached_over_report_ratio": round(rates["fused_cached"] / rates["report"], 2)})


# ----------------------------------------------------------------------------
# training steps: the project's (AMP, channels_last, no host sync per step) and the report's

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def project_step(model, runtime, img_size, forward_model=None, teacher=None):
    """One optimizer step as train.py takes it (engine.train_step): autocast at the runtime's precision, in
    its memory format, the loss kept on the device (no host sync per step), distilled from `teacher` (a
    distill.Teacher) when given. Batches of (uint8 images, maps) from the fused-gpu pipeline are warped on
    the device first (fused.warp_on_device)."""
    training = engine.Training(model, forward_model or model, torch.optim.SGD(model.parameters(), lr=1e-3,
                                                                              momentum=0.9),
                               torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16"),
                               nn.CrossEntropyLoss(), runtime, teacher=teacher)
    warp = functools.partial(fused.warp_on_device, img_size=img_size, mean=transforms.IMAGENET_MEAN,
                             std=transforms.IMAGENET_STD, device=runtime.device, memory_format=runtime.memory_format)

    def step(images, labels):
        images = warp(images) if isinstance(images, (list, tuple)) else runtime.images(images)
        loss, _ = engine.train_step(training, images, labels.to(runtime.device, non_blocking=True))
        return loss
    return step


class ReportStep:
    """The report's step: fp32, default memory format, loss and accuracy read back (.item()) every step."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.running_loss, self.correct = 0.0, 0

    def __call__(self, images, labels):
        images, labels = images.to(self.device), labels.to(self.device)
        outputs = self.model(images)
        loss = F.cross_entropy(outputs, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.running_loss += loss.item() * images.size(0)
        self.correct += (outputs.argmax(1) == labels).sum().item()


def synthetic_batches(batch_size, img_size, num_classes, device):
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    while True:
        yield images, labels


def loader_batches(loader, set_epoch=None):
    epoch = 0
    while True:
        if set_epoch is not None:
            set_epoch(epoch)
        yield from loader
        epoch += 1


def step_rate(step, batches, steps, warmup, device):
    """Training images/s of `steps` steps after `warmup` ones (cudnn autotuning, compilation, workers)."""
    batches = iter(batches)
    for _ in range(warmup):
        step(*next(batches))
    sync(device)
    count, start = 0, time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        count += len(labels)
    sync(device)
    return count / (time.perf_counter() - start)


def interleaved_rates(runs, steps, warmup, device):
    """Training images/s of several (step, batches) runs taking turns step by step, so that a busy
    machine slows them alike; for in-memory batches only (a loader's workers would work ahead)."""
    runs = {name: (step, iter(batches)) for name, (step, batches) in runs.items()}
    for step, batches in runs.values():
        for _ in range(warmup):
            step(*next(batches))
    seconds, count = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0)
    for _ in range(steps):
        for name, (step, batches) in runs.items():
            images, labels = next(batches)
            sync(device)
            start = time.perf_counter()
            step(images, labels)
            sync(device)
            seconds[name] += time.perf_counter() - start
            count[name] += len(labels)
    return {name: count[name] / seconds[name] for name in runs}


def project_loader(paths, labels, img_size, device, workers, batch_size, aug):
    sampler = data.TrainBatchSampler(len(paths), batch_size, seed=0)
    dataset = data.ImageDataset(paths, labels, transforms.train_transform(img_size, aug=aug))
    return data.make_loader(dataset, device=device, workers=workers, batch_sampler=sampler), sampler


def report_loader_batches(paths, labels, img_size):
    """The report's DataLoader: shuffled batches of 32, decoded in the training process."""
    return loader_batches(DataLoader(ReportDataset(paths, labels, img_size), batch_size=REPORT_BATCH, shuffle=True,
                                     num_workers=0))


def training_setup(args, device, tmp_dir):
    """What `train` and `gpu` start from: (paths, labels, files description, number of classes, a
    random-init model on `device`, a copy of its initial weights, loader workers)."""
    paths, labels, files = bench_files(args, tmp_dir)
    if len(paths) < args.batch_size:
        raise UserError(f"{files['source']} has {len(paths)} train images, fewer than --batch-size "
                        f"{args.batch_size}; add files or lower --batch-size")
    num_classes = max(labels) + 1
    model = models.build_model("resnext", args.arch, num_classes, weights="none").to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    return paths, labels, files, num_classes, model, initial, data.loader_workers(args.workers, device)


def run_train(args):
    runtime = engine.resolve_runtime(args.device)  # train.py's defaults
    device, precision = runtime.device, runtime.precision
    emit(environment(device))
    with tempfile.TemporaryDirectory() as tmp:
        paths, labels, files, num_classes, _, initial, workers = training_setup(args, device, tmp)
        common = {"arch": args.arch, "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
                  "device": str(device), "precision": precision, **files}

        def fresh_step(kind):
            copy = models.build_model("resnext", args.arch, num_classes, weights="none").to(device)
            copy.load_state_dict(initial)
            if kind == "project":
                return project_step(runtime.place(copy).train(), runtime, args.img_size)
            return ReportStep(copy.train(), device)

        synthetic = interleaved_rates(
            {kind: (fresh_step(kind), synthetic_batches(args.batch_size, args.img_size, num_classes, device))
             for kind in ("report", "project")}, args.steps, args.warmup, device)
        aug = "fused-gpu" if device.type == "cuda" else "fused"
        loader, sampler = project_loader(paths, labels, args.img_size, device, workers, args.batch_size, aug)
        # report, project, project, report: a load that drifts during the run slows both alike (the
        # loops cannot take turns step by step: the project's workers would decode ahead meanwhile)
        steps = {"report": fresh_step("report"), "project": fresh_step("project")}
        batches = {"report": report_loader_batches(paths, labels, args.img_size),
                   "project": loader_batches(loader, sampler.set_epoch)}
        real = dict.fromkeys(steps, 0.0)
        for kind in ("report", "project", "project", "report"):
            real[kind] += step_rate(steps[kind], batches[kind], args.steps, args.warmup, device) / 2
        emit({"bench": "train", **common, "workers": workers,
              "synthetic_report_img_s": round(synthetic["report"], 2),
              "synthetic_project_img_s": round(synthetic["project"], 2),
              "real_report_img_s": round(real["report"], 2), "real_project_img_s": round(real["project"], 2),
              "synthetic_project_over_report_ratio": round(synthetic["project"] / synthetic["report"], 2),
              "real_project_over_report_ratio": round(real["project"] / real["report"], 2),
              "report_real_over_synthetic_ratio": round(real["report"] / synthetic["report"], 2),
              "project_real_over_synthetic_ratio": round(real["project"] / synthetic["project"], 2)})


# ----------------------------------------------------------------------------
# distill: what a teacher adds to a training step

def run_distill(args):
    """Training images/s (synthetic batches, train.py's runtime defaults) of one student without a teacher,
    with a teacher of its own size (a member) and with a stacked ensemble of three such members, the three
    steps taking turns; every network has the same arch and random weights."""
    runtime = engine.resolve_runtime(args.device)
    device, num_classes = runtime.device, 100
    emit(environment(device))
    spec = {"img_size": args.img_size, "mean": transforms.IMAGENET_MEAN, "std": transforms.IMAGENET_STD}

    def network():
        return runtime.place(models.build_model("resnext", args.arch, num_classes, weights="none"))
    teachers = {"none": None, "member": distill.Teacher(network(), spec, spec),
                "ensemble": distill.Teacher(models.StackingEnsemble([network() for _ in range(3)], num_classes).to(
                    device), spec, spec)}
    first = network()
    initial, params = first.state_dict(), models.count_params(first)
    runs = {}
    for name, teacher in teachers.items():
        student = network()
        student.load_state_dict(initial)
        runs[name] = (project_step(student.train(), runtime, args.img_size, teacher=teacher),
                      synthetic_batches(args.batch_size, args.img_size, num_classes, device))
    rates = interleaved_rates(runs, args.steps, args.warmup, device)
    emit({"bench": "distill", "arch": args.arch, "img_size": args.img_size, "batch_size": args.batch_size,
          "steps": args.steps, "device": str(device), "precision": runtime.precision,
          "student_params_millions": round(params / 1e6, 2),
          **{f"{name}_teacher_img_s": round(rate, 2) for name, rate in rates.items()},
          "member_teacher_over_none_ratio": round(rates["member"] / rates["none"], 2),
          "ensemble_teacher_over_none_ratio": round(rates["ensemble"] / rates["none"], 2)})


# ----------------------------------------------------------------------------
# gpu: ResNeXt101_32x8d at 224 on one CUDA GPU, and the projected time of the whole report

def eval_rate(model, runtime, batch_size, img_size, steps):
    """Inference images/s under the runtime (autocast, memory format), as engine.infer runs the members."""
    device = runtime.device
    model.eval()
    images = runtime.images(torch.randn(batch_size, 3, img_size, img_size, device=device))
    with torch.inference_mode(), runtime.autocast():
        for _ in range(3):
            model(images)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(images)
        sync(device)
    model.train()
    return steps * batch_size / (time.perf_counter() - start)


def run_gpu(args):
    if not torch.cuda.is_available():
        raise UserError("bench.py gpu needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); "
                        "run bench.py data or bench.py train here")
    measure_gpu(args, torch.device("cuda"))


def measure_gpu(args, device):
    started = time.perf_counter()
    runtime = engine.resolve_runtime(device.type)  # train.py's defaults
    precision = runtime.precision
    emit(environment(device))
    with tempfile.TemporaryDirectory() as tmp:
        paths, labels, files, num_classes, model, initial, workers = training_setup(args, device, tmp)
        common = {"arch": args.arch, "img_size": args.img_size, "batch_size": args.batch_size,
                  "precision": precision, "workers": workers, **files}

        def fresh(memory_format):
            model.load_state_dict(initial)
            return model.to(memory_format=memory_format).train()

        row = {"bench": "gpu", **common}
        project = project_step(fresh(runtime.memory_format), runtime, args.img_size)
        synthetic = synthetic_batches(args.batch_size, args.img_size, num_classes, device)
        row["synthetic_project_img_s"] = step_rate(project, synthetic, args.steps, args.warmup, device)
        report = ReportStep(fresh(torch.contiguous_format), device)
        synthetic = synthetic_batches(REPORT_BATCH, args.img_size, num_classes, device)
        row["synthetic_report_img_s"] = step_rate(report, synthetic, args.steps, args.warmup, device)

        loader, sampler = project_loader(paths, labels, args.img_size, device, workers, args.batch_size,
                                         "fused-gpu")
        steps_per_epoch = sampler.steps_per_epoch
        loader_steps = max(args.epochs * steps_per_epoch - args.warmup, 1)

        def warp_only(images, _labels):  # the loader and the GPU warp, without the model
            fused.warp_on_device(images, args.img_size, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD,
                                 device=device, memory_format=runtime.memory_format)
        row["loader_img_s"] = step_rate(warp_only, loader_batches(loader, sampler.set_epoch), loader_steps,
                                        args.warmup, device)
        project = project_step(fresh(runtime.memory_format), runtime, args.img_size)
        row["real_project_img_s"] = step_rate(project, loader_batches(loader, sampler.set_epoch), loader_steps,
                                              args.warmup, device)
        del loader
        report = ReportStep(fresh(torch.contiguous_format), device)
        row["real_report_img_s"] = step_rate(report, report_loader_batches(paths, labels, args.img_size),
                                             args.report_steps, 2, device)
        row["eval_project_img_s"] = eval_rate(model, runtime, 4 * args.batch_size, args.img_size, args.steps)
        row["real_over_synthetic_ratio"] = row["real_project_img_s"] / row["synthetic_project_img_s"]
        row["synthetic_project_over_report_ratio"] = row["synthetic_project_img_s"] / row["synthetic_report_img_s"]
        row["real_project_over_report_ratio"] = row["real_project_img_s"] / row["real_report_img_s"]

        # compilation takes minutes: only when it fits in --time-limit
        compiled = None
        if args.compile and time.perf_counter() - started < args.time_limit - args.compile_allowance:
            try:
                project = project_step(fresh(runtime.memory_format), runtime, args.img_size,
                                       forward_model=torch.compile(model))
                compiled = step_rate(project, synthetic_batches(args.batch_size, args.img_size, num_classes, device),
                                     args.steps, args.warmup, device)
                row["synthetic_compiled_img_s"] = compiled
                row["compiled_over_eager_ratio"] = compiled / row["synthetic_project_img_s"]
            except Exception as error:  # inductor needs a compiler toolchain: report, do not abort the run
                row["compile_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        else:
            row["compile_skipped"] = "--no-compile" if not args.compile else "not enough of --time-limit left"
        emit({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

        # the report's full run: 3 members x 50 epochs (train, then val), the stacking head's 20 epochs
        # over the 3 members' outputs, then 3 members over the test set
        train_s = REPORT_MEMBERS * REPORT_EPOCHS * REPORT_TRAIN_IMAGES / row["real_project_img_s"]
        val_s = REPORT_MEMBERS * REPORT_EPOCHS * REPORT_VAL_IMAGES / row["eval_project_img_s"]
        ensemble_s = REPORT_ENSEMBLE_EPOCHS * REPORT_MEMBERS * REPORT_TRAIN_IMAGES / row["eval_project_img_s"]
        predict_s = REPORT_MEMBERS * REPORT_TEST_IMAGES / row["eval_project_img_s"]
        total_s = train_s + val_s + ensemble_s + predict_s
        projection = {"bench": "gpu-projection", "arch": args.arch,
                      "assumes": "3 members x 50 epochs x 20,700 train images at real_project_img_s (ResNeXt "
                                 "speed for all three members); val, ensemble (20 epochs of 3 member forwards, "
                                 "no cached outputs) and predict at eval_project_img_s",
                      "train_hours": train_s / 3600,
                      "val_ensemble_predict_hours": (val_s + ensemble_s + predict_s) / 3600,
                      "total_hours": total_s / 3600,
                      "report_train_hours": REPORT_MEMBERS * REPORT_EPOCHS * REPORT_TRAIN_IMAGES
                      / row["real_report_img_s"] / 3600}
        if compiled is not None:
            # compiled training runs at the slower of the compiled model and the loader
            projection["train_hours_compiled"] = (REPORT_MEMBERS * REPORT_EPOCHS * REPORT_TRAIN_IMAGES
                                                  / min(compiled, row["loader_img_s"]) / 3600)
        projection["report_over_project_train_time_ratio"] = (projection["report_train_hours"]
                                                              / projection["train_hours"])
        emit({k: round(v, 3) if isinstance(v, float) else v for k, v in projection.items()})


# ----------------------------------------------------------------------------
# predict: predict.py's inference path (engine.predict_images) against the report's per-image loop, same
# model and files

def report_predict(model, paths, img_size):
    """The report's inference: each test image opened with PIL, the eval transform, one forward pass each."""
    transform = report_eval_transform(img_size)
    model.to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        return torch.cat([model(transform(report_loader(path)).unsqueeze(0)) for path in paths])


def run_predict(args):
    defaults = predict.get_args_parser().parse_args([])
    runtime = engine.resolve_runtime("cpu", args.precision, defaults.channels_last)
    device, precision = runtime.device, runtime.precision
    workers = data.loader_workers(defaults.workers, device)
    batch_size = engine.resolve_batch_size(defaults.batch_size, device)
    emit(environment(device))
    with tempfile.TemporaryDirectory() as tmp:
        paths, _, files = bench_files(args, tmp)
        paths = paths[:args.files]

        def project_predict(images, model):  # as predict.py runs a checkpoint (or an ONNX model)
            dataset = data.ImageDataset(images, range(len(images)), transforms.eval_transform(args.img_size))
            return engine.predict_images(model, dataset, runtime, batch_size=batch_size, workers=workers, desc=None)

        def timed(fn, *fn_args):
            start = time.perf_counter()
            return fn(*fn_args), time.perf_counter() - start

        model = models.build_model("resnext", args.arch, 100, weights="none").eval()
        # both warm: first-call allocations and oneDNN's kernels for each batch shape out of the timings
        warmup = paths[:batch_size] * -(-batch_size // len(paths))
        report_predict(model, paths[:1], args.img_size)
        project_predict(warmup, model)
        report, report_s = timed(report_predict, model, paths, args.img_size)
        project, project_s = timed(project_predict, paths, model)
        forward_batched = forward_rate(model, len(paths), batch_size, args.img_size, runtime)
        row = {"bench": "predict", "arch": args.arch, "img_size": args.img_size, "precision": precision,
               "batch_size": batch_size, "workers": workers, **files, "images": len(paths),
               "report_images_per_s": round(len(paths) / report_s, 2),
               "project_images_per_s": round(len(paths) / project_s, 2),
               "same_argmax_fraction": round((report.argmax(1) == project.argmax(1)).float().mean().item(), 3),
               "speed_ratio": round(report_s / project_s, 2),
               # the model alone on in-memory batches, as predict runs it: what predict would reach if
               # reading and decoding the files cost nothing; no input pipeline can beat this ratio
               "forward_batched_images_per_s": round(forward_batched, 2),
               "ceiling_ratio": round(forward_batched * report_s / len(paths), 2)}
        if args.onnx:  # the same model exported as export.py does it, on the same path, files and batches
            task = {"kind": "member", "class_names": [str(i) for i in range(100)], "img_size": args.img_size,
                    "mean": transforms.IMAGENET_MEAN, "std": transforms.IMAGENET_STD, "eval_size": args.img_size,
                    "interpolation": "bilinear", "crop_pct": None}
            graph = onnx_runtime.to_onnx(model, args.img_size, onnx_runtime.metadata_of(task, "bench", ""))
            onnx_model = onnx_runtime.OnnxModel(graph)
            project_predict(warmup, onnx_model)
            # torch and onnxruntime take turns, chunk by chunk, so that a change of load on a shared machine
            # falls on both; the model alone likewise, on as many in-memory images per turn
            chunk, chunks = 4 * batch_size, range(0, len(paths), 4 * batch_size)
            seconds, forward_seconds = {"torch": 0.0, "onnx": 0.0}, {"torch": 0.0, "onnx": 0.0}
            logits = {"torch": [], "onnx": []}
            for start in chunks:
                for name, run_model in (("torch", model), ("onnx", onnx_model)):
                    part_logits, part_s = timed(project_predict, paths[start:start + chunk], run_model)
                    logits[name].append(part_logits)
                    seconds[name] += part_s
                    forward_seconds[name] += chunk / forward_rate(run_model, chunk, batch_size, args.img_size, runtime)
            images_per_s = {name: len(paths) / value for name, value in seconds.items()}
            forward_per_s = {name: chunk * len(chunks) / value for name, value in forward_seconds.items()}
            difference = (torch.cat(logits["onnx"]) - torch.cat(logits["torch"])).abs().max().item()
            row.update({"onnx_torch_images_per_s": round(images_per_s["torch"], 2),
                        "onnx_images_per_s": round(images_per_s["onnx"], 2),
                        "onnx_over_torch_ratio": round(images_per_s["onnx"] / images_per_s["torch"], 2),
                        "onnx_forward_torch_images_per_s": round(forward_per_s["torch"], 2),
                        "onnx_forward_images_per_s": round(forward_per_s["onnx"], 2),
                        "onnx_forward_over_torch_ratio": round(forward_per_s["onnx"] / forward_per_s["torch"], 2),
                        "onnx_max_abs_logit_diff": float(f"{difference:.2e}")})
    emit(row)


def forward_rate(model, images, batch_size, img_size, runtime):
    """Images/s of the model's forward pass alone over `images` random images in batches."""
    runtime.place(model).eval()
    batch = runtime.images(torch.randn(batch_size, 3, img_size, img_size))
    with torch.inference_mode(), runtime.autocast():
        model(batch)
        start = time.perf_counter()
        for done in range(0, images, batch_size):
            model(batch[:min(batch_size, images - done)])
    return images / (time.perf_counter() - start)


# ----------------------------------------------------------------------------
# ensemble: ensemble.main (member logits computed once, the head trained on them) against the report's
# stacking (the members forward every batch of every epoch, in train mode)

def write_members(out_dir, arch, class_names, img_size, count=REPORT_MEMBERS):
    """`count` member checkpoints of random weights (a different seed each), as train.py writes them."""
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = models.build_model("resnext", arch, len(class_names), weights="none")
        spec = checkpoints.member_spec(model, "resnext", arch, class_names, img_size, transforms.IMAGENET_MEAN,
                                       transforms.IMAGENET_STD)
        ckpt = checkpoints.member_checkpoint(spec, state_dict=model.state_dict(), ema_state_dict=None,
                                             state=checkpoints.TrainState(), optimizer={}, scaler={}, rng=[],
                                             args={"model": "resnext"})
        paths.append(Path(out_dir) / f"member{i}.pt")
        checkpoints.save(ckpt, paths[-1])
    return paths


def project_ensemble(members, data_dir, out_dir, epochs, workers):
    """Seconds of one ensemble.main run into an empty --out-dir (no logits cache); its printing goes to stderr
    so that stdout stays JSON lines."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        ensemble.main(["--members", *map(str, members), "--data-dir", str(data_dir), "--out-dir", str(out_dir),
                       "--epochs", str(epochs), "--workers", str(workers)])
    return time.perf_counter() - start


def report_ensemble(members, data_dir, epochs, workers):
    """Seconds of the report's stacking: the frozen members in train mode (their BatchNorm statistics keep
    moving) forward every batch of every epoch, a Linear head on their concatenated logits, SGD, then val."""
    start = time.perf_counter()
    ckpts = [checkpoints.load(path, kind="member") for path in members]
    class_names, img_size = ckpts[0]["class_names"], ckpts[0]["img_size"]
    model = models.StackingEnsemble([checkpoints.model_from_checkpoint(c).requires_grad_(False) for c in ckpts],
                                    len(class_names))
    train_paths, train_labels, _ = data.load_split(data_dir, "train")
    val_paths, val_labels, _ = data.load_split(data_dir, "val", class_names)
    train_loader = DataLoader(ReportDataset(train_paths, train_labels, img_size), batch_size=REPORT_BATCH,
                              shuffle=True, num_workers=workers)
    val_loader = DataLoader(data.ImageDataset(val_paths, val_labels, transforms.eval_transform(img_size)),
                            batch_size=REPORT_BATCH, num_workers=workers)
    optimizer = torch.optim.SGD(model.head.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(epochs):
        model.train()
        for images, labels in train_loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for images, _ in val_loader:
                model(images)
    return time.perf_counter() - start


def run_ensemble(args):
    emit(environment(torch.device("cpu")))
    workers = data.loader_workers(args.workers, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = args.data_dir or demo_data.make_demo(tmp / "data", train_per_class=args.train_per_class,
                                                        val_per_class=max(1, args.train_per_class // 4),
                                                        test_per_class=0)
        train_paths, _, class_names = data.load_split(data_dir, "train")
        members = write_members(tmp / "members", args.arch, class_names, args.img_size)
        project_s = project_ensemble(members, data_dir, tmp / "full", args.epochs, workers)
        one_epoch_s = project_ensemble(members, data_dir, tmp / "one", 1, workers)
        report_s = report_ensemble(members, data_dir, args.epochs, workers)
    emit({"bench": "ensemble", "arch": args.arch, "img_size": args.img_size, "members": len(members),
          "source": str(args.data_dir) if args.data_dir else "demo", "train_images": len(train_paths),
          "classes": len(class_names), "epochs": args.epochs, "workers": workers,
          "project_s": round(project_s, 2), "project_1_epoch_s": round(one_epoch_s, 2),
          "report_s": round(report_s, 2), "head_epochs_ratio": round(project_s / one_epoch_s, 2),
          "speedup_ratio": round(report_s / project_s, 2)})


# ----------------------------------------------------------------------------
# accuracy: the project's scripts, run as a user runs them, on real photos in the competition layout; each
# suite trains from scratch (no pretrained weights needed) and scores the held-out test labels

def script(*args, quiet=True):
    """Run one of the project's scripts; its output goes to stderr (stdout stays JSON lines)."""
    command = [sys.executable, *map(str, args)]
    result = subprocess.run(command, stdout=subprocess.PIPE if quiet else sys.stderr, stderr=subprocess.STDOUT,
                            text=True)
    if result.returncode != 0:
        raise UserError(f"'{' '.join(map(str, args))}' failed:\n{result.stdout or ''}")


def train_member(run_dir, model, data_dir, seed, flags):
    """A finished train.py run in run_dir (an interrupted benchmark resumes it); returns its best.pt."""
    script("train.py", "--model", model, "--data-dir", data_dir, "--out-dir", run_dir, "--seed", seed,
           "--resume", *flags)
    return Path(run_dir) / "best.pt"


def test_accuracy(checkpoint, data_dir, out_csv):
    """% of the test images that predict.py labels right (test_labels.csv beside test/)."""
    script("predict.py", "--checkpoint", checkpoint, "--data-dir", data_dir, "--out", out_csv)
    truth = pd.read_csv(Path(data_dir) / "test_labels.csv", dtype=str).set_index("image_name")["label"]
    predicted = pd.read_csv(out_csv, dtype=str).set_index("image_name")["pred_label"]
    return round(100 * float((predicted[truth.index] == truth).mean()), 2)


def val_accuracy(checkpoint):
    ckpt = checkpoints.load(checkpoint)
    return round(ckpt["best_acc"] if ckpt["kind"] == "member" else ckpt["metrics"]["val_acc"], 2)


def suite_members(args, data_dir, work, seed):
    """The report's workflow: the three members, stacked; val and test accuracy of each and of the ensemble."""
    vit_dir = work.parent / "tiny-vit"
    if not (vit_dir / "config.json").is_file():
        models.save_random_vit(vit_dir, models.DEMO_VIT_CONFIG)
    extra = {"resnext": [], "resnext_freeze": [], "resnext_vit": ["--vit-weights", vit_dir]}
    row = {}
    for model, flags in extra.items():
        best = train_member(work / model, model, data_dir, seed, [*args.member_flags, *flags])
        row[f"{model}_val"] = val_accuracy(best)
        row[f"{model}_test"] = test_accuracy(best, data_dir, work / model / "test.csv")
    script("ensemble.py", "--members", *(work / m / "best.pt" for m in extra), "--data-dir", data_dir,
           "--out-dir", work / "ensemble")
    metrics = json.loads((work / "ensemble" / "metrics.json").read_text())
    row["ensemble_val"] = round(metrics["val_acc"], 2)
    row["average_val"] = round(metrics["logit_average_val_acc"], 2)
    row["ensemble_test"] = test_accuracy(work / "ensemble" / "ensemble.pt", data_dir, work / "ensemble" / "test.csv")
    return row


# the strong recipe's training parts from scratch (no layer decay: it is for fine-tuning; the report's eval
# pipeline, so that only training differs), AdamW at an LR for training from scratch; after --member-flags
RECIPE_STRONG_FLAGS = ["--recipe", "strong", "--preprocessing", "report", "--layer-decay", "1", "--lr", "1e-3"]
EVAL_SCALE = 1.25  # the recipe suite's eval-above-train-size rows: eval size = round(1.25 x train size)


def with_eval_size(checkpoint, eval_size, out):
    """A copy of a member checkpoint whose stored eval size is eval_size (its weights unchanged)."""
    ckpt = checkpoints.load(checkpoint, kind="member")
    checkpoints.save(dict(ckpt, eval_size=eval_size), out)
    return out


def suite_recipe(args, data_dir, work, seed):
    """The report's recipe against the strong recipe's training parts (same arch, size and epochs): val and
    test accuracy of each, and the test accuracy of each evaluated at EVAL_SCALE x its train size (FixRes)."""
    row = {}
    for name, flags in {"report": [], "strong": RECIPE_STRONG_FLAGS}.items():
        best = train_member(work / name, "resnext", data_dir, seed, [*args.member_flags, *flags])
        row[f"{name}_val"] = val_accuracy(best)
        row[f"{name}_test"] = test_accuracy(best, data_dir, work / name / "test.csv")
        size = round(EVAL_SCALE * checkpoints.load(best)["img_size"])
        larger = with_eval_size(best, size, work / name / f"eval{size}.pt")
        row[f"{name}_eval{size}_test"] = test_accuracy(larger, data_dir, work / name / f"test_eval{size}.csv")
    return row


OOF_TYPES = ("resnext", "resnext_freeze")
OOF_FOLDS = 3


def suite_oof(args, data_dir, work, seed):
    """Out-of-fold against in-sample stacking, same member types and recipe: OOF_FOLDS fold runs of each type on
    the pooled train/ + val/ (--fold-seed = seed) stacked out-of-fold, and plain runs on train/ stacked as
    ensemble.py always did; test accuracy of each head and of each logit average."""
    row = {}
    for model in OOF_TYPES:
        for fold in range(OOF_FOLDS):
            train_member(work / f"{model}_fold{fold}", model, data_dir, seed,
                         [*args.member_flags, "--folds", OOF_FOLDS, "--fold", fold, "--fold-seed", seed])
        train_member(work / model, model, data_dir, seed, args.member_flags)
    members = {"oof": [work / f"{model}_fold{fold}" / "best.pt" for model in OOF_TYPES for fold in range(OOF_FOLDS)],
               "insample": [work / model / "best.pt" for model in OOF_TYPES]}
    for kind, paths in members.items():
        for combiner in ("head", "average"):
            out = work / f"{kind}_{combiner}"
            # the two combiners share one logits cache: the members run once per kind
            script("ensemble.py", "--members", *paths, "--data-dir", data_dir, "--out-dir", work / kind,
                   "--combiner", combiner)
            metrics = json.loads((work / kind / "metrics.json").read_text())
            row[f"{kind}_{combiner}_test"] = test_accuracy(work / kind / "ensemble.pt", data_dir, out / "test.csv")
        # out-of-fold (cross-validated head) or val figures, as ensemble.py estimates them before any test image
        row[f"{kind}_head_estimate"] = round(metrics["head_val_acc"], 2)
        row[f"{kind}_average_estimate"] = round(metrics["logit_average_val_acc"], 2)
    return row


def suite_distill(args, data_dir, work, seed):
    """Distillation: the members suite, then a resnext student with the members' flags distilled from their
    stacked ensemble (--teacher). The student alone is the suite's resnext member (same flags and seed: only
    the loss differs). With --distill-epochs N, the student alone and distilled again, trained N epochs."""
    row = suite_members(args, data_dir, work, seed)
    teacher = work / "ensemble" / "ensemble.pt"
    runs = [("distilled", ["--teacher", teacher])]
    if args.distill_epochs:
        epochs = ["--epochs", args.distill_epochs]
        runs += [(f"resnext_{args.distill_epochs}ep", epochs),
                 (f"distilled_{args.distill_epochs}ep", [*epochs, "--teacher", teacher])]
    for name, flags in runs:
        best = train_member(work / name, "resnext", data_dir, seed, [*args.member_flags, *flags])
        row[f"{name}_val"] = val_accuracy(best)
        row[f"{name}_test"] = test_accuracy(best, data_dir, work / name / "test.csv")
    return row


# the mixed suite's second member: another architecture, image size and eval pipeline (resnet14t's pretrained
# config: bicubic, a center crop) than --member-flags' resnet10t at 32 px; after --member-flags
MIXED_SECOND_FLAGS = ["--arch", "resnet14t", "--img-size", "40", "--eval-size", "40", "--preprocessing", "pretrained"]


def suite_mixed(args, data_dir, work, seed):
    """A mixed ensemble: a resnext member with --member-flags and one with MIXED_SECOND_FLAGS (each with its own
    preprocessing), stacked; test accuracy of each member, of the head and of the logit average, and of the
    member with the higher val accuracy (the one a user would submit without the ensemble)."""
    row, members = {}, {"first": [], "second": MIXED_SECOND_FLAGS}
    for name, flags in members.items():
        best = train_member(work / name, "resnext", data_dir, seed, [*args.member_flags, *flags])
        row[f"{name}_val"] = val_accuracy(best)
        row[f"{name}_test"] = test_accuracy(best, data_dir, work / name / "test.csv")
    chosen = max(members, key=lambda name: row[f"{name}_val"])  # the first of equal val accuracies
    row["best_member_test"] = row[f"{chosen}_test"]
    for combiner in ("head", "average"):
        out = work / f"ensemble_{combiner}"
        script("ensemble.py", "--members", *(work / name / "best.pt" for name in members), "--data-dir", data_dir,
               "--out-dir", out, "--combiner", combiner)
        row[f"{combiner}_test"] = test_accuracy(out / "ensemble.pt", data_dir, out / "test.csv")
    row["head_gain"] = round(row["head_test"] - row["best_member_test"], 2)
    return row


ACCURACY_SUITES = {"members": suite_members, "recipe": suite_recipe, "oof": suite_oof,
                   "distill": suite_distill, "mixed": suite_mixed}


def summarize(rows):
    """Mean, sample standard deviation, min and max over seeds of every metric."""
    frame = pd.DataFrame(rows).drop(columns=["seed"])
    return {column: {"mean": round(frame[column].mean(), 2), "std": round(frame[column].std(ddof=1), 2)
                     if len(frame) > 1 else 0.0, "min": frame[column].min(), "max": frame[column].max()}
            for column in frame.columns}


def run_accuracy(args):
    emit(environment(torch.device("cpu")))
    data_dir = args.work_dir / "data"
    if not (data_dir / "test_labels.csv").is_file():
        fashion_mnist.write_layout(data_dir, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                   test_per_class=args.test_per_class, source_dir=args.fashion_mnist)
    rows = []
    for seed in args.seeds:
        row = ACCURACY_SUITES[args.suite](args, data_dir, args.work_dir / args.suite / f"seed{seed}", seed)
        rows.append({"seed": seed, **row})
        emit({"bench": "accuracy", "suite": args.suite, "seed": seed, **row})
    emit({"bench": "accuracy", "suite": args.suite, "seeds": args.seeds, "summary": summarize(rows),
          "train_per_class": args.train_per_class, "val_per_class": args.val_per_class,
          "test_per_class": args.test_per_class, "member_flags": args.member_flags})


# ----------------------------------------------------------------------------

def get_args_parser():
    fmt = HelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, files, img_size=224):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=fmt)
        p.add_argument("--data-dir", type=Path, help="use DATA/train/<class>/* instead of generated JPEGs")
        p.add_argument("--files", type=int, default=files, help="how many JPEGs to generate without --data-dir")
        p.add_argument("--img-size", type=int, default=img_size, help="output (train) image size")
        p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: as train.py: "
                       "0 on the CPU, else one per core; data: one per core)")
        return p

    p = add("data", "train pipeline images/s: the report's chain against the fused one", files=64)
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time of each pipeline and mode")
    p.add_argument("--cache-size", type=int, help="shorter side of the decoded-image cache (train.py's "
                   "--cache-size; default: 2x --img-size)")

    p = add("train", "training images/s at equal model, size and batch: synthetic input and real files",
            files=96)
    p.add_argument("--arch", default="resnet10t", help="timm ResNet-family network (random init)")
    p.add_argument("--batch-size", type=int, default=REPORT_BATCH, help="batch size of both loops")
    p.add_argument("--steps", type=int, default=4, help="measured steps of each loop")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="device")

    p = sub.add_parser("distill", formatter_class=fmt, help="training images/s without a teacher, with a "
                       "member teacher and with a 3-member ensemble teacher (synthetic input)",
                       description="training images/s of engine.train_step on synthetic batches without a "
                       "teacher, with a teacher of the student's size and with a stacked ensemble of three, "
                       "the steps taking turns (random weights, same arch)")
    p.add_argument("--arch", default="resnet10t", help="timm ResNet-family network of student and teachers")
    p.add_argument("--img-size", type=int, default=224, help="image size of student and teachers")
    p.add_argument("--batch-size", type=int, default=REPORT_BATCH, help="batch size")
    p.add_argument("--steps", type=int, default=4, help="measured steps of each loop")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="device")

    p = add("gpu", "ResNeXt101_32x8d on a CUDA GPU: synthetic and real-file training images/s, projected "
            "time of the report's full run", files=2048)
    p.add_argument("--arch", default=models.DEFAULT_ARCH, help="timm ResNet-family network (random init)")
    p.add_argument("--batch-size", type=int, default=REPORT_BATCH, help="batch size of the project's loop")
    p.add_argument("--steps", type=int, default=30, help="measured steps on synthetic input")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps before each measurement")
    p.add_argument("--epochs", type=int, default=3, help="passes over the files for the real-file rate")
    p.add_argument("--report-steps", type=int, default=20, help="measured steps of the report's real-file loop "
                   "(it decodes in the training process: slow)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rate")
    p.add_argument("--time-limit", type=float, default=540, help="seconds; compilation is skipped when it "
                   "would not fit")
    p.add_argument("--compile-allowance", type=float, default=240, help="seconds kept free for compilation")

    p = sub.add_parser("predict", formatter_class=fmt, help="inference images/s of predict.py's path "
                       "(its defaults) against the report's per-image loop, same model and files",
                       description="inference images/s of predict.py's path (engine.predict_images, its defaults) "
                       "against the report's per-image loop (PIL open, eval transform, one fp32 forward per image)")
    p.add_argument("--data-dir", type=Path, help="use the first --images of DATA/train/<class>/* instead of "
                   "generated JPEGs")
    p.add_argument("--images", dest="files", metavar="N", type=int, default=256, help="how many images to predict")
    p.add_argument("--arch", default="resnet18", help="timm ResNet-family network (random init, 100 classes)")
    p.add_argument("--img-size", type=int, default=224, help="eval image size")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="the precision of predict.py's path (its flag); the per-image loop stays fp32")
    p.add_argument("--onnx", action="store_true", help="also run predict.py's path with the model exported to ONNX "
                   "(onnxruntime, fp32, CPU): images/s against torch's, same files and batches")

    p = sub.add_parser("ensemble", formatter_class=fmt, help="ensemble.py's time against the report's stacking",
                       description="seconds of ensemble.main (--epochs, and 1 epoch; empty logits cache) and of "
                       "the report's stacking (members forward every batch of every epoch in train mode, SGD) "
                       "with random-weight members")
    p.add_argument("--data-dir", type=Path, help="folder with train/ and val/ instead of a generated demo dataset")
    p.add_argument("--train-per-class", type=int, default=40, help="train images per class of the generated "
                   "demo dataset (val: a quarter of it)")
    p.add_argument("--arch", default="resnet10t", help="timm ResNet-family network of the members (random init)")
    p.add_argument("--img-size", type=int, default=32, help="the members' image size")
    p.add_argument("--epochs", type=int, default=REPORT_ENSEMBLE_EPOCHS, help="head epochs of both methods")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of both methods "
                   "(-1: as ensemble.py)")

    p = sub.add_parser("accuracy", formatter_class=fmt, help="held-out test accuracy on real photos "
                       "(Fashion-MNIST in the competition layout), trained from scratch, over seeds",
                       description="held-out test accuracy on Fashion-MNIST photos written in the competition "
                       "layout (train/val from its train split, test from its test split), trained from scratch "
                       "with the project's scripts, over --seeds: each seed's figures, then mean and spread")
    p.add_argument("--suite", default="members", choices=sorted(ACCURACY_SUITES),
                   help="members: the three members and their stacked ensemble; recipe: the report's recipe "
                   "against the strong recipe's training parts (resnext, from scratch), each also evaluated at "
                   f"{EVAL_SCALE}x its train size; oof: out-of-fold stacking of {OOF_FOLDS}-fold runs of "
                   f"{' and '.join(OOF_TYPES)} against in-sample stacking of plain runs; distill: those of "
                   "members, and a resnext student distilled from that ensemble; mixed: a resnet10t member at "
                   "32 px and a resnet14t one at 40 px with its pretrained config's eval pipeline, stacked, "
                   "against the member of the higher val accuracy")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                   help="comma-separated training seeds")
    p.add_argument("--work-dir", type=Path, default=Path("runs/bench-accuracy"), help="data and runs (an "
                   "interrupted benchmark resumes its runs)")
    p.add_argument("--fashion-mnist", type=Path, default=fashion_mnist.DEFAULT_DIR, help="folder of the "
                   "dataset's .gz files (apt-get install dataset-fashion-mnist)")
    p.add_argument("--train-per-class", type=int, default=500, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=100, help="val images per class")
    p.add_argument("--test-per-class", type=int, default=300, help="test images per class")
    p.add_argument("--distill-epochs", type=int, default=0, help="distill: also train the student alone and "
                   "distilled for this many epochs (Beyer et al.'s patient student; 0: skip)")
    p.add_argument("--member-flags", nargs=argparse.REMAINDER, default=ACCURACY_MEMBER_FLAGS,
                   help="train.py flags of every member (last on the line)")
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.command in ("data", "train", "gpu") and args.data_dir is None and args.files < REPORT_BATCH:
        raise UserError(f"--files {args.files}: generate at least {REPORT_BATCH} (one batch)")
    if args.command == "predict" and args.files < 1:
        raise UserError(f"--images {args.files} must be at least 1")
    if args.command == "ensemble" and min(args.epochs, args.train_per_class) < 1:
        raise UserError(f"--epochs {args.epochs} and --train-per-class {args.train_per_class} must be at least 1")
    if args.command == "data":
        args.cache_size = 2 * args.img_size if args.cache_size is None else args.cache_size
        if args.cache_size < args.img_size:
            raise UserError(f"--cache-size {args.cache_size} is below --img-size {args.img_size}; use at least "
                            f"{args.img_size} (default: {2 * args.img_size})")
    {"data": run_data, "train": run_train, "distill": run_distill, "gpu": run_gpu, "predict": run_predict,
     "ensemble": run_ensemble, "accuracy": run_accuracy}[args.command](args)


if __name__ == "__main__":
    run_main(main)
