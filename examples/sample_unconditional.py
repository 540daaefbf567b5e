"""Load an unconditional checkpoint, sample a batch of images and plot them.

    python examples/sample_unconditional.py --ckpt models/DDPM_Unconditional_mnist/ema_ckpt.pt

The defaults fit the default `python ddpm.py` run (16x16 grayscale, width 16). That run is trained on clusters
of its images as classes: its ckpt.pt is a UNet's, and clusters.pt beside it holds each cluster's label
embedding; with both, each sample draws its cluster as the images fall into them and is guided by it (CFG), as
sample.py does. A `--clusters 0` run saved its autoguidance guide instead (guide_ckpt.pt beside the
checkpoint): its samples are guided by that, and each sampling step is followed by a Langevin corrector step,
with DDIM's x0 predictions left unclipped, as the run's own grids are. Without a display the row is saved
under results/plots/ and its path printed.
"""
import argparse
import json
import os
import sys

# the repo root, so that `python examples/sample_unconditional.py` finds modules.py, diffusion.py and utils.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hardware  # noqa: E402, F401  (before torch: the OpenMP spin setting)
import torch  # noqa: E402

from modules import Autoguided, UNet, UNet_conditional  # noqa: E402
from diffusion import Diffusion  # noqa: E402  (the original's `from ddpm import Diffusion` works too)
from utils import plot_images  # noqa: E402


def run_config(ckpt):
    """The run's config.json beside the checkpoint ({} for the original's checkpoints, which have none): what
    the network predicts (sampling a v-prediction model as an eps one gives noise), its clusters, its grids."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="models/DDPM_Unconditional_mnist/ema_ckpt.pt")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim", "dpm++"])
    p.add_argument("--steps", type=int, help="default: the run's grid setting, else 100; ddpm walks all 999")
    p.add_argument("--prediction", choices=["eps", "v", "x0"], help="default: the run's config.json, else eps")
    p.add_argument("--guide-scale", type=float, default=2.0, help="autoguidance by guide_ckpt.pt; 1: off")
    p.add_argument("--corrector-snr", type=float, help="a Langevin corrector step after each step (default: "
                                                       "the run's grid setting, else 0.3; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="unconditional")
    args = p.parse_args()
    if not os.path.isfile(args.ckpt):
        print(f"error: --ckpt {args.ckpt}: no such file (train one with `python ddpm.py`)", file=sys.stderr)
        sys.exit(2)

    config = run_config(args.ckpt)
    grids, clusters = config.get("sample_grids", {}), config.get("data", {}).get("cluster_sizes")
    generator = torch.Generator().manual_seed(args.seed)
    guidance = {}
    if clusters:  # each sample's cluster drawn as the images fall into them, then guided by it
        model = UNet_conditional(c_in=args.channels, c_out=args.channels, num_classes=len(clusters),
                                 base_width=args.base_width)
        labels = torch.multinomial(torch.tensor(clusters, dtype=torch.float), args.n, replacement=True,
                                   generator=generator)
        guidance = dict(labels=labels, cfg_scale=grids["cfg_scale"], cfg_min_sigma=grids["cfg_min_sigma"])
    else:
        model = UNet(c_in=args.channels, c_out=args.channels, base_width=args.base_width)
    weights = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    if clusters:  # the label embedding this checkpoint leaves out, by its file name
        extra = torch.load(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "clusters.pt"),
                           map_location="cpu", weights_only=True)
        weights.update(extra.get(os.path.basename(args.ckpt), {}))
    model.load_state_dict(weights)
    guide_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "guide_ckpt.pt")
    if os.path.isfile(guide_path) and args.guide_scale != 1:  # the run's early EMA: steer away from its errors
        guide = UNet(c_in=args.channels, c_out=args.channels, base_width=args.base_width)
        guide.load_state_dict(torch.load(guide_path, map_location="cpu", weights_only=True))
        model = Autoguided(model, guide, args.guide_scale)
    prediction = args.prediction or config.get("diffusion", {}).get("prediction", "eps")
    diffusion = Diffusion(img_size=args.image_size, device="cpu", prediction=prediction)
    x = diffusion.sample(model, n=args.n, sampler=args.sampler,
                         steps=None if args.sampler == "ddpm" else args.steps or grids.get("sample_steps", 100),
                         corrector_snr=grids.get("corrector_snr", 0.3) if args.corrector_snr is None
                         else args.corrector_snr,
                         clip=False if args.sampler == "ddim" else None,  # dpm++ keeps its clip (docs/sampling.md)
                         generator=generator, **guidance)
    plot_images(x, args.title)


if __name__ == "__main__":
    main()
