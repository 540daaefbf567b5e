"""The scripts in examples/ run as a user runs them: a subprocess from another folder, no display."""
import glob
import os
import subprocess
import sys

import torch
from PIL import Image

from conftest import ROOT
from modules import UNet, UNet_conditional


def run_example(name, args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def tiny_ckpt(tmp_path, model, prediction="v"):
    """A randomly initialised network saved as a run saves it: a plain state_dict whose metadata says what the
    network is trained with (8x8 images, so the example samples that size)."""
    model.trained_with = dict(prediction=prediction, noise_steps=1000, beta_start=1e-4, beta_end=0.02, image_size=8)
    path = str(tmp_path / "ema_ckpt.pt")
    torch.save(model.state_dict(), path)
    return path


def the_plot(folder, title):
    plots = glob.glob(str(folder / "results" / "plots" / f"{title}_*.png"))
    assert len(plots) == 1, plots
    with Image.open(plots[0]) as img:
        img.verify()
    return plots[0]


def test_noising_test_writes_a_strip_of_nine_tiles(tmp_path):
    # no data/mnist in tmp_path: the script draws its own test image
    out = tmp_path / "strip.png"
    r = run_example("noising_test.py", ["--image-size", "8", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    with Image.open(out) as img:
        assert img.size == (2 + 9 * (8 + 2), 2 + 8 + 2)


def test_noising_test_reads_an_image_file(tmp_path):
    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "red.jpg")
    r = run_example("noising_test.py", ["--image", "red.jpg", "--image-size", "8"], tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "results" / "noise.jpg") as img:
        assert img.size == (92, 12)


def test_sample_unconditional_builds_and_samples_what_the_checkpoint_says(tmp_path):
    ckpt = tiny_ckpt(tmp_path, UNet(c_in=1, c_out=1, base_width=8))
    r = run_example("sample_unconditional.py", [ckpt], tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.relpath(the_plot(tmp_path, "unconditional"), tmp_path) in r.stdout


def test_sample_conditional_one_per_class(tmp_path):
    ckpt = tiny_ckpt(tmp_path, UNet_conditional(c_in=1, c_out=1, num_classes=3, base_width=8))
    r = run_example("sample_conditional.py", [ckpt], tmp_path)
    assert r.returncode == 0, r.stderr
    the_plot(tmp_path, "one_per_class")


def test_missing_ckpt_is_one_line_error(tmp_path):
    for name in ("sample_conditional.py", "sample_unconditional.py"):
        r = run_example(name, ["nowhere/ema_ckpt.pt"], tmp_path)
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: nowhere/ema_ckpt.pt: no such file"), r.stderr


def test_the_example_samples_as_the_checkpoint_says_it_predicts(tmp_path):
    """The same weights saved as a v-prediction and as an eps-prediction network give other images."""
    import numpy as np

    torch.manual_seed(0)
    model = UNet(c_in=1, c_out=1, base_width=8)
    rows = []
    for prediction in ("eps", "v"):
        out = tmp_path / prediction
        out.mkdir()
        r = run_example("sample_unconditional.py", [tiny_ckpt(out, model, prediction)], out)
        assert r.returncode == 0, r.stderr
        with Image.open(the_plot(out, "unconditional")) as img:
            rows.append(np.asarray(img.convert("L"), dtype=np.int16))
    assert rows[0].shape == rows[1].shape and np.abs(rows[0] - rows[1]).mean() > 1


def test_the_example_loads_a_clusters_runs_checkpoint_as_a_unet(tmp_path):
    # as `python ddpm.py --clusters 2` leaves it: a UNet's ckpt, the clusters' embedding in clusters.pt beside it
    model = UNet_conditional(c_in=1, c_out=1, num_classes=2, base_width=8)
    model.trained_with = dict(prediction="v", image_size=8)
    weights = model.state_dict()
    weights.pop("label_emb.weight")
    torch.save(weights, tmp_path / "ema_ckpt.pt")
    r = run_example("sample_unconditional.py", [str(tmp_path / "ema_ckpt.pt")], tmp_path)
    assert r.returncode == 0, r.stderr
