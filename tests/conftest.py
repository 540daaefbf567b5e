import os
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REFERENCE = os.path.join(ROOT, "tests", "reference")

torch.set_num_threads(min(2, torch.get_num_threads()))


def deterministic_weights(model):
    """The reference README's weights: 0.1*sin(0.37*i + crc32(key)%1000/100) for every state_dict entry."""
    sd = {}
    for k, v in model.state_dict().items():
        i = torch.arange(v.numel(), dtype=torch.float64)
        sd[k] = (0.1 * torch.sin(0.37 * i + (zlib.crc32(k.encode()) % 1000) / 100)).float().reshape(v.shape)
    model.load_state_dict(sd, strict=True)
    return model


def fake_cpu_bf16(monkeypatch, avx512_bf16, amx):
    """Make this CPU report the bf16 units it is given to torch's capability checks (hardware.cpu_native_bf16)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


def write_images(folder, n, size=(12, 10), seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(os.path.join(folder, f"{i}.png"))


@pytest.fixture
def image_folder(tmp_path):
    """A tiny ImageFolder: 3 classes of 4 random 12x10 RGB images."""
    root = tmp_path / "data"
    for c in range(3):
        write_images(str(root / f"class{c}"), 4, seed=c)
    return str(root)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty working directory (runs/, results/, models/ land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
