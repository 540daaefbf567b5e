"""The forward-noising strip of the original repo: one image, noised at growing timesteps.

    python examples/noising_test.py                      # the first PNG under data/mnist, or a drawn test image
    python examples/noising_test.py --image photo.jpg --image-size 64 --out results/noise.jpg

The strip starts with the clean image, then x_t for t = 50, 100, 150, 200, 300, 600, 700, 999.
"""
import argparse
import glob
import os
import sys

# the repo root, so that `python examples/noising_test.py` finds modules.py, diffusion.py and utils.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hardware  # noqa: E402, F401  (before torch: the OpenMP spin setting)
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffusion import Diffusion  # noqa: E402  (the original's `from ddpm import Diffusion` works too)
from utils import save_images  # noqa: E402

TIMESTEPS = [50, 100, 150, 200, 300, 600, 700, 999]


def test_image(size):
    """A synthetic image (a disc and a bar on a gradient), so that the script runs with no data at all."""
    img = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse([size // 5, size // 5, size * 3 // 5, size * 3 // 5], fill=(220, 60, 40))
    draw.rectangle([size // 2, size * 2 // 3, size * 9 // 10, size * 4 // 5], fill=(40, 90, 220))
    return img


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", help="any image PIL reads (default: the first PNG under data/mnist, else a drawn one)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", default=os.path.join("results", "noise.jpg"))
    args = p.parse_args()

    path = args.image or next(iter(sorted(glob.glob("data/mnist/**/*.png", recursive=True))), None)
    if path and not os.path.isfile(path):
        print(f"error: --image {path}: no such file", file=sys.stderr)
        sys.exit(2)
    img = Image.open(path).convert("RGB") if path else test_image(args.image_size)
    x0 = T.Compose([T.Resize((args.image_size, args.image_size)), T.ToTensor()])(img) * 2 - 1  # [-1, 1]
    x0 = x0.unsqueeze(0).repeat(len(TIMESTEPS), 1, 1, 1)

    diffusion = Diffusion(img_size=args.image_size, device="cpu")
    x_t, _ = diffusion.noise_images(x0, torch.tensor(TIMESTEPS))
    strip = torch.cat([x0[:1], x_t])
    save_images(((strip.clamp(-1, 1) + 1) / 2 * 255).type(torch.uint8), args.out, nrow=len(strip))
    print(args.out)


if __name__ == "__main__":
    main()
