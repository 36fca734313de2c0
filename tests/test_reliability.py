"""Fault tolerance of training: kill -9, SIGTERM/SIGINT, mid-epoch resume, non-finite losses, bad
checkpoints, unwritable or full disks. Signals go to train.py subprocesses; the rest runs train.main() in this
process (an interpreter start-up costs more than a run) on a tiny dataset: 64 train images, 8 steps per epoch."""
import ast
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import checkpoints
import demo_data
import models
import train
import utils
from conftest import (SAVE, V1_MEMBER_KEYS, Killed, as_version_1, assert_same_run, csv_holds, die_after_save,
                      train_here)
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
# one thread: a 32 px resnet10t gains nothing from more, and threads fight over a busy CI machine
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_cmd(data_dir, out_dir, *flags):
    return [sys.executable, "train.py", "--model", "resnext", "--data-dir", str(data_dir), "--out-dir", str(out_dir),
            "--arch", "resnet10t", "--weights", "none", "--img-size", "32", "--epochs", "3", "--batch-size", "8",
            "--workers", "0", "--log-every", "1", *map(str, flags)]


def resume_cmd(out_dir, *flags):
    return [sys.executable, "train.py", "--resume", "--out-dir", str(out_dir), "--workers", "0", "--log-every", "1",
            *map(str, flags)]


def run(cmd, expect=0):
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"{cmd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def wait_until(proc, condition, timeout=240):
    """Poll until condition() holds; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.01)
    return True


def file_id(path):
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def assert_consistent(out_dir):
    """What a kill leaves: a loadable last.pt, and a history.csv holding its rows (or, killed between the two
    writes of an epoch's end, all but the newest)."""
    if not (out_dir / "last.pt").exists():
        assert not (out_dir / "history.csv").exists()
        return
    rows = checkpoints.load(out_dir / "last.pt", kind="member")["history"]
    if (out_dir / "history.csv").exists():
        assert csv_holds(out_dir, rows) or csv_holds(out_dir, rows[:-1])
    else:
        assert len(rows) <= 1


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """16 classes, 4 train images each: 8 steps of 8 images per epoch."""
    return demo_data.make_demo(tmp_path_factory.mktemp("tiny") / "data", seed=0, train_per_class=4,
                               val_per_class=2, test_per_class=1)


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run; read-only."""
    out = tmp_path_factory.mktemp("reference")
    train_here(train_cmd(tiny_dir, out))
    return out


# ----------------------------------------------------------------------------
# kill -9, SIGTERM, SIGINT

def test_sigkill_at_random_moments_then_resume_is_exact(tiny_dir, reference, tmp_path):
    rng = random.Random(0)
    out = tmp_path / "run"
    cmd = train_cmd(tiny_dir, out, "--resume", "--save-every", 2)  # as a requeued job: the same command each time
    for kill in range(3):
        started = file_id(out / "last.pt")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if kill == 0:  # any moment of the first epoch, perhaps before any checkpoint
                alive = wait_until(proc, lambda: (out / "config.json").exists())
                delay = rng.uniform(0, 1.5)
            else:  # any moment after this process wrote a checkpoint: mid-step, mid-write, mid-evaluation
                alive = wait_until(proc, lambda: file_id(out / "last.pt") != started)
                delay = rng.uniform(0, 0.5)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL)
        assert_consistent(out)
        if not alive:  # it finished first (a very slow poll): what is left is checked all the same
            break
    run(cmd)
    assert_same_run(out, reference)


def test_sigterm_checkpoints_then_printed_command_resumes_exactly(tiny_dir, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_dir, out), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(proc, lambda: (out / "last.pt").exists())  # epoch 1 is saved: the signal lands in epoch 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM == 143, stderr
    assert "received SIGTERM: stopping after this step" in stderr
    command = re.search(r"resume with: (python train.py --resume (\S+))$", stdout, re.M)
    assert Path(command[2]) == out / "last.pt"
    ckpt = checkpoints.load(out / "last.pt", kind="member")
    assert ckpt["epoch"] == 1 or (ckpt["epoch"], ckpt["step"]) == (2, 0)
    stale = [out / ".last.pt.k3x9q1zz.tmp", out / f".best.pt.{proc.pid}.tmp"]  # as a kill -9 mid-write leaves
    for path in stale:
        path.write_bytes(b"partial")
    (out / ".notes.tmp").write_text("not ours")
    run([sys.executable, *command[1].split()[1:]])  # verbatim: default --workers and --log-every
    assert (out / ".notes.tmp").exists()
    (out / ".notes.tmp").unlink()
    assert_same_run(out, reference)


def test_sigint_checkpoints_and_exits_130(tiny_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(tiny_dir, out, "--save-every", 1), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(proc, lambda: (out / "last.pt").exists())
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert "received SIGINT" in stderr and "Traceback" not in stderr
    assert f"resume with: python train.py --resume {out / 'last.pt'}" in stdout
    ckpt = checkpoints.load(out / "last.pt", kind="member")
    # stopped after the step it was in: mid-epoch 1 with its running sums (or, signalled late, at its end)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0) or ckpt["epoch_sums"]["count"] == 8 * ckpt["step"] > 0


def test_second_signal_exits_at_once(monkeypatch, capsys):
    def exit_now(code):  # os._exit, which would end pytest too
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = utils.StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert info.value.code == 130
    assert "received SIGTERM: stopping after this step (send it again to exit at once)" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# resuming from the exact moment of a kill: mid-epoch (--save-every) and between an epoch's writes

def test_resume_after_kills_between_writes_and_mid_epoch_is_exact(tiny_dir, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    die_after_save(monkeypatch, 1, 0)  # after epoch 1's last.pt, before its best.pt and history.csv
    with pytest.raises(Killed):
        train_here(train_cmd(tiny_dir, out))
    assert not (out / "best.pt").exists() and not (out / "history.csv").exists()
    die_after_save(monkeypatch, 2, 3)  # the resume brings them up to last.pt first; then mid-epoch 3
    with pytest.raises(Killed):
        train_here(resume_cmd(out, "--save-every", 3))
    ckpt = checkpoints.load(out / "last.pt", kind="member")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 3) and csv_holds(out, ckpt["history"])
    assert checkpoints.load(out / "best.pt")["epoch"] == ckpt["best_epoch"]
    monkeypatch.setattr(utils, "atomic_save_torch", SAVE)
    capsys.readouterr()
    train_here(resume_cmd(out))
    assert f"resuming {out / 'last.pt'}: epoch 3, step 3 of 8" in capsys.readouterr().out
    assert_same_run(out, reference)


def test_version_1_mid_epoch_checkpoint_resumes_exactly(tiny_dir, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    die_after_save(monkeypatch, 1, 5)
    with pytest.raises(Killed):
        train_here(train_cmd(tiny_dir, out, "--save-every", 5))
    monkeypatch.setattr(utils, "atomic_save_torch", SAVE)
    # rewritten as imgcls-checkpoint-1 wrote it, then resumed by the current code
    old = as_version_1(torch.load(out / "last.pt", weights_only=True))
    assert sorted(old) == V1_MEMBER_KEYS and (old["epoch"], old["step"]) == (1, 5) and old["partial"]["count"] == 40
    torch.save(old, out / "last.pt")
    train_here(resume_cmd(out))
    assert_same_run(out, reference)


# ----------------------------------------------------------------------------
# non-finite loss or gradient

@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_step_stops_and_keeps_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    forward, calls = torch.nn.CrossEntropyLoss.forward, []

    def forward_then_break(self, logits, labels):
        loss = forward(self, logits, labels)
        calls.append(1)
        if len(calls) < 3:
            return loss
        if len(calls) == 3:  # epoch 1, step 3: the bytes of the last good checkpoint, to compare afterwards
            shutil.copyfile(out / "last.pt", tmp_path / "good.pt")
        if kind == "loss":
            return loss * float("nan")
        return loss + (logits - logits.detach()).abs().sum().sqrt()  # adds 0 to the loss, NaN to the gradient

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward_then_break)
    with pytest.raises(UserError) as info:
        train_here(train_cmd(tiny_dir, out, "--save-every", 2))
    assert str(info.value) == (
        f"non-finite {kind} at epoch 1, step 3 of 8; the last good checkpoint ({out / 'last.pt'}) is left intact; "
        "lower --lr or look with --detect-anomaly")
    assert (out / "last.pt").read_bytes() == (tmp_path / "good.pt").read_bytes()
    assert checkpoints.load(out / "last.pt")["step"] == 2


def test_diverging_lr_stops_before_any_bad_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train_here(train_cmd(tiny_dir, out, "--lr", 1e8, "--save-every", 1))
    found = re.fullmatch(rf"non-finite (loss|gradient) at epoch 1, step (\d) of 8; the last good checkpoint "
                         rf"\({re.escape(str(out / 'last.pt'))}\) is left intact; .*", str(info.value))
    assert found, info.value
    ckpt = checkpoints.load(out / "last.pt")
    assert ckpt["step"] == int(found[2]) - 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


# ----------------------------------------------------------------------------
# checkpoints are untrusted input

class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def resume_error(*argv):
    argv = [str(a) for a in argv]
    with pytest.raises(UserError) as info:
        train.resolve_args(train.get_args_parser().parse_args(argv), train.explicit_flags(argv))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind, expected", [
    ("truncated", "cannot be read"), ("random bytes", "cannot be read"), ("text", "cannot be read"),
    ("empty", "cannot be read"), ("state dict", "is not a checkpoint of this project"),
    ("ensemble", "is an ensemble checkpoint, expected a member one"),
])
def test_bad_checkpoint_gives_one_line_error(reference, tmp_path, kind, expected):
    path = tmp_path / "bad.pt"
    if kind == "truncated":
        full = (reference / "last.pt").read_bytes()
        path.write_bytes(full[:len(full) // 2])
    elif kind == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "text":
        path.write_text("epoch,val_acc\n1,50.0\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "state dict":
        torch.save(checkpoints.load(reference / "last.pt")["state_dict"], path)
    else:
        torch.save({"format": checkpoints.FORMAT, "kind": "ensemble"}, path)
    message = resume_error("--resume", path)
    assert f"checkpoint {path} " in message and expected in message


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "last.pt"
    torch.save({"format": checkpoints.FORMAT, "kind": "member", "payload": RunsCode(marker)}, path)
    message = resume_error("--resume", path)
    assert message.startswith(f"checkpoint {path} was refused: loading it would call ") and "open" in message
    with pytest.raises(UserError, match="cannot read it as a state dict"):
        models.load_state_file(path)  # --weights PATH
    assert not marker.exists()


def test_resume_with_other_model_or_classes(reference, tiny_dir, tmp_path, monkeypatch):
    message = resume_error("--model", "resnext_vit", "--resume", reference / "last.pt")
    assert message == f"--resume {reference / 'last.pt'} holds a resnext run, not --model resnext_vit"
    other = tmp_path / "other"
    for split in ("train", "val"):
        shutil.copytree(tiny_dir / split, other / split, ignore=lambda folder, names: ["15"])
    with pytest.raises(UserError, match=rf"trained on other classes than {re.escape(str(other / 'train'))} \(16 vs 15"):
        train.main(["--resume", reference / "last.pt", "--data-dir", other, "--workers", "0"])


def project_calls(include_tests=True):
    """(file:line, ast.Call) for every call in the project's Python files."""
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") or part in ("runs", "build", "venv") for part in parts) or (
                parts[0] == "tests" and not include_tests):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                yield f"{'/'.join(parts)}:{node.lineno}", node


def called(node, module, name):
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == name and isinstance(func.value, ast.Name)
            and func.value.id == module)


def test_every_torch_load_is_weights_only():
    loads = [(where, any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords))
             for where, node in project_calls() if called(node, "torch", "load")]
    assert loads and [where for where, safe in loads if not safe] == []


def test_artefacts_are_written_only_through_atomic_writers():
    """Outside utils.py no script writes a file itself: torch.save, savefig, to_csv(path), open(path, "w")..."""
    direct = []
    for where, node in project_calls(include_tests=False):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        writes = (called(node, "torch", "save") or called(node, "np", "save") or called(node, "np", "savez")
                  or name in ("savefig", "write_text", "write_bytes")
                  or (name == "to_csv" and (node.args or any(k.arg == "path_or_buf" for k in node.keywords)))
                  or (name in ("open", "ZipFile") and isinstance(mode, ast.Constant)
                      and set(str(mode.value)) & set("wax")))
        if writes and not where.startswith("utils.py:"):
            direct.append(where)
    assert direct == []


# ----------------------------------------------------------------------------
# full or read-only disks

def test_failed_save_leaves_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    utils.atomic_save_torch({"format": checkpoints.FORMAT, "weights": torch.arange(10.0)}, path)
    before = path.read_bytes()

    def save_until_full(obj, f, *args, **kwargs):
        f.write(b"\0" * 100_000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(UserError) as info:
        utils.atomic_save_torch({"weights": torch.zeros(10)}, path)
    assert str(info.value).startswith(f"could not write {path} ({os.strerror(errno.ENOSPC)}); any previous "
                                      "last.pt is left as it was")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_unwritable_out_dir_fails_before_training(tiny_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"  # a folder below a file cannot be made, even by root (chmod cannot do that)
    blocker.write_text("")
    out = blocker / "run"
    with pytest.raises(UserError, match=rf"^--out-dir {re.escape(str(out))} is not writable \("):
        train.main(["--model", "resnext", "--data-dir", tiny_dir, "--out-dir", out])
    with pytest.raises(UserError, match=rf"^could not write {re.escape(str(out / 'x.csv'))} \("):
        utils.atomic_write_text(out / "x.csv", "a,b\n")


def test_disk_too_small_for_two_checkpoints(tmp_path, monkeypatch):
    model = models.build_model("resnext", "resnet10t", 16, "none")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(UserError, match=rf"^--out-dir {re.escape(str(tmp_path))} has 0.0 GiB free, but a checkpoint "
                                        r"needs about 0.\d GiB"):
        train.check_disk_space(tmp_path, model, ema=None)


def test_atomic_link_twice_leaves_one_file_and_no_temp(tmp_path):
    src, dst = tmp_path / "last.pt", tmp_path / "best.pt"
    src.write_bytes(b"epoch 1")
    utils.atomic_link(src, dst)
    utils.atomic_link(src, dst)  # as a resume does when best.pt is already last.pt
    assert os.path.samefile(src, dst) and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_written_files_get_the_permissions_of_an_ordinary_write(tmp_path, mask):
    code = ("import os, sys; from pathlib import Path; import utils; out = Path(sys.argv[1]); "
            "utils.atomic_write_text(out / 'report.md', 'x'); utils.atomic_write_zip(out / 'submission.zip', {}); "
            "open(out / 'plain.txt', 'w').close()")
    subprocess.run([sys.executable, "-c", f"import os; os.umask({mask}); {code}", tmp_path], cwd=ROOT, check=True)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["plain.txt", "report.md", "submission.zip"], 0o666 & ~mask)
