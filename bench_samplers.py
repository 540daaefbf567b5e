"""Quality and speed of the samplers on one conditional checkpoint: a markdown table.

    python bench_samplers.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --n 500 --n-ddpm 100

Without --ckpt it trains the default conditional model first (models/DDPM_conditional_bench/, ~10 min on a
laptop CPU, reused when it is already there). Every sampler starts from the same noise x_T with balanced
labels (i % classes), so rows differ by the sampler alone. DDPM-999 costs 999 evaluations per image, so it
runs on the first --n-ddpm images only; every row is also scored on those first images, which is the
like-for-like comparison (FD depends on the sample count). Quality is evaluate.py's in-domain measure.
"""
import hardware  # noqa: F401, I001  (first: it sets the OpenMP spin before torch loads)

import argparse
import os
import shlex
import sys
import time

import torch

import train
from config import preset_config, validate
from hardware import pick_device
from quality import Evaluator
from sampling import load_for_sampling, resolve_guidance
from utils import UserError, option_adder

# (sampler, steps, eta, clip): fast ones first; clip None is the sampler's own (ddim and dpm++ clip), False
# is how the default preset samples (docs/sampling.md)
CONFIGS = [("dpm++", 10, 0.0, None), ("dpm++", 20, 0.0, None), ("ddim", 20, 0.0, None), ("ddim", 25, 1.0, None),
           ("ddim", 50, 1.0, None), ("ddim", 50, 1.0, False), ("ddim", 50, 0.0, None), ("ddim", 100, 1.0, None)]
RUN = "DDPM_conditional_bench"
NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM-Solver++(2M)"}


def default_checkpoint(seed):
    """Train the default conditional model (or reuse a finished run) and return its EMA weights."""
    path = os.path.join("models", RUN, "ema_ckpt.pt")
    if not os.path.isfile(path):
        print(f"no --ckpt: training the default conditional model into models/{RUN}/", file=sys.stderr)
        config = preset_config("default", conditional=True)
        config.run_name, config.seed, config.channels = RUN, seed, 1
        train.train(validate(config))
    return path


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    opt = option_adder(p)
    opt("--ckpt", help="a conditional checkpoint or run folder (default: train the default model)")
    opt("--n", type=int, default=500, help="images per fast sampler (default: 500)")
    opt("--n-ddpm", type=int, default=100, help="images for DDPM-999, 0: skip it (default: 100)")
    opt("--cfg-scale", type=float, help="default: the run's")
    opt("--cfg-min-sigma", type=float, help="guide only at noise levels above this, 0: at every step (default: "
                                            "the run's)")
    opt("--seed", type=int, default=0, help="default: 0")
    opt("--batch-size", type=int, default=500, help="images per sampling batch (default: 500)")
    opt("--dataset-path", help="the training ImageFolder (default: the run's)")
    opt("--device", default="auto", help="default: auto")
    opt("--out", default="results/bench_samplers.md", help="the table is also written here")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    command = "python " + " ".join(shlex.quote(x) for x in ["bench_samplers.py"] + (argv or sys.argv[1:]))
    try:
        if a.n <= 0 or a.n_ddpm < 0 or a.n_ddpm > a.n:
            raise UserError("need --n > 0 and 0 <= --n-ddpm <= --n")
        device = pick_device(a.device)
        ckpt, model, config, diffusion = load_for_sampling(a.ckpt or default_checkpoint(a.seed), device)
        if not config.conditional:
            raise UserError(f"--ckpt {ckpt}: the benchmark needs a conditional checkpoint")
        resolve_guidance(a, config)
        ev = Evaluator(a.dataset_path or config.dataset_path, config.image_size, config.channels, device,
                       log=lambda s: print(s, file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    lines = table_head(a, command, ckpt, config, ev, device)
    print("\n".join(lines), flush=True)
    labels = torch.arange(a.n) % config.num_classes
    shape = (a.n, config.channels, config.image_size, config.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(a.seed))  # one start for every sampler
    small = a.n_ddpm or min(a.n, 100)
    todo = [(s, st, e, clip, a.n) for s, st, e, clip in CONFIGS if st < diffusion.noise_steps] + \
        ([("ddpm", diffusion.noise_steps - 1, 1.0, None, a.n_ddpm)] if a.n_ddpm else [])
    for sampler, steps, eta, clip, n in todo:
        t0 = time.perf_counter()
        images = torch.cat([diffusion.sample(model, min(n, i + a.batch_size) - i, labels[i:i + a.batch_size],
                                             cfg_scale=a.cfg_scale, cfg_min_sigma=a.cfg_min_sigma, sampler=sampler,
                                             steps=steps, eta=eta, clip=clip,
                                             generator=torch.Generator().manual_seed(a.seed + 1 + i),
                                             noise=x_T[i:min(n, i + a.batch_size)],
                                             progress=sys.stderr.isatty()).cpu()
                            for i in range(0, n, a.batch_size)])
        secs = time.perf_counter() - t0
        full, first = ev.evaluate(images, labels[:n]), ev.evaluate(images[:small], labels[:small])
        cells = ["-", "-"] if sampler == "ddpm" else [f"{full['label_acc']:.3f}", f"{full['fd']:.2f}"]
        name = NAMES[sampler] + (", unclipped" if clip is False else "")
        lines.append(f"| {name} | {steps} | {eta if sampler != 'dpm++' else '-'} | {' | '.join(cells)} | "
                     f"{first['label_acc']:.3f} | {first['fd']:.2f} | {secs:.0f} s (n={n}) | {1000 * secs / n:.0f} |")
        print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


def table_head(a, command, ckpt, config, ev, device):
    small = a.n_ddpm or min(a.n, 100)
    floor_n, floor_small = ev.evaluate(ev.real_a[:a.n]), ev.evaluate(ev.real_a[:small])
    return [
        f"`{command}`", "",
        f"checkpoint {ckpt} ({config.base_width} base width, {config.image_size}x{config.image_size}, "
        f"{config.num_classes} classes, predicts {config.prediction}), CFG scale {a.cfg_scale} "
        f"where sigma_t > {a.cfg_min_sigma}, {device}, "
        f"{torch.get_num_threads()} threads. FD: in-domain Frechet distance (quality.py) against "
        f"{len(ev.real_b)} held-out real images; NFE: network evaluations per image (with CFG each is one pass "
        "over the doubled batch).", "",
        f"| sampler | NFE | eta | acc (n={a.n}) | FD (n={floor_n['fd_n']}) | acc (first {small}) "
        f"| FD (first {small}) | wall time | ms / image |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| real images (floor) | - | - | {ev.heldout_acc:.3f} | {floor_n['fd_floor']:.2f} | - "
        f"| {floor_small['fd_floor']:.2f} | - | - |",
    ]


if __name__ == "__main__":
    main()
