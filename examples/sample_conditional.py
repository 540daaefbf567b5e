"""Load a class-conditional checkpoint, sample with classifier-free guidance and plot the images.

    python examples/sample_conditional.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt            # one per class
    python examples/sample_conditional.py --label 3 --n 8 --cfg-scale 3                              # eight 3s

The defaults fit the default `python ddpm_conditional.py` run (16x16 grayscale, width 16, 10 classes).
Without a display the row is saved under results/plots/ and its path printed.
"""
import argparse
import json
import os
import sys

# the repo root, so that `python examples/sample_conditional.py` finds modules.py, diffusion.py and utils.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hardware  # noqa: E402, F401  (before torch: the OpenMP spin setting)
import torch  # noqa: E402

from modules import UNet_conditional  # noqa: E402
from diffusion import Diffusion  # noqa: E402  (the original's `from ddpm import Diffusion` works too)
from utils import plot_images  # noqa: E402


def trained_prediction(ckpt):
    """What the network predicts: the run's config.json beside the checkpoint says ("eps" without one, as for
    the original's checkpoints). Sampling a v-prediction model as an eps one gives noise."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.json")
    if not os.path.isfile(path):
        return "eps"
    with open(path) as f:
        return json.load(f)["diffusion"]["prediction"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="models/DDPM_conditional_mnist/ema_ckpt.pt")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--base-width", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--label", type=int, help="one label for all --n images (default: one image per class)")
    p.add_argument("--n", type=int, default=16, help="images when --label is given")
    p.add_argument("--cfg-scale", type=float, default=3)
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim", "dpm++"])
    p.add_argument("--steps", type=int, default=50, help="ignored by ddpm, which walks all 999 steps")
    p.add_argument("--prediction", choices=["eps", "v", "x0"], help="default: the run's config.json, else eps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--title", default="conditional")
    args = p.parse_args()
    if not os.path.isfile(args.ckpt):
        print(f"error: --ckpt {args.ckpt}: no such file (train one with `python ddpm_conditional.py`)",
              file=sys.stderr)
        sys.exit(2)

    model = UNet_conditional(c_in=args.channels, c_out=args.channels, num_classes=args.num_classes,
                             base_width=args.base_width)
    model.load_state_dict(torch.load(args.ckpt, map_location="cpu", weights_only=True))
    labels = torch.arange(args.num_classes) if args.label is None else torch.full((args.n,), args.label)
    prediction = args.prediction or trained_prediction(args.ckpt)
    diffusion = Diffusion(img_size=args.image_size, device="cpu", prediction=prediction)
    x = diffusion.sample(model, len(labels), labels, cfg_scale=args.cfg_scale, sampler=args.sampler,
                         steps=None if args.sampler == "ddpm" else args.steps,
                         generator=torch.Generator().manual_seed(args.seed))
    plot_images(x, args.title)


if __name__ == "__main__":
    main()
