"""Checkpoints say what they are: the original's few lines sample every checkpoint right, or fail in one line."""
import io

import pytest
import torch

import sample
import train
from checkpoints import cpu_state_dict
from config import RunConfig
from ddpm import Diffusion
from modules import UNet, UNet_conditional, network_of

TINY = ["--image-size", "8", "--base-width", "8", "--batch-size", "4", "--noise-steps", "50", "--seed", "0",
        "--n-samples", "2", "--sample-steps", "2", "--epochs", "1", "--run-name", "tiny"]


def saved_and_loaded(state_dict):
    """Through torch.save and the original's torch.load (weights_only, as torch's default now is)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def v_model(**changes):
    """A v-prediction network as a default run builds it (8x8, width 8, T=50)."""
    return RunConfig(**{**dict(channels=1, base_width=8, image_size=8, noise_steps=50), **changes}).make_model()


def test_a_checkpoint_carries_its_constructor_and_diffusion_and_loading_records_them():
    weights = saved_and_loaded(cpu_state_dict(v_model()))
    info = weights._metadata[""]["ddpm"]
    assert info["network"] == "UNet" and info["args"] == dict(c_in=1, c_out=1, time_dim=256, base_width=8)
    assert info["trained_with"] == dict(prediction="v", noise_steps=50, beta_start=1e-4, beta_end=0.02, image_size=8)
    model = UNet(**network_of(weights)[1])
    model.load_state_dict(weights)
    assert model.trained_with == info["trained_with"]
    model.load_state_dict(dict(weights))  # a plain dict, as the original's checkpoints: says nothing
    assert model.trained_with == {}


def test_diffusion_samples_a_model_as_its_weights_say_and_refuses_a_contradiction():
    model = UNet(c_in=1, c_out=1, base_width=8)
    model.load_state_dict(saved_and_loaded(cpu_state_dict(v_model())))
    draws = {}
    for prediction in (None, "v"):
        g = torch.Generator().manual_seed(0)
        draws[prediction] = Diffusion(noise_steps=50, img_size=8, prediction=prediction).sample(
            model, 2, generator=g, progress=False, raw=True)
    assert torch.equal(draws[None], draws["v"])
    with pytest.raises(ValueError, match="prediction='eps'.*predict 'v'"):
        Diffusion(noise_steps=50, img_size=8, prediction="eps").sample(model, 2, progress=False)
    with pytest.raises(ValueError, match="trained with noise_steps=50"):
        Diffusion(img_size=8).sample(model, 2, progress=False)  # the default T=1000


def test_the_originals_checkpoints_sample_as_eps_as_before():
    model = UNet(c_in=1, c_out=1, base_width=8)
    model.load_state_dict(saved_and_loaded(UNet(c_in=1, c_out=1, base_width=8).state_dict()))
    assert model.trained_with == {}
    a, b = (Diffusion(noise_steps=20, img_size=8, prediction=p).sample(
        model, 2, generator=torch.Generator().manual_seed(0), progress=False, raw=True) for p in (None, "eps"))
    assert torch.equal(a, b)


def test_a_wrong_shape_names_the_constructor_that_fits_in_one_line():
    weights = saved_and_loaded(cpu_state_dict(v_model()))
    for wrong in (UNet(), UNet(c_in=1, c_out=1, base_width=16), UNet_conditional(1, 1, num_classes=10, base_width=8)):
        with pytest.raises(RuntimeError) as e:
            wrong.load_state_dict(weights)
        assert "build that" in str(e.value) and "\n" not in str(e.value)
        assert "saved from UNet(c_in=1, c_out=1, base_width=8)" in str(e.value)
    conditional = saved_and_loaded(UNet_conditional(3, 3, num_classes=4, base_width=8).state_dict())
    with pytest.raises(RuntimeError, match=r"saved from UNet_conditional\(base_width=8, num_classes=4\)"):
        UNet(base_width=8).load_state_dict(conditional)


def saturated_share(images):
    return ((images == 0) | (images == 255)).float().mean().item()


def test_the_original_lines_give_unsaturated_images_where_reading_v_as_eps_would_not():
    """A v-network whose output is zero: sampled as v, each DDPM step scales x by sqrt(alpha) and adds noise of
    variance beta, so the samples stay N(0, 1) (a third of the pixels beyond the data range); read as eps (what
    Diffusion did before the weights said), each step divides by sqrt(alpha) and the samples blow up."""
    trained = v_model(noise_steps=100, beta_end=0.2)  # alpha_hat falls to 4e-5, as in the original's 1000 steps
    torch.nn.init.zeros_(trained.outc.weight)
    torch.nn.init.zeros_(trained.outc.bias)
    weights = saved_and_loaded(cpu_state_dict(trained))
    model = UNet(c_in=1, c_out=1, base_width=8)
    model.load_state_dict(weights)
    diffusion = Diffusion(noise_steps=100, beta_end=0.2, img_size=8)
    assert saturated_share(diffusion.sample(model, 16, progress=False)) < 0.4
    model.trained_with = {}
    assert saturated_share(diffusion.sample(model, 16, progress=False)) > 0.9


@pytest.mark.parametrize("conditional", [False, True])
def test_the_original_lines_on_a_default_run_give_sample_pys_images(conditional, image_folder, in_tmp,
                                                                    monkeypatch):
    """A tiny default run of each script (v-prediction), sampled by the original README's lines with nothing
    but the image size and T given, gives sample.py's images at the same sampler and seed."""
    train.main(conditional, ["--dataset-path", image_folder, *TINY])
    weights = torch.load("models/tiny/ema_ckpt.pt")
    model = (UNet_conditional(num_classes=3, base_width=8) if conditional else UNet(base_width=8))
    model.load_state_dict(weights)
    labels = torch.arange(3) if conditional else None
    ours = Diffusion(noise_steps=50, img_size=8).sample(model, 3, labels, cfg_scale=3,
                                                        generator=torch.Generator().manual_seed(0), progress=False)
    written = []
    monkeypatch.setattr(sample, "write", lambda images, *rest: written.append(images))
    sample.main(["--ckpt", "models/tiny/ema_ckpt.pt", "--n", "1" if conditional else "3", "--seed", "0",
                 "--sampler", "ddpm", "--cfg-scale", "3", "--cfg-min-sigma", "0", "--corrector-snr", "0",
                 "--guide-scale", "1", "--no-clip", "--no-progress"])
    assert torch.equal(ours, written[0])
    model.trained_with = {}  # as before the weights said what they predict: other images
    theirs = Diffusion(noise_steps=50, img_size=8).sample(model, 3, labels, cfg_scale=3,
                                                          generator=torch.Generator().manual_seed(0), progress=False)
    assert not torch.equal(theirs, written[0])


def test_a_run_saved_before_checkpoints_said_it_resumes_into_checkpoints_that_do(image_folder, in_tmp):
    args = ["--dataset-path", image_folder, *TINY]
    train.main(True, args)
    for name in ("ckpt.pt", "ema_ckpt.pt"):  # as an earlier version wrote them: plain dicts
        torch.save(dict(torch.load(f"models/tiny/{name}")), f"models/tiny/{name}")
    train.main(True, [*args, "--epochs", "2", "--resume"])
    for name in ("ckpt.pt", "ema_ckpt.pt"):
        info = torch.load(f"models/tiny/{name}")._metadata[""]["ddpm"]
        assert info["trained_with"]["prediction"] == "v" and info["network"] == "UNet_conditional"
