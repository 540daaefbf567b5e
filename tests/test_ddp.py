"""Issue 7: data-parallel training under torchrun, tested on the CPU with gloo."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import ROOT
from ddpm import Diffusion
from modules import UNet_conditional
from test_train import TINY
from checkpoints import load_checkpoint, load_weights


def solid_color_folder(root):
    """Images of one flat colour each: random crops and resizes leave them unchanged, so the data a
    process sees does not depend on its augmentation draws."""
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(f"{root}/{c}")
        for i in range(8):
            Image.new("RGB", (10, 10), tuple(int(v) for v in rng.integers(0, 256, 3))).save(f"{root}/{c}/{i}.png")


def train_run(tmp_path, name, nproc, batch, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    args = [os.path.join(ROOT, "ddpm_conditional.py"), "--dataset-path", "data", *TINY, "--batch-size",
            str(batch), "--run-name", name, "--channels", "3", "--no-amp", *extra]  # the equality is an fp32 one
    r = subprocess.run(launcher + args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_two_processes_train_and_resume_like_one(tmp_path):
    solid_color_folder(str(tmp_path / "data"))
    r = train_run(tmp_path, "ddp", 2, 2, "--epochs", "1")
    assert r.stdout.count("outputs in") == 1  # rank 0 alone reports and writes
    train_run(tmp_path, "ddp", 2, 2, "--epochs", "2", "--resume")
    train_run(tmp_path, "single", 1, 4, "--epochs", "2")
    ddp = {f: load_checkpoint(str(tmp_path / "models" / "ddp" / f)) for f in ("ckpt.pt", "ema_ckpt.pt")}
    one = {f: load_checkpoint(str(tmp_path / "models" / "single" / f)) for f in ("ckpt.pt", "ema_ckpt.pt")}
    for f in ddp:
        assert not any(k.startswith("module.") for k in ddp[f])
        for k in ddp[f]:
            a, b = ddp[f][k], one[f][k]
            if k.endswith("in_proj_bias"):
                # the key bias cannot change softmax(QK^T): its gradient is rounding noise, which Adam scales
                # up to lr-sized steps, so only the query and value biases are comparable
                c = len(a) // 3
                a, b = torch.cat([a[:c], a[2 * c:]]), torch.cat([b[:c], b[2 * c:]])
            # 8 AdamW steps at lr 2e-3: Adam turns rounding differences in near-zero gradient elements into
            # steps of up to lr (2e-4 seen on one AVX-512 CPU), so allow a quarter of one step; a wrong batch
            # split or shared noise moves weights by several steps
            assert torch.allclose(a, b, atol=5e-4, rtol=1e-3), (f, k)
    state = load_checkpoint(str(tmp_path / "models" / "ddp" / "state.pt"))
    assert state["global_step"] == 2 * (16 // 4)  # 16 images, a global batch of 2 x 2
    model = load_weights(UNet_conditional(3, 3, num_classes=2, base_width=8), ddp["ema_ckpt.pt"])  # its 2 classes
    x = Diffusion(noise_steps=50, img_size=8, device="cpu").sample(model, 2, torch.tensor([0, 1]), sampler="ddim",
                                                                   steps=3)
    assert x.shape == (2, 3, 8, 8)
    assert sorted(os.listdir(tmp_path / "results" / "ddp")) == ["0.jpg", "0_ema.jpg", "1.jpg", "1_ema.jpg"]
