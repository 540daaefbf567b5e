"""Issue 2: the original's networks and diffusion process, on any size and any device."""
import argparse
import glob
import os

import pytest
import torch

from conftest import REFERENCE, deterministic_weights, write_images
from ddpm import Diffusion, to_uint8
from modules import EMA, UNet, UNet_conditional, set_original_attention
from checkpoints import load_weights
from utils import UserError, get_data, plot_images, save_images


def reference_keys(name):
    rows = [line.split("\t") for line in open(os.path.join(REFERENCE, name)).read().splitlines()]
    return [(k, tuple(int(d) for d in s.strip("()").split(",") if d.strip())) for k, s in rows]


@pytest.mark.parametrize("cls,tsv", [(UNet, "unet_state_dict.tsv"),
                                     (UNet_conditional, "unet_conditional_state_dict.tsv")])
def test_state_dict_is_the_originals(cls, tsv):
    model = cls(num_classes=10) if cls is UNet_conditional else cls()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == reference_keys(tsv)
    # an original checkpoint (same keys, same shapes) loads strictly
    model.load_state_dict({k: torch.zeros(s) for k, s in reference_keys(tsv)}, strict=True)


def test_forward_matches_the_original():
    ref = torch.load(os.path.join(REFERENCE, "forward_64.pt"), weights_only=True)
    unet = deterministic_weights(UNet()).eval()
    cond = deterministic_weights(UNet_conditional(num_classes=10)).eval()
    with torch.no_grad():
        assert (unet(ref["x"], ref["t"]) - ref["unet"]).abs().max() <= 1e-4
        assert (cond(ref["x"], ref["t"], ref["y"]) - ref["unet_conditional_labels"]).abs().max() <= 1e-4
        assert (cond(ref["x"], ref["t"], None) - ref["unet_conditional_none"]).abs().max() <= 1e-4
        set_original_attention(unet)  # the faithful path computes the same function
        assert (unet(ref["x"], ref["t"]) - ref["unet"]).abs().max() <= 1e-4


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (32, 32), (48, 64)])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_size_and_channels(hw, channels):
    x = torch.randn(2, channels, *hw)
    t = torch.tensor([1, 999])
    assert UNet(channels, channels, base_width=8)(x, t).shape == x.shape
    cond = UNet_conditional(channels, channels, num_classes=4, base_width=8)
    assert cond(x, t, torch.tensor([0, 3])).shape == x.shape


def test_device_argument_still_accepted_and_sizes_checked():
    model = UNet(device="cuda", base_width=8)  # the original's default; must not crash on a CPU machine
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.randn(1, 3, 12, 12), torch.tensor([5]))
    with pytest.raises(ValueError, match="c_in=1"):
        model(torch.randn(1, 1, 8, 8), torch.tensor([5]))


def test_noise_images_closed_form():
    d = Diffusion(img_size=8, device="cpu")
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    for step in (1, 300, 999):
        t = torch.full((len(x0),), step)
        x_t, noise = d.noise_images(x0, t)
        a = d.alpha_hat[step]
        assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
        assert abs(x_t.mean() - a.sqrt() * 0.7) < 0.02
        assert abs(x_t.var() - (1 - a)) < 0.03
    t = d.sample_timesteps(5000)
    assert t.min() >= 1 and t.max() <= 999


def test_schedule_is_the_originals():
    d = Diffusion(device="cpu")
    assert d.noise_steps == 1000 and d.img_size == 256
    assert torch.allclose(d.beta, torch.linspace(1e-4, 0.02, 1000))
    assert torch.allclose(d.alpha_hat, torch.cumprod(1 - d.beta, 0))


def test_min_snr_weight():
    d = Diffusion(img_size=8, device="cpu")
    t = torch.tensor([1, 100, 500, 999])
    snr = d.alpha_hat[t] / (1 - d.alpha_hat[t])
    w = d.loss_weight(t, gamma=5.0)
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.01 and torch.equal(w[2:], torch.ones(2))  # only the nearly clean timesteps are damped


def test_weighted_timesteps_keep_the_expected_loss():
    d = Diffusion(img_size=2, device="cpu", prediction="v")
    all_t = torch.arange(1, 1000)
    w = d.loss_weight(all_t, 5.0)
    t = d.sample_weighted_timesteps(400_000, 5.0, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1 and t.max() <= 999
    share = torch.bincount(t - 1, minlength=999).float().view(9, 111).sum(1) / len(t)
    assert torch.allclose(share, w.view(9, 111).sum(1) / w.sum(), atol=3e-3)  # drawn as often as weighted

    def loss(t, importance_sampled):  # a per-sample MSE of f(t) = t / 1000: x0 = noise = 0 make v = 0
        zeros, out = torch.zeros(len(t), 1, 2, 2), (t / 1000).sqrt().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        return d.training_loss(out, zeros, t, zeros, 5.0, importance_sampled)[0]

    # the same objective as uniform t with the weight applied: only the sampling noise differs
    assert loss(t, True).item() == pytest.approx(loss(all_t, False).item(), rel=0.01)


def test_reverse_step_is_algorithm_2():
    d = Diffusion(img_size=8, device="cpu")
    x, eps, z = torch.randn(3, 2, 1, 8, 8)
    for step in (2, 500, 999):
        t = torch.full((2,), step)
        a, ah, b = d.alpha[step], d.alpha_hat[step], d.beta[step]
        expected = 1 / a.sqrt() * (x - (1 - a) / (1 - ah).sqrt() * eps) + b.sqrt() * z
        assert torch.allclose(d.ddpm_step(x, t, eps, z), expected, atol=1e-6)


def test_batched_cfg_equals_two_passes():
    torch.manual_seed(0)
    model = UNet_conditional(1, 1, num_classes=10, base_width=8).eval()
    d = Diffusion(img_size=8, device="cpu")
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 500, 999]), torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        two = torch.lerp(model(x, t, None), model(x, t, y), 3.0)
        one = d.predict_noise(model, x, t, y, cfg_scale=3.0)
        assert torch.allclose(one, two, atol=1e-5)
        assert torch.allclose(d.predict_noise(model, x, t, y, 3.0, batched_cfg=False), two)
        # label -1 is "no label" for that sample only
        mixed = model(x, t, torch.tensor([0, -1, 9, -1]))
        assert torch.allclose(mixed[1], model(x, t, None)[1], atol=1e-5)
        assert torch.allclose(mixed[0], model(x, t, y)[0], atol=1e-5)


def test_sample_dtype_range_and_mode():
    torch.manual_seed(0)
    model = UNet(1, 1, base_width=8).train()
    d = Diffusion(noise_steps=20, img_size=(8, 16), device="cpu")
    x = d.sample(model, n=3)
    assert x.dtype == torch.uint8 and x.shape == (3, 1, 8, 16)
    assert model.training  # restored as found
    cond = UNet_conditional(3, 3, num_classes=10, base_width=8).eval()
    x = d.sample(cond, 2, torch.tensor([1, 2]), cfg_scale=3)
    assert x.shape == (2, 3, 8, 16) and not cond.training
    assert to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 5.0])).tolist() == [0, 0, 127, 255, 255]


def test_ema_hard_copies_then_decays():
    model, ema_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema = EMA(0.9)
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step_ema(ema_model, model, step_start_ema=3)
        assert torch.equal(ema_model.weight, model.weight)  # warm-up: a copy
    before = ema_model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step_ema(ema_model, model, step_start_ema=3)
    assert torch.allclose(ema_model.weight, 0.9 * before + 0.1 * model.weight)
    assert ema.step == 4
    assert EMA(0.995).step_start_ema == 2000


def test_get_data_image_folder_and_flat_folder(image_folder, tmp_path):
    args = argparse.Namespace(dataset_path=image_folder, image_size=8, batch_size=4)
    loader = get_data(args)
    assert loader.dataset.classes == ["class0", "class1", "class2"]
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert sorted(torch.cat([y for _, y in loader]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # all seen
    flat = str(tmp_path / "flat")
    write_images(flat, 5, mode="L")
    args = argparse.Namespace(dataset_path=flat, image_size=(8, 16), batch_size=5, channels=1)
    images, labels = next(iter(get_data(args)))
    assert images.shape == (5, 1, 8, 16) and labels.tolist() == [0] * 5


def test_centre_cropped_images_are_read_from_their_files_once(image_folder):
    """Later epochs take the kept samples, equal to freshly made ones; random crops are made anew each time."""
    def loader(crop, workers=0):
        args = argparse.Namespace(dataset_path=image_folder, image_size=8, batch_size=4, crop=crop, seed=0,
                                  num_workers=workers)
        return get_data(args, shuffle=False)

    kept, random_crops = loader("center"), loader("random")
    first = torch.cat([x for x, _ in kept])
    assert torch.equal(first, torch.cat([x for x, _ in loader("center", workers=1)]))  # made anew in a worker
    for image in glob.glob(os.path.join(image_folder, "*", "*.png")):
        os.remove(image)
    assert torch.equal(torch.cat([x for x, _ in kept]), first)  # the next epoch: no file left to read
    with pytest.raises(UserError, match="cannot read image"):
        next(iter(random_crops))


def test_save_and_plot_images_headless(in_tmp, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    for ext in ("jpg", "png"):
        save_images(images, f"results/run/0.{ext}")
        assert os.path.getsize(f"results/run/0.{ext}") > 0
    path = plot_images(images, "my title")
    assert path and os.path.isfile(path)
    assert plot_images(images[:1, :1]) is not None  # grayscale, no title


def test_api_block_user_script(in_tmp):
    """DEVELOPERS.md's API block, end to end at a tiny size."""
    from ddpm_conditional import Diffusion as Diffusion2
    from utils import setup_logging

    assert Diffusion2 is Diffusion
    device = "cpu"
    model = UNet(base_width=8).to(device)
    torch.save(model.state_dict(), "ckpt.pt")
    model = UNet(base_width=8).to(device)
    model.load_state_dict(torch.load("ckpt.pt"))
    diffusion = Diffusion(noise_steps=10, img_size=8, device=device)
    x = diffusion.sample(model, n=4)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.uint8
    model = UNet_conditional(num_classes=10, base_width=8).to(device)
    labels = torch.arange(4)
    x = diffusion.sample(model, 4, labels, cfg_scale=3)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = diffusion.sample_timesteps(4)
    x_t, noise = diffusion.noise_images(x0, t)
    assert x_t.shape == noise.shape == x0.shape
    ema = EMA(0.995)
    ema_model = UNet_conditional(num_classes=10, base_width=8)
    ema.step_ema(ema_model, model)
    setup_logging("run")
    save_images(x, "results/run/0.jpg")
    assert os.path.isfile("results/run/0.jpg") and os.path.isdir("models/run")


def test_prefixed_checkpoints_load_and_mismatch_is_explained():
    from utils import UserError

    model = UNet_conditional(1, 1, num_classes=10, base_width=8)
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    load_weights(UNet_conditional(1, 1, num_classes=10, base_width=8), sd)
    with pytest.raises(UserError, match="class-conditional"):
        load_weights(UNet(1, 1, base_width=8), model.state_dict())
    with pytest.raises(UserError, match="num-classes should be 10"):
        load_weights(UNet_conditional(1, 1, num_classes=5, base_width=8), model.state_dict())
    with pytest.raises(UserError, match="base width 8"):
        load_weights(UNet_conditional(1, 1, num_classes=10, base_width=16), model.state_dict())


def test_openmp_spin_is_set_only_when_the_user_has_not():
    import subprocess
    import sys

    from conftest import ROOT

    code = "import os, ddpm; print(os.environ.get('GOMP_SPINCOUNT'))"
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    for extra, expected in (({}, "3000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None"), ({"GOMP_SPINCOUNT": "7"}, "7")):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **extra}, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == expected, (extra, out)
