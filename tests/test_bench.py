"""bench.py: its train.py path times train.py's own step, and its options are checked."""
import os
import subprocess
import sys

import torch

import bench
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_py_path_times_train_py_own_step(monkeypatch):
    runs, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda run, x, y: runs.append(run) or real_step(run, x, y))
    step, model = bench.train_py_step(dict(image_size=8, channels=1, base_width=8, batch=2), False,
                                      torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    step()
    step()
    assert len(runs) == 2 and runs[0] is runs[1] and runs[0].model is model and runs[0].global_step == 2
    assert runs[0].ema_model is not None  # the run's EMA is part of what is timed
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unknown_path_or_config_is_one_clear_error():
    for option, value, known in (("--paths", "fast,eager", "fast, fast-fp32, train.py, faithful"),
                                 ("--configs", "tiny", "original, default")):
        r = subprocess.run([sys.executable, "bench.py", option, value], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].endswith(f"{option}: unknown {value.split(',')[-1]}; choose from "
                                                          f"{known}")
