"""bench_quality.py and bench_samplers.py: which runs they train or reuse, how they score them, what they print."""
import argparse
import dataclasses
import os

import pytest
import torch

from conftest import fake_cpu_bf16
from test_evaluate import make_folder
from utils import UserError


def test_bench_quality_keeps_runs_on_different_datasets_apart(tmp_path, monkeypatch):
    import bench_quality
    from checkpoints import save_config

    monkeypatch.chdir(tmp_path)
    set_a, set_b = str(tmp_path / "a" / "digits"), str(tmp_path / "b" / "digits")  # same folder name
    folders = {bench_quality.run_folder(None), bench_quality.run_folder(set_a), bench_quality.run_folder(set_b)}
    assert len(folders) == 3 and bench_quality.FOLDER in folders
    # a run that trained on set A, under the name a run on set B would take: not reused, not resumed
    trained = bench_quality.recipe_config("default", 0, True, set_a, bench_quality.FOLDER)
    run_dir = tmp_path / "models" / f"{trained.run_name}_e1"
    run_dir.mkdir(parents=True)
    save_config(trained, str(run_dir))
    torch.save({"epoch": 1}, run_dir / "state.pt")
    other = bench_quality.recipe_config("default", 0, True, set_b, bench_quality.FOLDER)
    with pytest.raises(UserError, match="trained with dataset_path .*a/digits, not .*b/digits"):
        bench_quality.train_to(other, 1)
    # nor one whose recipe has changed since (here a default)
    changed = bench_quality.recipe_config("default", 0, True, set_a, bench_quality.FOLDER)
    changed.label_dropout = 0.3
    with pytest.raises(UserError, match="label_dropout 0.1, not 0.3"):
        bench_quality.train_to(changed, 1)
    # nor one trained in another precision (on another machine); one saved before runs recorded it counts as fp32
    same = bench_quality.recipe_config("default", 0, True, set_a, bench_quality.FOLDER)
    same.device = "cpu"
    fake_cpu_bf16(monkeypatch, avx512_bf16=True, amx=True)  # this machine would train the recipe in bf16
    with pytest.raises(UserError, match="precision unrecorded, not bf16 autocast"):
        bench_quality.train_to(same, 1)
    torch.save({"epoch": 1, "precision": "bf16 autocast"}, run_dir / "state.pt")
    assert bench_quality.train_to(same, 1).run_name == f"{trained.run_name}_e1"  # reused
    fake_cpu_bf16(monkeypatch, avx512_bf16=False, amx=False)
    with pytest.raises(UserError, match="precision bf16 autocast, not fp32"):
        bench_quality.train_to(same, 1)
    assert sorted(os.listdir(run_dir)) == ["config.json", "state.pt"]


def test_bench_quality_never_cuts_a_longer_run_back(tmp_path, monkeypatch):
    import bench_quality
    from checkpoints import save_config

    monkeypatch.chdir(tmp_path)
    config = bench_quality.recipe_config("constant-lr", 0, True, None, bench_quality.FOLDER)
    run_dir = tmp_path / "models" / config.run_name
    run_dir.mkdir(parents=True)
    save_config(config, str(run_dir))
    torch.save({"epoch": 2}, run_dir / "state.pt")
    calls = []
    monkeypatch.setattr(bench_quality.train, "train", lambda c, **kw: calls.append((c.run_name, c.epochs, kw)))
    shorter = bench_quality.train_to(config, 1)
    assert calls == [(f"{config.run_name}_e1", 1, {"overwrite": True})] and shorter.run_name.endswith("_e1")
    assert torch.load(run_dir / "state.pt") == {"epoch": 2}  # the longer run is left as it was
    calls.clear()
    assert bench_quality.train_to(config, 2).run_name == config.run_name and calls == []  # reused
    trained = dataclasses.replace(config, num_classes=10)  # as training resolved it from the data
    assert config.num_classes is None and bench_quality.recipe_changes(trained, config) == []


def test_bench_quality_scores_with_the_sampling_steps_asked(tmp_path, monkeypatch, capsys):
    import bench_quality

    config = bench_quality.recipe_config("default", 0, False, None, bench_quality.FOLDER)
    steps = []
    monkeypatch.setattr(bench_quality, "load_for_sampling", lambda path, device: (path, "model", config, "diffusion"))
    monkeypatch.setattr(bench_quality, "with_guide", lambda model, *a: (model, None))
    monkeypatch.setattr(bench_quality, "generate",
                        lambda *a, **kw: steps.append((a[6], kw["seed"], kw["clip"])) or (None, None))
    judge = argparse.Namespace(evaluate=lambda images, labels: {})
    bench_quality.score(config, judge, 1, torch.device("cpu"))
    bench_quality.score(config, judge, 1, torch.device("cpu"), sample_steps=7, clip=True, seed=2)
    assert steps == [(config.sample_steps, 0, False), (7, 2, True)]  # the recipe's own: unclipped
    # a conditional run trained earlier: the class count comes from its saved config, not the recipe's None
    conditional = bench_quality.recipe_config("default", 0, True, None, bench_quality.FOLDER)
    assert conditional.num_classes is None
    saved = argparse.Namespace(num_classes=3, cluster_sizes=None)
    monkeypatch.setattr(bench_quality, "load_for_sampling", lambda path, device: (path, "model", saved, "diffusion"))
    monkeypatch.setattr(bench_quality, "generate", lambda *a, **kw: steps.append(a[3]) or (None, None))
    bench_quality.score(conditional, judge, 1, torch.device("cpu"))
    assert steps[-1] == [0, 1, 2]
    data = make_folder(tmp_path / "data", n_per_class=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        bench_quality.main(["--dataset-path", data, "--sample-steps", "0"])
    assert exit.value.code == 2 and "--sample-steps 0: between 1 and 999" in capsys.readouterr().err


def test_bench_quality_recipes_keep_the_presets_clip_only_with_its_sampling(monkeypatch):
    import bench_quality

    assert bench_quality.recipe_config("default", 0, True, None).clip is False  # DDIM eta=1 unclipped
    assert bench_quality.recipe_config("eps", 0, True, None).clip is False  # whatever the network predicts
    monkeypatch.setitem(bench_quality.RECIPES, "eta-0", ("default", dict(eta=0.0)))
    assert bench_quality.recipe_config("eta-0", 0, True, None).clip is None  # deterministic: the sampler's own


def test_bench_quality_fp32_recipe_trains_and_samples_in_fp32_where_the_default_takes_bf16(monkeypatch, tmp_path):
    """The comparison a native-bf16 machine needs (make bf16-check): --recipes default,fp32, the policy against
    --no-amp, each run trained in its own precision and never one reused for the other."""
    import bench_quality
    import train

    fake_cpu_bf16(monkeypatch, avx512_bf16=True, amx=True)
    cpu, dtypes, trained = torch.device("cpu"), [], []
    saved = argparse.Namespace(cluster_sizes=None)
    monkeypatch.setattr(bench_quality, "load_for_sampling", lambda path, device: (path, "model", saved, "diffusion"))
    monkeypatch.setattr(bench_quality, "with_guide", lambda model, *a: (model, None))
    monkeypatch.setattr(bench_quality, "generate", lambda *a, **kw: dtypes.append(kw["amp_dtype"]) or (None, None))
    judge = argparse.Namespace(evaluate=lambda images, labels: {})
    for name in ("default", "fp32"):
        config = bench_quality.recipe_config(name, 0, False, None)
        dtypes.append(train.build_run(config, 0, 1, cpu, steps_per_epoch=2).amp_dtype)
        bench_quality.score(config, judge, 1, cpu)
    assert dtypes == [torch.bfloat16, torch.bfloat16, None, None]
    # the whole bench: each run trained on the device it is scored on, in its recipe's precision
    monkeypatch.setattr(bench_quality, "train_to", lambda c, epochs: trained.append(
        (os.path.basename(c.run_name), c.device, c.amp)) or c)
    monkeypatch.setattr(bench_quality, "score", lambda *a, **kw: {"confident": 1.0, "histogram": [1], "fd": 1.0,
                                                                  "fd_floor": 1.0})
    monkeypatch.setattr(bench_quality, "get_data", lambda config: [None] * 10)
    monkeypatch.setattr(bench_quality, "prepare_mnist", lambda: "data/mnist")
    monkeypatch.setattr(bench_quality, "Evaluator", lambda *a, **kw: argparse.Namespace(
        heldout_acc=1.0, heldout_class_acc={0: 1.0}, heldout_confident=1.0))
    monkeypatch.chdir(tmp_path)
    bench_quality.main(["--unconditional", "--recipes", "default,fp32", "--steps", "10", "--device", "cpu"])
    assert trained == [("u_default_s0", "cpu", True), ("u_fp32_s0", "cpu", False)]


def test_bench_quality_averages_draws():
    from bench_quality import mean_of

    draws = [{"n": 4, "fd": 2.0, "fd_floor": 1.0, "label_acc": 0.5, "class_acc": {0: 0.0, 1: 1.0}, "histogram": [3, 1]},
             {"n": 4, "fd": 4.0, "fd_floor": 1.0, "label_acc": 1.0, "class_acc": {0: 1.0, 1: 1.0}, "histogram": [2, 2]}]
    assert mean_of(draws) == {"n": 4, "fd": 3.0, "fd_floor": 1.0, "label_acc": 0.75, "class_acc": {0: 0.5, 1: 1.0},
                              "histogram": [5, 3]}
    assert mean_of(draws[:1]) == draws[0]


def test_quality_plot_says_what_a_step_is(tmp_path):
    import bench_quality

    r = {"label_acc": 0.9, "fd": 2.0, "fd_floor": 1.0}
    results = {(recipe, 0, steps): r for recipe in ("default", "batch-32") for steps in (100, 200)}
    same = bench_quality.plot(results, str(tmp_path / "a.png"), False, {"default": 64, "batch-32": 64})
    assert same.axes[0].get_xlabel() == "optimizer steps (batch 64)" and (tmp_path / "a.png").is_file()
    mixed = bench_quality.plot(results, str(tmp_path / "b.png"), False, {"default": 64, "batch-32": 32})
    assert mixed.axes[0].get_xlabel() == "optimizer steps"
    assert [t.get_text() for t in mixed.axes[0].get_legend().get_texts()] == ["default (batch 64)",
                                                                                "batch-32 (batch 32)"]
    import matplotlib.pyplot as plt
    plt.close(same), plt.close(mixed)


def test_bench_samplers_scores_the_defaults_unclipped_ddim_beside_the_clipped(tmp_path, monkeypatch):
    import bench_samplers
    from checkpoints import save_config
    from config import RunConfig
    from modules import UNet_conditional

    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "data", n_per_class=10, size=8)
    run = tmp_path / "run"
    os.makedirs(run)
    torch.manual_seed(0)
    torch.save(UNet_conditional(1, 1, num_classes=2, base_width=8).state_dict(), run / "ema_ckpt.pt")
    save_config(RunConfig(conditional=True, channels=1, base_width=8, num_classes=2, image_size=8, noise_steps=60,
                          dataset_path=data), str(run))
    bench_samplers.main(["--ckpt", str(run), "--n", "4", "--n-ddpm", "0", "--out", str(tmp_path / "t.md")])
    rows = {" | ".join(line.split(" | ")[:3]): line.split(" | ")[3:5] for line in open(tmp_path / "t.md")
            if line.startswith("| DDIM")}  # (sampler, NFE, eta): (accuracy, FD)
    assert {"| DDIM | 50 | 1.0", "| DDIM, unclipped | 50 | 1.0"} <= set(rows)
    # an untrained network's x0 predictions leave the data range: the clip changes what the judge sees
    assert rows["| DDIM | 50 | 1.0"] != rows["| DDIM, unclipped | 50 | 1.0"]


def test_bench_quality_reports_the_training_time_alone(tmp_path, monkeypatch, capsys):
    """The training-minutes column: each point's own run (a schedule trains a run per point), without the
    scoring of the points before it; a run already there reads "reused"."""
    import bench_quality

    clock = [0.0]

    def train_to(config, epochs):
        clock[0] += 0 if epochs == 1 else 60 * epochs  # the one-epoch run is already there
        return config

    def score(*args, **kwargs):
        clock[0] += 600
        return {"confident": 0.9, "histogram": [1, 1], "fd": 2.0, "fd_floor": 1.0}

    monkeypatch.setattr(bench_quality, "time", argparse.Namespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench_quality, "train_to", train_to)
    monkeypatch.setattr(bench_quality, "score", score)
    monkeypatch.setattr(bench_quality, "get_data", lambda config: [None] * 10)  # 10 steps an epoch
    monkeypatch.setattr(bench_quality, "prepare_mnist", lambda: "data/mnist")
    monkeypatch.setattr(bench_quality, "Evaluator", lambda *a, **kw: argparse.Namespace(
        heldout_acc=1.0, heldout_class_acc={0: 1.0}, heldout_confident=1.0))
    monkeypatch.chdir(tmp_path)
    bench_quality.main(["--unconditional", "--recipes", "default", "--steps", "10,20,30", "--out", "table.md"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| default")]
    assert [row.split("|")[-2].strip() for row in rows] == ["reused", "2.0", "3.0"]


def test_bench_quality_scores_the_weights_as_the_original_readme_samples_them(monkeypatch, capsys):
    import bench_quality

    config = bench_quality.recipe_config("default", 0, False, None, bench_quality.FOLDER)
    calls = []
    monkeypatch.setattr(bench_quality, "load_for_sampling",
                        lambda path, device: calls.append(path) or (path, "model", config, "diffusion"))
    monkeypatch.setattr(bench_quality, "with_guide", lambda *a: pytest.fail("the original's script has no guide"))
    monkeypatch.setattr(bench_quality, "generate", lambda *a, **kw: calls.append(
        (a[5], a[6], kw["corrector_snr"], kw["clip"])) or (None, None))
    judge = argparse.Namespace(evaluate=lambda images, labels: {})
    for weights in ("ckpt", "ema"):
        bench_quality.score(config, judge, 1, torch.device("cpu"), original_script=weights)
    assert calls == [os.path.join("models", config.run_name, "ckpt.pt"), ("ddpm", 999, 0.0, None),
                     os.path.join("models", config.run_name, "ema_ckpt.pt"), ("ddpm", 999, 0.0, None)]
    with pytest.raises(SystemExit) as exit:
        bench_quality.main(["--unconditional", "--original-script", "ema", "--corrector-snr", "0.3"])
    assert exit.value.code == 2 and "--original-script samples a run's weights alone" in capsys.readouterr().err
