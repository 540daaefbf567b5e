"""The defaults table (config.py): each script's defaults and the original's, each value written once; what the
default ddpm.py trains; the default run names."""
import dataclasses
import json
import os

import pytest
import torch

from checkpoints import load_checkpoint
from config import AS_DDPM, DIFFERENCES, PRESETS, RunConfig, preset_config
from modules import UNet
from options import parse_args, resolve_args

COLUMNS = {(True, "default"): 0, (False, "original"): 1, (True, "original"): 2}


def test_the_table_names_only_settings_that_differ_and_runconfig_holds_ddpm_py_s():
    fields = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    assert set(DIFFERENCES) <= set(fields)
    assert preset_config("default", False) == RunConfig(preset="default")  # ddpm.py's defaults are RunConfig's
    for name, cells in DIFFERENCES.items():
        assert len(cells) == 3 and cells[1] != AS_DDPM, name  # the original's ddpm.py is always written out
        assert any(cell not in (AS_DDPM, fields[name]) for cell in cells), f"{name}: the same everywhere"
        assert cells[2] != cells[1], f"{name}: write {AS_DDPM} for the original's conditional script"
        assert cells[0] != fields[name], f"{name}: write {AS_DDPM} for ddpm_conditional.py"
    for (conditional, preset), column in COLUMNS.items():
        config = preset_config(preset, conditional)
        ddpm = preset_config(preset, False)
        for name, default in fields.items():
            cell = DIFFERENCES.get(name, (AS_DDPM,) * 3)[column]
            expected = {"conditional": conditional, "preset": preset}.get(
                name, getattr(ddpm, name) if cell == AS_DDPM else cell)
            assert getattr(config, name) == expected, (preset, conditional, name)
    assert PRESETS["original"]["cfg_scale"] == 3.0  # the original's bare checkpoints are guided so


def test_each_script_s_defaults_as_the_help_says():
    d, c = (resolve_args(parse_args(k, []))[0] for k in (False, True))
    assert (d.clusters, d.guide_at, d.guide_scale, d.sampler, d.sample_steps, d.corrector_snr, d.clip) == \
        (0, 0.25, 2.0, "ddim", 100, 0.3, False)
    assert (c.guide_at, c.sample_steps, c.corrector_snr, c.cfg_scale, c.cfg_min_sigma, c.ema) == \
        (0.0, 50, 0.0, 1.6, 1.0, True)


@pytest.mark.parametrize("conditional,argv,name", [
    (False, [], "DDPM_Unconditional_mnist"),
    (True, [], "DDPM_conditional_mnist"),
    (False, ["--dataset-path", "my_photos/"], "DDPM_Unconditional_my_photos"),
    (True, ["--dataset-path", "data/my_photos"], "DDPM_conditional_my_photos"),
    (True, ["--dataset-path", "my_photos", "--run-name", "mine"], "mine"),
    (False, ["--preset", "original", "--dataset-path", "my_photos"], "DDPM_Unconditional"),
    (True, ["--preset", "original"], "DDPM_conditional"),
])
def test_a_user_folder_gets_a_run_of_its_own_name(conditional, argv, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/my_photos")
    os.symlink("data/my_photos", "my_photos")
    assert resolve_args(parse_args(conditional, argv))[0].run_name == name


def test_the_default_ddpm_py_trains_the_plain_unet_on_no_labels(image_folder, in_tmp, monkeypatch):
    import train

    def no_labels(*args):
        raise AssertionError("the default unconditional run dropped labels: it took some")

    monkeypatch.setattr(train, "drop_labels", no_labels)
    train.main(False, ["--dataset-path", image_folder, "--run-name", "u", "--epochs", "1", "--image-size", "8",
                       "--base-width", "8", "--batch-size", "4", "--sample-steps", "2", "--n-samples", "2",
                       "--noise-steps", "20", "--seed", "0"])
    config = json.load(open("models/u/config.json"))
    assert config["network"]["clusters"] == 0 and config["data"]["cluster_sizes"] is None
    assert not os.path.exists("models/u/clusters.pt") and os.path.isfile("models/u/guide_ckpt.pt")
    for name in ("ckpt.pt", "ema_ckpt.pt", "guide_ckpt.pt"):  # the original's UNet, strictly
        UNet(c_in=3, c_out=3, base_width=8).load_state_dict(load_checkpoint(f"models/u/{name}"))
    assert not any("label_emb" in k for k in load_checkpoint("models/u/ckpt.pt"))
    assert torch.load("models/u/optim.pt", weights_only=True)
