"""sample.py end to end on tiny checkpoints made here."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from checkpoints import save_config
from config import RunConfig
from conftest import fake_cpu_bf16
from modules import UNet, UNet_conditional
from train import rng_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(folder, conditional=True, channels=1, num_classes=3, image_size=8, config=True, legacy=False):
    """A run folder as train.py leaves it: ema_ckpt.pt (a plain state_dict) and config.json; legacy=True
    writes an earlier version's state.pt, whose "args" held the settings, instead of config.json."""
    torch.manual_seed(0)
    net = UNet_conditional(channels, channels, num_classes=num_classes, base_width=8) if conditional \
        else UNet(channels, channels, base_width=8)
    os.makedirs(folder, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(folder, "ema_ckpt.pt"))
    settings = dict(conditional=conditional, image_size=image_size, channels=channels, base_width=8,
                    num_classes=num_classes, noise_steps=20)
    if legacy:
        torch.save({"args": settings, "rng": rng_state()}, os.path.join(folder, "state.pt"))
    elif config:
        save_config(RunConfig(**settings), str(folder))
    return os.path.join(folder, "ema_ckpt.pt")


def run(argv, capsys):
    """main(argv) -> (exit code, stdout, stderr)."""
    code = 0
    try:
        sample.main(argv + ["--no-progress"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("legacy", [False, True])
def test_grid_with_settings_from_the_run(tmp_path, capsys, legacy):
    ckpt = make_run(tmp_path / "run", legacy=legacy)  # config.json, or an earlier version's state.pt
    out = tmp_path / "grid.png"
    code, stdout, _ = run(["--ckpt", str(ckpt), "--labels", "0-2", "--n", "2", "--steps", "3", "--seed", "0",
                           "--out", str(out)], capsys)
    assert code == 0 and "wrote 6 images" in stdout
    img = Image.open(out)
    # 8x8 images from the run's image_size, 2 per row, one row per label, make_grid's 2-pixel padding
    assert img.size == (2 * 10 + 2, 3 * 10 + 2)


def test_folders_per_label_and_comma_list(tmp_path, capsys):
    ckpt = make_run(tmp_path / "run")
    out = tmp_path / "imgs"
    code, _, _ = run(["--ckpt", str(ckpt), "--labels", "0,2", "--n", "3", "--sampler", "ddim", "--steps", "2",
                      "--out", str(out) + "/"], capsys)
    assert code == 0
    assert sorted(os.listdir(out)) == ["0", "2"]
    files = sorted(os.listdir(out / "2"))
    assert len(files) == 3 and Image.open(out / "2" / files[0]).size == (8, 8)


def test_a_used_output_folder_is_refused_then_replaced_with_overwrite(tmp_path, capsys):
    ckpt = make_run(tmp_path / "run")
    out = tmp_path / "imgs"
    argv = ["--ckpt", str(ckpt), "--labels", "1", "--sampler", "ddim", "--steps", "2", "--out", str(out) + "/"]
    assert run(argv + ["--n", "3"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, stderr = run(argv + ["--n", "1"], capsys)
    assert code == 2 and "--overwrite" in stderr and len(os.listdir(out / "1")) == 3  # nothing mixed in
    assert run(argv + ["--n", "1", "--overwrite"], capsys)[0] == 0
    assert os.listdir(out / "1") == ["00000.png"] and (out / "notes.txt").read_text() == "mine"


def test_bare_checkpoints_guide_each_other_at_the_given_noise_steps(tmp_path, capsys):
    model = make_run(tmp_path / "bare", conditional=False, config=False)
    guide = make_run(tmp_path / "bare_guide", conditional=False, config=False)
    code, stdout, stderr = run(["--ckpt", model, "--guide", guide, "--noise-steps", "20", "--image-size", "8",
                                "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, stderr
    assert "autoguidance 1.5" in stdout


def test_the_originals_checkpoints_keep_sampling_with_ddim_50(tmp_path, capsys):
    """The default preset's unconditional runs sample with 100 steps; a bare checkpoint keeps its 50."""
    ckpt = make_run(tmp_path / "bare", config=False)
    code, stdout, stderr = run(["--ckpt", ckpt, "--labels", "0", "--n", "1", "--image-size", "8", "--out",
                                str(tmp_path / "g.png")], capsys)
    assert code == 0, stderr
    assert "ddim 50 steps" in stdout


def test_run_folder_unconditional_rgb_and_default_size_without_state(tmp_path, capsys):
    make_run(tmp_path / "run", conditional=False, channels=3, config=False)
    out = tmp_path / "flat"
    out.mkdir()  # an existing folder means single images
    code, _, _ = run(["--ckpt", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--noise_steps", "20",
                      "--out", str(out)], capsys)
    assert code == 0
    files = sorted(os.listdir(out))
    assert len(files) == 2
    img = Image.open(out / files[0])
    assert img.mode == "RGB" and img.size == (16, 16)  # no state.pt: the default 16


def test_same_seed_same_images_and_underscore_aliases(tmp_path, capsys):
    ckpt = make_run(tmp_path / "run")
    outs = []
    for i, (flag, seed) in enumerate([("--cfg-scale", "0"), ("--cfg_scale", "0"), ("--cfg-scale", "1")]):
        out = tmp_path / f"g{i}.png"
        code, _, _ = run(["--ckpt", str(ckpt), "--labels", "1", "--n", "2", "--sampler", "ddim", "--steps", "3",
                          "--eta", "1", flag, "0", "--seed", seed, "--out", str(out)], capsys)
        assert code == 0
        outs.append(np.asarray(Image.open(out)))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_amp_flag_sets_the_networks_precision(tmp_path, capsys, monkeypatch):
    fake_cpu_bf16(monkeypatch, avx512_bf16=True, amx=True)  # as on an AMX CPU, whatever this one is
    ckpt = make_run(tmp_path / "run")
    dtypes, real_generate = {}, sample.generate

    def spy(model, *args, **kwargs):
        seen = dtypes.setdefault(len(dtypes), set())
        model.outc.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
        return real_generate(model, *args, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    for flag in ("--amp", "--no-amp"):
        code, _, _ = run(["--ckpt", str(ckpt), "--labels", "1", "--n", "2", "--steps", "2", flag,
                          "--out", str(tmp_path / "g.png")], capsys)
        assert code == 0
    assert dtypes == {0: {torch.bfloat16}, 1: {torch.float32}}


def test_sampling_takes_the_devices_fast_layout_with_the_same_images(tmp_path, capsys, monkeypatch):
    ckpt = make_run(tmp_path / "run")
    layouts, images, real_generate = [], [], sample.generate

    def spy(model, *args, **kwargs):
        layouts.append(model.inc.double_conv[3].weight.is_contiguous(memory_format=torch.channels_last))
        result = real_generate(model, *args, **kwargs)
        images.append(result[0])
        return result

    monkeypatch.setattr(sample, "generate", spy)
    for capability in ("AVX2", "DEFAULT"):  # an x86 CPU: channels_last (hardware.fast_memory_format); else not
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        code, _, _ = run(["--ckpt", str(ckpt), "--labels", "1", "--n", "2", "--steps", "3", "--seed", "0",
                          "--out", str(tmp_path / "g.png")], capsys)
        assert code == 0
    assert layouts == [True, False]
    assert (images[0].int() - images[1].int()).abs().max() <= 1  # uint8 images, the same to rounding


@pytest.mark.parametrize("case", ["missing", "label_range", "uncond_labels", "size", "unwritable", "bad_labels",
                                  "ddpm_steps", "cfg_min_sigma", "guide_kind", "guide_scale_alone",
                                  "read_only_format", "corrector_snr"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    cond = make_run(tmp_path / "cond")
    uncond = make_run(tmp_path / "uncond", conditional=False)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = str(tmp_path / "out" / "g.png")
    argv = {
        "missing": ["--ckpt", str(tmp_path / "nope.pt")],
        "label_range": ["--ckpt", cond, "--labels", "2-3"],
        "uncond_labels": ["--ckpt", uncond, "--labels", "0"],
        "size": ["--ckpt", cond, "--image-size", "12"],
        "unwritable": ["--ckpt", cond, "--out", str(blocker / "sub" / "g.png")],
        "read_only_format": ["--ckpt", cond, "--out", str(tmp_path / "g.psd")],
        "bad_labels": ["--ckpt", cond, "--labels", "one"],
        "ddpm_steps": ["--ckpt", cond, "--sampler", "ddpm", "--steps", "5"],
        "cfg_min_sigma": ["--ckpt", cond, "--cfg-min-sigma", "-1"],
        "guide_kind": ["--ckpt", cond, "--guide", uncond],
        "guide_scale_alone": ["--ckpt", cond, "--guide-scale", "2"],
        "corrector_snr": ["--ckpt", uncond, "--corrector-snr", "1"],
    }[case]
    before = sorted(os.listdir(tmp_path))
    code, stdout, stderr = run(argv + (["--out", out] if "--out" not in argv else []), capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == before and stdout == ""


def test_autoguidance_steers_away_from_the_guide_the_runs_own_by_default(tmp_path, capsys):
    ckpt = make_run(tmp_path / "run", conditional=False)
    torch.manual_seed(1)  # a guide with other weights than the model's
    guide = UNet(1, 1, base_width=8)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    save_config(RunConfig(image_size=8, channels=1, base_width=8, noise_steps=20), str(tmp_path))
    grids = {}
    for name, extra in {"plain": [], "scale 1": ["--guide", str(tmp_path / "guide.pt"), "--guide-scale", "1"],
                        "scale 3": ["--guide", str(tmp_path / "guide.pt"), "--guide-scale", "3"],
                        "own guide": "own", "own guide off": ["--guide-scale", "1"]}.items():
        if extra == "own":  # the run saved a guide_ckpt.pt: sampling uses it at the run's guide_scale
            torch.save(guide.state_dict(), tmp_path / "run" / "guide_ckpt.pt")
            save_config(RunConfig(image_size=8, channels=1, base_width=8, noise_steps=20, guide_scale=3.0),
                        str(tmp_path / "run"))
            extra = []
        out = tmp_path / f"{len(grids)}.png"
        code, stdout, _ = run(["--ckpt", ckpt, "--n", "4", "--steps", "3", "--seed", "0", "--out", str(out),
                               *extra], capsys)
        assert code == 0 and ("steps, autoguidance 3.0 by" in stdout) == (name in ("scale 3", "own guide"))
        grids[name] = np.asarray(Image.open(out)).astype(int)
    assert np.abs(grids["plain"] - grids["scale 1"]).max() == 0  # lerp at 1: the model alone
    assert np.abs(grids["plain"] - grids["scale 3"]).mean() > 5
    assert np.abs(grids["own guide"] - grids["scale 3"]).max() <= 1
    assert np.abs(grids["own guide off"] - grids["plain"]).max() == 0


def test_script_runs_as_a_program(tmp_path):
    ckpt = make_run(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=ROOT)
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--labels", "0",
                         "--n", "1", "--steps", "2", "--out", str(tmp_path / "a.png")],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a.png").exists()
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--labels", "7",
                          "--out", str(tmp_path / "b.png")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "0-2" in bad.stderr
    assert not (tmp_path / "b.png").exists()


def test_the_runs_corrector_goes_with_its_own_stochastic_sampler():
    from sampling import resolve_sampling

    config = RunConfig(noise_steps=20, sampler="ddim", sample_steps=10, eta=1.0, corrector_snr=0.3)

    def resolved(**given):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]
        a = sample.build_parser().parse_args(["--ckpt", "x", *flags])
        resolve_sampling(a, config)
        return a.corrector_snr

    assert resolved() == 0.3 and resolved(corrector_snr=0.1) == 0.1
    assert resolved(sampler="dpm++") == 0 and resolved(eta=0) == 0  # deterministic ones stay deterministic
    assert resolved(sampler="dpm++", corrector_snr=0.2) == 0.2  # unless asked


def test_clip_switch_reaches_the_sampler(tmp_path, capsys):
    ckpt = make_run(tmp_path / "run")  # untrained: its x0 predictions leave [-1, 1], so the clip shows
    grids = {}
    for flags in ([], ["--clip"], ["--no-clip"]):
        out = tmp_path / f"g{len(grids)}.png"
        code, stdout, _ = run(["--ckpt", str(ckpt), "--labels", "1", "--n", "4", "--sampler", "ddim", "--steps", "3",
                               "--seed", "0", *flags, "--out", str(out)], capsys)
        assert code == 0 and ("x0 clipped)" in stdout) == (flags == ["--clip"]) and "x0 " in stdout
        grids[" ".join(flags)] = np.asarray(Image.open(out))
    assert np.array_equal(grids[""], grids["--no-clip"])  # the run's setting: the default preset's, unclipped
    assert not np.array_equal(grids[""], grids["--clip"])


def test_the_runs_clip_goes_with_its_own_sampler():
    from sampling import resolve_sampling

    config = RunConfig(noise_steps=20, sampler="ddim", sample_steps=10, clip=False)

    def resolved(*flags):
        a = sample.build_parser().parse_args(["--ckpt", "x", *flags])
        resolve_sampling(a, config)
        return a.clip

    assert resolved() is False and resolved("--clip") is True
    assert resolved("--sampler", "dpm++") is None  # the sampler's own choice: dpm++ clips
    assert resolved("--sampler", "dpm++", "--no-clip") is False
    assert resolved("--eta", "0") is None  # deterministic DDIM: its own choice


def test_the_sampling_line_names_the_clip_also_when_it_is_the_samplers_own():
    from sampling import describe_sampling, resolve_sampling

    config = RunConfig(noise_steps=20, sampler="ddim", sample_steps=10, clip=None)  # saved before the setting

    def described(*flags):
        a = sample.build_parser().parse_args(["--ckpt", "x", *flags])
        resolve_sampling(a, config)
        return describe_sampling(a, "autoguidance 2 by g")

    assert described() == "ddim 10 steps, autoguidance 2 by g, corrector 0.3, x0 clipped"  # DDIM's own clip
    assert described("--sampler", "ddpm") == "ddpm 19 steps, autoguidance 2 by g, x0 unclipped"
    assert described("--no-clip", "--corrector-snr", "0").endswith("10 steps, autoguidance 2 by g, x0 unclipped")
    a = sample.build_parser().parse_args(["--ckpt", "x", "--cfg-scale", "1.6", "--cfg-min-sigma", "1"])
    resolve_sampling(a, config)
    assert describe_sampling(a, takes_labels=True) == \
        "ddim 10 steps, CFG 1.6 where sigma > 1, corrector 0.3, x0 clipped"
