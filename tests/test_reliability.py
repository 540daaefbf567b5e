"""Issue 6: resume, crash-safe checkpoints, clear errors, safe loading."""
import argparse
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import diffusion
import train
from conftest import ROOT, write_images
from test_train import TINY
from checkpoints import atomic_save, load_checkpoint
from utils import UserError


def weights(run):
    return {f: load_checkpoint(f"models/{run}/{f}") for f in ("ckpt.pt", "ema_ckpt.pt")}


def assert_identical(a, b):
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)


def run_main(argv, capsys, conditional=True):
    """train.main in-process; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        train.main(conditional, argv)
        raise SystemExit(0)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("loading", [[], ["--crop", "random", "--num-workers", "2"]])
def test_resume_is_bit_identical(image_folder, in_tmp, loading):
    # random crops drawn in DataLoader workers too: each sample's from (seed, epoch, index) alone
    common = ["--dataset-path", image_folder, *TINY, "--ema-start", "2", *loading]
    train.main(True, ["--run-name", "straight", "--epochs", "3", *common])
    train.main(True, ["--run-name", "split", "--epochs", "1", *common])
    train.main(True, ["--run-name", "split", "--epochs", "3", "--resume"])
    assert_identical(weights("straight"), weights("split"))
    state = load_checkpoint("models/split/state.pt")
    assert (state["epoch"], state["global_step"], state["ema"]["step"]) == (3, 9, 9)
    optim = load_checkpoint("models/split/optim.pt")
    assert set(optim) == {"state", "param_groups"}  # a plain optimizer state_dict


def test_sigterm_saves_and_resumes_exactly(tmp_path, image_folder):
    """Stopped mid-epoch by SIGTERM to its whole process group, DataLoader workers included (as `timeout`,
    Slurm and a terminal's Ctrl-C signal), then resumed: the same weights as an uninterrupted run."""
    data = str(tmp_path / "big")
    for c in range(2):
        write_images(os.path.join(data, str(c)), 40, seed=c)
    args = [sys.executable, os.path.join(ROOT, "ddpm_conditional.py"), "--dataset-path", data, *TINY,
            "--epochs", "2", "--num-workers", "1"]
    subprocess.run(args + ["--run-name", "straight"], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    log = open(tmp_path / "log", "w+")
    p = subprocess.Popen(args + ["--run-name", "stopped"], cwd=tmp_path, stderr=log, stdout=log,
                         start_new_session=True)
    deadline = time.time() + 120
    while "MSE=" not in open(tmp_path / "log").read() and time.time() < deadline:  # after the first step
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    assert p.wait(timeout=120) == 128 + signal.SIGTERM
    out = open(tmp_path / "log").read()
    assert "--resume" in out and "Traceback" not in out
    r = subprocess.run(args + ["--run-name", "stopped", "--resume"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    os.chdir(tmp_path)
    assert_identical(weights("straight"), weights("stopped"))


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    atomic_save({"w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_a_run_killed_while_saving_keeps_its_last_whole_save(image_folder, in_tmp, monkeypatch):
    common = ["--dataset-path", image_folder, *TINY, "--run-name", "r"]
    train.main(True, common + ["--epochs", "1"])
    before = weights("r")
    real_save = checkpoints.torch.save

    def dies_at_the_optimizer(obj, f):  # ckpt.pt and ema_ckpt.pt are written by then
        if "param_groups" in obj:
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(checkpoints.torch, "save", dies_at_the_optimizer)
    with pytest.raises(KeyboardInterrupt):
        train.main(True, common + ["--epochs", "2", "--resume"])
    assert_identical(before, weights("r"))  # not new weights beside an old state.pt
    assert load_checkpoint("models/r/state.pt")["epoch"] == 1 and not any(".tmp" in f for f in os.listdir("models/r"))


def test_non_finite_loss_stops_without_saving(image_folder, in_tmp, capsys, monkeypatch):
    common = ["--dataset-path", image_folder, *TINY, "--run-name", "r"]
    train.main(True, common + ["--epochs", "1"])
    before = weights("r")
    monkeypatch.setattr(diffusion.F, "mse_loss",
                        lambda pred, target, **kw: torch.full_like(pred, float("nan"), requires_grad=True))
    code, err = run_main(common + ["--epochs", "2", "--resume"], capsys)
    assert code == 2 and "loss became nan" in err
    assert_identical(before, weights("r"))


def test_pickled_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(UserError, match="pickled objects, refused"):
        load_checkpoint(path)
    (tmp_path / "cut.pt").write_bytes(open(path, "rb").read()[:50])
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(str(tmp_path / "cut.pt"))
    write_images(str(tmp_path / "imgs"), 1)  # an image passed as --ckpt by mistake
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        load_checkpoint(str(tmp_path / "imgs" / os.listdir(tmp_path / "imgs")[0]))


def make_bad_folders(root):
    os.makedirs(f"{root}/empty")
    os.makedirs(f"{root}/texts/a")
    open(f"{root}/texts/a/readme.txt", "w").write("no images here")
    write_images(f"{root}/corrupt/a", 3)
    open(f"{root}/corrupt/a/1.png", "wb").write(b"\x89PNG\r\n\x1a\n broken")
    for c in range(12):
        write_images(f"{root}/many/{c}", 1)


@pytest.mark.parametrize("args,message", [
    (["--dataset-path", "nowhere"], "--dataset-path nowhere: no such folder"),
    (["--dataset-path", "bad/empty"], "no images found"),
    (["--dataset-path", "bad/texts"], "no images found"),  # or ImageFolder's own message
    (["--dataset-path", "bad/corrupt"], "cannot read image bad/corrupt/a/1.png"),
    (["--image-size", "12"], "--image-size 12 is not a multiple of 8"),
    (["--dataset-path", "bad/many", "--num-classes", "10"], "has 12 classes but --num-classes is 10"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--epochs", "-1"], "--epochs must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--min-snr-gamma", "-1"], "--min-snr-gamma must be >= 0"),
    (["--ema-beta", "-3"], "--ema-beta must lie in [0, 1]"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--eta", "-0.5"], "--eta must be >= 0"),
    (["--adam-beta2", "1"], "--adam-beta2 must lie in [0, 1)"),
    (["--timesteps", "weighted", "--min-snr-gamma", "0"], "--timesteps weighted draws timesteps by their"),
    (["--cfg-min-sigma", "-1"], "--cfg-min-sigma must be >= 0"),
    (["--guide-at", "1"], "--guide-at must lie in [0, 1)"),
    (["--guide-scale", "0"], "--guide-scale must be positive"),
    (["--corrector-snr", "-0.1"], "--corrector-snr must lie in [0, 1)"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--resume", "--run-name", "never"], "nothing to resume in models/never"),
])
def test_bad_input_gets_one_clear_line(args, message, image_folder, in_tmp, capsys):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make_bad_folders("bad")
    base = ["--dataset-path", image_folder, *TINY, "--epochs", "1", "--run-name", "bad_run"]
    code, err = run_main(base + args, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err[-1500:]
    assert not os.path.exists("models/bad_run/ckpt.pt")


def test_existing_run_is_not_overwritten(image_folder, in_tmp, capsys):
    common = ["--dataset-path", image_folder, *TINY, "--run-name", "r", "--epochs", "1"]
    train.main(True, common)
    before = weights("r")
    code, err = run_main(common + ["--lr", "1e-2"], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert_identical(before, weights("r"))
    code, err = run_main(common + ["--resume", "--base-width", "16"], capsys)
    assert code == 2 and "trained with --base-width 8, not --base-width 16" in err
    open("results/r/7.jpg", "w").close()  # what a longer old run would have left: grids, its TensorBoard file
    open("runs/r/events.out.tfevents.old", "w").close()
    train.main(True, common + ["--overwrite", "--lr", "1e-2"])
    assert not torch.equal(before["ckpt.pt"]["outc.weight"], weights("r")["ckpt.pt"]["outc.weight"])
    assert sorted(os.listdir("results/r")) == ["0.jpg", "0_ema.jpg"]
    assert "events.out.tfevents.old" not in os.listdir("runs/r") and os.listdir("runs/r")


def test_resume_keeps_the_old_run_safe_and_checks_what_would_break_it(image_folder, in_tmp, capsys, monkeypatch):
    common = ["--dataset-path", image_folder, *TINY, "--run-name", "r", "--epochs", "1"]
    train.main(False, common + ["--no-ema"])
    files, before = sorted(os.listdir("models/r")), {"ckpt.pt": load_checkpoint("models/r/ckpt.pt")}
    make_bad_folders("bad")
    for data, says in (("no_such_folder", "no_such_folder"), ("bad/corrupt", "cannot read image")):
        # refused before training, or failing in it: either way the old run stays whole
        code, err = run_main(common + ["--overwrite", "--dataset-path", data], capsys, conditional=False)
        assert code == 2 and says in err
        assert sorted(os.listdir("models/r")) == files and files
        assert_identical(before, {"ckpt.pt": load_checkpoint("models/r/ckpt.pt")})
    code, err = run_main(["--run-name", "r", "--epochs", "2", "--resume", "--ema"], capsys, conditional=False)
    assert code == 2 and "trained with --no-ema, not --ema" in err
    # saved without an fp16 scaler (its state is empty), resumed where one is on (a GPU without bf16)
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(train.torch.amp, "GradScaler", lambda *args, **kwargs: scaler("cpu"))
    train.main(False, ["--run-name", "r", "--epochs", "2", "--resume"])
    assert load_checkpoint("models/r/state.pt")["epoch"] == 2


def test_unwritable_output_folder(image_folder, in_tmp, capsys):
    open("models", "w").close()  # a file where the models folder should go
    code, err = run_main(["--dataset-path", image_folder, *TINY, "--epochs", "1"], capsys)
    assert code == 2 and "cannot write the run's outputs" in err
