"""Shared helpers for the scripts: errors, durable writes, random state, distributed, signals, curves."""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


class UserError(Exception):
    """A mistake the user can fix: printed as one line, never as a traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every flag's default, once: not appended where the help already states it in words."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=file or sys.stderr)


def run_main(main, argv=None):
    """Run a script's main(argv) (None: the command line), turning UserError into a one-line message and
    exit code 2, and Ctrl-C (outside train.py's loop, which checkpoints on it) into one line and exit code 130.
    Warnings print as "warning: ..." lines, without Python's source location."""
    warnings.showwarning = show_warning
    if not sys.stderr.isatty():  # the libraries' own bars (downloads, weight loading) would flood a log
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    try:
        return main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: every file is written whole or not at all, so none is left half-written",
              file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------
# progress: a bar on a terminal, a line every tenth in a log (SLURM, nohup, CI), where a bar's
# carriage returns would make one line of thousands of characters

class LogProgress:
    """The part of tqdm's interface the scripts use, printing a line each time another 1/lines of the
    total is done."""

    def __init__(self, iterable=None, *, desc="", total=None, initial=0, lines=10):
        self.iterable, self.desc, self.n, self.lines = iterable, desc, initial, lines
        self.total = max(1, total if total is not None else len(iterable))
        self.started, self.postfix, self.shown = time.perf_counter(), {}, initial * lines // self.total

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n=1):
        self.n += n
        mark = self.n * self.lines // self.total
        if mark > self.shown:
            self.shown = mark
            postfix = "".join(f" {key} {value}" for key, value in self.postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} ({100 * self.n / self.total:.0f}%, "
                  f"{time.perf_counter() - self.started:.0f}s){postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **values):
        self.postfix = values

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(iterable=None, *, desc="", total=None, initial=0, enabled=True, **tqdm_args):
    """A tqdm bar on a terminal, LogProgress lines elsewhere, nothing when not enabled."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(iterable, desc=desc, total=total, initial=initial)
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                **tqdm_args)


# ----------------------------------------------------------------------------
# durable writes: temp file in the same folder, fsync, os.replace, so a reader
# (or a kill -9) never sees a missing or half-written file

def write_error(path, error):
    return UserError(f"could not write {path} ({error.strerror or error}); any previous {Path(path).name} is "
                     f"left as it was; free some disk space or make {Path(path).parent} writable")


def fsync_dir(folder):
    """Make a rename or link in `folder` durable (POSIX only; Windows has no directory handles)."""
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~umask()  # what open() would give a new file


def atomic_write(path, write_fn):
    """write_fn(binary file) into a temp file beside path, then rename it over path. A failure (disk full,
    read-only folder) is a UserError that leaves the previous file untouched and no temp file behind. The
    file gets the permissions an ordinary write gives (mkstemp's temp file is private to its owner)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(path, error) from error
        raise


def remove_stale_temps(folder, names):
    """Delete the temp files that a killed process left in `folder` while writing one of `names`."""
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def atomic_save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_npz(path, **arrays):
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_savefig(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))


def atomic_write_zip(path, members):
    """members: {name inside the zip: bytes}."""
    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    atomic_write(path, write)


def atomic_link(src, dst):
    """Make dst the same file as src (a hard link costs no write; a copy where links are not possible)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and os.path.samefile(src, dst):  # rename() between two links of one file does nothing
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        with open(src, "rb") as f:
            atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
        return
    try:
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(dst, error) from error


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_writable(out_dir, flag="--out-dir"):
    """Fail before any work when the output folder cannot be written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise UserError(f"{flag} {out_dir} is not writable ({error.strerror or error}); "
                        "choose another folder") from error


# ----------------------------------------------------------------------------
# random state, saved in checkpoints so that a resumed run continues bit for bit

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_gauss": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------
# distributed (torchrun)

def init_distributed():
    """Read torchrun's environment; returns (rank, world_size, local_rank)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def any_rank(flag, device):
    """True on every rank when it is true on one (so that all ranks stop at the same step)."""
    if not dist.is_initialized():
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def gather_rng():
    """Every rank's RNG state (rng_state), gathered to all: rank 0 saves them."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def refuse_distributed(script):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{script} runs in one process; start it with python, not torchrun")


# ----------------------------------------------------------------------------
# stopping cleanly on SIGTERM / SIGINT (cluster preemption, Ctrl-C)

class StopSignal:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second exits at once."""

    def __init__(self):
        self.signum, self.pid = None, os.getpid()
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked DataLoader worker: the main process stops it
            return
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: stopping after this step "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None


# ----------------------------------------------------------------------------
# learning curves (train.py redraws them every epoch; report.py draws several runs)

def draw_curves(ax_loss, ax_acc, history, section_starts=()):
    """Loss and accuracy against epoch for train and val, each where the rows have it (an ensemble head's
    rows have no train accuracy); dashed lines mark unfreezing sections."""
    epochs = [row["epoch"] for row in history]
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        for split, colour in (("train", "C0"), ("val", "C1")):
            if f"{split}_{key}" in history[0]:
                ax.plot(epochs, [row[f"{split}_{key}"] for row in history], "o-", ms=3, color=colour, label=split)
        if key == "acc" and any(row.get("ema_val_acc") is not None for row in history):
            ax.plot(epochs, [row.get("ema_val_acc") for row in history], "o--", ms=3, color="C2", label="val (EMA)")
        for i, start in enumerate(section_starts):
            ax.axvline(start - 0.5, color="grey", ls="--", lw=0.8, label="next stages unfrozen" if i == 0 else None)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if len(epochs) == 1:  # else the axis spans +-0.05 around the one epoch, in fractional ticks
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()


def plot_curves(history, path, title="", section_starts=()):
    """One run's learning curves (draw_curves) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    draw_curves(ax_loss, ax_acc, history, section_starts)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
