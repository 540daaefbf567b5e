"""Quality and speed of the samplers on one conditional checkpoint: a markdown table.

    python bench_samplers.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --n 500 --n-ddpm 100

Without --ckpt it trains the default conditional model first (models/DDPM_conditional_bench/, ~10 min on a
laptop CPU, reused when it is already there). Every sampler starts from the same noise x_T with balanced
labels (i % classes), so rows differ by the sampler alone. DDPM-999 costs 999 evaluations per image, so it
runs on the first --n-ddpm images only; every row is also scored on those first images, which is the
like-for-like comparison (FD depends on the sample count). Quality is evaluate.py's in-domain measure.
"""
import argparse
import os
import shlex
import sys
import time

import torch

import sample
from evaluate import Evaluator
from utils import UserError, option_adder

# (sampler, steps, eta): the list, fast ones first
CONFIGS = [("dpm++", 10, 0.0), ("dpm++", 20, 0.0), ("ddim", 25, 1.0), ("ddim", 50, 1.0), ("ddim", 50, 0.0),
           ("ddim", 100, 1.0)]
RUN = "DDPM_conditional_bench"


def default_checkpoint(seed):
    """Train the default conditional model (or reuse a finished run) and return its EMA weights."""
    path = os.path.join("models", RUN, "ema_ckpt.pt")
    if not os.path.isfile(path):
        import train

        print(f"no --ckpt: training the default conditional model into models/{RUN}/", file=sys.stderr)
        train.main(conditional=True, argv=["--run-name", RUN, "--seed", str(seed)])
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    opt = option_adder(p)

    opt("--ckpt", help="a conditional checkpoint (default: train the default model)")
    opt("--n", type=int, default=500, help="images per fast sampler")
    opt("--n-ddpm", type=int, default=100, help="images for DDPM-999 (0: skip it)")
    opt("--cfg-scale", type=float, default=3.0)
    opt("--seed", type=int, default=0)
    opt("--batch-size", type=int, default=500, help="images per sampling batch")
    opt("--dataset-path", help="the training ImageFolder (default: the bundled MNIST digits)")
    opt("--device", default="auto")
    opt("--out", default="results/bench_samplers.md", help="the table is also written here")
    a = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(x) for x in ["bench_samplers.py"] + (argv or sys.argv[1:]))
    try:
        if a.n <= 0 or a.n_ddpm < 0 or a.n_ddpm > a.n:
            raise UserError("need --n > 0 and 0 <= --n-ddpm <= --n")
        ckpt = a.ckpt or default_checkpoint(a.seed)
        sa = sample.build_parser().parse_args(["--ckpt", ckpt, "--device", a.device, "--out", "x.png"])
        _, model, info, _, diffusion, _ = sample.resolve(sa)
        if not info["conditional"]:
            raise UserError(f"--ckpt {ckpt}: the benchmark needs a conditional checkpoint")
        device = next(model.parameters()).device
        ev = Evaluator(a.dataset_path, sa.image_size, info["channels"], device,
                       log=lambda s: print(s, file=sys.stderr))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    k = info["num_classes"]
    labels = torch.arange(a.n) % k
    shape = (a.n, info["channels"], sa.image_size, sa.image_size)
    xT = torch.randn(shape, generator=torch.Generator().manual_seed(a.seed))  # one start for every sampler
    small = a.n_ddpm or min(a.n, 100)

    def run(sampler, steps, eta, n):
        g = torch.Generator().manual_seed(a.seed + 1)  # the noise ancestral steps add
        images, t0 = [], time.perf_counter()
        for i in range(0, n, a.batch_size):
            j = min(n, i + a.batch_size)
            images.append(diffusion.sample(model, j - i, labels[i:j], cfg_scale=a.cfg_scale, sampler=sampler,
                                           steps=steps, eta=eta, generator=g, noise=xT[i:j],
                                           progress=sys.stderr.isatty()).cpu())
        return torch.cat(images), time.perf_counter() - t0

    floor_n, floor_small = ev.evaluate(ev.real_a[:a.n]), ev.evaluate(ev.real_a[:small])
    kn = floor_n["fd_n"]
    lines = [
        f"`{command}`", "",
        f"checkpoint {ckpt} ({info['base_width']} base width, {sa.image_size}x{sa.image_size}, {k} classes), "
        f"CFG scale {a.cfg_scale}, {device}, {torch.get_num_threads()} threads. FD: in-domain Frechet distance "
        f"(evaluate.py) against {len(ev.real_b)} held-out real images; NFE: network evaluations per image "
        f"(with CFG each is one pass over the doubled batch).", "",
        f"| sampler | NFE | eta | acc (n={a.n}) | FD (n={kn}) | acc (first {small}) | FD (first {small}) "
        f"| wall time | ms / image |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| real images (floor) | - | - | {ev.heldout_acc:.3f} | {floor_n['fd_floor']:.2f} | - "
        f"| {floor_small['fd_floor']:.2f} | - | - |",
    ]
    print("\n".join(lines), flush=True)
    rows = {}
    todo = [(s, st, e, a.n) for s, st, e in CONFIGS if st < diffusion.noise_steps] + \
        ([("ddpm", None, 1.0, a.n_ddpm)] if a.n_ddpm else [])
    for sampler, steps, eta, n in todo:
        images, secs = run(sampler, steps, eta, n)
        full, first = ev.evaluate(images, labels[:n]), ev.evaluate(images[:small], labels[:small])
        nfe = steps or diffusion.noise_steps - 1
        name = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++": "DPM-Solver++(2M)"}[sampler]
        if sampler == "ddpm":
            cells = ["-", "-"]
        else:
            cells = [f"{full['label_acc']:.3f}", f"{full['fd']:.2f}"]
        row = (f"| {name} | {nfe} | {eta if sampler != 'dpm++' else '-'} | {' | '.join(cells)} | "
               f"{first['label_acc']:.3f} | {first['fd']:.2f} | {secs:.0f} s (n={n}) | {1000 * secs / n:.0f} |")
        rows[(sampler, nfe, eta)] = first
        lines.append(row)
        print(row, flush=True)

    ref = rows.get(("ddpm", diffusion.noise_steps - 1, 1.0))
    if ref is not None:
        lines.append("")
        ok = [f"{s} {nfe}" + (f" eta={e}" if s == "ddim" else "") for (s, nfe, e), r in rows.items()
              if s != "ddpm" and nfe <= 50 and r["fd"] <= 1.1 * ref["fd"] and r["label_acc"] >= ref["label_acc"] - 0.01]
        lines.append(f"Goal (<= 50 NFE, FD within 10% of DDPM-999's {ref['fd']:.2f} and label accuracy within 1 "
                     f"point of its {ref['label_acc']:.3f}, on the first {small} images): "
                     + (", ".join(ok) if ok else "none") + ".")
        print(lines[-1])
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nwrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
