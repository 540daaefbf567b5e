"""Sample quality against optimizer steps: short training runs of named recipes, each scored by the judge
(quality.py) at several points, printed as a markdown table and plotted.

    python bench_quality.py                                        # default vs the original's recipe, seed 0
    python bench_quality.py --recipes default --seeds 0,1,2 --steps 1000
    python bench_quality.py --unconditional --recipes default --steps 1000
    python bench_quality.py --recipes default,original --seeds 0 --steps 250,500,1000,1872 --plot docs/quality.png

Each run trains in models/bench_quality/ on the bundled digits (a subfolder per --dataset-path) from its
preset with the recipe's changes, for the whole epochs that reach each of --steps (a run of that length; with
a constant rate, one run resumed exactly from point to point), and is scored there: EMA weights, --n samples
per label drawn with the run's grid sampler. Runs already there are reused ("reused" in the training-minutes
column). Conditional models: label accuracy (overall and the worst class); unconditional ones: the share of
samples the judge classifies with confidence >= 0.9 and the spread over classes; both: the in-domain FD
against held-out real images, next to the real-vs-real floor.
"""
import hardware  # noqa: F401, I001  (first: it sets the OpenMP spin before torch loads)

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time

import torch

import train
from checkpoints import load_checkpoint, load_config
from config import (CLUSTERED_DEFAULTS, PRESETS, SECTIONS, check_cfg_min_sigma, check_corrector_snr, own_clip,
                    preset_config, validate)
from hardware import autocast_dtype, pick_device, precision_name
from quality import Evaluator
from sampling import generate, load_for_sampling, resolve_sampling, with_guide
from utils import UserError, get_data, option_adder, prepare_mnist

# What each recipe changes from its preset ("default" is the default preset as it is). The ablation takes one
# part of the default back to what the original or an earlier default had.
# the default before: 936 steps of 64, PyTorch's AdamW betas, unconditional runs without autoguidance
BEFORE = {"batch_size": 64, "adam_beta2": 0.999, "guide_at": 0.0}
RECIPES = {
    "default": ("default", {}),
    "uniform-t": ("default", dict(timesteps="uniform")),
    "eps": ("default", dict(prediction="eps")),
    "random-crop": ("default", dict(crop="random")),
    "constant-lr": ("default", dict(lr=2e-3, warmup_steps=0, lr_schedule="constant", grad_clip=0.0)),
    "batch-64": ("default", dict(batch_size=64)),
    "adam-beta2-0.999": ("default", dict(adam_beta2=0.999)),
    # half the default's width: trained for 468 steps, the autoguidance guide of docs/sampling.md
    "width-8": ("default", dict(base_width=8)),
    "no-guide": ("default", dict(guide_at=0.0)),  # unconditional: without its autoguidance
    # unconditional: the same model guided by its EMA after an eighth or a half of the epochs; not adopted (sampling.md)
    "guide-at-0.125": ("default", dict(guide_at=0.125)),
    "guide-at-0.5": ("default", dict(guide_at=0.5)),
    # unconditional: classes found by k-means of the images, guided by CFG (ddpm.py --clusters K, docs/quality.md)
    **{f"clusters-{k}": ("default", dict(clusters=k, **CLUSTERED_DEFAULTS)) for k in (10, 40, 100)},
    # measured on the unconditional default and not adopted (docs/quality.md): a wider network, a slower EMA, a
    # higher rate, the loss weighted otherwise over the timesteps, the same images in twice the steps
    "width-24": ("default", dict(base_width=24)),
    "width-32": ("default", dict(base_width=32)),
    "ema-0.995": ("default", dict(ema_beta=0.995)),
    "lr-5e-3": ("default", dict(lr=5e-3)),
    "plain-v": ("default", dict(min_snr_gamma=0.0, timesteps="uniform")),
    "min-snr-10": ("default", dict(min_snr_gamma=10.0)),
    "min-snr-20": ("default", dict(min_snr_gamma=20.0)),
    "batch-16": ("default", dict(batch_size=16)),
    # the default trained and sampled in fp32 (--no-amp): against "default" where the CPU or GPU takes bf16
    "fp32": ("default", dict(amp=False)),
    # the default before, and changes to it measured and not adopted (docs/quality.md): a higher peak rate, a
    # higher min-SNR gamma, a wider network; with uniform timesteps too, twice the steps, a higher rate, a
    # wider network, more label dropout, a lower min-SNR gamma and a slower EMA
    "before": ("default", BEFORE),
    "before+lr-5e-3": ("default", {**BEFORE, "lr": 5e-3}),
    "before+min-snr-10": ("default", {**BEFORE, "min_snr_gamma": 10.0}),
    "before+width-24": ("default", {**BEFORE, "base_width": 24}),
    "before+uniform-t": ("default", {**BEFORE, "timesteps": "uniform"}),
    "before+uniform-t+batch-32": ("default", {**BEFORE, "timesteps": "uniform", "batch_size": 32}),
    "before+uniform-t+width-32": ("default", {**BEFORE, "timesteps": "uniform", "base_width": 32}),
    "before+uniform-t+lr-5e-3": ("default", {**BEFORE, "timesteps": "uniform", "lr": 5e-3}),
    "before+uniform-t+label-dropout-0.2": ("default", {**BEFORE, "timesteps": "uniform", "label_dropout": 0.2}),
    "before+uniform-t+min-snr-1": ("default", {**BEFORE, "timesteps": "uniform", "min_snr_gamma": 1.0}),
    "before+uniform-t+ema-0.995": ("default", {**BEFORE, "timesteps": "uniform", "ema_beta": 0.995}),
    # the original's loss (plain MSE on eps, uniform timesteps), data (zooming random crops), constant rate and
    # AdamW betas, without autoguidance, with the default network, batch and EMA
    "original": ("default", dict(min_snr_gamma=0.0, timesteps="uniform", crop="random", prediction="eps",
                                 lr=2e-3, warmup_steps=0, lr_schedule="constant", grad_clip=0.0, adam_beta2=0.999,
                                 ema_beta=0.995, ema_start=500, guide_at=0.0)),
}
FOLDER = "bench_quality"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    opt = option_adder(p)
    opt("--recipes", default="default,original", help=f"comma-separated, of: {', '.join(RECIPES)}")
    opt("--seeds", default="0", help="comma-separated training seeds (default: 0)")
    opt("--steps", default="1000", help="comma-separated optimizer steps to score at (each rounded up to "
                                        "a whole epoch; default: 1000)")
    opt("--unconditional", action="store_true", help="ddpm.py's model instead of ddpm_conditional.py's")
    opt("--cfg-scales", help="conditional and clusters-K recipes: comma-separated guidance scales to score each "
                              "point at (default: the run's)")
    opt("--sample-steps", type=int, help="network evaluations per sample to score with (default: the recipe's)")
    opt("--corrector-snr", type=float, help="score with this Langevin corrector (0: none; default: the recipe's)")
    opt("--cfg-min-sigma", type=float, help="conditional and clusters-K: guide only at noise levels above this, "
                                            "0: at every step (default: the recipe's)")
    opt("--clip", action=argparse.BooleanOptionalAction, help="clip each step's x0 prediction to the data range "
                                                              "(default: the recipe's)")
    opt("--original-script", choices=("ckpt", "ema"),
        help="score the run's ckpt.pt or ema_ckpt.pt as the original README's script samples it: "
             "Diffusion(...).sample(model, n), DDPM's 999 steps without a guide (labels: CFG 3 at every step), "
             "corrector or clip (default: as the recipe's grids, EMA weights)")
    opt("--n", type=int, default=50, help="samples per label (unconditional: 10x this in all; default: 50)")
    opt("--draws", type=int, default=1, help="score this many draws of samples (seeds 0, 1, ...) and print "
                                             "their mean: FD at 500 samples varies by draw (default: 1)")
    opt("--dataset-path", help="an ImageFolder (default: the bundled MNIST digits)")
    opt("--device", default="auto", help="default: auto")
    opt("--plot", help="also plot label accuracy (or confident share) and FD against steps to this PNG")
    opt("--out", default="results/bench_quality.md", help="the table is also written here")
    return p


def run_folder(dataset_path):
    """Where the runs go: models/bench_quality/, and a subfolder per dataset other than the bundled digits
    (its folder's name and a hash of its path), so that runs on two datasets never pass for each other."""
    if dataset_path is None:
        return FOLDER
    path = os.path.abspath(dataset_path)
    return os.path.join(FOLDER, f"{os.path.basename(path)}_{hashlib.sha1(path.encode()).hexdigest()[:6]}")


def recipe_config(name, seed, conditional, dataset_path, folder=FOLDER):
    preset, changes = RECIPES[name]
    base = preset_config(preset, conditional)
    config = dataclasses.replace(base, **changes)
    config.clip = own_clip(base, config.sampler, config.eta)
    config.seed, config.dataset_path = seed, dataset_path
    config.channels = config.channels or 1
    config.run_name = os.path.join(folder, f"{'c' if conditional else 'u'}_{name}_s{seed}")
    return validate(config)


def recipe_changes(saved, config):
    """What a saved run trained with that this recipe does not ("name saved, not wanted" strings): a run is
    reused only if its network, diffusion, data and training settings all match, whatever its length."""
    keys = [k for section in ("network", "diffusion", "data", "training") for k in SECTIONS[section]
            if k not in ("epochs", "data_seed", "cluster_sizes")]  # the last: what the data and the seed decide

    def setting(c, k):
        value = getattr(c, k)
        return os.path.abspath(value) if k == "dataset_path" and value else value
    return [f"{k} {getattr(saved, k)}, not {getattr(config, k)}" for k in keys
            if setting(saved, k) != setting(config, k)
            and not (k == "num_classes" and config.num_classes is None)]  # the data's count: dataset_path decides


def train_to(config, epochs):
    """A run of `epochs` epochs of this recipe. With a constant rate one run serves every point: it is resumed
    (exactly) from the last; a schedule that spans the run needs a run of each length, and so does a point
    short of a constant-rate run already trained further (never cut back). Nor is a run reused that trained in
    another precision than this recipe does on config.device (on another machine): `--recipes default,fp32`
    compares exactly that."""
    longest = os.path.join("models", config.run_name, "state.pt")
    if config.lr_schedule != "constant" or (os.path.isfile(longest) and load_checkpoint(longest)["epoch"] > epochs):
        config = dataclasses.replace(config, run_name=f"{config.run_name}_e{epochs}")
    run_dir = os.path.join("models", config.run_name)
    state_path = os.path.join(run_dir, "state.pt")
    state = load_checkpoint(state_path) if os.path.isfile(state_path) else None
    done = state["epoch"] if state else None
    if done is not None:
        saved = load_config(run_dir)
        changed = recipe_changes(saved, config)
        precision = precision_name(autocast_dtype(pick_device(config.device), config.amp, "train"))  # as train.py
        trained_in = state.get("precision")  # None: saved before runs recorded it, taken as fp32
        if (trained_in or "fp32") != precision:
            changed.append(f"precision {trained_in or 'unrecorded'}, not {precision}")
        if changed:
            raise UserError(f"{run_dir} trained with {', '.join(changed)}: not this recipe here (a default "
                            "changed, or another machine trained it?); move it away to train this one")
    if done is not None and done < epochs:
        saved.epochs, saved.device = epochs, config.device
        train.train(saved, resuming=True)
    elif done != epochs:
        config.epochs = epochs
        train.train(config, overwrite=True)
    return config


def score(config, ev, n, device, cfg_scale=None, cfg_min_sigma=None, sample_steps=None, corrector_snr=None,
          clip=None, seed=0, draws=1, original_script=None):
    """The judge's figures for the run's EMA weights (a dict, see quality.Evaluator.evaluate; with draws > 1
    their mean over the draws from the noises of seed, seed + 1, ...), sampled from the noises of `seed` with
    the recipe's grid settings (a run saved before a sampling default changed is scored with today's), unless
    a guidance scale, cfg_min_sigma, number of sampling steps, corrector or clip is given. original_script
    ("ckpt" or "ema"): those weights sampled as the original README's script samples them instead."""
    run_dir = os.path.join("models", config.run_name)
    if original_script:  # the weights alone, DDPM's 999 steps; labels: CFG 3 at every step, as the original
        weights = os.path.join(run_dir, "ckpt.pt" if original_script == "ckpt" else "ema_ckpt.pt")
        path, model, saved, diffusion = load_for_sampling(weights, device)
        s = argparse.Namespace(sampler="ddpm", steps=None, eta=None, corrector_snr=0.0, clip=None,
                               cfg_scale=PRESETS["original"]["cfg_scale"], cfg_min_sigma=0.0)
    else:
        path, model, saved, diffusion = load_for_sampling(run_dir, device)
        model, _ = with_guide(model, config, path, device)  # the run's own autoguidance, as sample.py's
        # what is not given comes from the recipe, as sample.py fills it from a run
        s = argparse.Namespace(sampler=None, steps=sample_steps, eta=None, corrector_snr=corrector_snr, clip=clip,
                               cfg_scale=cfg_scale, cfg_min_sigma=cfg_min_sigma)
    resolve_sampling(s, config)
    # the saved config knows the class count (a recipe's is None until its data is read in training)
    labels = list(range(saved.num_classes)) if config.conditional else None
    results = []
    for draw in range(seed, seed + draws):  # the model and its guide are loaded once for all draws
        images, ys = generate(model, diffusion, n if config.conditional else 10 * n, labels, s.cfg_scale, s.sampler,
                              s.steps, s.eta, seed=draw, progress=False,
                              amp_dtype=autocast_dtype(device, config.amp, "sample"), cfg_min_sigma=s.cfg_min_sigma,
                              corrector_snr=s.corrector_snr, clip=s.clip, clusters=saved.cluster_sizes)
        results.append(ev.evaluate(images, ys))
    return mean_of(results)


def mean_of(draws):
    """One result from the results of several draws: each figure's mean, per class too; histograms summed."""
    out = dict(draws[0])
    for key, value in out.items():
        if key == "histogram":
            out[key] = [sum(h) for h in zip(*(d[key] for d in draws))]
        elif isinstance(value, dict):
            out[key] = {c: sum(d[key][c] for d in draws) / len(draws) for c in value}
        elif isinstance(value, float):
            out[key] = sum(d[key] for d in draws) / len(draws)
    return out


def row(recipe, seed, steps, cfg_scale, r, secs):
    if "label_acc" in r:
        first = f"{r['label_acc']:.3f} | {min(r['class_acc'].values()):.3f}"
    else:
        total = sum(r["histogram"])
        first = f"{r['confident']:.3f} | {min(r['histogram']) / total:.3f}-{max(r['histogram']) / total:.3f}"
    return (f"| {recipe} | {seed} | {steps} | {cfg_scale} | {first} | {r['fd']:.1f} | {r['fd_floor']:.1f} "
            f"| {r['fd'] / r['fd_floor']:.2f} | {f'{secs / 60:.1f}' if secs >= 1 else 'reused'} |")


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        bench(a, argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_choices(a, recipes, points, scales):
    """A UserError for recipes, points and sampling options that do not go together."""
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or min(points) <= 0 or a.n <= 0 or a.draws <= 0:
        raise UserError(f"--recipes {a.recipes} / --steps {a.steps} / --n {a.n} / --draws {a.draws}: recipes from "
                        f"{', '.join(RECIPES)}, positive steps, --n and --draws")
    if scales and a.unconditional and not all(RECIPES[r][1].get("clusters") for r in recipes):
        raise UserError("--cfg-scales guides by labels: unconditional, only the clusters-K recipes have them")
    if a.original_script and (scales or a.sample_steps or a.corrector_snr or a.cfg_min_sigma or a.clip
                              or any(RECIPES[r][1].get("clusters") for r in recipes)):
        raise UserError("--original-script samples a run's weights alone with DDPM-999, as the original README's "
                        "script: drop --cfg-scales, --sample-steps, --corrector-snr, --cfg-min-sigma, --clip and "
                        "the clusters-K recipes")


def bench(a, argv):
    try:
        recipes, seeds = a.recipes.split(","), [int(s) for s in a.seeds.split(",")]
        points = sorted(int(s) for s in a.steps.split(","))
        scales = [float(s) for s in a.cfg_scales.split(",")] if a.cfg_scales else []
    except ValueError:
        raise UserError(f"--seeds {a.seeds} / --steps {a.steps} / --cfg-scales {a.cfg_scales}: comma-separated "
                        "numbers, e.g. --seeds 0,1,2 --steps 250,500") from None
    check_choices(a, recipes, points, scales)
    device = pick_device(a.device)
    dataset_path, folder = a.dataset_path or prepare_mnist(), run_folder(a.dataset_path)
    probe = recipe_config(recipes[0], seeds[0], not a.unconditional, dataset_path, folder)
    if a.cfg_min_sigma is not None:
        check_cfg_min_sigma(a.cfg_min_sigma)
    if a.corrector_snr is not None:
        check_corrector_snr(a.corrector_snr)
    if a.sample_steps is not None and not 1 <= a.sample_steps < probe.noise_steps:
        raise UserError(f"--sample-steps {a.sample_steps}: between 1 and {probe.noise_steps - 1}")
    ev = Evaluator(dataset_path, probe.image_size, probe.channels, device,
                   log=lambda s: print(s, file=sys.stderr))
    what = "confident share | class share (min-max)" if a.unconditional else "label acc | worst class"
    lines = [f"`python bench_quality.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"judge: held-out accuracy {ev.heldout_acc:.3f} (its worst class on real images: "
             f"{min(ev.heldout_class_acc.values()):.3f}; confident about {ev.heldout_confident:.3f} of real "
             f"images); {torch.get_num_threads()} threads, {device}", "",
             f"| recipe | seed | steps | CFG | {what} | FD | floor | FD / floor | training minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results, batch_sizes = {}, {}
    for recipe in recipes:
        for seed in seeds:
            config = recipe_config(recipe, seed, not a.unconditional, dataset_path, folder)
            config.device = str(device)  # trained where it is scored
            steps_per_epoch = len(get_data(config))
            secs = 0.0
            for point in points:
                epochs = math.ceil(point / steps_per_epoch)
                t0 = time.perf_counter()
                run = train_to(config, epochs)
                # training alone, not the scoring before it: a constant rate resumes one run from point to point
                took = time.perf_counter() - t0
                secs = secs + took if config.lr_schedule == "constant" else took
                steps = epochs * steps_per_epoch
                own_scale = PRESETS["original"]["cfg_scale"] if a.original_script else config.cfg_scale
                for cfg_scale in scales or [own_scale if config.takes_labels else "-"]:
                    r = score(run, ev, a.n, device, cfg_scale if scales else None, a.cfg_min_sigma, a.sample_steps,
                              a.corrector_snr, a.clip, draws=a.draws, original_script=a.original_script)
                    label = recipe if len(scales) < 2 else f"{recipe}, CFG {cfg_scale}"
                    results[(label, seed, steps)], batch_sizes[label] = r, config.batch_size
                    lines.append(row(recipe, seed, steps, cfg_scale, r, secs))
                    print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if a.plot:
        plot(results, a.plot, a.unconditional, batch_sizes)
        print(f"plotted {a.plot}", file=sys.stderr)


def plot(results, path, unconditional, batch_sizes):
    """Mean over seeds of each recipe: the first figure (label accuracy or confident share) and FD/floor.
    batch_sizes: each recipe's, which says what a step is (in the axis label, or per line when they differ).
    Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "confident" if unconditional else "label_acc"
    same_batch = len(set(batch_sizes.values())) == 1
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for recipe in dict.fromkeys(r for r, _, _ in results):
        steps = sorted({s for r, _, s in results if r == recipe})
        for ax, f in zip(axes, (lambda r: r[key], lambda r: r["fd"] / r["fd_floor"])):
            ys = [sum(f(v) for (r, _, s), v in results.items() if r == recipe and s == st) /
                  sum(1 for (r, _, s) in results if r == recipe and s == st) for st in steps]
            ax.plot(steps, ys, marker="o",
                    label=recipe if same_batch else f"{recipe} (batch {batch_sizes[recipe]})")
    axes[0].set_ylabel("confident share" if unconditional else "label accuracy (judge)")
    axes[1].set_ylabel("in-domain FD / real-vs-real floor")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel(f"optimizer steps (batch {next(iter(batch_sizes.values()))})" if same_batch else
                      "optimizer steps")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


if __name__ == "__main__":
    main()
