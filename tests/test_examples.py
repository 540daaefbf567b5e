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


def tiny_ckpt(tmp_path, model):
    """A randomly initialised network saved as training saves it: a plain state_dict."""
    path = str(tmp_path / "ema_ckpt.pt")
    torch.save(model.state_dict(), path)
    return path


FAST = ["--image-size", "8", "--base-width", "8", "--sampler", "ddim", "--steps", "3", "--title", "t"]


def the_plot(tmp_path):
    plots = glob.glob(str(tmp_path / "results" / "plots" / "t_*.png"))
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


def test_sample_unconditional(tmp_path):
    ckpt = tiny_ckpt(tmp_path, UNet(c_in=1, c_out=1, base_width=8))
    r = run_example("sample_unconditional.py", ["--ckpt", ckpt, "--n", "4", *FAST], tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.relpath(the_plot(tmp_path), tmp_path) in r.stdout


def test_sample_conditional_one_per_class(tmp_path):
    ckpt = tiny_ckpt(tmp_path, UNet_conditional(c_in=1, c_out=1, num_classes=3, base_width=8))
    r = run_example("sample_conditional.py", ["--ckpt", ckpt, "--num-classes", "3", "--cfg-scale", "3", *FAST],
                    tmp_path)
    assert r.returncode == 0, r.stderr
    the_plot(tmp_path)


def test_missing_ckpt_is_one_line_error(tmp_path):
    r = run_example("sample_conditional.py", ["--ckpt", "nowhere/ema_ckpt.pt"], tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ckpt nowhere/ema_ckpt.pt: no such file"), r.stderr


def test_sampling_examples_take_the_prediction_from_the_runs_config(tmp_path):
    """A v-prediction run sampled as eps gives other images: the example reads config.json beside the ckpt."""
    import json

    import numpy as np

    torch.manual_seed(0)
    ckpt = tiny_ckpt(tmp_path, UNet(c_in=1, c_out=1, base_width=8))
    rows = []
    for prediction in ("eps", "v"):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({"diffusion": {"prediction": prediction}}, f)
        out = tmp_path / prediction
        out.mkdir()
        r = run_example("sample_unconditional.py", ["--ckpt", ckpt, "--n", "2", *FAST], out)
        assert r.returncode == 0, r.stderr
        with Image.open(the_plot(out)) as img:
            rows.append(np.asarray(img.convert("L"), dtype=np.int16))
    assert rows[0].shape == rows[1].shape and np.abs(rows[0] - rows[1]).mean() > 1


def test_sample_unconditional_is_guided_by_the_runs_guide(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    ckpt = tiny_ckpt(tmp_path, UNet(c_in=1, c_out=1, base_width=8))
    rows = {}
    for name, extra in (("plain", []), ("guided", []), ("off", ["--guide-scale", "1"])):
        if name == "guided":  # the run saved its guide beside the checkpoint
            torch.manual_seed(1)
            torch.save(UNet(c_in=1, c_out=1, base_width=8).state_dict(), tmp_path / "guide_ckpt.pt")
        out = tmp_path / name
        out.mkdir()
        r = run_example("sample_unconditional.py", ["--ckpt", ckpt, "--n", "2", *FAST, *extra], out)
        assert r.returncode == 0, r.stderr
        with Image.open(the_plot(out)) as img:
            rows[name] = np.asarray(img.convert("L"), dtype=np.int16)
    assert np.abs(rows["plain"] - rows["guided"]).mean() > 1
    assert np.array_equal(rows["plain"], rows["off"])


def test_sample_unconditional_samples_a_clusters_run_by_its_clusters(tmp_path):
    import json

    # as `python ddpm.py --clusters 2` leaves it: a UNet's ckpt, the clusters' embedding in clusters.pt
    weights = UNet_conditional(c_in=1, c_out=1, num_classes=2, base_width=8).state_dict()
    torch.save({"ema_ckpt.pt": {"label_emb.weight": weights.pop("label_emb.weight")}}, tmp_path / "clusters.pt")
    ckpt = str(tmp_path / "ema_ckpt.pt")
    torch.save(weights, ckpt)
    UNet(c_in=1, c_out=1, base_width=8).load_state_dict(torch.load(ckpt))  # strict
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"diffusion": {"prediction": "v"}, "data": {"cluster_sizes": [0, 3]},
                   "sample_grids": {"cfg_scale": 2.5, "cfg_min_sigma": 1.0, "sample_steps": 50,
                                    "corrector_snr": 0.0}}, f)
    r = run_example("sample_unconditional.py", ["--ckpt", ckpt, "--n", "2", *FAST], tmp_path)
    assert r.returncode == 0, r.stderr
    the_plot(tmp_path)
